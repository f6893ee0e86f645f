"""`/docs` (Swagger UI) and `/redoc` with their JavaScript and CSS served by this server from `/static/vendor/`
(see its README), so that the docs work on a machine without the internet: FastAPI's defaults load them from a
CDN, Google Fonts and fastapi.tiangolo.com."""

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse

SWAGGER_UI = "/static/vendor/swagger-ui-dist"
REDOC = "/static/vendor/redoc"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    # validatorUrl: Swagger UI would otherwise fetch a validity badge from validator.swagger.io.
    return get_swagger_ui_html(
        openapi_url=root + request.app.openapi_url,
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{SWAGGER_UI}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{SWAGGER_UI}/swagger-ui.css",
        swagger_favicon_url=f"{root}{SWAGGER_UI}/favicon-32x32.png",
        oauth2_redirect_url=root + OAUTH2_REDIRECT,
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(OAUTH2_REDIRECT)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=root + request.app.openapi_url,
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{REDOC}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{SWAGGER_UI}/favicon-32x32.png",
        with_google_fonts=False,
    )
