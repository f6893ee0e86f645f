class Clock:
    """A monotonic clock that moves only when a test sets or advances `now`."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now
