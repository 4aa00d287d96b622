"""A throwaway PostgreSQL server on loopback, for tests of the PostgreSQL store.

The store suite (and any multi-node end-to-end test) must run against a real server, not a
mock: locking, isolation and type behaviour are exactly what differs between engines. This
starts a private cluster in a temporary directory with the Debian ``postgresql`` package's
binaries, listening on 127.0.0.1 only, with durability switched off (the data is thrown away),
and removes it all on L{ThrowawayPostgreSQL.stop}.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PostgreSQLUnavailable", "ThrowawayPostgreSQL", "findPostgreSQLBinaries"]

_SERVER_USER = "postgres"


class PostgreSQLUnavailable(Exception):  # noqa: N818 - reads as a state
    """The PostgreSQL server binaries are not installed, so the server cannot be started."""


def findPostgreSQLBinaries() -> Path:
    """
    Return the directory holding C{initdb} and C{pg_ctl}.

    Debian keeps them off C{PATH} (under C{/usr/lib/postgresql/VERSION/bin}), so look there
    too, newest version first; C{GROUNDCONTROL_PG_BIN} overrides both.

    @raise PostgreSQLUnavailable: no such directory; the message says what to install.
    """
    candidates: list[Path] = []
    override = os.environ.get("GROUNDCONTROL_PG_BIN")
    if override:
        candidates.append(Path(override))
    onPath = shutil.which("initdb")
    if onPath:
        candidates.append(Path(onPath).parent)
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    debian.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates.extend(Path(p) for p in reversed(debian))
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise PostgreSQLUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: "
        "apt-get install postgresql, or set GROUNDCONTROL_PG_BIN"
    )


def _freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayPostgreSQL:
    """
    One private PostgreSQL cluster: C{start()}, then C{newDatabase()} per test, C{stop()}.

    initdb refuses to run as root, so as root the cluster belongs to the C{postgres} system
    user (created by the Debian package) and its commands run through C{runuser}.
    """

    def __init__(self, binDir: Path | None = None) -> None:
        self._bin = binDir if binDir is not None else findPostgreSQLBinaries()
        self._directory: Path | None = None
        self._counter = itertools.count(1)
        self.port = 0
        self._shared = False

    @property
    def _asOther(self) -> list[str]:
        return ["runuser", "-u", _SERVER_USER, "--"] if os.geteuid() == 0 else []

    def _run(self, *argv: str) -> None:
        subprocess.run(
            [*self._asOther, *argv],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def start(self) -> None:
        """Create the cluster and start the server on a free loopback port."""
        directory = Path(tempfile.mkdtemp(prefix="groundcontrol-pg-"))
        self._directory = directory
        if os.geteuid() == 0:
            user = pwd.getpwnam(_SERVER_USER)
            os.chown(directory, user.pw_uid, user.pw_gid)
        data = directory / "data"
        self._run(
            str(self._bin / "initdb"),
            "--pgdata",
            str(data),
            "--auth",
            "trust",
            "--username",
            "postgres",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        )
        for _attempt in range(5):
            self.port = _freePort()
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={directory} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=50"
            )
            try:
                self._run(
                    str(self._bin / "pg_ctl"),
                    "--pgdata",
                    str(data),
                    "--options",
                    options,
                    "--log",
                    str(directory / "server.log"),
                    "--wait",
                    "start",
                )
            except subprocess.CalledProcessError:
                continue  # most likely the port was taken meanwhile: try another
            return
        raise PostgreSQLUnavailable(f"PostgreSQL did not start; see {directory / 'server.log'}")

    @property
    def url(self) -> str:
        """The administrative database's URL (for creating and dropping databases)."""
        return self.urlFor("postgres")

    def urlFor(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def newDatabase(self) -> str:
        """
        Return the URL of a fresh, empty place to put a store: one per test keeps tests apart.

        It is a new schema in one shared database, selected through the URL's C{search_path}
        (creating and dropping whole databases costs a checkpoint each). That the store works
        in a non-default schema is itself worth exercising: a shared server may host several.
        """
        import psycopg

        name = f"gc_test_{next(self._counter)}"
        if not self._shared:
            with psycopg.connect(self.url, autocommit=True) as connection:
                connection.execute("CREATE DATABASE groundcontrol")
            self._shared = True
        with psycopg.connect(self.urlFor("groundcontrol"), autocommit=True) as connection:
            connection.execute(f"CREATE SCHEMA {name}")
        return self.urlFor("groundcontrol") + f"?options=-c%20search_path%3D{name}"

    def stop(self) -> None:
        """Stop the server at once and delete its files."""
        directory, self._directory = self._directory, None
        if directory is None:
            return
        try:
            self._run(
                str(self._bin / "pg_ctl"),
                "--pgdata",
                str(directory / "data"),
                "-m",
                "immediate",
                "stop",
            )
        except subprocess.CalledProcessError:
            pass
        finally:
            shutil.rmtree(directory, ignore_errors=True)
