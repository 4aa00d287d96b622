"""
The client's terminal modes on the device's pty (agent._process.applyModes), as
sshd sets them: a special character the client's terminal has switched off arrives
as 255 and is switched off on the pty too.
"""

from __future__ import annotations

import os
import struct
import termios
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.trial.unittest import SynchronousTestCase

from agent._process import applyModes, parseModes

VINTR, VEOL, VEOL2 = 1, 6, 7  # RFC 4254 section 8 opcodes
TTY_OP_END = b"\0"


def encoded(*modes: tuple[int, int]) -> bytes:
    return b"".join(struct.pack(">BL", opcode, value) for opcode, value in modes) + TTY_OP_END


@contextmanager
def pty() -> Iterator[int]:
    master, slave = os.openpty()
    try:
        yield slave
    finally:
        os.close(slave)
        os.close(master)


class SpecialCharacterTests(SynchronousTestCase):
    def test_disabledCharacterStaysDisabled(self) -> None:
        """
        OpenSSH sends 255 for VEOL and VEOL2 when its terminal has them off
        (<undef> in stty): the pty has them off too (0 on Linux), not set to
        byte 255, which would end a line whenever that byte is typed.
        """
        with pty() as slave:
            applyModes(slave, parseModes(encoded((VEOL, 255), (VEOL2, 255))))
            characters = termios.tcgetattr(slave)[6]
        self.assertEqual(characters[termios.VEOL], b"\0")
        self.assertEqual(characters[termios.VEOL2], b"\0")

    def test_enabledCharacterIsSet(self) -> None:
        """A special character the client's terminal has set is set on the pty: ^G for VINTR."""
        with pty() as slave:
            applyModes(slave, parseModes(encoded((VINTR, 7))))
            self.assertEqual(termios.tcgetattr(slave)[6][termios.VINTR], b"\x07")
