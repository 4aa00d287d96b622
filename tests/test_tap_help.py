"""
``twistd groundcontrol --help`` and ``twistd tunnel-agent --help`` (the two tap.py Options)
without docstrings.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from agent.tap import Options as AgentOptions
from groundcontrol.tap import Options as ServerOptions


class HelpTests(SynchronousTestCase):
    """
    The options a method handles keep their help under python -OO, which strips the
    docstrings Twisted takes it from (the systemd units may set PYTHONOPTIMIZE=2; the
    agent's does).
    """

    def helpWithoutDocstrings(self, options: Any) -> str:
        """C{options}' --help as one line (unwrapped), its methods' docstrings gone."""
        for name in dir(options):
            if name.startswith("opt_"):
                self.patch(getattr(options, name), "__doc__", None)
        return " ".join(str(options()).split())

    def test_groundcontrol(self) -> None:
        text = self.helpWithoutDocstrings(ServerOptions)
        for says in (
            "--listen= Address to serve operators and agents on (repeatable): ssh://",
            "--penalty-exempt= A network the penalties never refuse",
            "--help Display this help and exit.",
        ):
            self.assertIn(says, text)

    def test_listenShowsBracketedIPv6(self) -> None:
        """--listen's help shows how an IPv6 address is written: in brackets."""
        self.assertIn(
            "or an endpoint string such as tcp:2222:interface=127.0.0.1; an IPv6 HOST in "
            "brackets, ssh://[::]:22 ",
            self.helpWithoutDocstrings(ServerOptions),
        )

    def test_tunnelAgent(self) -> None:
        text = self.helpWithoutDocstrings(AgentOptions)
        for says in (
            "--server= groundcontrol address, tried in order (repeatable): ssh://",
            "--tag= A tag this device reports (repeatable)",
            "--help Display this help and exit.",
        ):
            self.assertIn(says, text)
