"""
What an agent loads: an ssh:// agent imports no transport it does not dial (the device's RSS),
and an agent that does dial tls://, wss:// or tor:// still gets that transport's settings.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from agent.certificatefile import _derItem

ROOT = Path(__file__).resolve().parent.parent

#: Modules an ssh:// agent must not import: each transport's own code and its libraries, and
#: the TOML parser when there is no config file.
LAZY = (
    "accesstunnel.transports.tls",
    "accesstunnel.transports.proxy",
    "accesstunnel.transports.socks",
    "accesstunnel.transports.tunnel",
    "accesstunnel.transports.tlsreasons",
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

    def test_torAgentLoadsSOCKSNotTxtorcon(self) -> None:
        """
        An agent given a tor:// server dials through our SOCKS5 client; txtorcon, which only
        groundcontrol needs (to publish its onion service), stays out of the agent.
        """
        modules = _modulesOfAgent("tor://" + "a" * 56 + ".onion:2222")
        self.assertIn("accesstunnel.transports.socks", modules)
        self.assertFalse(_loaded(modules, "txtorcon"))


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER item (contents shorter than 64 KiB)."""
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    size = 1 if len(content) < 0x100 else 2
    return bytes([tag, 0x80 | size]) + len(content).to_bytes(size, "big") + content


def _pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"


class CertificateLifetimeTests(SynchronousTestCase):
    """The agent reads its certificate's validity from the DER, as cryptography reads it."""

    def certificate(self, notBefore: datetime, notAfter: datetime, version: bool = True) -> bytes:
        """A PEM certificate with that validity (cryptography writes UTCTime before 2050)."""
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from cryptography.x509.oid import NameOID

        key = ed25519.Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiln7")])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(notBefore)
            .not_valid_after(notAfter)
            .sign(key, None)
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        if not version:  # a v1 certificate: the same without the [0] version field
            der = certificate.public_bytes(serialization.Encoding.DER)
            _, start, end = _derItem(der, 0, (0x30,))
            _, tbsStart, tbsEnd = _derItem(der, start, (0x30,))
            versionEnd = _derItem(der, tbsStart, (0xA0,))[2]
            tbs = _tlv(0x30, der[versionEnd:tbsEnd])
            pem = _pem(_tlv(0x30, tbs + der[tbsEnd:end]))
            self.assertEqual(x509.load_pem_x509_certificate(pem).version, x509.Version.v1)
        return pem

    def test_asCryptographyReadsIt(self) -> None:
        """
        certificateLifetime gives the notBefore and notAfter that cryptography.x509 reads, for
        UTCTime (before 2050), GeneralizedTime (from 2050) and a v1 certificate.
        """
        from cryptography import x509

        from agent.enrollment import certificateLifetime

        cases = [
            (datetime(2026, 11, 25, 21, 0, 7, tzinfo=UTC), datetime(2026, 12, 25, tzinfo=UTC)),
            (datetime(1999, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2049, 12, 31, 23, 59, tzinfo=UTC)),
            (datetime(2049, 6, 1, tzinfo=UTC), datetime(2051, 6, 1, 12, 30, tzinfo=UTC)),
        ]
        for notBefore, notAfter in cases:
            for version in (True, False):
                pem = self.certificate(notBefore, notAfter, version)
                certificate = x509.load_pem_x509_certificate(pem)
                expected = (
                    certificate.not_valid_before_utc.timestamp(),
                    certificate.not_valid_after_utc.timestamp(),
                )
                self.assertEqual(certificateLifetime(pem), expected)
                self.assertEqual(expected, (notBefore.timestamp(), notAfter.timestamp()))

    def test_notACertificate(self) -> None:
        """Anything else is a ValueError: no PEM, bad base64, other DER, cut short, bad time."""
        from agent.enrollment import certificateLifetime

        good = self.certificate(datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
        der = base64.b64decode(b"".join(good.splitlines()[1:-1]))
        offset = der.index(b"260101000000Z")

        for bad in [
            b"",
            b"hello",
            good.replace(b"-----END CERTIFICATE-----", b""),
            _pem(b""),
            _pem(der[:60]),
            _pem(b"\x31" + der[1:]),
            _pem(der[:offset] + b"26013A000000Z" + der[offset + 13 :]),
            _pem(der[:offset] + b"2601010000\xff0Z" + der[offset + 13 :]),
            _pem(der[:offset] + b"2601010000000" + der[offset + 13 :]),
        ]:
            with self.assertRaises(ValueError, msg=repr(bad[:80])):
                certificateLifetime(bad)


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
