"""The batch window: when jobs scheduled for `window` run (BATCH_SCHEDULE, a cron expression, in BATCH_TIMEZONE).

A job runs at the first firing of the schedule after it was created: one queued at 10:00 with the default
`0 2 * * *` runs at 02:00 the next night. Cron parsing is croniter's.
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

    def next_after(self, moment: datetime) -> datetime:
        return croniter(self.cron, moment.astimezone(self.zone)).get_next(datetime)

    def due(self, created_at: datetime, now: datetime) -> bool:
        return self.next_after(created_at) <= now
