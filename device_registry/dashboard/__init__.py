"""The operator web dashboard, served by the registry at ``/`` (pages) and ``/static`` (assets).

The pages are server-rendered Jinja2 shells: layout, navigation, forms and
labels. Every piece of data is fetched by the browser from the public
``/api/v1`` with the operator's API key (kept in ``sessionStorage``, sent as
``Authorization: Bearer``), so the dashboard can do nothing the API does not
allow that key, and the server never sees the key outside API calls. That is
also why the page routes themselves need no key: they hold no data.

``mount_dashboard(app)`` is the only hook the app factory calls.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
TEMPLATE_DIR = HERE / "templates"

# The API key lives in sessionStorage: script injection is the one way to steal
# it, so scripts come only from our own origin (no inline script, no CDN) and the
# pages cannot be framed. Inline styles stay allowed: uPlot sizes its canvas with them.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Pages are tiny and change with releases; assets are versioned (see _asset_version).
    "Cache-Control": "no-cache",
}

NAV = (
    ("fleet", "/", "Fleet"),
    ("devices", "/devices", "Devices"),
    ("alerts", "/alerts", "Alerts"),
    ("rules", "/rules", "Rules"),
    ("apikeys", "/api-keys", "API keys"),
    ("jobs", "/jobs", "Jobs"),
    ("channels", "/notifications", "Notifications"),
)


def _asset_version() -> str:
    """A hash of the static files: asset URLs change when a release changes them (safe caching)."""
    digest = hashlib.sha256()
    for path in sorted(STATIC_DIR.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


_env = Environment(
    loader=FileSystemLoader(TEMPLATE_DIR),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.globals["nav"] = NAV
_env.globals["asset_version"] = _asset_version()

router = APIRouter(include_in_schema=False)


def _page(template: str, page: str, title: str, **context: object) -> HTMLResponse:
    html = _env.get_template(template).render(page=page, title=title, **context)
    return HTMLResponse(html, headers=SECURITY_HEADERS)


@router.get("/", response_class=HTMLResponse)
async def fleet_page() -> HTMLResponse:
    return _page("fleet.html", "fleet", "Fleet overview")


@router.get("/signin", response_class=HTMLResponse)
async def signin_page() -> HTMLResponse:
    return _page("signin.html", "signin", "Sign in")


@router.get("/devices", response_class=HTMLResponse)
async def devices_page() -> HTMLResponse:
    return _page("devices.html", "devices", "Devices")


@router.get("/devices/{device_id}", response_class=HTMLResponse)
async def device_page(device_id: Annotated[str, PathParam(max_length=64)]) -> HTMLResponse:
    # The id is only echoed (autoescaped) for the script to ask the API about; an
    # unknown id is the API's 404, shown on the page.
    return _page("device.html", "devices", f"Device {device_id}", device_id=device_id)


@router.get("/alerts", response_class=HTMLResponse)
async def alerts_page() -> HTMLResponse:
    return _page("alerts.html", "alerts", "Alerts")


@router.get("/rules", response_class=HTMLResponse)
async def rules_page() -> HTMLResponse:
    return _page("rules.html", "rules", "Rules")


@router.get("/api-keys", response_class=HTMLResponse)
async def api_keys_page() -> HTMLResponse:
    return _page("api_keys.html", "apikeys", "API keys")


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page() -> HTMLResponse:
    return _page("jobs.html", "jobs", "Jobs")


@router.get("/notifications", response_class=HTMLResponse)
async def channels_page() -> HTMLResponse:
    return _page("channels.html", "channels", "Notifications")


async def not_found_page(request: Request) -> Response:
    """Any other GET outside the API: a page saying so, with the way back (a 404 still)."""
    path = request.url.path
    if path.startswith(("/api/", "/static/", "/docs-assets/")) or path == "/api":
        # Machines get the API's problem+json 404, as before.
        raise StarletteHTTPException(status_code=404)
    response = _page("notfound.html", "notfound", "Page not found", path=path[:200])
    response.status_code = 404
    return response


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard pages at ``/`` and its assets at ``/static``.

    Call it last: it also answers every GET no other route took with a friendly 404 page.
    """
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")
    app.add_api_route("/{path:path}", not_found_page, methods=["GET"], include_in_schema=False)
