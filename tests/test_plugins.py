"""twistd must find both programs: a plugin that fails to import is silently skipped."""

from __future__ import annotations

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase


class PluginDiscoveryTests(SynchronousTestCase):
    def test_both_tapnames_are_listed(self) -> None:
        """getPlugins(IServiceMaker) lists groundcontrol and tunnel-agent."""
        names = {plugin.tapname for plugin in getPlugins(IServiceMaker)}
        self.assertIn("groundcontrol", names)
        self.assertIn("tunnel-agent", names)

    def test_plugins_load_their_options(self) -> None:
        """Each plugin's module imports and its Options parse a valid command line."""
        makers = {plugin.tapname: plugin for plugin in getPlugins(IServiceMaker)}
        gc = makers["groundcontrol"].options()
        gc.parseOptions(["--data", "/nonexistent", "--listen", "tcp:0:interface=127.0.0.1"])
        self.assertEqual(gc["listen"], ["tcp:0:interface=127.0.0.1"])
        agent = makers["tunnel-agent"].options()
        agent.parseOptions(
            [
                "--state",
                "/nonexistent",
                "--server",
                "ssh://127.0.0.1:2222",
                "--name",
                "kiln7",
                "--server-key",
                "SHA256:" + "A" * 43,
            ]
        )
        self.assertEqual(agent["server"], ["ssh://127.0.0.1:2222"])
