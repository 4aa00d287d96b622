"""
Bytes a device sends before groundcontrol has joined its channel to the operator's.

Since 22c9860 (audit before access) a relayed channel is open on the device while
C{session.started} is written, and only then confirmed to the operator and spliced. What the
device sends in that time reaches C{RelayChannel.dataReceived} with no peer, which drops it
(keeping the window open). A service that speaks first loses its first bytes: an SSH server's
version line, an SMTP or FTP greeting, a database's handshake. Found by H2 (session 17)
with the real programs: C{ssh -L} to a server that sends a banner on connect delivered it to
1-4 of 10 connections (groundcontrol of 22c9860 or later, any agent); 10 of 10 before.
"""

from __future__ import annotations

import pytest

from tests.test_sessions_audit import AuditBeforeAccessTestCase


class EarlyDeviceDataTests(AuditBeforeAccessTestCase):
    @pytest.mark.xfail(strict=True, reason="dropped before the splice (22c9860)")
    def test_deviceSpeaksFirst(self) -> None:
        """
        The device's first bytes, sent while session.started is written, reach the
        operator once the channel is confirmed.
        """
        session = self.fleet.session(self.alice)
        self.assertEqual(len(self.device), 1)  # the device's side is open
        self.device[0].write(b"SSH-2.0-banner\r\n")
        self.fleet.flush()
        self.store.release()
        self.fleet.flush()
        self.assertTrue(session.isOpen)
        self.assertEqual(bytes(session.output), b"SSH-2.0-banner\r\n")
