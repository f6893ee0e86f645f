import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import update

from server.core import clock
from server.db.batch_models import WorkerLease
from server.services.offload.lease import Lease, LeaseLost


async def test_one_holder_at_a_time_and_a_takeover_fences_the_old_holder(sessions, monkeypatch):
    # The expiry is read from `clock.now()`, which here moves only when the test moves it: in real time, a loaded CI
    # machine could let the 0.3 s TTL run out between the calls that expect it not to have.
    now = clock.now()
    monkeypatch.setattr(clock, "now", lambda: now)
    first, second = Lease(sessions, ttl_s=0.3, owner="first"), Lease(sessions, ttl_s=0.3, owner="second")
    assert await first.acquire() and first.token == 1
    now += timedelta(seconds=0.29)
    assert not await second.acquire()
    assert await first.acquire() and first.token == 1
    now += timedelta(seconds=0.29)
    assert not await second.acquire(), "renewed by its holder's acquire"
    now += timedelta(seconds=0.31)
    assert await second.acquire() and second.token == 2
    assert (await second.holder()).owner == "second"
    assert not await first.renew() and first.token is None
    assert not await first.acquire()
    await second.release()
    assert await second.holder() is None
    assert await first.acquire() and first.token == 3


async def test_contenders_starting_together_elect_exactly_one(sessions):
    leases = [Lease(sessions, ttl_s=30, owner=f"worker-{i}") for i in range(6)]
    won = await asyncio.gather(*(lease.acquire() for lease in leases), return_exceptions=True)
    assert [w for w in won if w is True] == [True]
    assert all(w is False for w in won if w is not True)


async def test_a_lease_kept_during_long_work_is_not_taken_over_and_a_lost_one_stops_its_holder(sessions):
    # A TTL of 1.2 s renews every 0.4 s: a renewal may be late by 0.8 s (a loaded CI machine once made 0.3 s late
    # enough) while the work still outlasts the TTL, which only the renewals explain.
    first, second = Lease(sessions, ttl_s=1.2, owner="first"), Lease(sessions, ttl_s=1.2, owner="second")
    assert await first.acquire()
    async with first.kept():
        for _ in range(8):
            await asyncio.sleep(0.2)
            assert not await second.acquire()
    await first.ensure()
    await asyncio.sleep(1.3)
    assert await second.acquire()
    # The old holder does not know yet: its fenced writes change nothing, and its next check stops it.
    async with sessions() as session, session.begin():
        fenced = await session.execute(update(WorkerLease).where(first.fence()).values(owner="stale"))
        allowed = await session.execute(update(WorkerLease).where(second.fence()).values(owner="second"))
    assert fenced.rowcount == 0 and allowed.rowcount == 1
    with pytest.raises(LeaseLost):
        await first.ensure()
