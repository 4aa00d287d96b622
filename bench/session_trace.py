"""
bench/session_trace.py: where a session run's ends spread, and what its tail costs
(`bench/scale --trace-sessions DIR`).

The 100 sessions of `bench/scale --tests sessions` start together and each moves the same
bytes, yet their ends spread over the last few tenths of a second, while the aggregate
falls below the rate it had while every session moved bytes (scale_lib.tailPhase). A
trace tells where that spread arises and what the tail's CPU goes to: every
L{SAMPLE_S}, from the common start to the last end, each session's `head` (what it has
written into its pipe, which the agent's pull of that channel drains: the device side),
the bytes the ControlMasters have written (the operators' side), groundcontrol's and the
agent's CPU and the machine's; and each `head`'s exit (by pidfd) beside each operator's
ssh exit. L{summarize} turns one run's trace into the figures bench/RESULTS.md gives
("100 sessions: the tail (session 20, H4)").
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from scale_lib import CLK, machineBusy

#: How often a traced run is sampled: about 2 ms of this process per sample with 100
#: sessions (100 /proc/PID/io reads), 10% of a core; the figures here are of traced runs.
SAMPLE_S = 0.02
MiB = 1048576


def wchar(pid: int) -> int | None:
    """Bytes process `pid` has written so far (/proc/PID/io), None once it is gone."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpuTicks(pid: int) -> int | None:
    """User + system clock ticks of process `pid` (not its children), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def commandsReading(fifos: list[Path]) -> dict[int, int]:
    """
    The sessions' commands by session: the `head` whose arguments name session i's FIFO
    (they run on the device, which is this machine), found once every one is waiting.
    """
    want = {os.fsencode(f): i for i, f in enumerate(fifos)}
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"head"):
            for arg in argv[1:]:
                if arg in want:
                    found[want[arg]] = int(entry)
    return found


class SessionTrace:
    """One traced session run: L{sample} as it goes, L{ended} for each `head`'s exit."""

    def __init__(self, fifos: list[Path], masters: list[int], daemons: dict[str, int]) -> None:
        self.heads = commandsReading(fifos)
        self.masters = masters
        self.daemons = daemons
        self.headEnds: dict[int, float] = {}
        self.samples: list[dict[str, Any]] = []
        #: pidfd -> session, for the caller's poll.
        self.pidfds: dict[int, int] = {}
        for i, pid in self.heads.items():
            with contextlib.suppress(OSError):  # already gone: its end is unknown
                self.pidfds[os.pidfd_open(pid)] = i
        self.due = 0.0

    def sample(self) -> None:
        now = time.perf_counter()
        self.due = now + SAMPLE_S
        self.samples.append(
            {
                "t": now,
                "heads": {i: wchar(pid) for i, pid in self.heads.items() if i not in self.headEnds},
                "masters": [wchar(m) or 0 for m in self.masters],
                "cpu": {name: cpuTicks(pid) for name, pid in self.daemons.items()},
                "machine": machineBusy(),
            }
        )

    def ended(self, fd: int, when: float) -> None:
        self.headEnds[self.pidfds[fd]] = when

    def close(self) -> None:
        for fd in self.pidfds:
            os.close(fd)
        self.pidfds = {}

    def write(self, out: Path, start: float, ends: dict[int, float]) -> dict[str, Any]:
        """Writes the run's trace and its summary to OUT/run-K-nN.json; the summary."""
        trace = {
            "start": start,
            "ends": ends,
            "head_ends": self.headEnds,
            "samples": self.samples,
            "masters": len(self.masters),
            "cpus": os.cpu_count() or 1,
            "clk": CLK,
        }
        trace = json.loads(json.dumps(trace))  # the keys as a file gives them back
        for s in trace["samples"]:
            s["delivered"] = sum(s["masters"])
        summary = summarize(trace)
        out.mkdir(parents=True, exist_ok=True)
        k = len(list(out.glob("run-*.json")))
        (out / f"run-{k:03d}-n{len(ends)}.json").write_text(
            json.dumps({"summary": summary, **trace})
        )
        return summary


def _quantiles(xs: list[float], scale: float = 1.0, digits: int = 3) -> list[float]:
    """Smallest, 10th percentile, median, 90th, largest (nearest rank)."""
    s = sorted(xs)
    return [round(scale * s[round(p * (len(s) - 1))], digits) for p in (0, 0.1, 0.5, 0.9, 1)]


def _rankCorrelation(a: dict[str, float], b: dict[str, float]) -> float | None:
    """Spearman's rho of two timings of the same sessions (no ties expected)."""
    keys = [k for k in a if k in b]
    n = len(keys)
    if n < 3:
        return None
    ra = {k: r for r, k in enumerate(sorted(keys, key=lambda k: a[k]))}
    rb = {k: r for r, k in enumerate(sorted(keys, key=lambda k: b[k]))}
    d2 = sum((ra[k] - rb[k]) ** 2 for k in keys)
    return round(1 - 6 * d2 / (n * (n * n - 1)), 3)


def phase(trace: dict[str, Any], fromS: float, toS: float) -> dict[str, Any] | None:
    """
    The samples nearest `fromS` and `toS` (seconds from the start) and what happened between
    them: MB/s delivered, the share of the run's bytes, the machine busy (200% = two cores
    of two), groundcontrol's and the agent's % of a core, the machine's CPU-s and per GB.
    """
    samples = trace["samples"]
    start = trace["start"]
    a = min(samples, key=lambda s: abs(s["t"] - start - fromS))
    b = min(samples, key=lambda s: abs(s["t"] - start - toS))
    dt = b["t"] - a["t"]
    if dt <= 0:
        return None
    total = samples[-1]["delivered"] - samples[0]["delivered"]
    moved = b["delivered"] - a["delivered"]
    busyTicks = b["machine"][0] - a["machine"][0]
    allTicks = max(b["machine"][1] - a["machine"][1], 1)
    busy = 100.0 * trace["cpus"] * busyTicks / allTicks
    cpuS = busy / 100.0 * dt
    own = {
        name: round(100.0 * ((b["cpu"][name] or 0) - (a["cpu"][name] or 0)) / trace["clk"] / dt)
        for name in a["cpu"]
        if a["cpu"][name] is not None and b["cpu"][name] is not None
    }
    return {
        "from_s": round(a["t"] - start, 3),
        "s": round(dt, 3),
        "MBps": round(moved / dt / 1e6, 1),
        "bytes_share": round(moved / total, 3) if total else 0.0,
        "machine_busy_pct": round(busy),
        "pct_of_core": own,
        "cpu_s": round(cpuS, 3),
        "cpu_s_per_GB": round(cpuS / (moved / 1e9), 2) if moved else None,
    }


def summarize(trace: dict[str, Any]) -> dict[str, Any]:
    """
    One run's trace, in figures (times in seconds from the common start):
    - `ssh_ends`, `head_ends`: quantiles of the operators' ssh exits and of the commands'
      exits (each `head` exits once it has written its last byte into its pipe);
      `head_to_ssh_ms`: per session, from its `head`'s exit to its ssh's (what was still
      in flight: the pipe, the agent's queue, groundcontrol's, the window toward the
      client); `rank_head_ssh`: whether the sessions end in the order their commands did;
    - `written_at_first_head_end_MiB`: how far each session's command had got when the
      first one finished (an equal share would have them all there);
    - `master_median_ssh_end`, `master_ssh_end_spread`: per ControlMaster (session i is
      on master i mod `masters`), the median of its sessions' ssh ends and the spread
      (last - first) of its own sessions' ends: whether the ends spread between the
      clients or within each;
    - `steady` (from a tenth of the bytes to the first end), `tail` (first end to last) and
      the tail's parts by how many sessions had ended (`tail_by_ends`: to the n/2-th end,
      to the 9n/10-th, to the last), each a L{phase};
    - `tail_extra_cpu_ms_per_end`: the tail's CPU beyond what its bytes cost at the steady
      CPU per GB, per session; `tail_lost_s`: the tail's seconds beyond its bytes at the
      steady rate; `tail_lost_by_cpu_s`: the extra CPU over the steady busy cores, which
      equals `tail_lost_s` when the tail is slower only because it does more work; per
      part of the tail, `extra_cpu_ms_per_end` over the ends in that part.
    """
    start = trace["start"]
    ends = {k: v - start for k, v in trace["ends"].items()}
    headEnds = {k: v - start for k, v in trace["head_ends"].items()}
    n = len(ends)
    out: dict[str, Any] = {"sessions": n, "ssh_ends": _quantiles(list(ends.values()))}
    if headEnds:
        out["head_ends"] = _quantiles(list(headEnds.values()))
        lags = [ends[k] - headEnds[k] for k in ends if k in headEnds]
        out["head_to_ssh_ms"] = _quantiles(lags, 1000.0, 1)
        out["rank_head_ssh"] = _rankCorrelation(headEnds, ends)
        firstHead = min(headEnds.values())
        before = [s for s in trace["samples"] if s["t"] - start < firstHead]
        full = [s for s in before if len([v for v in s["heads"].values() if v is not None]) == n]
        if full:
            written = [v for v in full[-1]["heads"].values() if v is not None]
            out["written_at_first_head_end_MiB"] = _quantiles(written, 1 / MiB, 2)
    masters = trace.get("masters") or 0
    if masters > 1 and n >= 2 * masters:
        byMaster = [[t for k, t in ends.items() if int(k) % masters == m] for m in range(masters)]
        out["master_median_ssh_end"] = _quantiles([statistics.median(e) for e in byMaster])
        out["master_ssh_end_spread"] = _quantiles([max(e) - min(e) for e in byMaster])
    if n < 2 or len(trace["samples"]) < 3:
        return out
    samples = trace["samples"]
    total = samples[-1]["delivered"] - samples[0]["delivered"]
    tenth = next(
        s["t"] - start for s in samples if s["delivered"] - samples[0]["delivered"] >= total / 10
    )
    order = sorted(ends.values())
    out["steady"] = steady = phase(trace, tenth, order[0])
    out["tail"] = tail = phase(trace, order[0], order[-1])
    parts = list(itertools.pairwise((0, n // 2 - 1, (9 * n) // 10 - 1, n - 1)))
    out["tail_by_ends"] = [phase(trace, order[a], order[b]) for a, b in parts]
    if not (steady and tail and steady["cpu_s_per_GB"] and steady["MBps"]):
        return out

    def extraCpu(part: dict[str, Any]) -> float:
        """The part's CPU-s beyond what its bytes cost at the steady CPU per GB."""
        return float(part["cpu_s"] - steady["cpu_s_per_GB"] * part["bytes_share"] * total / 1e9)

    extra = extraCpu(tail)
    out["tail_extra_cpu_ms_per_end"] = round(1000 * extra / n, 2)
    out["tail_lost_s"] = round(tail["s"] - tail["bytes_share"] * total / 1e6 / steady["MBps"], 3)
    out["tail_lost_by_cpu_s"] = round(extra / (steady["machine_busy_pct"] / 100), 3)
    # Per part, per end in it: level if the ends cost the same however many sessions still
    # move bytes; rising if the last sessions, fewer, move their bytes at a higher cost.
    for (a, b), part in zip(parts, out["tail_by_ends"], strict=True):
        if part is not None:
            part["extra_cpu_ms_per_end"] = round(1000 * extraCpu(part) / (b - a), 2)
    return out
