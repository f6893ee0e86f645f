from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query

from server.api.deps import RuntimeDep, ScopeDep
from server.api.pagination import Cursor, decode_cursor, encode_cursor, not_a_cursor
from server.api.responses import LIMITED_ROUTE_ERRORS, error_responses
from server.api.schemas import MAX_OFFSET, MAX_ROW_ID, ErrorOut
from server.api.serving.schemas import (
    GenerationHistoryItem,
    HistoryItem,
    HistoryPage,
    PredictionHistoryItem,
    Usage,
)
from server.db.models import GenerationRecord, PredictionRecord
from server.services.serving.history import Kind, find_record, list_records

router = APIRouter(tags=["history"])


def history_item(row: GenerationRecord | PredictionRecord) -> GenerationHistoryItem | PredictionHistoryItem:
    if isinstance(row, PredictionRecord):
        return PredictionHistoryItem(
            id=row.id,
            text=row.text,
            label=row.label,
            score=row.score,
            model_name=row.model,
            latency_ms=row.latency_ms,
            cached=row.cached,
            created_at=row.created_at,
        )
    return GenerationHistoryItem(
        id=row.id,
        prompt=row.prompt,
        generated_text=row.generated_text,
        completion=row.completion,
        model_name=row.model,
        params=row.params,
        finish_reason=row.finish_reason,
        usage=Usage(prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens),
        latency_ms=row.latency_ms,
        cached=row.cached,
        created_at=row.created_at,
    )


@router.get("/history", response_model=HistoryPage, responses=error_responses(*LIMITED_ROUTE_ERRORS))
async def history(
    runtime: RuntimeDep,
    scope: ScopeDep,
    kind: Kind = "generations",
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    cursor: Cursor = None,
    offset: Annotated[int | None, Query(ge=0, le=MAX_OFFSET, description="Instead of `cursor`, not with it")] = None,
) -> HistoryPage:
    """Stored generations (or predictions) of the caller's tenant, newest first (an admin sees every tenant's, or
    one tenant's with `tenant`). Records are written shortly after each response."""
    if cursor is not None and offset is not None:
        raise HTTPException(
            422, [{"type": "value_error", "loc": ["query", "offset"], "msg": "give cursor or offset, not both"}]
        )
    rows, next_cursor = await list_records(
        runtime.sessions, kind, tenant=scope, limit=limit, cursor=_row_id(cursor), offset=offset
    )
    return HistoryPage(
        items=[history_item(row) for row in rows],
        next_cursor=None if next_cursor is None else encode_cursor(str(next_cursor)),
    )


def _row_id(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    [row_id] = decode_cursor(cursor, 1)
    if not row_id.isdigit() or not 1 <= int(row_id) <= MAX_ROW_ID:
        raise not_a_cursor()
    return int(row_id)


@router.get(
    "/history/{record_id}",
    response_model=HistoryItem,
    responses={404: {"model": ErrorOut, "description": "No such record"}, **error_responses(*LIMITED_ROUTE_ERRORS)},
)
async def history_record(
    runtime: RuntimeDep, scope: ScopeDep, record_id: Annotated[str, Path(max_length=64)]
) -> HistoryItem:
    """One stored generation or prediction by the `id` its response carried (another tenant's answers 404)."""
    row = await find_record(runtime.sessions, record_id, scope)
    if row is None:
        raise HTTPException(404, f"no generation or prediction with id {record_id!r}")
    return history_item(row)
