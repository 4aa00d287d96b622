"""
Fuzzing the parsers that read what peers send (hypothesis; issue 8): the username parser,
the enrollment messages (groundcontrol's decodeRequest and handle, the agent's
decodeReply) and the forwarding payload parsers. Each property says what the parser may
do with hostile input: return a value of its documented shape, or refuse in its
documented way; never raise anything else, never log a failure.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.conch.error import ConchError
from twisted.conch.ssh import common
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.names import isValidDeviceName
from agent.enrollment import decodeReply
from groundcontrol import enrollment, forwarding
from groundcontrol.auth import AgentLogin
from groundcontrol.store import StoreError
from groundcontrol.testing import newKey, openMemoryStore, publicLine
from groundcontrol.usernames import (
    AgentTarget,
    ControlTarget,
    DeviceTarget,
    MalformedTarget,
    parseUsername,
)

FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@contextmanager
def noFailuresLogged() -> Iterator[None]:
    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, [e["log_failure"].getTraceback() for e in failures]


def _noControl(text: str) -> bool:
    return all(c.isprintable() for c in text)


# -- usernames ------------------------------------------------------------------------

_usernames = st.one_of(
    st.binary(max_size=100),
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.tuples(
        st.sampled_from([b"dev_", b"agent+", b"ctl", b"DEV_", b""]), st.binary(max_size=70)
    ).map(b"".join),
)


class UsernameFuzz(SynchronousTestCase):
    @FUZZ
    @given(_usernames)
    @example(b"dev_\x1b]52;c;aGk=\x07")
    @example(b"dev_" + b"a" * 64)
    @example(b"dev_-x")
    @example(b"\xff\xfe")
    def test_classifies_everything(self, raw: bytes) -> None:
        """
        Any username is classified without raising; a device or agent target always has
        a valid name; a refusal's reason is printable (safe to show on any terminal).
        """
        target = parseUsername(raw)
        if isinstance(target, DeviceTarget | AgentTarget):
            name = target.name if isinstance(target, DeviceTarget) else target.requestedName
            self.assertTrue(isValidDeviceName(name))
            self.assertIn(name.encode(), raw)
        elif isinstance(target, ControlTarget):
            self.assertEqual(raw, b"ctl")
        else:
            self.assertIsInstance(target, MalformedTarget)
            self.assertTrue(_noControl(target.reason), target.reason)
            self.assertLess(len(target.reason), 400)


# -- enrollment messages --------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_requestObjects = st.fixed_dictionaries(
    {},
    optional={
        "serial": _json,
        "version": _json,
        "transport": _json,
        "token": _json,
        "code": _json,
        "name": _json,
    },
)
_bodies = st.one_of(
    st.binary(max_size=200),
    _json.map(lambda v: common.NS(json.dumps(v).encode())),
    _requestObjects.map(lambda v: common.NS(json.dumps(v).encode())),
    st.integers(1, 5_000).map(lambda n: common.NS(b"[" * n + b"]" * n)),
    st.text(max_size=30).map(
        lambda t: common.NS(json.dumps({"token": t, "code": t, "serial": t}).encode())
    ),
)


class _Link:
    def __init__(self) -> None:
        self.details: dict[str, Any] = {}


class _Avatar:
    """What AgentRequests needs of an agent's avatar."""

    def __init__(self, login: AgentLogin, deviceName: str | None) -> None:
        self.login = login
        self.deviceName = deviceName
        self.pendingKind = None if deviceName else "new"
        self.link = _Link()
        self.source = "192.0.2.1:5000"
        self.promoted: list[str] = []

    def promote(self, name: str, notify: bool = True) -> None:
        self.deviceName = name
        self.promoted.append(name)


KEY = newKey()
LINE = publicLine(KEY)


def _login(requestedName: str = "kiln7") -> AgentLogin:
    from accesstunnel.keys import fingerprint

    return AgentLogin(LINE, fingerprint(LINE), requestedName)


class EnrollmentFuzz(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = openMemoryStore()
        login = _login()
        self.successResultOf(
            self.store.recordContact(
                "kiln7", LINE, login.keyFingerprint, None, "test", self.clock.seconds()
            )
        )
        self.requests = enrollment.AgentRequests(self.store, self.clock, None)

    @FUZZ
    @given(_bodies)
    @example(common.NS(b"[" * 100_000))
    @example(common.NS(b'{"a":' * 50_000))
    def test_decodeRequest(self, body: bytes) -> None:
        """groundcontrol reads any request body as a dict (empty if it is not one)."""
        self.assertIsInstance(enrollment.decodeRequest(body), dict)

    @FUZZ
    @given(_bodies)
    @example(common.NS(b"[" * 100_000))
    def test_decodeReply(self, body: bytes) -> None:
        """The agent reads any reply as a dict, or refuses it with ValueError."""
        with contextlib.suppress(ValueError):
            self.assertIsInstance(decodeReply(body), dict)

    @FUZZ
    @given(
        st.sampled_from(
            [
                enrollment.HELLO,
                enrollment.ENROLL,
                enrollment.CLAIM_CODE,
                enrollment.CERTIFICATE,
                b"keepalive@openssh.com",
            ]
        ),
        _bodies,
        st.booleans(),
    )
    @example(enrollment.ENROLL, common.NS(b'{"token": "\\ud800"}'), False)
    @example(enrollment.CLAIM_CODE, common.NS(b'{"code": "\\ud800\\ud800abcdefgh"}'), False)
    @example(enrollment.HELLO, common.NS(b'{"serial": "\\ud800x"}'), False)
    def test_handle(self, requestType: bytes, body: bytes, approved: bool) -> None:
        """
        Any request with any body gets an answer (0, or 1 with a JSON reply carrying ok),
        or a StoreError refusal; it never raises anything else nor logs a failure.
        """
        avatar = _Avatar(_login(), "kiln7" if approved else None)
        with noFailuresLogged():
            d = defer.Deferred.fromCoroutine(self.requests.handle(avatar, requestType, body))
            results: list[Any] = []
            d.addBoth(results.append)
            (result,) = results
            if isinstance(result, Failure):
                result.trap(StoreError)
                return
            if result == 0:
                return
            ok, reply = result
            self.assertEqual(ok, 1)
            self.assertIn("ok", json.loads(common.getNS(reply)[0]))


# -- forwarding payloads --------------------------------------------------------------


class ForwardingFuzz(SynchronousTestCase):
    @FUZZ
    @given(st.binary(max_size=100))
    @example(b"\xff\xff\xff\xff")
    def test_parsers(self, data: bytes) -> None:
        """Each payload parser returns its fields or raises MalformedPayload, nothing else."""
        for parse in (
            forwarding.parseForwardRequest,
            forwarding.parseForwardedChannel,
            forwarding.splitSessionId,
        ):
            with contextlib.suppress(forwarding.MalformedPayload):
                parse(data)

    @FUZZ
    @given(
        st.one_of(
            st.sampled_from([forwarding.FORWARDED_TCPIP, forwarding.AUTH_AGENT, forwarding.X11]),
            st.binary(max_size=30),
        ),
        st.binary(max_size=100),
    )
    def test_channelsFromDevice(self, channelType: bytes, data: bytes) -> None:
        """
        A device opening any channel with any payload, with no operator asking for it,
        is refused with a ConchError whose text is printable; nothing else happens.
        """

        class Conn:
            channelsToRemoteChannel: dict[Any, int] = {}

        class Link:
            deviceName = "kiln7"
            conn = Conn()
            remoteForwards = forwarding.RemoteForwards()

        d = defer.Deferred.fromCoroutine(
            forwarding.relayFromDevice(Link(), channelType, 65536, 32768, data)
        )
        failure = self.failureResultOf(d, ConchError)
        text = failure.value.args[0]
        self.assertTrue(_noControl(text if isinstance(text, str) else text.decode()), text)


# -- the agent's channel requests ------------------------------------------------------


def _fakeSpawn(*args: Any, **kwargs: Any) -> Any:
    raise OSError("no children in the fuzzer")


_SESSION_REQUESTS = [
    b"pty-req",
    b"env",
    b"window-change",
    b"signal",
    b"break",
    b"auth-agent-req@openssh.com",
    b"x11-req",
    b"exec",
    b"subsystem",
    b"no-such-request",
]


class AgentSessionFuzz(SynchronousTestCase):
    @FUZZ
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(_SESSION_REQUESTS),
                st.one_of(
                    st.binary(max_size=120),
                    st.tuples(st.binary(max_size=20), st.binary(max_size=20)).map(
                        lambda t: common.NS(t[0]) + common.NS(t[1])
                    ),
                    st.tuples(
                        st.binary(max_size=12),
                        st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4),
                        st.binary(max_size=40),
                    ).map(
                        lambda t: (
                            common.NS(t[0])
                            + b"".join(n.to_bytes(4, "big") for n in t[1])
                            + common.NS(t[2])
                        )
                    ),
                ),
            ),
            min_size=1,
            max_size=6,
        )
    )
    @example([(b"pty-req", common.NS(b"xterm") + b"\xff" * 16 + common.NS(b"\x01\0\0"))])
    @example([(b"window-change", b"\xff" * 16)])
    def test_requests(self, requests: list[tuple[bytes, bytes]]) -> None:
        """
        Any channel request with any payload is answered True or False (a malformed one
        refused), never an exception and never a logged failure; ptys it opened are
        closed with the channel.
        """
        from agent.session import SessionChannel, SessionEnvironment

        channel = SessionChannel(
            SessionEnvironment(),
            Clock(),
            spawn=_fakeSpawn,
            remoteWindow=65536,
            remoteMaxPacket=32768,
        )
        try:
            with noFailuresLogged():
                for requestType, data in requests:
                    if requestType in (b"exec", b"subsystem"):
                        continue  # they start a child: covered by the session tests
                    answer = channel.requestReceivedWithReply(requestType, data, True)
                    self.assertIn(answer, (True, False))
        finally:
            terminal = channel._terminal
            if terminal is not None:
                terminal.close()
