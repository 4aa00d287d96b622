"""
The agent's lines about each link: how it came up, how it ended, and when it is retried.

The agent writes info and up by default, and Conch says what a key exchange chose
only at debug. An operator debugging a device in the field needs, per link, where
it dialled and over what (a proxy included), how it authenticated (its key, and the
fleet certificate it presented over TLS), what the key exchange chose (strict kex
too) and how long the link took from the dial; and when it ends, how long it lasted
and why. One line each, written once per link (never per session), so a device's
log shows its links at a glance and stays small on its storage.

Between links, the failover endpoint says why each address could not be reached, and
L{AnnouncedRetries} when the next try is and where it starts, in place of Twisted's
ClientService line, which names the endpoint by its repr (C{<agent.failover.FailoverEndpoint
object at 0x...>}) and the delay to sixteen digits (accesstunnel.logfilter writes that one at
debug only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from accesstunnel.durations import spokenDuration
from accesstunnel.fastpath import AEAD_CIPHERS
from accesstunnel.keys import certificateSerial
from accesstunnel.layers import transportLayers
from accesstunnel.timetext import isoTime

if TYPE_CHECKING:
    from agent.failover import FailoverEndpoint

#: The line a link that came up gets (L{logLinkUp}). It starts as the failover
#: endpoint's line did ("link up over TRANSPORT via ADDRESS"), so what looked for that
#: still finds it.
LINK_UP = (
    "link up over {transport} via {address} in {seconds:.2f} s as {name}: "
    "key {keyFingerprint}, {certificate}; "
    "kex {kex}, host key {hostKey}, strict kex {strictKex}; "
    "out {cipherOut} MAC {macOut}, in {cipherIn} MAC {macIn}, compression {compression}"
)

#: The line a link that was up gets when it ends (L{logLinkDown}).
LINK_DOWN = "link over {transport} via {address} down after {lasted}: {why}"

#: Why a link ended when the agent itself is stopping (its link service stopped).
AGENT_STOPPING = "the agent is stopping"

#: The line before each retry of the link (L{AnnouncedRetries}).
LINK_RETRY = "link retry {attempt} in {delay:.1f} s, trying {address} first"


def _name(value: bytes | str | None) -> str:
    if value is None:
        return "none"
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def tlsConnection(transport: Any) -> Any:
    """
    The pyOpenSSL connection under C{transport} (a link over tls:// or wss://), or
    C{None}: the first layer down the chain whose handle is a TLS connection.
    """
    for layer in transportLayers(transport):
        getHandle = getattr(layer, "getHandle", None)
        handle = getHandle() if getHandle is not None else None
        if hasattr(handle, "get_certificate"):
            return handle
    return None


def certificateText(connection: Any) -> tuple[str, dict[str, Any]]:
    """
    What the link said with TLS: the device certificate it presented (its serial, as
    groundcontrol logs it, and expiry) and the TLS version; and the same as fields.
    """
    if connection is None:
        return "no TLS, no device certificate", {"tls": None, "certificateSerial": None}
    version = connection.get_protocol_version_name()
    own = connection.get_certificate()
    if own is None:
        return f"{version} without a device certificate", {
            "tls": version,
            "certificateSerial": None,
        }
    certificate = own.to_cryptography()
    serial = certificateSerial(certificate.serial_number)
    notAfter = isoTime(certificate.not_valid_after_utc)
    return f"{version} with device certificate {serial} (valid until {notAfter})", {
        "tls": version,
        "certificateSerial": serial,
        "certificateNotAfter": notAfter,
    }


def negotiated(sshTransport: Any) -> dict[str, Any]:
    """
    What the key exchange chose, in OpenSSH's words: an AEAD cipher's MAC is
    C{<implicit>} (the MAC name negotiated beside it is not used).
    """
    keys = sshTransport.currentEncryptions

    def mac(cipher: bytes, negotiatedMAC: bytes) -> str:
        return "<implicit>" if cipher in AEAD_CIPHERS else _name(negotiatedMAC)

    out, incoming = sshTransport.outgoingCompressionType, sshTransport.incomingCompressionType
    return {
        "kex": _name(sshTransport.kexAlg),
        "hostKey": _name(sshTransport.keyAlg),
        "strictKex": "on" if getattr(sshTransport, "strictKex", False) else "off",
        "cipherOut": _name(keys.outCipType),
        "macOut": mac(keys.outCipType, keys.outMACType),
        "cipherIn": _name(keys.inCipType),
        "macIn": mac(keys.inCipType, keys.inMACType),
        "compression": _name(out) if out == incoming else f"{_name(out)} out, {_name(incoming)} in",
    }


def logLinkUp(
    log: Logger,
    sshTransport: Any,
    *,
    transport: str,
    address: str,
    seconds: float,
    name: str,
    keyFingerprint: str,
) -> None:
    """
    Write L{LINK_UP} for C{sshTransport}, just authenticated: C{seconds} since the
    dial of C{address}, the device's own name and its key's fingerprint.
    """
    certificate, tlsFields = certificateText(tlsConnection(sshTransport.transport))
    log.info(
        LINK_UP,
        transport=transport,
        address=address,
        seconds=seconds,
        name=name,
        keyFingerprint=keyFingerprint,
        certificate=certificate,
        **tlsFields,
        **negotiated(sshTransport),
    )


def endReason(said: str | None, reason: Failure | None, stopping: bool) -> str:
    """
    Why a link ended: what the link noted when it happened (groundcontrol's
    disconnect message, silence, our own disconnect), else the agent's stop, else
    what the connection's loss says.
    """
    if said is not None:
        return said
    if stopping:
        return AGENT_STOPPING
    if reason is None or reason.check(error.ConnectionDone):
        return "groundcontrol closed the connection"
    return reason.getErrorMessage() or reason.type.__name__


def logLinkDown(
    log: Logger,
    *,
    transport: str,
    address: str,
    lasted: float,
    why: str,
) -> None:
    """
    Write L{LINK_DOWN}: at info when the agent is stopping, at warn for a link
    lost from under it.
    """
    level = LogLevel.info if why == AGENT_STOPPING else LogLevel.warn
    log.emit(
        level,
        LINK_DOWN,
        transport=transport,
        address=address,
        lasted=spokenDuration(lasted),
        lastedSeconds=lasted,
        why=why,
    )


class AnnouncedRetries:
    """
    The link service's retry policy, saying each retry in L{LINK_RETRY}: the attempt it
    is (what the backoff counts), the delay, and the address tried first, with the whole
    list in the event's C{addresses}.

    ClientService asks its policy for the delay exactly once per retry it schedules,
    after a failed round of addresses and after a link that was up is lost, so the line
    comes where Twisted's own "Scheduling retry" would.
    """

    log = Logger()

    def __init__(self, policy: Callable[[int], float], endpoint: FailoverEndpoint) -> None:
        self._policy = policy
        self._endpoint = endpoint

    def __call__(self, attempt: int) -> float:
        delay = self._policy(attempt)
        addresses = [c.description for c in self._endpoint.connectors]
        self.log.info(
            LINK_RETRY,
            attempt=attempt,
            delay=delay,
            address=addresses[self._endpoint.preferred],
            addresses=addresses,
        )
        return delay
