from typing import Annotated

from fastapi import APIRouter, Query

from server.api.deps import RuntimeDep
from server.api.schemas import HistoryItem, HistoryPage
from server.services.history import list_generations

router = APIRouter(tags=["history"])


@router.get("/history", response_model=HistoryPage)
async def history(runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=200)] = 20,
                  cursor: Annotated[int | None, Query(ge=1, description="`next_cursor` of the previous page")] = None,
                  offset: Annotated[int, Query(ge=0, description="Ignored when a cursor is given")] = 0) -> HistoryPage:
    """Stored generations, newest first. Records are written shortly after each response."""
    rows, next_cursor = await list_generations(runtime.sessions, limit=limit, cursor=cursor, offset=offset)
    return HistoryPage(items=[HistoryItem.model_validate(row) for row in rows],
                       next_cursor=None if next_cursor is None else str(next_cursor))
