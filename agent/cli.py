"""
``tunnel-agent``: commands for people on the device, next to the daemon.

``tunnel-agent pair --state DIR`` prints the pairing code the running agent
shows while it waits for approval; an operator claims the device with
``ssh ctl@groundcontrol claim CODE --for 7d``. ``tunnel-agent status``
prints what the agent knows of its standing. The daemon itself is
``tunnel-agentd --state DIR ...`` (L{agent.launcher}: the agent without twistd,
as its systemd unit runs it) or ``twistd -n tunnel-agent --state DIR ...``.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from accesstunnel.timetext import absoluteTime, parseIsoTime, relativeTime, whenText
from agent.clocksense import clockLooksUnset, unsetClockNote
from agent.enrollment import PAIRING_CODE_LIFETIME, StatusFile

#: What --help says; not the docstring, which python -OO (PYTHONOPTIMIZE=2, as the agent's
#: systemd unit runs) strips.
DESCRIPTION = "tunnel-agent: commands for people on the device, next to the daemon."


def _readOnly(stateDir: Path) -> bool:
    """
    Whether C{stateDir} is on a read-only file system (a card the kernel remounted after
    errors): tried with a nameless file made there and gone at once, since C{statvfs} does
    not tell ext4's emergency read-only.
    """
    try:
        with tempfile.TemporaryFile(dir=stateDir):
            return False
    except OSError as e:
        return e.errno == errno.EROFS


def _readOnlyNote(stateDir: Path) -> str:
    return (
        f"{stateDir} is on a read-only file system: the agent cannot write its status there; "
        "its log has its pairing code and standing (journalctl -u tunnel-agent)"
    )


def _noStatus(stateDir: Path) -> int:
    """What C{pair} and C{status} say (and their exit status) when the agent wrote none."""
    if _readOnly(stateDir):
        print(f"no agent status: {_readOnlyNote(stateDir)}", file=sys.stderr)
    else:
        print(f"no agent status in {stateDir}: is the agent running?", file=sys.stderr)
    return 1


def _pair(stateDir: Path, now: float) -> int:
    status = StatusFile.read(stateDir)
    if not status:
        return _noStatus(stateDir)
    if status.get("state") == "approved":
        print(f"this device is approved as {status.get('name')}; nothing to pair")
        return 0
    code = status.get("pairing_code")
    expires = parseIsoTime(status.get("pairing_code_expires_at"))
    readOnly = _readOnly(stateDir)
    if not code or expires is None or not _mayBeValid(expires, now, stateDir):
        print("no pairing code yet (the agent shows one once it reaches groundcontrol)")
        if readOnly:
            print(_readOnlyNote(stateDir), file=sys.stderr)
        return 1
    print(code)
    if readOnly:  # the file is as it was when the card turned read-only
        print(f"this code may be out of date: {_readOnlyNote(stateDir)}", file=sys.stderr)
    print(
        f"expires {_expiryText(expires, now, stateDir)}; claim it with: "
        f"ssh ctl@groundcontrol claim {code} --for 7d",
        file=sys.stderr,
    )
    return 0


def _mayBeValid(expires: float, now: float, stateDir: Path) -> bool:
    """
    Whether a pairing code may still be claimed: its expiry is ahead, or it was offered
    while the device's clock was unset and the clock has been set since (its expiry says
    1970; the agent offers a new code within the lifetime of this one).
    """
    return expires >= now or (
        clockLooksUnset(expires, stateDir) and not clockLooksUnset(now, stateDir)
    )


def _expiryText(expires: float, now: float, stateDir: Path) -> str:
    """
    When the pairing code expires, as far as the device's clock can tell: its date and how
    soon; how soon alone when the clock looks unset and was so when the code was offered (a
    board without a real-time clock before NTP: the date says 1970); within the code's
    lifetime when it was offered before the clock was set; its date alone when it was
    offered with the clock set and the clock looks unset now.
    """
    unset = unsetClockNote(now, stateDir)
    offeredUnset = clockLooksUnset(expires, stateDir)
    if unset is None and not offeredUnset:
        return whenText(expires, now)
    if unset is None:
        return (
            f"within {PAIRING_CODE_LIFETIME / 60:.0f} min (it was offered before this "
            "device's clock was set; the agent offers a new code when it runs out)"
        )
    if offeredUnset:
        return f"{relativeTime(expires, now)} ({unset})"
    return f"{absoluteTime(expires)} ({unset})"


def main(argv: list[str] | None = None, *, now: Callable[[], float] = time.time) -> int:
    """
    Run C{tunnel-agent} with C{argv}; return the exit status.

    @param now: the clock, injectable so tests see a known time left on a pairing code.
    """
    parser = argparse.ArgumentParser(prog="tunnel-agent", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, summary in (
        ("pair", "print the pairing code to claim this device"),
        ("status", "print the agent's status as JSON"),
    ):
        sub = commands.add_parser(name, help=summary)
        sub.add_argument("--state", required=True, type=Path, help="the agent's state directory")
    options = parser.parse_args(argv)
    if options.command == "pair":
        return _pair(options.state, now())
    status = StatusFile.read(options.state)
    if not status:  # not '{}' and exit 0, which a script took for an agent with no news
        return _noStatus(options.state)
    print(json.dumps(status, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
