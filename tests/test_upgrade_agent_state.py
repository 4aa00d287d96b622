"""
The upgrade path of the agent's state directory: files an older agent wrote, read by today's.

C{tests/fixtures/agent-state-f8099d5/} is device dev1's state directory as the agent of
commit f8099d5 left it, in the same run that wrote C{store-schema4-f8099d5.sql} (its private
key is left out). An upgraded agent must carry on from it: same key, same certificate (no new
enrollment or approval), same remembered address. A new agent on the real directory, its key
included, linked as approved over ssh:// and tls:// (session 17, H2); these tests pin what it
reads.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.addresses import Connector
from accesstunnel.keys import fingerprint
from agent.enrollment import CA_FILE, CERTIFICATE_FILE, StatusFile, certificateLifetime
from agent.failover import FailoverEndpoint
from agent.identity import DEVICE_KEY_FILE
from agent.tap import LAST_SERVER_FILE
from groundcontrol.pki import verifyDeviceCertificate

STATE = Path(__file__).parent / "fixtures" / "agent-state-f8099d5"

# dev1 in store-schema4-f8099d5.sql: its key, and the certificate the server recorded.
DEV1 = "SHA256:wHmMVW8XJ70rKR04aEXd2QphRJFo2XibCNlpAWCgYk4"
DEV1_CERTIFICATE = ("51e57529f1313fbfbf341d6165ec9877", 1_795_772_125.0, 1_798_364_425.0)


class _CA:
    """The part of a FleetCA that verifying needs: its certificate (no private key here)."""

    def __init__(self, pem: bytes) -> None:
        self.certificate = x509.load_pem_x509_certificate(pem)


class OldAgentStateTests(SynchronousTestCase):
    def test_certificateKept(self) -> None:
        """
        Today's agent reads the old certificate's lifetime (so it renews it when due, not
        at once), and it is the one the old server recorded for dev1's key.
        """
        pem = (STATE / CERTIFICATE_FILE).read_bytes()
        serial, notBefore, notAfter = DEV1_CERTIFICATE
        self.assertEqual(certificateLifetime(pem), (notBefore, notAfter))
        ca: Any = _CA((STATE / CA_FILE).read_bytes())
        verified = verifyDeviceCertificate(ca, pem, datetime.fromtimestamp(notBefore + 60, UTC))
        self.assertEqual(
            (verified.deviceName, verified.serialNumber, verified.publicKeyFingerprint),
            ("dev1", serial, DEV1),
        )

    def test_keyIsTheEnrolledOne(self) -> None:
        """The device key the old agent made is the one the old server approved."""
        line = (STATE / (DEVICE_KEY_FILE + ".pub")).read_text()
        self.assertEqual(fingerprint(line.strip()), DEV1)

    def test_status(self) -> None:
        """The old agent's status.json reads in today's spelling."""
        status = StatusFile.read(STATE)
        self.assertEqual(
            status,
            {
                "certificate_expires_at": "2026-12-27T09:40:25Z",
                "name": "dev1",
                "pairing_code": None,
                "pairing_code_expires_at": None,
                "state": "approved",
                "updated_at": "2026-11-27T09:40:25Z",
            },
        )

    def test_rememberedAddressFirst(self) -> None:
        """The address the old agent last linked over is tried first by today's."""
        stateDir = Path(self.mktemp())
        stateDir.mkdir()
        shutil.copy(STATE / LAST_SERVER_FILE, stateDir / LAST_SERVER_FILE)
        endpoint: Any = None
        connectors = [
            Connector(endpoint, lambda f: f, "tls://gc.example.com", "tls"),
            Connector(endpoint, lambda f: f, "tcp:127.0.0.1:24711", "tcp"),
        ]
        failover = FailoverEndpoint(Clock(), connectors, stateDir / LAST_SERVER_FILE)
        self.assertEqual(failover.preferred, 1)
