#!/usr/bin/env python3
"""
Summarise py-spy raw (collapsed) stacks recorded by ``bench/run --profile``
(``py-spy record --native --idle --format raw``).

    python3 bench/pyspy_summary.py bench/out/latest/profile/gc-down.txt [...]

For each file: how busy the reactor (main) thread was, the share of its busy
samples per category (HMAC, AES, kernel I/O, Conch framing, ...), the top
functions by self time (deepest Python frame, native leaves folded into it)
and by inclusive time. Categories are decided per sample, first rule wins,
scanning the whole stack (so e.g. Python overhead inside Conch's makeMAC
counts as HMAC, not as framing):

  idle            epoll_wait under the reactor's doPoll (excluded from shares)
  HMAC            SSHCiphers.makeMAC / SSHCiphers.verify / hmac.py / _hashopenssl
  AES-CTR         SSHCiphers.encrypt / SSHCiphers.decrypt
  random padding  os.urandom / getrandom (Conch draws fresh padding per packet)
  kernel I/O      send/recv/read/write system calls (socket or pipe)
  copies          an anonymous libc leaf (memcpy/memmove: bytes slicing, joins)
                  or a bytes/bytearray builtin leaf
  Conch framing   deepest Python frame in twisted/conch/ssh/transport.py
  Conch channel   ... in twisted/conch/ssh/connection.py, channel.py, common.py, service.py
  our code        ... in accesstunnel/, groundcontrol/, agent/
  Twisted core    ... in twisted/internet, twisted/python, twisted/logger
  other           the rest
"""

from __future__ import annotations

import collections
import re
import sys

PY_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]+\.py):(?P<line>\d+)\)$")
SYSCALL_LEAF = re.compile(r"^(send|recv|sendmsg|recvmsg|read|write|writev|readv|__libc_\w+) \(libc")
ANON_LIBC = re.compile(r"^0x[0-9a-f]+ \(libc\.so\.6\)$")


def py_frames(frames):
    out = []
    for f in frames:
        m = PY_FRAME.match(f)
        if m:
            out.append((m["func"], m["file"]))
    return out


def category(frames: list[str]) -> str:
    joined = ";".join(frames)
    leaf = frames[-1]
    if "select_epoll_poll" in joined or "epoll_wait" in leaf:
        return "idle"
    if (
        "SSHCiphers.makeMAC" in joined
        or "SSHCiphers.verify" in joined
        or "hmac.py" in joined
        or "_hashopenssl" in joined
    ):
        return "HMAC"
    if "SSHCiphers.encrypt" in joined or "SSHCiphers.decrypt" in joined:
        return "AES-CTR"
    if "os_urandom" in joined or "getrandom" in joined or "randbytes.py" in joined:
        return "random padding"
    if SYSCALL_LEAF.match(leaf) or any(
        s in joined for s in ("sock_send", "sock_recv", "os_read", "os_write")
    ):
        return "kernel I/O"
    if ANON_LIBC.match(leaf) or re.match(
        r"^(bytes|bytearray|_Py_bytes|PyBytes|memcpy|memmove)", leaf
    ):
        return "copies"
    py = py_frames(frames)
    if not py:
        return "other"
    f = py[-1][1]
    if "twisted/conch/ssh/transport.py" in f:
        return "Conch framing"
    if any(
        s in f
        for s in (
            "twisted/conch/ssh/connection.py",
            "twisted/conch/ssh/channel.py",
            "twisted/conch/ssh/common.py",
            "twisted/conch/ssh/service.py",
        )
    ):
        return "Conch channel"
    if any(f.startswith(p) or "/" + p in f for p in ("accesstunnel/", "groundcontrol/", "agent/")):
        return "our code"
    if any(s in f for s in ("twisted/internet", "twisted/python", "twisted/logger")):
        return "Twisted core"
    return "other"


def load(path: str):
    """Yield (frames, count) of the reactor thread (the one running mainLoop)."""
    with open(path) as f:
        text = f.read()
    for line in text.splitlines():
        line = line.rstrip("\n")
        if not line:
            continue
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        if "ReactorBase.mainLoop" not in stack:
            continue  # the store's thread pool, py-spy's own view of other threads
        yield frames, int(n)


def summarise(path: str, top: int = 15) -> str:
    cats: collections.Counter[str] = collections.Counter()
    selfc: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, n in load(path):
        total += n
        c = category(frames)
        cats[c] += n
        if c == "idle":
            continue
        py = py_frames(frames)
        if py:
            func, f = py[-1]
            selfc[f"{func} ({f})"] += n
        seen = set()
        for func, f in py:
            k = f"{func} ({f})"
            if k not in seen:
                seen.add(k)
                incl[k] += n
    busy = total - cats["idle"]
    out = [
        f"## {path}",
        "",
        f"reactor thread samples: {total}, busy {busy} "
        f"({100.0 * busy / max(total, 1):.0f}% of the time)",
        "",
        "| category | share of busy |",
        "|---|---|",
    ]
    for c, n in cats.most_common():
        if c != "idle":
            out.append(f"| {c} | {100.0 * n / max(busy, 1):.1f}% |")
    out += [
        "",
        "top self (deepest Python frame, native callees folded in):",
        "",
        "| function | self |",
        "|---|---|",
    ]
    for k, n in selfc.most_common(top):
        out.append(f"| `{k}` | {100.0 * n / max(busy, 1):.1f}% |")
    out += [
        "",
        "top inclusive (below the reactor loop):",
        "",
        "| function | inclusive |",
        "|---|---|",
    ]
    skip = (
        "twistd",
        "run (",
        "runApp",
        "ApplicationRunner",
        "startReactor",
        "runReactorWithLogging",
        "ReactorBase.run",
        "ReactorBase.mainLoop",
        "<module>",
        "callWithLogger",
        "callWithContext",
        "ContextTracker",
        "EPollReactor.doPoll",
        "_PollLikeMixin._doReadOrWrite",
    )
    shown = 0
    for k, n in incl.most_common():
        if any(s in k for s in skip):
            continue
        out.append(f"| `{k}` | {100.0 * n / max(busy, 1):.1f}% |")
        shown += 1
        if shown >= top:
            break
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(summarise(p))
