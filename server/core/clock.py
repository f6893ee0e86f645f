"""The one wall clock: every timestamp the server stores or compares is `now()`, aware and in UTC. Durations and
deadlines use `time.monotonic()` (or the event loop's time), which a wall-clock step cannot move."""

from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)
