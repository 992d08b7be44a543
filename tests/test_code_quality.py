"""The strict tooling runs with the tests, so CI holds the line (STYLE.md, habit 7)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["ruff", "check", "proxy", "tests"], id="ruff-check"),
        pytest.param(["ruff", "format", "--check", "proxy", "tests"], id="ruff-format"),
        pytest.param(["mypy"], id="mypy-strict"),
    ],
)
def test_tool_is_clean(command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
