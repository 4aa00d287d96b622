"""
One JSON and time vocabulary: the admin CLI and the control shell print the same document
for the same object (the shell adding only what the running server knows), every JSON key
is snake_case and every JSON time ISO 8601 UTC with a Z; the time formatters themselves.
One store in a temporary data directory, a fixed clock, an empty registry, no reactor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from accesstunnel.keys import fingerprint
from accesstunnel.timetext import absoluteTime, isoTime, relativeTime, whenText
from groundcontrol.cli import main
from groundcontrol.control import ControlContext, runCommand
from groundcontrol.devicedetail import ONLINE_KEYS
from groundcontrol.documents import SESSION_KEYS, auditEventJSON
from groundcontrol.enrollment import hashSecret
from groundcontrol.registry import Registry
from groundcontrol.sessions import SessionRecord
from groundcontrol.store import (
    LinkCertificate,
    LinkRecord,
    SQLiteStore,
)
from groundcontrol.testing import newKey, publicLine, resultNow
from tests.test_accesslists import storeWithAccounts

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
HOUR = 3600.0
DAY = 24 * HOUR
NOW = T0 + HOUR  # when the commands run

ISO_Z = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
SNAKE = re.compile(r"\A[a-z][a-z0-9]*(_[a-z0-9]+)*\Z")
#: Keys that hold an instant: what this test checks are ISO strings or null.
TIME_KEY = re.compile(r"(_at|_seen|_since|_until|^not_after|^since|^at)\Z")


def cli(capsys: pytest.CaptureFixture[str], data: Path, *argv: str) -> tuple[str, str]:
    status = main(["--data", str(data), *argv], now=lambda: NOW)
    out, err = capsys.readouterr()
    assert status == 0, err
    return out, err


def ctl(store: SQLiteStore, *argv: str) -> tuple[str, str]:
    root = next(a for a in resultNow(store.listAccounts()) if a.name == "root")
    clock = Clock()
    clock.advance(NOW)
    context = ControlContext(root, store, Registry(), clock)
    result = resultNow(defer.Deferred.fromCoroutine(runCommand(context, list(argv))))
    assert result.status == 0, result.stderr
    return str(result.stdout), str(result.stderr)


def cliJSON(capsys: pytest.CaptureFixture[str], data: Path, *argv: str) -> Any:
    return json.loads(cli(capsys, data, *argv, "--json")[0])


def ctlJSON(store: SQLiteStore, *argv: str) -> Any:
    return json.loads(ctl(store, *argv, "--json")[0])


def without(document: dict[str, Any], keys: Any) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k not in keys}


@pytest.fixture
def fleet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """
    root (admin) and alice; kiln7 approved, tagged, in a group, claimed by alice, with a
    certificate it last linked with (by the hybrid key exchange); oven3 pending; two grants,
    two tokens.
    """
    s = storeWithAccounts(tmp_path / "gc")
    kiln = publicLine(newKey())
    resultNow(s.recordContact("kiln7", kiln, fingerprint(kiln), "SN-1", "192.0.2.7:4000", T0))
    code = hashSecret("ABCD-EFGH")
    resultNow(s.registerClaimCode(code, fingerprint(kiln), "kiln7", T0 + 300, T0))
    alice = next(a for a in resultNow(s.listAccounts()) if a.name == "alice")
    resultNow(s.claimDevice(code, alice, T0 + 7 * DAY, T0))
    resultNow(s.recordCertificate("kiln7", "0a1b", fingerprint(kiln), T0, T0 + 30 * DAY, T0))
    certificate = LinkCertificate("0a1b", ":".join(["5E"] * 32), T0 + 30 * DAY, "kiln7")
    resultNow(
        s.recordContact(
            "kiln7",
            kiln,
            fingerprint(kiln),
            "SN-1",
            "192.0.2.7:4000",
            T0 + 60,
            link=lambda _: LinkRecord(certificate, kex="mlkem768x25519-sha256"),
        )
    )
    resultNow(s.tagDevice("kiln7", ["lab"], [], "root", T0))
    resultNow(s.reportTags("kiln7", ["site-berlin"], T0))
    resultNow(s.addToGroup("ovens", ["kiln7"], "root", T0))
    oven = publicLine(newKey())
    resultNow(s.recordContact("oven3", oven, fingerprint(oven), None, "198.51.100.7:1", T0))
    resultNow(s.grant("alice", "tag:lab", "root", T0, expiresAt=T0 + 8 * HOUR, loginUser="pi"))
    resultNow(s.grant("alice", "group:ovens", "root", T0 - DAY, expiresAt=T0 - HOUR))
    resultNow(s.createToken("a" * 64, 3, T0 + DAY, "root", T0))
    resultNow(s.createToken("b" * 64, 1, T0 + HOUR / 2, "root", T0))
    capsys.readouterr()
    yield s
    s.close()


def test_sameDocumentsInBoth(fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """
    Devices, pending requests, a device's detail, grants, tokens, groups and accounts read
    the same from the CLI and the control shell; the shell adds only its live keys (online,
    connected), which the CLI, with no registry, leaves out.
    """
    data = fleet.data
    listed = cliJSON(capsys, data, "device", "list")
    devices = [d for d in listed if d["state"] != "pending"]
    requests = [d for d in listed if d["state"] == "pending"]
    assert [d["name"] for d in devices] == ["kiln7"] and [r["name"] for r in requests] == ["oven3"]
    assert (devices[0]["last_link_kex"], devices[0]["last_link_post_quantum"]) == (
        "mlkem768x25519-sha256",
        True,
    )
    ls = ctlJSON(fleet, "ls")
    assert [without(d, ONLINE_KEYS) for d in ls] == devices
    assert [d["online"] for d in ls] == [False]  # the registry is empty
    pending = ctlJSON(fleet, "pending")
    assert [without(r, {"connected"}) for r in pending] == requests

    shown = cliJSON(capsys, data, "device", "show", "kiln7")
    assert without(ctlJSON(fleet, "show", "kiln7"), ONLINE_KEYS) == shown
    assert (
        without(
            shown,
            {
                "last_link_auth",
                "last_certificate",
                "pending_requests",
                "grants",
            },
        )
        == (devices[0])
    )

    grants = cliJSON(capsys, data, "grants")
    assert ctlJSON(fleet, "grants") == grants
    assert shown["grants"] == [g for g in grants if g["state"] == "active"]
    assert cliJSON(capsys, data, "token", "list") == ctlJSON(fleet, "tokens")
    assert cliJSON(capsys, data, "group", "list") == ctlJSON(fleet, "group", "list")
    assert cliJSON(capsys, data, "user", "list") == ctlJSON(fleet, "users")


def test_kexFilterTheSameInBoth(fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """
    --kex means the same in device list and ls: kiln7 linked by the hybrid, old1 by
    curve25519 (an old agent), new2 approved and never linked; each kind, and two together,
    select the same devices in both, the CLI leaving the pending requests out.
    """
    for name, kex in (("old1", "curve25519-sha256"), ("new2", None)):
        line = publicLine(newKey())
        resultNow(fleet.recordContact(name, line, fingerprint(line), None, "192.0.2.8:1", T0))
        resultNow(fleet.approveDevice(name, "root", T0))
        if kex is not None:
            resultNow(
                fleet.recordContact(
                    name,
                    line,
                    fingerprint(line),
                    None,
                    "192.0.2.8:1",
                    T0,
                    link=lambda _, kex=kex: LinkRecord(kex=kex),
                )
            )
    expected = {
        ("post-quantum",): ["kiln7"],
        ("classical",): ["old1"],
        ("unknown",): ["new2"],
        ("classical", "unknown"): ["new2", "old1"],
    }
    for kinds, names in expected.items():
        flags = [word for kind in kinds for word in ("--kex", kind)]
        listed = cliJSON(capsys, fleet.data, "device", "list", *flags)
        assert [d["name"] for d in listed] == names, kinds
        assert [without(d, ONLINE_KEYS) for d in ctlJSON(fleet, "ls", *flags)] == listed, kinds


def test_tablesTheSameInBoth(fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The groups are one table in the CLI and the control shell."""
    data = fleet.data
    groups = cli(capsys, data, "group", "list")[0]
    assert groups == ctl(fleet, "group", "list")[0] == "GROUP  DEVICES\novens  kiln7\n"


def test_changesPrintTheDocumentOfWhatChanged(
    fleet: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A control-shell command that changes something prints, with --json, the changed
    object's document as listing it then gives it: a grant as in grants, a device as in ls.
    """
    granted = ctlJSON(fleet, "grant", "alice", "kiln7", "--for", "2h")
    assert granted in ctlJSON(fleet, "grants")
    assert granted["expires_at"] == isoTime(NOW + 2 * HOUR)
    tagged = ctlJSON(fleet, "tag", "kiln7", "+old")
    assert ctlJSON(fleet, "ls") == [tagged]
    assert tagged["tags"] == ["lab", "old"]


def test_cliChangesPrintTheShellsDocuments(
    fleet: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """
    The admin CLI's change commands take --json as the control shell's do and print the
    same document: the changed device, grant, group or token as listing it gives it (the
    shell adding only its live keys), what ungrant and group remove took away.
    """
    data = fleet.data
    revoked = cliJSON(capsys, data, "device", "revoke", "kiln7")
    assert revoked["state"] == "revoked"
    assert revoked in cliJSON(capsys, data, "device", "list")
    approved = cliJSON(capsys, data, "device", "approve", "kiln7")
    assert approved["state"] == "approved"
    assert approved in cliJSON(capsys, data, "device", "list")
    tagged = cliJSON(capsys, data, "tag", "kiln7", "+old")  # --json after the changes
    assert tagged["tags"] == ["lab", "old"]
    assert cliJSON(capsys, data, "tag", "--json", "kiln7") == tagged
    assert without(ctlJSON(fleet, "tag", "kiln7", "+old"), ONLINE_KEYS) == tagged

    granted = cliJSON(capsys, data, "grant", "alice", "kiln7", "--for", "2h")
    assert granted in cliJSON(capsys, data, "grants")
    byShell = ctlJSON(fleet, "grant", "alice", "kiln7", "--for", "2h")
    assert byShell["created_by"] == "root" and granted["created_by"].startswith("cli:")
    assert without(byShell, {"created_by"}) == without(granted, {"created_by"})
    ungranted = cliJSON(capsys, data, "ungrant", "alice", "kiln7")
    assert ungranted == {"user": "alice", "selector": "device:kiln7", "removed": True}
    ctl(fleet, "grant", "alice", "kiln7")
    assert ctlJSON(fleet, "ungrant", "alice", "kiln7") == ungranted

    grouped = cliJSON(capsys, data, "group", "add", "kilns", "kiln7")
    assert grouped == {"group": "kilns", "devices": ["kiln7"]}
    assert grouped in cliJSON(capsys, data, "group", "list")
    assert ctlJSON(fleet, "group", "add", "kilns", "kiln7") == grouped
    ungrouped = cliJSON(capsys, data, "group", "remove", "kilns", "kiln7")
    assert ungrouped == {"group": "kilns", "removed": ["kiln7"]}
    ctl(fleet, "group", "add", "kilns", "kiln7")
    assert ctlJSON(fleet, "group", "remove", "kilns", "kiln7") == ungrouped

    made = cliJSON(capsys, data, "token", "create", "--uses", "2")
    assert without(made, {"token"}) in cliJSON(capsys, data, "token", "list")
    assert len(made["token"]) == 43
    shellMade = ctlJSON(fleet, "tokens", "create", "--uses", "2")
    assert without(shellMade, {"id", "token", "created_by"}) == without(
        made, {"id", "token", "created_by"}
    )

    keyFile = tmp_path / "carol.pub"
    keyFile.write_text(publicLine(newKey()) + "\n")
    added = cliJSON(capsys, data, "user", "add", "carol", "--key", str(keyFile))
    assert added == {"name": "carol", "role": "operator"}
    assert added in cliJSON(capsys, data, "user", "list")


def test_confirmationsTheSameInBoth(fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """
    The CLI and the control shell confirm a grant, a tag change and a new token in the
    same words, with the same absolute and relative time.
    """
    data = fleet.data
    line = "granted alice access to tag:x as pi until 2023-11-15T07:13:20Z (in 8 h)"
    assert cli(capsys, data, "grant", "alice", "tag:x", "--for", "8h", "--as", "pi")[0] == (
        line + "\n"
    )
    assert ctl(fleet, "grant", "alice", "tag:x", "--for", "8h", "--as", "pi")[0] == line + "\n"
    tags = "kiln7: tags lab; reported by the agent site-berlin\n"
    assert cli(capsys, data, "tag", "kiln7")[0] == ctl(fleet, "tag", "kiln7")[0] == tags
    assert cli(capsys, data, "ungrant", "alice", "tag:x")[0] == (
        "removed alice's grant for tag:x\n"
    )
    _, cliSays = cli(capsys, data, "token", "create", "--expires", "1d")
    _, ctlSays = ctl(fleet, "tokens", "create", "--expires", "1d")
    expected = "use(s), expires 2023-11-15T23:13:20Z (in 24 h); shown only now"
    assert expected in cliSays and expected in ctlSays
    assert cliSays.replace("token 3", "token 4") == ctlSays


def _walk(document: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) for every key of every object in C{document}."""
    if isinstance(document, dict):
        for key, value in document.items():
            yield path, key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(document, list):
        for i, item in enumerate(document):
            yield from _walk(item, f"{path}[{i}]")


def test_everyJSONKeySnakeCaseAndTimeISO(fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """
    Across every --json listing of both front ends and the shell's change documents: keys
    are snake_case; a time is an ISO 8601 UTC string with a Z, or null; no number is an
    epoch time in disguise.
    """
    data = fleet.data
    documents = [
        cliJSON(capsys, data, *argv)
        for argv in (
            ("device", "list"),
            ("device", "show", "kiln7"),
            ("grants",),
            ("token", "list"),
            ("group", "list"),
            ("user", "list"),
        )
    ]
    documents += [
        ctlJSON(fleet, *argv)
        for argv in (
            ("ls",),
            ("show", "kiln7"),
            ("show", "oven3"),
            ("pending",),
            ("grants",),
            ("tokens",),
            ("group", "list"),
            ("users",),
            ("whoami",),
            ("sessions", "--all"),
            ("grant", "alice", "kiln7", "--for", "1h"),
            ("tag", "kiln7", "+x"),
            ("tokens", "create"),
            ("claim", "renew", "kiln7", "--for", "1d"),
            ("revoke", "kiln7"),
            ("approve", "kiln7"),
            ("claim", "release", "kiln7"),
        )
    ]
    assert _assertVocabulary(documents) > 40  # the walk did see the times


def _assertVocabulary(documents: Any) -> int:
    """Every key snake_case, every time ISO Z or null, no epoch number; how many times."""
    times = 0
    for path, key, value in _walk(documents):
        assert SNAKE.match(key), (path, key)
        if TIME_KEY.search(key):
            times += value is not None
            assert value is None or ISO_Z.match(value), (path, key, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            assert value < 1e8, (path, key, value)
    return times


def test_auditEventsInTheVocabulary(fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """
    Every audit row the store writes (claims, renewals, releases, approvals, revocations,
    certificates, grants, tokens, tags, groups), kept as written (camelCase, epoch times),
    reads out through auditEventJSON (what a webhook is sent) with snake_case keys and ISO Z
    times only.
    """
    for argv in (
        ("claim", "renew", "kiln7", "--for", "1d"),
        ("claim", "release", "kiln7"),
        ("revoke", "kiln7"),
        ("approve", "kiln7"),
        ("grant", "alice", "kiln7", "--for", "1h", "--as", "pi"),
        ("ungrant", "alice", "kiln7"),
        ("tokens", "create"),
        ("group", "remove", "ovens"),
    ):
        ctl(fleet, *argv)
    rows = resultNow(fleet.auditSince(0, 1000))
    assert any("leaseUntil" in row.detail for row in rows)  # stored as written
    documents = [auditEventJSON(r.id, r.event, r.device, r.actor, r.at, r.detail) for r in rows]
    kinds = {d["event"] for d in documents}
    assert {"device.claimed", "claim.renewed", "claim.released", "certificate.issued"} <= kinds
    assert {"grant.added", "token.created", "device.revoked", "device.approved"} <= kinds
    assert _assertVocabulary(documents) > len(documents) + 8  # the details had times too


def test_oldRowsDurationsToATenthOfASecond() -> None:
    """
    A device.offline row stored before durations were rounded (connectedFor
    23.138279676437378) reads out as 23.1, as new rows are written; device.flapping's
    window reads as it was stored.
    """
    offline = auditEventJSON(
        1, "device.offline", "kiln7", None, T0, {"connectedFor": 23.138279676437378}
    )
    flapping = auditEventJSON(2, "device.flapping", "kiln7", None, T0, {"window": 60.0})
    assert (offline["detail"], flapping["detail"]) == ({"connected_for": 23.1}, {"window": 60.0})


def test_sessionKeysAreTheRecordsKeys() -> None:
    """A session document has every key its audit record has, and its state and status."""
    record = SessionRecord(id="s", account="a", device="d", channelType="session", startedAt=T0)
    assert set(SESSION_KEYS) == set(record.toJSON()) | {"state", "status"}


def test_isoTime() -> None:
    """JSON's times: UTC to the second with a Z; none is null."""
    assert isoTime(T0) == "2023-11-14T22:13:20Z"
    assert isoTime(T0 + 0.999) == "2023-11-14T22:13:20Z"
    assert isoTime(None) is None
    assert absoluteTime(T0) == "2023-11-14T22:13:20Z"
    assert (absoluteTime(None), absoluteTime(None, "never")) == ("-", "never")


@pytest.mark.parametrize(
    ("offset", "text"),
    [
        (0, "now"),
        (0.5, "now"),
        (-1, "1 s ago"),
        (-119, "119 s ago"),
        (-120, "2 min ago"),
        (-7199, "119 min ago"),
        (-7200, "2 h ago"),
        (8 * HOUR, "in 8 h"),
        (-(48 * HOUR - 1), "47 h ago"),
        (48 * HOUR, "in 2 d"),
        (7 * DAY, "in 7 d"),
    ],
)
def test_relativeTime(offset: float, text: str) -> None:
    """How long ago or how soon, in whole units rounded down: s, min, h, d."""
    assert relativeTime(T0 + offset, T0) == text


def test_whenText() -> None:
    """A time for a line people read: absolute, then relative; none is the word given."""
    assert whenText(T0 + 8 * HOUR, T0) == "2023-11-15T06:13:20Z (in 8 h)"
    assert whenText(None, T0) == "-"
    assert relativeTime(None, T0) == "never"
