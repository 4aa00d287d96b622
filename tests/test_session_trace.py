"""
bench/session_trace.py: the summary of a traced session run (where the ends spread, what the
tail's CPU goes to) and its /proc readings. The module is loaded from its file; no process
is started.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.test_bench_modules import loadBench

scaleLib = loadBench("scale_lib", "scale_lib.py")
sessionTrace = loadBench("session_trace", "session_trace.py", scaleLib)

MB = 1_000_000
MiB = 1048576
START = 1000.0


def _sample(t: float, delivered: int, heads: dict[str, int], gcPct: int = 50) -> dict[str, Any]:
    """A sample at `t` s from the start, the machine busy on both cores since time 0."""
    ticks = round(100 * t)
    return {
        "t": START + t,
        "heads": heads,
        "delivered": delivered,
        "cpu": {"gc": round(gcPct * t), "agent": None},
        "machine": (2 * ticks, 2 * ticks),
    }


def _trace(sshEnds: list[float], headEnds: list[float]) -> dict[str, Any]:
    """
    Three sessions, 500 MB in all: 100 MB/s up to the first end at 4 s (after the commands'
    start), then 50 MB/s to the last end at 6 s, the machine busy on both cores throughout.
    """
    written = {"0": 110 * MiB, "1": 100 * MiB, "2": 90 * MiB}
    samples = [_sample(float(t), 100 * MB * t, written) for t in range(5)]
    samples += [_sample(5.0, 450 * MB, {}), _sample(6.0, 500 * MB, {})]
    return {
        "start": START,
        "ends": {str(i): START + t for i, t in enumerate(sshEnds)},
        "head_ends": {str(i): START + t for i, t in enumerate(headEnds)},
        "samples": samples,
        "cpus": 2,
        "clk": 100,
    }


class SummarizeTests(SynchronousTestCase):
    def test_endsAndWhatWasInFlight(self) -> None:
        """
        The ends' spread on both sides, per session the time from its command's exit to its
        ssh's, whether they end in the same order, and how far each command had got when
        the first one finished.
        """
        summary = sessionTrace.summarize(_trace([4.0, 5.0, 6.0], [3.5, 4.8, 5.5]))
        self.assertEqual(summary["ssh_ends"], [4.0, 4.0, 5.0, 6.0, 6.0])
        self.assertEqual(summary["head_ends"], [3.5, 3.5, 4.8, 5.5, 5.5])
        self.assertEqual(summary["head_to_ssh_ms"], [200.0, 200.0, 500.0, 500.0, 500.0])
        self.assertEqual(summary["rank_head_ssh"], 1.0)
        self.assertEqual(summary["written_at_first_head_end_MiB"], [90, 90, 100, 110, 110])

    def test_reversedOrder(self) -> None:
        """Sessions whose ssh ends in the reverse order of their commands: rank -1."""
        summary = sessionTrace.summarize(_trace([6.0, 5.0, 4.0], [3.5, 4.8, 5.5]))
        self.assertEqual(summary["rank_head_ssh"], -1.0)

    def test_tailSlowerForItsExtraCpu(self) -> None:
        """
        Steady 100 MB/s at 20 CPU-s per GB; the tail's 100 MB take 2 s at 50 MB/s with the
        machine as busy: 2 CPU-s more than its bytes cost, 1 s lost, which the extra CPU
        over the two busy cores accounts for in full.
        """
        summary = sessionTrace.summarize(_trace([4.0, 5.0, 6.0], [3.5, 4.8, 5.5]))
        steady, tail = summary["steady"], summary["tail"]
        self.assertEqual((steady["from_s"], steady["s"], steady["MBps"]), (1.0, 3.0, 100.0))
        self.assertEqual((steady["cpu_s_per_GB"], steady["machine_busy_pct"]), (20.0, 200))
        self.assertEqual(steady["pct_of_core"], {"gc": 50})
        self.assertEqual((tail["s"], tail["MBps"], tail["bytes_share"]), (2.0, 50.0, 0.2))
        self.assertEqual(tail["cpu_s_per_GB"], 40.0)
        self.assertEqual(summary["tail_extra_cpu_ms_per_end"], round(2000 / 3, 2))
        self.assertEqual((summary["tail_lost_s"], summary["tail_lost_by_cpu_s"]), (1.0, 1.0))
        self.assertEqual([p and p["s"] for p in summary["tail_by_ends"]], [None, 1.0, 1.0])
        # 4 to 5 s and 5 to 6 s: 50 MB each, 2 CPU-s of which 1 for the bytes; one end each.
        perEnd = [p and p["extra_cpu_ms_per_end"] for p in summary["tail_by_ends"]]
        self.assertEqual(perEnd, [None, 1000.0, 1000.0])

    def test_byControlMaster(self) -> None:
        """
        Session i is on ControlMaster i mod 2: the median of each master's ssh ends and the
        spread within each.
        """
        trace = _trace([4.0, 5.0, 4.2, 6.0], [3.5, 4.8, 4.0, 5.5])
        trace["masters"] = 2
        summary = sessionTrace.summarize(trace)
        self.assertEqual(summary["master_median_ssh_end"], [4.1, 4.1, 4.1, 5.5, 5.5])
        self.assertEqual(summary["master_ssh_end_spread"], [0.2, 0.2, 0.2, 1.0, 1.0])

    def test_oneSession(self) -> None:
        """A single session has ends but no tail."""
        trace = _trace([4.0], [3.5])
        summary = sessionTrace.summarize(trace)
        self.assertEqual(summary["sessions"], 1)
        self.assertNotIn("tail", summary)


class ReadingsTests(SynchronousTestCase):
    def test_ownProcess(self) -> None:
        """This process has written bytes and used CPU."""
        self.assertGreater(sessionTrace.wchar(os.getpid()), 0)
        self.assertGreaterEqual(sessionTrace.cpuTicks(os.getpid()), 0)

    def test_gone(self) -> None:
        """A process that is gone has no readings (it ended between two samples)."""
        self.assertIsNone(sessionTrace.wchar(2**22 + 1))
        self.assertIsNone(sessionTrace.cpuTicks(2**22 + 1))
