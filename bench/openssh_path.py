"""
bench/openssh_path.py: the OpenSSH reverse-tunnel path, started for a bench/ tool.

The path the operators would otherwise use (../shared/bench/openssh_baseline.sh): a jump
sshd, a device sshd and the device's ``ssh -N -R`` reverse tunnel to the jump, all on
127.0.0.1, the operator going through with ``ssh -J``. The processes are started by the
baseline script's own functions (the script is sourced, not copied), so its sshd options,
its empty HOME, its client options and its cipher policy (OpenSSH's defaults) are the ones
measured, and bench/run's and bench/echo_ab's figures for the same path stay comparable.

A bash process sources the script, starts the path and holds it until its stdin closes;
its EXIT trap (the script's ``teardown``) stops the three processes by PID, and a tool's
own sweep of its descendants catches them on any other exit.

bench/tools asks for two things the others do not: an sftp subsystem on the device sshd
(the baseline has none; scp in its SFTP mode and sftp need one) and OpenSSH's default key
exchange whatever KEX the caller's environment holds.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scale_lib import HOST, BenchError, freePort, log

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT.parent / "shared" / "bench" / "openssh_baseline.sh"

#: Sources the baseline script without its last line (``main "$@"``) and writes its files
#: (keys, client configs, its ``sshbench.py``; with SFTP_SERVER set, an sftp subsystem line
#: added to the device sshd's config); with START_PATH=1 also starts the path with its
#: functions, says READY and waits for stdin to close; the EXIT trap tears it down.
_START = """
set -euo pipefail
source <(sed '$d' "$BASELINE_SCRIPT")
ensure_tools
mkdir -p "$WORK/pids"
WORK=$(cd "$WORK" && pwd)
if [ "$START_PATH" = 1 ]; then
    teardown
    trap teardown EXIT
fi
write_files
[ -z "$SFTP_SERVER" ] || echo "Subsystem sftp $SFTP_SERVER" >>"$WORK/sshd_dev.conf"
write_helper
[ "$START_PATH" = 1 ] || exit 0
start_sshd jump "$JUMP_PORT"
start_sshd dev "$DEV_PORT"
start_tunnel default
echo READY
read -r _ || true
"""

#: The processes of the path, by the names the baseline script records their PIDs under.
PROCESSES = ("jump_sshd", "dev_sshd", "tunnel")


class OpensshPath:
    """
    The jump sshd, device sshd and reverse tunnel, on ports picked free, with the
    baseline's files (keys, configs, ``sshbench.py``) in `work`; with `startPath` false,
    only the files (bench/echo_ab without --openssh uses the client key and sshbench.py).

    `sftpServer`: the sftp-server program the device sshd runs for the sftp subsystem (None:
    no subsystem, as in the baseline). `kex`: the client's KexAlgorithms for every hop, as
    the baseline script's KEX ("" = OpenSSH's default); None leaves the caller's KEX, if any,
    to the script, as bench/run's baseline run does.
    """

    def __init__(
        self,
        work: Path,
        startPath: bool = True,
        sftpServer: str | None = None,
        kex: str | None = None,
    ) -> None:
        self.work = work
        self.startPath = startPath
        self.sftpServer = sftpServer
        self.kex = kex
        self.ports = {"JUMP_PORT": freePort(), "DEV_PORT": freePort(), "TUN_PORT": freePort()}
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        if BASELINE.read_text().rstrip().splitlines()[-1] != 'main "$@"':
            raise BenchError(f'{BASELINE} no longer ends in main "$@"')
        self.work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, BASELINE_SCRIPT=str(BASELINE), WORK=str(self.work))
        env.pop("SSH_AUTH_SOCK", None)
        env.update({k: str(v) for k, v in self.ports.items()})
        env["START_PATH"] = "1" if self.startPath else "0"
        env["SFTP_SERVER"] = self.sftpServer or ""
        if self.kex is not None:
            env["KEX"] = self.kex
        self.proc = subprocess.Popen(
            ["bash", "-c", _START],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.work / "baseline.log", "ab"),  # noqa: SIM115 (lives with the child)
            text=True,
            start_new_session=True,
        )
        if not self.startPath:
            if self.proc.wait(60) != 0:
                raise BenchError(f"the baseline's files were not written; see {self.work}")
            return
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "READY":
            raise BenchError(f"the OpenSSH path did not start; see {self.work}/baseline.log")
        log(
            f"OpenSSH path up: jump sshd {HOST}:{self.ports['JUMP_PORT']}, device sshd "
            f":{self.ports['DEV_PORT']}, reverse tunnel :{self.ports['TUN_PORT']}; PIDs "
            + ", ".join(f"{k} {v}" for k, v in self.pids().items())
        )

    def pids(self) -> dict[str, int]:
        """The jump sshd's, the device sshd's and the tunnel ssh's PIDs."""
        return {name: int((self.work / "pids" / f"{name}.pid").read_text()) for name in PROCESSES}

    @property
    def config(self) -> Path:
        """The baseline's client config (OpenSSH's default cipher policy)."""
        return self.work / "ssh_config.default"

    @property
    def destination(self) -> str:
        """The device's user and host, behind the reverse tunnel."""
        return f"root@{HOST}"

    def options(self, portFlag: str = "-p") -> list[str]:
        """
        The client options that reach the device through the jump host (``-F``, ``-J``, the
        tunnel's port), without the destination: for ``rsync -e`` and, with ``portFlag``
        ``-P``, for scp and sftp.
        """
        return [
            *("-F", str(self.config)),
            *("-J", f"root@{HOST}:{self.ports['JUMP_PORT']}"),
            *(portFlag, str(self.ports["TUN_PORT"])),
        ]

    def ssh(self, *extra: str) -> list[str]:
        """The operator's command to the device, as bench/run measures the path (``-J``)."""
        return ["ssh", *self.options(), *extra, self.destination]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # `read` returns: the EXIT trap tears the path down
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait()
