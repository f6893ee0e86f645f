"""Exactly one process submits and polls at a time: a lease row with an expiry and a fencing token.

A process takes the lease when it is free or expired (compare-and-set on the row, so two contenders
cannot both win) and renews it while working; every takeover increments `token`. Before each step
that must not run twice (a provider submission), the holder renews with its token: a holder that was
paused past the expiry and overtaken finds its token stale and stops. Plain UPDATEs with WHERE clauses
work the same on SQLite and PostgreSQL, and behind PgBouncer (no session-level advisory lock).
The expiry uses the application clock: keep replicas' clocks within a fraction of `ttl_s`.

While work is in progress (a send that waits on a quota or a long Retry-After, a large download, a local
batch) `kept()` renews the lease in the background, so that no other process takes over a holder that is
alive; `ensure()` before each provider call stops a holder that lost it (raises `LeaseLost`), and `fence()`
is added to every write that records provider state, so a stale holder's write changes nothing.
"""

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.core import clock
from server.db.batch_models import WorkerLease
from server.db.session import affected

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another process took the worker lease: this one stops before doing anything that must not run twice."""


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        ttl_s: float,
        name: str = "batch-worker",
        owner: str | None = None,
    ):
        self.sessions = sessions
        self.ttl = timedelta(seconds=ttl_s)
        self.name = name
        self.owner = owner or owner_name()
        self.token: int | None = None
        self._renewed_at = 0.0

    async def acquire(self) -> bool:
        """Hold the lease after this call (renewed if already held); False when another live holder has it."""
        if self.token is not None and await self.renew():
            return True
        now = clock.now()
        async with self.sessions() as session, session.begin():
            taken = await session.execute(
                update(WorkerLease)
                .where(WorkerLease.name == self.name, WorkerLease.expires_at < now)
                .values(owner=self.owner, token=WorkerLease.token + 1, expires_at=now + self.ttl)
            )
            if affected(taken) == 1:
                self.token = await session.scalar(select(WorkerLease.token).where(WorkerLease.name == self.name))
                self._renewed_at = time.monotonic()
                return True
        try:
            async with self.sessions() as session, session.begin():
                session.add(WorkerLease(name=self.name, owner=self.owner, token=1, expires_at=now + self.ttl))
        except IntegrityError:
            self.token = None
            return False
        self.token = 1
        self._renewed_at = time.monotonic()
        return True

    async def renew(self) -> bool:
        """Extend the lease if this process still holds it with its token (the fencing check). A lease that
        expired but that nobody took over (the token is unchanged) is still this process's."""
        if self.token is None:
            return False
        now = clock.now()
        async with self.sessions() as session, session.begin():
            kept = await session.execute(
                update(WorkerLease)
                .where(WorkerLease.name == self.name, WorkerLease.owner == self.owner, WorkerLease.token == self.token)
                .values(expires_at=now + self.ttl)
            )
        if affected(kept) != 1:
            self.token = None
        else:
            self._renewed_at = time.monotonic()
        return self.token is not None

    async def ensure(self) -> None:
        """Raise `LeaseLost` unless this process still holds the lease. Renews it when the last renewal is older
        than a third of the TTL, so a holder that was paused (or whose background renewal failed) finds out here."""
        if self.token is not None and time.monotonic() - self._renewed_at < self.ttl.total_seconds() / 3:
            return
        if not await self.renew():
            raise LeaseLost(f"the {self.name} lease was taken over")

    def fence(self) -> ColumnElement[bool]:
        """A condition true only while this process holds the lease with its token (for a write's WHERE)."""
        return exists().where(
            WorkerLease.name == self.name,
            WorkerLease.owner == self.owner,
            WorkerLease.token == (self.token if self.token is not None else -1),
        )

    @asynccontextmanager
    async def kept(self) -> AsyncIterator[None]:
        """Renew the lease in the background while the block runs."""
        keeper = asyncio.create_task(self._keep(), name=f"{self.name}-lease")
        try:
            yield
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _keep(self) -> None:
        while self.token is not None:
            await asyncio.sleep(self.ttl.total_seconds() / 3)
            try:
                await self.renew()
            except Exception as exc:
                # A database hiccup: the next renewal (or `ensure`) tries again well before the lease expires.
                log.warning("renewing the %s lease failed: %s: %s", self.name, type(exc).__name__, exc)

    async def release(self) -> None:
        if self.token is None:
            return
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(WorkerLease)
                .where(WorkerLease.name == self.name, WorkerLease.owner == self.owner, WorkerLease.token == self.token)
                .values(expires_at=datetime.fromtimestamp(0, UTC))
            )
        self.token = None

    async def holder(self) -> WorkerLease | None:
        """The current holder (for /batch/health), None when free."""
        async with self.sessions() as session:
            row = await session.get(WorkerLease, self.name)
        return (
            row
            if row is not None and row.expires_at.replace(tzinfo=row.expires_at.tzinfo or UTC) >= clock.now()
            else None
        )
