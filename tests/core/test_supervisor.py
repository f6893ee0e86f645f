import asyncio
import logging

from server.core.supervisor import RestartPolicy, Supervisor
from tests.support.metrics import metric
from tests.support.waiting import until

FAST = RestartPolicy(backoff_s=0.001, max_backoff_s=0.01, window_s=60)


async def test_a_loop_that_raises_is_restarted_after_its_owned_work_is_failed(caplog):
    runs, cleaned = [], []

    async def body():
        runs.append(len(runs))
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")
        await asyncio.Event().wait()

    before = metric("background_task_failures_total", task="t-restart")
    supervisor = Supervisor("t-restart", body, on_failure=cleaned.append, policy=FAST)
    with caplog.at_level(logging.ERROR):
        supervisor.start()
        await until(lambda: len(runs) == 3)
    assert supervisor.state == "running" and supervisor.healthy
    assert [str(exc) for exc in cleaned] == ["boom 1", "boom 2"]
    assert supervisor.failures == 2 and supervisor.last_error == "RuntimeError: boom 2"
    assert metric("background_task_failures_total", task="t-restart") - before == 2
    assert any(record.exc_info for record in caplog.records), "the traceback is logged"
    await supervisor.stop()
    assert supervisor.state == "stopped"


async def test_gives_up_after_too_many_failures_within_the_window():
    async def body():
        raise OSError("no device")

    supervisor = Supervisor("t-give-up", body, policy=RestartPolicy(backoff_s=0.001, window_s=60, give_up_after=3))
    supervisor.start()
    await until(lambda: supervisor.state == "failed")
    assert supervisor.failures == 3 and not supervisor.healthy
    await supervisor.stop()
    assert supervisor.state == "failed", "stopping does not hide that the loop could not be kept running"


async def test_backoff_doubles_with_recent_failures_up_to_its_cap(monkeypatch):
    delays = []
    real_sleep = asyncio.sleep

    async def recorded_sleep(delay, *args):
        delays.append(delay)
        await real_sleep(0)

    async def body():
        if len(delays) < 5:
            raise ValueError("again")
        await asyncio.Event().wait()

    supervisor = Supervisor("t-backoff", body, policy=RestartPolicy(backoff_s=1, max_backoff_s=5, window_s=600))
    monkeypatch.setattr(asyncio, "sleep", recorded_sleep)
    supervisor.start()
    await until(lambda: len(delays) == 5 and supervisor.state == "running")
    monkeypatch.setattr(asyncio, "sleep", real_sleep)
    assert delays == [1, 2, 4, 5, 5]
    await supervisor.stop()


async def test_a_body_that_returns_is_not_restarted_and_cancellation_is_not_a_failure():
    async def done():
        return None

    finished = Supervisor("t-return", done, policy=FAST)
    finished.start()
    await until(lambda: finished.state == "stopped")
    assert finished.failures == 0

    async def forever():
        await asyncio.Event().wait()

    running = Supervisor("t-cancel", forever, policy=FAST)
    running.start()
    await asyncio.sleep(0)
    await running.stop()
    assert running.state == "stopped" and running.failures == 0


async def test_a_failing_cleanup_does_not_stop_the_restart(caplog):
    runs = []

    async def body():
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("first")
        await asyncio.Event().wait()

    def cleanup(exc):
        raise KeyError("cleanup broke")

    supervisor = Supervisor("t-cleanup", body, on_failure=cleanup, policy=FAST)
    supervisor.start()
    await until(lambda: len(runs) == 2)
    assert supervisor.healthy
    await supervisor.stop()
