"""Run shards of one job on several CPU cores: forked worker processes, or threads.

Threads (:func:`imap_threads`) serve work done by the compiled kernels on pages read in place
(raw-stored formats): the kernels release the GIL, and threads share the maps' page tables.
Decoding compressed pages is per-page Python work, where threads would queue on the GIL: that
goes to forked processes (:func:`imap_shards`), which share the parent's open readers (and
their page-cache-backed maps) without pickling them. Each worker has a pipe: shard numbers go
out, results (or the exception a shard raised) come back, one shard at a time. A worker that
dies (killed, out of memory, a fault in a map) closes its pipe, which the parent sees at
once. Either way the parent raises, killing the other workers on the way out; workers also
die with the parent (PR_SET_PDEATHSIG), so no run leaves one behind. Workers print nothing
and never flush the parent's buffers.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any, NoReturn, TypeVar, cast

from ._signals import Interrupted, worker_signals
from .errors import WorkerError

__all__ = ["ONE_MALLOC_ARENA", "default_jobs", "imap_shards", "imap_threads", "map_shards"]

T = TypeVar("T")


def default_jobs() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def imap_shards(task: Callable[[int], T], shards: int, jobs: int) -> Iterator[T]:
    """``task(0), ..., task(shards - 1)`` in any order, from up to ``jobs`` forked processes.

    Results arrive one at a time (a worker waits with its next one until the parent takes
    it), so the caller can store each and drop it before the next. With one job (or one
    shard), or where fork is unavailable, runs in this process.

    Raises:
        Exception: what ``task`` raised in a worker (the same type and message).
        WorkerError: a worker died without an answer.
        Interrupted: a worker was stopped by SIGINT or SIGTERM.
    """
    if jobs <= 1 or shards <= 1 or not hasattr(os, "fork"):
        for k in range(shards):
            yield task(k)
        return
    workers: dict[Connection, int] = {}  # pipe -> pid, until reaped
    finished = False
    try:
        for k in range(min(jobs, shards)):
            conn, pid = _fork(task, list(workers))
            workers[conn] = pid
            conn.send(k)
        sent = len(workers)
        busy = list(workers)
        while busy:
            for conn in cast(list[Connection], wait(busy)):
                result = _receive(conn, workers)
                if sent < shards:
                    conn.send(sent)
                    sent += 1
                else:
                    busy.remove(conn)
                yield result
        finished = True
    finally:
        for conn, pid in workers.items():  # all told first, so they end side by side
            with contextlib.suppress(OSError):
                if finished:
                    conn.send(None)  # done: exit
                else:
                    os.kill(pid, signal.SIGKILL)
        for conn, pid in workers.items():
            conn.close()
            os.waitpid(pid, 0)


def map_shards(task: Callable[[int], T], shards: int, jobs: int, *,
               threads: bool = False) -> list[T]:
    """``[task(0), ..., task(shards - 1)]`` in shard order, from forked processes
    (:func:`imap_shards`) or, with ``threads``, from threads (:func:`imap_threads`)."""
    if threads:
        done = dict(item for part in imap_threads(lambda k: [(k, task(k))], shards, jobs)
                    for item in part)
    else:
        done = dict(imap_shards(lambda k: (k, task(k)), shards, jobs))
    return [done[k] for k in range(shards)]


def imap_threads(task: Callable[[int], Iterable[T]], shards: int,
                 jobs: int) -> Iterator[list[T]]:
    """``list(task(0)), ..., list(task(shards - 1))`` in any order, from up to ``jobs``
    threads of this process.

    For tasks that spend their time in code that releases the GIL (the compiled kernels
    reading pages in place): threads share the maps' page tables and send no results back.
    A task yields its results piece by piece (a batch of pages each); between pieces its
    thread checks whether the run is ending (a shard's exception, Ctrl-C in the main thread)
    and stops, so no thread reads a map for more than one piece after that, and the maps
    can be closed. The main thread waits in ``SimpleQueue.get``, a C call: a signal raises
    there, never inside a Python ``with lock:`` that would then stay locked.

    Raises:
        Exception: what ``task`` raised in a thread.
    """
    if jobs <= 1 or shards <= 1:
        for k in range(shards):
            yield list(task(k))
        return
    if ONE_MALLOC_ARENA:
        _one_malloc_arena()
    stop = threading.Event()
    shard_numbers = iter(range(shards))
    taking = threading.Lock()
    results: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def work() -> None:
        while not stop.is_set():
            with taking:
                k = next(shard_numbers, None)
            if k is None:
                return
            try:
                out = []
                for item in task(k):
                    if stop.is_set():
                        return
                    out.append(item)
                results.put((True, out))
            except BaseException as e:  # noqa: BLE001 - raised in the main thread
                results.put((False, e))
                return

    threads = [threading.Thread(target=work, name=f"ksm-analyze-{i}")
               for i in range(min(jobs, shards))]
    for t in threads:
        t.start()
    try:
        for _ in range(shards):
            ok, value = results.get()
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        for t in threads:  # one piece at most each
            t.join()


ONE_MALLOC_ARENA = False
"""Set by the command line (``cli.main``), whose process is its own: threads then allocate
from one malloc arena (:func:`_one_malloc_arena`). A library caller's process is left as it
was; ``MALLOC_ARENA_MAX=1`` in its environment has the same effect, where wanted."""


@functools.cache
def _one_malloc_arena() -> None:
    """Have every thread allocate from glibc's main heap, as ``MALLOC_ARENA_MAX=1`` would.

    glibc gives each thread that allocates its own arena and keeps what is freed there for
    later: with two threads the peak private memory of a 16 GiB scan grew from 160 to 212 MiB
    (the threads make few, large allocations, so sharing one lock costs nothing measurable).
    Must run before a second arena exists; elsewhere than glibc this does nothing.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)


_M_ARENA_MAX = -8  # glibc malloc.h


def _fork(task: Callable[[int], Any], others: list[Connection]) -> tuple[Connection, int]:
    """Start a worker serving ``task``: the parent's end of its pipe, and its pid."""
    parent, child = Pipe()
    me = os.getpid()
    # Ctrl-C during fork would raise inside its callbacks, which swallow it: hold it till after.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                worker_signals(me)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                for c in [parent, *others]:  # the parent's ends: only the parent holds them
                    c.close()
                _serve(task, child)
                code = 0
            finally:
                os._exit(code)  # never back into the parent's code, nor flush its buffers
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    child.close()
    return parent, pid


def _serve(task: Callable[[int], Any], conn: Connection) -> None:
    """Run shards until told to stop (None) or the parent goes; send each outcome back."""
    while (k := conn.recv()) is not None:
        try:
            reply: tuple[bool, Any] = (True, task(k))
        except BaseException as e:  # noqa: BLE001 - the parent raises it
            # Without its chain: once something installs tblib's exception pickling (Dask
            # does), __context__ is pickled too, and a codec's own exception may not be.
            e.__context__ = e.__cause__ = e.__traceback__ = None
            reply = (False, e)
        try:
            conn.send(reply)
        except Exception as e:  # noqa: BLE001 - an exception or result that does not pickle
            what = reply[1] if not reply[0] else e
            conn.send((False, WorkerError(f"{type(what).__name__}: {what}")))


def _receive(conn: Connection, workers: dict[Connection, int]) -> Any:
    """The next result from ``conn``: the exception a worker sent is raised; a worker gone
    (reaped and forgotten here) raises WorkerError or, stopped by a signal, Interrupted."""
    try:
        ok, value = conn.recv()
    except (EOFError, OSError):
        _, status = os.waitpid(workers.pop(conn), 0)
        conn.close()
        _died(os.waitstatus_to_exitcode(status))
    if not ok:
        raise value
    return value


def _died(code: int) -> NoReturn:
    if -code in (signal.SIGINT, signal.SIGTERM):
        raise Interrupted(-code)
    if code == signal.SIGBUS:  # worker_signals: a fault reading a map
        raise WorkerError("a worker process hit a bus error (SIGBUS) reading an input "
                          "through its map: an I/O error, or a file that changed")
    how = (f"was killed by {signal.Signals(-code).name}" if code < 0
           else f"exited with code {code}")
    raise WorkerError(f"a worker process {how} (out of memory?)" if code == -signal.SIGKILL
                      else f"a worker process {how}")
