"""``fingerprint PID...``: stage 1's fingerprints of live processes, straight from their memory.

The pages are read as :func:`~.capture.capture` reads them (pagemap first, the zero page told
by kpageflags or PAGEMAP_SCAN, ``/proc/PID/mem`` read only for present pages that are not the
zero page, each read checked against a fresh pagemap read, exec and exit noticed), but
instead of being written to a snapshot each block is hashed where it was read: xxh3-64 of its
prefix (:func:`~ksm_analyze.hashing.stage1.hash_batch`) and xxh3-128 of the whole page
(:func:`~ksm_analyze.hashing.stage2.page_contents`), exactly what stage 1 and ``fingerprint``
compute from a snapshot of the same memory. No page byte is written anywhere.

Memory: the columns (32 bytes a stored page) are spilled as they come to private (0600)
temporary files in the output folder, memory-mapped for the digest and streamed a row group at
a time into the Parquet file (:func:`~ksm_analyze.fleet.fingerprint_files.write_columns`),
which is written under a temporary name and renamed into place: the process itself holds a
constant amount of private memory, whatever the size of the target.

A series (``every``) samples the same targets again and again, each sample written as soon as
it is taken. Each input's ``info`` says which process and which sample it is (``identity``:
``<boot_id>:<pid>:<start_time>``, ``sample``, ``sampled_at``, ``sample_seconds``) and what the
machine was (``machine``: kernel, boot_id, the KSM knobs, ``rmap_item_bytes``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..fleet import fingerprint_files
from ..formats import DumpFormat
from ..formats.snapshot import RUN, RunFlags, run_counts, run_extent
from ..hashing.stage1 import Fingerprints, hash_batch
from ..hashing.stage2 import page_contents
from ..options import ProgressCallback, ScanOptions
from ..pages import PageBatch, PageState
from ..units import parse_duration
from .capture import Meter, PfnFacts, _ProcFiles, open_targets, read_process
from .procfs import (
    HOST_PAGE_SIZE,
    KPageFlags,
    ProcessError,
    Vma,
    machine_facts,
    process_facts,
    read_smaps,
)

__all__ = ["LiveSample", "Schedule", "fingerprint_processes", "parse_duration", "sample_name"]

_COLUMNS = ("addr", "prefix", "content_lo", "content_hi")
@dataclass(frozen=True)
class Schedule:
    """When samples are taken: ``count`` of them, one starting every ``every`` seconds (a
    sample that takes longer delays the next, which then starts at once)."""

    every: float = 0.0
    count: int = 1

    @classmethod
    def of(cls, every: str | None, count: int | None, duration: str | None) -> Schedule:
        """From ``--every``, ``--count`` and ``--for``: with ``--every``, exactly one of the
        other two; ``--for D`` takes the samples that start within D (``ceil(D / every)``,
        at least one).

        Raises:
            ValueError: one line saying which options go together.
        """
        if every is None:
            if count is not None or duration is not None:
                raise ValueError("--count and --for go with --every (the interval)")
            return cls()
        seconds = parse_duration(every, "--every")
        if (count is None) == (duration is None):
            raise ValueError("--every takes --count N or --for DURATION (one of them)")
        if count is not None:
            if count < 1:
                raise ValueError(f"--count {count}: at least 1")
            return cls(seconds, count)
        assert duration is not None
        total = parse_duration(duration, "--for")
        if seconds <= 0:
            raise ValueError("--every 0 with --for would never end: give --count")
        return cls(seconds, max(1, -int(-total // seconds)))

    @property
    def series(self) -> bool:
        """More than one sample asked for: file names carry the sample index."""
        return self.count > 1 or self.every > 0


@dataclass
class LiveSample:
    """One sample of one process, written."""

    path: Path
    pid: int
    comm: str
    sample: int
    rows: int
    sampled_at: float
    seconds: float
    counts: dict[str, Any] = field(default_factory=dict)


_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def sample_name(comm: str, pid: int, sample: int | None) -> str:
    """The file of a process's sample: ``<comm>-<pid>[.sNNN].ksmfp.parquet`` (characters of
    ``comm`` other than letters, digits and ``._+-`` as ``_``)."""
    stem = f"{_SAFE.sub('_', comm) or 'process'}-{pid}"
    index = "" if sample is None else f".s{sample:03d}"
    return f"{stem}{index}{fingerprint_files.SUFFIX}"


class _HashSink:
    """A :class:`~.capture.PageSink` that keeps only each page's fingerprints, spilled to
    temporary files (0600) in ``folder`` as they come, removed by :meth:`close`."""

    def __init__(self, folder: Path, nbytes: int) -> None:
        self.nbytes = nbytes
        self.rows = 0
        self.info: dict[str, Any] = {}
        self.vmas: list[dict[str, Any]] = []
        self.runs: list[np.ndarray] = []
        self.paths: dict[str, str] = {}
        self.files: dict[str, Any] = {}
        try:
            for name in _COLUMNS:
                fd, self.paths[name] = tempfile.mkstemp(prefix=f".ksmfp-{name}-", dir=folder)
                self.files[name] = os.fdopen(fd, "wb")
        except OSError:
            self.close()
            raise

    def begin_process(self, info: dict[str, Any]) -> None:
        self.info = info
        self.vmas = info["vmas"]

    def add_runs(self, runs: np.ndarray) -> None:
        self.runs.append(runs.astype(RUN, copy=True))

    def write_pages(self, vaddr: int, data: memoryview) -> None:
        pages = np.frombuffer(data, np.uint8).reshape(-1, HOST_PAGE_SIZE)
        addrs = np.uint64(vaddr) + np.arange(len(pages), dtype=np.uint64) * np.uint64(
            HOST_PAGE_SIZE)
        prefix = hash_batch(PageBatch(addrs, pages), self.nbytes)
        content = page_contents(pages, zero=prefix == 0)
        for name, column in zip(_COLUMNS, (addrs, prefix, content[:, 0], content[:, 1]),
                                strict=True):
            self.files[name].write(np.ascontiguousarray(column, "<u8").tobytes())
        self.rows += len(pages)

    def columns(self) -> dict[str, np.ndarray]:
        """The spilled columns, memory-mapped (empty arrays for no rows)."""
        out = {}
        for name in _COLUMNS:
            self.files[name].flush()
            out[name] = (np.memmap(self.paths[name], "<u8", "r", shape=(self.rows,))
                         if self.rows else np.zeros(0, np.uint64))
        return out

    def extents(self) -> list[Any]:
        """The extents of the runs, VMA by VMA (``read_process`` adds one run array per VMA,
        in order): what a snapshot reader makes of the same runs, with no file offsets."""
        out = []
        for vma, runs in zip(self.vmas, self.runs, strict=True):
            for vaddr, npages, flags in runs.tolist():
                out.append(run_extent(vaddr, npages, RunFlags(flags & 0xFF), vma["vmflags"],
                                      vma["path"]))
        return out

    def close(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):
                f.close()
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                os.unlink(path)


def _identity(machine: dict[str, Any], info: dict[str, Any]) -> str:
    return f"{machine['boot_id']}:{info['pid']}:{info['start_time']}"


def _sample_one(
    out: Path, proc: _ProcFiles, sample: int | None, options: ScanOptions,
    pfn_facts: PfnFacts, machine: dict[str, Any], keep_cmdline: bool,
    progress: Callable[[str], ProgressCallback] | None,
) -> LiveSample:
    """Fingerprint one process once, into its file in ``out``."""
    pid = proc.pid
    info = process_facts(pid)
    if info["exited"]:
        raise ProcessError(pid, "has exited (a zombie): no memory to fingerprint")
    if not proc.same_address_space():
        raise ProcessError(pid, "ran a new program (exec) since it was first read")
    vmas: list[Vma] = read_smaps(pid)
    name = sample_name(info["comm"], pid, sample)
    target = out / name
    _replaceable(target, _identity(machine, info))
    nbytes = options.hashed_bytes(HOST_PAGE_SIZE)
    meter = Meter(progress(name) if progress else None,
                  sum(v.rss_kb for v in vmas) * 1024)
    sink = _HashSink(out, nbytes)
    try:
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        started, clock = time.time(), time.monotonic()
        counts = read_process(sink, proc, info, vmas, pfn_facts, meter)
        seconds = time.monotonic() - clock
        runs = np.concatenate(sink.runs) if sink.runs else np.zeros(0, RUN)
        extents = sink.extents()
        state_pages = dict.fromkeys(PageState, 0)
        for e in extents:
            state_pages[e.state] += e.npages
        columns = sink.columns()
        fp_info = {
            "producer": "ksm-analyze fingerprint (live process)",
            "pid": pid,
            "comm": info["comm"],
            "cmdline": info["cmdline"],
            "start_time": info["start_time"],
            "identity": _identity(machine, info),
            "sample": 0 if sample is None else sample,
            "sampled_at": started,
            "sample_seconds": seconds,
            "created": created,
            "kernel": machine["kernel"],
            "pfn_flags": pfn_facts.source,
            "vmas": len(vmas),
            "mappings": [v.as_meta() for v in vmas],
            **run_counts(runs),
            "ksm_stat_at_capture": sink.info.get("ksm_stat"),
            "machine": machine,
        }
        warnings = []
        if pfn_facts.source == "none":
            warnings.append("zero-page mappings could not be told from zero pages (neither "
                            "root nor PAGEMAP_SCAN): they count as zero pages")
        prints = Fingerprints(
            path=target.name.removesuffix(fingerprint_files.SUFFIX), format=DumpFormat.SNAPSHOT,
            address_space="virtual", page_size=HOST_PAGE_SIZE, prefix_bytes=nbytes,
            extents=extents, info=fp_info, warnings=warnings, addrs=columns["addr"],
            prefix=columns["prefix"], state_pages=state_pages)
        source = {"path": f"{fingerprint_files.LIVE_PREFIX}{fp_info['identity']}", "size": 0,
                  "mtime_ns": int(started * 1e9)}
        key = {"format": DumpFormat.SNAPSHOT.value, "page_size": HOST_PAGE_SIZE,
               "base_address": 0, "prefix_bytes": nbytes}
        fingerprint_files.write_columns(target, [prints], columns, source=source,
                                        options=key, keep_cmdline=keep_cmdline)
        del columns, prints
    finally:
        sink.close()
    return LiveSample(target, pid, info["comm"], fp_info["sample"], sink.rows, started,
                      seconds, counts)


def _replaceable(target: Path, identity: str) -> None:
    """ValueError unless ``target`` is absent or a fingerprint file of this very process."""
    if not os.path.lexists(target):
        return
    with contextlib.suppress(Exception):
        inputs = fingerprint_files.metadata(target)["inputs"]
        if all(m["info"].get("identity") == identity for m in inputs):
            return
    raise ValueError(f"{target} exists and is not a fingerprint file of this process: not "
                     "replaced (remove it, or write to another folder)")


def fingerprint_processes(
    pids: Sequence[int], folder: str | os.PathLike[str], options: ScanOptions,
    schedule: Schedule = Schedule(), *, keep_cmdline: bool = False,
    progress: Callable[[str], ProgressCallback] | None = None,
    written: Callable[[LiveSample], None] | None = None,
    warn: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[LiveSample]:
    """Fingerprint processes ``pids`` into ``folder``, one file per process and sample.

    Every target is opened first (a bad PID fails before anything is written). A target
    that exits (or runs a new program) after its first sample ends its series: ``warn`` is
    told in one line and the others go on.

    Args:
        written: called with each sample once its file is in place.

    Returns:
        Every sample written, in order.

    Raises:
        ProcessError: a target cannot be read, or fails before its first sample was
            written (files of the others stay: each is whole).
        ValueError: no PIDs, a PID twice, or a file there that is not this process's.
    """
    out = Path(folder)
    done: list[LiveSample] = []
    with contextlib.ExitStack() as stack:
        files = open_targets(stack, pids)
        for proc in files:
            if process_facts(proc.pid)["exited"]:
                raise ProcessError(proc.pid, "has exited (a zombie): no memory to fingerprint")
        kpf = KPageFlags()
        stack.callback(kpf.close)
        pfn_facts = PfnFacts(kpf)
        live = list(files)
        start = time.monotonic()
        for k in range(schedule.count):
            if k:
                sleep(max(0.0, start + k * schedule.every - time.monotonic()))
            machine = machine_facts()
            for proc in list(live):
                try:
                    s = _sample_one(out, proc, k if schedule.series else None, options,
                                    pfn_facts, machine, keep_cmdline, progress)
                except ProcessError as e:
                    if not any(d.pid == proc.pid for d in done):
                        raise
                    live.remove(proc)
                    if warn is not None:
                        warn(f"{e}: its series stops after {sum(d.pid == proc.pid for d in done)}"
                             " samples")
                    continue
                except OSError as e:
                    raise InputError(f"cannot write the fingerprints: {e.strerror or e}",
                                     path=out) from None
                done.append(s)
                if written is not None:
                    written(s)
            if not live:
                break
    return done
