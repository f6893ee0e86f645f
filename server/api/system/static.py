"""Files under `server/api/static/` at `/static/...`: the docs' vendored assets (`static/vendor/README.md`), and
any page added there. Open to all and never rate limited (`api/ratelimit.py`).

A route rather than a mounted `StaticFiles` app: FastAPI does not record a mount as the request's route, so
metrics and access lines would label these requests `unmatched`, like 404s; here they are `/static/{path:path}`.
"""

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(include_in_schema=False)
files = StaticFiles(directory=STATIC_DIR)


@router.api_route("/static/{path:path}", methods=["GET", "HEAD"])
async def static_file(path: str, request: Request) -> Response:
    """The file, with `ETag` and `Last-Modified` (304 when unchanged); 404 for anything outside the folder."""
    return await files.get_response(path, request.scope)
