"""
``python -m accesstunnel.twistd ARGS``: twistd, with the reactor of L{accesstunnel.reactor}
installed before twistd starts; ARGS are twistd's own (``-n groundcontrol --data ...``).

Why not ``twistd --reactor accesstunnel-epoll``: twistd finds reactors through Twisted's
plugin system, which imports every installed plugin module whenever its plugin cache is
missing or stale. That is the case on the first start after an install, and on every start
when the install is read-only to the service (systemd's C{ProtectSystem}). txtorcon's plugin
imports C{twisted.internet.reactor}, which installs Twisted's default reactor, and twistd then
stops with "reactor already installed". Installed first, ours is the reactor every later
import gets, whatever the plugin scan imports.
"""

from __future__ import annotations


def main() -> None:
    """Install the reactor, then run twistd on this process's command line."""
    from accesstunnel.reactor import install

    install()
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
