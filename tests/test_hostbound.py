"""
groundcontrol takes OpenSSH's host-bound public-key login (publickey-hostbound-v00@openssh.com)
for its own host key only, with the signature over the request as sent (groundcontrol.hostbound).
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import common, userauth
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.hostbound import HOSTBOUND_METHOD
from groundcontrol.testing import FakeOperator, InMemoryFleet, OperatorConnection, newKey


class _HostboundAuth(userauth.SSHUserAuthClient):
    """
    Logs in once with the host-bound method, as OpenSSH's client does: C{hostKeyBlob} named
    and signed over (C{signedMethod} and C{signedHostKey} in the signed data when given,
    to make a signature for some other request); C{signed} False asks whether the key
    would do instead, and C{pkOk} records the answer.
    """

    def __init__(self, user: bytes, instance: Any, factory: Any) -> None:
        super().__init__(user, instance)
        self.factory = factory
        self.sent = False

    def auth_publickey(self) -> defer.Deferred[bool]:
        if self.sent:
            return defer.succeed(False)
        self.sent = True
        f = self.factory
        key = f.key
        algorithm, blob = key.sshType(), key.public().blob()
        hostKey = f.hostKeyBlob
        head = common.NS(algorithm) + common.NS(blob) + common.NS(hostKey)
        if not f.signed:
            self.askForAuth(HOSTBOUND_METHOD, b"\x00" + head)
            return defer.succeed(True)
        data = (
            common.NS(self.transport.sessionID)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + common.NS(self.user)
            + common.NS(self.instance.name)
            + common.NS(f.signedMethod)
            + b"\x01"
            + common.NS(algorithm)
            + common.NS(blob)
            + common.NS(f.signedHostKey if f.signedHostKey is not None else hostKey)
        )
        self.askForAuth(HOSTBOUND_METHOD, b"\x01" + head + common.NS(key.sign(data)))
        return defer.succeed(True)

    def ssh_USERAUTH_PK_OK(self, packet: bytes) -> None:
        self.factory.pkOk = packet


class _HostboundTransport(FakeOperator.protocol):  # type: ignore[name-defined,misc]
    def connectionSecure(self) -> None:
        if self.service is not None:
            return
        conn = OperatorConnection(self.factory)
        self.requestService(_HostboundAuth(self.factory.username.encode(), conn, self.factory))


class _HostboundOperator(FakeOperator):
    protocol = _HostboundTransport

    def __init__(self, key: Any, hostKeyBlob: bytes, signed: bool = True) -> None:
        super().__init__("alice", key)
        self.hostKeyBlob = hostKeyBlob
        self.signed = signed
        self.signedMethod = HOSTBOUND_METHOD
        self.signedHostKey: bytes | None = None
        self.pkOk: bytes | None = None


class HostboundTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fleet = InMemoryFleet()
        self.key = self.fleet.addOperator("alice", admin=True)
        self.ourHostKey = self.fleet.hostKey.public().blob()

    def test_extensionAdvertised(self) -> None:
        """The EXT_INFO a client gets names publickey-hostbound@openssh.com, version 0."""
        operator = FakeOperator("alice", self.key, hostKey=self.fleet.hostKey)
        pump = self.fleet.connect(operator)
        self.assertEqual(pump.client.peerExtensions.get(b"publickey-hostbound@openssh.com"), b"0")

    def test_loginBoundToOurHostKey(self) -> None:
        """A host-bound login naming groundcontrol's host key, signed over all of it, gets in."""
        operator = _HostboundOperator(self.key, self.ourHostKey)
        self.fleet.connect(operator)
        self.assertIsNotNone(operator.connection)
        self.assertFalse(operator.lost)

    def test_anotherHostKeyRefused(self) -> None:
        """
        A host-bound login naming another server's host key (correctly signed: a login
        made for that server) is refused: such a signature is not groundcontrol's to take.
        """
        otherHostKey = newKey().public().blob()
        operator = _HostboundOperator(self.key, otherHostKey)
        self.fleet.connect(operator)
        self.assertIsNone(operator.connection)

    def test_signatureMustCoverTheHostKey(self) -> None:
        """A signature over another host key than the one named is refused."""
        operator = _HostboundOperator(self.key, self.ourHostKey)
        operator.signedHostKey = newKey().public().blob()
        self.fleet.connect(operator)
        self.assertIsNone(operator.connection)

    def test_signatureMustCoverTheMethod(self) -> None:
        """A plain "publickey" request's signature, sent as a host-bound one, is refused."""
        operator = _HostboundOperator(self.key, self.ourHostKey)
        operator.signedMethod = b"publickey"
        self.fleet.connect(operator)
        self.assertIsNone(operator.connection)

    def test_unknownKeyRefused(self) -> None:
        """A key no account has is refused, host-bound or not."""
        operator = _HostboundOperator(newKey(), self.ourHostKey)
        self.fleet.connect(operator)
        self.assertIsNone(operator.connection)

    def test_queryAnsweredWithAlgorithmAndKey(self) -> None:
        """
        "Would this key do?" in the host-bound form is answered PK_OK with the algorithm
        and the key only (RFC 4252 7), as OpenSSH's client parses it.
        """
        operator = _HostboundOperator(self.key, self.ourHostKey, signed=False)
        self.fleet.connect(operator)
        self.assertEqual(
            operator.pkOk,
            common.NS(self.key.sshType()) + common.NS(self.key.public().blob()),
        )
