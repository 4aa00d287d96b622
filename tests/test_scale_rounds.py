"""
bench/scale's interleaved rounds (--session-rounds): the per-round ratios and their median
(bench/scale_lib.roundRatios), one route against another round by round (pairedRatios, for
--openssh), how a route's process trees split their CPU (treeCpu), and the one reading of
/proc/PID/stat behind them (ProcStat). The module is loaded from its file; no process is
started.
"""

from __future__ import annotations

import math
import os

from twisted.trial.unittest import SynchronousTestCase

from tests.test_bench_modules import loadBench

scaleLib = loadBench("scale_lib", "scale_lib.py")
roundRatios = scaleLib.roundRatios
pairedRatios = scaleLib.pairedRatios
treeCpu = scaleLib.treeCpu
treeMembers = scaleLib.treeMembers


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


class PairedRatiosTests(SynchronousTestCase):
    def test_eachRoundAgainstTheOtherRouteInTheSameRound(self) -> None:
        """
        Ours against OpenSSH's path divides the figures of the same round: a round in which
        the machine was slower for both gives the same ratio as the others.
        """
        result = pairedRatios([400.0, 200.0, 450.0], [100.0, 50.0, 100.0])
        self.assertEqual(result["per_round"], [4.0, 4.0, 4.5])
        self.assertEqual(result["median"], 4.0)
        self.assertEqual((result["min"], result["max"]), (4.0, 4.5))

    def test_mismatchedRounds(self) -> None:
        """One figure of each route per round: anything else is refused."""
        self.assertRaises(ValueError, pairedRatios, [1.0, 2.0], [1.0])
        self.assertRaises(ValueError, pairedRatios, [], [])


#: An OpenSSH device sshd (PID 10) with two connections (11, 12: sshd, the program of the
#: root), sessions' commands under them (bash 20, head 21), a command already reaped by 12
#: (its 0.5 s in 12's reaped figure), and another sshd elsewhere on the machine (30 under 1).
#: PID -> (parent, command name, own CPU seconds, reaped children's CPU seconds).
DEVICE_SSHD = {
    10: (1, "sshd", 0.25, 0.0),
    11: (10, "sshd", 1.0, 0.0),
    12: (10, "sshd", 2.0, 0.5),
    20: (11, "bash", 0.125, 0.0),
    21: (12, "head", 0.375, 0.0),
    30: (1, "sshd", 7.0, 3.0),
}


class TreeCpuTests(SynchronousTestCase):
    def test_ownProgramAndCommands(self) -> None:
        """
        The processes running the root's program count as its own CPU; every other process
        under it (the sessions' commands) and every child reaped in the tree count as commands.
        """
        self.assertEqual(treeCpu(DEVICE_SSHD, 10), {"own": 3.25, "commands": 1.0})

    def test_onlyTheTree(self) -> None:
        """
        The same program outside the tree (another benchmark's sshd) counts for nothing, and a
        subtree stands for itself.
        """
        self.assertEqual(treeMembers(DEVICE_SSHD, 10), {10, 11, 12, 20, 21})
        self.assertEqual(treeCpu(DEVICE_SSHD, 12), {"own": 2.0, "commands": 0.875})

    def test_aCommandThatExitsStaysCounted(self) -> None:
        """
        When a command exits and its parent reaps it, its CPU moves into the parent's reaped
        figure: the tree's commands do not fall (a run's difference stays what was spent).
        """
        after = dict(DEVICE_SSHD)
        del after[21]
        after[12] = (10, "sshd", 2.0, 0.5 + 0.375)
        self.assertEqual(treeCpu(after, 10), treeCpu(DEVICE_SSHD, 10))

    def test_goneRoot(self) -> None:
        """A root no longer there has no tree and no CPU."""
        self.assertEqual(treeMembers(DEVICE_SSHD, 99), set())
        self.assertEqual(treeCpu(DEVICE_SSHD, 99), {"own": 0.0, "commands": 0.0})


class ProcStatTests(SynchronousTestCase):
    """
    The one reading of /proc/PID/stat (scale_lib.readStat, procTable) that the sweep, the CPU
    counters and the process trees share.
    """

    def test_commWithParenthesesAndSpaces(self) -> None:
        """
        The command name is everything between the first "(" and the last ")", so a name with
        spaces or parentheses in it does not shift the numeric fields after it.
        """
        clk = scaleLib.CLK
        fields = ["S", "7", *["0"] * 5, "42", "0", "0", "0", str(3 * clk), str(clk), "0", "0"]
        stat = scaleLib._parseStat(f"123 (a) (b c) {' '.join(fields)} 20 0 1\n")
        self.assertEqual(
            stat,
            scaleLib.ProcStat(
                ppid=7, comm="a) (b c", state="S", minflt=42, utime=3.0, stime=1.0, reaped=0.0
            ),
        )
        self.assertEqual(stat.cpu, 4.0)

    def test_thisProcess(self) -> None:
        """This process is in the machine's table, under its parent, as L{readStat} reads it."""
        table = scaleLib.procTable()
        me = table[os.getpid()]
        self.assertEqual(me.ppid, os.getppid())
        self.assertEqual(scaleLib.readStat(os.getpid()).comm, me.comm)
        self.assertIn(os.getpid(), scaleLib.descendants(os.getppid()))

    def test_gone(self) -> None:
        """A PID no process has reads as nothing: no CPU, no faults, counted as a zombie."""
        gone = 2**22 + 1  # above the kernel's largest PID
        self.assertIsNone(scaleLib.readStat(gone))
        self.assertTrue(math.isnan(scaleLib.cpuSeconds(gone)))
        self.assertEqual(scaleLib.minorFaults(gone), 0)
        self.assertTrue(scaleLib._zombie(gone))

    def test_eachProcessOnce(self) -> None:
        """
        A table read while PIDs were reused can hold a loop of parents; the walk still ends and
        names each process once.
        """
        loop = {**DEVICE_SSHD, 11: (21, "sshd", 1.0, 0.0)}
        self.assertEqual(treeMembers(loop, 21), {21, 11, 20})


def _stat(ppid: int, state: str) -> object:
    return scaleLib.ProcStat(
        ppid=ppid, comm="sh", state=state, minflt=0, utime=0.0, stime=0.0, reaped=0.0
    )


class SweepTargetTests(SynchronousTestCase):
    """
    What the tools' final sweep and its "processes left" warning count as still running
    (scale_lib.liveDescendants; bench/run and bench/echo_ab warn with it), on a table in memory.
    """

    def test_exitedDescendantsDoNotCount(self) -> None:
        """
        A zombie (exited, not reaped yet) and a process gone since the table was read are
        descendants but not left running; a live grandchild under a live child is left running,
        a process outside the tree is not counted.
        """
        table = {
            10: _stat(1000, "S"),
            11: _stat(1000, "Z"),
            12: _stat(10, "R"),
            14: _stat(1000, "S"),
            20: _stat(1, "S"),
        }
        now = {pid: stat for pid, stat in table.items() if pid != 14}
        self.patch(scaleLib, "procTable", lambda: table)
        self.patch(scaleLib, "readStat", now.get)
        self.assertEqual(sorted(scaleLib.descendants(1000)), [10, 11, 12, 14])
        self.assertEqual(sorted(scaleLib.liveDescendants(1000)), [10, 12])


class ProcStatusTests(SynchronousTestCase):
    def test_onlyTheKeysAsked(self) -> None:
        """
        Given keys, L{procStatus} returns those fields alone (bench/run records only VmRSS and
        VmHWM per result); by default every field the tools read.
        """
        status = scaleLib.procStatus(os.getpid(), ("VmRSS", "VmHWM"))
        self.assertEqual(set(status), {"VmRSS", "VmHWM"})
        self.assertLessEqual(status["VmRSS"], status["VmHWM"])
        self.assertIn("voluntary_ctxt_switches", scaleLib.procStatus(os.getpid()))

    def test_gone(self) -> None:
        """A PID no process has has no status."""
        self.assertEqual(scaleLib.procStatus(2**22 + 1, ("VmRSS",)), {})


class SteadyRateTests(SynchronousTestCase):
    """
    A session run's rate while every session moved bytes (scale_lib.steadyRate): what the
    operators' clients delivered between the sample at which a tenth of the run's bytes had
    arrived and the last sample, taken before the first session ended.
    """

    MB = 1_000_000

    def test_fromATenthToTheLastSample(self) -> None:
        """The commands' start (the first tenth) is left out; the window's rate and length."""
        samples = [(0.0, 0), (1.0, 5 * self.MB), (2.0, 105 * self.MB), (4.0, 505 * self.MB)]
        rate, window = scaleLib.steadyRate(samples, 1000 * self.MB)
        self.assertEqual((rate, window), (200.0, 2.0))

    def test_slowStartDoesNotCount(self) -> None:
        """Two runs alike but for how slowly their commands started have the same rate."""
        fast = [(0.0, 0), (0.5, 100 * self.MB), (1.5, 300 * self.MB), (2.5, 500 * self.MB)]
        slow = [(0.0, 0), (1.0, 10 * self.MB), (1.5, 100 * self.MB), (2.5, 300 * self.MB)]
        slow.append((3.5, 500 * self.MB))
        self.assertEqual(
            scaleLib.steadyRate(fast, 1000 * self.MB)[0],
            scaleLib.steadyRate(slow, 1000 * self.MB)[0],
        )

    def test_tooFewSamples(self) -> None:
        """No rate without two samples past the first tenth (a run too short to sample)."""
        self.assertIsNone(scaleLib.steadyRate([(0.0, 0), (1.0, 500 * self.MB)], 1000 * self.MB))
        self.assertIsNone(scaleLib.steadyRate([(0.0, 0), (1.0, 50 * self.MB)], 1000 * self.MB))
        self.assertIsNone(scaleLib.steadyRate([], 1000 * self.MB))


class TailPhaseTests(SynchronousTestCase):
    """
    What a run's sessions' ends cost over the wall (scale_lib.tailPhase): from the last
    sample before the first end to the last end, against the run's steady rate.
    """

    MB = 1_000_000
    # 100 MB/s steady from 1 s on; at the last sample before the first end (4 s) 400 of the
    # run's 500 MB have arrived.
    SAMPLES = [(0.0, 0), (1.0, 100 * MB), (2.0, 200 * MB), (3.0, 300 * MB), (4.0, 400 * MB)]

    def test_tailSlowerThanSteady(self) -> None:
        """
        The last 100 MB take 2 s (50 MB/s) instead of the 1 s the steady rate gives: 1 s of
        the 6 s wall is lost.
        """
        tail = scaleLib.tailPhase(self.SAMPLES, 0.0, [4.2, 5.0, 6.0], 500 * self.MB)
        self.assertEqual(
            tail,
            {
                "first_end_s": 4.2,
                "tail_s": 2.0,
                "tail_bytes_share": 0.2,
                "tail_MBps": 50.0,
                "steady_MBps": 100.0,
                "lost_s": 1.0,
                "lost_share_of_wall": round(1 / 6, 3),
            },
        )

    def test_tailAtTheSteadyRate(self) -> None:
        """Ends that cost nothing lose nothing."""
        tail = scaleLib.tailPhase(self.SAMPLES, 0.0, [4.5, 5.0], 500 * self.MB)
        self.assertEqual((tail["lost_s"], tail["tail_MBps"]), (0.0, 100.0))

    def test_onlySamplesBeforeTheFirstEnd(self) -> None:
        """A sample after the first end is not part of the steady window."""
        late = [*self.SAMPLES, (5.5, 480 * self.MB)]
        self.assertEqual(
            scaleLib.tailPhase(late, 0.0, [4.2, 6.0], 500 * self.MB),
            scaleLib.tailPhase(self.SAMPLES, 0.0, [4.2, 6.0], 500 * self.MB),
        )

    def test_noTailForOneSession(self) -> None:
        """A single session's one end is its run's end: no tail."""
        self.assertIsNone(scaleLib.tailPhase(self.SAMPLES, 0.0, [5.0], 500 * self.MB))


class BytesWrittenTests(SynchronousTestCase):
    def test_countsWritesToDevNull(self) -> None:
        """What a process writes to /dev/null counts, as a ControlMaster's sessions' output does."""
        before = scaleLib.bytesWritten([os.getpid()])
        with open(os.devnull, "wb") as sink:
            sink.write(b"x" * 100_000)
        self.assertGreaterEqual(scaleLib.bytesWritten([os.getpid()]) - before, 100_000)
