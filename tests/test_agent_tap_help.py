"""``twistd tunnel-agent --help`` (agent/tap.py Options) without docstrings."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from agent.tap import Options


class HelpTests(SynchronousTestCase):
    def test_handledOptionsWithoutDocstrings(self) -> None:
        """
        The options a method handles keep their help under python -OO, which strips the
        docstrings Twisted takes it from (docs/systemd/tunnel-agent.service sets
        PYTHONOPTIMIZE=2).
        """
        for name in dir(Options):
            if name.startswith("opt_"):
                self.patch(getattr(Options, name), "__doc__", None)
        text = " ".join(str(Options()).split())  # as one line, the help unwrapped
        for says in (
            "--server= groundcontrol address, tried in order (repeatable): ssh://",
            "--tag= A tag this device reports (repeatable)",
            "--help Display this help and exit.",
        ):
            self.assertIn(says, text)
