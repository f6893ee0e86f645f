"""Serving analytics: per-minute rollups of the request records (`rollups`), queries over them (`aggregate`),
alert thresholds (`thresholds`) and the performance report (`report`)."""
