from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from server.services.offload.window import Window

NIGHTLY = "0 2 * * *"
# A winter morning: Paris is UTC+1, so its 02:00 is 01:00 UTC.
WINTER_MORNING = datetime(2024, 1, 15, 10, tzinfo=UTC)


def test_a_job_runs_at_the_first_firing_after_it_was_created():
    window = Window(NIGHTLY)
    assert window.next_after(WINTER_MORNING) == datetime(2024, 1, 16, 2, tzinfo=UTC)
    assert window.next_after(datetime(2024, 1, 16, 1, 59, 59, tzinfo=UTC)) == datetime(2024, 1, 16, 2, tzinfo=UTC)


def test_a_job_created_on_a_firing_waits_for_the_next_one():
    assert Window(NIGHTLY).next_after(datetime(2024, 1, 16, 2, tzinfo=UTC)) == datetime(2024, 1, 17, 2, tzinfo=UTC)


def test_the_schedule_is_read_in_its_own_timezone():
    utc, paris = Window(NIGHTLY), Window(NIGHTLY, "Europe/Paris")
    assert utc.next_after(WINTER_MORNING) == datetime(2024, 1, 16, 2, tzinfo=UTC)
    assert paris.next_after(WINTER_MORNING) == datetime(2024, 1, 16, 1, tzinfo=UTC)
    assert paris.next_after(WINTER_MORNING).utcoffset() == timedelta(hours=1)
    # Summer time moves the same local hour one hour earlier in UTC.
    assert paris.next_after(datetime(2024, 7, 15, 10, tzinfo=UTC)) == datetime(2024, 7, 16, 0, tzinfo=UTC)


def test_the_zone_a_creation_time_is_given_in_does_not_matter():
    """20:30 in New York on the 15th is already 02:30 on the 16th in Paris: that night's firing has passed."""
    paris = Window(NIGHTLY, "Europe/Paris")
    created = datetime(2024, 1, 15, 20, 30, tzinfo=ZoneInfo("America/New_York"))
    assert paris.next_after(created) == datetime(2024, 1, 17, 2, tzinfo=ZoneInfo("Europe/Paris"))
    assert paris.next_after(created) == paris.next_after(created.astimezone(UTC))


def test_a_job_is_due_from_its_firing_on_and_not_a_moment_before():
    window = Window(NIGHTLY)
    firing = datetime(2024, 1, 16, 2, tzinfo=UTC)
    assert not window.due(WINTER_MORNING, WINTER_MORNING)
    assert not window.due(WINTER_MORNING, firing - timedelta(microseconds=1))
    assert window.due(WINTER_MORNING, firing)
    assert window.due(WINTER_MORNING, firing + timedelta(days=3))


def test_due_follows_the_windows_timezone():
    at_one_utc = datetime(2024, 1, 16, 1, tzinfo=UTC)
    assert Window(NIGHTLY, "Europe/Paris").due(WINTER_MORNING, at_one_utc)
    assert not Window(NIGHTLY).due(WINTER_MORNING, at_one_utc)


@pytest.mark.parametrize("cron", ["", "not a cron", "0 2 * *", "61 * * * *", "0 25 * * *"])
def test_an_invalid_cron_expression_is_refused_naming_it(cron):
    with pytest.raises(ValueError, match="not a cron expression") as caught:
        Window(cron)
    assert repr(cron) in str(caught.value)


NEW_YORK_AUTUMN_CHANGE = datetime(2026, 11, 1, 5, tzinfo=UTC)  # 01:00 summer time, an hour before clocks go back


def test_a_fixed_hour_fires_once_in_the_hour_the_autumn_change_repeats():
    window = Window("30 1 * * *", "America/New_York")
    first = window.next_after(NEW_YORK_AUTUMN_CHANGE)
    # In UTC: an ambiguous local time never compares equal across zones (PEP 495).
    assert first.astimezone(UTC) == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    # The repeated 01:30 (winter time, 06:30 UTC) is not a second firing: the next one is the following night.
    assert window.next_after(first).astimezone(UTC) == datetime(2026, 11, 2, 6, 30, tzinfo=UTC)
    assert not window.due(first, datetime(2026, 11, 1, 6, 45, tzinfo=UTC))


def test_an_every_hour_schedule_keeps_firing_through_the_repeated_hour():
    window = Window("*/30 * * * *", "America/New_York")
    firings, moment = [], NEW_YORK_AUTUMN_CHANGE
    for _ in range(4):
        moment = window.next_after(moment)
        firings.append(moment)
    assert [f.astimezone(UTC).hour * 60 + f.minute for f in firings] == [5 * 60 + 30, 6 * 60, 6 * 60 + 30, 7 * 60]


def test_a_firing_in_the_hour_skipped_in_spring_runs_when_the_clocks_reach_it():
    window = Window("30 2 * * *", "America/New_York")
    assert window.next_after(datetime(2026, 3, 7, 12, tzinfo=UTC)) == datetime(2026, 3, 8, 7, tzinfo=UTC)
