"""`/metrics/*`, `/analyze/performance` and `/dashboard`: the analytics routes, their bodies (`schemas`) and the
operators' page (`dashboard`)."""
