"""
End to end: what a session carries besides bytes, with the real OpenSSH client
(issue 5): agent forwarding (-A), X11 forwarding (-X), env (LANG and LC_*
only), signal, break, exit-signal, and full-screen programs (vim, tmux) that
draw and redraw after a resize, checked on a pyte screen.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pyte
import pytest

from tests.e2e.harness import LOOPBACK, PYTHON, Fleet, run, sshAgentRunning, waitFor


def needs(*programs: str) -> None:
    """Fail (not skip) when a program the issue requires is missing: CI installs them."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install the e2e packages (Makefile)")


# -- agent forwarding --------------------------------------------------------------------


@pytest.fixture
def sshAgent(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An ssh-agent of the test's own with one key loaded; yields the client environment."""
    needs("ssh-agent", "ssh-add")
    with sshAgentRunning(tmp_path) as env:
        key = tmp_path / "forwarded_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "forwarded-key", "-f", str(key)])
        added = run(["ssh-add", str(key)], env=env)
        assert added.returncode == 0, added.stderr
        yield env


def test_agent_forwarding_when_permitted(
    kiln7: Fleet, sshAgent: dict[str, str], tmp_path: Path
) -> None:
    """With --permit-agent-forwarding, ssh -A gives the device a socket to the operator's agent."""
    kiln7.restartServer("--permit-agent-forwarding")
    alice = kiln7.operators["alice"]
    kiln7.waitRoutable(alice, "kiln7")
    result = run(alice.argv("dev_kiln7", "ssh-add -l", options=["-A"]), env=sshAgent)
    assert result.returncode == 0, result.stderr
    assert "forwarded-key (ED25519)" in result.stdout


def test_agent_forwarding_refused_by_default(kiln7: Fleet, sshAgent: dict[str, str]) -> None:
    """Without --permit-agent-forwarding, ssh -A gets no SSH_AUTH_SOCK on the device."""
    alice = kiln7.operators["alice"]
    result = run(
        alice.argv("dev_kiln7", "echo sock=${SSH_AUTH_SOCK:-none}; ssh-add -l", options=["-A"]),
        env=sshAgent,
    )
    assert "sock=none" in result.stdout
    assert "Could not open a connection to your authentication agent" in result.stderr
    assert result.returncode == 2


def test_agent_forwarding_needs_a_grant_that_allows_it(
    kiln7: Fleet, sshAgent: dict[str, str]
) -> None:
    """
    With the server permitting -A, an operator still needs a grant saying
    --agent-forwarding: a plain grant reaches the device without the agent.
    """
    kiln7.restartServer("--permit-agent-forwarding")
    alice = kiln7.operators["alice"]
    kiln7.waitRoutable(alice, "kiln7")
    bob = kiln7.addOperator("bob")
    assert alice.ssh("ctl", "grant", "bob", "kiln7").returncode == 0
    probe = "echo sock=${SSH_AUTH_SOCK:-none}; ssh-add -l"
    plain = run(bob.argv("dev_kiln7", probe, options=["-A"]), env=sshAgent)
    assert "sock=none" in plain.stdout, plain.stderr
    assert alice.ssh("ctl", "grant", "bob", "kiln7", "--agent-forwarding").returncode == 0
    allowed = run(bob.argv("dev_kiln7", probe, options=["-A"]), env=sshAgent)
    assert allowed.returncode == 0, allowed.stderr
    assert "forwarded-key (ED25519)" in allowed.stdout


# -- X11 ---------------------------------------------------------------------------------


@pytest.fixture
def xServer(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Xvfb on a free display with a cookie; yields the operator's DISPLAY/XAUTHORITY."""
    needs("Xvfb", "xauth", "xdpyinfo")
    display = next(
        n
        for n in range(90, 200)
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists()
    )
    authority = tmp_path / "Xauthority"
    env = dict(os.environ, DISPLAY=f":{display}", XAUTHORITY=str(authority))
    run(["xauth", "-f", str(authority), "add", f":{display}", ".", secrets.token_hex(16)], env=env)
    xvfb = subprocess.Popen(
        ["Xvfb", f":{display}", "-auth", str(authority), "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        waitFor(lambda: run(["xdpyinfo"], env=env, timeout=10).returncode == 0, 20, "Xvfb to serve")
        yield env
    finally:
        xvfb.terminate()
        xvfb.wait(10)


def test_x11_forwarding(kiln7: Fleet, xServer: dict[str, str]) -> None:
    """
    ssh -X: an X client on the device reaches the operator's X server on its display.
    ForwardX11Trusted is named, not left to the client's default: Debian's ssh defaults to
    yes, upstream's (10.x built by scripts/build-openssh-client, macOS) to no, and for no
    ssh asks the X server for an untrusted cookie (xauth generate), which this Xvfb
    refuses even with no ssh in between ("Invalid MIT-MAGIC-COOKIE-1 key"). The cookie
    is the client's business either way; groundcontrol relays the same bytes.
    """
    alice = kiln7.operators["alice"]
    result = run(
        alice.argv(
            "dev_kiln7",
            "echo display=$DISPLAY; xdpyinfo",
            options=["-X", "-o", "ForwardX11Trusted=yes"],
        ),
        env=xServer,
    )
    assert result.returncode == 0, result.stderr
    display = re.search(r"^display=(localhost:\d+\.0)$", result.stdout, re.M)
    assert display, result.stdout
    assert re.search(rf"^name of display:\s+{re.escape(display.group(1))}$", result.stdout, re.M)
    assert "screen #0:" in result.stdout
    assert "X.Org" in result.stdout  # Xvfb's vendor string: the operator's server answered


def test_x11_forwarding_refused_by_policy(kiln7: Fleet, xServer: dict[str, str]) -> None:
    """With --no-x11-forwarding, ssh -X is told no and the device session has no DISPLAY."""
    kiln7.restartServer("--no-x11-forwarding")
    alice = kiln7.operators["alice"]
    kiln7.waitRoutable(alice, "kiln7")
    result = run(
        alice.argv("dev_kiln7", "echo display=${DISPLAY:-none}", options=["-X"]), env=xServer
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "display=none\n"
    assert "X11 forwarding request failed" in result.stderr


# -- env ---------------------------------------------------------------------------------


def test_env_lang_and_lc_only(kiln7: Fleet) -> None:
    """SetEnv LANG and LC_* reach the device; any other variable is dropped, like AcceptEnv."""
    alice = kiln7.operators["alice"]
    result = run(
        alice.argv(
            "dev_kiln7",
            "echo $LANG $LC_TIME ${FOO:-unset}",
            # One SetEnv with all three: ssh keeps only the first SetEnv option it is given.
            options=["-o", "SetEnv=LANG=C.UTF-8 LC_TIME=C FOO=bar"],
        )
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "C.UTF-8 C unset\n"


# -- signal, break, exit-signal ------------------------------------------------------------

#: OpenSSH's client cannot send a "signal" channel request, so this small Conch
#: client does: log in, exec, wait for "ready", send the signal, report as JSON.
SIGNAL_CLIENT = r"""
import json, sys
from twisted.conch.ssh import channel, common, connection, keys, transport, userauth
from twisted.internet import defer, protocol, reactor

host, port, user, keyFile, hostKeyLine, command, signalName = sys.argv[1:]
KEY = keys.Key.fromFile(keyFile)
HOST_KEY = keys.Key.fromString(hostKeyLine)
result = {"stdout": "", "exit-status": None, "exit-signal": None, "signal-sent": False}

class Session(channel.SSHChannel):
    name = b"session"
    def channelOpen(self, data):
        self.conn.sendRequest(self, b"exec", common.NS(command.encode()))
    def dataReceived(self, data):
        result["stdout"] += data.decode()
        if "ready" in result["stdout"] and not result["signal-sent"]:
            result["signal-sent"] = True
            self.conn.sendRequest(self, b"signal", common.NS(signalName.encode()))
    def request_exit_status(self, data):
        result["exit-status"] = int.from_bytes(data[:4], "big")
        return 1
    def request_exit_signal(self, data):
        result["exit-signal"] = common.getNS(data)[0].decode()
        return 1
    def closed(self):
        print(json.dumps(result))
        reactor.stop()

class Connection(connection.SSHConnection):
    def serviceStarted(self):
        super().serviceStarted()
        self.openChannel(Session(conn=self))

class Auth(userauth.SSHUserAuthClient):
    offered = False
    def getPublicKey(self):
        if self.offered:
            return None
        self.offered = True
        return KEY.public()
    def getPrivateKey(self):
        return defer.succeed(KEY)

class Transport(transport.SSHClientTransport):
    def verifyHostKey(self, hostKey, fingerprint):
        if keys.Key.fromString(hostKey) == HOST_KEY:
            return defer.succeed(True)
        return defer.fail(ValueError("host key mismatch"))
    def connectionSecure(self):
        self.requestService(Auth(user.encode(), Connection()))

factory = protocol.ClientFactory.forProtocol(Transport)
reactor.connectTCP(host, int(port), factory)
reactor.callLater(30, lambda: (print(json.dumps(result)), reactor.stop()))
reactor.run()
"""


def signalSession(fleet: Fleet, command: str, signalName: str) -> dict[str, object]:
    alice = fleet.operators["alice"]
    result = run(
        [
            PYTHON,
            "-c",
            SIGNAL_CLIENT,
            LOOPBACK,
            str(fleet.gc.port),
            "dev_kiln7",
            str(alice.keyPath),
            fleet.gc.serverKeyLine,
            command,
            signalName,
        ],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_signal_reaches_the_session(kiln7: Fleet) -> None:
    """A 'signal TERM' channel request reaches the exec'd shell: its trap runs, it exits 7."""
    report = signalSession(
        kiln7, "trap 'echo got-TERM; exit 7' TERM; echo ready; sleep 30 & wait", "TERM"
    )
    assert report["signal-sent"]
    assert report["stdout"] == "ready\ngot-TERM\n"
    assert report["exit-status"] == 7


def test_signal_kill_reported_as_exit_signal(kiln7: Fleet) -> None:
    """A session killed by a signal request reports exit-signal KILL, not an exit status."""
    report = signalSession(kiln7, "echo ready; sleep 30", "KILL")
    assert report["exit-signal"] == "KILL"
    assert report["exit-status"] is None


def test_exit_signal_with_openssh(kiln7: Fleet) -> None:
    """ssh dev_x 'kill -KILL $$': ssh exits 255 and its -v log shows exit-signal KILL."""
    alice = kiln7.operators["alice"]
    result = run(alice.argv("dev_kiln7", "kill -KILL $$", options=["-v"]))
    assert result.returncode == 255
    assert "exit-signal" in result.stderr
    # The agent reported the name, as sshd would: the session was killed by KILL.
    log = kiln7.agents[0].process.output()  # type: ignore[union-attr]
    assert "session child killed by KILL" in log


def test_break_with_openssh_escape(kiln7: Fleet) -> None:
    """OpenSSH's ~B sends 'break': on the device pty (BRKINT) the foreground job gets SIGINT."""
    alice = kiln7.operators["alice"]
    argv = alice.argv(
        "dev_kiln7",
        "stty brkint -ignbrk; trap 'echo got-INT; exit 3' INT; echo ready; "
        "while :; do sleep 1; done",
        options=["-t", "-o", "EscapeChar=~"],
    )
    child = pexpect.spawn(argv[0], argv[1:], timeout=30, env=dict(os.environ, TERM="xterm"))
    try:
        child.expect("ready")
        child.send("\r~B")
        child.expect("got-INT")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 3


# -- full-screen programs --------------------------------------------------------------------


class _Screen(pyte.Screen):
    """pyte's screen, ignoring xterm's private SGR (vim's CSI > 4;2 m, modifyOtherKeys)."""

    def select_graphic_rendition(self, *attrs: int, private: bool = False) -> None:
        if not private:
            super().select_graphic_rendition(*attrs)


class Terminal:
    """A real ssh -t in a pexpect pty of a known size, its output drawn on a pyte screen."""

    def __init__(self, argv: list[str], rows: int, cols: int) -> None:
        self.screen = _Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.child = pexpect.spawn(
            argv[0],
            argv[1:],
            dimensions=(rows, cols),
            env=dict(os.environ, TERM="xterm", LANG="C.UTF-8"),
            timeout=30,
        )

    def rows(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def until(self, condition: Callable[[list[str]], bool], what: str, timeout: float = 20) -> None:
        """Feed output to the screen until C{condition(rows)} holds."""
        deadline = time.monotonic() + timeout
        while not condition(self.rows()):
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never showed {what}:\n" + "\n".join(self.rows()))
            try:
                self.stream.feed(self.child.read_nonblocking(65536, timeout=0.2))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                raise AssertionError(
                    f"ssh ended before {what}:\n" + "\n".join(self.rows())
                ) from None

    def resize(self, rows: int, cols: int) -> None:
        self.screen.resize(rows, cols)
        self.child.setwinsize(rows, cols)  # SIGWINCH: ssh sends window-change

    def finish(self) -> int | None:
        self.child.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.kill(signal.SIGKILL)
        self.child.close(force=True)


def test_vim_draws_and_redraws_after_resize(kiln7: Fleet) -> None:
    """
    vim in ssh -t at 24x80: the file's first lines and the status line draw;
    after a resize to 30x100 vim redraws at the new size (status line moves
    down, more of the file shows); :q! ends the session with status 0.
    """
    needs("vim")
    home = kiln7.agents[0].home
    (home / "notes.txt").write_text("".join(f"line {n}\n" for n in range(1, 101)))
    alice = kiln7.operators["alice"]
    term = Terminal(
        alice.argv(
            "dev_kiln7",
            "vim -u NONE -N -c 'set laststatus=2' notes.txt",
            options=["-t"],
        ),
        24,
        80,
    )
    try:

        def drawn(rows: int) -> Callable[[list[str]], bool]:
            return lambda screen: (
                len(screen) == rows
                and screen[0] == "line 1"
                and screen[rows - 3] == f"line {rows - 2}"
                and screen[rows - 2].startswith("notes.txt")
            )

        term.until(drawn(24), "vim at 24 rows")
        assert term.screen.buffer[22][0].reverse  # the status line is in reverse video
        term.resize(30, 100)
        term.until(drawn(30), "vim redrawn at 30 rows")
        assert term.screen.buffer[28][0].reverse
        term.child.send("\x1b:q!\r")
        assert term.finish() == 0
    finally:
        term.close()


def test_tmux_status_line_follows_resize(kiln7: Fleet, tmp_path: Path) -> None:
    """
    tmux in ssh -t: its status line is on the last row at 24x80, a command's
    output draws in the pane, and after a resize the status line is on the new
    last row with the old one gone.
    """
    needs("tmux")
    alice = kiln7.operators["alice"]
    socket = tmp_path / "tmux.sock"
    term = Terminal(
        alice.argv(
            "dev_kiln7",
            f"tmux -S {socket} -f /dev/null new-session -s e2e",
            options=["-t"],
        ),
        24,
        80,
    )
    try:
        term.until(lambda s: s[23].startswith("[e2e] 0:"), "the tmux status line on row 24")
        term.child.send("echo drawn-$((6*7))\r")
        term.until(lambda s: any(line == "drawn-42" for line in s), "the command's output")
        term.resize(30, 100)
        term.until(
            lambda s: s[29].startswith("[e2e] 0:") and not s[23].startswith("[e2e]"),
            "the tmux status line on row 30",
        )
        term.child.send("exit\r")
        assert term.finish() == 0
    finally:
        term.close()
        subprocess.run(["tmux", "-S", str(socket), "kill-server"], capture_output=True)
