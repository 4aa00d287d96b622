"""
bench/scale_lib.Fleet, the groundcontrol and agent processes every bench tool starts, and
bench/run's ``Ours``, its one-device variant (bench/run, echo_ab, echo_timeline, tools): the
twistd command a reactor name gives, the tree and environment the processes run with, the port
read back once groundcontrol listens, and Ours's client config and ssh command. The modules
are loaded from their files (bench/run with this tree's scale_lib); no process is started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.test_bench_modules import ROOT, loadBench

scaleLib = loadBench("scale_lib", "scale_lib.py")
benchRun = loadBench("bench_run", "run", scaleLib)
VENV_BIN = scaleLib.VENV_BIN


class RunningGc:
    """A groundcontrol process that has not exited (all waitListening asks of it)."""

    def poll(self) -> int | None:
        return None


class TwistdCommandTests(SynchronousTestCase):
    def test_reactors(self) -> None:
        """Ours as groundcontrol's unit runs it, Twisted's default as plain twistd, any other
        reactor by name."""
        self.assertEqual(
            scaleLib.twistdCommand(scaleLib.OUR_REACTOR),
            [str(VENV_BIN / "python"), "-m", "accesstunnel.twistd"],
        )
        self.assertEqual(scaleLib.twistdCommand("default"), [str(VENV_BIN / "twistd")])
        self.assertEqual(
            scaleLib.twistdCommand("poll"), [str(VENV_BIN / "twistd"), "--reactor", "poll"]
        )

    def test_defaultReactorOfTheTree(self) -> None:
        """A tree with accesstunnel/twistd.py runs ours; an older tree Twisted's default."""
        old = Path(self.mktemp())
        new = Path(self.mktemp())
        (new / "accesstunnel").mkdir(parents=True)
        (new / "accesstunnel" / "twistd.py").write_text("")
        old.mkdir()
        self.assertEqual(scaleLib.defaultReactor(new), scaleLib.OUR_REACTOR)
        self.assertEqual(scaleLib.defaultReactor(old), "default")
        self.assertEqual(benchRun.default_reactor(new), scaleLib.OUR_REACTOR)
        self.assertEqual(scaleLib.TWISTD, scaleLib.twistdCommand(scaleLib.defaultReactor(ROOT)))


class FleetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = Path(self.mktemp())
        self.out.mkdir()

    def test_measuredTreeByDefault(self) -> None:
        """Without a source tree the processes run in this file's tree, PYTHONPATH as the
        caller's, no ssh-agent socket; twistd as TWISTD."""
        fleet = scaleLib.Fleet(self.out, port=2222)
        self.assertEqual(fleet.cwd, scaleLib.MEASURED_CWD)
        self.assertEqual(fleet.env.get("PYTHONPATH"), scaleLib.os.environ.get("PYTHONPATH"))
        self.assertNotIn("SSH_AUTH_SOCK", fleet.env)
        self.assertEqual(fleet.twistd, scaleLib.TWISTD)
        self.assertEqual(fleet.agentState, self.out / "agent-state")
        self.assertEqual(fleet.gcLogName.format(starts=2), "gc-2.log")

    def test_sourceTree(self) -> None:
        """With a source tree the processes run there, and find its code first on their path."""
        src = Path("/snapshot")
        fleet = scaleLib.Fleet(self.out, src=src, twistd=["twistd"], port=2222)
        self.assertEqual(fleet.cwd, str(src))
        self.assertEqual(fleet.env["PYTHONPATH"].split(scaleLib.os.pathsep)[0], str(src))
        self.assertEqual(fleet.twistd, ["twistd"])

    def writeListening(self, fleet: Any, port: int) -> None:
        run = fleet.data / "run"
        run.mkdir(parents=True)
        (run / "listening.json").write_text(json.dumps({"listening": [{"port": port}]}))

    def test_kernelsPortReadBack(self) -> None:
        """Port 0: groundcontrol listens where the kernel says; that port is the fleet's."""
        fleet = scaleLib.Fleet(self.out, port=0)
        fleet.gc = RunningGc()
        self.writeListening(fleet, 40123)
        fleet.waitListening(timeout=0)
        self.assertEqual(fleet.port, 40123)

    def test_chosenPortWaitedFor(self) -> None:
        """A port picked beforehand: another port in listening.json (a previous
        groundcontrol's) is not it."""
        fleet = scaleLib.Fleet(self.out, port=2222)
        fleet.gc = RunningGc()
        fleet.gcLog = self.out / "gc-1.log"
        self.writeListening(fleet, 40123)
        self.assertRaises(scaleLib.BenchError, fleet.waitListening, timeout=0)
        self.assertEqual(fleet.port, 2222)

    def test_fileLimitRaisedOnlyWhereLower(self) -> None:
        """groundcontrol's child runs Python code before exec only to raise a file limit lower
        than the fleet needs (a caller with threads could deadlock in it)."""
        soft, _ = scaleLib.resource.getrlimit(scaleLib.resource.RLIMIT_NOFILE)
        self.assertIsNone(scaleLib.Fleet(self.out, fileLimit=soft, port=2222)._childHook())
        fleet = scaleLib.Fleet(self.out, fileLimit=soft + 1, port=2222)
        self.assertEqual(fleet._childHook(), fleet._raiseFileLimit)

    def test_sshToADevice(self) -> None:
        fleet = scaleLib.Fleet(self.out, port=2222)
        fleet.sshConfig = self.out / "ssh_config"
        self.assertEqual(
            fleet.ssh("d1", "-tt"),
            ["ssh", "-F", str(self.out / "ssh_config"), "-p", "2222", "-tt", "dev_d1@127.0.0.1"],
        )


class OursTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = Path(self.mktemp())
        self.out.mkdir()

    def test_aSnapshotOnAReactor(self) -> None:
        """bench/run's Ours(out, key, src, reactor): that tree, that reactor, the port the
        kernel gives, its own output names."""
        src = Path("/snapshot")
        ours = benchRun.Ours(self.out, self.out / "id.pub", src, scaleLib.OUR_REACTOR)
        self.assertEqual(ours.twistd, scaleLib.twistdCommand(scaleLib.OUR_REACTOR))
        self.assertEqual(ours.cwd, str(src))
        self.assertEqual(ours.env["PYTHONPATH"].split(scaleLib.os.pathsep)[0], str(src))
        self.assertEqual(ours.port, 0)
        self.assertEqual(ours.agentState, self.out / "agent")
        self.assertEqual(ours.gcLogName.format(starts=1), "gc.log")

    def test_reusedOutStartsFromScratch(self) -> None:
        """A re-used --out directory: the previous run's store and agent state are gone."""
        for name in ("gc", "agent", "agent-home"):
            (self.out / name).mkdir()
            (self.out / name / "old").write_text("x")
        benchRun.Ours(self.out, self.out / "id.pub")
        for name in ("gc", "agent", "agent-home"):
            self.assertFalse((self.out / name).exists(), name)

    def test_clientConfigIsTheBaselines(self) -> None:
        """The baseline's client config with groundcontrol's host key pinned, and the ssh
        command to the device with it."""
        ours = benchRun.Ours(self.out, self.out / "id.pub")
        ours.port = 40123
        ours.data.mkdir()
        (ours.data / "ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAAkey gc\n")
        baseline = self.out / "ssh_config.default"
        baseline.write_text(
            "Host *\n  Ciphers default\n  UserKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking no\n  BatchMode yes\n"
        )
        cfg = ours.write_client_config(baseline)
        known = self.out / "known_hosts"
        self.assertEqual(
            cfg.read_text(),
            f"Host *\n  Ciphers default\n  UserKnownHostsFile {known}\n"
            "  StrictHostKeyChecking yes\n  BatchMode yes\n",
        )
        self.assertEqual(known.read_text(), "[127.0.0.1]:40123 ssh-ed25519 AAAAkey\n")
        self.assertEqual(
            ours.ssh_cmd(cfg), ["ssh", "-F", str(cfg), "-p", "40123", "dev_bench@127.0.0.1"]
        )
