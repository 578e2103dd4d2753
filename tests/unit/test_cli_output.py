"""What the ``iotfleet`` CLI prints is the text it was given: rich markup never eats bracketed parts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

IOTFLEET = [sys.executable, "-m", "iotfleet.cli"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IOTFLEET_")}
    environ.update(env)
    # A terminal-like console too: rich renders markup whether or not stdout is a tty.
    environ["FORCE_COLOR"] = "1"
    return subprocess.run(
        [*IOTFLEET, *args, "--state-dir", str(tmp_path / "state")],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["status", "up", "simulate"])
def test_a_bad_setting_is_reported_with_its_real_pattern(tmp_path: Path, command: str) -> None:
    done = _run(tmp_path, command, IOTFLEET_INFLUX__RETENTION="30days")
    text = ANSI.sub("", done.stderr)
    assert done.returncode == 2, text
    assert "IOTFLEET_INFLUX__RETENTION" in text
    assert r"^(INF|\d+[mhdw])$" in text, text


def test_paths_with_brackets_are_printed_as_given(tmp_path: Path) -> None:
    state = tmp_path / "[bold]odd[/bold] dir"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IOTFLEET_")}
    done = subprocess.run(
        [*IOTFLEET, "status", "--state-dir", str(state)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3
    assert "[bold]odd[/bold] dir" in done.stdout, done.stdout


def _fake_running_stack(state: Path) -> None:
    """A state dir whose stack file says where a stack listens, with a live 'supervisord' (this process)."""
    state.mkdir(parents=True)
    (state / "supervisord.pid").write_text(str(os.getpid()))
    (state / "stack.json").write_text(
        json.dumps(
            {
                "parts": [],
                "api": "http://127.0.0.1:18001",
                "mqtt": "127.0.0.1:11884",
                "influx": "http://127.0.0.1:18087",
            }
        )
    )


def test_simulate_takes_the_running_stacks_ports_unless_a_flag_or_env_var_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from iotfleet.cli import build_settings, make_parser

    for name in list(os.environ):
        if name.upper().startswith("IOTFLEET_"):
            monkeypatch.delenv(name)
    state = tmp_path / "state"
    _fake_running_stack(state)
    parse = make_parser().parse_args

    found = build_settings(parse(["simulate", "--state-dir", str(state)]), running_stack=True)
    assert (found.mqtt.port, found.registry.port, found.influx.url) == (
        11884,
        18001,
        "http://127.0.0.1:18087",
    )

    flagged = build_settings(
        parse(["simulate", "--state-dir", str(state), "--mqtt-port", "2883", "--influx-port", "9086"]),
        running_stack=True,
    )
    assert (flagged.mqtt.port, flagged.registry.port) == (2883, 18001)
    assert flagged.influx.url == "http://127.0.0.1:9086"

    monkeypatch.setenv("IOTFLEET_REGISTRY__PORT", "8123")
    from_env = build_settings(parse(["simulate", "--state-dir", str(state)]), running_stack=True)
    assert (from_env.mqtt.port, from_env.registry.port) == (11884, 8123)
    monkeypatch.delenv("IOTFLEET_REGISTRY__PORT")

    # `up`/`down` are not clients: they never take ports from a stack file.
    assert build_settings(parse(["status", "--state-dir", str(state)])).mqtt.port == 1883
    # A stack that is not running (stale file) is not used.
    (state / "supervisord.pid").unlink()
    stale = build_settings(parse(["simulate", "--state-dir", str(state)]), running_stack=True)
    assert stale.mqtt.port == 1883 and stale.registry.port == 8000
