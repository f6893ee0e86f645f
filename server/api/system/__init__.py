"""`/`, `/health`, `/health/live`, `/metrics` (Prometheus), and the offline API docs with their static assets
(`docs`, `static`)."""
