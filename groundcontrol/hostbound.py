"""
OpenSSH's host-bound public-key login (C{publickey-hostbound-v00@openssh.com}), accepted.

Since 8.9 OpenSSH's client signs its login to a server that names
C{publickey-hostbound@openssh.com} in its C{SSH2_MSG_EXT_INFO} with the server's host key
inside the signed data (PROTOCOL, 2.5). Its agent needs that for keys added with
destination constraints (C{ssh-add -h bastion -h "bastion>gc"}) when the login is not the
first hop of a forwarded agent: it refuses to sign one that names no host key ("refusing
use of destination-constrained key: no hostkey recorded in signature for forwarded
connection"). So an operator whose agent reached groundcontrol through a bastion (C{ssh -A
bastion}, then C{ssh ctl@gc} there) was refused with such a key; sshd takes it.

The request is a C{publickey} one with the host key after the key: C{bool signed, string
algorithm, string key, string host key [, string signature]}. The host key must be the one
this connection's key exchange used (sshd's rule: a signature for another server is not
ours to take); the signature covers the request as sent, the method name and host key
included. Everything else (the account lookup, the signature check, the refusal and
attempt counting) is C{publickey}'s: the same checker, through the same portal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.conch import interfaces
from twisted.conch.ssh import keys
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.userauth import MSG_USERAUTH_REQUEST
from twisted.cred import credentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

#: The method name in the request, and the RFC 8308 extension that offers it.
HOSTBOUND_METHOD = b"publickey-hostbound-v00@openssh.com"
HOSTBOUND_EXTENSION = (b"publickey-hostbound@openssh.com", b"0")


def hostKeyFormat(keyAlgorithm: bytes) -> bytes:
    """The key format a host key algorithm signs with (an RSA key signs as rsa-sha2-*)."""
    return b"ssh-rsa" if keyAlgorithm.startswith(b"rsa-sha2-") else keyAlgorithm


class HostboundUserAuthMixin:
    """
    For groundcontrol's C{ssh-userauth} service (a Conch C{SSHUserAuthServer}): the
    host-bound method, taken as C{publickey} while "publickey" stays the one method the
    server names (as sshd does; the client knows the other from the extension).
    """

    transport: Any
    portal: Any
    user: bytes
    nextService: bytes
    # Conch's SSHUserAuthServer's (named here for the type checker only):
    _ebCheckKey: Callable[[Any, bytes], Any]
    _wrapMessageWithSKMetadata: Callable[[bytes, bytes, bytes], bytes]

    def tryAuth(self, kind: bytes, user: bytes, data: bytes) -> Any:
        if kind == HOSTBOUND_METHOD:
            return self.authPublickeyHostbound(data)
        return super().tryAuth(kind, user, data)  # type: ignore[misc]

    def authPublickeyHostbound(self, packet: bytes) -> defer.Deferred[Any]:
        """Conch's C{auth_publickey} with the host key checked and signed over."""
        signed = packet[0:1] == b"\x01"
        algorithm, blob, hostKeyBlob, rest = getNS(packet[1:], 3)
        ours = self.transport.factory.publicKeys.get(hostKeyFormat(self.transport.keyAlg))
        if ours is None or hostKeyBlob != ours.blob():
            return defer.fail(UnauthorizedLogin("host-bound login names another host key"))
        try:
            key = keys.Key.fromString(blob)
        except keys.BadKeyError:
            return defer.fail(UnauthorizedLogin("unsupported or malformed key"))
        if not signed:
            login = credentials.SSHPrivateKey(self.user, algorithm, blob, None, None)
            # A "would this key do?" is answered PK_OK with the algorithm and key only.
            return self.portal.login(login, None, interfaces.IConchUser).addErrback(
                self._ebCheckKey, NS(algorithm) + NS(blob)
            )
        signature = getNS(rest)[0]
        data = (
            NS(self.transport.sessionID)
            + bytes((MSG_USERAUTH_REQUEST,))
            + NS(self.user)
            + NS(self.nextService)
            + NS(HOSTBOUND_METHOD)
            + b"\x01"
            + NS(algorithm)
            + NS(blob)
            + NS(hostKeyBlob)
        )
        if key.isSecurityKey():
            try:
                data = self._wrapMessageWithSKMetadata(signature, data, key.application)
            except ValueError:
                return defer.fail(UnauthorizedLogin("invalid security key signature"))
        login = credentials.SSHPrivateKey(self.user, algorithm, blob, data, signature)
        return self.portal.login(login, None, interfaces.IConchUser)
