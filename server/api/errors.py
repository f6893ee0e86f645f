"""Service errors to HTTP answers, always JSON with a `detail` (FastAPI's own 422 shape for input errors)."""

import math

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.services.batch.jobs import JobConflict, JobNotFound
from server.services.errors import BlockedPrompt, DeadlineExceeded, InputError, ModelFailed, Overloaded


async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    detail = [{"type": "value_error", "loc": list(e.loc), "msg": e.msg} for e in exc.errors]
    return JSONResponse({"detail": detail}, status_code=422)


async def _not_found(request: Request, exc: JobNotFound) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _conflict(request: Request, exc: JobConflict) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=409)


async def _blocked(request: Request, exc: BlockedPrompt) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "index": exc.index}, status_code=400)


async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503,
                        headers={"Retry-After": str(math.ceil(exc.retry_after_s))})


async def _deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=504)


async def _model_failed(request: Request, exc: ModelFailed) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(BlockedPrompt, _blocked)
    app.add_exception_handler(JobNotFound, _not_found)
    app.add_exception_handler(JobConflict, _conflict)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(DeadlineExceeded, _deadline)
    app.add_exception_handler(ModelFailed, _model_failed)
