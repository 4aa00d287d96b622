"""
The enrollment messages agent and groundcontrol exchange on the device link.

Each is an SSH global request whose body, like its answer's, is one SSH
string holding a JSON object. Both ends import the names and the encoding
from here, so they cannot drift apart.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.conch.ssh import common

#: agent -> groundcontrol: version, serial, transport, tags; answer: state, name.
HELLO = b"hello@accesstunnel"
#: agent -> groundcontrol: a fleet certificate for the key it logged in with.
CERTIFICATE = b"certificate@accesstunnel"
#: agent -> groundcontrol: redeem an enrollment token.
ENROLL = b"enroll@accesstunnel"
#: agent -> groundcontrol: the pairing code the device shows.
CLAIM_CODE = b"claim-code@accesstunnel"
#: groundcontrol -> agent: you were just approved (no answer wanted).
APPROVED = b"approved@accesstunnel"


def encodeMessage(payload: dict[str, Any]) -> bytes:
    """A message body: one SSH string holding C{payload} as JSON."""
    return common.NS(json.dumps(payload, sort_keys=True).encode())


def decodeMessage(data: bytes) -> dict[str, Any]:
    """
    A message body as a dict. Anything else (not an SSH string of JSON, not an
    object, nested too deep, strings that are not valid Unicode such as lone
    surrogates) raises ValueError.
    """
    try:
        value = json.loads(common.getNS(data)[0].decode("utf-8"))
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # no lone surrogates anywhere
    except (ValueError, UnicodeError, IndexError, struct.error, RecursionError) as e:
        raise ValueError(f"malformed message: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("malformed message: not an object")
    return value
