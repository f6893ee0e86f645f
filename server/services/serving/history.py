"""Stored generations and predictions, newest first, by keyset cursor (stable under inserts) or by offset, of one
tenant (None: every tenant, for an admin)."""

from typing import Literal, cast

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.db.models import GenerationRecord, PredictionRecord

Kind = Literal["generations", "predictions"]
TABLES: dict[Kind, type[GenerationRecord] | type[PredictionRecord]] = {
    "generations": GenerationRecord,
    "predictions": PredictionRecord,
}


async def list_records(
    sessions: async_sessionmaker[AsyncSession],
    kind: Kind,
    *,
    tenant: str | None,
    limit: int,
    cursor: int | None,
    offset: int | None,
) -> tuple[list[GenerationRecord] | list[PredictionRecord], int | None]:
    """A page of records and the cursor of the next page (None on the last page)."""
    table = TABLES[kind]
    query = select(table).order_by(table.pk.desc()).limit(limit + 1)
    if tenant is not None:
        query = query.where(table.tenant == tenant)
    query = query.where(table.pk < cursor) if cursor is not None else query.offset(offset or 0)
    async with sessions() as session:
        # SQLAlchemy types the rows of select() over either table as their common base; they are the table's.
        rows = cast(list[GenerationRecord] | list[PredictionRecord], list((await session.scalars(query)).all()))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].pk if more else None)


async def find_record(
    sessions: async_sessionmaker[AsyncSession], record_id: str, tenant: str | None
) -> GenerationRecord | PredictionRecord | None:
    """The generation or prediction with this id (ids are unique across both: random 128-bit hex), if it belongs to
    `tenant` (None: any): another tenant's record is not found, as one that does not exist."""
    async with sessions() as session:
        for table in TABLES.values():
            query = select(table).where(table.id == record_id)
            if tenant is not None:
                query = query.where(table.tenant == tenant)
            if (row := await session.scalar(query)) is not None:
                return cast(GenerationRecord | PredictionRecord, row)
    return None
