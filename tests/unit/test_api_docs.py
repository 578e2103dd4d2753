"""/docs and /redoc work offline: every asset the pages load is served by the registry itself."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from device_registry.main import create_app
from iotfleet.settings import Settings

CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def client() -> TestClient:
    # No lifespan: the docs pages and their assets need neither the database nor the broker.
    return TestClient(create_app(Settings(state_dir="/nonexistent")))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_loads_only_local_assets(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    # No external host at all: no CDN, no web fonts, no favicon from fastapi.tiangolo.com.
    assert re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}", html) == []
    assets = re.findall(r'(?:src|href|spec-url)\s*=\s*["\']([^"\']+)["\']', html)
    assets += re.findall(r'url:\s*["\']([^"\']+)["\']', html)  # Swagger UI's openapi.json
    assert any(a.endswith(".js") for a in assets), assets
    for url in assets:
        assert url.startswith("/"), url
        fetched = client.get(url)
        assert fetched.status_code == 200, url
        suffix = url[url.rfind(".") :]
        if suffix in CONTENT_TYPES:
            assert CONTENT_TYPES[suffix] in fetched.headers["content-type"], (url, fetched.headers)
            assert len(fetched.content) > 1000, url
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "img-src 'self' data:" in policy
    if page == "/docs":
        assert '"validatorUrl": null' in html  # no schema sent to validator.swagger.io


def test_openapi_document_is_served_and_docs_pages_are_not_in_it(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/docs" not in spec["paths"] and "/redoc" not in spec["paths"]
    assert client.get("/docs/oauth2-redirect").status_code == 200
