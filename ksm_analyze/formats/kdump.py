"""kdump-compressed dumps: makedumpfile ``-c/-l/-p/-z`` and QEMU ``dump-guest-memory -z/-l/-s``.

Both the plain form (``"KDUMP   "`` at offset 0) and the makedumpfile *flattened* form (what
QEMU writes to a pipe or without ``-R``, indexed in place by :mod:`.flattened`) are read, so
no ``makedumpfile -R`` step is needed. Layout, in blocks of ``block_size`` (the guest page size),
from makedumpfile ``IMPLEMENTATION``/``diskdump_mod.h`` and QEMU ``dump/dump.c``::

    block 0              disk_dump_header (32- or 64-bit layout, the dumped machine's byte order)
    block 1..            kdump_sub_header + notes (sub_hdr_size blocks)
    bitmap_blocks        bitmap 1 (PFN is not a hole) | bitmap 2 (PFN is dumpable), LSB first
    page_desc[]          one 24-byte descriptor per set bit of bitmap 2, in PFN order
    page data            the shared zero page first (QEMU; makedumpfile -d 1), then pages

Dumpable PFNs (bitmap 2) are DATA (compressed, so ``file_offset`` is -1); those whose descriptor
is the shared zero descriptor are handed out flagged zero, never read (``PageBatch.zero``), so a
dump whose zero and data pages alternate is one range, not one per page. PFNs in bitmap 1 only
were excluded by the dump level (EXCLUDED); PFNs in neither are holes and not reported.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from ..errors import CorruptPageError, DumpFormatError, TruncatedDumpError, UnsupportedDumpError
from ..pages import Extent, PageBatch, PageState
from .base import DEFAULT_BATCH_PAGES, RANGE_BYTES, DumpFormat, DumpReader
from .flattened import MDF_SIGNATURE, FlattenedFile, probe_flattened

SIGNATURES = (b"KDUMP   ", b"DISKDUMP")

# disk_dump_header_64 / disk_dump_header_32 (libkdumpfile src/kdumpfile/diskdump.c): signature,
# header_version, utsname (6 x 65 chars), pad, timestamp {tv_sec, tv_usec}, status, block_size,
# sub_hdr_size, bitmap_blocks, max_mapnr (32-bit, obsolete), total_ram_blocks, device_blocks,
# written_blocks, current_cpu, nr_cpus. The 32-bit layout has 2 pad bytes and a 32-bit timeval.
_HEADER_FMT = {64: "8si390s6xqqIiiIIIIIIi", 32: "8si390s2xiiIiiIIIIIIi"}
_FIELD_AT = {
    64: {"header_version": 8, "block_size": 428, "sub_hdr_size": 432, "bitmap_blocks": 436},
    32: {"header_version": 8, "block_size": 416, "sub_hdr_size": 420, "bitmap_blocks": 424},
}
_UTS_FIELDS = ("sysname", "nodename", "release", "version", "machine", "domainname")

# kdump_sub_header, three packings (libkdumpfile): 64-bit, 32-bit with 64-bit fields aligned to
# 4 (IA-32) and to 8 (AArch32). Fields: phys_base, dump_level, split, start_pfn, end_pfn,
# offset_vmcoreinfo, size_vmcoreinfo, offset_note, size_note, offset_eraseinfo, size_eraseinfo,
# start_pfn_64, end_pfn_64, max_mapnr_64 (the last three from header_version 6).
_SUB_FMT = {"64": "QiiQQQQQQQQQQQ", "32pack": "IiiIIQIQIQIQQQ", "32pad": "IiiII4xQI4xQI4xQI4xQQQ"}

# Page descriptor flags and header status bits.
_ZLIB, _LZO, _SNAPPY, _ZSTD = 0x1, 0x2, 0x4, 0x20
_CODEC_NAMES = {_ZLIB: "zlib", _LZO: "lzo", _SNAPPY: "snappy", _ZSTD: "zstd"}
_DESC_SPAN = 1 << 15  # descriptors read at once by read_pages of a flattened dump: 768 KiB
_STATUS_INCOMPLETE = 0x8
# dump_level bits (makedumpfile.8): 1 zero, 2 non-private cache, 4 private cache, 8 user, 16 free.
_DL_USER, _DL_FREE = 8, 16

DESC_SIZE = 24
MAX_MAPNR = 1 << 40
"""More page frames than this (4 PiB of 4 KiB pages) is a corrupt header, not a machine."""
_CHUNK_PFNS = 1 << 20
"""PFNs classified at a time: bounds the bits and descriptors held in memory (about 30 MiB)."""
_NOT_REPORTED = -1


class _Chunk(NamedTuple):
    first_pfn: int
    npfns: int
    first_desc: int
    """Index of the descriptor of the chunk's first dumpable PFN."""


class _DecodeError(Exception):
    """A page failed to decode; the caller adds the PFN and the offset."""


class KdumpReader(DumpReader):
    """A kdump-compressed dump, plain or flattened.

    Guest pages of ``block_size`` bytes larger than the analysis page are split into
    ``block_size // page_size`` analysis pages.
    """

    format = DumpFormat.KDUMP
    unwrapped_only = "it compresses its own pages"

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """``KDUMP   ``/``DISKDUMP`` at 0, or the makedumpfile flattened signature."""
        return head[:8] in SIGNATURES or probe_flattened(head)

    # -- the logical file ------------------------------------------------------------------

    def _lread(self, offset: int, size: int, what: str) -> bytes:
        """Read ``size`` bytes at ``offset`` of the logical (reassembled) file."""
        if self._flat is None:
            return self._read(offset, size, what)
        return self._flat.read(offset, size, what)

    def _fail(
        self, detail: str, offset: int, cls: type[DumpFormatError] = DumpFormatError
    ) -> DumpFormatError:
        """An error about logical ``offset``, placed at its file offset."""
        where, logical = (offset, "") if self._flat is None else self._flat.where(offset)
        return cls(detail + logical, path=self.path, offset=where)

    # -- headers ---------------------------------------------------------------------------

    def _load_extents(self) -> list[Extent]:
        self._flat: FlattenedFile | None = None  # None: the plain form
        self._zstd: Any = None  # a zstandard.ZstdDecompressor, made on first use
        self._rank: tuple[np.ndarray, np.ndarray] | None = None  # see _desc_index
        if self._mm[:16] == MDF_SIGNATURE:
            self._flat = FlattenedFile(self._mm, self.path)
            self.warnings += self._flat.warnings
        self._logical_size = self.file_size if self._flat is None else self._flat.size
        self._parse_header()
        self._parse_sub_header()
        self._locate_bitmaps()
        self._plan_chunks()
        return self._classify()

    def _parse_header(self) -> None:
        head = self._lread(0, struct.calcsize("<" + _HEADER_FMT[64]), "kdump header")
        if head[:8] not in SIGNATURES:
            if head[:4] == b"\x7fELF":
                raise UnsupportedDumpError(
                    "this flattened dump holds an ELF core (makedumpfile -E -F); reassemble it "
                    "with makedumpfile -R and read the ELF file",
                    path=self.path,
                    offset=0,
                )
            raise self._error(
                f"bad kdump signature {head[:8]!r}: expected b'KDUMP   ' or b'DISKDUMP'", 0
            )
        machine = head[12 + 4 * 65 : 12 + 5 * 65].split(b"\0", 1)[0]
        order = (32, 64) if machine in (b"i386", b"i486", b"i586", b"i686", b"arm") else (64, 32)
        candidates = [(bits, e) for bits in order for e in "<>"]
        for bits, e in candidates:
            fields = struct.unpack_from(e + _HEADER_FMT[bits], head)
            if _header_problem(fields, bits) is None:
                break
        else:
            # Explain with the likeliest reading: the byte order that makes header_version small.
            e = "<" if 0 <= int.from_bytes(head[8:12], "little", signed=True) < 1 << 16 else ">"
            fields = struct.unpack_from(e + _HEADER_FMT[order[0]], head)
            problem, at = _header_problem(fields, order[0]) or ("unreadable", 0)
            raise self._fail(f"{problem} in the kdump header", at)
        (
            self.signature,
            self.header_version,
            uts,
            self.timestamp,
            _usec,
            self.status,
            bs,
            self.sub_hdr_size,
            self.bitmap_blocks,
            self.max_mapnr,
            *_rest,
        ) = fields
        self.endian, self.bits, self.block_size = e, bits, bs
        self.utsname = {
            name: uts[65 * k : 65 * (k + 1)].split(b"\0", 1)[0].decode("ascii", "replace")
            for k, name in enumerate(_UTS_FIELDS)
        }
        if bs < self.page_size:
            raise self._fail(
                f"block_size {bs} (the guest page size) is smaller than the analysis page size "
                f"{self.page_size}: a guest page cannot be split into analysis pages; analyse "
                f"with a page size of {bs} or less",
                _FIELD_AT[bits]["block_size"],
            )
        self._sub = bs // self.page_size
        if self.status & _STATUS_INCOMPLETE:
            self.warnings.append(
                f"{self.path}: the dump header says the dump is incomplete (status "
                f"{self.status:#x}): the writer ran out of space or was interrupted"
            )

    def _parse_sub_header(self) -> None:
        bs, hv = self.block_size, self.header_version
        self.phys_base = self.dump_level = 0
        self.split = False
        self.start_pfn, self.end_pfn = 0, None
        if hv < 1:
            return  # diskdump: no sub header
        if self.bits == 64:
            packing = "64"
        else:
            # libkdumpfile read_sub_hdr_32: IA-32 packs the 64-bit fields, AArch32 aligns them;
            # pick the packing whose offset_vmcoreinfo lands inside the sub header blocks.
            st = struct.Struct(self.endian + _SUB_FMT["32pack"])
            off_vmci, size_vmci = st.unpack(self._lread(bs, st.size, "kdump sub header"))[5:7]
            payload = bs * (1 + self.sub_hdr_size)
            packed = (off_vmci == 0 and size_vmci == 0) or bs < off_vmci <= payload - size_vmci
            packing = "32pack" if hv < 3 or packed else "32pad"
        st = struct.Struct(self.endian + _SUB_FMT[packing])
        sub = self._lread(bs, st.size, "kdump sub header")
        (phys_base, dump_level, split, start, end, *_notes, start64, end64, mapnr64) = st.unpack(
            sub
        )
        self.phys_base, self.dump_level, self.split = phys_base, dump_level, hv >= 2 and split != 0
        if self.split:
            self.start_pfn, self.end_pfn = (start64, end64) if hv >= 6 else (start, end)
        if hv >= 6 and mapnr64:
            if mapnr64 > MAX_MAPNR:
                raise self._fail(
                    f"max_mapnr_64 {mapnr64:#x} is implausible (more than 2^40 page frames)",
                    bs + st.size - 8,
                )
            self.max_mapnr = mapnr64
        if dump_level & (_DL_USER | _DL_FREE):
            self.warnings.append(
                f"{self.path}: dump level {dump_level} excludes user/free pages: KSM savings "
                "cannot be estimated from this dump (take it with makedumpfile -d 0 or -d 1)"
            )

    def _locate_bitmaps(self) -> None:
        bs = self.block_size
        self._bitmap1 = bs * (1 + self.sub_hdr_size)
        half = self.bitmap_blocks // 2
        if self.bitmap_blocks % 2 == 0 and half * bs * 8 >= self.max_mapnr:
            self._bitmap2 = self._bitmap1 + half * bs
        else:
            # Old diskdump files have one bitmap (crash diskdump.c): it is both bitmaps.
            self._bitmap2 = self._bitmap1
        if self.bitmap_blocks * bs * 8 < self.max_mapnr:  # max_mapnr_64 beyond the 32-bit one
            raise self._fail(
                f"bitmap_blocks {self.bitmap_blocks} cover {self.bitmap_blocks * bs * 8:#x} PFNs, "
                f"fewer than max_mapnr {self.max_mapnr:#x}",
                _FIELD_AT[self.bits]["bitmap_blocks"],
            )
        self._desc_start = bs * (1 + self.sub_hdr_size + self.bitmap_blocks)
        need = -(-self.max_mapnr // 8)
        length = (self._bitmap2 - self._bitmap1) or self.bitmap_blocks * bs
        for name, at in (("bitmap 1", self._bitmap1), ("bitmap 2", self._bitmap2)):
            # First the bits max_mapnr needs, then the whole bitmap: a bitmap larger than the
            # file is refused before anything reads it.
            for size, what in ((need, f"{name} of {self.max_mapnr:#x} PFNs"),
                               (length, f"{name} of {length // bs} blocks")):
                if at + size > self._logical_size:
                    self._lread(at, size, what)  # raises
            if self._flat:  # so the bitmap, like a plain file's, is bytes the file holds
                self._flat.check_written(at, at + length, name)
            self._check_clear_past_max_mapnr(name, at, length)
        hi = self.max_mapnr if self.end_pfn is None else min(self.end_pfn, self.max_mapnr)
        if not 0 <= self.start_pfn <= hi:
            raise self._fail(
                f"split dump PFN range {self.start_pfn:#x}-{self.end_pfn:#x} lies outside "
                f"max_mapnr {self.max_mapnr:#x}",
                bs,
            )
        self._pfn_lo, self._pfn_hi = self.start_pfn, hi
        if self.split:
            self.warnings.append(
                f"{self.path}: this file is one part of a split dump (makedumpfile --split) "
                f"and holds PFNs {self.start_pfn:#x}-{hi:#x} only"
            )

    def _check_clear_past_max_mapnr(self, name: str, at: int, length: int) -> None:
        """Refuse a bit set past max_mapnr: a page that a damaged (shrunk) max_mapnr would hide.

        Producers size the bitmaps from max_mapnr and set no bit past it (makedumpfile
        ``create_1st_bitmap``, QEMU ``write_dump_bitmap``); the tail is read 16 MiB at a time.
        """
        first, bit = divmod(self.max_mapnr, 8)
        for lo in range(first, length, 1 << 24):
            raw = bytearray(self._lread(at + lo, min(1 << 24, length - lo), name))
            if lo == first:
                raw[0] &= 0xFF << bit & 0xFF  # not the bits of PFNs below max_mapnr
            hit = np.flatnonzero(np.frombuffer(raw, np.uint8))
            if len(hit):
                k = int(hit[0])
                pfn = (lo + k) * 8 + (raw[k] & -raw[k]).bit_length() - 1
                raise self._fail(
                    f"{name} marks PFN {pfn:#x}, past max_mapnr {self.max_mapnr:#x}: the "
                    "header's max_mapnr is damaged and would hide pages",
                    at + lo + k,
                )

    def _bits(self, bitmap: int, first_pfn: int, npfns: int, what: str) -> np.ndarray:
        """Bits ``first_pfn`` to ``first_pfn + npfns`` of a bitmap, as bools."""
        lo, hi = first_pfn // 8, -(-(first_pfn + npfns) // 8)
        raw = np.frombuffer(self._lread(bitmap + lo, hi - lo, what), np.uint8)
        skip = first_pfn - 8 * lo
        return np.unpackbits(raw, bitorder="little")[skip : skip + npfns].view(bool)

    def _plan_chunks(self) -> None:
        """Count the dumpable PFNs, chunk by chunk, and check the descriptor table fits."""
        self._chunks: list[_Chunk] = []
        ndesc = 0
        for first in range(self._pfn_lo, self._pfn_hi, _CHUNK_PFNS):
            n = min(_CHUNK_PFNS, self._pfn_hi - first)
            self._chunks.append(_Chunk(first, n, ndesc))
            ndesc += int(np.count_nonzero(self._bits(self._bitmap2, first, n, "bitmap 2")))
        self.num_dumpable = ndesc
        self._data_start = self._desc_start + DESC_SIZE * ndesc
        if self._data_start > self._logical_size:
            raise self._fail(
                f"page descriptor table ({ndesc} descriptors, {DESC_SIZE * ndesc} bytes) runs "
                f"past the end of the file ({self._logical_size:#x})",
                self._desc_start,
                TruncatedDumpError,
            )
        if self._flat:
            self._flat.check_written(self._desc_start, self._data_start, "page descriptor table")
        # The shared zero page is the first block of the data area; check it is one.
        self._zero_desc = False
        if ndesc and self._data_start + self.block_size <= self._logical_size:
            block = self._lread(self._data_start, self.block_size, "zero page")
            self._zero_desc = block == bytes(self.block_size)
        self._desc_dtype = np.dtype(
            [(k, self.endian + t) for k, t in (("offset", "i8"), ("size", "u4"), ("flags", "u4"))]
            + [("page_flags", self.endian + "u8")]
        )

    # -- pages -----------------------------------------------------------------------------

    def _descriptors(self, first: int, n: int) -> np.ndarray:
        raw = self._lread(self._desc_start + DESC_SIZE * first, DESC_SIZE * n, "page descriptors")
        return np.frombuffer(raw, self._desc_dtype)

    def _descriptors_at(self, wanted: np.ndarray) -> np.ndarray:
        """The descriptors numbered ``wanted`` (sorted, distinct): each read of the file covers
        the wanted ones within a span of at most _DESC_SPAN descriptors."""
        parts = [np.empty(0, self._desc_dtype)]
        start = 0
        while start < len(wanted):
            lo = int(wanted[start])
            stop = int(np.searchsorted(wanted, lo + _DESC_SPAN))
            span = self._descriptors(lo, int(wanted[stop - 1]) - lo + 1)
            parts.append(span[wanted[start:stop] - lo])
            start = stop
        return np.concatenate(parts)

    def _is_zero(self, desc: np.ndarray) -> np.ndarray:
        """Which descriptors are the shared zero descriptor."""
        zero: np.ndarray = np.zeros(len(desc), bool)
        if self._zero_desc:
            zero = desc["offset"] == self._data_start
            zero &= (desc["size"] == self.block_size) & (desc["flags"] == 0)
        return zero

    def _chunk_pages(self, chunk: _Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bitmap-2 bits, descriptors of the chunk's dumpable PFNs, which are zero)."""
        b2 = self._bits(self._bitmap2, chunk.first_pfn, chunk.npfns, "bitmap 2")
        desc = self._descriptors(chunk.first_desc, int(np.count_nonzero(b2)))
        return b2, desc, self._is_zero(desc)

    def _classify(self) -> list[Extent]:
        bs, sub, ps = self.block_size, self._sub, self.page_size
        states = (PageState.DATA, PageState.ZERO, PageState.HOLE, PageState.EXCLUDED)
        # The zero descriptors stay DATA: fingerprinting gets them flagged (iter_batches).
        extents: list[Extent] = []
        self.zero_pages = self.excluded_pages = 0
        for chunk in self._chunks:
            b2, desc, zero = self._chunk_pages(chunk)
            b1 = self._bits(self._bitmap1, chunk.first_pfn, chunk.npfns, "bitmap 1")
            dumpable = np.flatnonzero(b2)
            self._check_descriptors(chunk, dumpable, desc, zero)
            state = np.full(chunk.npfns, _NOT_REPORTED, np.int8)
            state[b1] = PageState.EXCLUDED
            state[dumpable] = PageState.DATA
            self.zero_pages += int(np.count_nonzero(zero))
            self.excluded_pages += int(np.count_nonzero(b1 & ~b2))
            edges = np.flatnonzero(np.diff(state)) + 1
            starts = np.concatenate(([0], edges))
            stops = np.concatenate((edges, [chunk.npfns]))
            values = state[starts]
            keep = values != _NOT_REPORTED
            # Two bits of bitmap can make a range: count them before making objects of them.
            nruns = len(extents) + int(np.count_nonzero(keep))
            if problem := self._over_limit(nruns, "ranges of pages in the bitmaps", RANGE_BYTES):
                raise self._fail(problem, self._bitmap1 + chunk.first_pfn // 8)
            addrs = ((chunk.first_pfn + starts[keep]) * bs).tolist()
            counts = ((stops[keep] - starts[keep]) * sub).tolist()
            kinds = [states[v] for v in values[keep].tolist()]
            runs = list(map(Extent, addrs, counts, kinds))
            prev = extents[-1] if extents else None
            first = runs[0] if runs else None
            if prev and first and prev.state == first.state and prev.end_addr(ps) == first.addr:
                extents.pop()  # a run that continues across chunks
                runs[0] = prev._replace(npages=prev.npages + first.npages)
            extents += runs
        return extents

    def _check_descriptors(
        self, chunk: _Chunk, dumpable: np.ndarray, desc: np.ndarray, zero: np.ndarray
    ) -> None:
        """Refuse descriptors no page can be read from: unknown codec, bad size, past EOF."""
        bs = self.block_size
        flags, size, offset = desc["flags"], desc["size"].astype(np.int64), desc["offset"]
        bad_flags = ~np.isin(flags, [0, *_CODEC_NAMES])
        bad_size = np.where(flags == 0, size != bs, (size == 0) | (size > bs))
        past_end = (offset < 0) | (offset + size > self._logical_size)
        # Page data follows the descriptor table (makedumpfile IMPLEMENTATION): an offset
        # before it points into the headers, bitmaps or descriptors, which are not pages.
        too_low = offset < self._data_start
        bad = np.flatnonzero((bad_flags | bad_size | past_end | too_low) & ~zero)
        if not len(bad):
            return
        k = int(bad[0])
        pfn = chunk.first_pfn + int(dumpable[k])
        f, n, off = int(flags[k]), int(size[k]), int(offset[k])
        if past_end[k] and not bad_flags[k]:
            raise self._fail(
                f"data of the page at PFN {pfn:#x} ({n} bytes at offset {off:#x}) runs past the "
                f"end of the file ({self._logical_size:#x})",
                max(off, 0),
                TruncatedDumpError,
            )
        if bad_flags[k]:
            detail = f"page descriptor of PFN {pfn:#x} has unknown compression flags {f:#x}"
        elif too_low[k] and not bad_size[k]:
            detail = (
                f"page descriptor of PFN {pfn:#x} points at offset {off:#x}, before the page "
                f"data (from {self._data_start:#x}): into the headers, not at a page"
            )
        else:
            kind = _CODEC_NAMES.get(f, "raw")
            detail = f"page descriptor of PFN {pfn:#x} gives a {kind} page of {n} bytes"
            detail += f"; block_size is {bs}"
        desc_at = self._desc_start + DESC_SIZE * (chunk.first_desc + k)
        raise self._fail(detail, desc_at, CorruptPageError)

    def iter_batches(
        self, batch_pages: int = DEFAULT_BATCH_PAGES, *, shard: int = 0, shards: int = 1
    ) -> Iterator[PageBatch]:
        """Yield the DATA pages in PFN order, decompressed, ``batch_pages`` at a time.

        Pages of the shared zero descriptor are flagged in ``PageBatch.zero`` and not decoded.
        With ``shards > 1`` only batches ``shard``, ``shard + shards``, ... are decoded.
        """
        bs, ps, sub = self.block_size, self.page_size, self._sub
        per = max(1, batch_pages // sub)
        first = np.arange(sub, dtype=np.uint64)
        batch = -1
        for chunk in self._chunks:
            b2, desc, zero = self._chunk_pages(chunk)
            pfns = chunk.first_pfn + np.flatnonzero(b2)
            for i in range(0, len(pfns), per):
                batch += 1
                if batch % shards != shard:
                    continue
                p, z = pfns[i : i + per].astype(np.uint64), zero[i : i + per]
                blocks = np.empty((len(p), bs), np.uint8)
                self._decode(desc[i : i + per], p, blocks, skip=z)
                addrs = (p[:, None] * np.uint64(bs) + first * np.uint64(ps)).ravel()
                yield PageBatch(addrs, blocks.reshape(-1, ps), np.repeat(z, sub))
                del blocks  # one batch alive at a time: the next is 32 MiB

    def read_pages(self, addrs: np.ndarray) -> np.ndarray:
        """The analysis pages at ``addrs`` (dumpable pages), decoded again."""
        bs, ps = self.block_size, self.page_size
        want = np.asarray(addrs, dtype=np.uint64)
        if not len(want):
            return np.empty((0, ps), np.uint8)
        pfns, part = np.divmod(want, np.uint64(bs))
        index = self._desc_index(pfns)
        bad = (index < 0) | (part % np.uint64(ps) != 0)
        if bad.any():
            addr = int(want[np.flatnonzero(bad)[0]])
            raise ValueError(f"address {addr:#x} is not a stored page of {self.path}")
        wanted, inverse = np.unique(index, return_inverse=True)
        if self._flat is None:
            table = np.frombuffer(self._mm, self._desc_dtype, self.num_dumpable, self._desc_start)
            desc = table[wanted]
            del table  # let the map close
        else:  # read through the records: a span of descriptors at a time, not one each
            desc = self._descriptors_at(wanted)
        _, first = np.unique(inverse.ravel(), return_index=True)
        blocks = np.empty((len(desc), bs), np.uint8)
        self._decode(desc, pfns[first], blocks)
        sub = (part // np.uint64(ps)).astype(np.int64)
        out = blocks.reshape(len(wanted), self._sub, ps)[inverse.ravel(), sub]
        return np.ascontiguousarray(out)

    def _desc_index(self, pfns: np.ndarray) -> np.ndarray:
        """The descriptor number of each PFN (its rank among the dumpable PFNs), -1 where the
        PFN is not dumpable. A popcount per 64 PFNs of bitmap 2, built once, makes it O(1)."""
        if self._rank is None:
            nbytes = -(-self._pfn_hi // 8)
            raw = np.zeros(-(-nbytes // 8) * 8 + 8, np.uint8)
            raw[:nbytes] = np.frombuffer(self._lread(self._bitmap2, nbytes, "bitmap 2"), np.uint8)
            words = raw.view("<u8")
            ranks = np.concatenate(([0], np.cumsum(np.bitwise_count(words), dtype=np.int64)))
            self._rank = (words, ranks)
        words, ranks = self._rank
        p = pfns.astype(np.int64)
        ok = (p >= self._pfn_lo) & (p < self._pfn_hi)
        p = np.where(ok, p, self._pfn_lo)
        w, bit = p // 64, (p % 64).astype(np.uint64)
        below = words[w] & ((np.uint64(1) << bit) - np.uint64(1))
        index = ranks[w] + np.bitwise_count(below).astype(np.int64) - self._rank_of_lo()
        ok &= ((words[w] >> bit) & np.uint64(1)).astype(bool)
        return np.where(ok, index, -1)

    def _rank_of_lo(self) -> int:
        """Dumpable PFNs below the first PFN this dump covers (a split dump's start_pfn)."""
        words, ranks = self._rank  # type: ignore[misc]
        w, bit = divmod(self._pfn_lo, 64)
        return int(ranks[w]) + int(words[w] & np.uint64((1 << bit) - 1)).bit_count()

    def _decode(self, desc: np.ndarray, pfns: np.ndarray, blocks: np.ndarray,
                skip: np.ndarray | None = None) -> None:
        """Decode the pages ``desc`` describes into the rows of ``blocks`` (``block_size``
        bytes each), leaving the rows ``skip`` marks alone; ``pfns`` name pages in errors."""
        bs = self.block_size
        todo = np.arange(len(desc)) if skip is None else np.flatnonzero(~skip)
        desc, pfns = desc[todo], pfns[todo]
        offsets = desc["offset"].astype(np.int64)
        sizes = desc["size"].astype(np.int64)
        at = offsets if self._flat is None else self._flat.file_offsets(offsets, sizes)
        mm, end = self._mm, self.file_size
        rows = zip(todo.tolist(), at.tolist(), sizes.tolist(), desc["flags"].tolist(), strict=True)
        for k, (row, fo, size, flags) in enumerate(rows):
            if fo >= 0 and fo + size <= end:
                data = mm[fo : fo + size]
            else:  # spread over flattened records (or past the end: _lread says so)
                data = self._lread(int(offsets[k]), size, "page data")
            try:
                if flags == 0:
                    if size != bs:
                        raise _DecodeError(f"raw page of {size} bytes; block_size is {bs}")
                    blocks[row] = np.frombuffer(data, np.uint8)
                else:
                    self._decompress(flags, data, blocks[row])
            except _DecodeError as e:
                pfn = int(pfns[k])
                raise self._fail(
                    f"page at PFN {pfn:#x} fails to decompress ({e})",
                    int(offsets[k]),
                    CorruptPageError,
                ) from None

    def _decompress(self, flags: int, data: bytes, out: np.ndarray) -> None:
        """Decompress one page into ``out`` (block_size bytes) or raise _DecodeError."""
        bs = len(out)
        res: bytes | None
        if flags == _ZLIB:  # QEMU's codec: the hot path, with no other library to load
            d = zlib.decompressobj()
            try:
                res = d.decompress(data, bs)  # at most bs bytes, whatever the stream claims
            except zlib.error as e:
                raise _DecodeError(f"zlib: {e}") from None
            if len(res) == bs and not d.eof:
                raise _DecodeError(f"zlib: more than {bs} bytes or a truncated stream")
        else:
            res = self._decompress_other(flags, data, out)
            if res is None:
                return
        if len(res) != bs:
            raise _DecodeError(f"{_CODEC_NAMES[flags]}: {len(res)} bytes, not {bs}")
        out.data[:] = res  # a copy into the row, without making an array of res

    def _decompress_other(self, flags: int, data: bytes, out: np.ndarray) -> bytes | None:
        """LZO, Snappy (written into ``out``: None) or zstd."""
        # The codec libraries load on first use: most dumps need one or none of them.
        import cramjam
        import lzallright
        import zstandard

        bs = len(out)
        name = _CODEC_NAMES.get(flags, f"flags {flags:#x}")
        codec_errors = (lzallright.LZOError, cramjam.DecompressionError, zstandard.ZstdError)
        try:
            if flags == _LZO:
                res: bytes = lzallright.LZOCompressor.decompress(data, output_size_hint=bs)
            elif flags == _SNAPPY:
                n = cramjam.snappy.decompress_raw_into(data, out.data)
                if n != bs:
                    raise _DecodeError(f"snappy: {n} bytes, not {bs}")
                return None
            elif flags == _ZSTD:
                # Bound the output before zstd allocates what the frame header claims.
                size = zstandard.frame_content_size(data)
                if size not in (bs, -1):
                    raise _DecodeError(f"zstd: the frame holds {size} bytes, not {bs}")
                if self._zstd is None:
                    self._zstd = zstandard.ZstdDecompressor()
                res = self._zstd.decompress(data, max_output_size=bs)
            else:
                raise _DecodeError(f"unknown compression flags {flags:#x}")
        except codec_errors as e:
            raise _DecodeError(f"{name}: {e}") from None
        return res

    # -- facts -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Header facts; page counts are in guest pages of ``block_size`` bytes."""
        return {
            "flattened": self._flat is not None,
            "flattened_records": 0 if self._flat is None else self._flat.nrecords,
            "signature": self.signature.decode("ascii", "replace"),
            "header_version": self.header_version,
            "layout": f"{self.bits}-bit",
            "byte_order": "little" if self.endian == "<" else "big",
            "block_size": self.block_size,
            "status": self.status,
            "compression": [name for bit, name in _CODEC_NAMES.items() if self.status & bit],
            "dump_level": self.dump_level,
            "max_mapnr": self.max_mapnr,
            "phys_base": self.phys_base,
            "split": [self.start_pfn, self._pfn_hi] if self.split else None,
            "dumpable_pages": self.num_dumpable,
            "zero_pages": self.zero_pages,
            "excluded_pages": self.excluded_pages,
            "timestamp": self.timestamp,
            "utsname": dict(self.utsname),
        }


def _header_problem(fields: tuple[Any, ...], bits: int) -> tuple[str, int] | None:
    """Why a header reading is implausible (libkdumpfile ``try_header``) and where, or None."""
    version, bs, sub_hdr_size, bitmap_blocks, max_mapnr = fields[1], *fields[6:10]
    at = _FIELD_AT[bits]
    if not 0 <= version < 1 << 16:
        return f"header_version {version:#x} is out of range", at["header_version"]
    if bs < 512 or bs > 1 << 20 or bs & (bs - 1):
        return (
            f"block_size {bs} ({bs & 0xFFFFFFFF:#x}) is not a power of two from 512 to 1 MiB",
            at["block_size"],
        )
    if sub_hdr_size < 0:
        return f"sub_hdr_size {sub_hdr_size} is negative", at["sub_hdr_size"]
    if 8 * bitmap_blocks * bs < max(max_mapnr, 1):
        return (
            f"bitmap_blocks {bitmap_blocks} cover {8 * bitmap_blocks * bs:#x} PFNs, fewer than "
            + f"max_mapnr {max_mapnr:#x}",
            at["bitmap_blocks"],
        )
    return None
