"""Signals and inputs that change: every way a run can be cut short ends in one line.

- ``SIGINT`` and ``SIGTERM`` (:func:`raise_on_interrupt`, installed by the command line):
  raise :class:`Interrupted` in the main thread, so ``finally`` blocks run (workers are
  killed, temporary files removed); signals that follow are ignored while that unwinds.
- ``SIGBUS``: reading a map past the end of a file that shrank faults inside C code, and the
  faulting instruction runs again after a Python-level handler, forever. While inputs are
  :func:`watching`, a C-level handler (through ctypes) maps zeros over the rest of the
  faulting input's map, so the reading goes on and ends, and :func:`watching` then raises
  ``FILE: changed while reading ...``: a library caller gets an exception, and the process
  lives on. The handler before is put back exactly when the last watch (of any thread: a
  Dask worker's tasks) ends. A SIGBUS elsewhere goes to that previous handler (the
  default: the process dies), or, in the command line (:data:`EXIT_ON_OTHER_BUS_ERRORS`),
  says one line and exits 1. Forked workers just exit
  (:func:`worker_signals`) and leave the telling to the parent, which sees a worker die
  and finds the input that changed.
- :func:`watching` notes each input's size and modification time when its reading starts;
  if the reading fails, or ends, with an input changed, that is the error
  (``FILE: truncated while reading (size was X, now Y)``, or ``changed``): nothing read from it can be trusted.

Nothing here is installed at import: the library changes no signal disposition outside a
watched reading.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from types import FrameType

from .errors import InputError
from .units import size_text

__all__ = ["EXIT_ON_OTHER_BUS_ERRORS", "Interrupted", "changed_input", "raise_on_interrupt",
           "watching", "worker_signals"]

EXIT_ON_OTHER_BUS_ERRORS = False
"""Set by the command line (``cli.main``): a SIGBUS the watch cannot pin on an input says
one line and exits 1, instead of going to the handler before (a library's caller keeps
whatever it had, the default being death by SIGBUS)."""


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
        if _in_finalizer(frame):
            # Raised here, it would be printed as "Exception ignored in ... __del__" and
            # dropped, and the run would go on to its end (seen with a multiprocessing
            # Connection's __del__): the signal comes again once the finalizer is done.
            threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
            return
        for s in (signal.SIGINT, signal.SIGTERM):  # one interruption: let the cleanup finish
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, interrupt)


def _in_finalizer(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an object's ``__del__``, where Python drops exceptions."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


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
    mine = [p for p in dict.fromkeys(paths) if p not in _WATCHED]
    try:
        for p in mine:
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            st = os.fstat(fd)
            _WATCHED[p] = (fd, st.st_size, st.st_mtime_ns)
        with _sigbus_handled():
            try:
                yield
            except Exception as e:
                if error := changed_input(mine) or _faulted(mine):
                    raise error from e
                raise
            if error := changed_input(mine) or _faulted(mine):
                raise error
    finally:
        for p in mine:
            if p in _WATCHED:
                os.close(_WATCHED.pop(p)[0])


# -- SIGBUS, through the C library (Linux) ---------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_BUS_ERROR = ("bus error (SIGBUS) reading an input through its map: an I/O error, or a file "
              "that changed")
_SA_SIGINFO = 4
_PROT_READ, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS = 1, 2, 0x10, 0x20  # Linux, every arch
_SI_ADDR = 16 if ctypes.sizeof(ctypes.c_void_p) == 8 else 12  # siginfo_t: 3 ints, then it
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Sigaction(ctypes.Structure):
    """``struct sigaction`` as glibc and musl lay it out on Linux."""

    _fields_ = [("handler", ctypes.c_void_p),
                ("mask", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


if _libc is not None:
    _libc.sigaction.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    _libc.signal.restype = ctypes.c_void_p
    _libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int, ctypes.c_long]

_PREVIOUS = ctypes.create_string_buffer(512)
"""The SIGBUS action before the outermost watch (an opaque ``struct sigaction``, any libc's
fits), put back when it ends, or at once for a fault that is not ours."""
_ZEROED: list[tuple[int, int]] = []
"""Address ranges of inputs' maps that the handler replaced by zeros during this watch."""
_FAULTED: set[str] = set()
"""Watched inputs whose map faulted during this watch."""


def _faulted(paths: Iterable[str]) -> InputError | None:
    """The error for the first of ``paths`` whose map faulted, though its size and mtime
    stayed (an I/O error)."""
    for path in paths:
        if path in _FAULTED:
            return InputError(_BUS_ERROR, path=path)
    return None


def _on_sigbus(signum: int, info: int | None, context: int | None) -> None:
    """Runs in the signal context of a fault in a map.

    The fault is in an input's map: zeros over the rest of that map (from the faulting page
    to its end), noted for :func:`watching`, and the faulting instruction runs again and
    reads zeros. It is in a range zeroed already (another thread faulted first): nothing to
    do. Anywhere else, the command line says one line and exits; a library caller's process
    gets the handler it had."""
    enabled = gc.isenabled()
    gc.disable()  # no finalizers run in the middle of the interrupted C code
    try:
        if ctypes.c_int.from_address((info or 0) + 8).value <= 0:  # si_code: sent, no fault
            _not_ours(sent=True)
            return
        address = ctypes.c_void_p.from_address((info or 0) + _SI_ADDR).value or 0
        if any(lo <= address < hi for lo, hi in _ZEROED):
            return
        if (where := _input_map(address)) is not None:
            path, lo, hi = where
            if _libc is not None and _libc.mmap(lo, hi - lo, _PROT_READ,
                                                 _MAP_PRIVATE | _MAP_FIXED | _MAP_ANONYMOUS,
                                                 -1, 0) != _MAP_FAILED:
                _ZEROED.append((lo, hi))
                _FAULTED.add(path)
                return
        _not_ours()
    finally:
        if enabled:
            gc.enable()


def _input_map(address: int) -> tuple[str, int, int] | None:
    """(watched input, first page, end) of the map holding ``address``, if it maps one."""
    devices = {(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino): path
               for path, st in ((p, os.fstat(fd)) for p, (fd, _, _) in list(_WATCHED.items()))}
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            span, _, _, device, inode = line.split()[:5]
            lo, hi = (int(x, 16) for x in span.split(b"-"))
            if lo <= address < hi:
                major, minor = (int(x, 16) for x in device.split(b":"))
                path = devices.get((major, minor, int(inode)))
                return None if path is None else (path, address & ~(page - 1), hi)
    return None


def _not_ours(sent: bool = False) -> None:
    """A SIGBUS that is no input's: the command line's one line and exit 1, or the handler
    before, which runs when the faulting instruction does again (or, for a signal sent,
    when it is sent again here)."""
    if EXIT_ON_OTHER_BUS_ERRORS:
        if not _REPORTING.acquire(blocking=False):  # threads faulting together: one says it
            time.sleep(10)  # the first one exits meanwhile
            os._exit(1)
        try:
            os.write(2, f"Error: {changed_input() or _BUS_ERROR}\n".encode(errors="replace"))
        finally:
            os._exit(1)  # returning would run the faulting instruction again
    if _libc is not None:
        _libc.sigaction(signal.SIGBUS, _PREVIOUS, None)
        if sent:
            signal.raise_signal(signal.SIGBUS)  # blocked till this handler returns


_REPORTING = threading.Lock()


_SIGBUS_HANDLER = _HANDLER(_on_sigbus)


_HANDLING = [0]
"""Watches running (nested, or in other threads: a Dask worker's tasks); the handler is
installed while there is one."""
_HANDLING_LOCK = threading.Lock()


@contextlib.contextmanager
def _sigbus_handled() -> Iterator[None]:
    """Install the SIGBUS handler for the block, then put back the one before, exactly,
    when the last block running (in any thread) ends."""
    if _libc is None:
        yield
        return
    with _HANDLING_LOCK:
        _HANDLING[0] += 1
        if _HANDLING[0] == 1:
            action = _Sigaction(handler=ctypes.cast(_SIGBUS_HANDLER, ctypes.c_void_p).value,
                                flags=_SA_SIGINFO)
            _libc.sigaction(signal.SIGBUS, None, _PREVIOUS)
            _libc.sigaction(signal.SIGBUS, ctypes.byref(action), None)
    try:
        yield
    finally:
        with _HANDLING_LOCK:
            _HANDLING[0] -= 1
            if _HANDLING[0] == 0:
                _libc.sigaction(signal.SIGBUS, _PREVIOUS, None)
                _ZEROED.clear()
                _FAULTED.clear()


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
