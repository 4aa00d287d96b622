"""
The agent's side of enrollment: getting approved, and keeping a certificate.

Once the link is up the agent says hello (version, board serial) and learns
whether groundcontrol knows it as approved or pending.

  - Approved: it makes sure it holds a fleet certificate with more than a
    third of its life left, asking for a new one over the link if not, and
    schedules the next renewal. The private key never leaves the device: the
    certificate is issued over the public key groundcontrol already has.
  - Pending: with an enrollment token it redeems that; otherwise it shows a
    short pairing code (log, status file, ``tunnel-agent pair``) that an
    operator claims with ``ssh ctl@groundcontrol claim CODE``. Codes expire
    within minutes and are replaced while the device still waits.

The agent's timers run on the monotonic clock (L{accesstunnel.clocks}); certificate
dates are the wall clock's, which may be stepped while a renewal waits (NTP's first
sync on a board that booted in 1970). So the dates are looked at again at least every
L{WALL_CLOCK_RECHECK} seconds and at every link-up, and a certificate that looks
not yet valid or already due the moment it is issued says the device's clock is off.

Everything it learns goes to ``STATE/status.json`` so that people on the
device (and ``tunnel-agent pair``) can see it, in the JSON vocabulary of the
server's ``--json`` output: snake_case keys, ISO 8601 UTC times with a ``Z``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import secrets
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from accesstunnel.clocks import elapsedClock, wallClock
from accesstunnel.enrollmessages import (
    CERTIFICATE,
    CLAIM_CODE,
    ENROLL,
    HELLO,
    decodeMessage,
    encodeMessage,
)
from accesstunnel.reasontext import reasonText
from accesstunnel.statefiles import roomFor, writeAtomically
from accesstunnel.timetext import isoTime
from agent.certificatefile import CERTIFICATE_FILE, certificateLifetime
from agent.clocksense import unsetClockNote

CA_FILE = "fleet-ca.crt"
STATUS_FILE = "status.json"

#: How long a pairing code is good for; groundcontrol enforces its own limit.
PAIRING_CODE_LIFETIME = 600.0

#: After a failed certificate request, when to ask again (on the same link).
CERTIFICATE_RETRY_DELAY = 3600.0

#: After a pairing code could not be registered, when to offer another.
PAIRING_CODE_RETRY_DELAY = 60.0

#: The longest the agent waits before it compares its certificate's dates with the wall
#: clock again (timers run on the monotonic clock: a step of the wall clock moves no timer).
WALL_CLOCK_RECHECK = 3600.0

#: After the status file could not be written (a full disk), when to try again.
STATUS_RETRY_DELAY = 60.0

#: A certificate that cannot be renewed (its state directory is full or read-only) with
#: less than this left is warned about every L{RUNNING_OUT_REPEAT} seconds: a person must
#: make room before it runs out, or the device's tls:// and wss:// links are refused and it
#: comes back as pending.
RUNNING_OUT_WARNING = 86400.0

#: How often the warning about a certificate running out is repeated.
RUNNING_OUT_REPEAT = 3600.0

#: Why a write to the state directory can store nothing there until a person acts: the
#: card was remounted read-only after errors, or the disk (or the agent's quota) is full.
_CANNOT_STORE = (errno.EROFS, errno.ENOSPC, errno.EDQUOT)

#: Unambiguous letters and digits (no 0/O, 1/I/L).
_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"


def newPairingCode(randbelow: Any = secrets.randbelow) -> str:
    """Eight characters in two groups, e.g. ``K7QP-M2XD`` (~40 bits)."""
    chars = "".join(_CODE_ALPHABET[randbelow(len(_CODE_ALPHABET))] for _ in range(8))
    return f"{chars[:4]}-{chars[4:]}"


def encodeRequest(payload: dict[str, Any]) -> bytes:
    """A request body (see L{accesstunnel.enrollmessages})."""
    return encodeMessage(payload)


def decodeReply(data: bytes) -> dict[str, Any]:
    """A reply body as a dict; ValueError if malformed."""
    return decodeMessage(data)


def renewalDue(notBefore: float, notAfter: float) -> float:
    """When a third of the certificate's life is left."""
    return notAfter - (notAfter - notBefore) / 3


def _statusJSON(status: dict[str, Any]) -> str:
    """
    C{status} as C{json.dumps(status, indent=2, sort_keys=True)} writes it: one
    field a line, for people who read the file on the device (test_enrollment pins
    the text; C{tunnel-agent} and the agent read it with C{json.loads}, any layout).

    Written by hand because no C{json.dumps} options give both that text and no
    garbage. Before Python 3.13, C{indent} makes the json module encode in Python
    (its C encoder runs only when C{indent} is None), with closures that refer to
    each other: a reference cycle for the cyclic collector at every write, and each
    link's hello writes the file (tests/test_agent_link_garbage.py). Without
    C{indent}, C{separators=(",\\n  ", ": ")} breaks the lines in C, but the braces
    still need framing here, and any list value would be broken over lines too. The
    status is a flat record, so each key and value is encoded alone, by the C
    encoder. From Python 3.13 the C encoder indents (CPython gh-95382), and this can
    become C{json.dumps(status, indent=2, sort_keys=True)}.
    """
    if not status:
        return "{}"
    fields = (f"  {json.dumps(key)}: {json.dumps(status[key])}" for key in sorted(status))
    return "{\n" + ",\n".join(fields) + "\n}"


#: The status file's keys as agents wrote them before the JSON vocabulary (camelCase, times
#: as epoch numbers but C{updatedAt}), and their names now. An upgrade replaces the files
#: while the old agent runs on until it is restarted, so C{tunnel-agent} reads both.
_OLD_STATUS_KEYS = {
    "pairingCode": "pairing_code",
    "pairingCodeExpires": "pairing_code_expires_at",
    "certificateExpires": "certificate_expires_at",
    "updatedAt": "updated_at",
}


def _currentSpelling(status: dict[str, Any]) -> dict[str, Any]:
    """C{status} with an old agent's keys renamed and its epoch times as ISO text."""
    current = {k: v for k, v in status.items() if k not in _OLD_STATUS_KEYS}
    for old, new in _OLD_STATUS_KEYS.items():
        if old in status and new not in current:
            value = status[old]
            isEpoch = isinstance(value, int | float) and not isinstance(value, bool)
            current[new] = isoTime(value) if isEpoch else value
    return current


class StatusFile:
    """
    ``STATE/status.json``: what the agent knows about its standing (C{state}, C{name},
    C{pairing_code}, C{pairing_code_expires_at}, C{certificate_expires_at}, C{updated_at};
    times as L{isoTime} writes them).

    The file is for people on the device; the agent keeps its standing in memory. So a
    write that fails (the disk is full) stops nothing: it is logged once, the file keeps
    its last whole content, and the agent writes it again every L{STATUS_RETRY_DELAY}
    seconds until it can (given a clock) and at each update.
    """

    _log = Logger()

    def __init__(self, stateDir: Path, clock: IReactorTime | None = None) -> None:
        self.path = stateDir / STATUS_FILE
        self._status: dict[str, Any] = {}
        self._clock = clock
        self._retry: IDelayedCall | None = None
        #: Why the last write failed (None once one works). Asked before anything else is
        #: written there: C{statvfs} cannot tell a read-only card (ext4's emergency
        #: read-only does not set C{ST_RDONLY}) nor a full one (out of inodes, over quota).
        self.writeError: OSError | None = None

    def get(self, key: str) -> Any:
        """What the agent last said for C{key} (None if nothing)."""
        return self._status.get(key)

    def update(self, **fields: Any) -> None:
        self._status.update(fields)
        self._status["updated_at"] = isoTime(time.time())
        self._write()

    def _write(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        try:
            writeAtomically(self.path, _statusJSON(self._status).encode())
        except OSError as e:
            self._writeFailed(e)
            return
        if self.writeError is not None:
            self.writeError = None
            self._log.info("{path} written again", path=str(self.path))

    def _writeFailed(self, error: OSError) -> None:
        failing, self.writeError = self.writeError is not None, error
        if not failing:
            self._log.warn(
                "cannot write {path}: {error}; the agent goes on, and writes it when it can",
                path=str(self.path),
                error=reasonText(error),
            )
        if self._clock is not None:
            self._retry = self._clock.callLater(STATUS_RETRY_DELAY, self._write)

    @staticmethod
    def read(stateDir: Path) -> dict[str, Any]:
        """The status, in today's spelling whichever agent wrote it; empty if none."""
        try:
            value = json.loads((stateDir / STATUS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return _currentSpelling(value) if isinstance(value, dict) else {}


class Enrollment:
    """Drive hello, token redemption, pairing codes and certificate renewal."""

    _log = Logger()

    def __init__(
        self,
        stateDir: Path,
        clock: IReactorTime,
        requestedName: str,
        serial: str | None,
        version: str,
        token: str | None = None,
        newCode: Any = newPairingCode,
        tags: tuple[str, ...] = (),
    ) -> None:
        self._tags = tags
        self.stateDir = stateDir
        self._clock = clock
        self._wall = wallClock(clock)
        self._elapsed = elapsedClock(clock)
        self._requestedName = requestedName
        self._serial = serial
        self._version = version
        self._token = token
        self._newCode = newCode
        self.status = StatusFile(stateDir, clock)
        self._conn: Any = None
        self._timer: IDelayedCall | None = None
        #: Whether the log said that the certificate waits for a state directory that can
        #: store it (not read-only, not full).
        self._waitSaid = False
        #: When (L{_elapsed}) the log last warned that the certificate runs out unrenewed.
        self._runningOutSaidAt: float | None = None
        #: The size of the largest file of the last certificate that did not fit (None once
        #: one is stored): no new one is asked for until a file that size can be written.
        self._refusedSize: int | None = None
        self.state = "unknown"
        self.name: str | None = None
        #: Which transport the link runs over (set by the assembly), for hello.
        self.transportName: Any = lambda: None

    # -- link lifecycle ------------------------------------------------------

    def linkUp(self, conn: Any) -> defer.Deferred[None]:
        """The link is authenticated: find out where we stand and act on it."""
        self._conn = conn
        return defer.Deferred.fromCoroutine(self._start())

    def linkDown(self) -> None:
        self._conn = None
        self._cancelTimer()

    def approved(self, data: bytes) -> int:
        """groundcontrol says we were just approved (a global request)."""
        try:
            reply = decodeReply(data)
        except ValueError:
            return 0
        self._becameApproved(str(reply.get("name") or self._requestedName))
        return 1

    # -- steps -----------------------------------------------------------------

    async def _request(self, name: bytes, payload: dict[str, Any]) -> dict[str, Any]:
        conn = self._conn
        if conn is None:
            raise ConnectionError("link is down")
        data = await conn.sendGlobalRequest(name, encodeRequest(payload), wantReply=1)
        return decodeReply(data)

    async def _start(self) -> None:
        try:
            reply = await self._request(
                HELLO,
                {
                    "version": self._version,
                    "serial": self._serial or "",
                    "transport": self.transportName() or "",
                    "tags": list(self._tags),
                },
            )
        except Exception as e:
            self._log.warn("groundcontrol did not answer hello: {error}", error=str(e))
            return
        state = str(reply.get("state", "unknown"))
        if state == "approved":
            self._becameApproved(
                str(reply.get("name") or self._requestedName),
                forceCertificate=reply.get("needsCertificate") is True,
            )
            return
        self.state = "pending"
        self.status.update(state="pending", name=self._requestedName)
        self._log.info(
            "waiting for approval as {name} ({kind})", name=self._requestedName, kind=state
        )
        if self._token and await self._redeemToken():
            return
        await self._offerPairingCode()

    def _becameApproved(self, name: str, forceCertificate: bool = False) -> None:
        self.state = "approved"
        self.name = name
        self.status.update(
            state="approved", name=name, pairing_code=None, pairing_code_expires_at=None
        )
        self._cancelTimer()
        defer.Deferred.fromCoroutine(self._ensureCertificate(force=forceCertificate))

    async def _redeemToken(self) -> bool:
        try:
            reply = await self._request(ENROLL, {"token": self._token})
        except Exception as e:
            self._log.warn("enrollment token not answered: {error}", error=str(e))
            return False
        if not reply.get("ok"):
            self._log.warn(
                "enrollment token refused: {reason}", reason=str(reply.get("error", "refused"))
            )
            return False
        self._log.info("enrolled with a token as {name}", name=reply.get("name"))
        self._becameApproved(str(reply.get("name") or self._requestedName))
        return True

    async def _offerPairingCode(self) -> None:
        if self.state != "pending" or self._conn is None:
            return
        code = self._newCode()
        offered = self._wall()
        expires = offered + PAIRING_CODE_LIFETIME
        try:
            reply = await self._request(CLAIM_CODE, {"code": code})
        except Exception as e:
            self._log.warn("could not register a pairing code: {error}", error=str(e))
            self._retryPairingCode()
            return
        if not reply.get("ok"):
            self._log.warn("pairing code refused: {reason}", reason=str(reply.get("error")))
            self._retryPairingCode()
            return
        unset = unsetClockNote(offered, self.stateDir)
        self._log.info(
            "pairing code {code} ({valid}): an operator claims this device with: ssh "
            "ctl@groundcontrol claim {code}",
            code=code,
            valid=(
                f"valid until {isoTime(expires)}"
                if unset is None  # else a date in 1970: how long is all that is known
                else f"valid for {PAIRING_CODE_LIFETIME / 60:.0f} min; {unset}"
            ),
            expires=isoTime(expires),
        )
        self.status.update(pairing_code=code, pairing_code_expires_at=isoTime(expires))
        self._schedule(PAIRING_CODE_LIFETIME, self._offerPairingCode)

    def _retryPairingCode(self) -> None:
        # Without this a device whose code was not registered (a store hiccup, a code
        # already in use) shows no claimable code until its link is re-made.
        if self._conn is not None and self.state == "pending":
            self._schedule(PAIRING_CODE_RETRY_DELAY, self._offerPairingCode)

    async def _ensureCertificate(self, force: bool = False) -> None:
        """
        Hold a certificate with more than a third of its life left; with C{force}
        (groundcontrol has none on record for our key: ours was revoked) get a new one.
        """
        certificatePath = self.stateDir / CERTIFICATE_FILE
        try:
            notBefore, notAfter = certificateLifetime(certificatePath.read_bytes())
        except (OSError, ValueError):
            notBefore = notAfter = 0.0
        now = self._wall()
        if not force and notAfter and now < renewalDue(notBefore, notAfter):
            # A new agent process knows its certificate's expiry only from the file: say it
            # in the status, or a restart leaves it out until the next renewal.
            expires = isoTime(notAfter)
            if self.status.get("certificate_expires_at") != expires:
                self.status.update(certificate_expires_at=expires)
            self._scheduleRenewal(notBefore, notAfter)
            return
        self.status.update()  # which also finds out whether the state directory is writable
        writeError = self.status.writeError
        size = self._sizeToStore(certificatePath)
        if writeError is None and size:
            # status.json fits (a few hundred bytes): would a certificate?
            writeError = roomFor(certificatePath, size)
        if writeError is not None and writeError.errno in _CANNOT_STORE:
            self._waitForRoom(certificatePath, notAfter, writeError)
            return
        heldUntil = notAfter
        try:
            reply = await self._request(CERTIFICATE, {})
        except Exception as e:
            self._log.warn("certificate request failed: {error}", error=str(e))
            self._retryCertificate()
            return
        pem = reply.get("certificate")
        if not reply.get("ok") or not isinstance(pem, str):
            self._log.warn("certificate refused: {reason}", reason=str(reply.get("error")))
            self._retryCertificate()
            return
        try:
            notBefore, notAfter = certificateLifetime(pem.encode())
        except ValueError:
            self._log.error("groundcontrol sent a malformed certificate")
            self._retryCertificate()
            return
        # The certificate last: a failure on either leaves the one in use as it was.
        files = [(certificatePath, pem.encode())]
        if isinstance(reply.get("ca"), str):
            files.insert(0, (self.stateDir / CA_FILE, reply["ca"].encode()))
        try:
            for path, data in files:
                writeAtomically(path, data)
        except OSError as e:
            self._storeFailed(certificatePath, heldUntil, e, max(len(d) for _, d in files))
            return
        expires = isoTime(notAfter)
        self._waitSaid = False
        self._runningOutSaidAt = None
        self._refusedSize = None
        self._log.info("fleet certificate stored, valid until {expires}", expires=expires)
        self.status.update(certificate_expires_at=expires)
        now = self._wall()
        if not notBefore <= now < renewalDue(notBefore, notAfter):
            self._log.warn(
                "this device's clock says {now}, but the fleet certificate just issued is "
                "valid from {notBefore} until {notAfter}: is the clock set? (its dates are "
                "looked at again in an hour)",
                now=isoTime(now),
                notBefore=isoTime(notBefore),
                notAfter=expires,
            )
        self._scheduleRenewal(notBefore, notAfter)

    def _sizeToStore(self, certificatePath: Path) -> int:
        """
        How large a file a new certificate needs (0: not known): the largest of the last
        one that did not fit and the certificate and CA held, which a new one resembles
        (the same names and key). Known from the files, a restarted agent asks for none
        that cannot be stored either.
        """
        sizes = [self._refusedSize or 0]
        for path in (certificatePath, self.stateDir / CA_FILE):
            with contextlib.suppress(OSError):
                sizes.append(path.stat().st_size)
        return max(sizes)

    def _storeFailed(
        self, certificatePath: Path, heldUntil: float, error: OSError, size: int
    ) -> None:
        """
        A certificate was issued but could not be stored. If for lack of room (status.json
        fitted, the certificate did not, nor a file the size of the one held, if any), none
        is asked for until a file of its C{size} can be written (L{roomFor}, looked at
        hourly): groundcontrol signed one an hour for nothing, and the log said so each
        time.
        """
        if error.errno in _CANNOT_STORE:
            self._refusedSize, self._waitSaid = size, True
            then = (
                f"asks for a new one once a file of {size} bytes can be written there (it "
                f"looks every {CERTIFICATE_RETRY_DELAY:.0f} s)"
            )
        else:
            then = f"asks again in {CERTIFICATE_RETRY_DELAY:.0f} s"
        self._log.error(
            "cannot store the new fleet certificate in {path}: {error}; the one there (if "
            "any) is kept, and the agent {then}",
            path=str(certificatePath),
            error=reasonText(error),
            then=then,
        )
        self._warnIfRunningOut(certificatePath, heldUntil)
        self._retryCertificate()

    def _waitForRoom(self, certificatePath: Path, notAfter: float, error: OSError) -> None:
        """
        Do not ask for a certificate that cannot be stored (a card the kernel remounted
        read-only, a full disk): groundcontrol would sign one an hour for nothing, and the
        log would say so each time. Said once; looked at again every
        L{CERTIFICATE_RETRY_DELAY} seconds, and warned about hourly near its end.
        """
        if not self._waitSaid:
            self._waitSaid = True
            kept = f"keeps the one valid until {isoTime(notAfter)}" if notAfter else "has none"
            where = (
                "a read-only file system"
                if error.errno == errno.EROFS
                else f"a full disk ({error.strerror or error})"
            )
            self._log.warn(
                "the fleet certificate is due, but {path} is on {where}: the agent {kept} "
                "and asks for a new one once it can store it (it looks every {delay:.0f} s)",
                path=str(certificatePath),
                where=where,
                kept=kept,
                delay=CERTIFICATE_RETRY_DELAY,
            )
        self._warnIfRunningOut(certificatePath, notAfter)
        self._retryCertificate()

    def _warnIfRunningOut(self, certificatePath: Path, notAfter: float) -> None:
        """
        A certificate held with less than L{RUNNING_OUT_WARNING} left that could not be
        renewed: warned about every L{RUNNING_OUT_REPEAT} seconds (not at every link-up),
        since only a person freeing the disk keeps the device in the fleet.
        """
        left = notAfter - self._wall()
        if not notAfter or left >= RUNNING_OUT_WARNING:
            return
        now = self._elapsed()
        if self._runningOutSaidAt is not None and now - self._runningOutSaidAt < RUNNING_OUT_REPEAT:
            return
        self._runningOutSaidAt = now
        if left <= 0:
            when = "has run out"
        elif left < 3600:
            when = f"runs out in {left / 60:.0f} min"
        else:
            when = f"runs out in {left / 3600:.0f} h"
        self._log.warn(
            "the fleet certificate in {path} {when} ({expires}) and cannot be renewed until "
            "that directory can be written: free space on that disk (or remount it writable); "
            "once it has run out, tls:// and wss:// links are refused and the device comes "
            "back as pending",
            path=str(certificatePath),
            when=when,
            expires=isoTime(notAfter),
        )

    def _retryCertificate(self) -> None:
        # Without this a renewal that fails once (a store hiccup) is not tried again
        # until the link is re-made, and a device that stays connected lets its
        # certificate run out and comes back pending.
        if self._conn is not None and self.state == "approved":
            self._schedule(CERTIFICATE_RETRY_DELAY, self._ensureCertificate)

    def _scheduleRenewal(self, notBefore: float, notAfter: float) -> None:
        """
        Look at the certificate again when it is due, or in L{WALL_CLOCK_RECHECK} if
        that is sooner (the wall clock may step meanwhile) or if it is due already (only
        a certificate just issued, to a device whose clock is off: not every second).
        """
        untilDue = renewalDue(notBefore, notAfter) - self._wall()
        delay = untilDue if 0 < untilDue < WALL_CLOCK_RECHECK else WALL_CLOCK_RECHECK
        self._schedule(delay, self._ensureCertificate)

    # -- the one timer -----------------------------------------------------------

    def _schedule(self, delay: float, step: Any) -> None:
        self._cancelTimer()

        def fire() -> None:
            self._timer = None
            if self._conn is not None:
                defer.Deferred.fromCoroutine(step())

        self._timer = self._clock.callLater(delay, fire)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
