"""Signals and inputs that change: every way a run can be cut short ends in one line.

- ``SIGINT`` and ``SIGTERM`` (:func:`raise_on_interrupt`, installed by the command line):
  raise :class:`Interrupted` in the main thread, so ``finally`` blocks run (workers are
  killed, temporary files removed); signals that follow are ignored while that unwinds.
- ``SIGBUS``: reading a map past the end of a file that shrank faults inside C code, and the
  faulting instruction runs again after a Python-level handler, forever. While inputs are
  :func:`watching`, a C-level handler (through ctypes) names the input that changed and
  exits 1; forked workers just exit (:func:`worker_signals`) and leave the telling to the
  parent, which sees a worker die and finds the input that changed.
- :func:`watching` notes each input's size and modification time when its reading starts;
  if the reading fails, or ends, with an input changed, that is the error
  (``FILE: truncated while reading (size was X, now Y)``, or ``changed``): nothing read from it can be trusted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from types import FrameType

from .errors import InputError
from .units import size_text

__all__ = ["Interrupted", "changed_input", "raise_on_interrupt", "watching", "worker_signals"]


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwinds like KeyboardInterrupt; the exit code is 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


def raise_on_interrupt() -> None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` (main thread only)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):  # one interruption: let the cleanup finish
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, interrupt)


_WATCHED: dict[str, tuple[int, int, int]] = {}
"""Inputs being read: path -> (our fd on it, size, mtime in ns) when reading started."""


def changed_input(paths: Iterable[str] | None = None) -> InputError | None:
    """The error for the first watched input (of ``paths``) whose size or mtime changed."""
    for path in _WATCHED if paths is None else paths:
        fd, size, mtime = _WATCHED[path]
        st = os.fstat(fd)  # the file we read, even if the name now points elsewhere
        if st.st_size != size:
            how = "truncated" if st.st_size < size else "changed"
            return InputError(f"{how} while reading (size was {size_text(size)}, now "
                              f"{size_text(st.st_size)})", path=path)
        if st.st_mtime_ns != mtime:
            return InputError("changed while reading (rewritten: same size, new "
                              "modification time)", path=path)
    return None


@contextlib.contextmanager
def watching(paths: Iterable[str]) -> Iterator[None]:
    """Read ``paths`` (opened, regular files) under watch: a SIGBUS or an error while
    reading, or the end of the reading, with one of them changed raises (or writes, for
    SIGBUS) ``FILE: truncated while reading ...`` (or ``changed``)."""
    outermost = not _WATCHED  # installs the SIGBUS handler
    mine = [p for p in dict.fromkeys(paths) if p not in _WATCHED]
    try:
        for p in mine:
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            st = os.fstat(fd)
            _WATCHED[p] = (fd, st.st_size, st.st_mtime_ns)
        with _sigbus_handled() if outermost else contextlib.nullcontext():
            try:
                yield
            except Exception as e:
                if error := changed_input(mine):
                    raise error from e
                raise
            if error := changed_input(mine):
                raise error
    finally:
        for p in mine:
            if p in _WATCHED:
                os.close(_WATCHED.pop(p)[0])


# -- SIGBUS, through the C library (Linux) ---------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)
_BUS_ERROR = ("bus error (SIGBUS) reading an input through its map: an I/O error, or a file "
              "that changed")
if _libc is not None:
    _libc.signal.restype = ctypes.c_void_p
    _libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def _on_sigbus(signum: int) -> None:
    """Runs in the signal context of a fault in a mapped input: one line, exit 1.

    Threads reading the same map fault together: the first says it and exits, the others
    wait for that (returning would run the faulting instruction again)."""
    if not _REPORTING.acquire(blocking=False):
        time.sleep(10)  # the first one exits meanwhile
        os._exit(1)
    try:
        error = changed_input()
        line = f"Error: {error or _BUS_ERROR}\n"
        os.write(2, line.encode(errors="replace"))
    finally:
        os._exit(1)  # returning would run the faulting instruction again


_REPORTING = threading.Lock()


_SIGBUS_HANDLER = _HANDLER(_on_sigbus)


@contextlib.contextmanager
def _sigbus_handled() -> Iterator[None]:
    """Install the SIGBUS handler for the block, then put back the one before, exactly."""
    if _libc is None:
        yield
        return
    old = ctypes.create_string_buffer(512)  # an opaque struct sigaction (any libc's fits)
    _libc.sigaction(signal.SIGBUS, None, old)
    _libc.signal(signal.SIGBUS, ctypes.cast(_SIGBUS_HANDLER, ctypes.c_void_p))
    try:
        yield
    finally:
        _libc.sigaction(signal.SIGBUS, old, None)


def worker_signals(parent: int) -> None:
    """In a forked worker: leave Ctrl-C to the parent, die with it, exit quietly (code 7,
    SIGBUS's number) on a fault in a map, and let SIGTERM kill it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _libc is not None:
        _libc.signal(signal.SIGBUS, ctypes.cast(_libc._exit, ctypes.c_void_p))
        _libc.prctl(ctypes.c_int(1), ctypes.c_ulong(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
