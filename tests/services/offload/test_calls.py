"""Every call to a batch provider (calls.py): through the egress quota, retried only where a retry can help, and a
batch create never run twice blind."""

import asyncio

import pytest

from server.core.rate_policy import RatePolicy
from server.providers.base import ProviderError
from server.services.limits.egress import EgressGuard, EgressLimited
from server.services.limits.gcra import MemoryLimiter
from server.services.offload.calls import CreateDeferred, ProviderCalls
from server.services.offload.lease import LeaseLost
from tests.support.clock import Clock
from tests.support.metrics import metric


def calls(quota: int | None = None, **options) -> ProviderCalls:
    """Quick retries; with `quota`, `quota` calls to `openai` in all (the clock never moves, so none come back)."""
    policies = {"openai": RatePolicy("openai", 1, 3600, quota)} if quota else {}
    guard = EgressGuard(MemoryLimiter(Clock(1000.0)), policies, fail_open=False)
    options = {"attempts": 4, "backoff_s": 0.001, "max_backoff_s": 0.01, "quota_wait_s": 0.0, **options}
    return ProviderCalls(guard, **options)


class Script:
    """A provider operation that answers from a script, one entry per call: an exception to raise, or a value."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def error(status: int | None, retry_after_s: float | None = None) -> ProviderError:
    return ProviderError("openai", "test", f"HTTP {status}", status=status, retry_after_s=retry_after_s)


async def test_a_failure_a_retry_can_help_is_retried_until_the_call_succeeds():
    run = Script(error(429), error(None), error(503), "ok")
    ok = metric("batch_provider_calls_total", provider="openai", operation="retried", outcome="ok")
    throttled = metric("batch_provider_calls_total", provider="openai", operation="retried", outcome="http_429")
    assert await calls().call("openai", "retried", run) == "ok"
    assert run.calls == 4
    assert metric("batch_provider_calls_total", provider="openai", operation="retried", outcome="ok") == ok + 1
    assert (
        metric("batch_provider_calls_total", provider="openai", operation="retried", outcome="http_429")
        == throttled + 1
    )


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_a_failure_no_retry_can_help_is_raised_at_once(status):
    run = Script(error(status), "never reached")
    with pytest.raises(ProviderError) as raised:
        await calls().call("openai", "poll", run)
    assert raised.value.status == status and run.calls == 1


async def test_the_last_failure_is_raised_once_the_attempts_are_spent():
    run = Script(error(500), error(502), error(504), "never reached")
    with pytest.raises(ProviderError) as raised:
        await calls(attempts=4).call("openai", "poll", run, attempts=3)
    assert raised.value.status == 504 and run.calls == 3


async def test_a_retry_waits_at_least_the_providers_retry_after():
    run = Script(error(429, retry_after_s=0.2), "ok")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await calls().call("openai", "poll", run) == "ok"
    # The backoff alone is at most 10 ms; the loop's timers may fire up to its clock resolution early.
    assert loop.time() - started >= 0.2 - 0.02


async def test_a_call_past_the_quota_is_refused_without_reaching_the_provider():
    service = calls(quota=1)
    assert await service.call("openai", "upload", Script("first")) == "first"
    run = Script("never reached")
    refused = metric("batch_provider_calls_total", provider="openai", operation="upload", outcome="quota")
    with pytest.raises(EgressLimited):
        await service.call("openai", "upload", run)
    assert run.calls == 0
    assert metric("batch_provider_calls_total", provider="openai", operation="upload", outcome="quota") == refused + 1


async def test_each_retry_takes_the_quota_again():
    run = Script(error(503), error(503), "never reached")
    with pytest.raises(EgressLimited):
        await calls(quota=2).call("openai", "poll", run)
    assert run.calls == 2


async def test_a_quota_is_per_provider():
    service = calls(quota=1)
    await service.call("openai", "poll", Script("a"))
    # No quota is configured for anthropic: its calls are not held back by openai's.
    assert [await service.call("anthropic", "poll", Script(n)) for n in range(3)] == [0, 1, 2]


async def test_a_create_that_succeeds_is_never_looked_up():
    run, find = Script("batch_1"), Script("never reached")
    assert await calls().create("openai", run, find) == "batch_1"
    assert (run.calls, find.calls) == (1, 0)


async def test_a_create_that_failed_but_created_the_batch_is_adopted_not_repeated():
    run, find = Script(error(502), "never reached"), Script("batch_1")
    assert await calls().create("openai", run, find) == "batch_1"
    assert (run.calls, find.calls) == (1, 1)


async def test_a_create_is_repeated_only_after_the_provider_says_it_has_no_such_batch():
    run, find = Script(error(None), error(429), "batch_2"), Script(None, None)
    assert await calls().create("openai", run, find) == "batch_2"
    assert (run.calls, find.calls) == (3, 2)


async def test_a_create_no_retry_can_help_is_raised_without_a_lookup():
    run, find = Script(error(400)), Script("never reached")
    with pytest.raises(ProviderError) as raised:
        await calls().create("openai", run, find)
    assert raised.value.status == 400 and (run.calls, find.calls) == (1, 0)


async def test_a_create_raises_the_last_failure_once_its_attempts_are_spent():
    run, find = Script(error(500), error(500), error(503)), Script(None, None, None)
    with pytest.raises(ProviderError) as raised:
        await calls(attempts=3).create("openai", run, find)
    assert raised.value.status == 503 and (run.calls, find.calls) == (3, 2)


async def test_a_lookup_that_fails_never_leads_to_a_second_create():
    run, find = Script(error(502), "never reached"), Script(error(500), error(500), error(500), error(500))
    with pytest.raises(ProviderError):
        await calls().create("openai", run, find)
    assert run.calls == 1


async def test_a_create_asked_to_wait_longer_than_a_call_may_hold_on_is_deferred():
    run, find = Script(error(429, retry_after_s=130.0), "never reached"), Script("never reached")
    with pytest.raises(CreateDeferred) as raised:
        await calls(max_backoff_s=30.0).create("openai", run, find)
    assert raised.value.wait_s >= 130.0 and raised.value.cause.status == 429
    assert (run.calls, find.calls) == (1, 0)


async def test_a_create_checks_before_each_attempt_and_stops_when_the_check_fails():
    checks = Script(None, LeaseLost("taken over"))
    run, find = Script(error(503), "never reached"), Script(None)
    with pytest.raises(LeaseLost):
        await calls().create("openai", run, find, before_attempt=checks)
    assert (checks.calls, run.calls, find.calls) == (2, 1, 1)
