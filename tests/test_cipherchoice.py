"""
groundcontrol.cipherchoice in memory: after login, groundcontrol renews the keys with
AES-GCM when the client listed it (the stock OpenSSH client does, last), and leaves
the connection alone when the client cannot, when it runs AES-GCM already, or when the
setting is off; reading the CPU's AES instructions from /proc/cpuinfo's format.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from twisted.conch.ssh import transport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.test import iosim

from accesstunnel import fastpath
from accesstunnel.rekey import RekeyingTransportMixin, RekeyLimit
from groundcontrol.cipherchoice import AESGCMAfterLoginMixin, cpuHasAES
from groundcontrol.datadir import DataDir
from groundcontrol.sshserver import GroundControlTransport, ServerSettings
from groundcontrol.tap import Options, buildService
from tests.test_fastpath import (
    CHACHA,
    OPENSSH_CLIENT_CIPHERS,
    FastClient,
    ServerFactory,
    _Recording,
    echo,
    mixedPayloads,
)

GCM128 = b"aes128-gcm@openssh.com"


class RekeyServerFactory(ServerFactory):
    clock = Clock()


class GCMServer(
    _Recording,
    RekeyingTransportMixin,
    AESGCMAfterLoginMixin,
    fastpath.FastPathMixin,
    transport.SSHServerTransport,
):
    """groundcontrol's order of these mixins, on the test transports' hooks."""


def connect(clientCiphers: list[bytes], on: bool = True) -> tuple[Any, Any, iosim.IOPump]:
    f = RekeyServerFactory()
    f.settings = ServerSettings(rekeyLimit=RekeyLimit(), aesGCMAfterLogin=on)
    f.handshakesWaiting = lambda: 0
    f.doStart()
    server = GCMServer()
    server.factory = f
    client = FastClient()
    client.ciphers = clientCiphers
    pump = iosim.connect(
        server,
        iosim.FakeTransport(server, isServer=True),
        client,
        iosim.FakeTransport(client, isServer=False),
        greet=False,
        clock=Clock(),
    )
    pump.flush()
    return server, client, pump


def running(side: Any) -> tuple[bytes, bytes]:
    return side.currentEncryptions.outCipType, side.currentEncryptions.inCipType


def test_an_openssh_client_is_moved_to_aes_gcm() -> None:
    """The stock OpenSSH client's order negotiates chacha20-poly1305; after login one
    more key exchange, offering AES-GCM only, moves both ways to aes128-gcm, and
    packets flow before, during and after it."""
    server, client, pump = connect(OPENSSH_CLIENT_CIPHERS)
    assert running(server) == running(client) == (CHACHA, CHACHA)
    rng = random.Random(1)
    echo(client, pump, mixedPayloads(rng))
    sessionID = server.sessionID

    assert server.preferAESGCM() is True
    pump.flush()

    assert running(server) == running(client) == (GCM128, GCM128)
    assert server.keyExchanges == 2 and server.strictKex
    assert server.sessionID == sessionID
    echo(client, pump, mixedPayloads(rng))
    assert server.disconnects == client.disconnects == []
    # Done once: asked again, nothing to do.
    assert server.preferAESGCM() is False
    assert server.keyExchanges == 2


def test_a_client_without_aes_gcm_keeps_its_cipher() -> None:
    """A client that did not list AES-GCM (paramiko, old PuTTY) is left on its cipher:
    no key exchange is started and our offer is unchanged."""
    server, _client, pump = connect([CHACHA, b"aes128-ctr"])
    offered = list(server.supportedCiphers)
    assert server.preferAESGCM() is False
    pump.flush()
    assert running(server) == (CHACHA, CHACHA)
    assert server.keyExchanges == 1
    assert server.supportedCiphers == offered


def test_off_means_off() -> None:
    """With the setting off the client's choice stands."""
    server, _client, pump = connect(OPENSSH_CLIENT_CIPHERS, on=False)
    assert server.preferAESGCM() is False
    pump.flush()
    assert running(server) == (CHACHA, CHACHA)
    assert server.keyExchanges == 1


def test_a_connection_on_aes_gcm_already_is_left_alone() -> None:
    """A client that ranks AES-GCM first (our agent does) got it in the first exchange."""
    server, _client, _pump = connect([GCM128, CHACHA])
    assert running(server) == (GCM128, GCM128)
    assert server.preferAESGCM() is False
    assert server.keyExchanges == 1


def test_not_during_a_key_exchange() -> None:
    """While a key exchange runs no second one is started, and the offer is restored."""
    server, client, pump = connect(OPENSSH_CLIENT_CIPHERS)
    offered = list(server.supportedCiphers)
    client.sendKexInit()  # the client's renewal, not yet read by the server
    pump.pump()
    assert server.preferAESGCM() is False
    assert server.supportedCiphers == offered
    pump.flush()
    assert running(server) == (CHACHA, CHACHA)


def test_not_while_connections_wait_for_a_handshake_slot() -> None:
    """During a reconnect storm (connections queued at the handshake limiter) the client
    keeps what it negotiated: a renewal's round trips would each wait for a busy reactor."""
    server, _client, pump = connect(OPENSSH_CLIENT_CIPHERS)
    offered = list(server.supportedCiphers)
    server.factory.handshakesWaiting = lambda: 250
    assert server.preferAESGCM() is False
    pump.flush()
    assert running(server) == (CHACHA, CHACHA)
    assert server.keyExchanges == 1
    assert server.supportedCiphers == offered


def test_the_front_door_counts_the_limiters_waiting_connections(tmp_path: Path) -> None:
    """groundcontrol's factory asks the one handshake limiter in front of it."""
    DataDir(tmp_path).ensureInitialised()
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--listen", "tcp:0:interface=127.0.0.1"])
    top = buildService(options.toConfig(), MemoryReactorClock())
    limiter = top.limiter  # type: ignore[attr-defined]
    assert limiter.wrappedFactory.handshakesWaiting() == 0
    limiter.waiting = 7
    assert limiter.wrappedFactory.handshakesWaiting() == 7


def test_groundcontrol_uses_it_ahead_of_the_packet_layer() -> None:
    """groundcontrol's transport has the mixin next to the rekey mixin it renews keys
    through, above the packet layer and Conch; off unless configured."""
    mro = GroundControlTransport.__mro__
    assert mro.index(RekeyingTransportMixin) < mro.index(AESGCMAfterLoginMixin)
    assert mro.index(AESGCMAfterLoginMixin) < mro.index(fastpath.FastPathMixin)
    assert ServerSettings().aesGCMAfterLogin is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu vme sse2 aes avx2\n", True),
        ("processor\t: 0\nflags\t\t: fpu vme sse2 avx2\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n", False),
        ("model name\t: has aes in its name\n", False),
    ],
)
def test_cpu_aes_instructions(tmp_path: Path, text: str, expected: bool) -> None:
    """x86's flags and ARMv8's Features lines are read; nothing else counts."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert cpuHasAES(cpuinfo) is expected


def test_unreadable_cpuinfo_is_no(tmp_path: Path) -> None:
    """Without /proc/cpuinfo (not Linux) the client's choice stands."""
    assert cpuHasAES(tmp_path / "missing") is False


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], cpuHasAES()),
        (["--operator-aes-gcm", "yes"], True),
        (["--operator-aes-gcm", "no"], False),
    ],
)
def test_the_option_reaches_the_front_door(
    tmp_path: Path, given: list[str], expected: bool
) -> None:
    """--operator-aes-gcm: auto (the default) follows the CPU, yes and no decide."""
    options = Options()
    options.parseOptions(["--data", str(tmp_path), *given])
    assert options.toConfig().settings.aesGCMAfterLogin is expected


def test_a_malformed_option_is_refused(tmp_path: Path) -> None:
    """Anything but auto, yes or no is a usage error that says what is allowed."""
    options = Options()
    with pytest.raises(usage.UsageError, match="'auto', 'yes' or 'no'"):
        options.parseOptions(["--data", str(tmp_path), "--operator-aes-gcm", "maybe"])
