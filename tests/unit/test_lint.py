"""The project's own tooling, as a test: ruff over everything, mypy (--strict) over the
package. CI runs the README's test command only, so drift shows up here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_unless_ci

TOP = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("argv", [["ruff", "check", "."], ["mypy"]], ids=["ruff", "mypy"])
def test_tool_is_clean(argv: list[str]) -> None:
    tool = BIN / argv[0]
    if not tool.exists():
        skip_unless_ci(f"{argv[0]} is not installed in {BIN} (pip install '.[dev]')")
    res = subprocess.run([str(tool), *argv[1:]], cwd=TOP, capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
