"""
End to end: an interactive login shell on the device through a real pty on
the operator's side (pexpect drives the real ssh client), issue 2.
"""

from __future__ import annotations

import pexpect

from tests.e2e.harness import Fleet

PROMPT = "PROMPT>"


def spawnShell(fleet: Fleet, rows: int = 24, cols: int = 80) -> pexpect.spawn:
    alice = fleet.operators["alice"]
    argv = alice.argv("dev_kiln7", tty=True)
    child = pexpect.spawn(
        argv[0],
        argv[1:],
        dimensions=(rows, cols),
        encoding="utf-8",
        timeout=20,
        env={"TERM": "xterm-256color", "PATH": "/usr/bin:/bin", "HOME": str(fleet.base)},
    )
    child.sendline(f"PS1='{PROMPT}'; export PS1")
    child.expect_exact(PROMPT)
    child.expect_exact(PROMPT)
    return child


def test_login_shell_with_terminal_and_exit_status(kiln7: Fleet) -> None:
    """TERM and window size reach the device, it is a login shell, exit 3 ends ssh with 3."""
    child = spawnShell(kiln7, rows=33, cols=101)
    child.sendline("echo TERM=$TERM; stty size; shopt -q login_shell && echo LOGIN")
    child.expect_exact("TERM=xterm-256color")
    child.expect_exact("33 101")
    child.expect_exact("LOGIN")
    child.expect_exact(PROMPT)
    child.sendline("exit 3")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3


def test_window_resize_reaches_program(kiln7: Fleet) -> None:
    """Resizing the operator's terminal changes the device pty and SIGWINCH is delivered."""
    child = spawnShell(kiln7)
    child.sendline("trap 'echo WINCH; stty size' WINCH; echo armed")
    child.expect_exact("armed")
    child.expect_exact(PROMPT)
    child.setwinsize(40, 120)
    child.sendline("")  # bash runs the trap when it next reads
    child.expect_exact("WINCH")
    child.expect_exact("40 120")
    child.sendline("exit 0")
    child.expect(pexpect.EOF)


def test_ctrl_c_interrupts_foreground_program(kiln7: Fleet) -> None:
    """Ctrl-C interrupts a running program and returns to the shell."""
    child = spawnShell(kiln7)
    # Wait for output of the program itself, not the pty's echo of the typed line:
    # a Ctrl-C that arrives before bash has made the job the terminal's foreground
    # process group goes to bash, and the sleep then runs on. (bash's child takes
    # the terminal before it execs, so "sleeping" means sh is in the foreground.)
    child.sendline("sh -c 'echo sl\"\"eeping; exec sleep 100'")
    child.expect_exact("sleeping")
    child.sendcontrol("c")
    child.expect_exact(PROMPT, timeout=5)  # long before the 100 s are up
    child.sendline("echo status=$?")
    child.expect_exact("status=130")
    child.expect_exact(PROMPT)
    child.sendline("exit")
    child.expect(pexpect.EOF)
