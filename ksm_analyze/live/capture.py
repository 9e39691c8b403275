"""``capture()``: snapshot live processes' memory, with the facts KSM's rules need.

For each VMA of each process: ``pagemap`` says which pages are present, swapped, file or
shared; ``/proc/kpageflags`` (root) or ``PAGEMAP_SCAN`` (Linux 6.7+) which present pages
map the kernel's zero page; then ``/proc/PID/mem`` is read **only for present pages that
are not the zero page**. Reading an absent page through ``mem`` would fault it in (a zero
page PTE, or a freshly allocated shmem page), changing the very memory being measured.

The target keeps running: a page unmapped between the pagemap read and the mem read is the
one way capture can still fault something in. Stop the process (``kill -STOP``) for an exact
snapshot.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..formats.snapshot import RUN, RunFlags, SnapshotWriter, vma_flags
from ..pages import MapFlags
from ..settings import ProgressCallback
from .procfs import (
    KPF_KSM,
    KPF_THP,
    KPF_ZERO_PAGE,
    PAGE_IS_HUGE,
    PAGE_IS_PFNZERO,
    PAGE_SIZE,
    PM_FILE,
    PM_PFN_MASK,
    PM_PRESENT,
    PM_SWAPPED,
    KPageFlags,
    ProcessError,
    Vma,
    ksm_stat,
    ksm_sysfs,
    pagemap_scan,
    proc_error,
    process_facts,
    read_smaps,
)

__all__ = ["CaptureSummary", "capture"]

CHUNK_PAGES = 1 << 14
"""Pages per pagemap read: 64 MiB of memory, 128 KiB of pagemap."""
READ_PAGES = 1 << 10
"""Pages per /proc/PID/mem read: 4 MiB, into one reused buffer."""
_NO_READ = MapFlags.SPECIAL
"""VM_IO/VM_PFNMAP memory is never read: ``mem`` refuses it, and it may be device memory."""



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
        ProcessError: a process does not exist, cannot be read, or exited during capture.
        ValueError: no PIDs, or a PID given twice.
    """
    if not pids:
        raise ValueError("no process given")
    if len(set(pids)) != len(pids):
        raise ValueError("a process is given twice")
    facts = [process_facts(pid) for pid in pids]  # fail early, before writing anything
    for f in facts:
        if f["exited"]:
            raise ProcessError(int(f["pid"]), "has exited (a zombie): no memory to capture")
    smaps = [read_smaps(pid) for pid in pids]
    meter = _Meter(progress, sum(v.rss_kb for vmas in smaps for v in vmas) * 1024)
    meta = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kernel": os.uname().release,
        "machine": os.uname().machine,
        "ksm": ksm_sysfs(),
    }
    out = Path(output)
    kpf = KPageFlags()
    try:
        pfn_facts = _PfnFacts(kpf)
        summary = CaptureSummary(out, "")
        try:
            writer = SnapshotWriter(out, page_size=PAGE_SIZE, meta=meta)
        except OSError as e:
            raise InputError(f"cannot write the snapshot here: {e.strerror}", path=out) from None
        with writer:
            for info, vmas in zip(facts, smaps, strict=True):
                try:
                    counts = _capture_process(writer, info, vmas, pfn_facts, meter)
                except ProcessError:
                    _check_alive(int(info["pid"]), info)  # gone meanwhile: say so
                    raise
                summary.processes.append(counts)
            summary.pfn_flags = writer.meta["pfn_flags"] = pfn_facts.source
            writer.commit()
        summary.bytes_written = out.stat().st_size
        return summary
    finally:
        kpf.close()


class _Meter:
    """Bytes stored so far, reported to a progress callback."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.callback:
            self.callback(self.done, max(self.total, self.done))


class _PfnFacts:
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
        found = pagemap_scan(pagemap_fd, start, start + len(flags) * PAGE_SIZE,
                             PAGE_IS_PFNZERO | PAGE_IS_HUGE)
        self.scan_works = found is not None
        for lo, hi, categories in found or ():
            first, end = (lo - start) // PAGE_SIZE, (hi - start) // PAGE_SIZE
            # The huge zero page is both; it is the zero page that matters to KSM.
            bit = RunFlags.ZERO_PFN if categories & PAGE_IS_PFNZERO else RunFlags.THP
            flags[first:end] |= np.uint32(bit)


def _capture_process(
    writer: SnapshotWriter, info: dict[str, Any], vmas: list[Vma], pfn_facts: _PfnFacts,
    meter: _Meter,
) -> dict[str, Any]:
    pid = int(info["pid"])
    writer.begin_process({**info, "ksm_stat": ksm_stat(pid),
                          "vmas": [v.as_meta() for v in vmas]})
    fds = {}
    try:
        for name in ("pagemap", "mem"):
            path = f"/proc/{pid}/{name}"
            try:
                fds[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise proc_error(pid, path, e) from None
        counts: dict[str, Any] = {"pid": pid, "comm": info["comm"], "vmas": len(vmas)}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer") as pool:
            copier = _PageCopier(fds["mem"], writer, pool)
            try:
                for vma in vmas:
                    runs = _capture_vma(pid, vma, fds["pagemap"], copier, pfn_facts, meter)
                    writer.add_runs(runs)
                    _tally(counts, runs)
            finally:
                copier.drain()
        _check_alive(pid, info)
        return counts
    finally:
        for fd in fds.values():
            os.close(fd)


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
    pid: int, vma: Vma, pagemap_fd: int, copier: _PageCopier, pfn_facts: _PfnFacts,
    meter: _Meter,
) -> np.ndarray:
    """Store one VMA's readable pages, a chunk at a time; return the VMA's runs."""
    if vma.rss_kb == 0 and vma.swap_kb == 0:  # nothing resident: no need to walk pagemap
        return _absent_runs(vma.start, vma.npages)
    readable_vma = not vma_flags(vma.vmflags) & _NO_READ
    runs = []
    for first in range(0, vma.npages, CHUNK_PAGES):
        count = min(CHUNK_PAGES, vma.npages - first)
        addr = vma.start + first * PAGE_SIZE
        try:
            raw = os.pread(pagemap_fd, count * 8, addr // PAGE_SIZE * 8)
        except OSError as e:
            raise proc_error(pid, f"/proc/{pid}/pagemap", e) from None
        entries = np.zeros(count, np.uint64)
        got = np.frombuffer(raw, "<u8")[:count]
        entries[: len(got)] = got
        flags = _pagemap_flags(entries, pfn_facts.kpf)
        pfn_facts.mark(flags, pagemap_fd, addr)
        readable = flags & (RunFlags.PRESENT | RunFlags.ZERO_PFN) == RunFlags.PRESENT
        if readable_vma:
            _store(addr, copier, flags, np.flatnonzero(readable), meter)
        else:
            flags[readable] |= np.uint32(RunFlags.UNREADABLE)
        runs.append(_runs(addr, flags))
    return _merge_runs(np.concatenate(runs))


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
    start: int, copier: _PageCopier, flags: np.ndarray, pages: np.ndarray, meter: _Meter
) -> None:
    """Copy ``pages`` (indexes from ``start``) from mem into the snapshot, run by run."""
    if not len(pages):
        return
    runs = np.split(pages, np.flatnonzero(np.diff(pages) != 1) + 1)
    for run in (r[i : i + READ_PAGES] for r in runs for i in range(0, len(r), READ_PAGES)):
        if copier.copy(start + int(run[0]) * PAGE_SIZE, len(run)):
            flags[run] |= np.uint32(RunFlags.STORED)
            meter.add(len(run) * PAGE_SIZE)
            continue
        for k in run.tolist():  # EIO for the block: try page by page, keep what reads
            if copier.copy(start + k * PAGE_SIZE, 1):
                flags[k] |= np.uint32(RunFlags.STORED)
                meter.add(PAGE_SIZE)
            else:
                flags[k] |= np.uint32(RunFlags.UNREADABLE)


class _PageCopier:
    """Copies pages from ``/proc/PID/mem`` into the snapshot, 4 MiB at a time.

    Two reused buffers: one is read into while a writer thread writes the other, so the two
    kernel copies overlap. (Fresh 64 MiB ``bytes`` per read cost more in page faults than
    the copy itself: 2.3 s against 0.7 s for 2 GiB.)
    """

    def __init__(self, fd: int, writer: SnapshotWriter, pool: ThreadPoolExecutor) -> None:
        self.fd, self.writer, self.pool = fd, writer, pool
        self.buffers = [memoryview(bytearray(READ_PAGES * PAGE_SIZE)) for _ in range(2)]
        self.pending: list[Future[None] | None] = [None, None]
        self.turn = 0

    def copy(self, addr: int, npages: int) -> bool:
        """Store ``npages`` pages at ``addr``; False if the kernel refuses to read them (EIO,
        a short read)."""
        i = self.turn
        previous = self.pending[i]
        if previous is not None:
            previous.result()  # the buffer's previous write is done (or raises)
        if addr >= 1 << 63:  # [vsyscall] lies beyond a signed off_t
            return False
        buffer = self.buffers[i][: npages * PAGE_SIZE]
        try:
            got = os.preadv(self.fd, [buffer], addr)
        except OSError as e:
            if e.errno in (errno.EIO, errno.EFAULT):
                return False
            raise
        if got != len(buffer):
            return False
        self.pending[i] = self.pool.submit(self.writer.write_pages, addr, buffer)
        self.turn ^= 1
        return True

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
    out["vaddr"] = start + firsts.astype(np.uint64) * PAGE_SIZE
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
    out["vaddr"] = start + firsts * PAGE_SIZE
    out["npages"] = np.minimum(step, npages - firsts)
    return out
