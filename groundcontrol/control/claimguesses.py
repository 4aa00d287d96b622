"""
How many wrong pairing codes an account may give ``ctl claim``: a few at once, then one a
minute.

Any logged-in account may claim, and a pairing code (8 of 31 letters and digits, about 40
bits) lives ten minutes. During a rollout many devices show codes at once, so with no bound
an operator without a single grant could try codes until one matched and own that device
(found by the session-17 security review, tests/test_adversarial.py). At one wrong code a
minute (1,450 a day), an account hits one of a thousand live codes with a chance of about
two in a million a day.

The count is kept per groundcontrol process, beside its registry of live links (the
control shell's contexts are made per channel; the registry lives as long as the node), so
a new ssh connection does not start it afresh.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from twisted.logger import Logger

from groundcontrol.preauth import Allowance
from groundcontrol.registry import Registry

__all__ = ["WRONG_CODES_AT_ONCE", "WRONG_CODE_INTERVAL", "claimWait", "wrongCode"]

#: Wrong codes an account may give back to back (mistyping one is common)...
WRONG_CODES_AT_ONCE = 10
#: ...and then one more every this many seconds.
WRONG_CODE_INTERVAL = 60.0

_ALLOWANCE = Allowance(
    WRONG_CODES_AT_ONCE, 1 / WRONG_CODE_INTERVAL, "wrong pairing code", "wrong pairing codes"
)
_log = Logger()
#: Per node (its registry), per account: what it owes the allowance.
_owed: WeakKeyDictionary[Registry, dict[str, Any]] = WeakKeyDictionary()


def claimWait(registry: Registry, account: str, now: float) -> float:
    """Seconds until C{account} may try a pairing code again on this node; 0: now."""
    bucket = _owed.get(registry, {}).get(account)
    return 0.0 if bucket is None else _ALLOWANCE.refusal(bucket, now)


def wrongCode(registry: Registry, account: str, now: float) -> None:
    """Count a wrong (unknown or expired) code C{account} gave; log when none are left."""
    buckets = _owed.setdefault(registry, {})
    bucket = buckets.setdefault(account, _ALLOWANCE.emptyBucket(now))
    _ALLOWANCE.spend(bucket, now)
    if _ALLOWANCE.refusal(bucket, now):
        _log.warn(
            "{account} gave {count} wrong pairing codes; claims refused for a while",
            account=account,
            count=WRONG_CODES_AT_ONCE,
        )
