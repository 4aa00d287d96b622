"""
Guards on the Conch internals groundcontrol overrides: they fail loudly when a Conch
upgrade renames, rewires or fixes what we override, instead of letting the override
become dead code that silently brings back what it was written against.

L{groundcontrol.sshserver.GroundControlUserAuth} overrides three private errbacks of
Conch's C{SSHUserAuthServer}: C{_ebCheckKey} and C{_ebMaybeBadAuth} (they pass a Failure
on instead of re-raising it) and C{_ebBadAuth} (it answers a pending-cap refusal with a
reason, and drops a refused login's tracebacks). The upstream root cause of the first
two: C{Failure.trap} re-raises the exception through a frame that holds the Failure
(C{trap}'s own C{self}, and the errback's C{reason}); the raised exception's traceback
holds those frames, the frames hold the Failure, the Failure holds the exception: a
reference cycle that only the cyclic collector frees, made twice by every login (the
"none" method tried first, the key query answered with PK_OK) and once more by every
refused one. tests/test_login_garbage.py proves our overrides leave no such cycle; these
tests prove they still override something Conch calls.
"""

from __future__ import annotations

import inspect
from types import TracebackType

from twisted.conch import error
from twisted.conch.ssh import userauth
from twisted.cred.error import UnauthorizedLogin
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.sshserver import GroundControlUserAuth

#: Each private method of Conch's SSHUserAuthServer we override: its parameters (after
#: self), and the Conch method that adds it to the login's Deferred (whose source names it).
OVERRIDES = {
    "_ebCheckKey": (["reason", "packet"], "auth_publickey"),
    "_ebMaybeBadAuth": (["reason"], "ssh_USERAUTH_REQUEST"),
    "_ebBadAuth": (["reason"], "ssh_USERAUTH_REQUEST"),
}

Base = userauth.SSHUserAuthServer


def parameters(method: object) -> list[str]:
    """The names of C{method}'s parameters after C{self}."""
    names = list(inspect.signature(method).parameters)  # type: ignore[arg-type]
    return names[1:]


def framesOf(tb: TracebackType | None) -> list[object]:
    """The local values of every frame in traceback C{tb}."""
    values: list[object] = []
    while tb is not None:
        values.extend(tb.tb_frame.f_locals.values())
        tb = tb.tb_next
    return values


class ConchOverrideTests(SynchronousTestCase):
    """What GroundControlUserAuth overrides is still in Conch, as we expect it."""

    def test_conchStillHasTheMethods(self) -> None:
        """Conch's SSHUserAuthServer itself still defines each method we override, with
        the parameters ours take (a rename would leave ours never called)."""
        for name, (expected, _wiredIn) in OVERRIDES.items():
            self.assertIn(
                name,
                vars(Base),
                f"Conch's SSHUserAuthServer no longer defines {name}: "
                "GroundControlUserAuth's override is dead code (see this module's docstring)",
            )
            self.assertEqual(parameters(vars(Base)[name]), expected, f"Conch's {name}")
            self.assertEqual(parameters(vars(GroundControlUserAuth)[name]), expected, f"our {name}")

    def test_conchStillCallsThem(self) -> None:
        """The Conch method that adds each errback to the login's Deferred still names it."""
        for name, (_expected, wiredIn) in OVERRIDES.items():
            source = inspect.getsource(vars(Base)[wiredIn])
            self.assertIn(
                f"self.{name}",
                source,
                f"Conch's {wiredIn} no longer adds {name}: our override is never called",
            )

    def test_theRootCauseIsStillThere(self) -> None:
        """
        Conch's C{_ebCheckKey} and C{_ebMaybeBadAuth} still re-raise a Failure they do not
        handle with C{Failure.trap}, through frames that hold that Failure: the cycle our
        overrides avoid. If Conch fixes it upstream, this fails: the overrides can go.
        """
        server = Base()
        server.transport = object()  # type: ignore[assignment]  # asserted, never used
        for call in (
            lambda reason: server._ebCheckKey(reason, b"packet"),
            server._ebMaybeBadAuth,
        ):
            reason = Failure(UnauthorizedLogin("not this key"))
            with self.assertRaises(UnauthorizedLogin) as raised:
                call(reason)
            held = framesOf(raised.exception.__traceback__)
            self.assertTrue(any(value is reason for value in held), call)
            raised.exception.__traceback__ = None

    def test_oursPassTheFailureOn(self) -> None:
        """Ours hand an unhandled Failure to the next errback as it is, raising nothing,
        and still do Conch's work for the one they handle."""
        ours = GroundControlUserAuth()
        reason = Failure(UnauthorizedLogin("not this key"))
        self.assertIs(ours._ebCheckKey(reason, b"packet"), reason)
        self.assertIs(ours._ebMaybeBadAuth(reason), reason)
        sent: list[tuple[int, bytes]] = []
        ours.transport = type(  # type: ignore[assignment]
            "Sent", (), {"sendPacket": lambda self, kind, payload: sent.append((kind, payload))}
        )()
        answer = ours._ebCheckKey(Failure(error.ValidPublicKey()), b"packet")
        self.assertEqual(sent, [(userauth.MSG_USERAUTH_PK_OK, b"packet")])
        self.assertTrue(answer.check(error.IgnoreAuthentication))
