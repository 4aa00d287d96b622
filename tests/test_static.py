"""
The static checks the code is held to, run with the tests so that CI enforces them:
ruff's lint rules and formatting, and mypy's type check (with the zope plugin, which
reads Twisted's interfaces), all as configured in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(("ruff", "check", "."), id="ruff-check"),
        pytest.param(("ruff", "format", "--check", "."), id="ruff-format"),
        pytest.param(("mypy",), id="mypy"),
        # bench/ is not among [tool.mypy]'s files. Its tools are scripts without a .py ending:
        # each is module __main__ to mypy, so one a run; naming the neighbour a tool imports
        # (openssh_path.py) puts bench/ on mypy's search path.
        pytest.param(
            ("mypy", "bench/echo_timeline", "bench/openssh_path.py"), id="mypy-echo_timeline"
        ),
    ],
)
def test_static_check_passes(argv: tuple[str, ...]) -> None:
    """The tree passes the check: its output names every problem when it does not."""
    tool = BIN / argv[0]
    if not tool.exists():
        pytest.fail(f"{tool} is missing: install the test extra (make test does)")
    result = _run(str(tool), *argv[1:])
    assert result.returncode == 0, result.stdout + result.stderr
