"""Stored generations, newest first, by keyset cursor (stable under inserts) or by offset."""

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.db.models import GenerationRecord


async def list_generations(sessions: async_sessionmaker[AsyncSession], *, limit: int, cursor: int | None,
                           offset: int) -> tuple[list[GenerationRecord], int | None]:
    """A page of records and the cursor of the next page (None on the last page)."""
    query = select(GenerationRecord).order_by(GenerationRecord.pk.desc()).limit(limit + 1)
    query = query.where(GenerationRecord.pk < cursor) if cursor is not None else query.offset(offset)
    async with sessions() as session:
        rows = list((await session.scalars(query)).all())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].pk if more else None)
