"""accesstunnel.reasontext: an error's words fit to be followed by more."""

from __future__ import annotations

from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from accesstunnel.reasontext import reasonText


class ReasonTextTests(SynchronousTestCase):
    def test_closingPeriodDropped(self) -> None:
        """Twisted's closing period goes, so '; stopping' can follow it."""
        self.assertEqual(
            reasonText(error.ConnectionRefusedError("111: Connection refused")),
            "Connection was refused by other side: 111: Connection refused",
        )

    def test_systemWords(self) -> None:
        """An OSError with the system's words gives those, without the errno."""
        self.assertEqual(
            reasonText(OSError(98, "Address already in use")), "Address already in use"
        )

    def test_noTextGivesTheType(self) -> None:
        """An error with no words is named by its type."""
        self.assertEqual(reasonText(ValueError()), "ValueError")
        self.assertEqual(reasonText(ValueError("...")), "ValueError")
