"""`/batch/*`: batch offload jobs (create, list, cancel, results, report, health) and their bodies (`schemas`)."""
