"""LiME memory images: a 32-byte header per range of System RAM, then the range's bytes.

Format (504ensicsLabs/LiME ``src/lime.h`` ``lime_mem_range_header``, ``src/main.c``): records
follow each other to the end of the file, one per "System RAM" range of ``/proc/iomem`` in
ascending order; LiME writes zeros for the bytes of a partial page at a range's end.

AVML (microsoft/avml ``src/image.rs``) writes the same records when it does not compress, but
it cuts every range into chunks of 16 MiB and leaves out the chunks that are all zero, so a
gap between records may be zero RAM rather than a hole in the address space. The helpers here
(header parsing, whole pages, inferring omitted chunks) are shared with :mod:`.avml`.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any, NamedTuple

from ..errors import TruncatedDumpError
from ..pages import Extent, PageState
from ..units import size_text
from .base import ADDRESS_LIMIT, DumpFormat, DumpReader

__all__ = ["AVML_CHUNK_BYTES", "LimeReader"]

# lime_mem_range_header, packed little-endian (LiME src/lime.h):
#   u32 magic; u32 version; u64 s_addr; u64 e_addr (inclusive); u8 reserved[8]
RECORD_HEADER = struct.Struct("<IIQQ8s")
LIME_MAGIC = 0x4C694D45  # b"EMiL" on disk
AVML_MAGIC = 0x4C4D5641  # b"AVML" on disk
LIME_VERSION = 1
AVML_VERSION = 2
LIME_KINDS = ((LIME_MAGIC, LIME_VERSION),)
AVML_KINDS = ((AVML_MAGIC, AVML_VERSION), (LIME_MAGIC, LIME_VERSION))

RECORD_BYTES = 4096
"""At most 65,536 records plus one per this many bytes of file: a real record holds a RAM range
or an AVML chunk of one, a page or more (compressed, 16 MiB take at least 780 KB), and each
record costs ~500 bytes of objects here."""

AVML_CHUNK_BYTES = 0x1000 * 0x1000
"""AVML's ``MAX_BLOCK_SIZE`` (16 MiB): ranges are cut into chunks of this size from their
start, and a chunk that is all zero is not written at all (``Image::copy_block``)."""


class Record(NamedTuple):
    """One range header as read from the file."""

    number: int
    """Position in the file, from 0."""
    offset: int
    """File offset of the 32-byte header."""
    magic: int
    version: int
    s_addr: int
    size: int
    """``e_addr - s_addr + 1``: bytes of memory the record covers."""

    def label(self, name: str) -> str:
        """How messages and ``info`` name the record."""
        return f"{name} record {self.number} (header at {self.offset:#x})"


def read_record(
    reader: DumpReader, offset: int, index: int, name: str, kinds: tuple[tuple[int, int], ...]
) -> Record:
    """Decode and check the header at ``offset``; ``kinds`` lists the ``(magic, version)`` taken.

    Raises:
        TruncatedDumpError: fewer than 32 bytes remain.
        DumpFormatError: a magic or version not in ``kinds``, ``e_addr < s_addr``, or more
            records than :data:`RECORD_BYTES` allows.
    """
    if problem := reader._over_limit(index + 1, f"{name} records", RECORD_BYTES):
        raise reader._error(problem, offset)
    magic, version, s_addr, e_addr, _reserved = reader._unpack(
        RECORD_HEADER, offset, f"{name} record {index} header"
    )
    if (magic, version) not in kinds:
        raise reader._error(_bad_kind(magic, version, index, name), offset)
    if e_addr < s_addr:
        raise reader._error(
            f"{name} record {index} ends before it starts: e_addr {e_addr:#x} < s_addr {s_addr:#x}",
            offset,
        )
    if e_addr >= ADDRESS_LIMIT:  # its gaps would count as 2^64 bytes of zero pages
        raise reader._error(
            f"{name} record {index} ends at {e_addr + 1:#x}, above 2^56 (64 PiB): past any "
            "physical address",
            offset,
        )
    return Record(index, offset, magic, version, s_addr, e_addr - s_addr + 1)


def _bad_kind(magic: int, version: int, index: int, name: str) -> str:
    if magic == LIME_MAGIC and version != LIME_VERSION:
        return f"unsupported LiME version {version} in record {index} (expected 1)"
    if magic == AVML_MAGIC and version != AVML_VERSION:
        return f"unsupported AVML version {version} in record {index} (expected 2)"
    if magic == AVML_MAGIC:
        return (
            f"record {index} is an AVML compressed record inside a LiME file; "
            "read the file with --format avml"
        )
    expected = f"{AVML_MAGIC:#010x}" if name == "AVML" else f"{LIME_MAGIC:#010x}"
    return f"bad {name} magic {magic:#010x} in record {index} (expected {expected})"


def check_stored(reader: DumpReader, rec: Record, name: str) -> None:
    """Raise TruncatedDumpError unless the record's raw bytes fit in the file."""
    data = rec.offset + RECORD_HEADER.size
    remain = reader.file_size - data
    if rec.size > remain:
        raise TruncatedDumpError(
            f"{name} record {rec.number} [{rec.s_addr:#x}, {rec.s_addr + rec.size:#x}) claims "
            f"{size_text(rec.size)} but only {size_text(remain)} remain in the file",
            path=reader.path,
            offset=rec.offset,
        )


def whole_pages(addr: int, size: int, page_size: int) -> tuple[int, int]:
    """``(lead, npages)``: skip ``lead`` bytes to the first page boundary, then whole pages."""
    lead = -addr % page_size
    if lead >= size:
        return size, 0
    return lead, (size - lead) // page_size


class PartialPages:
    """Collects the records that are not whole pages, for one warning per file."""

    def __init__(self, name: str, page_size: int) -> None:
        self.name = name
        self.page_size = page_size
        self.count = 0
        self.bytes = 0
        self.first: Record | None = None

    def add(self, rec: Record) -> tuple[int, int]:
        """Whole pages of ``rec`` as :func:`whole_pages`; remembers what is left out."""
        lead, npages = whole_pages(rec.s_addr, rec.size, self.page_size)
        left_out = rec.size - npages * self.page_size
        if left_out:
            self.count += 1
            self.bytes += left_out
            self.first = self.first or rec
        return lead, npages

    def warning(self, path: str) -> str | None:
        """The warning to give, if any record was not whole pages."""
        if not self.first:
            return None
        r = self.first
        return (
            f"{path}: {self.count} {self.name} record(s) do not start and end on "
            f"{self.page_size}-byte page boundaries (the first is record {r.number}, "
            f"[{r.s_addr:#x}, {r.s_addr + r.size:#x})); their partial pages, "
            f"{size_text(self.bytes)}, are ignored"
        )


def infer_omitted_zero_chunks(
    records: list[Record], page_size: int, name: str, origins: dict[int, int]
) -> tuple[list[Extent], int]:
    """ZERO extents for the all-zero chunks AVML left out, and how many gaps stay unknown;
    ``origins`` gets the file offset of the record header after each (for errors).

    AVML cuts a range into 16 MiB chunks from its start, so every chunk but the last of a range
    is exactly 16 MiB, and the chunks of one range start 16 MiB apart. A gap after a full chunk
    that ends where a later chunk of the same grid starts can only be left-out zero chunks.
    Other gaps separate ranges; one after a full chunk may still hide zero chunks at the end
    of a range, which cannot be placed (returned as the count of such gaps).
    """
    zeros: list[Extent] = []
    unknown = 0
    if any(r.size > AVML_CHUNK_BYTES for r in records):
        return zeros, unknown  # whole ranges: the LiME module, or AVML before it cut them
    for prev, cur in itertools.pairwise(records):
        end = prev.s_addr + prev.size
        if prev.size != AVML_CHUNK_BYTES or cur.s_addr <= end:
            continue
        if (cur.s_addr - prev.s_addr) % AVML_CHUNK_BYTES:
            unknown += 1
            continue
        lead, npages = whole_pages(end, cur.s_addr - end, page_size)
        label = f"all-zero chunks left out between {name} records {prev.number} and {cur.number}"
        zeros.append(Extent(end + lead, npages, PageState.ZERO, -1, label))
        origins[end + lead] = cur.offset  # the header of the record after the gap
    return zeros, unknown


def unknown_gaps_warning(path: str, unknown: int) -> str:
    """The warning for gaps that may hide left-out zero chunks."""
    return (
        f"{path}: {unknown} gap(s) between records follow a full 16 MiB chunk but do not "
        "continue its range; AVML may have left out all-zero chunks there, which are not "
        "counted as zero pages"
    )


def merged_ranges(extents: list[Extent], page_size: int) -> list[list[int]]:
    """``[start, end)`` address ranges covered by ``extents``, adjacent ones merged."""
    out: list[list[int]] = []
    for e in sorted(extents, key=lambda e: e.addr):
        if out and out[-1][1] == e.addr:
            out[-1][1] = e.end_addr(page_size)
        else:
            out.append([e.addr, e.end_addr(page_size)])
    return out


class LimeReader(DumpReader):
    """A LiME file (``format=lime``, or AVML without ``--compress``): pages stored raw."""

    format = DumpFormat.LIME
    unwrapped_only = None

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """LiME magic at offset 0; any version, so that a wrong one gets a precise error."""
        return len(head) >= 4 and struct.unpack_from("<I", head)[0] == LIME_MAGIC

    def _load_extents(self) -> list[Extent]:
        # Each record takes at least 33 bytes, so the loop ends within file_size / 33 rounds.
        self.records: list[Record] = []
        partial = PartialPages("LiME", self.page_size)
        extents: list[Extent] = []
        offset = 0
        while offset < self.file_size:
            rec = read_record(self, offset, len(self.records), "LiME", LIME_KINDS)
            check_stored(self, rec, "LiME")
            data = offset + RECORD_HEADER.size
            lead, npages = partial.add(rec)
            extents.append(
                Extent(rec.s_addr + lead, npages, PageState.DATA, data + lead, rec.label("LiME"))
            )
            self.records.append(rec)
            offset = data + rec.size
        if warning := partial.warning(self.path):
            self.warnings.append(warning)
        zeros, unknown = infer_omitted_zero_chunks(self.records, self.page_size, "LiME",
                                                   self._origins)
        if unknown:
            self.warnings.append(unknown_gaps_warning(self.path, unknown))
        self.zero_pages = sum(e.npages for e in zeros)
        return extents + zeros

    def info(self) -> dict[str, Any]:
        """Record count, the address ranges stored, and zero pages inferred from AVML gaps."""
        return {
            "records": len(self.records),
            "ranges": merged_ranges(self.data_extents(), self.page_size),
            "omitted_zero_pages": self.zero_pages,
        }
