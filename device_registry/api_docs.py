"""The API's interactive docs (``/docs``: Swagger UI, ``/redoc``: ReDoc), served without any CDN.

FastAPI's built-in pages load their JavaScript, CSS and favicon from public
CDNs, so they are blank on a plant network or a laptop offline. The assets come
instead from the pinned ``fastapi-offline`` package (Swagger UI and ReDoc
bundles as package data) and are served by the registry itself under
``/docs-assets``; the pages are FastAPI's own HTML pointed at them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"
# No validator badge: Swagger UI would otherwise send the schema URL to validator.swagger.io.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}
# The pages may load nothing from outside this origin: ReDoc's sidebar would fetch a logo from
# cdn.redoc.ly (decorative, it hides itself on error). Swagger UI's page starts with an inline
# script (FastAPI's HTML) and ReDoc runs its search in a blob: worker.
DOCS_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _assets_dir() -> Path:
    return Path(str(resources.files("fastapi_offline").joinpath("static")))


def mount_api_docs(app: FastAPI) -> None:
    """Serve /docs, /redoc and their assets; the app must be created with docs_url=redoc_url=None."""
    assert app.openapi_url is not None
    openapi_url = app.openapi_url
    oauth2_redirect_url = f"{DOCS_URL}/oauth2-redirect"
    app.mount(ASSETS_URL, StaticFiles(directory=_assets_dir()), name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} — Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_redirect_url}",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )
        page.headers.update(DOCS_HEADERS)
        return page

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} — ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
        page.headers.update(DOCS_HEADERS)
        return page
