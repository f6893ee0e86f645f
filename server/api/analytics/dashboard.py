"""`GET /dashboard`: one page for operators (serving, cache, limits, batch offload, savings, alerts, thresholds, the
performance report).

The page holds no figures: its script (`static/dashboard/`) reads the JSON endpoints, with the API key the operator
enters (kept in the tab's sessionStorage, sent as a bearer token), so the JSON stays the one source of truth and the
page needs no key of its own. Its script, styles and chart library (`static/vendor/uplot/`) come from this server:
it works without the internet, and the Content-Security-Policy lets nothing else run.
"""

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from server import __version__
from server.api.deps import RuntimeDep

TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parents[1] / "templates")
# Same-origin scripts, styles, images and fetches only; no inline script or handler, no plugin, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(request: Request, runtime: RuntimeDep) -> HTMLResponse:
    """The page. It tells its script whether to ask for a key (API_KEYS set) and where the server's root is."""
    context = {
        "root": request.scope.get("root_path", ""),
        "version": __version__,
        "title": runtime.settings.app_name,
        "keys_required": not runtime.keys.anonymous_allowed,
    }
    return TEMPLATES.TemplateResponse(request, "dashboard.html", context, headers=HEADERS)
