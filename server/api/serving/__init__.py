"""`/generate`, `/predict` and `/history`: the routes and their bodies (`schemas`)."""
