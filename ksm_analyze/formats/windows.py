"""Windows crash dumps (``PAGEDU64``, ``PAGEDUMP``): complete memory dumps, full or bitmap.

Layout (volatility3 ``framework/layers/crash.py`` and ``symbols/windows/crash64.json``,
``crash.json``, ``crash_common.json``; QEMU ``include/qemu/win_dump_defs.h`` for what
``dump-guest-memory -w`` writes; rizin ``librz/bin/format/dmp/dmp_specs.h`` for the bitmap
signatures): a header of 0x2000 bytes (64-bit, ``PAGE`` + ``DU64``) or 0x1000 (32-bit,
``PAGE`` + ``DUMP``), all little-endian:

====================================  ===========  ==========
field                                 64-bit       32-bit
====================================  ===========  ==========
MachineImageType (u32)                0x30         0x20
NumberProcessors (u32)                0x34         0x24
BugCheckCode (u32)                    0x38         0x28
PhysicalMemoryBlockBuffer             0x88         0x64
  NumberOfRuns (u32)                  +0           +0
  NumberOfPages                       +8 (u64)     +4 (u32)
  runs {BasePage, PageCount}          +0x10, u64   +8, u32
DumpType (u32)                        0xF98        0xF88
====================================  ===========  ==========

(volatility3's ``crash64.json`` puts a 32-bit NumberOfPages at +4; QEMU's ``WinDumpPhyMemDesc64``
and rizin have 4 bytes of padding and a u64 at +8, which is read here, and only for a warning.)

DumpType 1 (full): the runs' pages follow the header back to back. DumpType 5 (bitmap): a
``_SUMMARY_DUMP`` follows the header (signature ``SDMP`` or ``FDMP``, then ``DUMP``;
``HeaderSize`` u64 at +0x20 is the file offset of the first page, ``Pages`` u64 at +0x28 the
pages stored, ``BitmapSize`` u64 at +0x30 the bits of the bitmap at +0x38, one per physical
page, LSB first); the pages whose bit is set follow in page order. A page of a RAM run whose
bit is clear was left out (free memory, typically): EXCLUDED, content unknown, never zero.
volatility3 reads the 32-bit bitmap dump with the same ``_SUMMARY_DUMP``; so does this.

Kernel, summary, header-only and triage dumps hold kernel memory at best: refused.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from ..errors import UnsupportedDumpError
from ..pages import Extent, PageBatch, PageState
from ..units import size_text
from .base import ADDRESS_LIMIT, DEFAULT_BATCH_PAGES, RANGE_BYTES, DumpFormat, DumpReader

__all__ = ["WindowsReader"]

WIN_PAGE = 4096
BITMAP_CHUNK = 1 << 20
"""Bytes of bitmap decoded at a time (8 Mi pages, 32 GiB of guest memory)."""


class Layout(NamedTuple):
    """Where the header fields are in one word size."""

    bits: int
    header_bytes: int
    machine: int
    processors: int
    bugcheck: int
    memory_block: int
    pages_field: struct.Struct
    runs_at: int
    run: struct.Struct
    block_bytes: int
    """Size of PhysicalMemoryBlockBuffer: the runs must fit in it."""
    dump_type: int


LAYOUTS = {
    b"PAGEDU64": Layout(64, 0x2000, 0x30, 0x34, 0x38, 0x88, struct.Struct("<Q"), 0x10,
                        struct.Struct("<QQ"), 704, 0xF98),
    b"PAGEDUMP": Layout(32, 0x1000, 0x20, 0x24, 0x28, 0x64, struct.Struct("<I"), 0x08,
                        struct.Struct("<II"), 700, 0xF88),
}
SUMMARY = struct.Struct("<4s4sI20xQQQ")
"""_SUMMARY_DUMP: Signature, ValidDump, DumpOptions, HeaderSize (+0x20), Pages (+0x28),
BitmapSize (+0x30); the bitmap starts at +0x38."""
SUMMARY_SIGNATURES = (b"SDMP", b"FDMP")
DUMP_FULL, DUMP_BITMAP_FULL = 1, 5
REFUSED_TYPES = {
    2: "a kernel (summary) memory dump",
    3: "a header-only dump",
    4: "a small memory dump (triage, minidump)",
    6: "a kernel memory dump (bitmap of kernel pages only)",
    7: "an automatic memory dump (kernel pages only)",
}
MACHINES = {0x14C: "i386", 0x8664: "x86_64", 0xAA64: "arm64", 0x1C4: "arm"}


class WindowsReader(DumpReader):
    """A Windows complete memory dump: full (runs) or bitmap (pages left out are EXCLUDED)."""

    format = DumpFormat.WINDOWS
    unwrapped_only = None

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """``PAGEDU64`` or ``PAGEDUMP`` at offset 0."""
        return head[:8] in LAYOUTS

    def _load_extents(self) -> list[Extent]:
        found = LAYOUTS.get(bytes(self._read(0, 8, "Windows dump signature")))
        if found is None:
            raise self._error("not a Windows crash dump: no PAGEDU64 or PAGEDUMP at offset 0", 0)
        self.layout = lay = found
        self._read(0, lay.header_bytes, f"the {lay.bits}-bit dump header")
        u32 = struct.Struct("<I")
        (self.machine,) = self._unpack(u32, lay.machine, "MachineImageType")
        (self.processors,) = self._unpack(u32, lay.processors, "NumberProcessors")
        (self.bugcheck,) = self._unpack(u32, lay.bugcheck, "BugCheckCode")
        (self.dump_type,) = self._unpack(u32, lay.dump_type, "DumpType")
        self.runs = self._runs()
        if self.dump_type in REFUSED_TYPES:
            raise UnsupportedDumpError(
                f"this is {REFUSED_TYPES[self.dump_type]} (DumpType {self.dump_type}), which "
                "holds no guest memory beyond the kernel's; take a complete memory dump "
                "(Windows: Startup and Recovery, 'Complete memory dump'; QEMU: "
                "dump-guest-memory -w)", path=self.path, offset=lay.dump_type)
        if self.dump_type == DUMP_FULL:
            self.kind = "full"
            return self._full()
        if self.dump_type == DUMP_BITMAP_FULL:
            self.kind = "bitmap"
            return self._bitmap()
        raise self._error(f"unknown DumpType {self.dump_type} (1 full and 5 bitmap are read)",
                          lay.dump_type)

    def _runs(self) -> list[tuple[int, int]]:
        """The RAM runs ``(first page, pages)`` of PhysicalMemoryBlockBuffer."""
        lay = self.layout
        (nruns,) = self._unpack(struct.Struct("<I"), lay.memory_block, "NumberOfRuns")
        most = (lay.block_bytes - lay.runs_at) // lay.run.size
        if nruns > most:
            raise self._error(
                f"NumberOfRuns is {nruns:,}; PhysicalMemoryBlockBuffer holds at most {most}",
                lay.memory_block)
        (self.claimed_pages,) = self._unpack(lay.pages_field, lay.memory_block + (
            8 if lay.bits == 64 else 4), "NumberOfPages")
        runs = []
        for i in range(nruns):
            at = lay.memory_block + lay.runs_at + i * lay.run.size
            base, count = self._unpack(lay.run, at, f"run {i}")
            if (base + count) * WIN_PAGE > ADDRESS_LIMIT:
                raise self._error(
                    f"run {i} ends at {(base + count) * WIN_PAGE:#x}, above 2^56 (64 PiB): "
                    "past any physical address", at)
            runs.append((base, count))
        if sum(c for _, c in runs) != self.claimed_pages:
            self.warnings.append(
                f"{self.path}: the runs hold {sum(c for _, c in runs):,} pages but "
                f"NumberOfPages says {self.claimed_pages:,}")
        return runs

    def _span(self, page: int, npages: int, file_offset: int, state: PageState,
              label: str) -> Extent:
        """An extent of ``npages`` 4 KiB pages from ``page``, in analysis pages: a larger
        analysis page keeps only the whole ones (counted for one warning)."""
        ps, addr, size = self.page_size, page * WIN_PAGE, npages * WIN_PAGE
        lead = -addr % ps
        n = max(0, size - lead) // ps
        self._trimmed += size - n * ps
        return Extent(addr + lead, n, state, file_offset + lead if file_offset >= 0 else -1,
                      label)

    def _full(self) -> list[Extent]:
        self._trimmed = 0
        offset, out = self.layout.header_bytes, []
        for i, (base, count) in enumerate(self.runs):
            out.append(self._span(base, count, offset, PageState.DATA, f"run {i}"))
            offset += count * WIN_PAGE
        self._trim_warning()
        return out

    def _bitmap(self) -> list[Extent]:
        self._trimmed = 0
        at = self.layout.header_bytes
        sig, valid, _options, first, stored, nbits = self._unpack(SUMMARY, at, "_SUMMARY_DUMP")
        if sig not in SUMMARY_SIGNATURES or valid != b"DUMP":
            raise self._error(
                f"bitmap dump without its _SUMMARY_DUMP: signature {(sig + valid)!r} "
                "(expected SDMPDUMP or FDMPDUMP)", at)
        nbytes = (nbits + 7) // 8
        bitmap_at = at + SUMMARY.size
        if nbits > ADDRESS_LIMIT // WIN_PAGE:
            raise self._error(f"BitmapSize {nbits:,} pages reaches past 2^56 (64 PiB)", at + 0x30)
        if bitmap_at + nbytes > self.file_size:
            self._read(bitmap_at, nbytes, f"the bitmap of {nbits:,} pages")  # raises
        # Inside a compressed wrapper the bitmap is decompressed (at most the stream's size:
        # it fits, as checked above); otherwise a view of the map.
        raw = (np.frombuffer(self._read(bitmap_at, nbytes, "the bitmap"), np.uint8)
               if self.source is not None else
               np.frombuffer(self._mm, np.uint8, nbytes, bitmap_at))
        if first < bitmap_at + nbytes:
            raise self._error(
                f"HeaderSize {first:#x} puts the first page inside the bitmap, which ends at "
                f"{bitmap_at + nbytes:#x}", at + 0x20)
        kinds = self._page_kinds(raw, nbits)
        out: list[Extent] = []
        rank = 0
        for s, e, k in kinds:
            if k == 1:
                out.append(self._span(s, e - s, first + rank * WIN_PAGE, PageState.DATA,
                                      "pages in the bitmap"))
                rank += e - s
            elif k == 2:
                out.append(self._span(s, e - s, -1, PageState.EXCLUDED,
                                      "RAM left out of the bitmap dump"))
        self.stored_pages = rank
        if rank != stored:
            raise self._error(
                f"the bitmap marks {rank:,} pages present but the _SUMMARY_DUMP says "
                f"{stored:,}", at + 0x28)
        self._trim_warning()
        return out

    def _page_kinds(self, raw: np.ndarray, nbits: int) -> list[tuple[int, int, int]]:
        """Runs ``(first page, end page, kind)`` of the bitmap's pages: kind 1 stored, 2 a
        RAM page left out, 0 neither. Read BITMAP_CHUNK bytes at a time, so memory stays
        bounded whatever BitmapSize claims; the ranges are capped as they are found."""
        runs = self.runs or [(0, nbits)]  # no run table: every page the bitmap covers is RAM
        out: list[tuple[int, int, int]] = []
        start, kind = 0, -1
        for lo in range(0, nbits, 8 * BITMAP_CHUNK):
            hi = min(nbits, lo + 8 * BITMAP_CHUNK)
            bits = np.unpackbits(raw[lo // 8 : (hi + 7) // 8], bitorder="little")[: hi - lo]
            state = np.zeros(hi - lo, np.int8)
            for base, count in runs:
                a, b = max(base, lo), min(base + count, hi)
                if a < b:
                    state[a - lo : b - lo] = 2
            state[bits.astype(bool)] = 1
            cuts = np.flatnonzero(np.diff(state)) + 1
            if problem := self._over_limit(len(out) + len(cuts) + 2, "ranges of pages",
                                           RANGE_BYTES):
                raise self._error(problem, self.layout.header_bytes + SUMMARY.size + lo // 8)
            firsts = [0, *cuts.tolist()]
            values = state[firsts].tolist()
            for j, (f, v) in enumerate(zip(firsts, values, strict=True)):
                if j == 0 and v == kind:
                    continue  # the run from the chunk before goes on
                if kind >= 0:
                    out.append((start, lo + f, kind))
                start, kind = lo + f, v
        if kind >= 0:
            out.append((start, nbits, kind))
        return out

    def iter_batches(
        self, batch_pages: int = DEFAULT_BATCH_PAGES, *, shard: int = 0, shards: int = 1
    ) -> Iterator[PageBatch]:
        """The stored pages lie back to back in the file (runs, or the bitmap's pages in
        order), so batches are cut from that one area whatever the ranges: a bitmap dump of
        scattered free pages gives full batches, not one per range. Same pages, order and
        sharding as :meth:`DumpReader.iter_batches`, which serves any other layout and a
        dump inside a compressed wrapper (read forward through its decompressed source)."""
        ps = self.page_size
        stored = sorted(self.data_extents(), key=lambda e: e.file_offset)
        if self.source is not None or any(b.file_offset != a.file_offset + a.npages * ps
               for a, b in itertools.pairwise(stored)):
            yield from super().iter_batches(batch_pages, shard=shard, shards=shards)
            return
        counts = np.array([e.npages for e in stored], np.int64)
        ends = np.cumsum(counts)
        starts = np.array([e.addr for e in stored], np.uint64)
        total = int(ends[-1]) if len(ends) else 0
        for batch, first in enumerate(range(0, total, batch_pages)):
            if batch % shards != shard:
                continue
            n = min(batch_pages, total - first)
            index = np.arange(first, first + n, dtype=np.int64)
            k = np.searchsorted(ends, index, side="right")
            addrs = starts[k] + ((index - (ends[k] - counts[k])) * ps).astype(np.uint64)
            pages = np.frombuffer(self._mm, np.uint8, n * ps,
                                  stored[0].file_offset + first * ps).reshape(n, ps)
            yield PageBatch(addrs, pages)

    def _trim_warning(self) -> None:
        if self._trimmed:
            self.warnings.append(
                f"{self.path}: {size_text(self._trimmed)} of the dump's 4 KiB pages do not "
                f"make whole {self.page_size}-byte pages and are ignored")

    def info(self) -> dict[str, Any]:
        """Dump type, machine, runs and the bugcheck code."""
        out: dict[str, Any] = {
            "dump_type": f"{self.kind} ({self.dump_type})",
            "header": f"{self.layout.bits}-bit",
            "machine": MACHINES.get(self.machine, f"{self.machine:#x}"),
            "processors": self.processors,
            "bugcheck_code": f"{self.bugcheck:#x}",
            "runs": len(self.runs),
            "run_table": [[b * WIN_PAGE, (b + c) * WIN_PAGE] for b, c in self.runs],
        }
        if self.kind == "bitmap":
            out["stored_pages"] = self.stored_pages
        return out
