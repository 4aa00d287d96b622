"""
bench/scale's interleaved rounds (--session-rounds): the per-round ratios and their median
(bench/scale_lib.roundRatios; the module is loaded from its file, no process is started).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def loadScaleLib() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scale_lib", ROOT / "bench" / "scale_lib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


roundRatios = loadScaleLib().roundRatios


class RoundRatiosTests(SynchronousTestCase):
    def test_eachRoundAgainstItsOwnSingle(self) -> None:
        """
        A round's ratio divides its n-session aggregate by the single session of the same
        round, not by a median of all singles: a round on a slower machine (both halved)
        has the same ratio as the others.
        """
        result = roundRatios([500.0, 250.0, 400.0], [400.0, 200.0, 360.0])
        self.assertEqual(result["ratios"], [0.8, 0.8, 0.9])
        self.assertEqual(result["rounds"], 3)

    def test_medianAndSpread(self) -> None:
        """The median of the rounds' ratios, their smallest and largest."""
        result = roundRatios([100.0, 100.0, 100.0, 100.0], [70.0, 95.0, 80.0, 90.0])
        self.assertEqual(result["ratio_median"], 0.85)
        self.assertEqual((result["ratio_min"], result["ratio_max"]), (0.7, 0.95))

    def test_ratioOfMedians(self) -> None:
        """
        Beside the median ratio, the medians of each side and their ratio (the figure a
        median of singles against a median of aggregates gives), which differs from the
        median ratio when the machine's speed drifts between rounds.
        """
        result = roundRatios([400.0, 500.0, 600.0], [420.0, 380.0, 400.0])
        self.assertEqual(result["single_MBps_median"], 500.0)
        self.assertEqual(result["aggregate_MBps_median"], 400.0)
        self.assertEqual(result["ratio_of_medians"], 0.8)
        self.assertEqual(result["ratios"], [1.05, 0.76, 0.667])
        self.assertEqual(result["ratio_median"], 0.76)

    def test_mismatchedRounds(self) -> None:
        """Each round has one figure of each kind: anything else is refused."""
        self.assertRaises(ValueError, roundRatios, [1.0, 2.0], [1.0])
        self.assertRaises(ValueError, roundRatios, [], [])
