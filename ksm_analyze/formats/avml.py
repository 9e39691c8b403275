"""AVML compressed images (``avml --compress``): LiME records with Snappy-framed payloads.

Format (microsoft/avml ``src/image.rs``, ``src/io/snappy.rs``): a sequence of records, each
the 32-byte LiME header with magic ``"AVML"`` and version 2, then the range's bytes as one
Snappy *framed* stream (``snap::write::FrameEncoder``: a ``sNaPpY`` stream identifier, then
chunks of at most 64 KiB of memory each), then a u64 LE giving the stream's length in bytes.
The stream's length is only known at its end, so opening walks the chunk headers (4 bytes
each, plus the length preamble of compressed chunks) and keeps them as an index: any page can
then be decoded from the chunks that hold it, and memory stays bounded by a window.

AVML cuts each range into 16 MiB chunks and leaves out the all-zero ones, which become ZERO
extents where they can be placed (:func:`.lime.infer_omitted_zero_chunks`). ``avml`` reads
both record kinds in one file, so uncompressed LiME records are taken here too.
"""

from __future__ import annotations

import bisect
import struct
from array import array
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from ..errors import CorruptPageError, TruncatedDumpError
from ..pages import Extent, PageBatch, PageState
from ..units import size_text
from .base import DEFAULT_BATCH_PAGES, DumpFormat, DumpReader
from .lime import (
    AVML_KINDS,
    AVML_MAGIC,
    LIME_MAGIC,
    LIME_VERSION,
    RECORD_HEADER,
    PartialPages,
    Record,
    check_stored,
    infer_omitted_zero_chunks,
    merged_ranges,
    read_record,
    unknown_gaps_warning,
)

__all__ = ["AvmlReader"]

# Snappy framing format (google/snappy framing_format.txt): u8 chunk type, u24 LE length.
STREAM_IDENTIFIER = b"\xff\x06\x00\x00sNaPpY"
CHUNK_COMPRESSED = 0x00
CHUNK_UNCOMPRESSED = 0x01
CHUNK_STREAM_ID = 0xFF
MAX_CHUNK_DATA = 65536
"""The framing format caps the memory held by one chunk at 64 KiB."""
MAX_EXPANSION = 22
"""Snappy stores at most 64 bytes in a 3-byte copy, so a stream never grows more than 21.4x."""
TRAILER = struct.Struct("<Q")
WINDOW_BYTES = 16 << 20
"""Most memory decoded at once by ``iter_batches``: one AVML chunk."""


class _Rec(NamedTuple):
    """Where a record's memory is: raw at ``data_offset``, or in Snappy chunks."""

    header: Record
    data_offset: int
    lead: int
    """Bytes of memory before the first whole page."""
    npages: int
    first_chunk: int
    nchunks: int
    """0 for a raw (LiME v1) record."""


class AvmlReader(DumpReader):
    """An AVML file: compressed pages, decoded Snappy chunk by chunk."""

    format = DumpFormat.AVML
    unwrapped_only = "it compresses its own pages"

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """AVML magic at offset 0; any version, so that a wrong one gets a precise error."""
        return len(head) >= 4 and struct.unpack_from("<I", head)[0] == AVML_MAGIC

    def _load_extents(self) -> list[Extent]:
        self._recs: list[_Rec] = []
        self._cache: tuple[int, int, np.ndarray] | None = None
        self._by_addr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # Per Snappy data chunk: file offset of its header, its end, and where its memory
        # starts within the record (arrays: 24 bytes a chunk, and a chunk may be 9 bytes).
        chunk_off, chunk_end, chunk_start = array("q"), array("q"), array("q")
        self.stream_bytes = 0
        partial = PartialPages("AVML", self.page_size)
        extents: list[Extent] = []
        offset = 0
        # Each record takes at least 33 bytes, so the loop ends within file_size / 33 rounds.
        while offset < self.file_size:
            rec = read_record(self, offset, len(self._recs), "AVML", AVML_KINDS)
            data = offset + RECORD_HEADER.size
            lead, npages = partial.add(rec)
            if npages >= 1 << 32:
                raise self._error(
                    f"AVML record {rec.number} of {rec.size} bytes is too large", offset
                )
            if (rec.magic, rec.version) == (LIME_MAGIC, LIME_VERSION):
                check_stored(self, rec, "AVML")
                first, n, file_offset = 0, 0, data + lead
                offset = data + rec.size
            else:
                first = len(chunk_off)
                end = self._index_stream(rec, chunk_off, chunk_end, chunk_start)
                n, file_offset = len(chunk_off) - first, -1
                (stored,) = self._unpack(TRAILER, end, f"AVML record {rec.number} size trailer")
                if stored != end - data:
                    raise self._error(
                        f"AVML record {rec.number}: the size trailer says the Snappy stream is "
                        f"{stored} bytes but it is {end - data}",
                        end,
                    )
                self.stream_bytes += end - data
                offset = end + TRAILER.size
            self._recs.append(_Rec(rec, data, lead, npages, first, n))
            extents.append(
                Extent(rec.s_addr + lead, npages, PageState.DATA, file_offset, rec.label("AVML"))
            )
            self._origins[rec.s_addr + lead] = rec.offset
        self._chunk_off = np.frombuffer(chunk_off, np.int64)
        self._chunk_end = np.frombuffer(chunk_end, np.int64)
        self._chunk_start = np.frombuffer(chunk_start, np.int64)
        if warning := partial.warning(self.path):
            self.warnings.append(warning)
        headers = [r.header for r in self._recs]
        zeros, unknown = infer_omitted_zero_chunks(headers, self.page_size, "AVML",
                                                   self._origins)
        if unknown:
            self.warnings.append(unknown_gaps_warning(self.path, unknown))
        self.zero_pages = sum(e.npages for e in zeros)
        return extents + zeros

    def _corrupt(self, rec: Record, detail: str) -> CorruptPageError:
        return CorruptPageError(
            f"AVML record {rec.number}: {detail}", path=self.path, offset=rec.offset
        )

    def _index_stream(
        self, rec: Record, offs: array[int], ends: array[int], starts: array[int]
    ) -> int:
        """Walk the Snappy chunk headers of ``rec`` and return the file offset after them."""
        pos = rec.offset + RECORD_HEADER.size
        remain = self.file_size - pos
        if rec.size > remain * MAX_EXPANSION + MAX_CHUNK_DATA:
            raise self._error(
                f"AVML record {rec.number} claims {rec.size} bytes of memory, more than the "
                f"{remain} bytes left in the file can hold compressed",
                rec.offset,
            )
        mm, size = self._mm, self.file_size
        total = 0
        first = True
        while total < rec.size:
            if pos + 4 > size:
                raise TruncatedDumpError(
                    f"AVML record {rec.number}: the Snappy stream ends with the file after "
                    f"{total} of its {rec.size} bytes",
                    path=self.path,
                    offset=pos,
                )
            (word,) = struct.unpack_from("<I", mm, pos)
            kind, length = word & 0xFF, word >> 8
            body = pos + 4
            if body + length > size:
                raise TruncatedDumpError(
                    f"AVML record {rec.number}: Snappy chunk of {length} bytes at {pos:#x} runs "
                    f"past the end of the file, which holds {size_text(size)}",
                    path=self.path,
                    offset=pos,
                )
            if first and (kind != CHUNK_STREAM_ID or length != len(STREAM_IDENTIFIER) - 4):
                raise self._corrupt(rec, f"no sNaPpY stream identifier at {pos:#x}")
            first = False
            if kind in (CHUNK_COMPRESSED, CHUNK_UNCOMPRESSED):
                if length < 4:
                    raise self._corrupt(rec, f"Snappy chunk at {pos:#x} is only {length} bytes")
                if kind == CHUNK_UNCOMPRESSED:
                    n = length - 4
                else:
                    n = self._preamble(rec, body + 4, body + length)
                if n > MAX_CHUNK_DATA or total + n > rec.size:
                    raise self._corrupt(
                        rec,
                        f"Snappy chunk at {pos:#x} holds {n} bytes, past the {rec.size} bytes "
                        "the header covers or the 64 KiB a chunk may hold",
                    )
                if n:
                    offs.append(pos)
                    ends.append(body + length)
                    starts.append(total)
                    total += n
            elif kind == CHUNK_STREAM_ID:
                if mm[body : body + length] != STREAM_IDENTIFIER[4:]:
                    raise self._corrupt(rec, f"bad Snappy stream identifier at {pos:#x}")
            elif kind < 0x80:
                raise self._corrupt(
                    rec, f"unknown unskippable Snappy chunk type {kind:#x} at {pos:#x}"
                )
            pos = body + length  # 0x80-0xfe: skippable (0xfe is padding)
        return pos

    def _preamble(self, rec: Record, pos: int, end: int) -> int:
        """The varint memory length that starts a compressed Snappy block."""
        value = shift = 0
        while pos < end and shift < 35:
            byte = self._mm[pos]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            pos += 1
            shift += 7
        raise self._corrupt(rec, f"bad Snappy length preamble at {pos:#x}")

    # -- pages ------------------------------------------------------------------------------

    def _decode(self, index: int, start: int, stop: int) -> tuple[int, np.ndarray]:
        """Decode memory bytes ``[start, stop)`` of a record; returns ``(base, buf)`` where
        ``buf`` holds the record's bytes from ``base`` (the start of the first chunk needed)."""
        r = self._recs[index]
        if not r.nchunks:
            return 0, np.frombuffer(self._mm, np.uint8, r.header.size, r.data_offset)
        import cramjam  # loaded on first use: most inputs are not compressed AVML
        lo = r.first_chunk
        hi = lo + r.nchunks
        starts = self._chunk_start
        c0 = bisect.bisect_right(starts, start, lo, hi) - 1
        c1 = bisect.bisect_left(starts, stop, lo, hi)
        base = int(starts[c0])
        limit = int(starts[c1]) if c1 < hi else r.header.size
        buf = bytearray(limit - base)
        first, last = int(self._chunk_off[c0]), int(self._chunk_end[c1 - 1])
        try:
            n = cramjam.snappy.decompress_into(STREAM_IDENTIFIER + self._mm[first:last], buf)
        except cramjam.DecompressionError as e:
            raise self._corrupt(
                r.header, f"cannot decompress the Snappy chunks at {first:#x}-{last:#x}: {e}"
            ) from None
        if n != len(buf):
            raise self._corrupt(
                r.header,
                f"the Snappy chunks at {first:#x}-{last:#x} hold {n} bytes, not {len(buf)}",
            )
        return base, np.frombuffer(buf, np.uint8)

    def iter_batches(
        self, batch_pages: int = DEFAULT_BATCH_PAGES, *, shard: int = 0, shards: int = 1
    ) -> Iterator[PageBatch]:
        """Decode every record in file order, at most ``batch_pages`` (and 16 MiB) at a time.

        With ``shards > 1`` only batches ``shard``, ``shard + shards``, ... are decoded.
        """
        ps = self.page_size
        window = max(1, min(batch_pages, WINDOW_BYTES // ps))
        batch = -1
        for index, r in enumerate(self._recs):
            addr0 = r.header.s_addr + r.lead
            for p0 in range(0, r.npages, window):
                batch += 1
                if batch % shards != shard:
                    continue
                p1 = min(p0 + window, r.npages)
                start = r.lead + p0 * ps
                base, buf = self._decode(index, start, r.lead + p1 * ps)
                pages = buf[start - base : start - base + (p1 - p0) * ps].reshape(-1, ps)
                addrs = np.uint64(addr0 + p0 * ps) + np.arange(p1 - p0, dtype=np.uint64) * (
                    np.uint64(ps))
                yield PageBatch(addrs, pages)
                del base, buf, pages  # one decoded window alive at a time

    def read_pages(self, addrs: np.ndarray) -> np.ndarray:
        """Decode the pages at ``addrs``, reusing the last chunks decoded."""
        ps = self.page_size
        want = np.asarray(addrs, dtype=np.uint64)
        out = np.empty((len(want), ps), np.uint8)
        if not len(want):
            return out
        if self._by_addr is None:
            by_addr = sorted((i for i, r in enumerate(self._recs) if r.npages),
                             key=lambda i: self._recs[i].header.s_addr + self._recs[i].lead)
            lows = [self._recs[i].header.s_addr + self._recs[i].lead for i in by_addr]
            highs = [a + self._recs[i].npages * ps for a, i in zip(lows, by_addr, strict=True)]
            self._by_addr = (np.array(lows, np.uint64), np.array(highs, np.uint64),
                             np.array(by_addr, np.int64))
        starts, ends, recs = self._by_addr
        which, page = self._locate(want, starts, ends)
        for row, (index, p) in enumerate(zip(recs[which].tolist(), page.tolist(), strict=True)):
            start = self._recs[index].lead + p * ps
            cache = self._cache
            if not (
                cache
                and cache[0] == index
                and cache[1] <= start
                and start + ps <= cache[1] + len(cache[2])
            ):
                cache = self._cache = (index, *self._decode(index, start, start + ps))
            out[row] = cache[2][start - cache[1] : start - cache[1] + ps]
        return out

    def info(self) -> dict[str, Any]:
        """Records, address ranges stored, Snappy sizes and zero pages inferred from gaps."""
        return {
            "records": len(self._recs),
            "compressed_records": sum(1 for r in self._recs if r.nchunks),
            "ranges": merged_ranges(self.data_extents(), self.page_size),
            "snappy_chunks": len(self._chunk_off),
            "stream_bytes": self.stream_bytes,
            "omitted_zero_pages": self.zero_pages,
        }

    def close(self) -> None:
        """Drop the decode cache, then release the file."""
        self._cache = None
        super().close()
