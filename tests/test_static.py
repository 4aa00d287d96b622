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
BENCH = ROOT / "bench"


def _isPythonScript(path: Path) -> bool:
    """A file without a .py ending whose shebang line runs Python."""
    if not path.is_file() or path.suffix:
        return False
    with path.open("rb") as script:
        shebang = script.readline()
    return shebang.startswith(b"#!") and b"python" in shebang


def _benchScripts() -> list[str]:
    """bench/'s tools without a .py ending (bench/run, bench/scale, ...)."""
    return sorted(path.name for path in BENCH.iterdir() if _isPythonScript(path))


def _benchTypeChecks() -> list[object]:
    """
    mypy over bench/, which is not among [tool.mypy]'s files: its modules in one run, and
    each tool without a .py ending in a run of its own, since mypy calls every such script
    module __main__ and two of them in one run clash. Naming bench/openssh_path.py beside a
    script puts bench/ on mypy's search path, so the script's imports of its neighbours
    resolve (and are checked too).
    """
    modules = sorted(f"bench/{path.name}" for path in BENCH.glob("*.py"))
    return [
        pytest.param(("mypy", *modules), id="mypy-bench-modules"),
        *(
            pytest.param(("mypy", f"bench/{script}", "bench/openssh_path.py"), id=f"mypy-{script}")
            for script in _benchScripts()
        ),
    ]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(("ruff", "check", "."), id="ruff-check"),
        pytest.param(("ruff", "format", "--check", "."), id="ruff-format"),
        pytest.param(("mypy",), id="mypy"),
        *_benchTypeChecks(),
    ],
)
def test_static_check_passes(argv: tuple[str, ...]) -> None:
    """The tree passes the check: its output names every problem when it does not."""
    tool = BIN / argv[0]
    if not tool.exists():
        pytest.fail(f"{tool} is missing: install the test extra (make test does)")
    result = _run(str(tool), *argv[1:])
    assert result.returncode == 0, result.stdout + result.stderr
