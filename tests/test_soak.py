"""
bench/soak's arithmetic and readings: the least-squares growth per hour over the second
half of a run (of the process alive at the end, for an agent restarted meanwhile), the
texts it parses (/proc/PID/smaps_rollup, a Prometheus exposition), which scheduled action
is due, the store's rows per table, the figures a run's samples give, and those of an
earlier run again (--summarize). The tool is loaded
from its file; no process is started.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.test_bench_modules import loadBench

soak = loadBench("bench_soak", "soak", loadBench("scale_lib", "scale_lib.py"))


def rows(
    values: Sequence[object], every: float = 30.0, **columns: Sequence[object]
) -> list[dict[str, object]]:
    """Samples `every` seconds apart: t_s and gc_rss_kib from `values`, plus `columns`."""
    out: list[dict[str, object]] = []
    for i, value in enumerate(values):
        row: dict[str, object] = {"t_s": i * every, "gc_rss_kib": value}
        row |= {name: column[i] for name, column in columns.items()}
        out.append(row)
    return out


class LeastSquaresTests(SynchronousTestCase):
    def test_exactLine(self) -> None:
        """Points on a line give its slope, with no error."""
        fit = soak.leastSquares([0.0, 1.0, 2.0, 3.0], [10.0, 12.0, 14.0, 16.0])
        self.assertAlmostEqual(fit.slope, 2.0)
        self.assertAlmostEqual(fit.se, 0.0)
        self.assertEqual((fit.n, fit.first, fit.last), (4, 10.0, 16.0))

    def test_noisyLine(self) -> None:
        """
        The slope and its standard error of scattered points, as a textbook computes them:
        x 0..4, y 1, 3, 2, 5, 4: slope 0.8, residuals' sum of squares 3.6 over n - 2 = 3
        degrees of freedom and Sxx = 10, so se = sqrt(1.2 / 10).
        """
        fit = soak.leastSquares([0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0, 4.0])
        self.assertAlmostEqual(fit.slope, 0.8)
        self.assertAlmostEqual(fit.se, math.sqrt(0.12))

    def test_flat(self) -> None:
        """A value that does not move grows by 0, with no error."""
        fit = soak.leastSquares([0.0, 1.0, 2.0], [5.0, 5.0, 5.0])
        self.assertEqual((fit.slope, fit.se), (0.0, 0.0))

    def test_groups(self) -> None:
        """
        With groups, one slope common to lines of their own levels: two parallel lines far
        apart fit with their slope and no error, where one line through both would not.
        """
        xs = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        ys = [100.0, 101.0, 102.0, 10.0, 11.0, 12.0]
        fit = soak.leastSquares(xs, ys, ["a", "a", "a", "b", "b", "b"])
        self.assertAlmostEqual(fit.slope, 1.0)
        self.assertAlmostEqual(fit.se, 0.0)
        self.assertLess(soak.leastSquares(xs, ys).slope, 0)

    def test_tooFewPoints(self) -> None:
        """One point has no slope; two have a slope but no error; none is not an error."""
        self.assertTrue(math.isnan(soak.leastSquares([1.0], [3.0]).slope))
        two = soak.leastSquares([0.0, 1.0], [3.0, 5.0])
        self.assertEqual(two.slope, 2.0)
        self.assertTrue(math.isnan(two.se))
        self.assertEqual(soak.leastSquares([], []).n, 0)

    def test_sameTimeTwice(self) -> None:
        """Points all at one time have no slope (rather than a division by zero)."""
        self.assertTrue(math.isnan(soak.leastSquares([1.0, 1.0], [3.0, 5.0]).slope))

    def test_lengthsDiffer(self) -> None:
        """As many values (and groups) as times, or a ValueError."""
        self.assertRaises(ValueError, soak.leastSquares, [0.0, 1.0], [1.0])
        self.assertRaises(ValueError, soak.leastSquares, [0.0, 1.0], [1.0, 2.0], ["a"])


class SecondHalfFitTests(SynchronousTestCase):
    def test_perHour(self) -> None:
        """Seconds become hours: 1 KiB every 30 s is 120 KiB per hour."""
        fit = soak.secondHalfFit(rows([100.0 + i for i in range(10)]), "gc_rss_kib")
        self.assertAlmostEqual(fit.slope, 120.0)

    def test_startUpLeftOut(self) -> None:
        """
        What happens in the first half (start-up, caches filling) does not count: a jump
        early on, flat afterwards, fits as no growth; the fit starts at half the last
        sample's time.
        """
        values = [50.0, 80.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0]
        fit = soak.secondHalfFit(rows(values), "gc_rss_kib")
        self.assertEqual(fit.slope, 0.0)
        self.assertEqual(fit.n, 5)

    def test_perProcessLevels(self) -> None:
        """
        With a pid column, each process has its own level: an agent started again starts
        from a lower RSS, which is no shrinking; the moves within each life (1 KiB every
        30 s in both) make the slope.
        """
        values = [200.0, 201.0, 202.0, 203.0, 204.0, 205.0, 206.0, 100.0, 101.0, 102.0]
        pids = [7] * 7 + [9] * 3
        fit = soak.secondHalfFit(rows(values, agent_pid=pids), "gc_rss_kib", "agent_pid", 0)
        self.assertEqual(fit.n, 5)
        self.assertAlmostEqual(fit.slope, 120.0)
        self.assertAlmostEqual(fit.se, 0.0)

    def test_warmUpLeftOut(self) -> None:
        """
        A process's first minutes are left out of its fit (a new agent's first sessions
        allocate what later ones reuse): the step 60 s after its start does not count.
        """
        values = [500.0] * 8 + [100.0, 100.0, 180.0, 180.0, 180.0, 180.0, 180.0, 180.0]
        pids = [7] * 8 + [9] * 8
        samples = rows(values, agent_pid=pids)
        fit = soak.secondHalfFit(samples, "gc_rss_kib", "agent_pid", warmup=90)
        self.assertEqual((fit.slope, fit.n), (0.0, 5))
        self.assertGreater(soak.secondHalfFit(samples, "gc_rss_kib", "agent_pid", 0).slope, 0)

    def test_emptySamplesLeftOut(self) -> None:
        """A sample taken while the process was being restarted (empty) is left out."""
        values: list[object] = [100.0, 101.0, 102.0, "", 104.0, 105.0]
        fit = soak.secondHalfFit(rows(values), "gc_rss_kib")
        self.assertEqual(fit.n, 2)
        self.assertAlmostEqual(fit.slope, 120.0)

    def test_noSamples(self) -> None:
        """No samples: no slope, no error."""
        self.assertTrue(math.isnan(soak.secondHalfFit([], "gc_rss_kib").slope))


class ParsingTests(SynchronousTestCase):
    def test_smapsRollup(self) -> None:
        """The kB lines of /proc/PID/smaps_rollup by key; the address line is not one."""
        text = (
            "55d0c0a00000-7ffd1b7f2000 ---p 00000000 00:00 0    [rollup]\n"
            "Rss:               69004 kB\n"
            "Pss:               50123 kB\n"
            "Private_Clean:      1200 kB\n"
            "Private_Dirty:     43920 kB\n"
        )
        parsed = soak.parseSmapsRollup(text)
        self.assertEqual(parsed["Rss"], 69004)
        self.assertEqual(parsed["Private_Clean"] + parsed["Private_Dirty"], 45120)
        self.assertEqual(len(parsed), 4)

    def test_metrics(self) -> None:
        """
        A Prometheus exposition's unlabelled samples by name; comments, labelled samples
        and a value that is not a number are left out.
        """
        text = (
            "# HELP groundcontrol_agents_connected Agents linked now\n"
            "# TYPE groundcontrol_agents_connected gauge\n"
            "groundcontrol_agents_connected 4.0\n"
            'groundcontrol_connections_refused_total{reason="noauth"} 2.0\n'
            "groundcontrol_sessions_live 1.0 1795772138000\n"
            "broken notanumber\n"
        )
        self.assertEqual(
            soak.parseMetrics(text),
            {"groundcontrol_agents_connected": 4.0, "groundcontrol_sessions_live": 1.0},
        )

    def test_tableRows(self) -> None:
        """Every table's rows, SQLite's own tables left out."""
        path = Path(self.mktemp())
        connection = sqlite3.connect(path)
        connection.executescript(
            "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT);"
            "INSERT INTO audit (what) VALUES ('a'), ('b');"
            "CREATE TABLE devices (name TEXT);"
        )
        connection.commit()
        connection.close()
        self.assertEqual(soak.tableRows(path), {"audit": 2, "devices": 0})

    def test_treeSize(self) -> None:
        """The bytes and number of files under a directory, subdirectories included."""
        top = Path(self.mktemp())
        (top / "2026" / "11").mkdir(parents=True)
        (top / "a.cast").write_bytes(b"x" * 10)
        (top / "2026" / "11" / "b.cast").write_bytes(b"y" * 5)
        self.assertEqual(soak.treeSize(top), (15, 2))
        self.assertEqual(soak.treeSize(top / "missing"), (0, 0))


class ScheduleTests(SynchronousTestCase):
    def test_firstDue(self) -> None:
        """
        A schedule is due once its next run (first + every x runs done) has come; the
        first of several due goes first, and one done is not due again until its next time.
        """
        schedules = (
            soak.Schedule("drop", 100, 50, ("tls",)),
            soak.Schedule("grant", 60, 10, ("ssh",)),
        )
        self.assertIsNone(soak.due(schedules, {}, 9))
        self.assertEqual(soak.due(schedules, {}, 10).action, "grant")
        self.assertIsNone(soak.due(schedules, {"grant": 1}, 49))
        self.assertEqual(soak.due(schedules, {"grant": 1}, 70).action, "drop")
        self.assertEqual(soak.due(schedules, {"grant": 1, "drop": 1}, 70).action, "grant")


class FiguresTests(SynchronousTestCase):
    def test_namesAndValues(self) -> None:
        """
        A run's samples give a growth per hour for groundcontrol's RSS, the store (bytes
        as KiB) and each table, end values, and the run's load as a share of one core;
        groundcontrol's first 3 minutes are out of its fit.
        """
        n = 10
        samples = rows(
            [1000.0 + 2 * i for i in range(n)],
            gc_pid=[5] * n,
            store_bytes=[4096 * (10 + i) for i in range(n)],
            store_wal_bytes=[0, 4096, "", 8192, 0, 0, 0, 0, 0, 0],
            recordings_bytes=[0] * n,
            recordings_files=[0] * n,
            gc_log_bytes=[1024] * n,
            rows_audit=[3 * i for i in range(n)],
            load_cpu_s=[0.1 * i for i in range(n)],
            machine_busy_pct=[50.0] * n,
        )
        lines, fits = soak.figures(samples, wall=270.0)
        figures = dict(lines)
        self.assertAlmostEqual(figures["soak_gc_rss_growth_kib_per_hour"], 240.0)
        self.assertAlmostEqual(figures["soak_store_growth_kib_per_hour"], 480.0)
        self.assertAlmostEqual(figures["soak_rows_audit_growth_per_hour"], 360.0)
        self.assertEqual(figures["soak_store_wal_kib_max"], 8.0)
        self.assertEqual(figures["soak_gc_rss_kib_end"], 1018.0)
        self.assertEqual(figures["soak_load_pct_of_core"], round(100 * 0.9 / 270, 2))
        self.assertEqual(figures["soak_agent_ssh_rss_growth_kib_per_hour"], "nan")
        self.assertEqual(fits["gc_rss"]["n"], 4)

    def test_summarizeAnEarlierRun(self) -> None:
        """
        --summarize reads a run's samples.csv (strings, as csv gives them) and actions.jsonl,
        and gives the same figures with the action counts; a failed action makes it exit 1.
        """
        out = Path(self.mktemp())
        out.mkdir()
        n = 10
        samples = rows(
            [1000 + 2 * i for i in range(n)],
            gc_pid=[5] * n,
            store_bytes=[4096] * n,
            store_wal_bytes=[0] * n,
            recordings_bytes=[0] * n,
            recordings_files=[0] * n,
            gc_log_bytes=[0] * n,
            load_cpu_s=[0.1 * i for i in range(n)],
            machine_busy_pct=[50.0] * n,
        )
        with (out / "samples.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, list(samples[0]))
            writer.writeheader()
            writer.writerows(samples)
        actions = [("pty", True), ("exec", True), ("exec", False)]
        (out / "actions.jsonl").write_text(
            "".join(json.dumps({"action": a, "ok": ok}) + "\n" for a, ok in actions)
        )
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = soak.summarize(out)
        self.assertEqual(status, 1)
        figures = dict(line.split(" ", 1) for line in printed.getvalue().splitlines())
        self.assertAlmostEqual(float(figures["soak_gc_rss_growth_kib_per_hour"]), 240.0)
        self.assertEqual((figures["soak_actions_ok"], figures["soak_actions_failed"]), ("2", "1"))
        results = json.loads((out / "results.json").read_text())
        self.assertEqual(results["actions"], {"pty": [1, 0], "exec": [1, 1]})
