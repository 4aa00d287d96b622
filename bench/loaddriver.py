#!/usr/bin/env python3
"""
bench/loaddriver.py: thousands of real agent links to one groundcontrol, from one process.

Every agent is the product's own link code: an L{agent.link.AgentLinkFactory} with
its own ed25519 device key, L{agent.link.AgentTransport} (policy, pinned host key,
keepalives, rekeying), kept up by L{agent.link.linkService} (ClientService with the
agent's jittered backoff), with the agent's L{agent.enrollment.Enrollment} (hello and
certificate) unless ``--no-enrollment``. The only thing added is a count: a transport
subclass that notes when its link is up (authenticated, the connection service
started: the moment groundcontrol makes the device routable) and when it goes down.

Each connection binds a source address in 127.0.0.0/8, ``--per-source`` agents per
address counting up from ``--first-source`` (default 127.0.0.1, the address the
operators' ``ssh`` and the real agent of bench/scale use: during the reconnect storm
the operator probes come from an agent address, so the limiter must tell them apart by
their SSH version line, not their source), so 10,000 links do not exhaust one address's
ephemeral ports and the per-source handshake cap sees a fleet of hosts, not one. With
``--per-source 1`` every agent has an address of its own (127.0.0.1 .. 127.0.39.16 for
10,000), as devices each behind its own NAT; a fleet that would run past 127.255.255.254
is refused at start.

Every link sends the agent's own SSH version line (L{agent.link.AgentTransport}'s
C{ourVersionString}: the driver's transport is the agent's, subclassed only to count).

Reports one JSON line per ``--every`` seconds on stdout::

    {"t": 1764079200.12, "up": 9876, "tcp": 9901, "connects": 10233, "early_drops": 310}

``up``: links authenticated now; ``tcp``: TCP connections open now (so ``tcp - up`` is
what is in its handshake from this side); ``connects``: TCP connections made so far;
``early_drops``: links that closed before they were up (refused by the handshake
limiter, or cut by a restart). The key file is ``name seed-hex`` lines
(bench/scale_fleet.py writes it).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import endpoints, task
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_fleet import loadKeys
from scale_lib import raiseFileLimit

from accesstunnel.writethrough import writeThroughTCP
from agent.identity import ServerKeyPin
from agent.link import (
    AGENT_VERSION,
    AgentLinkFactory,
    AgentTransport,
    LinkSettings,
    linkService,
)


class Counts:
    """What the report line says."""

    def __init__(self) -> None:
        self.up = 0
        self.tcp = 0
        self.connects = 0
        self.earlyDrops = 0


COUNTS = Counts()


class CountingTransport(AgentTransport):
    """The agent's transport, counting links made, up and lost."""

    _counted = False

    def connectionMade(self) -> None:
        COUNTS.tcp += 1
        COUNTS.connects += 1
        super().connectionMade()

    def linkUp(self) -> None:
        super().linkUp()
        if not self._counted:
            self._counted = True
            COUNTS.up += 1

    def connectionLost(self, reason: Any = None) -> None:
        COUNTS.tcp -= 1
        if self._counted:
            COUNTS.up -= 1
        else:
            COUNTS.earlyDrops += 1
        super().connectionLost(reason)


class CountingFactory(AgentLinkFactory):
    protocol = CountingTransport


LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


def sourceAddress(first: str, index: int, perSource: int) -> str:
    """
    The source address of agent C{index}: C{perSource} agents per address, counting up
    from C{first} (an address, or N for 127.0.0.N) within 127.0.0.0/8; never outside it
    (nor its network or broadcast address).
    """
    start = ipaddress.IPv4Address(f"127.0.0.{first}" if first.isdigit() else first)
    address = start + index // perSource
    if not (start in LOOPBACK and LOOPBACK.network_address < address < LOOPBACK.broadcast_address):
        raise ValueError(f"source address {address} (agent {index}) is outside 127.0.0.0/8")
    return str(address)


class _NullStatus:
    """Stands in for STATE/status.json when --no-state: nothing written."""

    def update(self, **fields: Any) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--keys", type=Path, required=True, help="name seed-hex lines")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first SKIP keys")
    ap.add_argument("--count", type=int, help="use this many keys (default: all)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--server-key", required=True, help="groundcontrol's host key (.pub file)")
    ap.add_argument("--per-source", type=int, default=100, help="agents per source address")
    ap.add_argument(
        "--first-source",
        default="127.0.0.1",
        help="the first source address (or N for 127.0.0.N); they count up in 127.0.0.0/8",
    )
    ap.add_argument("--rate", type=float, default=2000.0, help="agents started per second")
    ap.add_argument("--every", type=float, default=0.5, help="report interval, seconds")
    ap.add_argument(
        "--state",
        type=Path,
        help="state directories for the agents' enrollment (status.json, certificate); "
        "put it on tmpfs. Default: enrollment runs but writes nothing",
    )
    ap.add_argument("--no-enrollment", action="store_true", help="no hello, no certificate")
    ap.add_argument("--log", type=Path, default=Path("/dev/null"), help="warnings and errors")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after start")
    a = ap.parse_args()

    from twisted.internet import reactor

    agents = loadKeys(a.keys)[a.skip :]
    if a.count is not None:
        agents = agents[: a.count]
    if a.per_source < 1:
        ap.error("--per-source must be at least 1")
    try:
        sources = [sourceAddress(a.first_source, i, a.per_source) for i in range(len(agents))]
    except ValueError as e:
        ap.error(str(e))
    limit = raiseFileLimit(len(agents) + 256)
    logFile = a.log.open("a")
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(logFile),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    pin = ServerKeyPin.parse(a.server_key)

    from agent.enrollment import Enrollment
    from agent.session import SessionChannel, SessionEnvironment

    environment = SessionEnvironment(home="/nonexistent-scale-home")

    def sessionFactory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
        return SessionChannel(
            environment, reactor, remoteWindow=windowSize, remoteMaxPacket=maxPacket, conn=conn
        )

    def forwardFactory(conn: Any, windowSize: int, maxPacket: int, data: bytes) -> Any:
        from agent.forward import ForwardChannel

        return ForwardChannel.open(
            reactor, data, remoteWindow=windowSize, remoteMaxPacket=maxPacket, conn=conn
        )

    services = []
    for i, (name, key) in enumerate(agents):
        settings = LinkSettings(name=name, deviceKey=key, serverKey=pin, serial=f"bench-{name}")
        enrollment = None
        if not a.no_enrollment:
            stateDir = (a.state / name) if a.state else Path("/nonexistent-scale-state") / name
            if a.state:
                stateDir.mkdir(parents=True, exist_ok=True)
            enrollment = Enrollment(
                stateDir,
                reactor,
                requestedName=name,
                serial=settings.serial,
                version=AGENT_VERSION,
            )
            if not a.state:
                enrollment.status = _NullStatus()  # type: ignore[assignment]
        factory = CountingFactory(settings, reactor, sessionFactory, forwardFactory, enrollment)
        # TCP connections that write through, as the agent's own connectors make them.
        endpoint = endpoints.TCP4ClientEndpoint(
            writeThroughTCP(reactor), a.host, a.port, timeout=30, bindAddress=(sources[i], 0)
        )
        services.append(linkService(endpoint, factory, reactor))

    started = 0

    def startSome() -> None:
        nonlocal started
        batch = max(1, int(a.rate * 0.05))
        for s in services[started : started + batch]:
            s.startService()
        started += batch
        if started >= len(services):
            starter.stop()
            if a.gc_freeze:
                gc.collect()
                gc.freeze()

    def report() -> None:
        print(
            json.dumps(
                {
                    "t": round(time.time(), 3),
                    "agents": len(services),
                    "started": min(started, len(services)),
                    "up": COUNTS.up,
                    "tcp": COUNTS.tcp,
                    "connects": COUNTS.connects,
                    "early_drops": COUNTS.earlyDrops,
                }
            ),
            flush=True,
        )

    print(json.dumps({"event": "ready", "agents": len(agents), "fd_limit": limit}), flush=True)
    starter = task.LoopingCall(startSome)
    starter.clock = reactor
    starter.start(0.05)
    task.LoopingCall(report).start(a.every)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
