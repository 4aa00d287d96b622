"""
bench/openssh_path.OpensshPath, the OpenSSH reverse-tunnel path bench/scale, bench/echo_ab,
bench/echo_timeline and bench/tools start: the client command lines it gives them and the
environment it hands the baseline script's functions. The module is loaded from its file
(with bench/scale_lib.py as its ``scale_lib``); the bash process is a fake, so nothing starts.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.test_bench_modules import loadBench

#: openssh_path, importing this tree's bench/scale_lib.py as ``scale_lib``.
opensshPath = loadBench("openssh_path", "openssh_path.py", loadBench("scale_lib", "scale_lib.py"))


class FakeBash:
    """The bash process that starts the path: says READY at once and records its env."""

    def __init__(self, argv: list[str], env: dict[str, str], **kwargs: Any) -> None:
        self.argv, self.env = argv, env
        self.stdout = io.StringIO("READY\n")
        self.stdin = io.StringIO()
        kwargs["stderr"].close()

    def poll(self) -> int | None:
        return None

    def wait(self, timeout: float | None = None) -> int:
        return 0


class OpensshPathTests(SynchronousTestCase):
    def setUp(self) -> None:
        ports = itertools.count(2201)  # JUMP_PORT, DEV_PORT, TUN_PORT, then the next path's
        self.patch(opensshPath, "freePort", lambda: next(ports))
        self.patch(opensshPath, "log", lambda msg: None)
        self.work = Path(self.mktemp())
        self.started: list[FakeBash] = []
        # A stand-in for ../shared/bench/openssh_baseline.sh, which a fresh clone elsewhere
        # does not have: start() only checks that it ends by running its main.
        baseline = Path(self.mktemp())
        baseline.write_text('main() { :; }\nmain "$@"\n')
        self.patch(opensshPath, "BASELINE", baseline)

    def fakePopen(self, argv: list[str], **kwargs: Any) -> FakeBash:
        bash = FakeBash(argv, **kwargs)
        self.started.append(bash)
        (self.work / "pids").mkdir(parents=True, exist_ok=True)
        for name in opensshPath.PROCESSES:
            (self.work / "pids" / f"{name}.pid").write_text("1\n")
        return bash

    def startedEnv(self, path: Any, environ: dict[str, str]) -> dict[str, str]:
        """The environment `path.start()` gives the baseline script, from `environ`."""
        self.patch(opensshPath.subprocess, "Popen", self.fakePopen)
        self.patch(os, "environ", environ)
        path.start()
        [bash] = self.started
        return bash.env

    def test_sshThroughTheJumpHost(self) -> None:
        """
        ssh() is the operator's command through the jump sshd to the tunnel's port, extra
        options before the destination: bench/scale's and bench/echo_ab's command line.
        """
        path = opensshPath.OpensshPath(self.work)
        self.assertEqual(
            path.ssh("-o", "ControlMaster=yes"),
            [
                *("ssh", "-F", str(self.work / "ssh_config.default")),
                *("-J", "root@127.0.0.1:2201", "-p", "2203"),
                *("-o", "ControlMaster=yes", "root@127.0.0.1"),
            ],
        )

    def test_optionsWithoutDestination(self) -> None:
        """
        options() is ssh()'s options without the destination (rsync -e adds its own), and
        with ``-P`` the port option scp and sftp take.
        """
        path = opensshPath.OpensshPath(self.work)
        self.assertEqual(path.ssh(), ["ssh", *path.options(), path.destination])
        self.assertEqual(
            path.options("-P"),
            [
                *("-F", str(path.config)),
                *("-J", "root@127.0.0.1:2201", "-P", "2203"),
            ],
        )

    def test_sftpSubsystemOnlyWhenAsked(self) -> None:
        """
        The device sshd gets an sftp subsystem (SFTP_SERVER, which the start script appends
        to its config) only for a caller that names the program (bench/tools).
        """
        env = self.startedEnv(opensshPath.OpensshPath(self.work), {})
        self.assertEqual(env["SFTP_SERVER"], "")
        self.started.clear()
        server = "/usr/lib/openssh/sftp-server"
        env = self.startedEnv(opensshPath.OpensshPath(self.work, sftpServer=server), {})
        self.assertEqual(env["SFTP_SERVER"], server)
        self.assertIn(
            'echo "Subsystem sftp $SFTP_SERVER" >>"$WORK/sshd_dev.conf"', opensshPath._START
        )

    def test_kexPinnedOrInherited(self) -> None:
        """
        With ``kex`` given, the script's KEX is that whatever the caller's environment holds
        ("" = OpenSSH's default); without it the caller's KEX reaches the script unchanged.
        """
        caller = {"KEX": "curve25519-sha256", "SSH_AUTH_SOCK": "/tmp/agent"}
        env = self.startedEnv(opensshPath.OpensshPath(self.work, kex=""), dict(caller))
        self.assertEqual(env["KEX"], "")
        self.assertNotIn("SSH_AUTH_SOCK", env)
        self.started.clear()
        env = self.startedEnv(opensshPath.OpensshPath(self.work), dict(caller))
        self.assertEqual(env["KEX"], "curve25519-sha256")
