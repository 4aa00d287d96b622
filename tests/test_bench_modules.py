"""
Loading bench/'s modules and tools from their files, for the tests of the bench tools: bench/
is not a package, and its tools (bench/run, bench/echo_ab...) have no ``.py`` ending. A tool
imports ``scale_lib`` from its own directory; L{loadBench} hands it this tree's, without
leaving bench/ on sys.path.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def loadBench(name: str, file: str, scaleLib: ModuleType | None = None) -> ModuleType:
    """
    bench/`file` as module `name`; with `scaleLib`, importing that as its ``scale_lib``.
    sys.path and sys.modules["scale_lib"] are as they were afterwards.
    """
    savedPath, savedModule = list(sys.path), sys.modules.get("scale_lib")
    if scaleLib is not None:
        sys.modules["scale_lib"] = scaleLib
    try:
        loader = importlib.machinery.SourceFileLoader(name, str(ROOT / "bench" / file))
        spec = importlib.util.spec_from_loader(name, loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    finally:
        sys.path[:] = savedPath
        if savedModule is None:
            sys.modules.pop("scale_lib", None)
        else:
            sys.modules["scale_lib"] = savedModule


class LoadBenchTests(SynchronousTestCase):
    def test_aToolWithThisScaleLib(self) -> None:
        """bench/run, which puts bench/ on sys.path and imports scale_lib from there, gets
        the scale_lib it is given; sys.path and sys.modules are left as they were."""
        path, modules = list(sys.path), dict(sys.modules)
        scaleLib = loadBench("scale_lib", "scale_lib.py")
        benchRun = loadBench("bench_run", "run", scaleLib)
        self.assertIs(benchRun.Fleet, scaleLib.Fleet)
        self.assertEqual(sys.path, path)
        self.assertEqual(sys.modules.get("scale_lib"), modules.get("scale_lib"))
