"""
``tunnel-agent`` (agent/cli.py), the device's own commands, as a person on the device runs them.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

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
