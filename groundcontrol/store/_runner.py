"""Runners: how the store's blocking database calls get off the reactor thread.

A runner is any callable ``run(f, *args) -> Deferred``. The store is written against that
shape only, so the server uses a thread, while tests and the one-shot CLI run inline.

The server's runner (L{threadRunner}) has two queues in front of its one database thread.
Calls made for a person waiting at a prompt (an operator logging in and opening a session,
an admin in the control shell) go in through L{ThreadRunner.first} and run before any call
still queued for the fleet's own bookkeeping. In a reconnect storm every agent's login
queues about five calls, which kept that thread busy ~90% of the time with 50-200 ms of
backlog; an operator's login and session open wait for six calls in turn, so each setup
took 0.4-0.8 s there (bench/RESULTS.md, "Operator setup during a reconnect storm").
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["Runner", "ThreadRunner", "synchronousRunner", "threadRunner"]

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


class WorkerPool(Protocol):
    """What L{ThreadRunner} needs of a thread pool (Twisted's L{ThreadPool})."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def callInThread(self, func: Callable[..., object], *args: Any) -> None: ...


_Call = tuple[defer.Deferred[Any], Callable[..., Any], tuple[Any, ...]]


class ThreadRunner:
    """
    A L{Runner} on one worker thread, with a queue that goes first (L{first}).

    The worker drains both queues: it runs whichever call is due (the oldest of
    L{first}'s, else the oldest of the rest) until none is left. A call queued while a
    drain is pending or running joins it; only a call into empty queues hands the pool a
    new drain. So the pool keeps its own lifecycle, the worker never waits on the reactor
    between calls, and a call for a person overtakes the fleet's backlog.

    One drain per burst rather than one pool job per call: each job Twisted's pool runs
    is a closure that refers to itself, garbage for the cyclic collector, about eight
    per agent login in a reconnect storm (bench/RESULTS.md, "Storm garbage at its
    source").
    """

    def __init__(self, reactor: Any, pool: WorkerPool) -> None:
        self._reactor = reactor
        self._pool = pool
        # Appended on the reactor thread, taken on the worker, both under the lock,
        # which also guards whether a drain is pending or running: a call never waits
        # in the queues with no drain to come.
        self._lock = threading.Lock()
        self._first: deque[_Call] = deque()
        self._rest: deque[_Call] = deque()
        self._draining = False

    def __call__(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """Queue C{f(*args)} behind every call queued before it."""
        return self._queue(self._rest, f, args)

    def first(self, f: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """Queue C{f(*args)} ahead of every call queued through L{__call__}."""
        return self._queue(self._first, f, args)

    def _queue(
        self, queue: deque[_Call], f: Callable[..., _T], args: tuple[Any, ...]
    ) -> defer.Deferred[_T]:
        d: defer.Deferred[_T] = defer.Deferred()
        with self._lock:
            queue.append((d, f, args))
            if self._draining:
                return d
            self._draining = True
        self._pool.callInThread(self._drain)
        return d

    def _drain(self) -> None:
        """On the worker: run the calls that are due, one by one, until none is left."""
        while True:
            with self._lock:
                if not (self._first or self._rest):
                    self._draining = False
                    return
                d, f, args = (self._first or self._rest).popleft()
            try:
                result = f(*args)
            except BaseException:
                self._reactor.callFromThread(d.errback, Failure())
            else:
                self._reactor.callFromThread(d.callback, result)


def threadRunner(reactor: Any, poolFactory: Callable[..., WorkerPool] = ThreadPool) -> ThreadRunner:
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
    return ThreadRunner(reactor, pool)
