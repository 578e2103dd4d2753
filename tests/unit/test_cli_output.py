"""What the ``iotfleet`` CLI prints is the text it was given: rich markup never eats bracketed parts."""

from __future__ import annotations

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
