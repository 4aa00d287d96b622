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

from twisted.conch.ssh import connection

from tests.test_sessions_audit import AuditBeforeAccessTestCase


class EarlyDeviceDataTests(AuditBeforeAccessTestCase):
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

    def test_earlyStderrAndEOFInOrder(self) -> None:
        """Output, stderr and EOF sent before the splice reach the operator in that order."""
        session = self.fleet.session(self.alice)
        device = self.device[0]
        device.write(b"220 ready\r\n")
        device.writeExtended(connection.EXTENDED_DATA_STDERR, b"warming up\n")
        device.conn.sendEOF(device)
        self.fleet.flush()
        self.assertEqual(session.events, [])
        self.store.release()
        self.fleet.flush()
        self.assertEqual(session.events[:3], [("data", 11), ("stderr", 11), ("eof",)])
        self.assertEqual(bytes(session.output), b"220 ready\r\n")

    def test_earlyBytesHeldWithinTheWindow(self) -> None:
        """
        Kept bytes are not credited back to the device until the operator's side has
        sent them on: what groundcontrol keeps is bounded by the window it gave.
        """
        self.fleet.session(self.alice)
        device = self.device[0]
        window = device.remoteWindowLeft
        device.write(b"x" * (window // 2 + 1))  # past half: a window adjust would be due
        self.fleet.flush()
        self.assertEqual(device.remoteWindowLeft, window - (window // 2 + 1))
        self.store.release()
        self.fleet.flush()
        self.assertEqual(device.remoteWindowLeft, window)
