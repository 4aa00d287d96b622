"""
End to end over each transport: real twistd groundcontrol and tunnel-agent, the real OpenSSH
client on the operator side (over the plain listener), a real HTTP proxy (tinyproxy), all on
127.0.0.1 with kernel-chosen ports.

These run against the command line as the tap wiring defines it (``--listen tls://...
--tls-cert F --tls-key F``, agent ``--server tls://... --tls-ca F``, ``--proxy``,
``--config``); until that wiring is in, they skip.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from OpenSSL import crypto

from accesstunnel.timetext import isoTime
from groundcontrol import pki
from tests.e2e.harness import LOOPBACK, Agent, Fleet, HarnessError, Process, waitFor
from tests.ports import closedPort, reservedPort


def _wired() -> bool:
    import agent.tap
    import groundcontrol.tap

    def names(options: type) -> set[str]:
        return {p[0] for p in getattr(options, "optParameters", [])} | {
            m[4:].replace("_", "-") for m in dir(options) if m.startswith("opt_")
        }

    return {"tls-cert", "tls-key"} <= names(groundcontrol.tap.Options) and {
        "tls-ca",
        "proxy",
        "config",
    } <= names(agent.tap.Options)


pytestmark = pytest.mark.skipif(not _wired(), reason="waiting for tap wiring")


def listening(fleet: Fleet) -> dict[str, int]:
    """Bound port of each listener, by the scheme of its address."""
    data = json.loads((fleet.gc.data / "run" / "listening.json").read_text())
    return {entry["spec"].split(":")[0]: entry["port"] for entry in data["listening"]}


def startServer(fleet: Fleet, *listen: str) -> dict[str, int]:
    certFile, keyFile = fleet.serverCertificate([LOOPBACK, "localhost"])
    fleet.gc.stop()
    extra: list[str] = ["--tls-cert", str(certFile), "--tls-key", str(keyFile)]
    for address in listen:
        extra += ["--listen", address]
    fleet.startServer(*extra)
    return listening(fleet)


def startAgent(fleet: Fleet, name: str, servers: list[str], *extra: str) -> Agent:
    """An agent with several --server addresses (the harness's own takes one)."""
    agent = Agent(fleet.base, name)
    argv: list[str] = []
    for server in servers[1:]:
        argv += ["--server", server]
    agent.start(
        servers[0],
        str(fleet.gc.data / "ssh_host_ed25519_key.pub"),
        "--tls-ca",
        str(fleet.gc.data / "ca" / "ca.crt"),
        *argv,
        *extra,
    )
    fleet.agents.append(agent)
    return agent


def issueDeviceCertificate(
    fleet: Fleet,
    agent: Agent,
    ca: pki.FleetCA | None = None,
    expired: bool = False,
    name: str | None = None,
) -> pki.IssuedCertificate:
    """
    Write a certificate for the agent's key where the agent looks for it (STATE/device.crt),
    naming the agent's device or C{name}.
    """
    publicKey = waitFor(
        lambda: (
            (agent.state / "device_ed25519_key.pub").exists()
            and (agent.state / "device_ed25519_key.pub").read_text()
        ),
        30,
        "the agent's key",
    )
    now = datetime.now(UTC)
    issued = pki.issueDeviceCertificate(
        ca or pki.FleetCA.load(fleet.gc.data / "ca"),
        name or agent.name,
        None,
        publicKey.strip(),
        now - timedelta(days=10) if expired else now,
        timedelta(days=1) if expired else pki.DEFAULT_DEVICE_LIFETIME,
    )
    (agent.state / "device.crt").write_bytes(issued.pem)
    return issued


class TinyProxy:
    """tinyproxy on 127.0.0.1 with Basic auth, its own config, no daemonising."""

    def __init__(self, base: Path, user: str = "agent", password: str = "s3cret") -> None:
        binary = shutil.which("tinyproxy")
        if binary is None:
            pytest.fail("tinyproxy is required (apt-get install tinyproxy)")
        self.port = reservedPort()
        self.log = base / "tinyproxy.log"
        config = base / "tinyproxy.conf"
        config.write_text(
            f"Port {self.port}\nListen {LOOPBACK}\nTimeout 120\nMaxClients 50\n"
            f"Allow 127.0.0.1\nBasicAuth {user} {password}\nLogLevel Connect\n"
            f'LogFile "{self.log}"\n'
        )
        self.url = f"http://{user}:{password}@{LOOPBACK}:{self.port}"
        self.process = Process([binary, "-d", "-c", str(config)], base / "tinyproxy.out", base)

        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex((LOOPBACK, self.port)) == 0

        waitFor(up, 10, "tinyproxy to listen")

    def connects(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if "CONNECT" in line and "Request" in line]

    def stop(self) -> None:
        self.process.stop()


def approveAndReach(fleet: Fleet, name: str) -> None:
    fleet.waitPending(name)
    fleet.gc.cli("device", "approve", name)
    fleet.waitRoutable(fleet.operators["alice"], name)


def test_tlsLink(fleet: Fleet) -> None:
    """
    An agent with a fleet certificate links over tls:// (server verified against the pinned
    fleet CA); an operator's real ssh reaches it through groundcontrol.
    """
    ports = startServer(fleet, f"tls://{LOOPBACK}:0")
    agent = startAgent(fleet, "kiln7", [f"tls://{LOOPBACK}:{ports['tls']}"])
    issueDeviceCertificate(fleet, agent)
    approveAndReach(fleet, "kiln7")
    result = fleet.operators["alice"].ssh("dev_kiln7", "echo", "over-tls")
    assert result.stdout.strip() == "over-tls"


def test_tlsWithoutCertificateQueuesAsPending(fleet: Fleet) -> None:
    """A device with no certificate yet still connects over TLS and waits as pending."""
    ports = startServer(fleet, f"tls://{LOOPBACK}:0")
    startAgent(fleet, "fresh1", [f"tls://{LOOPBACK}:{ports['tls']}"])
    fleet.waitPending("fresh1")


@pytest.mark.parametrize("problem", ["wrong-ca", "expired", "revoked"])
def test_tlsBadCertificateRefused(fleet: Fleet, problem: str) -> None:
    """
    A certificate from another CA, an expired one, or a revoked one is refused: the device
    never becomes reachable. The agent then tries once without its certificate, by its key
    alone: a revoked device is refused there too (never pending); an unknown key may only
    wait as pending; an expired certificate is not even presented.
    """
    ports = startServer(fleet, f"tls://{LOOPBACK}:0")
    name = "bad1"
    agent = Agent(fleet.base, name)
    agent.state.mkdir(parents=True, exist_ok=True)
    if problem == "revoked":
        agent = startAgent(fleet, name, [f"tls://{LOOPBACK}:{ports['tls']}"])
        issueDeviceCertificate(fleet, agent)
        approveAndReach(fleet, name)
        # Revoking closes the live link at once; the certificate is refused from then on.
        fleet.gc.cli("device", "revoke", name)
    else:
        from cryptography.hazmat.primitives.asymmetric import ed25519 as _ed
        from twisted.conch.ssh import keys

        key = keys.Key(_ed.Ed25519PrivateKey.generate())
        (agent.state / "device_ed25519_key").write_bytes(key.toString("OPENSSH"))
        (agent.state / "device_ed25519_key").chmod(0o600)
        (agent.state / "device_ed25519_key.pub").write_text(
            key.public().toString("OPENSSH").decode() + "\n"
        )
        ca = (
            pki.FleetCA.create(fleet.base / "other-ca", datetime.now(UTC), "Other CA")
            if problem == "wrong-ca"
            else None
        )
        issueDeviceCertificate(fleet, agent, ca=ca, expired=problem == "expired")
        agent = startAgent(fleet, name, [f"tls://{LOOPBACK}:{ports['tls']}"])
    operator = fleet.operators["alice"]
    with pytest.raises(HarnessError):
        fleet.waitRoutable(operator, name, timeout=8)
    states = [d.get("state", "") for d in fleet.gc.devices() if d.get("name") == name]
    if problem == "revoked":
        assert states == ["revoked"], states
    else:
        assert all("pending" in state for state in states), states
    assert agent.process is not None and agent.process.running()


def test_reapprovedDeviceComesBackOverTLS(fleet: Fleet) -> None:
    """
    Revoked, then approved again by an admin: the agent, whose certificate stays
    revoked, is not locked out; it returns by its key and gets a fresh certificate.
    """
    ports = startServer(fleet, f"tls://{LOOPBACK}:0")
    agent = startAgent(fleet, "back1", [f"tls://{LOOPBACK}:{ports['tls']}"])
    approveAndReach(fleet, "back1")  # it then fetches its certificate over the link
    certificate = agent.state / "device.crt"
    waitFor(certificate.exists, 30, "the first certificate")
    first = certificate.read_bytes()
    fleet.gc.cli("device", "revoke", "back1")
    fleet.gc.cli("device", "approve", "back1")
    fleet.waitRoutable(fleet.operators["alice"], "back1", timeout=60)
    waitFor(lambda: certificate.read_bytes() != first, 30, "a fresh certificate")


def test_wssThroughProxyWhileDirectIsClosed(fleet: Fleet) -> None:
    """
    The direct ssh:// route is closed; the agent falls back to wss:// through a real HTTP
    proxy with Basic auth, and the operator reaches the device over it.
    """
    ports = startServer(fleet, f"wss://{LOOPBACK}:0/tunnel")
    proxy = TinyProxy(fleet.base)
    try:
        agent = startAgent(
            fleet,
            "kiln7",
            [f"ssh://{LOOPBACK}:{closedPort()}", f"wss://{LOOPBACK}:{ports['wss']}/tunnel"],
            "--proxy",
            proxy.url,
        )
        issueDeviceCertificate(fleet, agent)
        approveAndReach(fleet, "kiln7")
        assert proxy.connects(), "the link should have gone through the proxy"
        result = fleet.operators["alice"].ssh("dev_kiln7", "echo", "over-wss")
        assert result.stdout.strip() == "over-wss"
    finally:
        proxy.stop()


def test_silentProxy(fleet: Fleet) -> None:
    """
    An HTTP proxy that takes the connection (a listening socket's backlog) and never
    answers the CONNECT: the agent says so after the 15 s attempt timeout, naming the proxy
    (it said "no connection in 15 s", which blamed the server), and links over its next
    address, ssh:// direct.
    """
    ports = startServer(fleet, f"wss://{LOOPBACK}:0/tunnel")
    with socket.socket() as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(8)
        proxy = f"{LOOPBACK}:{silent.getsockname()[1]}"
        wss = f"wss://{LOOPBACK}:{ports['wss']}/tunnel"
        direct = f"ssh://{fleet.serverAddress.removeprefix('tcp:')}"
        agent = startAgent(fleet, "kiln7", [wss, direct], "--proxy", f"http://{proxy}")
        process = agent.process
        assert process is not None
        said = (
            f"could not reach {wss} via proxy {proxy}: the proxy {proxy} took the connection "
            "but did not answer the CONNECT in 15 s"
        )
        waitFor(lambda: said in process.output(), 40, "the agent to give up on the proxy")
        approveAndReach(fleet, "kiln7")


def test_fallbackOrderAndMemory(fleet: Fleet) -> None:
    """
    With a closed address first, the agent links over the next one, remembers it in its
    state directory, and after a restart it is the first address tried.
    """
    ports = startServer(fleet, f"tls://{LOOPBACK}:0")
    servers = [f"ssh://{LOOPBACK}:{closedPort()}", f"tls://{LOOPBACK}:{ports['tls']}"]
    agent = startAgent(fleet, "kiln7", servers)
    issueDeviceCertificate(fleet, agent)
    approveAndReach(fleet, "kiln7")
    remembered = list(agent.state.glob("*server*.json"))
    assert remembered and "tls://" in remembered[0].read_text()
    agent.stop()
    fleet.agents.remove(agent)
    again = startAgent(fleet, "kiln7", servers)
    fleet.waitRoutable(fleet.operators["alice"], "kiln7")
    assert again.process is not None
    assert f"ssh://{LOOPBACK}" not in again.process.output().split("link up")[0].split("trying")[-1]


def test_configReloadOnSIGHUP(fleet: Fleet) -> None:
    """A server list changed in the config file takes effect on SIGHUP, without a restart."""
    ports = startServer(fleet, f"tls://{LOOPBACK}:0")
    config = fleet.base / "agent.toml"
    config.write_text(f'servers = ["ssh://{LOOPBACK}:{closedPort()}"]\n')
    agent = startAgent(
        fleet, "kiln7", [f"ssh://{LOOPBACK}:{closedPort()}"], "--config", str(config)
    )
    process = agent.process
    assert process is not None
    # The handler is installed once the agent runs; a SIGHUP before that would kill it.
    waitFor(lambda: "SIGHUP re-reads" in process.output(), 30, "the SIGHUP handler")
    config.write_text(f'servers = ["tls://{LOOPBACK}:{ports["tls"]}"]\n')
    pid = process.pid
    process.signal(signal.SIGHUP)
    issueDeviceCertificate(fleet, agent)
    approveAndReach(fleet, "kiln7")
    assert agent.process is process and process.pid == pid and process.running()


def assertLinkedByCertificate(fleet: Fleet, agent: Agent) -> None:
    """
    groundcontrol logged the agent's link as made by the certificate the agent holds, and
    `groundcontrol device show` names that certificate (serial, OpenSSL's SHA-256
    fingerprint, expiry) as the one the device last linked with.
    """
    pem = (agent.state / "device.crt").read_bytes()
    held = pki.verifyDeviceCertificate(
        pki.FleetCA.load(fleet.gc.data / "ca"), pem, datetime.now(UTC)
    )
    sha256 = crypto.load_certificate(crypto.FILETYPE_PEM, pem).digest("sha256").decode()
    assert fleet.gc.process is not None
    gcLog = fleet.gc.process.output()
    assert f"device {agent.name} connected from " in gcLog, gcLog
    assert f"by certificate {held.serialNumber} (CN={agent.name}, SHA-256 {sha256}," in gcLog
    shown = json.loads(fleet.gc.cli("device", "show", agent.name, "--json").stdout)
    assert shown["last_link_auth"] == "certificate", shown
    last = shown["last_certificate"]
    assert (last["serial_number"], last["fingerprint"]) == (held.serialNumber, sha256), shown
    assert last["not_after"] == isoTime(held.notAfter.timestamp()), shown
    text = fleet.gc.cli("device", "show", agent.name).stdout
    assert held.serialNumber in text and sha256 in text, text


@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_wssLinkPresentsDeviceCertificate(fleet: Fleet, route: str) -> None:
    """
    An approved agent that holds its fleet certificate links over wss:// with it on its
    first attempt, directly or through a real HTTP proxy, and groundcontrol checks that
    certificate at the agent's login.

    The certificate-presenting wss:// attempt once died in autobahn's connectionMade; the
    agent waited out the attempt (15 s), logged that it could not reach the address and
    came back without the certificate, by its key alone, so the device still became
    reachable. Hence the agent's own record of its attempts is asserted (one attempt, no
    failure). groundcontrol logs the accepted link as made by that certificate and
    `groundcontrol device show` names it (serial, fingerprint, expiry); a certificate
    naming another device, for this agent's key, is refused at the SSH login with a log
    line, which only a certificate that got through the WebSocket to the login can cause
    (the key-only fallback logs in).
    """
    ports = startServer(fleet, f"wss://{LOOPBACK}:0/tunnel")
    server = f"wss://{LOOPBACK}:{ports['wss']}/tunnel"
    proxy = TinyProxy(fleet.base) if route == "proxy" else None
    extra = ("--proxy", proxy.url) if proxy is not None else ()
    try:
        # Approved by its key over wss://, the agent fetches its certificate over the link.
        first = startAgent(fleet, "kiln7", [server], *extra)
        approveAndReach(fleet, "kiln7")
        waitFor((first.state / "device.crt").exists, 30, "the device certificate")
        first.stop()
        fleet.agents.remove(first)

        withCertificate = startAgent(fleet, "kiln7", [server], *extra)
        fleet.waitRoutable(fleet.operators["alice"], "kiln7")
        assert withCertificate.process is not None
        log = withCertificate.process.output()
        assert f"link up over wss via {server}" in log, log
        assert "could not reach" not in log and "Unhandled Error" not in log, log
        result = fleet.operators["alice"].ssh("dev_kiln7", "echo", "over-wss")
        assert result.stdout.strip() == "over-wss"
        assertLinkedByCertificate(fleet, withCertificate)
        withCertificate.stop()
        fleet.agents.remove(withCertificate)

        issueDeviceCertificate(fleet, withCertificate, name="kiln8")
        startAgent(fleet, "kiln7", [server], *extra)
        assert fleet.gc.process is not None
        gcLog = fleet.gc.process
        waitFor(
            lambda: "device kiln7 presented the certificate of kiln8; refused" in gcLog.output(),
            30,
            "groundcontrol to refuse the certificate naming kiln8",
        )
        if proxy is not None:
            assert proxy.connects(), "the links should have gone through the proxy"
    finally:
        if proxy is not None:
            proxy.stop()
