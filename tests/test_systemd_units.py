"""
docs/systemd/*.service against the programs they start and README.md's install steps.

What is checked, without systemd: each C{ExecStart=} names a program this package installs
and a command line its options parser accepts (the same L{usage.Options} that C{--help}
prints); the paths agree with README.md's "Install" and "systemd" steps; the directives each
program's features need are there, and none that would break one (groundcontrol's TLS
listeners under C{MemoryDenyWriteExecute=}, the agent's sessions under any sandbox, which they
inherit); the agent's stop leaves room for its sessions to end. C{systemd-analyze verify} runs
where it is installed (skipped otherwise), with the units' venv pointed at this one.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "docs" / "systemd"
VENV = "/opt/access-tunnel/venv"


def parseUnit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections: each key's values in order (systemd's continuation lines joined)."""
    sections: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(name: str) -> dict[str, list[str]]:
    return parseUnit(UNITS / f"{name}.service")["Service"]


def last(unit: dict[str, list[str]], key: str, default: str = "") -> str:
    """A directive's effective value: the last assignment, as systemd reads it."""
    return unit.get(key, [default])[-1]


def words(unit: dict[str, list[str]], key: str) -> set[str]:
    return {w for value in unit.get(key, []) for w in value.split()}


def execStart(name: str, **environment: str) -> list[str]:
    """ExecStart= as systemd expands it: C{${VAR}} one word, C{$VAR} split at whitespace."""
    argv: list[str] = []
    for word in shlex.split(last(service(name), "ExecStart")):
        whole = re.fullmatch(r"\$([A-Za-z_]\w*)", word)
        if whole:
            argv.extend(environment.get(whole.group(1), "").split())
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: environment.get(m.group(1), ""), word))
    return argv


def option(argv: list[str], name: str) -> list[str]:
    """Every value of C{--name VALUE} in C{argv}."""
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == name]


def readmeSection(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n### ", start + 1)
    return text[start:end]


def readmeCommands(heading: str) -> list[str]:
    """The lines of the C{sh} blocks of one README subsection, comments dropped."""
    blocks = re.findall(r"```sh\n(.*?)```", readmeSection(heading), re.S)
    lines = [line.split("  #")[0].rstrip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def longOptions(options: usage.Options) -> set[str]:
    """The long options an Options parser accepts (what its C{--help} lists)."""
    return {name.rstrip("=") for name in options.longOpt}


class GroundControlUnitTests(SynchronousTestCase):
    unit = service("groundcontrol")
    argv = execStart("groundcontrol", GC_OPTIONS="")

    def test_programAndOptions(self) -> None:
        """
        ExecStart runs the venv's Python on accesstunnel.twistd with twistd options twistd has,
        a logger that exists, and the groundcontrol plugin with a command line its Options
        accept (with and without the GC_OPTIONS the unit's comment shows).
        """
        import importlib.util

        from twisted.scripts._twistd_unix import ServerOptions

        from groundcontrol import logging as gclogging
        from groundcontrol.tap import Options
        from twisted.plugins.groundcontrol_plugin import groundcontrol as plugin

        program, dashM, module = self.argv[:3]
        self.assertEqual((program, dashM), (f"{VENV}/bin/python", "-m"))
        self.assertIsNotNone(importlib.util.find_spec(module))
        subcommand = self.argv.index(plugin.tapname)
        twistdArgs = self.argv[3:subcommand]
        twistdOptions = longOptions(ServerOptions())
        for word in twistdArgs:
            if word.startswith("--"):
                self.assertIn(word[2:].split("=")[0], twistdOptions)
        logger = option(twistdArgs, "--logger")[0]
        self.assertTrue(callable(getattr(gclogging, logger.rsplit(".", 1)[1])))
        self.assertEqual(plugin.module, "groundcontrol.tap")
        gcArgs = self.argv[subcommand + 1 :]
        Options().parseOptions(gcArgs)
        example = re.search(r'GC_OPTIONS="([^"]*)"', (UNITS / "groundcontrol.service").read_text())
        assert example is not None
        extra = example.group(1).replace("https://...", "https://hooks.example.com/fleet")
        Options().parseOptions([*gcArgs, *extra.split()])

    def test_lowPortsNeedTheCapability(self) -> None:
        """Every --listen port below 1024 needs CAP_NET_BIND_SERVICE, ambient and bounding."""
        ports = [urlsplit(a).port for a in option(self.argv, "--listen")]
        self.assertTrue(ports)
        if any(p is not None and p < 1024 for p in ports):
            self.assertIn("CAP_NET_BIND_SERVICE", words(self.unit, "AmbientCapabilities"))
            self.assertIn("CAP_NET_BIND_SERVICE", words(self.unit, "CapabilityBoundingSet"))
        self.assertNotEqual(last(self.unit, "User", "root"), "root")

    def test_writesOnlyItsStateDirectory(self) -> None:
        """With the system read-only, --data is the unit's state directory, its working one."""
        self.assertEqual(last(self.unit, "ProtectSystem"), "strict")
        data = option(self.argv, "--data")
        self.assertEqual(data, [f"/var/lib/{last(self.unit, 'StateDirectory')}"])
        self.assertEqual(last(self.unit, "WorkingDirectory"), data[0])
        self.assertEqual(last(self.unit, "StateDirectoryMode"), "0700")

    def test_listensOnBothFamilies(self) -> None:
        """
        Every IPv4 wildcard listener of the unit, and of the README's production example, has
        its IPv6 twin ([::], same scheme, port and path), which then takes IPv6 only and so
        binds beside it (accesstunnel.transports.dualstack): operators and agents on IPv6 reach
        groundcontrol.
        """
        from accesstunnel.transports.dualstack import ipv4WildcardPorts

        readme = " ".join(readmeCommands("### groundcontrol")).replace("\\", " ")
        for listens in (option(self.argv, "--listen"), option(shlex.split(readme), "--listen")):
            ipv4 = [a for a in listens if "//0.0.0.0:" in a]
            self.assertEqual(len(ipv4), 3)
            for address in ipv4:
                self.assertIn(address.replace("//0.0.0.0:", "//[::]:"), listens)
            ipv6Ports = {urlsplit(a).port for a in listens if "//[::]:" in a}
            self.assertLessEqual(ipv6Ports, ipv4WildcardPorts(listens))

    def test_addressFamilies(self) -> None:
        """IPv4 and IPv6 listeners and peers; Unix sockets (PostgreSQL's, tor's control port)."""
        self.assertLessEqual(
            {"AF_INET", "AF_INET6", "AF_UNIX"}, words(self.unit, "RestrictAddressFamilies")
        )

    def test_noDirectiveThatBreaksAFeature(self) -> None:
        """
        MemoryDenyWriteExecute= breaks every tls:// and wss:// connection (pyOpenSSL's ALPN
        callback, set on every TLS context, is a cffi callback in writable executable memory);
        ProcSubset=pid hides /proc/cpuinfo, which --operator-aes-gcm auto reads; PrivateUsers=
        keeps CAP_NET_BIND_SERVICE from the host's ports.
        """
        from groundcontrol import cipherchoice

        self.assertNotIn(last(self.unit, "MemoryDenyWriteExecute", "no"), ("yes", "true", "1"))
        self.assertTrue(str(cipherchoice._CPUINFO).startswith("/proc/"))
        self.assertNotEqual(last(self.unit, "ProcSubset", "all"), "pid")
        self.assertNotIn(last(self.unit, "PrivateUsers", "no"), ("yes", "true", "1"))
        self.assertEqual(last(self.unit, "SystemCallFilter"), "@system-service")
        self.assertEqual(last(self.unit, "NoNewPrivileges"), "yes")

    def test_torCookieGroup(self) -> None:
        """
        tor:// listeners authenticate with tor's control cookie, readable by tor's group only:
        the unit offers the group (commented out: systemd refuses a unit whose group does not
        exist) and the README says when to set it.
        """
        text = (UNITS / "groundcontrol.service").read_text()
        self.assertIn("\n#SupplementaryGroups=debian-tor\n", text)
        self.assertIn("SupplementaryGroups=debian-tor", readmeSection("### systemd"))

    def test_typeAndRestart(self) -> None:
        """
        Type=exec: a start fails when the program cannot be started. Restart=on-failure: when
        a listener cannot listen groundcontrol exits with a status that is not 0
        (groundcontrol.listening, tests/e2e/test_listen_failure.py), which on-failure retries.
        """
        from groundcontrol.listening import LISTEN_FAILED_STATUS

        self.assertEqual(last(self.unit, "Type"), "exec")
        self.assertEqual(last(self.unit, "Restart"), "on-failure")
        self.assertNotEqual(LISTEN_FAILED_STATUS, 0)
        self.assertIn("stops with exit status 1", readmeSection("### systemd"))


class AgentUnitTests(SynchronousTestCase):
    unit = service("tunnel-agent")
    example = re.search(r'AGENT_OPTIONS="([^"]*)"', (UNITS / "tunnel-agent.service").read_text())

    def test_programAndOptions(self) -> None:
        """
        ExecStart runs the tunnel-agentd console script (agent.launcher:main) with a command
        line the agent's Options accept, DEVICE_NAME and the AGENT_OPTIONS of the unit's
        comment filled in, the key and config files standing in for /etc/tunnel-agent's.
        """
        from agent.launcher import main  # noqa: F401
        from agent.tap import Options

        setup = configparser.ConfigParser()
        setup.read(ROOT / "setup.cfg")
        scripts = dict(
            line.split(" = ")
            for line in setup["options.entry_points"]["console_scripts"].split("\n")
            if line
        )
        assert self.example is not None
        argv = execStart("tunnel-agent", DEVICE_NAME="kiln7", AGENT_OPTIONS=self.example.group(1))
        self.assertEqual(argv[0], f"{VENV}/bin/tunnel-agentd")
        self.assertEqual(scripts["tunnel-agentd"], "agent.launcher:main")
        with tempfile.TemporaryDirectory() as directory:
            keyFile = Path(directory) / "server-key.pub"
            key = keys.Key(ed25519.Ed25519PrivateKey.generate()).public()
            keyFile.write_bytes(key.toString("OPENSSH") + b"\n")
            config = Path(directory) / "agent.toml"
            config.write_text('servers = ["ssh://gc.example.com"]\n')
            local = {
                "/etc/tunnel-agent/server-key.pub": str(keyFile),
                "/etc/tunnel-agent/agent.toml": str(config),
            }
            options = Options()
            options.parseOptions([local.get(word, word) for word in argv[1:]])
        self.assertEqual(options["name"], "kiln7")
        self.assertEqual(options["tags"], ["site-berlin"])

    def test_stateDirectory(self) -> None:
        argv = execStart("tunnel-agent", DEVICE_NAME="kiln7")
        self.assertEqual(option(argv, "--state"), [f"/var/lib/{last(self.unit, 'StateDirectory')}"])
        self.assertEqual(last(self.unit, "StateDirectoryMode"), "0700")
        self.assertEqual(last(self.unit, "EnvironmentFile"), "/etc/default/tunnel-agent")

    def test_runsAsRootUnsandboxed(self) -> None:
        """
        Root (sessions as other users), and no directive its sessions would inherit: they are
        its children, and each of these breaks something an operator does in one.
        """
        self.assertEqual(last(self.unit, "User", "root"), "root")
        inherited = {
            "ProtectSystem",
            "ProtectHome",
            "ReadOnlyPaths",
            "InaccessiblePaths",
            "NoNewPrivileges",
            "CapabilityBoundingSet",
            "PrivateTmp",
            "PrivateDevices",
            "RestrictAddressFamilies",
            "SystemCallFilter",
            "RestrictNamespaces",
            "MemoryDenyWriteExecute",
            "LockPersonality",
            "LimitNOFILE",
            "OOMScoreAdjust",
        }
        self.assertEqual(inherited & set(self.unit), set())

    def test_stopLeavesRoomForSessions(self) -> None:
        """
        systemd signals the agent alone; the agent gives its link STOP_GRACE to close, then
        waits for its sessions' children (killed KILL_GRACE after their hang-up, waited for 2 s
        more): TimeoutStopSec= must not cut that short with a SIGKILL.
        """
        from agent.link import STOP_GRACE
        from agent.session import KILL_GRACE

        self.assertEqual(last(self.unit, "KillMode"), "process")
        self.assertGreater(float(last(self.unit, "TimeoutStopSec")), STOP_GRACE + KILL_GRACE + 2)
        self.assertEqual(last(self.unit, "Restart"), "always")

    def test_reloadRereadsTheConfig(self) -> None:
        """systemctl reload sends SIGHUP, which re-reads --config: the unit passes one."""
        self.assertEqual(last(self.unit, "ExecReload"), "/bin/kill -HUP $MAINPID")
        argv = execStart("tunnel-agent", DEVICE_NAME="kiln7")
        self.assertEqual(option(argv, "--config"), ["/etc/tunnel-agent/agent.toml"])


class ReadmeInstallTests(SynchronousTestCase):
    """README.md's "Install" and "systemd" steps make the paths and users the units use."""

    install = readmeCommands("### Install")
    steps = readmeCommands("### systemd")

    def test_venvAndDocumentation(self) -> None:
        self.assertIn(f"python3 -m venv {VENV}", self.install)
        self.assertTrue(
            any(
                line.startswith("cp -r README.md docs /opt/access-tunnel/") for line in self.install
            )
        )
        for name in ("groundcontrol", "tunnel-agent"):
            unit = parseUnit(UNITS / f"{name}.service")
            self.assertEqual(unit["Unit"]["Documentation"], ["file:///opt/access-tunnel/README.md"])
            self.assertIn(
                f"cp /opt/access-tunnel/docs/systemd/{name}.service /etc/systemd/system/",
                self.steps,
            )
            self.assertIn(f"systemctl daemon-reload && systemctl enable --now {name}", self.steps)

    def test_groundcontrolUserDataAndTLS(self) -> None:
        unit = service("groundcontrol")
        argv = execStart("groundcontrol")
        user = last(unit, "User")
        data = option(argv, "--data")[0]
        self.assertIn(
            f"useradd --system --home-dir {data} --shell /usr/sbin/nologin {user}", self.steps
        )
        self.assertIn(f"{VENV}/bin/groundcontrol --data {data} init", self.steps)
        self.assertIn(f"chown -R {user}:{last(unit, 'Group')} {data}", self.steps)
        tlsDirectories = {
            str(Path(p).parent) for p in option(argv, "--tls-cert") + option(argv, "--tls-key")
        }
        self.assertEqual(tlsDirectories, {"/etc/groundcontrol"})
        self.assertIn(
            f"install -m 0640 -g {user} server.crt server.key /etc/groundcontrol/", self.steps
        )

    def test_agentFiles(self) -> None:
        """The device's steps write what the unit reads, and a config file the agent accepts."""
        from agent.config import loadConfig

        argv = execStart("tunnel-agent", DEVICE_NAME="kiln7")
        self.assertIn("cp server-key.pub ca.crt /etc/tunnel-agent/", self.steps)
        self.assertEqual(option(argv, "--server-key"), ["/etc/tunnel-agent/server-key.pub"])
        self.assertTrue(
            any("DEVICE_NAME=" in s and "> /etc/default/tunnel-agent" in s for s in self.steps)
        )
        printf = [s for s in self.steps if s.endswith("> /etc/tunnel-agent/agent.toml")]
        self.assertEqual(len(printf), 1)
        with tempfile.TemporaryDirectory() as directory:
            config = Path(directory) / "agent.toml"
            command = printf[0].replace("/etc/tunnel-agent/agent.toml", shlex.quote(str(config)))
            subprocess.run(["sh", "-c", command], check=True)
            loaded = loadConfig(config)
        self.assertEqual(len(loaded.servers), 3)
        self.assertEqual(str(loaded.tlsCA), "/etc/tunnel-agent/ca.crt")

    def test_agentBytecodeAsTheUnitRunsIt(self) -> None:
        """PYTHONOPTIMIZE=2 in the unit; the steps compile with -OO, as its comment says."""
        unit = service("tunnel-agent")
        self.assertIn("PYTHONOPTIMIZE=2", words(unit, "Environment"))
        compile = f"PYTHONNODEBUGRANGES=1 {VENV}/bin/python -OO -m compileall -q {VENV}"
        self.assertIn(compile, self.steps)


class SystemdAnalyzeTests(SynchronousTestCase):
    def test_verify(self) -> None:
        """
        C{systemd-analyze verify} (the venv pointed at this one) reports nothing. Its exit
        status alone is not enough: a directive it cannot parse is reported, "ignoring", with
        status 0.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise self.skipTest(
                "systemd-analyze is not installed (Debian: apt-get install systemd)"
            )
        venv = Path(sys.prefix)
        if not (venv / "bin" / "tunnel-agentd").exists():
            raise self.skipTest(f"no tunnel-agentd in {venv}: the package is not installed there")
        with tempfile.TemporaryDirectory() as directory:
            paths = []
            for unit in sorted(UNITS.glob("*.service")):
                path = Path(directory) / unit.name
                path.write_text(unit.read_text().replace(VENV, str(venv)))
                paths.append(str(path))
            result = subprocess.run(
                [analyze, "verify", "--man=no", *paths], capture_output=True, text=True
            )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))
