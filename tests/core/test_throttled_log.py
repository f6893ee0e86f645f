import logging

import pytest

from server.core.throttled_log import ThrottledLog
from tests.support.clock import Clock

log = logging.getLogger("tests.throttled")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == log.name]


def test_one_line_per_interval_per_key_then_the_count_of_suppressed_ones(caplog):
    clock = Clock()
    warnings = ThrottledLog(log, interval_s=30, clock=clock)
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert [warnings.warning("a", "a failed: %s", n) for n in range(5)] == [True] + [False] * 4
        assert warnings.warning("b", "b failed"), "keys are independent"
        clock.now = 29.9
        assert not warnings.warning("a", "a failed: %s", 5)
        clock.now = 30.0
        assert warnings.warning("a", "a failed: %s", 6)
        clock.now = 60.0
        assert warnings.warning("a", "a failed: %s", 7)
    assert lines(caplog) == [
        "a failed: 0 (logged at most every 30 s)",
        "b failed (logged at most every 30 s)",
        "a failed: 6 (logged at most every 30 s; 5 similar suppressed in the last 30 s)",
        "a failed: 7 (logged at most every 30 s)",
    ]
