"""
What an agent loads: an ssh:// agent imports no transport it does not dial (the device's RSS),
and an agent that does dial tls://, wss:// or tor:// still gets that transport's settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent

#: Modules an ssh:// agent must not import: each transport's own code and its libraries, and
#: the TOML parser when there is no config file.
LAZY = (
    "accesstunnel.transports.tls",
    "accesstunnel.transports.proxy",
    "accesstunnel.transports.tor",
    "accesstunnel.transports.websocket",
    "txtorcon",
    "autobahn",
    "tomllib",
)

#: Assemble a whole agent the way ``twistd tunnel-agent`` does (options, buildService),
#: on a memory reactor, and print the modules it has loaded.
_ASSEMBLE = """
import json, sys
from twisted.internet.testing import MemoryReactorClock
from agent.tap import Options, buildService
options = Options()
options.parseOptions(sys.argv[1:])
buildService(options.toConfig(), MemoryReactorClock())
print(json.dumps(sorted(sys.modules)))
"""


def _modulesOfAgent(*servers: str) -> set[str]:
    with tempfile.TemporaryDirectory() as state:
        args = ["--state", state, "--name", "kiln7", "--server-key", "SHA256:" + "A" * 43]
        for server in servers:
            args += ["--server", server]
        out = subprocess.run(
            [sys.executable, "-c", _ASSEMBLE, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return set(json.loads(out))


def _loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


class ImportSetTests(SynchronousTestCase):
    def test_sshAgentLoadsNoOtherTransport(self) -> None:
        """
        An agent assembled for ssh:// (no config file) has not imported the TLS, proxy, tor or
        WebSocket transports, txtorcon, autobahn or the TOML parser.
        """
        modules = _modulesOfAgent("ssh://127.0.0.1:2222")
        self.assertIn("agent.link", modules)
        self.assertEqual([m for m in LAZY if _loaded(modules, m)], [])

    def test_tlsAgentLoadsTLS(self) -> None:
        """The same agent given a tls:// server imports the TLS transport (and only that)."""
        modules = _modulesOfAgent("ssh://127.0.0.1:2222", "tls://127.0.0.1:2443")
        self.assertIn("accesstunnel.transports.tls", modules)
        self.assertNotIn("accesstunnel.transports.proxy", modules)
        self.assertFalse(_loaded(modules, "autobahn"))


class ConnectorSettingsTests(SynchronousTestCase):
    """The settings a transport needs still reach its connector when it is imported late."""

    def setUp(self) -> None:
        from agent.identity import ServerKeyPin
        from agent.tap import AgentConfig

        self.state = Path(self.mktemp())
        self.config = AgentConfig(
            stateDir=self.state,
            servers=(),
            name="kiln7",
            serverKey=ServerKeyPin("SHA256:" + "A" * 43),
            proxy="http://proxy.example:3128",
        )

    def connectors(self, *servers: str) -> list:
        import attrs

        from agent.tap import _connectors

        config = attrs.evolve(self.config, servers=servers)
        return _connectors(MemoryReactorClock(), config, None)

    def test_tlsSettings(self) -> None:
        """A tls:// connector presents the device certificate and key from the state dir."""
        from agent.enrollment import CERTIFICATE_FILE
        from agent.identity import DEVICE_KEY_FILE

        ssh, tls = self.connectors("ssh://gc.example", "tls://gc.example")
        self.assertEqual((ssh.transport, tls.transport), ("ssh", "tls"))
        settings = tls.endpoint.settings
        self.assertEqual(settings.clientCertificateFile, self.state / CERTIFICATE_FILE)
        self.assertEqual(settings.clientKeyFile, self.state / DEVICE_KEY_FILE)

    def test_wssGoesThroughTheProxy(self) -> None:
        """A wss:// connector dials through --proxy and wraps TLS with the device settings."""
        from accesstunnel.transports.proxy import HTTPConnectEndpoint

        (wss,) = self.connectors("wss://gc.example/tunnel")
        self.assertIn("via proxy proxy.example:3128", wss.description)
        self.assertIsInstance(wss.endpoint.inner, HTTPConnectEndpoint)
        self.assertIsNotNone(wss.endpoint.settings)
