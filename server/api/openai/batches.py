"""`/v1/batches`: OpenAI's Batch API over the batch offload. A batch here is a batch job (`/batch/jobs`, the
dashboard, savings and alerts see it too); see `server/services/offload/openai_batches.py`."""

from typing import Annotated

from fastapi import APIRouter, Path, Query

from server.api.deps import OpenAIBatchesDep, PrincipalDep
from server.api.json_body import JSONBodyRoute
from server.api.openai.batch_schemas import Batch, BatchCreate, BatchError, BatchErrors, BatchList, RequestCounts
from server.services.offload.jobs import JobNotFound
from server.services.offload.openai_batches import ID_PREFIX, BatchView, batch_times

router = APIRouter(prefix="/v1", tags=["openai"], route_class=JSONBodyRoute)
BatchId = Annotated[str, Path(max_length=64)]


def job_id(batch_id: str) -> str:
    if not batch_id.startswith(ID_PREFIX):
        raise JobNotFound(f"no batch {batch_id}")
    return batch_id.removeprefix(ID_PREFIX)


def batch_out(view: BatchView) -> Batch:
    row, counts = view.batch, view.counts
    return Batch(
        id=f"{ID_PREFIX}{row.id}",
        endpoint=row.endpoint,
        model=view.job.model or None,
        errors=BatchErrors(data=[BatchError(**error) for error in row.errors]) if row.errors else None,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=view.status,
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        request_counts=RequestCounts(total=counts.total, completed=counts.succeeded, failed=counts.failed),
        metadata=row.batch_metadata,
        **batch_times(view),
    )


@router.post("/batches", response_model=Batch)
async def create_batch(body: BatchCreate, batches: OpenAIBatchesDep, principal: PrincipalDep) -> Batch:
    """Check the input file and run its requests as a batch job of the caller's tenant; a file with bad lines
    makes a `failed` batch whose `errors` name them."""
    return batch_out(await batches.create(principal, body.input_file_id, body.endpoint, body.metadata))


@router.get("/batches", response_model=BatchList)
async def list_batches(
    batches: OpenAIBatchesDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> BatchList:
    """The tenant's batches, newest first; `after` a batch id for the next page."""
    views, more = await batches.page(principal.scope(), limit=limit, after=job_id(after) if after else None)
    data = [batch_out(view) for view in views]
    return BatchList(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=more
    )


@router.get("/batches/{batch_id}", response_model=Batch)
async def get_batch(batch_id: BatchId, batches: OpenAIBatchesDep, principal: PrincipalDep) -> Batch:
    return batch_out(await batches.get(job_id(batch_id), principal.scope()))


@router.post("/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(batch_id: BatchId, batches: OpenAIBatchesDep, principal: PrincipalDep) -> Batch:
    """Stop the batch: requests not yet run are cancelled, those done stay in its output file (409 once it has
    finished)."""
    return batch_out(await batches.cancel(job_id(batch_id), principal.scope()))
