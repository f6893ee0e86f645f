"""Rate limits: policies, the GCRA limiter (in memory or in Redis) and the egress guard."""
