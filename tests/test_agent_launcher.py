"""
The agent's own launcher (``python -m agent``, console script ``tunnel-agentd``): the
command line of ``twistd tunnel-agent`` without twistd, and pyOpenSSL loaded only by an agent
that dials a TLS address.

Each test runs the real launcher in a child process (it installs the global reactor),
dialling a closed loopback port, and inspects it once its first connection attempt failed.
"""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.ports import closedPort

ROOT = Path(__file__).resolve().parent.parent


def runPython(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run this Python with C{arguments} in the repository, its output captured as text."""
    return subprocess.run(
        [sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


#: The launcher with an observer that, at the first failed connection attempt, writes what
#: the process has loaded to argv[1] and stops the reactor.
_PROBE = """
import importlib.util, json, sys
from agent import launcher
reactor = launcher.importReactor()
from twisted.logger import formatEvent, globalLogPublisher
out = sys.argv.pop(1)
def watch(event):
    if "could not reach" in (event.get("log_format") or "") and not reactor._stopped:
        with open(out, "w") as f:
            json.dump({
                "modules": sorted(sys.modules),
                "reason": formatEvent(event),
                "refusing": [f.packages for f in sys.meta_path
                             if type(f).__name__ == "_Refuse"],
                "found": [name for name in launcher.REFUSED_WITH_THE_REACTOR
                          if importlib.util.find_spec(name) is not None],
                "libraries": sorted({line.split("/")[-1].split(".so")[0]
                                     for line in open("/proc/self/maps") if ".so" in line}),
                "sha256": __import__("hashlib").sha256(b"").hexdigest(),
                "later": later(),
            }, f)
        reactor.stop()
def later():
    # What the modules the launcher stood in for or loaded lazily give, used after start-up.
    import asyncio
    from twisted.internet.defer import Deferred
    from twisted.python import compat
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    got = []
    Deferred.fromFuture(future).addCallback(got.append)
    future.set_result("from a future")
    loop.run_until_complete(asyncio.sleep(0))
    asFuture = Deferred.fromCoroutine(asyncio.sleep(0, "to a future")).asFuture(loop)
    got.append(loop.run_until_complete(asFuture))
    loop.close()
    return {
        "asyncio": asyncio.__file__ is not None and hasattr(asyncio, "run"),
        "deferred": got,
        "escape": compat.escape("<a href='x'>"),
        "cookielib": compat.cookielib.CookieJar.__module__,
    }
globalLogPublisher.addObserver(watch)
sys.exit(launcher.main(sys.argv[1:]))
"""

#: What an agent that dials no TLS must not load: pyOpenSSL and what it brings, Twisted's
#: TLS layer, the stdlib's ssl, hashlib's OpenSSL backend, twistd, and cryptography's X.509
#: modules (the agent reads its certificate's lifetime itself).
NOT_WITHOUT_TLS = (
    "OpenSSL",
    "ssl",
    "_ssl",
    "_hashlib",
    "ctypes",
    "bz2",
    "lzma",
    "service_identity",
    "twisted.internet.ssl",
    "twisted.internet._sslverify",
    "twisted.protocols.tls",
    "accesstunnel.transports.tls",
    "twisted.scripts.twistd",
    "twisted.application.app",
    "cryptography.x509",
)

#: What no agent loads until something uses it: modules that Twisted imports with the
#: reactor for features the agent never uses (asyncio, html.entities, and urllib.request,
#: http.client and email.parser, which http.cookiejar would bring).
NOT_UNTIL_USED = (
    "asyncio",
    "concurrent.futures",
    "html.entities",
    "urllib.request",
    "http.client",
    "email.parser",
)


def _loaded(modules: list[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


class LauncherTests(SynchronousTestCase):
    def launch(self, server: str) -> tuple[dict, str]:
        """Run the launcher until its first attempt at C{server} failed; (probe, log file)."""
        with tempfile.TemporaryDirectory() as tmp:
            probe, logFile = Path(tmp) / "probe.json", Path(tmp) / "agent.log"
            subprocess.run(
                [
                    *(sys.executable, "-c", _PROBE, str(probe), "-l", str(logFile)),
                    *("--state", str(Path(tmp) / "state"), "--name", "kiln7"),
                    *("--server-key", "SHA256:" + "A" * 43, "--server", server),
                ],
                cwd=ROOT,
                capture_output=True,
                check=True,
                timeout=60,
            )
            return json.loads(probe.read_text()), logFile.read_text()

    def test_sshAgentLoadsNoOpenSSL(self) -> None:
        """
        Started by the launcher, an ssh:// agent dials and logs to the -l file in twistd's
        format, without twistd, pyOpenSSL, Twisted's TLS modules, the stdlib's ssl or the
        system's libcrypto and libssl loaded; the optional imports refused while the reactor
        was imported are importable again; only _hashlib stays refused, and hashlib works.
        """
        probe, log = self.launch(f"ssh://127.0.0.1:{closedPort()}")
        self.assertIn("agent.link", probe["modules"])
        self.assertIn("refused", probe["reason"])
        self.assertEqual([m for m in NOT_WITHOUT_TLS if _loaded(probe["modules"], m)], [])
        self.assertEqual([m for m in NOT_UNTIL_USED if _loaded(probe["modules"], m)], [])
        self.assertEqual(probe["refusing"], [["_hashlib"]])
        self.assertEqual(probe["found"], ["OpenSSL", "ssl", "bz2", "lzma", "ctypes"])
        self.assertNotIn("libcrypto", probe["libraries"])
        self.assertNotIn("libssl", probe["libraries"])
        self.assertEqual(probe["sha256"][:8], "e3b0c442")
        self.assertRegex(log, r"\d{4}-\d\d-\d\dT\S+ \[agent\.launcher#info\] tunnel-agent ")

    def test_standInsAndLazyModulesWorkWhenUsed(self) -> None:
        """
        In an agent started by the launcher, what it did not load at start works when used:
        C{import asyncio} imports asyncio (not the stand-in), and Deferred.fromFuture and
        asFuture work with its loop; Twisted's compat.escape is html.escape; compat.cookielib
        is http.cookiejar, loaded at its first use.
        """
        probe, _ = self.launch(f"ssh://127.0.0.1:{closedPort()}")
        later = probe["later"]
        self.assertTrue(later["asyncio"])
        self.assertEqual(later["deferred"], ["from a future", "to a future"])
        self.assertEqual(later["escape"], "&lt;a href=&#x27;x&#x27;&gt;")
        self.assertEqual(later["cookielib"], "http.cookiejar")

    def test_tlsAgentLoadsOpenSSLWhenDialling(self) -> None:
        """
        A tls:// agent started by the launcher imports pyOpenSSL at its first attempt and
        wraps the connection in TLS itself: the attempt reaches TCP (connection refused),
        not Twisted's "no TLS support" error. TLS comes from cryptography's OpenSSL: the
        system's libcrypto is still not loaded.
        """
        probe, _ = self.launch(f"tls://127.0.0.1:{closedPort()}")
        self.assertTrue(_loaded(probe["modules"], "OpenSSL"))
        self.assertNotIn("libcrypto", probe["libraries"])  # cryptography has its own
        self.assertIn("twisted.protocols.tls", probe["modules"])
        self.assertIn("refused", probe["reason"])

    def test_usageError(self) -> None:
        """Bad options: the usage (naming the program), the error on stderr, exit 1, as twistd."""
        result = runPython("-m", "agent", "--name", "kiln7")
        self.assertEqual(result.returncode, 1)
        self.assertIn("--state is required", result.stderr)
        self.assertIn("--logfile", result.stderr)
        self.assertTrue(result.stderr.startswith("Usage: tunnel-agentd [-l LOGFILE] --state DIR"))

    def test_asyncioStandInTellsCoroutines(self) -> None:
        """
        The asyncio stand-in's iscoroutine, which Twisted's Deferred.fromCoroutine calls for
        every coroutine the agent starts, answers as asyncio.iscoroutine does on Python 3.11:
        coroutines, generators and other Coroutine implementations, nothing else.
        """
        from collections.abc import Coroutine

        from agent.launcher import STAND_INS_WITH_THE_REACTOR

        iscoroutine = STAND_INS_WITH_THE_REACTOR["asyncio"]().iscoroutine

        async def native() -> None:
            pass

        def generator():  # type: ignore[no-untyped-def]
            yield

        class Custom(Coroutine):  # type: ignore[type-arg]
            send = throw = close = __await__ = lambda *_: None  # type: ignore[assignment]

        coroutine = native()
        self.addCleanup(coroutine.close)
        self.assertTrue(iscoroutine(coroutine))
        self.assertTrue(iscoroutine(generator()))
        self.assertTrue(iscoroutine(Custom()))
        self.assertFalse(iscoroutine(native))
        self.assertFalse(iscoroutine(None))

    def test_consoleScript(self) -> None:
        """setup.cfg installs the launcher as the tunnel-agentd console script."""
        setup = configparser.ConfigParser()
        setup.read(ROOT / "setup.cfg")
        scripts = setup["options.entry_points"]["console_scripts"].split("\n")
        self.assertIn("tunnel-agentd = agent.launcher:main", [s.strip() for s in scripts])
