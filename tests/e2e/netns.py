"""
Network namespaces and veth pairs for fault tests (needs root and iproute2).

A L{Namespace} is a network namespace of our own, joined to the host namespace by veth
pairs (L{VethLink}), each with a private /30 that exists only between its two ends. A
process started with L{Namespace.argv} sees only the namespace's loopback and its veth
ends, so its one way out is the link; L{VethLink.blackhole} sets the namespace's end down,
and from then on every packet either way is dropped without a reset, like a cable pulled
somewhere between a device and the server.

Why the namespace's end, not the host's: the host end stays administratively up with no
carrier, so its /30 route stays in the host's table (Linux keeps routes of a link that has
lost carrier unless C{ignore_routes_with_linkdown} is set, which L{Namespace.create}
checks) and groundcontrol's replies are dropped at the veth instead of following the
host's default route somewhere else. Inside the namespace there is no route out at all.

L{Namespace.destroy} deletes the namespace, which removes its veth ends and so the host
ends too; callers kill their processes in it first.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

#: Subnets are carved from here (/30 each), avoiding any the host already has.
POOL = ipaddress.IPv4Network("10.200.0.0/16")


class NamespaceUnavailableError(Exception):
    """Not root, no iproute2, or the kernel refused to make a namespace."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _hostSubnets() -> list[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout
    networks: list[ipaddress.IPv4Network] = []
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            networks.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network)
    return networks


def _freeSubnet() -> ipaddress.IPv4Network:
    used = _hostSubnets()
    for _ in range(100):
        subnet = ipaddress.IPv4Network(
            f"{POOL.network_address + 4 * random.randrange(POOL.num_addresses // 4)}/30"
        )
        if not any(subnet.overlaps(n) for n in used):
            return subnet
    raise NamespaceUnavailableError("no free /30 in 10.200.0.0/16")


@attrs.define
class VethLink:
    """
    One veth pair: C{hostAddress} in the host namespace, C{namespaceAddress} in ours.
    """

    namespace: Namespace
    hostName: str
    innerName: str
    hostAddress: str
    namespaceAddress: str

    def blackhole(self) -> None:
        """Set the namespace's end down: a silent blackhole both ways (no RST, no ICMP)."""
        _ip("-n", self.namespace.name, "link", "set", self.innerName, "down")

    def restore(self) -> None:
        """Set it up again; the kernel puts the /30 routes back."""
        _ip("-n", self.namespace.name, "link", "set", self.innerName, "up")


class Namespace:
    """A network namespace of our own with veth links to the host namespace."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 100000:05d}{random.randrange(1000):03d}"
        self.name = f"at-{self.tag}"
        self.links: list[VethLink] = []
        self.created = False
        #: Called first by L{destroy}: stop what runs inside (nothing may outlive it).
        self.beforeDestroy: list[Callable[[], None]] = []

    def create(self) -> Namespace:
        if os.geteuid() != 0:
            raise NamespaceUnavailableError("network namespaces need root")
        try:
            result = _ip("netns", "add", self.name, check=False)
        except FileNotFoundError:
            raise NamespaceUnavailableError("iproute2 ('ip') is not installed") from None
        if result.returncode != 0:
            raise NamespaceUnavailableError(f"ip netns add refused: {result.stderr.strip()}")
        self.created = True
        ignore = Path("/proc/sys/net/ipv4/conf/all/ignore_routes_with_linkdown")
        if ignore.exists() and ignore.read_text().strip() != "0":
            self.destroy()
            raise NamespaceUnavailableError(
                "net.ipv4.conf.all.ignore_routes_with_linkdown is set: a blackholed link's "
                "traffic would leave by the default route"
            )
        _ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def addLink(self) -> VethLink:
        """A new veth pair with its own /30: .1 on the host end, .2 in the namespace."""
        index = len(self.links)
        hostName, innerName = f"ath{self.tag}{index}", f"atn{self.tag}{index}"
        subnet = _freeSubnet()
        hostAddress, innerAddress = (str(a) for a in list(subnet.hosts())[:2])
        _ip("link", "add", hostName, "type", "veth", "peer", "name", innerName)
        link = VethLink(self, hostName, innerName, hostAddress, innerAddress)
        self.links.append(link)
        _ip("link", "set", innerName, "netns", self.name)
        _ip("addr", "add", f"{hostAddress}/30", "dev", hostName)
        _ip("link", "set", hostName, "up")
        _ip("-n", self.name, "addr", "add", f"{innerAddress}/30", "dev", innerName)
        _ip("-n", self.name, "link", "set", innerName, "up")
        return link

    def argv(self, command: Sequence[str]) -> list[str]:
        """C{command} run inside the namespace (C{ip netns exec} execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *command]

    def destroy(self) -> None:
        """Stop what runs inside, delete every veth pair and the namespace (idempotent)."""
        while self.beforeDestroy:
            with contextlib.suppress(Exception):
                self.beforeDestroy.pop()()
        for link in self.links:
            # Normally gone with the namespace; a pair whose move failed is still here.
            with contextlib.suppress(subprocess.SubprocessError):
                _ip("link", "del", link.hostName, check=False)
        if self.created:
            _ip("netns", "del", self.name, check=False)
            self.created = False
        self.links = []
