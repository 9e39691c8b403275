"""``capture()``: snapshot live processes' memory, with the facts KSM's rules need.

For each VMA of each process: ``pagemap`` says which pages are present, swapped, file or
shared; ``/proc/kpageflags`` (root) or ``PAGEMAP_SCAN`` (Linux 6.7+) which present pages
map the kernel's zero page; then ``/proc/PID/mem`` is read **only for present pages that
are not the zero page**. Reading an absent page through ``mem`` would fault it in (a zero
page PTE, or a freshly allocated shmem page), changing the very memory being measured.

``pagemap`` and ``mem`` are opened before smaps is read and hold on to the address space
they were opened on: if the process runs a new program (exec) or exits, later reads return
nothing and capture fails with one line instead of mixing two address spaces.

The target keeps running: a page dropped (``munmap``, ``MADV_DONTNEED``) between the pagemap
read and the mem read is the one way capture can still fault something in. With nothing
mapped there the read fails (EIO) and faults nothing; with a mapping still or again there it
maps the zero page (or reads a file or shmem page in). Each read is checked against a fresh
pagemap read: pages no longer present, swapped out or mapping the zero page are recorded as
unreadable, not stored. Stop the process (``kill -STOP``) for an exact snapshot.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import InputError
from ..formats.snapshot import RUN, RunFlags, SnapshotWriter, vma_flags
from ..options import ProgressCallback
from ..pages import MapFlags
from .procfs import (
    HOST_PAGE_SIZE,
    KPF_KSM,
    KPF_THP,
    KPF_ZERO_PAGE,
    PAGE_IS_HUGE,
    PAGE_IS_PFNZERO,
    PM_FILE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SWAPPED,
    KPageFlags,
    ProcessError,
    Vma,
    ksm_stat,
    ksm_sysfs,
    machine_facts,
    pagemap_scan,
    proc_error,
    process_facts,
    read_smaps,
)

__all__ = ["CaptureSummary", "Meter", "PageSink", "PfnFacts", "capture", "open_targets",
           "read_process"]

CHUNK_PAGES = 1 << 14
"""Pages per pagemap read: 64 MiB of memory, 128 KiB of pagemap."""
READ_PAGES = 1 << 10
"""Pages per /proc/PID/mem read: 4 MiB, into one reused buffer."""
_NO_READ = MapFlags.SPECIAL
"""VM_IO/VM_PFNMAP memory is never read: ``mem`` refuses it, and it may be device memory."""
_EXECED = "ran a new program (exec) during capture; nothing was written"


class PageSink(Protocol):
    """Where :func:`read_process` puts what it reads: a snapshot (:class:`SnapshotWriter`)
    or fingerprints (``live.fingerprint``). ``write_pages`` is called on a worker thread,
    with a buffer that is reused once it returns."""

    def begin_process(self, info: dict[str, Any]) -> None: ...

    def write_pages(self, vaddr: int, data: memoryview) -> None: ...

    def add_runs(self, runs: np.ndarray) -> None: ...


@dataclass
class CaptureSummary:
    """What :func:`capture` wrote."""

    path: Path
    pfn_flags: str
    """Where zero-page facts came from: ``kpageflags``, ``pagemap_scan`` or ``none``."""
    processes: list[dict[str, Any]] = field(default_factory=list)
    """Per process: ``pid``, ``comm``, ``vmas``, ``present_pages``, ``stored_pages``,
    ``zero_pfn_pages``, ``swapped_pages``, ``unreadable_pages``."""
    bytes_written: int = 0


def capture(
    pids: Sequence[int],
    output: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
) -> CaptureSummary:
    """Write a snapshot of processes ``pids`` to ``output`` (atomically, mode 0600).

    Args:
        pids: processes to capture, in this order.
        output: the snapshot file; nothing is left there if capture fails.
        progress: called as ``progress(done_bytes, total_bytes)`` while pages are read; the
            total is the resident memory smaps reports.

    Returns:
        A :class:`CaptureSummary`.

    Raises:
        ProcessError: a process does not exist, cannot be read, is a kernel thread, or
            exited or ran a new program (exec) during capture.
        ValueError: no PIDs, or a PID given twice.
    """
    with contextlib.ExitStack() as stack:
        files = open_targets(stack, pids)
        facts = [process_facts(pid) for pid in pids]
        for f in facts:
            if f["exited"]:
                raise ProcessError(int(f["pid"]), "has exited (a zombie): no memory to capture")
        smaps = [read_smaps(pid) for pid in pids]
        return _capture_all(Path(output), files, facts, smaps, progress)


def open_targets(stack: contextlib.ExitStack, pids: Sequence[int]) -> list[_ProcFiles]:
    """Open each process's ``pagemap`` and ``mem`` (closed with ``stack``), first of all, to
    fail early: they keep the address space they were opened on, so smaps read after them
    describes what is read, and an exec or exit later is noticed."""
    if not pids:
        raise ValueError("no process given")
    if len(set(pids)) != len(pids):
        raise ValueError("a process is given twice")
    return [stack.enter_context(_open_proc(pid)) for pid in pids]


def _capture_all(
    out: Path, files: list[_ProcFiles], facts: list[dict[str, Any]], smaps: list[list[Vma]],
    progress: ProgressCallback | None,
) -> CaptureSummary:
    meter = Meter(progress, sum(v.rss_kb for vmas in smaps for v in vmas) * 1024)
    host = machine_facts()
    boot_id = host["boot_id"]
    meta = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kernel": os.uname().release,
        "machine": os.uname().machine,
        "ksm": ksm_sysfs(),
        "host_facts": host,  # what the ksmd model needs, as live samples record it
    }
    kpf = KPageFlags()
    try:
        pfn_facts = PfnFacts(kpf)
        summary = CaptureSummary(out, "")
        try:
            writer = SnapshotWriter(out, page_size=HOST_PAGE_SIZE, meta=meta)
        except OSError as e:
            raise InputError(f"cannot write the snapshot here: {e.strerror}", path=out) from None
        with writer:
            for proc, info, vmas in zip(files, facts, smaps, strict=True):
                # Captures of one process at other moments are samples of one input.
                sample = {**info, "identity": f"{boot_id}:{info['pid']}:{info['start_time']}",
                          "sampled_at": time.time()}
                summary.processes.append(read_process(writer, proc, sample, vmas, pfn_facts,
                                                      meter))
            summary.pfn_flags = writer.meta["pfn_flags"] = pfn_facts.source
            writer.commit()
        summary.bytes_written = out.stat().st_size
        return summary
    finally:
        kpf.close()


@dataclass(frozen=True)
class _ProcFiles:
    """A process's open ``pagemap`` and ``mem``: both pinned to one address space."""

    pid: int
    pagemap: int
    mem: int

    def same_address_space(self) -> bool:
        """False once the address space they were opened on is gone (exec, exit): reads of
        it then return nothing, where a live one gives an entry for any user address."""
        try:
            return len(os.pread(self.pagemap, 8, 0)) == 8
        except OSError:
            return False


@contextlib.contextmanager
def _open_proc(pid: int) -> Iterator[_ProcFiles]:
    fds: list[int] = []
    try:
        for name in ("pagemap", "mem"):
            path = f"/proc/{pid}/{name}"
            try:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as e:
                raise proc_error(pid, path, e) from None
        yield _ProcFiles(pid, fds[0], fds[1])
    finally:
        for fd in fds:
            os.close(fd)


class Meter:
    """Bytes stored so far, reported to a progress callback."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.callback:
            self.callback(self.done, max(self.total, self.done))


class PfnFacts:
    """Which present pages map the zero page or a THP: /proc/kpageflags as root, else
    PAGEMAP_SCAN (Linux 6.7+), which reports both without root."""

    def __init__(self, kpf: KPageFlags) -> None:
        self.kpf = kpf
        self.scan_works: bool | None = None

    @property
    def source(self) -> str:
        """``kpageflags``, ``pagemap_scan`` or ``none`` (then zero-page PTEs read as zeros)."""
        if self.kpf.available:
            return "kpageflags"
        return "none" if self.scan_works is False else "pagemap_scan"

    def mark(self, flags: np.ndarray, pagemap_fd: int, start: int) -> None:
        """Without kpageflags, add ZERO_PFN and THP to ``flags`` of the pages from ``start``."""
        if self.kpf.available or self.scan_works is False:
            return
        found = pagemap_scan(pagemap_fd, start, start + len(flags) * HOST_PAGE_SIZE,
                             PAGE_IS_PFNZERO | PAGE_IS_HUGE)
        self.scan_works = found is not None
        for lo, hi, categories in found or ():
            first, end = (lo - start) // HOST_PAGE_SIZE, (hi - start) // HOST_PAGE_SIZE
            # The huge zero page is both; it is the zero page that matters to KSM.
            bit = RunFlags.ZERO_PFN if categories & PAGE_IS_PFNZERO else RunFlags.THP
            flags[first:end] |= np.uint32(bit)


def read_process(
    sink: PageSink, proc: _ProcFiles, info: dict[str, Any], vmas: list[Vma],
    pfn_facts: PfnFacts, meter: Meter,
) -> dict[str, Any]:
    """Hand one process's present pages that are not the zero page, and the runs of page
    flags of each of ``vmas``, to ``sink``; return its page counts (``CaptureSummary``).

    Raises:
        ProcessError: it exited or ran a new program (exec) meanwhile.
    """
    try:
        return _read_process(sink, proc, info, vmas, pfn_facts, meter)
    except ProcessError:
        _check_alive(proc.pid, info)  # gone meanwhile: say so
        raise


def _read_process(
    writer: PageSink, proc: _ProcFiles, info: dict[str, Any], vmas: list[Vma],
    pfn_facts: PfnFacts, meter: Meter,
) -> dict[str, Any]:
    pid = proc.pid
    writer.begin_process({**info, "ksm_stat": ksm_stat(pid),
                          "vmas": [v.as_meta() for v in vmas]})
    counts: dict[str, Any] = {"pid": pid, "comm": info["comm"], "vmas": len(vmas)}

    def still_there(addr: int, before: np.ndarray) -> np.ndarray:
        """Which pages just read (pagemap ``before`` the read) are still present and not the
        zero page: the others went away meanwhile, and if present again, it is the read that
        faulted them in. Only pages with a new PFN can have become the zero page (root);
        without PFNs, PAGEMAP_SCAN tells (6 us per 4 MiB, against 600 for kpageflags)."""
        after = _pagemap_entries(pid, proc.pagemap, addr, len(before))
        flags = np.zeros(len(after), np.uint32)
        moved = ((after ^ before) & np.uint64(PM_PFN_MASK)) != 0
        if moved.any():
            flags[moved] = _pagemap_flags(after[moved], pfn_facts.kpf)
        _mark(pid, pfn_facts, flags, proc.pagemap, addr)
        present = (after & np.uint64(PM_PRESENT | PM_SWAPPED)) == np.uint64(PM_PRESENT)
        kept: np.ndarray = present & (flags & RunFlags.ZERO_PFN == 0)
        return kept

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer") as pool:
        copier = _PageCopier(pid, proc.mem, writer, pool, still_there)
        try:
            for vma in vmas:
                runs = _capture_vma(pid, vma, proc.pagemap, copier, pfn_facts, meter)
                writer.add_runs(runs)
                _tally(counts, runs)
        finally:
            copier.drain()
    if not proc.same_address_space():  # exec (or exit) after the last read
        raise ProcessError(pid, _EXECED)
    _check_alive(pid, info)
    return counts


def _tally(counts: dict[str, Any], runs: np.ndarray) -> None:
    flags, pages = runs["flags"], runs["npages"].astype(np.int64)
    for key, bit in (("present_pages", RunFlags.PRESENT), ("stored_pages", RunFlags.STORED),
                     ("zero_pfn_pages", RunFlags.ZERO_PFN), ("swapped_pages", RunFlags.SWAPPED),
                     ("unreadable_pages", RunFlags.UNREADABLE)):
        counts[key] = counts.get(key, 0) + int(pages[(flags & bit) != 0].sum())


def _check_alive(pid: int, info: dict[str, Any]) -> None:
    try:
        again = process_facts(pid)
    except ProcessError:
        again = None
    if again is None or again["exited"] or again["start_time"] != info["start_time"]:
        raise ProcessError(pid, "exited during capture; nothing was written")


def _capture_vma(
    pid: int, vma: Vma, pagemap_fd: int, copier: _PageCopier, pfn_facts: PfnFacts,
    meter: Meter,
) -> np.ndarray:
    """Store one VMA's readable pages, a chunk at a time; return the VMA's runs."""
    if vma.rss_kb == 0 and vma.swap_kb == 0:  # nothing resident: no need to walk pagemap
        return _absent_runs(vma.start, vma.npages)
    readable_vma = not vma_flags(vma.vmflags) & _NO_READ
    runs = []
    for first in range(0, vma.npages, CHUNK_PAGES):
        count = min(CHUNK_PAGES, vma.npages - first)
        addr = vma.start + first * HOST_PAGE_SIZE
        entries = _pagemap_entries(pid, pagemap_fd, addr, count)
        flags = _pagemap_flags(entries, pfn_facts.kpf)
        _mark(pid, pfn_facts, flags, pagemap_fd, addr)
        readable = flags & (RunFlags.PRESENT | RunFlags.ZERO_PFN) == RunFlags.PRESENT
        if readable_vma:
            _store(addr, copier, flags, entries, np.flatnonzero(readable), meter)
        else:
            flags[readable] |= np.uint32(RunFlags.UNREADABLE)
        runs.append(_runs(addr, flags))
    return _merge_runs(np.concatenate(runs))


def _pagemap_entries(pid: int, pagemap_fd: int, addr: int, count: int) -> np.ndarray:
    """The pagemap entries of ``count`` pages from ``addr`` (zeros past a short read:
    beyond the task's addresses, or an address space that is gone)."""
    try:
        raw = os.pread(pagemap_fd, count * 8, addr // HOST_PAGE_SIZE * 8)
    except OSError as e:
        raise proc_error(pid, f"/proc/{pid}/pagemap", e) from None
    entries = np.zeros(count, np.uint64)
    got = np.frombuffer(raw, "<u8")[:count]
    entries[: len(got)] = got
    return entries


def _mark(pid: int, pfn_facts: PfnFacts, flags: np.ndarray, pagemap_fd: int,
          addr: int) -> None:
    try:
        pfn_facts.mark(flags, pagemap_fd, addr)
    except OSError as e:  # an unexpected PAGEMAP_SCAN error: still one line, not a traceback
        raise proc_error(pid, f"/proc/{pid}/pagemap", e) from None


def _pagemap_flags(entries: np.ndarray, kpf: KPageFlags) -> np.ndarray:
    flags = np.zeros(len(entries), np.uint32)
    present = (entries & np.uint64(PM_PRESENT)) != 0
    flags[present] |= np.uint32(RunFlags.PRESENT)
    flags[(entries & np.uint64(PM_SWAPPED)) != 0] |= np.uint32(RunFlags.SWAPPED)
    flags[(entries & np.uint64(PM_FILE)) != 0] |= np.uint32(RunFlags.FILE)
    pfns = entries & np.uint64(PM_PFN_MASK)
    known = present & (pfns != 0)  # PFNs read as 0 without CAP_SYS_ADMIN
    if kpf.available and known.any():
        kflags = kpf.lookup(pfns[known])
        sub = flags[known]
        for kbit, rbit in ((KPF_ZERO_PAGE, RunFlags.ZERO_PFN), (KPF_THP, RunFlags.THP),
                           (KPF_KSM, RunFlags.KSM)):
            sub[(kflags & np.uint64(kbit)) != 0] |= np.uint32(rbit)
        flags[known] = sub
    return flags


def _store(
    start: int, copier: _PageCopier, flags: np.ndarray, entries: np.ndarray,
    pages: np.ndarray, meter: Meter,
) -> None:
    """Copy ``pages`` (indexes from ``start``, with their pagemap ``entries``) from mem into
    the snapshot, run by run."""
    if not len(pages):
        return
    runs = np.split(pages, np.flatnonzero(np.diff(pages) != 1) + 1)
    for run in (r[i : i + READ_PAGES] for r in runs for i in range(0, len(r), READ_PAGES)):
        kept = copier.copy(start + int(run[0]) * HOST_PAGE_SIZE, entries[run])
        if kept is None:  # EIO for the block: try page by page, keep what reads
            one = [copier.copy(start + k * HOST_PAGE_SIZE, entries[k : k + 1]) for k in run.tolist()]
            kept = np.array([k is not None and bool(k[0]) for k in one])
        flags[run[kept]] |= np.uint32(RunFlags.STORED)
        flags[run[~kept]] |= np.uint32(RunFlags.UNREADABLE)
        meter.add(int(kept.sum()) * HOST_PAGE_SIZE)


class _PageCopier:
    """Copies pages from ``/proc/PID/mem`` into the sink, 4 MiB at a time.

    Two reused buffers: one is read into while a writer thread writes the other, so the two
    kernel copies overlap. (Fresh 64 MiB ``bytes`` per read cost more in page faults than
    the copy itself: 2.3 s against 0.7 s for 2 GiB.)
    """

    def __init__(self, pid: int, fd: int, writer: PageSink, pool: ThreadPoolExecutor,
                 still_there: Callable[[int, np.ndarray], np.ndarray]) -> None:
        self.pid, self.fd, self.writer, self.pool = pid, fd, writer, pool
        self.still_there = still_there
        self.buffers = [memoryview(bytearray(READ_PAGES * HOST_PAGE_SIZE)) for _ in range(2)]
        self.pending: list[Future[None] | None] = [None, None]
        self.turn = 0

    def copy(self, addr: int, before: np.ndarray) -> np.ndarray | None:
        """Store the pages at ``addr`` (pagemap entries ``before``) that are still there once
        read; which ones were, or None if the kernel refuses to read them (EIO, short read)."""
        npages = len(before)
        i = self.turn
        previous = self.pending[i]
        if previous is not None:
            previous.result()  # the buffer's previous write is done (or raises)
        if addr >= 1 << 63:  # [vsyscall] lies beyond a signed off_t
            return None
        buffer = self.buffers[i][: npages * HOST_PAGE_SIZE]
        try:
            got = os.preadv(self.fd, [buffer], addr)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EFAULT):
                return None
            raise proc_error(self.pid, f"/proc/{self.pid}/mem", e) from None
        if got == 0:  # mem's address space is gone: no longer this process's (exec, exit)
            raise ProcessError(self.pid, _EXECED)
        if got != len(buffer):
            return None
        kept = self.still_there(addr, before)
        cuts = np.flatnonzero(np.diff(np.concatenate([[False], kept, [False]]).astype(np.int8)))
        spans = [(int(lo), int(hi)) for lo, hi in zip(cuts[::2], cuts[1::2], strict=True)]
        if spans:
            self.pending[i] = self.pool.submit(self._write, addr, buffer, spans)
            self.turn ^= 1
        return kept

    def _write(self, addr: int, buffer: memoryview, spans: list[tuple[int, int]]) -> None:
        for lo, hi in spans:
            self.writer.write_pages(addr + lo * HOST_PAGE_SIZE, buffer[lo * HOST_PAGE_SIZE : hi * HOST_PAGE_SIZE])

    def drain(self) -> None:
        """Wait for every write (before the next process, and before commit)."""
        for i, f in enumerate(self.pending):
            if f is not None:
                self.pending[i] = None
                f.result()


def _runs(start: int, flags: np.ndarray) -> np.ndarray:
    """Runs of equal flags as RUN records."""
    if not len(flags):
        return np.zeros(0, RUN)
    firsts = np.concatenate([[0], np.flatnonzero(np.diff(flags)) + 1])
    out = np.zeros(len(firsts), RUN)
    out["vaddr"] = start + firsts.astype(np.uint64) * HOST_PAGE_SIZE
    out["npages"] = np.diff(np.concatenate([firsts, [len(flags)]]))
    out["flags"] = flags[firsts]
    return out


def _merge_runs(runs: np.ndarray) -> np.ndarray:
    """Join neighbouring runs with equal flags (chunk borders cut them)."""
    if len(runs) < 2:
        return runs
    keep = np.concatenate([[True], runs["flags"][1:] != runs["flags"][:-1]])
    groups = np.cumsum(keep) - 1
    out: np.ndarray = runs[keep].copy()
    totals = np.bincount(groups, weights=runs["npages"])
    if totals.max() > 0xFFFFFFFF:  # a run would not fit its u32 count: keep the cuts
        return runs
    out["npages"] = totals
    return out


def _absent_runs(start: int, npages: int) -> np.ndarray:
    """A VMA with nothing resident, as runs of at most 2**32 - 1 pages."""
    step = 0xFFFFFFFF
    firsts = np.arange(0, npages, step, dtype=np.uint64)
    out = np.zeros(len(firsts), RUN)
    out["vaddr"] = start + firsts * HOST_PAGE_SIZE
    out["npages"] = np.minimum(step, npages - firsts)
    return out
