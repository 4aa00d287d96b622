"""
bench/echo_ab's pure part: the build arguments, the round order, the paired differences and
the summary it prints (no process is started: the tool is loaded as a module).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import json
from pathlib import Path
from types import ModuleType

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent


def loadEchoAB() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("echo_ab", str(ROOT / "bench" / "echo_ab"))
    spec = importlib.util.spec_from_loader("echo_ab", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


ab = loadEchoAB()


def rounds(blocks: dict[str, list[tuple[float, float]]], busy: list[float]) -> list[dict]:
    """Rounds as the tool records them, from (median, p99) per build per round."""
    return [
        {
            "busy_pct": busy[i],
            "blocks": {lb: {"ms_median": v[i][0], "ms_p99": v[i][1]} for lb, v in blocks.items()},
        }
        for i in range(len(busy))
    ]


class ArgumentsTests(SynchronousTestCase):
    def test_parseBuild(self) -> None:
        """LABEL=SOURCE[@REACTOR] splits into its three parts; the reactor is optional."""
        self.assertEqual(ab.parse_build("a=HEAD~2"), ("a", "HEAD~2", None))
        self.assertEqual(ab.parse_build("s=/tmp/x@default"), ("s", "/tmp/x", "default"))

    def test_parseBuildRefused(self) -> None:
        """A build without a label or source, or labelled like OpenSSH's path, is refused."""
        for bad in ("HEAD", "=HEAD", "a=", "openssh=HEAD"):
            self.assertRaises(ValueError, ab.parse_build, bad)

    def test_parseBuildEnv(self) -> None:
        """LABEL:NAME=VALUE gathers per build; a value may hold '=' and ':' and be empty."""
        self.assertEqual(
            ab.parse_build_env(["n:A=1", "n:B=x=y:z", "m:C="], ["n", "m"]),
            {"n": {"A": "1", "B": "x=y:z"}, "m": {"C": ""}},
        )
        self.assertEqual(ab.parse_build_env([], ["n"]), {})

    def test_parseBuildEnvRefused(self) -> None:
        """No label, no name, no '=', or a label that is not a build of ours: refused."""
        for bad in ("A=1", "n:=1", "n:A", "x:A=1"):
            self.assertRaises(ValueError, ab.parse_build_env, [bad], ["n"])

    def test_blockOrder(self) -> None:
        """Even rounds run the builds as given, odd rounds in reverse."""
        self.assertEqual(ab.block_order(["a", "b", "c"], 0), ["a", "b", "c"])
        self.assertEqual(ab.block_order(["a", "b", "c"], 1), ["c", "b", "a"])
        self.assertEqual(ab.block_order(["a", "b", "c"], 4), ["a", "b", "c"])


class StatisticsTests(SynchronousTestCase):
    def test_paired(self) -> None:
        """Paired differences are other minus reference round by round: their median, and
        the rounds where the other was lower (a tie is not faster)."""
        p = ab.paired([1.0, 2.0, 3.0, 4.0], [0.9, 2.2, 2.5, 4.0])
        self.assertAlmostEqual(p["median_diff_ms"], -0.05)
        self.assertEqual((p["lower"], p["rounds"]), (2, 4))

    def test_pairedNeedsEqualRounds(self) -> None:
        """Blocks of different lengths, or none, cannot be paired."""
        self.assertRaises(ValueError, ab.paired, [1.0], [1.0, 2.0])
        self.assertRaises(ValueError, ab.paired, [], [])

    def test_summarize(self) -> None:
        """Per build the median of block medians and of block p99s; every build after the
        first paired against the first (us, % of the first's median, rounds faster); the
        background busy's range; nothing against OpenSSH when it did not run."""
        s = ab.summarize(
            rounds(
                {
                    "a": [(1.0, 2.0), (1.2, 2.4), (1.4, 2.2)],
                    "b": [(0.9, 2.1), (1.1, 2.2), (1.5, 2.0)],
                },
                [3.0, 1.0, 40.0],
            ),
            ["a", "b"],
        )
        self.assertEqual(s["rounds"], 3)
        self.assertEqual(s["busy_pct"], {"min": 1.0, "median": 3.0, "max": 40.0})
        self.assertAlmostEqual(s["builds"]["a"]["median_ms"], 1.2)
        self.assertAlmostEqual(s["builds"]["a"]["p99_ms"], 2.2)
        self.assertAlmostEqual(s["builds"]["b"]["median_min_ms"], 0.9)
        self.assertAlmostEqual(s["builds"]["b"]["median_max_ms"], 1.5)
        pb = s["paired"]["b"]
        self.assertEqual(pb["against"], "a")
        self.assertAlmostEqual(pb["median_diff_us"], -100.0)
        self.assertAlmostEqual(pb["median_diff_pct"], -100.0 / 1200 * 100)
        self.assertEqual((pb["median_faster"], pb["rounds"]), (2, 3))
        self.assertAlmostEqual(pb["p99_diff_us"], -200.0)
        self.assertEqual(pb["p99_lower"], 2)
        self.assertEqual(s["vs_openssh"], {})
        self.assertNotIn("a", s["paired"])

    def test_summarizeOpenSSH(self) -> None:
        """OpenSSH's path is never the reference: the first of ours is, and each of ours
        gets ratios to OpenSSH, of the medians and per round."""
        s = ab.summarize(
            rounds(
                {
                    "openssh": [(1.0, 2.0), (0.5, 4.0)],
                    "a": [(1.5, 2.0), (1.0, 2.0)],
                },
                [0.0, 0.0],
            ),
            ["openssh", "a"],
        )
        self.assertEqual(s["paired"], {})
        r = s["vs_openssh"]["a"]
        self.assertAlmostEqual(r["median_ratio"], 1.25 / 0.75)
        self.assertAlmostEqual(r["median_ratio_of_rounds"], (1.5 + 2.0) / 2)
        self.assertAlmostEqual(r["p99_ratio"], 2.0 / 3.0)
        self.assertAlmostEqual(r["p99_ratio_of_rounds"], (1.0 + 0.5) / 2)

    def test_formatSummary(self) -> None:
        """The printed summary names every figure: block medians and p99s per build, the
        paired difference with its sign and rounds, the ratios to OpenSSH, the busy range."""
        text = ab.format_summary(
            ab.summarize(
                rounds(
                    {
                        "a": [(1.0, 2.0), (1.2, 2.4)],
                        "b": [(0.9, 2.1), (1.0, 2.2)],
                        "openssh": [(1.0, 2.0), (1.0, 2.0)],
                    },
                    [2.0, 4.0],
                ),
                ["a", "b", "openssh"],
            )
        )
        self.assertIn("2 rounds; background busy before the rounds 2-4% (median 3%", text)
        self.assertIn("a: median of block medians 1.100 ms (blocks 1.000-1.200)", text)
        self.assertIn("median of block p99s 2.200 ms", text)
        self.assertIn("b - a: median -150 us (-13.6%), faster in 2 of 2", text)
        self.assertIn("p99 -50 us (-2.3%), lower in 1 of 2", text)
        self.assertIn("a / openssh: echo_median_ratio 1.10 (per round 1.10)", text)
        self.assertIn("b / openssh: echo_median_ratio 0.95", text)

    def test_summarizeAgainstReferenceMean(self) -> None:
        """With reference builds (a build and its control), every other build of ours is
        paired against their mean round by round, in % of that mean's median; the
        reference builds themselves are not paired."""
        s = ab.summarize(
            rounds(
                {
                    "a": [(1.0, 2.0), (1.2, 2.4), (1.4, 2.2)],
                    "ctl": [(1.2, 2.2), (1.0, 2.0), (1.4, 2.6)],
                    "b": [(1.0, 2.0), (1.0, 2.1), (1.5, 2.3)],
                },
                [0.0, 0.0, 0.0],
            ),
            ["a", "ctl", "b"],
            reference=["a", "ctl"],
        )
        self.assertEqual(list(s["paired"]), ["b"])
        pb = s["paired"]["b"]
        self.assertEqual(pb["against"], "a+ctl")
        # Reference means 1.1, 1.1, 1.4 (median 1.1); differences -0.1, -0.1, +0.1.
        self.assertAlmostEqual(pb["median_diff_us"], -100.0)
        self.assertAlmostEqual(pb["median_diff_pct"], -100.0 / 1100 * 100)
        self.assertEqual(pb["median_faster"], 2)
        # p99 means 2.1, 2.2, 2.4; differences -0.1, -0.1, -0.1.
        self.assertAlmostEqual(pb["p99_diff_us"], -100.0)
        self.assertEqual(pb["p99_lower"], 3)

    def test_summarizeUnknownReference(self) -> None:
        """A reference that is not one of our builds (or is OpenSSH's path) is refused."""
        r = rounds({"a": [(1.0, 2.0)], "openssh": [(1.0, 2.0)]}, [0.0])
        self.assertRaises(ValueError, ab.summarize, r, ["a", "openssh"], ["b"])
        self.assertRaises(ValueError, ab.summarize, r, ["a", "openssh"], ["openssh"])


def withBulk(recorded: list[dict], rates: dict[str, list[float]], sessions: int) -> list[dict]:
    """`recorded` with a bulk load's figures in each block, as --bulk records them."""
    for i, r in enumerate(recorded):
        for lb, mbs in rates.items():
            r["blocks"][lb]["bulk"] = ab.bulk_figures(sessions, int(mbs[i] * 2e6), 2.0)
    return recorded


class BulkTests(SynchronousTestCase):
    def test_bulkFigures(self) -> None:
        """A block's bulk rate is the bytes delivered during it over its length, in decimal
        MB/s; a block of no length has no rate rather than a division by zero."""
        self.assertEqual(
            ab.bulk_figures(10, 3_000_000, 1.5),
            {"sessions": 10, "bytes": 3_000_000, "seconds": 1.5, "mb_s": 2.0},
        )
        self.assertEqual(ab.bulk_figures(2, 0, 0.0)["mb_s"], 0.0)

    def test_bulkCommand(self) -> None:
        """Each bulk session is the build's own ssh command (same path, same device as the
        echo) running an endless download."""
        load = ab.BulkLoad(["ssh", "-p", "2222", "dev_x@127.0.0.1"], 3, Path("unused"))
        self.assertEqual(load.argv, ["ssh", "-p", "2222", "dev_x@127.0.0.1", "cat /dev/zero"])
        self.assertEqual(load.count, 3)

    def test_summarizeBulk(self) -> None:
        """With bulk figures in the blocks, each build gets its session count and the
        median and range of its blocks' aggregate MB/s; the echo figures are unchanged."""
        plain = rounds(
            {"a": [(1.0, 2.0), (1.2, 2.4), (1.4, 2.2)], "openssh": [(1.0, 2.0)] * 3}, [0.0] * 3
        )
        loaded = withBulk(
            rounds(
                {"a": [(1.0, 2.0), (1.2, 2.4), (1.4, 2.2)], "openssh": [(1.0, 2.0)] * 3}, [0.0] * 3
            ),
            {"a": [300.0, 400.0, 350.0], "openssh": [120.0, 140.0, 100.0]},
            10,
        )
        s = ab.summarize(loaded, ["a", "openssh"])
        self.assertEqual(s["builds"]["a"]["bulk"]["sessions"], 10)
        self.assertAlmostEqual(s["builds"]["a"]["bulk"]["mb_s_median"], 350.0)
        self.assertAlmostEqual(s["builds"]["a"]["bulk"]["mb_s_min"], 300.0)
        self.assertAlmostEqual(s["builds"]["openssh"]["bulk"]["mb_s_max"], 140.0)
        for lb in ("a", "openssh"):
            del s["builds"][lb]["bulk"]
        self.assertEqual(s, ab.summarize(plain, ["a", "openssh"]))

    def test_formatSummaryBulk(self) -> None:
        """The summary prints each build's bulk line after its echo line, and keeps the
        ratio lines; without bulk figures it prints no bulk line at all (--bulk 0 output
        stays as it was)."""
        loaded = withBulk(
            rounds(
                {"a": [(1.0, 2.0), (1.2, 2.4)], "openssh": [(1.0, 2.0), (1.0, 2.0)]}, [1.0, 1.0]
            ),
            {"a": [380.0, 390.0], "openssh": [130.0, 150.0]},
            2,
        )
        text = ab.format_summary(ab.summarize(loaded, ["a", "openssh"]))
        lines = text.splitlines()
        self.assertEqual(
            lines[2],
            "a: bulk 2 sessions during the blocks, aggregate 385.0 MB/s median of blocks "
            "(380.0-390.0)",
        )
        self.assertIn("openssh: bulk 2 sessions during the blocks, aggregate 140.0 MB/s", lines[4])
        self.assertIn("a / openssh: echo_median_ratio 1.10 (per round 1.10)", lines[5])
        plain = ab.format_summary(
            ab.summarize(
                rounds({"a": [(1.0, 2.0), (1.2, 2.4)], "openssh": [(1.0, 2.0)] * 2}, [1.0, 1.0]),
                ["a", "openssh"],
            )
        )
        self.assertNotIn("bulk", plain)
        self.assertEqual([line for line in lines if " bulk " not in line], plain.splitlines())


class SummarizeOnlyTests(SynchronousTestCase):
    def test_summarizeRecordedRun(self) -> None:
        """--summarize OUT prints the summary of OUT/blocks.json without running any build,
        with --reference as given."""
        out = Path(self.mktemp())
        out.mkdir()
        recorded = {
            "meta": {"builds": {"a": {}, "ctl": {}, "b": {}}},
            "rounds": rounds({"a": [(1.0, 2.0)], "ctl": [(1.2, 2.2)], "b": [(0.9, 2.0)]}, [5.0]),
        }
        (out / "blocks.json").write_text(json.dumps(recorded))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rc = ab.main(["--summarize", str(out), "--reference", "a,ctl"])
        self.assertEqual(rc, 0)
        self.assertIn("1 rounds; background busy before the rounds 5-5%", printed.getvalue())
        self.assertIn("b - a+ctl: median -200 us (-18.2%), faster in 1 of 1", printed.getvalue())
