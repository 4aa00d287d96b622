"""
accesstunnel.handlerfault: whether an exception out of a message handler is the peer's
malformed payload or a bug of ours, told by the innermost of our frames it passed
through and what that frame called. What groundcontrol's steady read does with each (a
failure, or one info line) is tested in tests/test_steady_path.py (MalformedMessageTests).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any, cast

from twisted.conch.ssh import common
from twisted.conch.ssh.transport import SSHTransportBase
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.handlerfault import HandlerFault, classify


def raisedIn(module: str, body: str) -> BaseException:
    """The exception C{body} raises in a function C{handle} of a module named C{module}."""
    return raisedThrough([(module, "handle")], body)


def raisedThrough(calls: list[tuple[str, str]], body: str) -> BaseException:
    """
    The exception C{body} raises in the last of C{calls}, (module, function) pairs each
    calling the next with the packet: the body on line 2 of the last, each call on line 2
    of the others.
    """
    callee: object = None
    for module, function in reversed(calls):
        namespace: dict[str, object] = {"__name__": module, "struct": struct, "callee": callee}
        line = body if callee is None else "return callee(packet)"
        exec(compile(f"def {function}(packet):\n    {line}\n", f"<{module}>", "exec"), namespace)
        callee = namespace[function]
    assert callable(callee)
    return _caught(callee)


def _caught(handler: Callable[[bytes], object]) -> BaseException:
    try:
        handler(b"")
    except Exception as e:
        return e
    raise AssertionError("the handler raised nothing")


class ClassifyTests(SynchronousTestCase):
    """Where an exception was raised decides whose fault it is."""

    def test_typeOrValueErrorInOurModulesIsOurs(self) -> None:
        """A TypeError or ValueError raised in accesstunnel, groundcontrol or agent (a
        call with the wrong arguments, a bad value of ours) is a bug of ours, and the
        fault names the module, function and line."""
        for module in ("accesstunnel.connection", "groundcontrol.relay", "agent.link"):
            for body in ("len(packet, 2)", "int('x')"):
                fault = classify(raisedIn(module, body))
                self.assertEqual(fault, HandlerFault(module, "handle", 2, ours=True), body)

    def test_parseErrorsAreThePeersWherever(self) -> None:
        """struct.error, IndexError and a failed decode are a parse of the peer's bytes,
        even in our own modules."""
        for body in ("struct.unpack('>L', packet)", "packet[0]", "b'\\xff'.decode('ascii')"):
            fault = classify(raisedIn("groundcontrol.relay", body))
            self.assertFalse(fault.ours, body)
            self.assertEqual((fault.module, fault.function), ("groundcontrol.relay", "handle"))

    def test_otherModulesArePeers(self) -> None:
        """A TypeError raised in Conch's own parser (C{ord} of an empty slice, as its
        C{ssh_DEBUG} does on an empty message) with none of our code on the way is the
        peer's malformed payload; so is one in a module merely named like ours."""
        for module in ("twisted.conch.ssh.transport", "agentsmith", "tests.accesstunnel"):
            self.assertFalse(classify(raisedIn(module, "ord(packet[0:1])")).ours, module)

    def test_noTraceback(self) -> None:
        """An exception never raised (no traceback) is taken for the peer's, unplaced."""
        self.assertEqual(classify(TypeError()), HandlerFault("?", "?", 0, ours=False))


class CalledFromOursTests(SynchronousTestCase):
    """
    An exception raised below our code, in what our innermost frame called: Conch's
    dispatch of the peer's message is the peer's payload; anything else we called with
    a value of ours is our bug, placed at our call.
    """

    def test_ourBadValueInConchIsOurs(self) -> None:
        """
        Our handler passing Conch's C{NS} something that is not bytes (a TypeError raised
        in twisted.conch.ssh.common) is a bug of ours, placed at our line that called it:
        the innermost frame alone (Conch's) called it the peer's.
        """
        namespace: dict[str, object] = {"__name__": "groundcontrol.relay", "common": common}
        exec(
            compile("def handle(packet):\n    common.NS(len(packet))\n", "<gc>", "exec"), namespace
        )
        handle = namespace["handle"]
        assert callable(handle)
        fault = classify(_caught(handle))
        self.assertEqual(fault, HandlerFault("groundcontrol.relay", "handle", 2, ours=True))

    def test_ourBadValueInAnyLibraryIsOurs(self) -> None:
        """
        The same for a ValueError out of a library function (a Conch channel's C{write},
        the standard library's C{ipaddress}) our code called: whoever's value it was, our
        code passed it on unchecked (our parsers catch their own ValueError).
        """
        for module, function in (
            ("twisted.conch.ssh.channel", "write"),
            ("ipaddress", "ip_address"),
        ):
            error = raisedThrough([("agent.session", "handle"), (module, function)], "int('x')")
            self.assertEqual(
                classify(error), HandlerFault("agent.session", "handle", 2, ours=True), module
            )

    def test_conchsParserReachedFromOursIsThePeers(self) -> None:
        """
        A TypeError that Conch's message handler raises on the peer's short payload is
        the peer's even when our code called that handler (our C{ssh_KEXINIT} calls
        Conch's through C{super()}; our C{dispatchMessage} calls Conch's, which calls
        C{ssh_DEBUG}): placed where Conch raised it. The innermost of our frames alone
        called it ours.
        """
        for calls in (
            [
                ("accesstunnel.fastpath", "ssh_KEXINIT"),
                ("twisted.conch.ssh.transport", "ssh_KEXINIT"),
            ],
            [
                ("accesstunnel.fastpath", "dispatchMessage"),
                ("twisted.conch.ssh.transport", "dispatchMessage"),
                ("twisted.conch.ssh.transport", "ssh_DEBUG"),
            ],
            [
                ("accesstunnel.connection", "ssh_CHANNEL_OPEN_FAILURE"),
                ("twisted.conch.ssh.connection", "ssh_CHANNEL_OPEN_FAILURE"),
            ],
            [
                ("accesstunnel.fastpath", "dispatchMessage"),
                ("twisted.conch.ssh.service", "packetReceived"),
                ("twisted.conch.ssh.connection", "ssh_CHANNEL_REQUEST"),
            ],
        ):
            module, function = calls[-1]
            fault = classify(raisedThrough(calls, "ord(packet[0:1])"))
            self.assertEqual(fault, HandlerFault(module, function, 2, ours=False), calls)

    def test_conchsRealHandler(self) -> None:
        """
        Conch's real C{ssh_DEBUG}, called from a frame of ours with an empty payload (its
        C{ord} of an empty slice): the peer's, placed in Conch's handler.
        """
        namespace: dict[str, object] = {
            "__name__": "accesstunnel.fastpath",
            "debug": functools.partial(SSHTransportBase.ssh_DEBUG, cast(Any, None)),
        }
        exec(compile("def handle(packet):\n    debug(packet)\n", "<ours>", "exec"), namespace)
        handle = namespace["handle"]
        assert callable(handle)
        error = _caught(handle)
        self.assertIsInstance(error, TypeError)
        fault = classify(error)
        self.assertFalse(fault.ours)
        self.assertEqual(
            (fault.module, fault.function), ("twisted.conch.ssh.transport", "ssh_DEBUG")
        )
