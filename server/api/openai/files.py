"""`/v1/files`: upload a batch input file, list, read, download and delete files (OpenAI's Files API, for batches).

An upload streams to FILES_DIR (Starlette spools the multipart part to a temporary file past 1 MB, never holding it
whole); MAX_BATCH_FILE_BYTES bounds it (413) instead of MAX_REQUEST_BYTES."""

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, HTTPException, Path, Query, UploadFile
from fastapi.responses import StreamingResponse

from server.api.deps import OpenAIBatchesDep, PrincipalDep
from server.api.openai.batch_schemas import FileDeleted, FileList, FileObject
from server.db.batch_models import StoredFile
from server.services.offload.files import CHUNK, FileTooLarge, utc

router = APIRouter(prefix="/v1", tags=["openai"])
FileId = Annotated[str, Path(max_length=64)]


def file_object(row: StoredFile) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=int(utc(row.created_at).timestamp()),
        expires_at=int(utc(row.expires_at).timestamp()),
        filename=row.filename,
        purpose=row.purpose,
    )


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


@router.post("/files", response_model=FileObject)
async def upload_file(
    file: Annotated[UploadFile, File()],
    purpose: Annotated[Literal["batch"], Form()],
    batches: OpenAIBatchesDep,
    principal: PrincipalDep,
) -> FileObject:
    """A batch input file (JSON lines, one request each) of the caller's tenant."""
    try:
        row = await batches.files.create(principal.tenant, file.filename or "upload.jsonl", purpose, _chunks(file))
    except FileTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    return file_object(row)


@router.get("/files", response_model=FileList)
async def list_files(
    batches: OpenAIBatchesDep,
    principal: PrincipalDep,
    purpose: Literal["batch", "batch_output"] | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> FileList:
    """The tenant's files, newest first."""
    rows, more = await batches.files.page(principal.scope(), purpose=purpose, limit=limit, after=after)
    return FileList(
        data=[file_object(row) for row in rows],
        first_id=rows[0].id if rows else None,
        last_id=rows[-1].id if rows else None,
        has_more=more,
    )


@router.get("/files/{file_id}", response_model=FileObject)
async def get_file(file_id: FileId, batches: OpenAIBatchesDep, principal: PrincipalDep) -> FileObject:
    return file_object(await batches.files.get(file_id, principal.scope()))


@router.get("/files/{file_id}/content", responses={200: {"content": {"application/jsonl": {}}}})
async def file_content(file_id: FileId, batches: OpenAIBatchesDep, principal: PrincipalDep) -> StreamingResponse:
    """The file's bytes, streamed."""
    return StreamingResponse(await batches.files.content(file_id, principal.scope()), media_type="application/jsonl")


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: FileId, batches: OpenAIBatchesDep, principal: PrincipalDep) -> FileDeleted:
    await batches.files.delete(file_id, principal.scope())
    return FileDeleted(id=file_id, deleted=True)
