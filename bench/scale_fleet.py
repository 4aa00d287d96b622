"""
bench/scale_fleet.py: make N approved devices for the scale benchmark, in bulk.

Each device gets a fresh ed25519 key (the load driver holds the private halves,
one file of ``name seed-hex`` lines); the public halves are put straight into the
store of an initialised groundcontrol data directory through the store's own
``recordContact`` + ``approveDevice`` (synchronous runner, before groundcontrol
starts), so the devices are exactly what an admin approval would make.

    python bench/scale_fleet.py DATA_DIR KEYFILE N [--prefix scale-] [--start 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys

from accesstunnel.keys import fingerprint
from groundcontrol.store import openStoreBlocking, synchronousRunner


def deviceName(prefix: str, i: int) -> str:
    return f"{prefix}{i:05d}"


def loadKeys(path: Path) -> list[tuple[str, keys.Key]]:
    """The ``name seed-hex`` lines of KEYFILE as (name, private key)."""
    out = []
    for line in path.read_text().splitlines():
        name, seed = line.split()
        out.append(
            (name, keys.Key(ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed))))
        )
    return out


def makeFleet(data: Path, keyFile: Path, n: int, prefix: str, start: int = 0) -> float:
    """Generate and approve N devices; return the seconds it took."""
    t0 = time.monotonic()
    store = openStoreBlocking(str(data / "groundcontrol.sqlite3"), synchronousRunner)
    now = time.time()
    lines = []
    for i in range(start, start + n):
        name = deviceName(prefix, i)
        private = ed25519.Ed25519PrivateKey.generate()
        seed = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        key = keys.Key(private)
        public = key.public().toString("openssh").decode("ascii")
        fp = fingerprint(key)
        for d in (
            store.recordContact(name, public, fp, f"bench-{i}", "127.0.0.1:0", now),
            store.approveDevice(name, "bench", now, fp),
        ):
            failures: list = []
            d.addErrback(failures.append)
            if failures:
                failures[0].raiseException()
        lines.append(f"{name} {seed.hex()}\n")
    with keyFile.open("a") as f:
        f.writelines(lines)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data", type=Path)
    ap.add_argument("keyfile", type=Path)
    ap.add_argument("n", type=int)
    ap.add_argument("--prefix", default="scale-")
    ap.add_argument("--start", type=int, default=0)
    a = ap.parse_args()
    took = makeFleet(a.data, a.keyfile, a.n, a.prefix, a.start)
    print(f"{a.n} devices approved in {took:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
