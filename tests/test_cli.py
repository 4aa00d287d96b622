"""End-to-end tests of the groundcontrol admin CLI through main(argv), on temporary dirs."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys

from accesstunnel.keys import fingerprint
from groundcontrol.cli import main
from groundcontrol.datadir import DataDir
from groundcontrol.devicedetail import ONLINE_KEYS
from groundcontrol.store import (
    LinkCertificate,
    LinkRecord,
    SQLiteStore,
    SQLStore,
    hashSecret,
    openSQLiteStore,
    openStore,
    synchronousRunner,
)
from groundcontrol.store.pgtesting import ThrowawayPostgreSQL

T0 = 1_700_000_000.0


def clock() -> float:
    """A fixed clock so printed times are predictable."""
    return T0


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI; return (exit status, stdout, stderr)."""
    status = main(list(argv), now=clock)
    out, err = capsys.readouterr()
    return status, out, err


def newKey() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def publicLine(key: keys.Key) -> str:
    return key.public().toString("OPENSSH").decode("ascii")


def result(d: Any) -> Any:
    """The value of an already-fired Deferred (the synchronous runner's)."""
    out: list[Any] = []
    d.addBoth(out.append)
    return out[0]


@pytest.fixture
def data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """An initialised data directory."""
    path = tmp_path / "gc"
    assert run(capsys, "--data", str(path), "init")[0] == 0
    return path


@pytest.fixture
def store(data: Path) -> Any:
    """A second connection to the data dir's store, standing in for the running server."""
    s: SQLiteStore = result(openSQLiteStore(str(DataDir(data).databasePath), synchronousRunner))
    yield s
    s.close()


def contact(store: SQLiteStore, name: str, serial: str | None = None) -> str:
    """Make an agent with a fresh key ask for `name`, as the server would; return the key."""
    line = publicLine(newKey())
    result(store.recordContact(name, line, fingerprint(line), serial, "198.51.100.7:40000", T0))
    return line


def test_initCreatesPrivateFilesAndIsIdempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """init makes a 0700 dir, a 0600 OpenSSH host key with .pub, a store; a rerun keeps the key."""
    path = tmp_path / "gc"
    status, out, _ = run(capsys, "--data", str(path), "init")
    assert status == 0
    dataDir = DataDir(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE(dataDir.hostKeyPath.stat().st_mode) == 0o600
    assert stat.S_IMODE(dataDir.databasePath.stat().st_mode) == 0o600
    assert dataDir.hostKeyPath.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert dataDir.isInitialised()
    assert "created host key" in out
    before = dataDir.hostKeyPath.read_bytes()

    status, out, _ = run(capsys, "--data", str(path), "init")
    assert status == 0
    assert "kept existing host key" in out
    assert dataDir.hostKeyPath.read_bytes() == before


def test_helpWithoutDocstrings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    --help does not read the module docstring, which python -OO strips (the systemd units
    may run with PYTHONOPTIMIZE=2), and says what the program is in plain text, without
    the docstring's markup.
    """
    import groundcontrol.cli

    monkeypatch.setattr(groundcontrol.cli, "__doc__", None)
    status, out, err = run(capsys, "--help")
    assert (status, err) == (0, "")
    assert "groundcontrol: set up a data directory and edit the store offline." in out
    assert "``" not in out and "C{" not in out


def test_serverKey(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """server-key prints the one-line public key matching the private host key and the .pub."""
    status, out, _ = run(capsys, "--data", str(data), "server-key")
    assert status == 0
    (hostKey,) = DataDir(data).loadHostKeys().values()
    assert out == publicLine(hostKey) + "\n"
    assert DataDir(data).hostPublicKeyPath.read_text().split()[:2] == out.split()


def test_uninitialised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Commands on a data dir without init fail with one line and status 1, creating nothing."""
    path = tmp_path / "nothing"
    for argv in (["device", "list"], ["server-key"], ["device", "revoke", "kiln7"]):
        status, _, err = run(capsys, "--data", str(path), *argv)
        assert status == 1
        assert "not initialised" in err
        assert len(err.strip().splitlines()) == 1
        assert "Traceback" not in err
    assert not path.exists()


def test_userAdd(data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]) -> None:
    """user add registers the key file's key; the account is then found by fingerprint."""
    key = newKey()
    keyFile = data.parent / "alice.pub"
    keyFile.write_text(publicLine(key) + " alice@laptop\n")
    status, _, _ = run(capsys, "--data", str(data), "user", "add", "alice", "--key", str(keyFile))
    assert status == 0
    account = result(store.accountForKey(fingerprint(key)))
    assert (account.name, account.isAdmin) == ("alice", False)

    status, _, err = run(
        capsys, "--data", str(data), "user", "add", "alice", "--key", str(keyFile), "--admin"
    )
    assert status == 1
    assert "already exists" in err


def test_userAddBadKeyFiles(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing file, a non-key and a private key are each refused in one line with status 1."""
    junk = data.parent / "junk.pub"
    junk.write_text("hello\n")
    private = data.parent / "id_ed25519"
    private.write_bytes(newKey().toString("OPENSSH"))
    for path, message in [
        (data.parent / "missing.pub", "cannot read key file"),
        (junk, "not an SSH public key"),
        (private, "private key"),
    ]:
        status, _, err = run(capsys, "--data", str(data), "user", "add", "bob", "--key", str(path))
        assert (status, len(err.strip().splitlines())) == (1, 1)
        assert message in err


def test_deviceListApproveRevoke(
    data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pending request shows in device list, approve makes it a device, revoke revokes it."""
    line = contact(store, "kiln7", serial="SN-1\x1b[31m")
    status, out, _ = run(capsys, "--data", str(data), "device", "list")
    assert status == 0
    assert "pending" in out and "kiln7" in out and fingerprint(line) in out
    assert "198.51.100.7:40000" in out
    assert "\x1b" not in out  # device-supplied serial is stripped of control characters

    status, out, _ = run(capsys, "--data", str(data), "device", "approve", "kiln7")
    assert status == 0
    assert f"approved kiln7 ({fingerprint(line)})" in out
    assert result(store.deviceByName("kiln7")).state == "approved"

    status, out, _ = run(capsys, "--data", str(data), "device", "revoke", "kiln7")
    assert status == 0
    assert result(store.deviceByName("kiln7")).state == "revoked"
    events = [e.event for e in result(store.auditSince(0))]
    assert events == ["device.pending", "device.approved", "device.revoked"]
    assert result(store.auditSince(0))[-1].actor.startswith("cli")


def test_tableHeadersOneWordEach(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    Every table's header names each column in one word, spelled with underscores as the
    control shell's are (LAST_SEEN, SERIAL_MATCHES), so awk and cut count columns by it.
    """
    headers = {
        ("device", "list"): "NAME STATE FINGERPRINT SERIAL SERIAL_MATCHES LAST_SEEN SOURCE "
        "OWNER CERT_EXPIRES",
        ("grants",): "USER SELECTOR LOGIN AGENT_FWD EXPIRES STATE BY",
        ("token", "list"): "ID STATE USES_LEFT EXPIRES CREATED BY",
        ("group", "list"): "GROUP DEVICES",
        ("audit",): "ID AT EVENT DEVICE ACTOR DETAIL",
    }
    for argv, header in headers.items():
        status, out, _ = run(capsys, "--data", str(data), *argv)
        assert (status, out.splitlines()[0].split("  ")) == (0, header.split()), argv


def test_deviceListJSON(data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]) -> None:
    """
    --json lists approved and revoked devices, then the pending requests: each with every
    key of its kind, the keys they share (name, state, fingerprint, serial, last_seen)
    meaning the same.
    """
    for name in ("a", "b"):
        contact(store, name)
        assert run(capsys, "--data", str(data), "device", "approve", name)[0] == 0
    assert run(capsys, "--data", str(data), "device", "revoke", "b")[0] == 0
    contact(store, "c", serial="S3")
    contact(store, "a")  # a new key asking for an approved name: a rekey request

    status, out, _ = run(capsys, "--data", str(data), "device", "list", "--json")
    assert status == 0
    rows = json.loads(out)
    assert [(r["name"], r["state"], r.get("kind")) for r in rows] == [
        ("a", "approved", None),
        ("b", "revoked", None),
        ("a", "pending", "rekey"),
        ("c", "pending", "new"),
    ]
    deviceKeys, requestKeys = {frozenset(r) for r in rows[:2]}, {frozenset(r) for r in rows[2:]}
    assert len(deviceKeys) == len(requestKeys) == 1
    shared = {"name", "state", "fingerprint", "serial", "last_seen"}
    assert shared <= deviceKeys.pop() & requestKeys.pop()
    assert (rows[3]["serial"], rows[3]["last_seen"]) == ("S3", "2023-11-14T22:13:20Z")
    assert rows[3]["source"] == "198.51.100.7:40000"
    # Neither a's device nor the request for it has a serial; c asks for no device's name.
    assert (rows[2]["serial_matches"], rows[3]["serial_matches"]) == ("unknown", None)


def test_approveAmbiguousThenByKey(
    data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    Two requests for one name: approve alone fails listing both, one a line, as ctl
    prints them; --key picks one.
    """
    first, second = contact(store, "kiln7"), contact(store, "kiln7")
    status, _, err = run(capsys, "--data", str(data), "device", "approve", "kiln7")
    assert status == 1
    lines = err.splitlines()
    assert lines[0] == (
        "groundcontrol: error: 2 pending requests ask for 'kiln7'; choose one by fingerprint "
        "(--key SHA256:...):"
    ), lines
    assert len(lines) == 3, lines
    for line, key in zip(lines[1:], (first, second), strict=True):
        assert line.startswith(f"  request's key  {fingerprint(key)}  serial "), lines
    status, _, _ = run(
        capsys, "--data", str(data), "device", "approve", "kiln7", "--key", fingerprint(second)
    )
    assert status == 0
    assert result(store.deviceByName("kiln7")).fingerprint == fingerprint(second)


def test_approveRekeyNeedsKey(
    data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A new key asking for approved kiln7: 'device approve kiln7' refuses (status 1) with
    both keys, serials, times and source, and the exact command (these options included)
    that approves it; kiln7 keeps its key. 'device list' shows whether the serials match.
    The command given does approve it.
    """
    old = contact(store, "kiln7", serial="SN-1")
    assert run(capsys, "--data", str(data), "device", "approve", "kiln7")[0] == 0
    new = contact(store, "kiln7", serial="SN-1")

    status, out, err = run(capsys, "--data", str(data), "device", "approve", "kiln7")
    assert (status, out) == (1, "")
    lines = err.splitlines()
    assert lines[0] == (
        "groundcontrol: error: kiln7 is an approved device with another key: not approved."
    )
    assert re.match(
        rf"  device's key +{re.escape(fingerprint(old))} +serial SN-1 +"
        r"last seen 2023-11-14T22:13:20Z \(now\)$",
        lines[1],
    ), lines
    assert re.match(
        rf"  request's key +{re.escape(fingerprint(new))} +serial SN-1 \(matches: yes\) +"
        r"from 198\.51\.100\.7:40000 +first seen 2023-11-14T22:13:20Z \(now\)$",
        lines[2],
    ), lines
    command = f"  groundcontrol --data {data} device approve kiln7 --key {fingerprint(new)}"
    assert command in lines
    assert result(store.deviceByName("kiln7")).fingerprint == fingerprint(old)

    status, out, _ = run(capsys, "--data", str(data), "device", "list")
    header, *rows = out.splitlines()
    column = header.index("SERIAL_MATCHES")
    assert [row[column:].split()[0] for row in rows] == ["-", "yes"]
    assert (
        json.loads(run(capsys, "--data", str(data), "device", "list", "--json")[1])[1][
            "serial_matches"
        ]
        == "yes"
    )

    assert run(capsys, *command.split()[1:])[0] == 0
    assert result(store.deviceByName("kiln7")).fingerprint == fingerprint(new)


def test_deviceErrors(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown device: status 1; malformed name or fingerprint: status 2; never a traceback."""
    cases = [
        (["device", "approve", "ghost"], 1, "no device or pending request"),
        (["device", "revoke", "ghost"], 1, "no device named"),
        (["device", "approve", "Bad_Name"], 2, "invalid device name"),
        (["device", "revoke", "-x"], 2, ""),
        (["device", "approve", "kiln7", "--key", "MD5:aa"], 2, "fingerprint"),
        (["grant", "alice", "not valid"], 2, "invalid device name"),
        (["device", "frobnicate"], 2, "invalid choice"),
    ]
    for argv, expected, message in cases:
        status, _, err = run(capsys, "--data", str(data), *argv)
        assert status == expected, argv
        assert message in err
        assert "Traceback" not in err


def test_grant(data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]) -> None:
    """grant lets an operator reach a device (with optional expiry); ungrant takes it back."""
    keyFile = data.parent / "op.pub"
    keyFile.write_text(publicLine(newKey()))
    assert run(capsys, "--data", str(data), "user", "add", "op", "--key", str(keyFile))[0] == 0
    contact(store, "kiln7")
    assert run(capsys, "--data", str(data), "device", "approve", "kiln7")[0] == 0
    (op,) = result(store.listAccounts())
    assert result(store.mayReach(op, "kiln7", T0)) is False

    status, out, _ = run(
        capsys, "--data", str(data), "grant", "op", "kiln7", "--expires-in", "3600"
    )
    assert status == 0
    assert "until" in out
    assert result(store.mayReach(op, "kiln7", T0 + 10)) is True
    assert result(store.mayReach(op, "kiln7", T0 + 3600)) is False

    assert run(capsys, "--data", str(data), "ungrant", "op", "kiln7")[0] == 0
    status, _, err = run(capsys, "--data", str(data), "grant", "nobody", "kiln7")
    assert status == 1
    assert "no account" in err
    status, _, err = run(capsys, "--data", str(data), "grant", "op", "ghost")
    assert status == 1
    assert "no device" in err


def test_tokenCreateAndList(
    data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    token create prints the token alone on stdout, once; the store keeps only its hash, and
    the token enrolls a device; token list shows uses left and state.
    """
    status, out, err = run(
        capsys, "--data", str(data), "token", "create", "--uses", "2", "--expires", "7d"
    )
    assert status == 0
    token = out.strip()
    assert out == token + "\n" and len(token) == 43  # 32 bytes, URL-safe base64 unpadded
    assert "shown only now" in err
    (record,) = result(store.listTokens())
    assert (record.uses, record.usesLeft, record.expiresAt) == (2, 2, T0 + 7 * 86400)
    database = DataDir(data).databasePath
    for path in (database, database.with_name(database.name + "-wal")):
        if path.exists():
            assert token.encode() not in path.read_bytes()

    line = publicLine(newKey())
    device = result(
        store.redeemToken(hashSecret(token), fingerprint(line), line, "kiln7", None, "x", T0)
    )
    assert device.approvedBy == f"token:{record.id}"

    status, out, _ = run(capsys, "--data", str(data), "token", "list")
    assert status == 0
    assert "active" in out and "1/2" in out and token not in out
    status, out, _ = run(capsys, "--data", str(data), "token", "list", "--json")
    (row,) = json.loads(out)
    assert (row["id"], row["uses_left"], row["state"]) == (record.id, 1, "active")
    assert row["expires_at"] == "2023-11-21T22:13:20Z"  # T0 + 7 d


def test_tokenBadArguments(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed duration or use count is a usage error (status 2), never a traceback."""
    for argv, message in [
        (["token", "create", "--expires", "1x"], "bad duration"),
        (["token", "create", "--expires", "0d"], "longer than zero"),
        (["token", "create", "--uses", "0"], "at least 1"),
    ]:
        status, out, err = run(capsys, "--data", str(data), *argv)
        assert (status, out) == (2, "")
        assert message in err and "Traceback" not in err


def test_deviceListOwnerLeaseAndCertificate(
    data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """device list shows a claimed device's owner and lease, and its certificate expiry."""
    keyFile = data.parent / "alice.pub"
    keyFile.write_text(publicLine(newKey()))
    assert run(capsys, "--data", str(data), "user", "add", "alice", "--key", str(keyFile))[0] == 0
    (alice,) = result(store.listAccounts())
    line = contact(store, "kiln7")
    code = hashSecret("ABCD-EFGH")
    result(store.registerClaimCode(code, fingerprint(line), "kiln7", T0 + 300, T0))
    result(store.claimDevice(code, alice, T0 + 86400, T0))
    result(store.recordCertificate("kiln7", "7", fingerprint(line), T0, T0 + 3600, T0))

    status, out, _ = run(capsys, "--data", str(data), "device", "list")
    assert status == 0
    assert "alice until 2023-11-15T22:13:20Z" in out
    assert "2023-11-14T23:13:20Z" in out
    status, out, _ = run(capsys, "--data", str(data), "device", "list", "--json")
    (row,) = json.loads(out)
    assert (row["owner"], row["lease_until"], row["certificate_expires_at"]) == (
        "alice",
        "2023-11-15T22:13:20Z",
        "2023-11-14T23:13:20Z",
    )


def test_deviceListByKex(
    data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    device list --kex KIND keeps the devices whose latest link's key exchange is of that
    kind: classical (curve25519, an old agent), post-quantum (the hybrid) or unknown (never
    linked since the store recorded it: not the same as classical); repeated, any of them;
    the pending requests, which have no link, are left out. Each device's document carries
    the key exchange; an unknown kind is a usage error.
    """
    kexes = {"old1": "curve25519-sha256", "new2": "mlkem768x25519-sha256", "idle3": None}
    for name, kex in kexes.items():
        line = contact(store, name)
        assert run(capsys, "--data", str(data), "device", "approve", name)[0] == 0
        if kex is not None:
            linked = store.recordContact(
                name,
                line,
                fingerprint(line),
                None,
                "x",
                T0 + 60,
                link=lambda _, kex=kex: LinkRecord(kex=kex),
            )
            assert result(linked).lastLinkKex == kex
    contact(store, "asking4")  # pending

    def listed(*argv: str) -> list[str]:
        status, out, err = run(capsys, "--data", str(data), "device", "list", *argv)
        assert status == 0, err
        return [row.split()[0] for row in out.splitlines()[1:]]

    assert listed() == ["idle3", "new2", "old1", "asking4"]
    assert listed("--kex", "classical") == ["old1"]
    assert listed("--kex", "post-quantum") == ["new2"]
    assert listed("--kex", "unknown") == ["idle3"]
    assert listed("--kex", "classical", "--kex", "unknown") == ["idle3", "old1"]

    status, out, _ = run(capsys, "--data", str(data), "device", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert {n: (rows[n]["last_link_kex"], rows[n]["last_link_post_quantum"]) for n in kexes} == {
        "old1": ("curve25519-sha256", False),
        "new2": ("mlkem768x25519-sha256", True),
        "idle3": (None, None),
    }
    status, out, _ = run(
        capsys, "--data", str(data), "device", "list", "--kex", "unknown", "--json"
    )
    assert [r["name"] for r in json.loads(out)] == ["idle3"]

    status, out, err = run(capsys, "--data", str(data), "device", "list", "--kex", "pq")
    assert (status, out) == (2, "")
    assert "invalid choice: 'pq'" in err and "classical" in err


def test_deviceShowLastLink(
    data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    device show gives one device's record with how its latest link authenticated and the
    certificate it last linked with (serial, SHA-256 fingerprint, expiry, when), as text and
    JSON; before any link it says none was recorded; a pending-only or unknown name is an
    error.
    """
    line = contact(store, "kiln7", serial="SN-1")
    assert run(capsys, "--data", str(data), "device", "approve", "kiln7")[0] == 0
    status, out, _ = run(capsys, "--data", str(data), "device", "show", "kiln7")
    assert status == 0
    assert fingerprint(line) in out and "SN-1" in out
    assert re.search(r"(?m)^last link by +not recorded$", out), out
    assert re.search(r"(?m)^last certificate +none presented$", out), out

    certificateFingerprint = ":".join(["5E"] * 32)
    certificate = LinkCertificate("0a1b2c3d", certificateFingerprint, T0 + 86400, "kiln7")
    linked = store.recordContact(
        "kiln7",
        line,
        fingerprint(line),
        None,
        "198.51.100.7:40000",
        T0 + 60,
        link=lambda _: LinkRecord(certificate, kex="mlkem768x25519-sha256"),
    )
    assert result(linked).lastSeen == T0 + 60
    status, out, _ = run(capsys, "--data", str(data), "device", "show", "kiln7")
    assert status == 0
    assert re.search(r"(?m)^last link by +certificate$", out), out
    assert re.search(r"(?m)^last link kex +mlkem768x25519-sha256 \(post-quantum\)$", out), out
    assert re.search(r"(?m)^last certificate +0a1b2c3d$", out), out
    assert re.search(rf"(?m)^  SHA-256 +{certificateFingerprint}$", out), out
    assert re.search(r"(?m)^  valid until +2023-11-15T22:13:20Z \(in 24 h\)$", out), out
    assert re.search(r"(?m)^  presented +2023-11-14T22:14:20Z \(in 60 s\)$", out), out

    classical = LinkRecord(kex="curve25519-sha256")
    result(
        store.recordContact(
            "kiln7", line, fingerprint(line), None, "x", T0 + 120, link=lambda _: classical
        )
    )
    status, out, _ = run(capsys, "--data", str(data), "device", "show", "kiln7")
    assert re.search(r"(?m)^last link kex +curve25519-sha256 \(not post-quantum: ", out), out
    status, out, _ = run(capsys, "--data", str(data), "device", "show", "kiln7", "--json")
    assert status == 0
    shown = json.loads(out)
    assert (shown["name"], shown["state"], shown["last_link_auth"]) == ("kiln7", "approved", "key")
    assert (shown["last_link_kex"], shown["last_link_post_quantum"]) == ("curve25519-sha256", False)
    assert shown["last_certificate"] == {
        "serial_number": "0a1b2c3d",
        "fingerprint": certificateFingerprint,
        "not_after": "2023-11-15T22:13:20Z",
        "presented_at": "2023-11-14T22:14:20Z",
    }

    contact(store, "oven3")
    for name in ("oven3", "ghost"):
        status, _, err = run(capsys, "--data", str(data), "device", "show", name)
        assert status == 1 and f"no device named '{name}'" in err


def test_deviceShowRequestsAndGrants(
    data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    device show (the renderer the control shell's show shares) lists a new key asking for
    the device's name and the grants that cover the device (by name and group; not a tag it
    lacks).
    """
    contact(store, "kiln7")
    assert run(capsys, "--data", str(data), "device", "approve", "kiln7")[0] == 0
    status, out, _ = run(capsys, "--data", str(data), "device", "show", "kiln7")
    assert re.search(r"(?m)^grants +none$", out), out
    keyFile = data.parent / "alice.pub"
    keyFile.write_text(publicLine(newKey()))
    assert run(capsys, "--data", str(data), "user", "add", "alice", "--key", str(keyFile))[0] == 0
    assert run(capsys, "--data", str(data), "group", "add", "ovens", "kiln7")[0] == 0
    for selector in ("group:ovens", "kiln7", "tag:lab"):
        assert run(capsys, "--data", str(data), "grant", "alice", selector, "--as", "pi")[0] == 0
    rekey = contact(store, "kiln7", serial="SN-2")

    status, out, _ = run(capsys, "--data", str(data), "device", "show", "kiln7")
    assert status == 0
    assert re.findall(r"(?m)^grant +(.*)$", out) == [
        "alice by device:kiln7 as pi",
        "alice by group:ovens as pi",
    ]
    assert re.search(
        rf"(?m)^pending request +pending-rekey key {re.escape(fingerprint(rekey))}, "
        r"serial SN-2 \(matches: unknown\), from 198\.51\.100\.7:40000, "
        r"last seen 2023-11-14T22:13:20Z \(now\)$",
        out,
    ), out
    status, out, _ = run(capsys, "--data", str(data), "device", "show", "kiln7", "--json")
    shown = json.loads(out)
    assert [g["selector"] for g in shown["grants"]] == ["device:kiln7", "group:ovens"]
    assert [(r["kind"], r["serial"], r["serial_matches"]) for r in shown["pending_requests"]] == [
        ("rekey", "SN-2", "unknown")  # kiln7's agent reported no serial
    ]
    assert not set(ONLINE_KEYS) & set(shown)  # the CLI has no registry to ask


def test_storeURL(
    tmp_path: Path, postgresql: ThrowawayPostgreSQL, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    --store points every command at a shared PostgreSQL store: init migrates it, and what
    one command writes, the next (and a server node) sees.
    """
    url = postgresql.newDatabase()
    data = tmp_path / "gc"
    status, out, _ = run(capsys, "--data", str(data), "--store", url, "init")
    assert status == 0
    assert not DataDir(data).databasePath.exists()  # no unused SQLite file
    assert "sqlite3" not in out
    node: SQLStore = result(openStore(url, synchronousRunner))
    try:
        line = contact(node, "kiln7")  # type: ignore[arg-type]
        status, out, _ = run(capsys, "--data", str(data), "--store", url, "device", "list")
        assert status == 0 and fingerprint(line) in out
        assert (
            run(capsys, "--data", str(data), "--store", url, "device", "approve", "kiln7")[0] == 0
        )
        assert result(node.deviceByName("kiln7")).state == "approved"
        status, out, _ = run(capsys, "--data", str(data), "--store", url, "token", "create")
        assert status == 0
        assert result(node.listTokens())[0].usesLeft == 1
    finally:
        node.close()


def test_initWithSQLiteStoreElsewhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    init with --store makes no SQLite file in the data directory (the store is elsewhere):
    it migrates the named store, created private like the data directory's own.
    """
    data = tmp_path / "gc"
    elsewhere = tmp_path / "shared.sqlite3"
    url = f"sqlite://{elsewhere}"
    status, out, _ = run(capsys, "--data", str(data), "--store", url, "init")
    assert status == 0
    dataDir = DataDir(data)
    assert not dataDir.databasePath.exists()
    assert dataDir.isInitialised(url) and not dataDir.isInitialised()
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o600
    assert f"store {url} at schema version" in out
    assert run(capsys, "--data", str(data), "--store", url, "device", "list")[0] == 0
    assert not dataDir.databasePath.exists()


def test_badStoreURL(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unsupported --store scheme is a usage error; an unreachable server, one line."""
    status, _, err = run(capsys, "--data", str(data), "--store", "mysql://x/y", "device", "list")
    assert status == 2 and "unsupported store URL" in err
    status, _, err = run(
        capsys,
        "--data",
        str(data),
        "--store",
        "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2",
        "device",
        "list",
    )
    assert status == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_grantSelectorsTagsAndGroups(
    data: Path, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    The CLI grants on tag: and group: selectors with --for and --as, sets admin tags with
    +t/-t (including a leading -t), manages groups, and lists grants; each reaches the store.
    """
    keyFile = data.parent / "op.pub"
    keyFile.write_text(publicLine(newKey()))
    assert run(capsys, "--data", str(data), "user", "add", "op", "--key", str(keyFile))[0] == 0
    for name in ("kiln7", "oven2"):
        contact(store, name)
        assert run(capsys, "--data", str(data), "device", "approve", name)[0] == 0
    (op,) = result(store.listAccounts())

    status, out, _ = run(
        capsys, "--data", str(data), "grant", "op", "tag:lab", "--for", "8h", "--as", "pi"
    )
    assert status == 0 and "as pi" in out and "until" in out
    assert result(store.mayReach(op, "kiln7", T0)) is False
    status, out, _ = run(capsys, "--data", str(data), "tag", "kiln7", "+lab", "+old")
    assert status == 0 and "lab old" in out
    assert run(capsys, "--data", str(data), "tag", "kiln7", "-old")[0] == 0
    assert result(store.deviceByName("kiln7")).tags == ("lab",)
    assert result(store.mayReach(op, "kiln7", T0 + 8 * 3600 - 1)) is True
    assert result(store.mayReach(op, "kiln7", T0 + 8 * 3600)) is False
    assert result(store.loginUserFor(op, "kiln7", T0)) == "pi"

    assert run(capsys, "--data", str(data), "group", "add", "ovens", "oven2")[0] == 0
    assert run(capsys, "--data", str(data), "grant", "op", "group:ovens")[0] == 0
    assert result(store.mayReach(op, "oven2", T0)) is True
    status, out, _ = run(capsys, "--data", str(data), "group", "list", "--json")
    assert json.loads(out) == [{"group": "ovens", "devices": ["oven2"]}]

    status, out, _ = run(capsys, "--data", str(data), "grants", "--json")
    assert [(g["selector"], g["login_user"]) for g in json.loads(out)] == [
        ("group:ovens", None),
        ("tag:lab", "pi"),
    ]
    assert run(capsys, "--data", str(data), "group", "remove", "ovens")[0] == 0
    assert result(store.mayReach(op, "oven2", T0)) is False
    assert run(capsys, "--data", str(data), "ungrant", "op", "tag:lab")[0] == 0
    assert result(store.mayReach(op, "kiln7", T0)) is False
    status, out, _ = run(capsys, "--data", str(data), "device", "list", "--json")
    assert [r["tags"] for r in json.loads(out)] == [["lab"], []]


def test_accessArgumentErrors(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed selectors, tags, login users and removals fail with a status, no traceback."""
    cases = [
        (["grant", "op", "host:x"], 2, "invalid selector"),
        (["grant", "op", "tag:Bad"], 2, "invalid tag name"),
        (["tag", "kiln7", "lab"], 2, "expected +TAG or -TAG"),
        (["tag", "ghost", "+lab"], 1, "no device named"),
        (["group", "add", "g"], 2, "required"),
        (["group", "remove", "nothing"], 1, "nothing removed"),
    ]
    for argv, expected, message in cases:
        status, _, err = run(capsys, "--data", str(data), *argv)
        assert status == expected, argv
        assert message in err, (argv, err)
        assert "Traceback" not in err
