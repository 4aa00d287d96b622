"""
``ctl claim CODE``: an account that gives too many wrong pairing codes is refused for a
while, even the right code, on any ssh connection; other accounts are not; time gives the
allowance back. In memory: real agents, the real front door and control shell
(tests.test_enrollment's World), on a Clock.
"""

from __future__ import annotations

from groundcontrol.control.claimguesses import WRONG_CODE_INTERVAL, WRONG_CODES_AT_ONCE
from tests.test_enrollment import EnrollmentTestCase


class ClaimGuessTests(EnrollmentTestCase):
    """mallory guesses; bob is another operator; oven2 shows a pairing code."""

    def setUp(self) -> None:
        super().setUp()
        self.mallory = self.world.operator("mallory")
        self.bob = self.world.operator("bob")
        self.agent = self.world.start("oven2")

    def guess(self, count: int) -> None:
        for i in range(count):
            status, _, err = self.world.ctl(self.mallory, f"claim AAAA-{i:04d}")
            self.assertEqual(status, 1, err)
            self.assertIn("no such claim code", err)

    def claim(self, who: str) -> tuple[int | None, str]:
        key = self.mallory if who == "mallory" else self.bob
        status, _, err = self.world.ctl(key, f"claim {self.agent.status['pairing_code']}")
        return status, err

    def test_wrongCodesUnderTheBoundDoNotBlock(self) -> None:
        """A few mistyped codes, and the right one still claims the device."""
        self.guess(WRONG_CODES_AT_ONCE - 1)
        self.assertEqual(self.claim("mallory"), (0, ""))

    def test_tooManyWrongCodesRefuseEvenTheRightOne(self) -> None:
        """
        Past the bound the right code is refused, saying when to try again, without being
        tried (the device stays unclaimed); another account claims it meanwhile.
        """
        self.guess(WRONG_CODES_AT_ONCE)
        status, err = self.claim("mallory")
        self.assertEqual(
            (status, err), (1, "claim: too many wrong pairing codes; try again in 60 s\n")
        )
        self.assertIsNone(self.world.device("oven2"))
        self.assertEqual(self.claim("bob"), (0, ""))

    def test_timeGivesTheAllowanceBack(self) -> None:
        """One interval after running out, the account may try (and claim) again."""
        self.guess(WRONG_CODES_AT_ONCE)
        self.world.advance(WRONG_CODE_INTERVAL - 1)
        self.assertEqual(self.claim("mallory")[0], 1)
        self.world.advance(1)
        self.assertEqual(self.claim("mallory"), (0, ""))
