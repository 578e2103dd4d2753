"""The dashboard's server side without a browser: page shells, headers, escaping, assets.

The browser behaviour is tested in tests/integration/test_dashboard.py; these
checks run everywhere in milliseconds (no stack, no Chromium).
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from device_registry.dashboard import NAV, STATIC_DIR, mount_dashboard

PAGES = (
    "/",
    "/signin",
    "/devices",
    "/devices/thermostat-0001",
    "/alerts",
    "/rules",
    "/jobs",
    "/notifications",
)


def _client() -> TestClient:
    app = FastAPI()
    mount_dashboard(app)
    return TestClient(app)


def test_every_page_is_an_html_shell_with_a_strict_policy() -> None:
    client = _client()
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith("text/html")
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy.split("style-src")[0]
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-content-type-options"] == "nosniff"
        # No inline script (the policy would block it) and no CDN: every script is ours.
        assert "<script>" not in response.text
        for src in re.findall(r'<script[^>]*src="([^"]+)"', response.text):
            assert src.startswith("/static/"), src
        assert '<html lang="en">' in response.text and 'href="data:,"' in response.text


def test_navigation_marks_the_current_page() -> None:
    client = _client()
    for key, href, label in NAV:
        page = client.get(href).text
        assert f'<a href="{href}" aria-current="page">{label}</a>' in page, key
    assert 'aria-current="page">Devices<' in client.get("/devices/abc").text


def test_a_device_id_in_the_path_is_escaped() -> None:
    response = _client().get("/devices/%3Cimg%20src%3Dx%20onerror%3D%22alert(1)%22%3E")
    assert response.status_code == 200
    assert "<img" not in response.text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in response.text
    assert _client().get("/devices/" + "x" * 65).status_code == 422


def test_assets_are_served_and_versioned() -> None:
    client = _client()
    page = client.get("/").text
    version = re.search(r'/static/app\.js\?v=([0-9a-f]{12})"', page)
    assert version, "asset URLs carry a content hash"
    for asset in ("app.js", "app.css", "vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css"):
        response = client.get(f"/static/{asset}?v={version.group(1)}")
        assert response.status_code == 200, asset
    assert (STATIC_DIR / "vendor" / "uplot" / "LICENSE").read_text().startswith("The MIT License")
    assert "v1.6.32" in (STATIC_DIR / "vendor" / "uplot" / "uPlot.iife.min.js").read_text()[:100]
    assert client.get("/static/nope.js").status_code == 404


def test_pages_stay_out_of_the_api_document() -> None:
    app = FastAPI()
    mount_dashboard(app)
    assert app.openapi()["paths"] == {}


def test_the_script_never_puts_the_key_in_a_url_or_html() -> None:
    script = (STATIC_DIR / "app.js").read_text()
    # The key is read in one place and sent only as a header.
    assert script.count("sessionStorage.getItem(KEY_STORAGE)") == 1
    assert "Authorization = `Bearer ${key}`" in script
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "eval(" not in script
