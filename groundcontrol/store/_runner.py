"""Runners: how the store's blocking database calls get off the reactor thread.

A runner is any callable ``run(f, *args) -> Deferred``. The store is written against that
shape only, so the server uses a thread, while tests and the one-shot CLI run inline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

__all__ = ["Runner", "synchronousRunner", "threadRunner"]

_T = TypeVar("_T")


class Runner(Protocol):
    """Run a blocking callable somewhere and report its outcome through a Deferred."""

    def __call__(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]: ...


def synchronousRunner(f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
    """
    Run C{f} inline and return an already-fired Deferred.

    For unit tests (C{successResultOf} works at once) and for the CLI, which has no
    reactor to protect. Exceptions become a failed Deferred, exactly as with a thread.
    """
    try:
        result = f(*args)
    except BaseException:
        return defer.fail()
    return defer.succeed(result)


def threadRunner(reactor: Any, poolFactory: Callable[..., ThreadPool] = ThreadPool) -> Runner:
    """
    Return a runner backed by a private single-worker thread pool.

    One worker means one SQLite connection used by one thread at a time, so database calls
    are serialised without any locking of our own. The pool starts when the reactor runs and
    stops during its shutdown, so callers never manage it.

    @param reactor: provides C{callWhenRunning}, C{addSystemEventTrigger} and
        C{callFromThread}.
    @param poolFactory: builds the pool; tests inject a fake that runs work inline.
    """
    pool = poolFactory(minthreads=1, maxthreads=1, name="groundcontrol-store")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

    def run(f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        return threads.deferToThreadPool(reactor, pool, f, *args)

    return run
