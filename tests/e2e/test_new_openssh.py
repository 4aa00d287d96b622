"""
End to end with a newer OpenSSH client than the machine's (Debian 12 ships 9.2p1): what an
operator with a current laptop (OpenSSH 9.9-10.x) gets, where its defaults differ.

Runs only when ACCESS_TUNNEL_NEW_SSH names such an ssh, with scp, sftp, ssh-agent, ssh-add
and ssh-keygen of the same build next to it (scp and sftp run the ssh of their build):

    scripts/build-openssh-client /tmp/openssh-10        # about a minute; see the script
    ACCESS_TUNNEL_NEW_SSH=/tmp/openssh-10/bin/ssh .venv/bin/pytest tests/e2e/test_new_openssh.py

What 10.x does differently and these tests pin: the post-quantum key exchange chosen
(mlkem768x25519-sha256, and so none of 10.1's "not using a post-quantum key exchange"
warning), keystroke-timing chaff (sent only to a server that answers ping@openssh.com,
groundcontrol.pingreply), and the everyday paths with the new client and its own tools: exec
with stdin and status, eow, scp both ways in both protocols, sftp, rsync, -A with its agent.
The operator-facing e2e files also pass with the new client first on PATH
(PATH=DEST/bin:$PATH: openssh_user, tools, forwarding, forwarding_more, session_features,
exec, shell, access, control, recording, agent_constraints, ciphers, errors, front_door):
forwards, unix sockets, ControlMaster, -J, sshfs, X11 (whose test names ForwardX11Trusted,
since upstream's default differs from Debian's), so they are not repeated here.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Fleet, Operator, run, sshAgentRunning
from tests.e2e.test_tools import makeTree, sha256

NEW_SSH = os.environ.get("ACCESS_TUNNEL_NEW_SSH", "")

pytestmark = pytest.mark.skipif(
    not NEW_SSH, reason="set ACCESS_TUNNEL_NEW_SSH to a newer ssh (scripts/build-openssh-client)"
)


def tool(name: str) -> str:
    """The new build's program C{name}, next to its ssh."""
    path = Path(NEW_SSH).parent / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build the client with scripts/build-openssh-client")
    return str(path)


def newSsh(operator: Operator, user: str, *args: str, options: tuple[str, ...] = ()) -> list[str]:
    """The operator's ssh command line, with the new client."""
    return [NEW_SSH, *operator.argv(user, *args, options=options)[1:]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """groundcontrol allowing agent forwarding, admin alice, device kiln7 reachable."""
    version = run([NEW_SSH, "-V"])
    assert re.match(r"OpenSSH_(9\.9|[1-9]\d)", version.stderr), version.stderr
    fleet = Fleet(tmp_path_factory.mktemp("new_openssh"))
    try:
        alice = fleet.addOperator("alice", admin=True)
        fleet.startServer("--permit-agent-forwarding")
        fleet.addAgent("kiln7")
        fleet.waitRoutable(alice, "kiln7")
        yield fleet
    finally:
        fleet.close()


@pytest.fixture
def alice(world: Fleet) -> Operator:
    return world.operators["alice"]


def test_post_quantum_key_exchange_and_no_warning(alice: Operator) -> None:
    """The new client gets its first choice, mlkem768x25519-sha256, and warns of nothing."""
    result = run(newSsh(alice, "dev_kiln7", "exit 3", options=("-v",)))
    assert result.returncode == 3, result.stderr
    assert "kex: algorithm: mlkem768x25519-sha256" in result.stderr
    assert "kex: host key algorithm: ssh-ed25519" in result.stderr
    assert "post-quantum" not in result.stderr
    assert "WARNING" not in result.stderr


def test_keystroke_timing_chaff_is_sent(alice: Operator) -> None:
    """
    One keystroke in a terminal session starts the new client's keystroke-timing
    obfuscation, and it fills the following second with chaff: groundcontrol advertises
    ping@openssh.com and answers. Without that the client logs "(0 chaff packets sent)".
    """
    result = run(
        newSsh(alice, "dev_kiln7", "IFS= read -rn1 key; sleep 3", options=("-tt", "-vvv")),
        input="x",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    sent = re.findall(
        r"obfuscate_keystroke_timing: stopping: .* \((\d+) chaff packets sent\)", result.stderr
    )
    assert sent, result.stderr[-2000:]
    assert int(sent[0]) > 0, sent
    assert "extension ping@openssh.com" in result.stderr


def test_exec_stdin_status_and_streams(alice: Operator) -> None:
    """stdin piped in, stdout and stderr apart, the status back."""
    result = run(newSsh(alice, "dev_kiln7", "wc -l; echo err >&2; exit 7"), input="a\nb\n")
    assert (result.returncode, result.stdout.strip(), result.stderr) == (7, "2", "err\n")


def test_reader_that_stops_ends_the_command(alice: Operator) -> None:
    """`ssh dev yes | head -1` returns at once: the new client's eow@openssh.com goes through."""
    result = subprocess.run(
        " ".join([*newSsh(alice, "dev_kiln7", "yes"), "| head -1"]),
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout == "y\n", result.stderr


@pytest.mark.parametrize("legacy", [False, True], ids=["sftp-protocol", "scp-protocol"])
def test_scp_both_ways(world: Fleet, alice: Operator, tmp_path: Path, legacy: bool) -> None:
    """The new scp, up and back down, -rp, in SFTP mode and with -O: same bytes."""
    source = tmp_path / "src"
    source.mkdir()
    files = makeTree(source)
    remote = world.base / f"scp-{'legacy' if legacy else 'sftp'}"
    back = tmp_path / "back"
    scp = [tool("scp"), "-F", str(alice.configPath), *(["-O"] if legacy else [])]
    up = run([*scp, "-rp", str(source), f"dev_kiln7@groundcontrol:{remote}"])
    assert up.returncode == 0, up.stderr
    down = run([*scp, "-rp", f"dev_kiln7@groundcontrol:{remote}", str(back)])
    assert down.returncode == 0, down.stderr
    assert {rel: sha256(back / rel) for rel in files} == files


def test_sftp_batch(world: Fleet, alice: Operator, tmp_path: Path) -> None:
    """The new sftp in batch mode puts, lists and gets a file."""
    local = tmp_path / "f.bin"
    local.write_bytes(os.urandom(100_000))
    remote = world.base / "sftp-copy.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"put {local} {remote}\nls -l {remote}\nget {remote} {tmp_path / 'g.bin'}\n")
    result = run(
        [tool("sftp"), "-F", str(alice.configPath), "-b", str(batch), "dev_kiln7@groundcontrol"]
    )
    assert result.returncode == 0, result.stderr
    assert sha256(tmp_path / "g.bin") == sha256(local)


def test_rsync_with_the_new_ssh(world: Fleet, alice: Operator, tmp_path: Path) -> None:
    """rsync -a -e NEW_SSH copies a tree."""
    source = tmp_path / "src"
    source.mkdir()
    files = makeTree(source)
    remote = world.base / "rsync-copy"
    result = run(
        [
            "rsync",
            "-a",
            "-e",
            f"{NEW_SSH} -F {alice.configPath}",
            f"{source}/",
            f"dev_kiln7@groundcontrol:{remote}/",
        ],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert {rel: sha256(remote / rel) for rel in files} == files


def test_agent_forwarding_with_the_new_agent(alice: Operator, tmp_path: Path) -> None:
    """
    -A with the new ssh-agent: the device lists the key and has it sign (ssh-add -T, the
    new client's session-bind of the forwarded socket included).
    """
    with sshAgentRunning(tmp_path, tool("ssh-agent")) as env:
        key = tmp_path / "forwarded_key"
        run(
            [tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "forwarded", "-f", str(key)]
        )
        assert run([tool("ssh-add"), str(key)], env=env).returncode == 0
        probe = f"ssh-add -l && {tool('ssh-add')} -T {key}.pub && echo signed"
        result = run(newSsh(alice, "dev_kiln7", probe, options=("-A",)), env=env)
        assert result.returncode == 0, result.stderr
        assert "forwarded (ED25519)" in result.stdout
        assert result.stdout.endswith("signed\n"), result.stdout
