"""
Channel output during a key re-exchange on the agent link, in memory: the real
groundcontrol front door and the real agent link over iosim, on a Clock.

While a key exchange runs, Conch's transport holds every channel message in
C{_blockedByKeyExchange} until the new keys are in use, and nothing bounds that
list. The link's socket is empty then, so before L{accesstunnel.linkflow.LinkFlow}
held the channels during the exchange, every channel kept sending until its window
was spent: with 100 bulk sessions, 100 x 2 MiB sat in that list at each 1 GiB
rekey (bench/RESULTS.md, "100 sessions (session 5)": the agent's RSS peaked at
364-430 MiB, against 102 with the link held during the exchange).
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import connection
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.rekey import RekeyLimit
from groundcontrol.testing import FakeOperator, InMemoryFleet, OperatorSession
from tests import test_rekey  # its TestCase is not imported by name: pytest would run it again
from tests.test_rekey import NEVER, MiB

SESSIONS = 4
STREAM = 8 * MiB  # what test_rekey's "stream" command sends


def blockedDataBytes(sshTransport: Any) -> int:
    """Channel data bytes Conch holds back until the key exchange ends."""
    blocked = sshTransport._blockedByKeyExchange or ()
    return sum(len(payload) for kind, payload in blocked if kind == connection.MSG_CHANNEL_DATA)


class KeyExchangeHoldsChannelsTests(SynchronousTestCase):
    """
    Device kiln7 on the real agent link, rekeying every 2 MiB, and operator alice
    streaming from SESSIONS sessions at once.
    """

    # Set by test_rekey's connect.
    fleet: InMemoryFleet
    operator: FakeOperator
    agentSide: Any

    def setUp(self) -> None:
        # test_rekey's fleet: the real agent link and groundcontrol over iosim.
        agent = RekeyLimit(bytes=2 * MiB, seconds=0)
        test_rekey.LinkRekeyTests.connect(self, server=NEVER, agent=agent)  # type: ignore[arg-type]
        # The most channel data the agent's transport held back during a key exchange.
        self.peakBlocked = 0
        original = self.agentSide.sendPacket

        def sendPacket(messageType: int, payload: bytes) -> None:
            original(messageType, payload)
            self.peakBlocked = max(self.peakBlocked, blockedDataBytes(self.agentSide))

        self.agentSide.sendPacket = sendPacket

    def streamAll(self) -> list[OperatorSession]:
        """Start SESSIONS sessions streaming STREAM bytes each and run them to their end."""
        sessions = []
        for _ in range(SESSIONS):
            session = self.fleet.session(self.operator)
            self.assertTrue(session.isOpen, session.openFailure)
            session.releaseWindow()
            sessions.append(session)
        results = [session.exec(b"stream") for session in sessions]
        self.fleet.flush()
        for d in results:
            self.successResultOf(d)  # type: ignore[arg-type]
        return sessions

    def test_channelsWaitDuringKeyExchange(self) -> None:
        """
        While the agent's transport waits for new keys, its channels keep their
        output in their own queues (bounded by their high water and pausing
        their sources): Conch's held-back list never holds more than one link
        packet of channel data, where it used to take every channel's window.
        """
        self.streamAll()
        self.assertGreater(self.agentSide.keyExchanges, SESSIONS * STREAM // (4 * MiB))
        self.assertLessEqual(self.peakBlocked, 64 * 1024 + 64)

    def test_channelsResumeAfterKeyExchange(self) -> None:
        """
        Once the new keys are in use, the channels that stopped for the key
        exchange send again, even though the link's socket never filled up:
        every session delivers all of its output, exit status, EOF and close.
        """
        sessions = self.streamAll()
        self.assertGreater(self.agentSide.keyExchanges, 1)
        for session in sessions:
            self.assertEqual(len(session.output), STREAM)
            self.assertEqual(session.events[-3:], [("exit-status", 0), ("eof",), ("close",)])
        self.assertLessEqual(self.peakBlocked, 64 * 1024 + 64)
