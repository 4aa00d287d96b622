"""
bench/scale_lib.py: what the bench tools share (bench/scale and bench/footprint; bench/run,
and through it bench/echo_ab, bench/echo_timeline and bench/tools).

Process control (subreaper, sweep of every descendant by PID), /proc readings
(RSS, CPU seconds, context switches, machine busy), a groundcontrol data directory
with an operator key and pre-approved devices, and starting groundcontrol and a real
``twistd tunnel-agent`` on 127.0.0.1 (L{Fleet}).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
VENV_BIN = Path(os.environ.get("BENCH_VENV", str(ROOT / ".venv"))) / "bin"
HOST = "127.0.0.1"
CLK = os.sysconf("SC_CLK_TCK")

#: The reactor groundcontrol's unit and the agent's launcher run (``python -m
#: accesstunnel.twistd`` installs it before twistd starts), in trees that have it
#: (accesstunnel/twistd.py, since session 5).
OUR_REACTOR = "accesstunnel-epoll"


def defaultReactor(src: Path) -> str:
    """OUR_REACTOR if the source tree `src` provides it, else "default" (Twisted's)."""
    return OUR_REACTOR if (src / "accesstunnel" / "twistd.py").exists() else "default"


def twistdCommand(reactor: str) -> list[str]:
    """
    How to start twistd with `reactor`: OUR_REACTOR as groundcontrol's unit runs it (``python
    -m accesstunnel.twistd``), "default" as plain ``twistd`` (Twisted's default reactor), any
    other with ``--reactor NAME``.
    """
    if reactor == "default":
        return [str(VENV_BIN / "twistd")]
    if reactor == OUR_REACTOR:
        return [str(VENV_BIN / "python"), "-m", "accesstunnel.twistd"]
    return [str(VENV_BIN / "twistd"), "--reactor", reactor]


#: How L{Fleet} starts groundcontrol and the real agent unless told otherwise: on the
#: measured tree's default reactor (up to session 8 bench/scale ran plain ``twistd``,
#: Twisted's stock epoll reactor, while bench/run ran ours).
TWISTD = twistdCommand(defaultReactor(ROOT))

#: The directory groundcontrol and the agent start in: the measured tree. ``python -m`` puts
#: the working directory ahead of PYTHONPATH, so a snapshot's tool run from another checkout
#: (``PYTHONPATH=SNAP SNAP/bench/scale`` from /work/main) would otherwise measure that
#: checkout's code, not the snapshot's (bench/RESULTS.md, "Scale runs that measured the
#: caller's tree").
MEASURED_CWD = str(ROOT)

_logFile: Any = None


def loadBenchRun() -> Any:
    """
    bench/run as a module (it has no .py suffix): its ``Ours``, ``sshbench``, logging and
    helpers, for the tools that measure the same way (bench/echo_ab, bench/tools).
    """
    return loadBenchTool("run")


def loadBenchTool(tool: str) -> Any:
    """bench/`tool` as module ``bench_TOOL`` (the tools have no .py suffix)."""
    name = f"bench_{tool}"
    loader = importlib.machinery.SourceFileLoader(name, str(BENCH / tool))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def reexecInVenv() -> None:
    """Run under the repo venv's python (the product's modules are imported here)."""
    venvPython = VENV_BIN / "python"
    if Path(sys.prefix).resolve() != venvPython.parent.parent.resolve() and venvPython.exists():
        os.execv(str(venvPython), [str(venvPython), *sys.argv])


def setLog(path: Path) -> None:
    global _logFile
    _logFile = path.open("a")


def log(msg: str) -> None:
    line = "[{}] {}".format(time.strftime("%H:%M:%S"), msg)
    print(line, file=sys.stderr, flush=True)
    if _logFile is not None:
        _logFile.write(line + "\n")
        _logFile.flush()


class BenchError(Exception):
    pass


# ------------------------------------------------------------------ processes
def becomeSubreaper() -> bool:
    """
    Have orphaned descendants (sshd session children, shells of dead agents) re-parented to
    this process, so that L{sweep} finds and stops every one. False where the kernel would
    not (not Linux): the sweep then reaches only what is still below its parents.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> list[int]:
    """Every descendant of `root` now (not `root`), from one L{procTable} reading."""
    return _below(_childrenOf(procTable()), root)


def liveDescendants(root: int) -> list[int]:
    """
    The descendants of `root` that have not exited: a zombie (exited, its parent has not
    reaped it yet) does not count, nor does one gone meanwhile.
    """
    return [pid for pid in descendants(root) if not _zombie(pid)]


def _zombie(pid: int) -> bool:
    stat = readStat(pid)
    return stat is None or stat.state == "Z"


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def sweep(grace: float = 5.0) -> None:
    """SIGTERM every descendant of this process by PID, then SIGKILL survivors."""
    me = os.getpid()
    for p in descendants(me):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap()
        if not liveDescendants(me):
            return
        time.sleep(0.1)
    for p in descendants(me):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    time.sleep(0.2)
    reap()


def installCleanup() -> None:
    """Sweep descendants on SIGTERM/SIGHUP/Ctrl-C too (main() sweeps on normal exit)."""

    def onSignal(signum: int, frame: Any) -> None:
        log(f"signal {signum}: stopping everything")
        sweep()
        shutil.rmtree(f"/dev/shm/scale-agents-{os.getpid()}", ignore_errors=True)
        os._exit(130)

    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, onSignal)


def raiseFileLimit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            need = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    return max(soft, need)


# ------------------------------------------------------------------ /proc
class ProcStat(NamedTuple):
    """
    The fields of one /proc/PID/stat line (proc(5)) the tools read, CPU in seconds: read in
    one place (L{readStat}, L{procTable}) for the sweep, the CPU counters and the process trees.
    """

    ppid: int
    #: The command name (up to 15 characters, between the first "(" and the last ")").
    comm: str
    #: R, S, D, Z, ...
    state: str
    minflt: int
    utime: float
    stime: float
    #: The CPU of the children it reaped (cutime + cstime).
    reaped: float

    @property
    def cpu(self) -> float:
        """utime + stime: all its threads, not its children."""
        return self.utime + self.stime


def _parseStat(line: str) -> ProcStat:
    head, _, tail = line.rpartition(")")
    v = tail.split()
    return ProcStat(
        ppid=int(v[1]),
        comm=head.partition("(")[2],
        state=v[0],
        minflt=int(v[7]),
        utime=int(v[11]) / CLK,
        stime=int(v[12]) / CLK,
        reaped=(int(v[13]) + int(v[14])) / CLK,
    )


def readStat(pid: int) -> ProcStat | None:
    """One process's /proc/PID/stat (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return _parseStat(f.read())
    except (OSError, IndexError, ValueError):
        return None


def procTable() -> dict[int, ProcStat]:
    """Every process on the machine, PID -> its L{ProcStat} (those that exit meanwhile left out)."""
    table: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = readStat(int(entry))
            if stat is not None:
                table[int(entry)] = stat
    return table


def _childrenOf(table: Mapping[int, tuple[Any, ...]]) -> dict[int, list[int]]:
    """Parent PID -> its children's PIDs, in a table whose rows start with the parent's PID."""
    children: dict[int, list[int]] = {}
    for pid, row in table.items():
        children.setdefault(row[0], []).append(pid)
    return children


def _below(children: Mapping[int, list[int]], root: int) -> list[int]:
    """The descendants of `root` in a L{_childrenOf} map, each once (not `root`)."""
    out: list[int] = []
    seen = {root}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                out.append(child)
                todo.append(child)
    return out


_STATUS_KEYS = (
    "VmRSS",
    "VmHWM",
    "RssAnon",
    "RssFile",
    "voluntary_ctxt_switches",
    "nonvoluntary_ctxt_switches",
)


def procStatus(pid: int, keys: Collection[str] = _STATUS_KEYS) -> dict[str, int]:
    """The fields `keys` of /proc/PID/status (kB or counts), those it has; {} once it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in keys:
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def rssKiB(pid: int) -> int:
    return procStatus(pid).get("VmRSS", 0)


def cpuSeconds(pid: int) -> float:
    """utime + stime of one process (all its threads, not its children)."""
    stat = readStat(pid)
    return float("nan") if stat is None else stat.cpu


def minorFaults(pid: int) -> int:
    """Minor page faults of one process (all its threads, not its children)."""
    stat = readStat(pid)
    return 0 if stat is None else stat.minflt


def _taskCpu(pid: int) -> float:
    """CPU seconds, to the nanosecond, of every thread of a live (or unreaped) process."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/{pid}/task/{tid}/schedstat") as f,
            ):
                total += int(f.read().split()[0])
    return total / 1e9


def processTrees(roots: list[int]) -> dict[int, tuple[int, str, float, float]]:
    """
    Every process in the trees under `roots` (the roots included): PID -> (parent PID,
    command name, its own CPU seconds (all threads, L{_taskCpu}), the CPU seconds of the
    children it reaped (cutime + cstime)), for L{treeCpu}.
    """
    table = procTable()
    children = _childrenOf(table)
    out: dict[int, tuple[int, str, float, float]] = {}
    for root in roots:
        if root in table:
            for pid in [root, *_below(children, root)]:
                if pid not in out:
                    stat = table[pid]
                    out[pid] = (stat.ppid, stat.comm, _taskCpu(pid), stat.reaped)
    return out


def treeCpu(nodes: dict[int, tuple[int, str, float, float]], root: int) -> dict[str, float]:
    """
    The CPU seconds of the tree under `root` in a L{processTrees} table, split in two: "own",
    the processes running the root's program (an sshd and its per-connection sshds; an ssh
    ControlMaster and its ProxyJump ``ssh -W``; groundcontrol; the agent), and "commands",
    the other processes (the sessions' shells and ``head``s) with every child reaped in the
    tree (a session's command is reaped by the process that started it; the daemons' own
    children outlive a run). Both grow monotonically while the tree lives: a process that
    exits moves its CPU into its parent's reaped figure.
    """
    tree = treeMembers(nodes, root)
    program = nodes[root][1] if tree else ""
    own = sum(nodes[p][2] for p in tree if nodes[p][1] == program)
    commands = sum(nodes[p][2] for p in tree if nodes[p][1] != program)
    return {"own": own, "commands": commands + sum(nodes[p][3] for p in tree)}


def treeMembers(nodes: dict[int, tuple[int, str, float, float]], root: int) -> set[int]:
    """`root` and its descendants in a L{processTrees} table (nothing if `root` is gone)."""
    return {root, *_below(_childrenOf(nodes), root)} if root in nodes else set()


def machineBusy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v[:8]) - idle, sum(v[:8])


def busyPct(a: tuple[int, int], b: tuple[int, int]) -> float:
    """Machine busy between two machineBusy() samples; 200% = both cores of 2."""
    return 100.0 * (os.cpu_count() or 1) * (b[0] - a[0]) / max(b[1] - a[1], 1)


def backgroundBusy(seconds: float = 1.0) -> float:
    a = machineBusy()
    time.sleep(seconds)
    return busyPct(a, machineBusy())


def settledRss(pid: int, window: float = 3.0, tolKiB: int = 256, timeout: float = 40.0) -> int:
    """VmRSS once it moved by less than tolKiB over `window` seconds (or at the timeout)."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        samples.append((now, rssKiB(pid)))
        recent = [r for t, r in samples if t >= now - window]
        if samples[0][0] <= now - window and max(recent) - min(recent) <= tolKiB:
            return samples[-1][1]
        if now > deadline:
            return samples[-1][1]
        time.sleep(0.25)


def quietCpu(pid: int, window: float = 2.0, maxPct: float = 10.0, timeout: float = 60.0) -> None:
    """Wait until pid used less than maxPct of a core over `window` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c0 = cpuSeconds(pid)
        time.sleep(window)
        if 100.0 * (cpuSeconds(pid) - c0) / window < maxPct:
            return


def freePort() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def roundRatios(singles: list[float], aggregates: list[float]) -> dict[str, Any]:
    """
    The 100 sessions' aggregate against the single session, round by round (bench/scale
    --session-rounds): each round's ratio divides its own 100-session run by the single run just
    before it, so a drift of the machine's speed between rounds (up to 25% minutes apart,
    bench/RESULTS.md "100 sessions (session 9)") moves both sides of a ratio alike; the median
    of the rounds' ratios is the figure to compare builds by, the spread says how far to trust it.
    """
    paired = pairedRatios(aggregates, singles)
    return {
        "rounds": len(paired["per_round"]),
        "ratios": paired["per_round"],
        "ratio_median": paired["median"],
        "ratio_min": paired["min"],
        "ratio_max": paired["max"],
        "single_MBps_median": round(median(singles), 1),
        "aggregate_MBps_median": round(median(aggregates), 1),
        "ratio_of_medians": round(median(aggregates) / median(singles), 3),
    }


def bytesWritten(pids: list[int]) -> int:
    """
    Bytes the processes `pids` have written so far, to anything (``wchar`` of
    /proc/PID/io: files, pipes, sockets, /dev/null alike).
    """
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    total += int(line.split()[1])
                    break
    return total


#: The steady window of a session run starts once this share of its bytes has arrived (the
#: sessions' commands are exec'ed after the common start, L{steadyRate}).
STEADY_FROM = 0.1


def steadyRate(
    samples: list[tuple[float, int]], total: int, fromShare: float = STEADY_FROM
) -> tuple[float, float] | None:
    """
    MB/s delivered while every session of a run was moving bytes, and the window's seconds:
    from the first of `samples` (seconds, bytes delivered so far) at which `fromShare` of the
    run's `total` bytes had arrived, to the last sample, which the caller takes before the
    first session ends; None when fewer than two samples fall in that window.

    The aggregate from the common start to the last end (L{roundRatios}) also counts what
    happens around the bytes: the n commands waking up one after another at the start (the
    first tenth left out here), each of the n sessions' ends (exit status, channel closes,
    the ssh client's exit) while others still move bytes, and the last ones finishing
    alone. One session pays that once for all its bytes;
    100 sessions of 16 MiB pay it 100 times in about 3 s, some 3 ms of the machine's CPU each
    (bench/RESULTS.md, "100 sessions: what the session ends cost, and the rate while all of
    them run (session 14, lead)").
    """
    start = next((i for i, (_, got) in enumerate(samples) if got >= fromShare * total), None)
    if start is None or start >= len(samples) - 1:
        return None
    (t0, b0), (t1, b1) = samples[start], samples[-1]
    return (b1 - b0) / (t1 - t0) / 1e6, t1 - t0


def tailPhase(
    samples: list[tuple[float, int]], start: float, ends: list[float], total: int
) -> dict[str, float] | None:
    """
    What the sessions' ends cost a run over the wall: from the first session's end to the
    last, how long it took, the share of the run's `total` bytes still to come at the first
    end, the MB/s meanwhile, and the seconds lost against the run's own rate while every
    session moved bytes (L{steadyRate} over the `samples` taken before the first end): the
    tail's bytes at that rate would have taken `lost_s` less. None without a steady rate
    (a single session has no tail: its one end is the run's end).

    With 100 sessions of 16 MiB the ends come in the last second of a ~4 s run, while the
    last sixth of the bytes moves: each end (exit status, EOF, close on both hops, the
    operator's ssh exiting) takes the CPU those bytes would have had, on a machine the
    bytes already keep busy (bench/RESULTS.md, "100 sessions: where the wall goes (session
    15, lead)").
    """
    if len(ends) < 2:
        return None
    first, last = min(ends), max(ends)
    before = [(t, got) for t, got in samples if t < first]
    steady = steadyRate(before, total)
    if steady is None or not before:
        return None
    atFirst = before[-1][1]
    remaining = total - atFirst
    tail = last - before[-1][0]
    rate = remaining / tail / 1e6 if tail > 0 else 0.0
    lost = tail - remaining / 1e6 / steady[0]
    return {
        "first_end_s": round(first - start, 3),
        "tail_s": round(tail, 3),
        "tail_bytes_share": round(remaining / total, 3),
        "tail_MBps": round(rate, 1),
        "steady_MBps": round(steady[0], 1),
        "lost_s": round(lost, 3),
        "lost_share_of_wall": round(lost / (last - start), 3),
    }


def pairedRatios(first: list[float], second: list[float]) -> dict[str, Any]:
    """
    `first` against `second` round by round: each round's figure divided by the other side's
    in the same round, so that the machine's drift between rounds cancels, and their median
    and range. Ours against OpenSSH's path (bench/scale --openssh, each round running both),
    and a round's n sessions against its single session (L{roundRatios}).
    """
    if len(first) != len(second) or not first:
        raise ValueError("one figure of each side per round")
    ratios = [a / b for a, b in zip(first, second, strict=True)]
    return {
        "per_round": [round(r, 3) for r in ratios],
        "median": round(median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


# ------------------------------------------------------------------ the fleet
class Fleet:
    """
    groundcontrol and a real ``twistd tunnel-agent`` on 127.0.0.1, run from the measured tree,
    with their data, keys and logs under `out`; L{stop} ends both. bench/scale and
    bench/footprint use it as it is: devices approved in the store beforehand (L{prepare}),
    a key seeded for each, a client config of its own. bench/run's ``Ours`` is the one-device
    variant bench/run, echo_ab, echo_timeline and tools start (the agent enrols itself, the
    client config is the OpenSSH baseline's).

    @param src: the source tree to run groundcontrol, its CLI and the agent from (a ``git
        archive`` snapshot, say), ahead of the editable install on their PYTHONPATH; None:
        this file's tree.
    @param twistd: how to start twistd (L{twistdCommand}); None: L{TWISTD}.
    @param port: where groundcontrol listens; None: a free port picked now (the client config
        and a restarted groundcontrol need it before it listens); 0: the port the kernel
        gives it, known once it listens (L{waitListening}).
    """

    #: Groundcontrol's log, by how many times it was started (bench/scale's storm restarts it).
    gcLogName = "gc-{starts}.log"

    def __init__(
        self,
        out: Path,
        fileLimit: int = 1024,
        *,
        src: Path | None = None,
        twistd: list[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.out = out
        self.data = out / "gc"
        self.keys = out / "agents.keys"
        self.agentState = out / "agent-state"
        self.agentHome = out / "agent-home"
        self.fileLimit = fileLimit
        self.twistd = TWISTD if twistd is None else twistd
        #: The working directory of every process it starts: ``python -m`` puts it ahead of
        #: PYTHONPATH (L{MEASURED_CWD}).
        self.cwd = MEASURED_CWD if src is None else str(src)
        self.env = dict(os.environ)
        self.env.pop("SSH_AUTH_SOCK", None)
        if src is not None:
            self.env["PYTHONPATH"] = str(src) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.gc: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.port = freePort() if port is None else port
        self.gcStarts = 0
        self.extraGcArgs: list[str] = []
        #: Run groundcontrol with infoLogger (debug events dropped) instead of twistd's -l.
        self.infoLog = False

    def cli(self, *args: str) -> str:
        """The ``groundcontrol`` command on this data directory; its stdout (failure raises)."""
        p = subprocess.run(
            [str(VENV_BIN / "groundcontrol"), "--data", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.cwd,
            env=self.env,
        )
        if p.returncode != 0:
            raise BenchError("groundcontrol {} failed: {}".format(" ".join(args), p.stderr))
        return p.stdout

    def initStore(self, operatorKey: Path) -> None:
        """A new store with the operator 'bench' (admin) holding the public key `operatorKey`."""
        self.cli("init")
        self.cli("user", "add", "bench", "--key", str(operatorKey), "--admin")

    def prepare(self, devices: int) -> None:
        """init, operator 'bench' (admin), `devices` approved devices with keys."""
        removeAll(self.data, self.keys)
        self.out.mkdir(parents=True, exist_ok=True)
        key = self.out / "id_ed25519"
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        self.initStore(Path(str(key) + ".pub"))
        t0 = time.monotonic()
        p = subprocess.run(
            [
                str(VENV_BIN / "python"),
                str(BENCH / "scale_fleet.py"),
                str(self.data),
                str(self.keys),
                str(devices),
            ],
            capture_output=True,
            text=True,
            env=self.env,
        )
        if p.returncode != 0:
            raise BenchError(f"scale_fleet failed: {p.stderr}")
        log(f"{devices} devices approved in the store in {time.monotonic() - t0:.1f} s")
        self.writeClientConfig()

    def deviceNames(self) -> list[str]:
        return [line.split()[0] for line in self.keys.read_text().splitlines()]

    def pinHostKey(self) -> Path:
        """A known_hosts file with groundcontrol's host key for its address and port."""
        known = self.out / "known_hosts"
        key = (self.data / "ssh_host_ed25519_key.pub").read_text().split()
        known.write_text(f"[{HOST}]:{self.port} {key[0]} {key[1]}\n")
        return known

    def writeClientConfig(self) -> None:
        known = self.pinHostKey()
        self.sshConfig = self.out / "ssh_config"
        self.sshConfig.write_text(
            "Host *\n"
            f"  IdentityFile {self.out / 'id_ed25519'}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {known}\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  LogLevel ERROR\n"
            "  ConnectTimeout 20\n"
            "  ControlMaster no\n"
            "  ControlPath none\n"
            "  ForwardAgent no\n"
            "  ForwardX11 no\n"
            "  RequestTTY no\n"
        )

    def ssh(self, device: str, *extra: str, config: Path | None = None) -> list[str]:
        """ssh to `device` through groundcontrol, with `config` (default: L{sshConfig})."""
        return [
            "ssh",
            "-F",
            str(self.sshConfig if config is None else config),
            "-p",
            str(self.port),
            *extra,
            f"dev_{device}@{HOST}",
        ]

    def _raiseFileLimit(self) -> None:
        raiseFileLimit(self.fileLimit)

    def _childHook(self) -> Callable[[], None] | None:
        """
        What groundcontrol's child runs between fork and exec: raise its file limit to
        L{fileLimit} where ours is lower; else nothing, as Python code there can deadlock a
        caller with threads (echo_ab's bulk readers, bench/scale's driver reader).
        """
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return self._raiseFileLimit if self.fileLimit > soft else None

    def startGc(self) -> subprocess.Popen[bytes]:
        listening = self.data / "run" / "listening.json"
        with contextlib.suppress(FileNotFoundError):
            listening.unlink()
        self.gcStarts += 1
        self.gcLog = self.out / self.gcLogName.format(starts=self.gcStarts)
        env = dict(self.env)
        loggerArgs: list[str] = []
        if self.infoLog:
            # What-if for the report: twistd --logger with a level filter (not the default).
            loggerArgs = ["--logger", "scale_lib.infoLogger"]
            env["PYTHONPATH"] = str(BENCH) + os.pathsep + env.get("PYTHONPATH", "")
            env["SCALE_GC_LOG"] = str(self.gcLog)
        self.gc = subprocess.Popen(
            [
                *self.twistd,
                "-n",
                "--pidfile=",
                "-l",
                str(self.gcLog),
                *loggerArgs,
                "groundcontrol",
                "--data",
                str(self.data),
                "--listen",
                f"tcp:{self.port}:interface={HOST}",
                *self.extraGcArgs,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd,
            stdout=open(self.out / "gc.stdout", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self._childHook(),
        )
        return self.gc

    def waitListening(self, timeout: float = 60.0) -> None:
        """Until groundcontrol listens on L{port} (on any, when that is 0: then it is that)."""
        listening = self.data / "run" / "listening.json"
        deadline = time.monotonic() + timeout
        while True:
            assert self.gc is not None
            if self.gc.poll() is not None:
                raise BenchError(f"groundcontrol exited; see {self.gcLog}")
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError, IndexError):
                port = json.loads(listening.read_text())["listening"][0]["port"]
                if self.port in (0, port):
                    self.port = port
                    return
            if time.monotonic() > deadline:
                raise BenchError("groundcontrol did not listen in time")
            time.sleep(0.02)

    def seedAgentKey(self, seedHex: str) -> Path:
        """The device key of Ed25519 seed `seedHex` in L{agentState} (kept if there); the file."""
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from twisted.conch.ssh import keys

        self.agentState.mkdir(mode=0o700, exist_ok=True)
        keyFile = self.agentState / "device_ed25519_key"
        if not keyFile.exists():
            key = keys.Key(ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seedHex)))
            fd = os.open(keyFile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.toString("OPENSSH"))
        return keyFile

    def startAgent(
        self, name: str, seedHex: str | None = None, *extra: str
    ) -> subprocess.Popen[bytes]:
        """
        A real `twistd tunnel-agent` for device `name`: with the key of seed `seedHex` put in
        its state dir (a device approved in the store), or, with None, a key it makes itself
        (a new device: it shows up pending).
        """
        if seedHex is not None:
            self.seedAgentKey(seedHex)
        self.agentHome.mkdir(parents=True, exist_ok=True)
        self.agent = subprocess.Popen(
            [
                *self.twistd,
                "-n",
                "--pidfile=",
                "-l",
                str(self.out / "agent.log"),
                "tunnel-agent",
                "--state",
                str(self.agentState),
                "--server",
                f"tcp:{HOST}:{self.port}",
                "--name",
                name,
                "--server-key",
                str(self.data / "ssh_host_ed25519_key.pub"),
                "--home",
                str(self.agentHome),
                *extra,
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd,
            stdout=open(self.out / "agent.stdout", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self.agent

    def gcLogText(self) -> str:
        """The current groundcontrol's whole log (twistd rotates it every 1 MB)."""
        parts = sorted(
            self.gcLog.parent.glob(self.gcLog.name + ".*"),
            key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0,
        )
        return "".join(p.read_text(errors="replace") for p in [*parts, self.gcLog] if p.exists())

    def sshTrue(self, device: str, timeout: float = 30.0) -> tuple[bool, float, str]:
        return runTrue(self.ssh(device), timeout)

    def waitRoutable(self, device: str, timeout: float = 60.0) -> None:
        waitTrue(self.ssh(device), device, timeout)

    def setupTimes(self, device: str, n: int) -> list[float]:
        """n sequential `ssh dev_x@gc true`, seconds each (failures raise)."""
        out = []
        for _ in range(n):
            ok, took, err = self.sshTrue(device)
            if not ok:
                raise BenchError(f"ssh true failed: {err}")
            out.append(took)
        return out

    def stop(self) -> None:
        for p in (self.agent, self.gc):
            if p is not None and p.poll() is None:
                p.terminate()
        for p in (self.agent, self.gc):
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def removeAll(*paths: Path) -> None:
    """Remove each of `paths` that exists, file or directory tree (a re-used --out)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def runTrue(ssh: list[str], timeout: float = 30.0) -> tuple[bool, float, str]:
    """Run `ssh` with the command ``true``: (it succeeded, seconds it took, its stderr's end)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [*ssh, "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - t0, "timeout"
    return p.returncode == 0, time.perf_counter() - t0, p.stderr.strip()[-200:]


def waitTrue(ssh: list[str], device: str, timeout: float = 60.0) -> None:
    """Until `ssh` (to `device`) runs ``true``: the device is connected and routable."""
    deadline = time.monotonic() + timeout
    while True:
        ok, _, err = runTrue(ssh)
        if ok:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{device} not routable: {err}")
        time.sleep(0.2)


def infoLogger() -> Any:
    """
    A ``twistd --logger`` factory: text to $SCALE_GC_LOG like ``-l``, without debug events
    (Conch logs several per packet it handles: keepalives, key exchange, auth).
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        textFileLogObserver,
    )

    out = open(os.environ["SCALE_GC_LOG"], "a")  # noqa: SIM115 (lives with the process)
    return FilteringLogObserver(
        textFileLogObserver(out), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]
    )
