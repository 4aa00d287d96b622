"""
accesstunnel.handlerfault: whether an exception out of a message handler is the peer's
malformed payload or a bug of ours, told by the innermost frame it was raised in.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.handlerfault import HandlerFault, classify


def raisedIn(module: str, body: str) -> BaseException:
    """The exception C{body} raises in a function C{handle} of a module named C{module}."""
    namespace: dict[str, object] = {"__name__": module, "struct": struct}
    code = compile(f"def handle(packet):\n    {body}\n", f"<{module}>", "exec")
    exec(code, namespace)
    handle = namespace["handle"]
    assert callable(handle)
    return _caught(handle)


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
        C{ssh_DEBUG} does on an empty message) is the peer's malformed payload; so is
        one in a module merely named like ours."""
        for module in ("twisted.conch.ssh.transport", "agentsmith", "tests.accesstunnel"):
            self.assertFalse(classify(raisedIn(module, "ord(packet[0:1])")).ours, module)

    def test_noTraceback(self) -> None:
        """An exception never raised (no traceback) is taken for the peer's, unplaced."""
        self.assertEqual(classify(TypeError()), HandlerFault("?", "?", 0, ours=False))
