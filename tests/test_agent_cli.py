"""
``tunnel-agent`` (agent/cli.py), the device's own commands, as a person on the device runs them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

from agent import cli
from tests.test_agent_launcher import runPython


class HelpTests(SynchronousTestCase):
    def test_helpWithoutDocstrings(self) -> None:
        """
        --help works under python -OO, which strips docstrings: the agent's systemd unit sets
        PYTHONOPTIMIZE=2, and a shell on the device that copies its environment must still be
        able to run ``tunnel-agent status``. It says what the program is, without markup.
        """
        result = runPython("-OO", "-m", "agent.cli", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("tunnel-agent: commands for people on the device", result.stdout)
        self.assertNotIn("``", result.stdout)


@pytest.mark.parametrize("command", ["status", "pair"])
def test_noStatusSaysTheAgentIsNotRunning(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """
    On a state directory the agent wrote no status in, status says what pair says and
    fails as pair does; it printed '{}' and exited 0.
    """
    assert cli.main([command, "--state", str(tmp_path)]) == 1
    assert capsys.readouterr() == (
        "",
        f"no agent status in {tmp_path}: is the agent running?\n",
    )
