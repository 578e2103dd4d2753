"""The platform's network edge over TLS, against one real stack started with `iotfleet up --listen`.

- the API and dashboard over HTTPS with the platform CA (the chain checked by a client that
  trusts only that CA; Chromium loads the dashboard over HTTPS), plain HTTP still on loopback;
- `iotfleet simulate --tls` with password devices and `--auth cert` with certificate devices,
  every reading stored (--verify);
- README "Connect a real device" run as written (both auth modes, a persistent session).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from iotfleet.stack import probes

pytestmark = pytest.mark.integration

IOTFLEET = [sys.executable, "-m", "iotfleet.cli"]
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class EdgeStack:
    state_dir: Path
    env: dict[str, str]  # `up`'s environment (ports as IOTFLEET_* variables)
    client_env: dict[str, str]  # a user's shell: no IOTFLEET_* variable
    api_port: int
    https_port: int
    tls_port: int
    cert_port: int
    up_output: str

    @property
    def ca(self) -> Path:
        return self.state_dir / "tls" / "ca.crt"

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {(self.state_dir / 'admin-api-key').read_text().strip()}"}


def run(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IOTFLEET, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeStack]:
    tmp = tmp_path_factory.mktemp("tls-edge")
    mqtt_port, influx_port, api_port, rpc_port, base = probes.free_ports(4, block=8)
    https_port, tls_port, cert_port = probes.free_ports(3)
    client_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("IOTFLEET_")}
    client_env["COLUMNS"] = "250"
    env = {
        **client_env,
        "IOTFLEET_STATE_DIR": str(tmp / "state"),
        "IOTFLEET_MQTT__PORT": str(mqtt_port),
        "IOTFLEET_INFLUX__URL": f"http://127.0.0.1:{influx_port}",
        "IOTFLEET_REGISTRY__PORT": str(api_port),
        "IOTFLEET_REGISTRY__HTTPS_PORT": str(https_port),
        "IOTFLEET_STACK__INFLUX_RPC_PORT": str(rpc_port),
        "IOTFLEET_STACK__SERVICE_PORT_BASE": str(base),
        "IOTFLEET_TLS__PORT": str(tls_port),
        "IOTFLEET_TLS__CERT_PORT": str(cert_port),
    }
    # --listen on loopback: the same endpoints a LAN address gets, without leaving this host.
    up = run(env, "up", "--detach", "--listen", "127.0.0.1")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield EdgeStack(
            tmp / "state", env, client_env, api_port, https_port, tls_port, cert_port, up.stdout + up.stderr
        )
    finally:
        run(env, "down", timeout=90)


def test_api_and_dashboard_over_https_with_the_platform_ca(stack: EdgeStack) -> None:
    # `up` and `status` say where, and which CA to trust.
    for output in (stack.up_output, run(stack.env, "status").stdout):
        assert f"HTTPS: dashboard {stack.https}/" in output, output
        assert f"CA certificate: {stack.ca}" in output, output
    info = json.loads(run(stack.env, "status", "--json").stdout)
    assert info["https_dashboard"] == f"{stack.https}/" and info["https_api"] == f"{stack.https}/api/v1"
    assert info["ca_cert"] == str(stack.ca)

    # The chain checked by a client that trusts the platform CA only (and the host name 127.0.0.1).
    with httpx.Client(verify=ssl.create_default_context(cafile=stack.ca), timeout=10) as client:
        types = client.get(f"{stack.https}/api/v1/device-types", headers=stack.admin)
        assert types.status_code == 200 and types.json()["items"]
        page = client.get(f"{stack.https}/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert client.get(f"{stack.https}/api/v1/device-types").status_code == 401  # same auth as HTTP
    # A client trusting the system CAs only refuses the platform's certificate.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{stack.https}/healthz", timeout=10)
    # Plain HTTP stays, on loopback, for the platform's own clients.
    assert httpx.get(f"http://127.0.0.1:{stack.api_port}/healthz", timeout=10).status_code == 200


@pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)
def test_dashboard_works_over_https_in_chromium(stack: EdgeStack) -> None:
    from playwright.sync_api import expect, sync_playwright

    key = stack.admin["Authorization"].removeprefix("Bearer ")
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            # Chromium headless has no simple way to trust a private CA; the chain itself is checked
            # by the test above. Everything else (origin, CSP, API calls) is as for an operator.
            context = browser.new_context(ignore_https_errors=True)
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.goto(f"{stack.https}/signin")
            page.fill("#api-key", key)
            page.keyboard.press("Enter")
            page.wait_for_url(f"{stack.https}/")
            page.wait_for_selector("body[data-state=ready]")
            assert page.evaluate("location.protocol") == "https:"
            page.goto(f"{stack.https}/devices")
            page.wait_for_selector("body[data-state=ready]")
            expect(page.locator("main")).to_be_visible()
        finally:
            browser.close()
    api_calls = [url for url in requests if "/api/v1/" in url]
    assert api_calls, requests
    assert all(url.startswith(f"{stack.https}/") for url in requests), requests  # nothing in clear


def _simulate(stack: EdgeStack, *flags: str) -> dict[str, object]:
    done = run(
        stack.client_env,
        "simulate",
        "--state-dir",
        str(stack.state_dir),
        "--devices",
        "8",
        "--duration",
        "3",
        "--interval",
        "1s",
        "--verify",
        "--quiet",
        *flags,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report_path = re.search(r"report written to\s+(\S+)", done.stderr)
    assert report_path is not None, done.stderr
    report: dict[str, object] = json.loads(Path(report_path.group(1)).read_text())
    return report


def test_simulate_over_tls_with_passwords_and_with_certificates(stack: EdgeStack) -> None:
    password = _simulate(stack, "--tls")
    assert password["settings"]["broker"] == f"127.0.0.1:{stack.tls_port}"  # type: ignore[index]
    assert password["settings"]["tls"] is True  # type: ignore[index]
    assert password["verify"]["ok"] and password["verify"]["stored"] >= 8, password["verify"]  # type: ignore[index]

    certified = _simulate(stack, "--auth", "cert")
    assert certified["settings"]["broker"] == f"127.0.0.1:{stack.cert_port}"  # type: ignore[index]
    assert certified["verify"]["ok"] and certified["verify"]["stored"] >= 8, certified["verify"]  # type: ignore[index]
    # The devices are certificate devices, each with its own key file (0600).
    credentials = json.loads((stack.state_dir / "simulator" / "credentials.json").read_text())["devices"]
    cert_files = [Path(d["cert_file"]) for d in credentials if d.get("cert_file")]
    assert len(cert_files) == 8 and all(f.stat().st_mode & 0o777 == 0o600 for f in cert_files)
    listed = httpx.get(
        f"http://127.0.0.1:{stack.api_port}/api/v1/devices/{cert_files[0].stem}",
        headers=stack.admin,
        timeout=10,
    ).json()
    assert listed["auth"] == "certificate", listed


def readme_real_device() -> list[str]:
    """The ```sh blocks of README.md's "Connect a real device" section, in order, as written."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Connect a real device\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start:end], flags=re.DOTALL)


def test_readme_connect_a_real_device_runs_as_written(stack: EdgeStack, tmp_path: Path) -> None:
    blocks = readme_real_device()
    assert len(blocks) == 5, blocks

    def for_this_stack(block: str) -> str:
        # Only the ports and the state dir differ from what a user types.
        return (
            block.replace(":8443/", f":{stack.https_port}/")
            .replace("-p 8883 ", f"-p {stack.tls_port} ")
            .replace("-p 8884 ", f"-p {stack.cert_port} ")
            .replace(".iotfleet/", f"{stack.state_dir}/")
        )

    # What each block must print; read-backs are repeated until they do (the ingest writes within ms).
    expected = [
        ("", False),
        ('"telemetry":"devices/thermostat/porch-1/telemetry"', False),
        ('"auth":"certificate"', False),
        ('"name":"set_relay"', False),
        ("porch-1 19.5 gate-1 12.5 succeeded", True),
    ]
    variables = tmp_path / "variables.sh"
    variables.write_text("")
    for number, (original, (wanted, retried)) in enumerate(zip(blocks, expected, strict=True), start=1):
        block = for_this_stack(original)
        changed = any(token in original for token in (":8443/", "-p 8883 ", "-p 8884 ", ".iotfleet/"))
        assert (block != original) == changed
        # One shell session across blocks, as in a terminal: variables of a block reach the next.
        script = f"set -eo pipefail\nset -a\nsource {variables}\n{block}\nexport -p > {variables}\n"
        deadline = time.monotonic() + 20
        while True:
            done = subprocess.run(
                ["bash", "-c", script],
                cwd=tmp_path,
                env=stack.client_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            compact = re.sub(r"\s+", "", done.stdout)
            if (done.returncode == 0 and wanted.replace(" ", "") in compact) or not retried:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert done.returncode == 0, f"block {number} failed:\n{block}\n{done.stdout}\n{done.stderr}"
        assert wanted.replace(" ", "") in compact, f"block {number}:\n{block}\n{done.stdout}\n{done.stderr}"
    # The certificate device's command went through its persistent session, and was acknowledged.
    commands = httpx.get(
        f"http://127.0.0.1:{stack.api_port}/api/v1/devices/gate-1/commands", headers=stack.admin, timeout=10
    ).json()
    (command,) = commands["items"]
    assert command["status"] == "succeeded" and command["args"] == {"on": False}, command
    assert (tmp_path / "gate-1.key").stat().st_mode & 0o777 == 0o600
