"""Session ids: one read of the system's random generator per id, five bits per letter."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from groundcontrol import sessions
from groundcontrol.sessions import ID_LENGTH, isSessionId, newSessionId


class CountingSecrets:
    """C{secrets} with token_bytes counted and fixed, choice forbidden."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[int] = []

    def token_bytes(self, n: int) -> bytes:
        self.reads.append(n)
        return self.data[:n]

    def choice(self, seq: Any) -> Any:
        raise AssertionError("a draw per letter")


class SessionIdTests(SynchronousTestCase):
    def test_oneReadPerId(self) -> None:
        """An id comes from one read of ID_LENGTH random bytes: each low 5 bits, a letter."""
        fake = CountingSecrets(bytes([0, 31, 32, 255, 1, 2, 3, 4, 5, 6]))
        self.patch(sessions, "secrets", fake)
        sessionId = newSessionId()
        self.assertEqual(fake.reads, [ID_LENGTH])
        self.assertEqual(sessionId, "a9a9bcdefg")
        self.assertTrue(isSessionId(sessionId))

    def test_everyLetterReachable(self) -> None:
        """All 32 letters of the alphabet come out, none other."""
        letters = set("".join(newSessionId() for _ in range(400)))
        self.assertEqual(letters, set("abcdefghijkmnpqrstuvwxyz23456789"))
