"""
Who is at the door: public-key authentication of operators and agents.

Operators are known by their key alone (the key identifies the account; the
username only says where they want to go). Agents may present any key: a key
the fleet does not know yet makes a pending enrollment request, decided by
the realm once the peer address is known. Either way the signature is checked
here before anything else happens.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

import attrs
from twisted.conch import error
from twisted.conch.ssh import common, keys
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from accesstunnel.keys import fingerprint
from accesstunnel.policy import isPostQuantum
from accesstunnel.timetext import isoTime
from groundcontrol.pki import DeviceCertificate, shouldRenew
from groundcontrol.store import Account, IStore
from groundcontrol.usernames import AgentTarget, Target, parseUsername

#: Signature algorithms refused whatever the key: SHA-1 RSA and DSA (DESIGN.md, "Modern
#: algorithms only"). Conch's key check accepts both, and it verifies with the algorithm
#: named inside the signature, which need not be the one the request names.
WEAK_SIGNATURE_ALGORITHMS = frozenset({b"ssh-rsa", b"ssh-dss"})


def weakSignature(key: keys.Key, algorithm: bytes, signature: bytes | None) -> bool:
    """Whether a login by C{key} signing with C{algorithm} (and C{signature}) is refused."""
    if key.type() == "DSA" or algorithm in WEAK_SIGNATURE_ALGORITHMS:
        return True
    if not signature:
        return False
    try:
        inner, _ = common.getNS(signature)
    except (ValueError, struct.error):
        return True
    return inner in WEAK_SIGNATURE_ALGORITHMS


@attrs.frozen
class OperatorLogin:
    """An operator proved they hold a key of C{account}."""

    account: Account
    target: Target
    keyFingerprint: str


@attrs.frozen
class AgentLogin:
    """An agent proved it holds C{publicKey}; the store decides what it is."""

    publicKey: str
    keyFingerprint: str
    requestedName: str
    #: The fleet certificate its link presented (TLS), verified for this key and device by
    #: the realm; None when it logged in by its enrolled key alone.
    certificate: DeviceCertificate | None = None


def logLinkAccepted(
    log: Logger,
    deviceName: str,
    login: AgentLogin,
    source: str,
    now: float,
    kex: str | None = None,
) -> None:
    """
    Say, in the one line a device's accepted link gets, how it authenticated, with which
    certificate and over which key exchange: what an operator reviewing the fleet (or a
    compromised key) looks for. A key exchange that is not post-quantum (C{curve25519-sha256}:
    an agent from before the hybrid, dfa74d6) says so, so such devices can be found in the log.

    At warn when the certificate is due for renewal (L{shouldRenew}: a third of its life or
    less left): the agent renews over its link as soon as it is, so a link that still comes
    with such a certificate means renewals are failing or the device was away for long, and
    at its expiry it comes back pending.
    """
    kexFields: dict[str, Any] = {}
    kexText = ""
    if kex is not None:
        kexFields = {"kex": kex, "postQuantum": isPostQuantum(kex)}
        kexText = ", key exchange {kex}" + ("" if isPostQuantum(kex) else " (not post-quantum)")
    certificate = login.certificate
    if certificate is None:
        log.info(
            "device {device} connected from {source} by its key {fingerprint} (no certificate)"
            + kexText,
            device=deviceName,
            source=source,
            auth="key",
            fingerprint=login.keyFingerprint,
            **kexFields,
        )
        return
    at = datetime.fromtimestamp(now, UTC)
    fields = {
        "device": deviceName,
        "source": source,
        "auth": "certificate",
        "fingerprint": login.keyFingerprint,
        "certificateSerial": certificate.serialNumber,
        "certificateFingerprint": certificate.certificateFingerprint,
        "certificateSubject": certificate.deviceName,
        "certificateNotAfter": isoTime(certificate.notAfter),
        **kexFields,
    }
    text = (
        "device {device} connected from {source} by certificate {certificateSerial} "
        "(CN={certificateSubject}, SHA-256 {certificateFingerprint}, "
        "valid until {certificateNotAfter})" + kexText
    )
    if not shouldRenew(certificate.notBefore, certificate.notAfter, at):
        log.info(text, **fields)
        return
    daysLeft = (certificate.notAfter - at).total_seconds() / 86400
    log.warn(
        text + ", due for renewal: expires in {daysLeft} days",
        daysLeft=f"{daysLeft:.1f}",
        nearExpiry=True,
        **fields,
    )


@implementer(ICredentialsChecker)
class FleetKeyChecker:
    """Check SSH public-key credentials against the fleet's store."""

    credentialInterfaces = (ISSHPrivateKey,)
    _log = Logger()

    def __init__(self, store: IStore) -> None:
        # Only operators' logins query the store here, while they wait: their calls
        # go ahead of the fleet's queued bookkeeping (IStore.interactive).
        self._store = store.interactive()

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: Any) -> OperatorLogin | AgentLogin:
        try:
            key = keys.Key.fromString(credentials.blob)
        except (keys.BadKeyError, ValueError) as e:
            raise UnauthorizedLogin("unsupported or malformed key") from e
        if weakSignature(key, credentials.algName, credentials.signature):
            raise UnauthorizedLogin("signature algorithm refused: SHA-1 and DSA are not accepted")
        keyFingerprint = fingerprint(key)
        target = parseUsername(credentials.username)

        account = None
        if not isinstance(target, AgentTarget):
            account = await self._store.accountForKey(keyFingerprint)
            if account is None:
                raise UnauthorizedLogin("key not registered to any account")
        if not credentials.signature:
            # The client asks whether this key would do; say yes so it signs.
            raise error.ValidPublicKey()
        try:
            valid = key.verify(credentials.signature, credentials.sigData)
        except Exception as e:
            raise UnauthorizedLogin("signature check failed") from e
        if not valid:
            raise UnauthorizedLogin("bad signature")

        if isinstance(target, AgentTarget):
            return AgentLogin(
                publicKey=key.public().toString("openssh").decode("ascii"),
                keyFingerprint=keyFingerprint,
                requestedName=target.requestedName,
            )
        assert account is not None
        return OperatorLogin(account=account, target=target, keyFingerprint=keyFingerprint)
