"""Trial's mktemp() under pytest stays out of the working tree (see tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

REPO = Path(__file__).resolve().parent.parent


class MktempTests(SynchronousTestCase):
    def assertOutsideTheTree(self, path: str) -> None:
        """An absolute path (trial's is relative to the current directory) not under the repo."""
        self.assertTrue(os.path.isabs(path), path)
        resolved = Path(path).resolve()
        self.assertFalse(resolved.is_relative_to(REPO), f"{resolved} is under {REPO}")

    def test_notUnderTheRepo(self) -> None:
        """
        mktemp() gives a path outside the repo: trial's own is relative to the current
        directory, the repo root under pytest, and each run left a tests.test_*/ there.
        """
        self.assertOutsideTheTree(self.mktemp())

    def test_trialContract(self) -> None:
        """Each call gives a new path that does not exist yet, in a directory that does."""
        first, second = self.mktemp(), self.mktemp()
        self.assertNotEqual(first, second)
        for path in (first, second):
            self.assertFalse(os.path.exists(path))
            self.assertTrue(os.path.isdir(os.path.dirname(path)))
        os.mkdir(first)

    def test_asyncTestCaseToo(self) -> None:
        """trial's TestCase, not only SynchronousTestCase, gets a path outside the repo."""
        self.assertOutsideTheTree(TestCase("run").mktemp())
