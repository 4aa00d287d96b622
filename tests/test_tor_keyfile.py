"""
groundcontrol's onion service key on a full disk (in memory: txtorcon.connect faked, the
state-file writer's C{os} on a disk with no room). A service published with a key that
could not be stored would get another address at the next start; it is taken back from
tor, the failure is said once, and publishing is tried again until the key is stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, error
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel import statefiles
from accesstunnel.transports.tor import OnionServerEndpoint, TorSettings
from tests.test_agent_disk import NO_SPACE, FullDisk
from tests.test_tor_startup import answeringTor
from tests.test_transports_walk import _FakeTor


class OnionKeyOnAFullDiskTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.answers = answeringTor(self)
        self.reactor = MemoryReactorClock()
        self.keyFile = Path(self.mktemp()) / "onion_key"
        self.disk = FullDisk(room=0)
        self.patch(statefiles, "os", self.disk)

    def test_serviceTakenBackUntilTheKeyIsStored(self) -> None:
        """
        tor is down at start; when it answers, the service's key cannot be stored: the
        service is removed from tor (no address that changes at the next start, no pile of
        services on retries), one line says why, and the next try, with room, publishes
        it and stores the key.
        """
        self.answers.append(defer.fail(error.ConnectionRefusedError("111: Connection refused")))
        endpoint = OnionServerEndpoint(self.reactor, 2222, TorSettings(onionKeyFile=self.keyFile))
        with capturedLogs() as events:
            port: Any = self.successResultOf(endpoint.listen(Factory()))
            first = _FakeTor()
            self.answers.append(defer.succeed(first))
            self.reactor.advance(1)
            assert first.onion is not None
            self.assertTrue(first.onion.removed)
            self.assertIsNone(port.getHost().host)
            self.assertEqual(port.notReadyBecause, NO_SPACE)
            self.assertEqual(sorted(p.name for p in self.keyFile.parent.iterdir()), [])
            self.disk.room = None
            second = _FakeTor()
            self.answers.append(defer.succeed(second))
            self.reactor.advance(2)
        self.assertEqual(port.getHost().host, "abcdef.onion")
        assert second.onion is not None
        self.assertFalse(second.onion.removed)
        self.assertEqual(self.keyFile.read_text(), "ED25519-V3:KEY\n")
        lines = [formatEvent(e) for e in events if "cannot publish" in formatEvent(e)]
        self.assertEqual(
            lines, [f"cannot publish the onion service yet ({NO_SPACE}); trying again"]
        )

    def test_atStartTheListenerFails(self) -> None:
        """
        tor answers at start and the key cannot be stored: the listener fails with the
        disk's error (groundcontrol stops, as for any listener), the service taken back.
        """
        tor = _FakeTor()
        self.answers.append(defer.succeed(tor))
        endpoint = OnionServerEndpoint(self.reactor, 2222, TorSettings(onionKeyFile=self.keyFile))
        failure = self.failureResultOf(endpoint.listen(Factory()), OSError)
        self.assertEqual(failure.value.strerror, NO_SPACE)
        assert tor.onion is not None
        self.assertTrue(tor.onion.removed)
        self.assertFalse(self.keyFile.parent.exists() and any(self.keyFile.parent.iterdir()))
