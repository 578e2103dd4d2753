"""Unknown URLs: a friendly 404 page for people, the API's problem+json for machines."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from device_registry.dashboard import mount_dashboard
from device_registry.problems import install_problem_handlers


def _client() -> TestClient:
    app = FastAPI()
    install_problem_handlers(app)
    mount_dashboard(app)
    return TestClient(app)


def test_an_unknown_page_is_a_404_page_with_the_way_back() -> None:
    response = _client().get("/no/such/<page>")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "content-security-policy" in response.headers
    assert "Page not found" in response.text and 'href="/devices"' in response.text
    assert "&lt;page&gt;" in response.text and "<page>" not in response.text  # the path is escaped


def test_unknown_api_and_asset_paths_stay_problem_json() -> None:
    client = _client()
    for path in ("/api/v1/nothing", "/api", "/static/nothing.js"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert not response.headers["content-type"].startswith("text/html"), path
    assert client.get("/devices/some-device").status_code == 200  # pages still match first
