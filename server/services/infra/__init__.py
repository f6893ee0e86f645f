"""Infrastructure the services stand on: the Redis client with its circuit breaker (`redis_client`, `circuit`) and
the health checks that load balancers and orchestrators probe (`health`)."""
