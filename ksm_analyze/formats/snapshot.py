"""Live-process snapshots (``ksm-analyze capture``): an ELF core with the host's page facts.

A snapshot is a little-endian ELF64 ``ET_CORE`` file with three ``KSM-ANALYZE`` notes (ID,
META JSON, RUNS of page flags) and the stored pages in ``PT_LOAD`` segments at their virtual
addresses. The one full description of the layout is ``docs/formats.md`` (Snapshot format);
the note types are ``NT_ID``/``NT_META``/``NT_RUNS`` below and the flag bits :class:`RunFlags`.
"""

from __future__ import annotations

import contextlib
import enum
import json
import mmap
import os
import struct
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np

from ..errors import InputError
from ..pages import PAGE_SIZE, Extent, MapFlags, PageState, check_page_size
from .base import MIN_LIMIT, DumpFormat, strict_json
from .elfcore import ELFMAG, ET_CORE, PN_XNUM, PT_LOAD, PT_NOTE, ElfCoreReader, Note, Segment

__all__ = ["RunFlags", "SnapshotReader", "SnapshotWriter", "run_counts", "run_extent"]

NOTE_OWNER = "KSM-ANALYZE"
NT_ID, NT_META, NT_RUNS = 0x4B534D01, 0x4B534D02, 0x4B534D03  # "KSM" + 1..3
ID_TEXT = b"ksm-analyze process snapshot\0\0\0\0"
VERSION = 1
DATA_OFFSET = 0x1000
"""Page data starts here, page aligned, after the ELF header and the ID note."""

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")  # p_type p_flags p_offset p_vaddr p_paddr p_filesz p_memsz p_align
_SHDR = struct.Struct("<IIQQQQIIQQ")
_NHDR = struct.Struct("<III")
RUN = np.dtype([("vaddr", "<u8"), ("npages", "<u4"), ("flags", "<u4")])
_MAX_RUN_PAGES = 0xFFFFFFFF
MAX_PROCESSES = MIN_LIMIT
"""Processes one snapshot may list: each becomes an input of the analysis (a reader, a row of
every table), so a few MB of META claiming a million would not fit; a host's processes do."""


class RunFlags(enum.IntFlag):
    """What the kernel said about a run of pages at capture time."""

    PRESENT = 1 << 0
    """In memory (pagemap bit 63)."""
    SWAPPED = 1 << 1
    """Swapped out (pagemap bit 62)."""
    FILE = 1 << 2
    """Page-cache page or shared anonymous memory (pagemap bit 61)."""
    ZERO_PFN = 1 << 3
    """Maps the kernel's zero page (kpageflags bit 24, or PAGEMAP_SCAN PAGE_IS_PFNZERO)."""
    THP = 1 << 4
    """Part of a transparent huge page (kpageflags bit 22, or PAGEMAP_SCAN PAGE_IS_HUGE)."""
    KSM = 1 << 5
    """Already a KSM page (kpageflags bit 21)."""
    STORED = 1 << 6
    """The bytes are in a PT_LOAD segment."""
    UNREADABLE = 1 << 7
    """Present when pagemap was read, but not stored: reading ``/proc/PID/mem`` failed (EIO:
    ``[vvar]``, device memory), or the page was gone, swapped out or the zero page by then."""


_VMFLAG_BITS = {
    "mg": MapFlags.MERGEABLE, "sh": MapFlags.SHARED, "ms": MapFlags.SHARED,
    "io": MapFlags.SPECIAL, "pf": MapFlags.SPECIAL, "de": MapFlags.SPECIAL,
    "mm": MapFlags.SPECIAL, "ht": MapFlags.HUGETLB,
}  # fmt: skip
"""smaps VmFlags codes (Documentation/filesystems/proc.rst) that KSM's rules look at."""


def vma_flags(vmflags: str) -> MapFlags:
    """The eligibility facts of one VMA from its smaps ``VmFlags`` codes."""
    out = MapFlags.VMFLAGS
    for code in vmflags.split():
        out |= _VMFLAG_BITS.get(code, MapFlags(0))
    return out


def run_extent(vaddr: int, npages: int, flags: RunFlags, vmflags: str, path: str,
               offset: int = -1) -> Extent:
    """The extent of one run of pages with ``flags``, in a VMA with these smaps ``VmFlags``
    and ``path``; ``offset``: where its bytes are stored (a stored run), else -1."""
    mapping = vma_flags(vmflags) | (MapFlags.FILE if flags & RunFlags.FILE else MapFlags.ANON)
    if flags & RunFlags.THP:
        mapping |= MapFlags.THP
    label = path or "[anon]"
    if flags & RunFlags.STORED:
        return Extent(vaddr, npages, PageState.DATA, offset, label, mapping)
    if flags & RunFlags.ZERO_PFN:
        return Extent(vaddr, npages, PageState.ZERO, -1, label, mapping | MapFlags.ZERO_PFN)
    if flags & RunFlags.SWAPPED:
        return Extent(vaddr, npages, PageState.NOT_SAVED, -1, label, mapping | MapFlags.SWAPPED)
    if flags & RunFlags.PRESENT:  # present but unreadable
        return Extent(vaddr, npages, PageState.NOT_SAVED, -1, label, mapping)
    return Extent(vaddr, npages, PageState.HOLE, -1, label, mapping)


def run_counts(runs: np.ndarray) -> dict[str, int]:
    """Pages per run flag (``present_pages``, ``stored_pages``...) of a :data:`RUN` array."""
    flags, pages = runs["flags"], runs["npages"].astype(np.int64)
    return {f"{str(f.name).lower()}_pages": int(pages[(flags & f) != 0].sum()) for f in RunFlags}


def _note(n_type: int, desc: bytes) -> bytes:
    name = NOTE_OWNER.encode() + b"\0"
    pad = (-len(name)) % 4, (-len(desc)) % 4
    return _NHDR.pack(len(name), len(desc), n_type) + name + b"\0" * pad[0] + desc + b"\0" * pad[1]


class SnapshotWriter:
    """Writes a snapshot: page bytes as they come, then notes and headers at commit.

    The file is built under a temporary name, mode 0600 (process memory holds secrets), in
    the target's directory, and renamed into place by :meth:`commit`; :meth:`abort` (or
    leaving the ``with`` block by an exception) deletes it, so no half-written snapshot stays.
    """

    def __init__(self, path: str | os.PathLike[str], *, page_size: int, meta: dict[str, Any]):
        self.path = Path(path)
        self.page_size = page_size
        self.meta = {**meta, "version": VERSION, "page_size": page_size, "processes": []}
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        self._f = os.fdopen(fd, "wb")  # mkstemp creates the file with mode 0600
        self._f.write(b"\0" * DATA_OFFSET)
        self._loads: list[list[int]] = []  # [p_offset, p_vaddr, p_filesz]
        self._runs: list[np.ndarray] = []
        self._nruns = 0
        self.bytes_written = 0

    def begin_process(self, info: dict[str, Any]) -> None:
        """Start the next process; ``info`` is its META entry (``pid``, ``comm``, ``vmas``...)."""
        self.meta["processes"].append({**info, "runs": [self._nruns, 0],
                                       "loads": [len(self._loads), 0]})

    def write_pages(self, vaddr: int, data: bytes | memoryview) -> None:
        """Store the bytes of consecutive pages starting at ``vaddr``."""
        offset = self._f.tell()
        with self._writing():
            self._f.write(data)
        size = memoryview(data).nbytes
        self.bytes_written += size
        loads = self.meta["processes"][-1]["loads"]
        last = self._loads[-1] if loads[1] else None  # never join another process's segment
        if last and last[0] + last[2] == offset and last[1] + last[2] == vaddr:
            last[2] += size  # continues the previous segment in memory and in the file
        else:
            self._loads.append([offset, vaddr, size])
            loads[1] += 1

    def add_runs(self, runs: np.ndarray) -> None:
        """Describe pages of the current process (a :data:`RUN` array, sorted by address)."""
        self._runs.append(runs.astype(RUN, copy=False))
        self._nruns += len(runs)
        self.meta["processes"][-1]["runs"][1] += len(runs)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (disk full, quota) is an error about the output file."""
        try:
            yield
        except OSError as e:
            raise InputError(f"cannot write the snapshot: {e.strerror}", path=self.path) from None

    def commit(self) -> None:
        """Write notes and headers, flush to disk, and move the file into place."""
        with self._writing():
            self._commit()

    def _commit(self) -> None:
        f = self._f
        notes_at = f.seek(0, os.SEEK_END)
        runs = np.concatenate(self._runs) if self._runs else np.zeros(0, RUN)
        notes = _note(NT_META, json.dumps(self.meta).encode()) + _note(NT_RUNS, runs.tobytes())
        f.write(notes)
        phoff = f.tell()
        id_note = _note(NT_ID, ID_TEXT)
        phdrs = [
            _PHDR.pack(PT_NOTE, 0, 0x40, 0, 0, len(id_note), 0, 4),
            _PHDR.pack(PT_NOTE, 0, notes_at, 0, 0, len(notes), 0, 4),
        ]
        phdrs += [_PHDR.pack(PT_LOAD, 4, o, v, 0, n, n, self.page_size) for o, v, n in self._loads]
        f.write(b"".join(phdrs))
        phnum, shoff, shnum = len(phdrs), 0, 0
        if phnum >= PN_XNUM:  # gABI extended numbering: the count goes to section 0's sh_info
            shoff, shnum = f.tell(), 1
            f.write(_SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0))
        ident = ELFMAG + bytes([2, 1, 1]) + b"\0" * 9  # ELFCLASS64, little endian, EV_CURRENT
        f.seek(0)
        f.write(_EHDR.pack(ident, ET_CORE, _machine(), 1, 0, phoff, shoff, 0, 64, _PHDR.size,
                           min(phnum, PN_XNUM), _SHDR.size if shnum else 0, shnum, 0))
        f.write(id_note)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Delete the partial file."""
        with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails too
            self._f.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None or not self._f.closed:
            self.abort()


def _machine() -> int:
    """e_machine of this host: the snapshot's addresses are this architecture's."""
    return {"x86_64": 62, "aarch64": 183, "ppc64le": 21, "s390x": 22, "riscv64": 243}.get(
        os.uname().machine, 0
    )


class _Shared:
    """What the readers of one snapshot file share: its map, and its headers and META parsed
    once. A reader per process each parsing the whole file would be quadratic in processes,
    and each holding a map (and its file descriptor) would run out of them."""

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.parsed: tuple[list[Segment], dict[str, Any], Note, Note] | None = None


_SHARED: weakref.WeakValueDictionary[tuple[int, ...], _Shared] = weakref.WeakValueDictionary()
"""The snapshots open in this process, by file identity; each goes with its last reader."""


def _field(value: Any, kind: type, what: str) -> Any:
    """``value`` if it is a ``kind``: ints from 0 to 2^64 - 1, strings made writable as UTF-8
    (JSON escapes can hold lone surrogates, which no output encodes)."""
    if type(value) is not kind:
        raise TypeError(f"{what} is {type(value).__name__}, not {kind.__name__}")
    if isinstance(value, int) and not 0 <= value < 1 << 64:
        raise ValueError(f"{what} {value} is not between 0 and 2^64 - 1")
    return value.encode("utf-8", "backslashreplace").decode() if isinstance(value, str) else value


def _checked_meta(raw: bytes) -> dict[str, Any]:
    """META decoded, with every value the readers and the analysis use checked: a ValueError,
    TypeError or KeyError (or RecursionError for deep nesting) says what is wrong."""
    meta: dict[str, Any] = _field(
        strict_json(raw), dict, "META"
    )
    check_page_size(_field(meta["page_size"], int, "page_size"))
    for key in ("kernel", "created", "pfn_flags"):
        if meta.get(key) is not None:
            meta[key] = _field(meta[key], str, key)
    processes = _field(meta["processes"], list, "processes")
    if len(processes) > MAX_PROCESSES:
        raise ValueError(f"{len(processes):,} processes, more than the {MAX_PROCESSES:,} a "
                         "snapshot may list")
    pids: set[int] = set()
    for i, p in enumerate(processes):
        what = f"process {i}"
        _field(p, dict, what)
        if _field(p["pid"], int, f"{what} pid") in pids:
            raise ValueError(f"{what} repeats pid {p['pid']}: a snapshot lists each process once")
        pids.add(p["pid"])
        if p.get("comm") is not None:
            p["comm"] = _field(p["comm"], str, f"{what} comm")
        p["cmdline"] = [_field(a, str, f"{what} cmdline")
                        for a in _field(p.get("cmdline", []), list, f"{what} cmdline")]
        for key in ("runs", "loads"):
            if len(_field(p[key], list, f"{what} {key}")) != 2:
                raise ValueError(f"{what} {key} is not [first, count]")
            p[key] = [_field(x, int, f"{what} {key}") for x in p[key]]
        for v in _field(p["vmas"], list, f"{what} vmas"):
            for key, kind in (("start", int), ("end", int), ("vmflags", str), ("path", str)):
                v[key] = _field(_field(v, dict, f"{what} vma")[key], kind, f"{what} vma {key}")
    return meta


class SnapshotReader(ElfCoreReader):
    """One process of a snapshot (``process`` is its index in the snapshot's process list)."""

    format = DumpFormat.SNAPSHOT
    unwrapped_only = "it is read in place"
    address_space = "virtual"

    def __init__(
        self, path: str | os.PathLike[str], *, page_size: int = PAGE_SIZE, base_address: int = 0,
        process: int = 0,
    ) -> None:
        self.process_index = process
        super().__init__(path, page_size=page_size, base_address=base_address)

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """An ELF core whose first note, at 0x40, is owned by KSM-ANALYZE."""
        owner = NOTE_OWNER.encode() + b"\0"
        return super().probe(head) and head[0x40 + _NHDR.size : 0x40 + 24] == owner

    @property
    def name(self) -> str:
        """The input name in tables: the file and the process."""
        return f"{self.path}:{self.process['pid']}"

    def _map(self) -> mmap.mmap:
        st = os.fstat(self._fd)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        shared = _SHARED.get(key)
        if shared is None:
            shared = _SHARED[key] = _Shared(super()._map())
        self._shared: _Shared | None = shared
        os.close(self._fd)  # the map holds the file
        self._fd = -1
        return shared.mm

    def _parse(self) -> tuple[list[Segment], dict[str, Any], Note, Note]:
        """The PT_LOAD headers, the checked META and the META and RUNS notes."""
        loads = self._headers()
        notes = {n.n_type: n for n in self.notes if n.name == NOTE_OWNER}
        for n_type, what in ((NT_META, "META"), (NT_RUNS, "RUNS")):
            if n_type not in notes:  # placed after the ID note (0x40), where the notes are
                where = max((n.desc_offset for n in self.notes), default=self.e_phoff)
                raise self._error(f"snapshot has no {NOTE_OWNER} {what} note (type {n_type})",
                                  where)
        meta_note = notes[NT_META]
        try:
            meta = _checked_meta(self._read(meta_note.desc_offset, meta_note.descsz, "META"))
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise self._error(f"bad snapshot metadata: {type(e).__name__} {e}",
                              meta_note.desc_offset) from None
        return loads, meta, meta_note, notes[NT_RUNS]

    def _load_extents(self) -> list[Extent]:
        assert self._shared is not None
        if self._shared.parsed is None:
            self._shared.parsed = self._parse()
        loads, self.meta, meta_note, runs_note = self._shared.parsed
        self.producer = "ksm-analyze"
        self.processes: list[dict[str, Any]] = self.meta["processes"]
        if self.meta["page_size"] != self.page_size:
            raise ValueError(
                f"{self.path} holds {self.meta['page_size']}-byte pages; analyze it with "
                f"--page-size {self.meta['page_size']}"
            )
        if not 0 <= self.process_index < len(self.processes):
            raise self._error(f"bad snapshot metadata: no process {self.process_index} in its "
                              f"{len(self.processes)}", meta_note.desc_offset)
        self.process = self.processes[self.process_index]
        (first, count), (load_first, load_count) = self.process["runs"], self.process["loads"]
        if runs_note.descsz % RUN.itemsize or not 0 <= first <= first + count <= (
            runs_note.descsz // RUN.itemsize
        ):
            raise self._error(f"process {self.process_index}'s runs [{first}, +{count}) are "
                              "outside the RUNS note", runs_note.desc_offset)
        if not 0 <= load_first <= load_first + load_count <= len(loads):
            raise self._error(f"process {self.process_index}'s PT_LOAD segments "
                              f"[{load_first}, +{load_count}) are not in the file's "
                              f"{len(loads)}", meta_note.desc_offset)
        runs = np.frombuffer(self._mm, RUN, count, runs_note.desc_offset + first * RUN.itemsize)
        self.run_flags = runs
        # Virtual addresses repeat across processes: only this process's segments count.
        mine = loads[load_first : load_first + load_count]
        vmas = sorted((v["start"], v["end"], v["vmflags"], v["path"]) for v in self.process["vmas"])
        return self._extents(runs, vmas, [s for s in mine if s.p_filesz],
                             runs_note.desc_offset + first * RUN.itemsize)

    def _extents(
        self, runs: np.ndarray, vmas: list[tuple[int, int, str, str]], loads: list[Any],
        runs_at: int,
    ) -> list[Extent]:
        """Extents of this process's runs (``runs_at``: file offset of its first record)."""
        ps = self.page_size
        vma_starts = [v[0] for v in vmas]
        loads.sort(key=lambda s: s.p_vaddr)
        load_starts = np.array([s.p_vaddr for s in loads], dtype=np.uint64)
        out = []
        for k, (vaddr, npages, raw_flags) in enumerate(runs.tolist()):
            at = runs_at + k * RUN.itemsize  # this run's record, for errors
            self._origins[vaddr] = at
            flags = RunFlags(raw_flags & 0xFF)
            i = np.searchsorted(vma_starts, vaddr, side="right") - 1
            end = vaddr + npages * ps
            if i < 0 or end > vmas[i][1]:
                raise self._error(f"run of {npages} pages at {vaddr:#x} lies outside every VMA",
                                  at)
            _, _, vmflags, path = vmas[i]
            offset = -1
            if flags & RunFlags.STORED:
                j = int(np.searchsorted(load_starts, vaddr, side="right")) - 1
                if j < 0 or end > loads[j].p_vaddr + loads[j].p_filesz:
                    raise self._error(f"stored run of {npages} pages at {vaddr:#x} is not "
                                      "inside one PT_LOAD segment", at)
                offset = loads[j].p_offset + vaddr - loads[j].p_vaddr
            out.append(run_extent(vaddr, npages, flags, vmflags, path, offset))
        return out

    def info(self) -> dict[str, Any]:
        """The process, the capture's facts and page counts by run flag."""
        return {
            "producer": "ksm-analyze capture",
            "pid": self.process.get("pid"),
            "comm": self.process.get("comm"),
            "cmdline": self.process.get("cmdline"),
            "processes_in_snapshot": len(self.processes),
            "created": self.meta.get("created"),
            "kernel": self.meta.get("kernel"),
            "pfn_flags": self.meta.get("pfn_flags"),
            "vmas": len(self.process.get("vmas", [])),
            **run_counts(self.run_flags),
            "ksm_stat_at_capture": self.process.get("ksm_stat"),
            **{k: self.process[k] for k in ("identity", "sampled_at") if k in self.process},
            **({"machine": self.meta["host_facts"]}
               if isinstance(self.meta.get("host_facts"), dict) else {}),
        }

    def close(self) -> None:
        """Drop this reader's share of the map: it is released with the file's last reader."""
        self._mm = None  # type: ignore[assignment]
        self._shared = None
        super().close()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "process": self.process_index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["path"], page_size=state["page_size"], base_address=state["base_address"],
            process=state["process"],
        )
