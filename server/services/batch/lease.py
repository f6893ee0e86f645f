"""Exactly one process submits and polls at a time: a lease row with an expiry and a fencing token.

A process takes the lease when it is free or expired (compare-and-set on the row, so two contenders
cannot both win) and renews it while working; every takeover increments `token`. Before each step
that must not run twice (a provider submission), the holder renews with its token: a holder that was
paused past the expiry and overtaken finds its token stale and stops. Plain UPDATEs with WHERE clauses
work the same on SQLite and PostgreSQL, and behind PgBouncer (no session-level advisory lock).
The expiry uses the application clock: keep replicas' clocks within a fraction of `ttl_s`.
"""

import os
import socket
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.db.batch_models import WorkerLease


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, ttl_s: float, name: str = "batch-worker",
                 owner: str | None = None):
        self.sessions = sessions
        self.ttl = timedelta(seconds=ttl_s)
        self.name = name
        self.owner = owner or owner_name()
        self.token: int | None = None

    async def acquire(self) -> bool:
        """Hold the lease after this call (renewed if already held); False when another live holder has it."""
        if self.token is not None and await self.renew():
            return True
        now = datetime.now(UTC)
        async with self.sessions() as session, session.begin():
            taken = await session.execute(
                update(WorkerLease).where(WorkerLease.name == self.name, WorkerLease.expires_at < now)
                .values(owner=self.owner, token=WorkerLease.token + 1, expires_at=now + self.ttl))
            if taken.rowcount == 1:
                self.token = await session.scalar(select(WorkerLease.token).where(WorkerLease.name == self.name))
                return True
        try:
            async with self.sessions() as session, session.begin():
                session.add(WorkerLease(name=self.name, owner=self.owner, token=1, expires_at=now + self.ttl))
        except IntegrityError:
            self.token = None
            return False
        self.token = 1
        return True

    async def renew(self) -> bool:
        """Extend the lease if this process still holds it with its token (the fencing check)."""
        if self.token is None:
            return False
        now = datetime.now(UTC)
        async with self.sessions() as session, session.begin():
            kept = await session.execute(
                update(WorkerLease).where(WorkerLease.name == self.name, WorkerLease.owner == self.owner,
                                          WorkerLease.token == self.token, WorkerLease.expires_at >= now)
                .values(expires_at=now + self.ttl))
        if kept.rowcount != 1:
            self.token = None
        return self.token is not None

    async def release(self) -> None:
        if self.token is None:
            return
        async with self.sessions() as session, session.begin():
            await session.execute(
                update(WorkerLease).where(WorkerLease.name == self.name, WorkerLease.owner == self.owner,
                                          WorkerLease.token == self.token)
                .values(expires_at=datetime.fromtimestamp(0, UTC)))
        self.token = None

    async def holder(self) -> WorkerLease | None:
        """The current holder (for /batch/health), None when free."""
        async with self.sessions() as session:
            row = await session.get(WorkerLease, self.name)
        return row if row is not None and row.expires_at.replace(tzinfo=row.expires_at.tzinfo or UTC) >= datetime.now(
            UTC) else None
