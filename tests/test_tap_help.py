"""``twistd groundcontrol --help`` (groundcontrol/tap.py Options) without docstrings."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from groundcontrol.tap import Options


class HelpTests(SynchronousTestCase):
    def test_handledOptionsWithoutDocstrings(self) -> None:
        """
        The options a method handles keep their help under python -OO, which strips the
        docstrings Twisted takes it from (the systemd units may set PYTHONOPTIMIZE=2).
        """
        for name in dir(Options):
            if name.startswith("opt_"):
                self.patch(getattr(Options, name), "__doc__", None)
        text = " ".join(str(Options()).split())  # as one line, the help unwrapped
        for says in (
            "--listen= Address to serve operators and agents on (repeatable): ssh://",
            "--penalty-exempt= A network the penalties never refuse",
            "--help Display this help and exit.",
        ):
            self.assertIn(says, text)
