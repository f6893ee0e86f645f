"""The batch window: when jobs scheduled for `window` run (BATCH_SCHEDULE, a cron expression, in BATCH_TIMEZONE).

A job runs at the first firing of the schedule after it was created: one queued at 10:00 with the default
`0 2 * * *` runs at 02:00 the next night. Cron parsing is croniter's.

Daylight saving follows cron's rule: a firing in the hour skipped in spring runs when the clocks reach it (02:30
becomes 03:00), and a schedule at fixed hours fires once in the hour repeated in autumn, not twice (croniter alone
would fire `30 1 * * *` at 01:30 summer time and again at 01:30 winter time). A schedule whose hour field is `*` is
about elapsed time, so it keeps firing through the repeated hour.
"""

from datetime import datetime
from zoneinfo import ZoneInfo

from croniter import croniter


class Window:
    def __init__(self, cron: str, timezone: str = "UTC"):
        if not croniter.is_valid(cron):
            raise ValueError(f"not a cron expression: {cron!r} (e.g. '0 2 * * *')")
        self.cron = cron
        self.zone = ZoneInfo(timezone)
        self._every_hour = cron.split()[1] == "*"

    def next_after(self, moment: datetime) -> datetime:
        firings = croniter(self.cron, moment.astimezone(self.zone))
        while True:
            firing: datetime = firings.get_next(datetime)
            if self._every_hour or not _repeated(firing):
                return firing

    def due(self, created_at: datetime, now: datetime) -> bool:
        return self.next_after(created_at) <= now


def _repeated(moment: datetime) -> bool:
    """The second occurrence of a wall-clock time the autumn change repeats."""
    return moment.fold == 1 and moment.replace(fold=0).utcoffset() != moment.utcoffset()
