"""Hyper-V saved states and checkpoints (``.vmrs``, Windows Server 2016 and later).

Microsoft does not publish the layout; it is taken from volatility3's Hyper-V layer
(pull request #1969, ``volatility3/framework/layers/vmrs.py``, reverse-engineered from
``vmsavedstatedumpprovider.dll`` and checked by its author against real files from a
Windows 10 and an Ubuntu 24.04 host). Facts used (little-endian throughout):

* Two storage headers, at 0 and 0x1000: ``u32 signature 0x01282014, u32 checksum, u16
  sequence, u32 version, 8 bytes, u32 block_size (0x1000..0x10000), ...``; the valid one with
  the higher sequence is current.
* Object tables, the first at 0x2000: ``u32 signature 0x01110001, u32 count``, then ``count``
  18-byte entries ``u8 type, u32 checksum, u64 file_offset, u32 size, u8 flags``. Type 1 is
  the next object table, type 2 a key table, type 3 a data object.
* Key table: ``u16 signature 2, u16 table_index, u16, u32 checksum``, then entries of
  ``u8 type, u8 flags, u32 size, u32 parent_id, 6 bytes, u32 order, u8 name_length, name,
  payload``; an entry's id is ``(its offset in the table << 16) | table_index`` and children
  name their parent's id. Guest RAM is in the entries ``RamBlock<N>`` under the root
  ``savedstate``: 1 MiB of memory at ``N << 20``. Their payload is ``u32 stored_length``, then
  (flags bit 0) ``u64 file_offset`` of a data object, or the stored bytes inline.
* A block of exactly 1 MiB is stored raw. Otherwise it is a stream of u32 tokens:
  ``0xFFFFFFFF`` end; ``0xFFFFFFFE`` fill one 4 KiB page with the next 8 bytes; ``0xFFFFFFFD``
  fill ``u32 count`` pages with the 8 bytes before the count; ``0xFFFFFFFC u32 out_len,
  u32 len`` then ``len`` bytes giving ``out_len`` bytes of memory (raw if the lengths are
  equal, else compressed); any other value is the length of one page's bytes (raw if 4096,
  else compressed). Compressed means Windows compression format 3, plain LZ77 ([MS-XCA] 2.4):
  decoded in C, a block's pages in one call (``lz77_pages``, hashing/_compiled.c), or by
  :mod:`.lz77` where the kernels are not built; both give the same bytes and errors.

Fill pages are known without decompressing: a zero fill is handed out flagged zero
(``PageBatch.zero``, counted as kdump's zero pages are); a fill of another value is data whose
bytes are synthesised (the 8 bytes repeated). Opening reads the headers and tables only; each
block's tokens are walked when it is decoded (a damaged one is a CorruptPageError naming it).

Addresses are the block number times 1 MiB, as volatility3 maps them; how Hyper-V's
``RamMemoryBlock``/``StartPageIndex`` entries place blocks in guest-physical memory is not
applied. Page contents, hence the prediction, do not depend on it.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from ..errors import CorruptPageError
from ..hashing import compiled
from ..pages import Extent, PageBatch, PageState
from .base import DEFAULT_BATCH_PAGES, DumpFormat, DumpReader
from .lz77 import decompress

__all__ = ["SIGNATURE", "VmrsReader"]

SIGNATURE = 0x01282014
HEADER = struct.Struct("<IIHI8sI8sQI")
HEADER_OFFSETS = (0, 0x1000)
OBJECT_TABLE_AT = 0x2000
OBJECT_TABLE_SIGNATURE = 0x01110001
OBJECT_TABLE = struct.Struct("<II")
OBJECT_ENTRY = struct.Struct("<BIQIB")
KEY_TABLE = struct.Struct("<HHHI")
KEY_PREFIX = 0x15
OBJ_TABLE, OBJ_KEYS, OBJ_DATA = 1, 2, 3
BLOCK = 1 << 20
HV_PAGE = 4096
PAGES_PER_BLOCK = BLOCK // HV_PAGE
TOKEN_END, TOKEN_FILL_ONE, TOKEN_FILL_MANY, TOKEN_EXPLICIT = (
    0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFC)
MAX_BLOCK_INDEX = 1 << 36
"""Blocks past 2^56 bytes of memory are damage (``base.ADDRESS_LIMIT``)."""
_RAM_BLOCK = re.compile(r"RamBlock(\d{1,12})")


class _Block(NamedTuple):
    number: int
    data: int
    """File offset of the stored bytes."""
    length: int
    entry: int
    """File offset of the key entry (for errors)."""


class _Key(NamedTuple):
    ident: int
    parent: int
    name: str
    flags: int
    payload: int
    """File offset of the payload."""
    payload_len: int
    offset: int


class VmrsReader(DumpReader):
    """A Hyper-V ``.vmrs``: RamBlock objects, decoded block by block."""

    format = DumpFormat.VMRS
    unwrapped_only = "it compresses its own pages"

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """The storage header signature at 0 or 0x1000."""
        return any(len(head) >= at + 4 and struct.unpack_from("<I", head, at)[0] == SIGNATURE
                   for at in HEADER_OFFSETS)

    # -- the tables -------------------------------------------------------------------------

    def _header(self) -> None:
        found = []
        for at in HEADER_OFFSETS:
            if at + HEADER.size > self.file_size:
                continue
            sig, _, seq, version, _, block_size, *_ = self._unpack(HEADER, at, "header")
            if sig == SIGNATURE and 0x1000 <= block_size <= 0x10000:
                found.append((seq, at, version, block_size))
        if not found:
            raise self._error("no valid Hyper-V storage header (signature 0x01282014 with a "
                              "block size of 4-64 KiB) at 0 or 0x1000", 0)
        self.sequence, self.header_offset, self.version, self.block_size = max(found)

    def _objects(self) -> list[tuple[int, int, int]]:
        """(type, file_offset, size) of every object-table entry, following the chain."""
        out: list[tuple[int, int, int]] = []
        todo, seen = [OBJECT_TABLE_AT], set()
        while todo:
            at = todo.pop(0)
            if at in seen:
                continue
            seen.add(at)
            sig, count = self._unpack(OBJECT_TABLE, at, "object table header")
            if sig != OBJECT_TABLE_SIGNATURE:
                raise self._error(f"bad object table signature {sig:#x}", at)
            if problem := self._over_limit(len(out) + count, "object table entries",
                                           OBJECT_ENTRY.size):
                raise self._error(problem, at)
            raw = self._read(at + OBJECT_TABLE.size, count * OBJECT_ENTRY.size, "object table")
            for kind, _, offset, size, _ in OBJECT_ENTRY.iter_unpack(raw):
                out.append((kind, offset, size))
                if kind == OBJ_TABLE:
                    todo.append(offset)
        return out

    def _keys(self, objects: list[tuple[int, int, int]]) -> list[_Key]:
        keys: list[_Key] = []
        for kind, at, size in objects:
            if kind != OBJ_KEYS:
                continue
            sig, index, _, _ = self._unpack(KEY_TABLE, at, "key table header")
            if sig != 2:
                continue  # as volatility3: an unknown table is skipped
            end = at + size
            self._read(at, size, "key table")
            cursor = at + KEY_TABLE.size
            while cursor + KEY_PREFIX <= end:
                prefix = self._read(cursor, KEY_PREFIX, "key entry")
                flags = prefix[1]
                (entry_size,) = struct.unpack_from("<I", prefix, 2)
                (parent,) = struct.unpack_from("<I", prefix, 6)
                if entry_size == 0 or cursor + entry_size > end:
                    break
                namelen = prefix[0x14]
                if entry_size < KEY_PREFIX + namelen:
                    raise self._error(f"key entry of {entry_size} bytes cannot hold its "
                                      f"{namelen}-byte name", cursor)
                raw_name = self._read(cursor + KEY_PREFIX, namelen, "key name")
                name = raw_name.split(b"\0", 1)[0].decode("ascii", "replace")
                ident = ((cursor - at) << 16) | index
                keys.append(_Key(ident, parent, name, flags, cursor + KEY_PREFIX + namelen,
                                 entry_size - KEY_PREFIX - namelen, cursor))
                if problem := self._over_limit(len(keys), "key entries", KEY_PREFIX):
                    raise self._error(problem, cursor)
                cursor += entry_size
        return keys

    def _ram_blocks(self) -> list[_Block]:
        objects = self._objects()
        data_size = {off: size for kind, off, size in objects if kind == OBJ_DATA}
        keys = self._keys(objects)
        children: dict[int, list[_Key]] = {}
        for k in keys:
            children.setdefault(k.parent, []).append(k)
        todo = [k for k in keys if k.parent == 0 and k.name == "savedstate"]
        if not todo:
            raise self._error("no 'savedstate' key: not a saved state with memory", 0)
        seen: set[int] = set()
        blocks: dict[int, _Block] = {}
        while todo:
            k = todo.pop()
            if k.offset in seen:
                continue
            seen.add(k.offset)
            todo += children.get(k.ident, [])
            m = _RAM_BLOCK.fullmatch(k.name)
            if not m:
                continue
            index = int(m[1])
            if index >= MAX_BLOCK_INDEX:
                raise self._error(f"RamBlock{index} lies past 2^56 bytes", k.offset)
            if index in blocks:
                raise self._error(f"RamBlock{index} appears twice", k.offset)
            if k.payload_len < 4:
                raise self._error(f"RamBlock{index} has no stored length", k.offset)
            (length,) = struct.unpack_from("<I", self._read(k.payload, 4, "RamBlock length"))
            if k.flags & 1:
                if k.payload_len < 12:
                    raise self._error(f"RamBlock{index} names no data object", k.offset)
                (data,) = struct.unpack_from("<Q", self._read(k.payload + 4, 8, "RamBlock"))
                if data not in data_size:
                    raise self._error(f"RamBlock{index} names {data:#x}, which is no data "
                                      "object of the object tables", k.offset)
                length = min(length, data_size[data])
            else:
                data = k.payload + 4
                if length > k.payload_len - 4:
                    raise self._error(f"RamBlock{index} holds {k.payload_len - 4} bytes inline, "
                                      f"not the {length} it says", k.offset)
            self._read(data, length, f"RamBlock{index}")  # stored bytes inside the file
            blocks[index] = _Block(index, data, length, k.offset)
        if not blocks:
            raise self._error("the saved state holds no RamBlock (no guest memory)", 0)
        return [blocks[i] for i in sorted(blocks)]

    def _load_extents(self) -> list[Extent]:
        ps = self.page_size
        if ps > BLOCK:
            raise ValueError(f"page size {ps} is larger than a Hyper-V RAM block (1 MiB)")
        self._header()
        self.blocks = self._ram_blocks()
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        per = BLOCK // ps
        extents = []
        for b in self.blocks:
            extents.append(Extent(b.number * BLOCK, per, PageState.DATA, -1, f"RamBlock{b.number}"))
            self._origins[b.number * BLOCK] = b.entry
        self._by_index = {b.number: i for i, b in enumerate(self.blocks)}
        return extents

    # -- decoding ---------------------------------------------------------------------------

    def _corrupt(self, b: _Block, detail: str, at: int) -> CorruptPageError:
        return CorruptPageError(f"RamBlock{b.number}: {detail}", path=self.path, offset=at)

    def _decode(self, b: _Block) -> tuple[np.ndarray, np.ndarray]:
        """A block's 1 MiB and, per 4 KiB page, whether it is a zero fill.

        Compressed pages are decoded as their tokens come with the Python decoder, or, where
        the kernels are built, gathered and decoded in one call after the walk (a block's
        pages at once: fewer calls than one a page); a damaged token then decodes those
        before it first, so either way the first damage in the stream is the one reported."""
        zero = np.zeros(PAGES_PER_BLOCK, bool)
        if b.length == BLOCK:
            return np.frombuffer(self._mm, np.uint8, BLOCK, b.data), zero
        mm = self._mm
        out = np.empty(BLOCK, np.uint8)
        words = out.view("<u8")
        jobs: list[tuple[int, int, int, int]] | None = [] if compiled.native is not None else None
        sources: list[int] = []  # the token of each job (for errors)

        def corrupt(detail: str, at: int) -> CorruptPageError:
            if jobs:
                self._inflate(b, out, jobs, sources)  # damage before this one comes first
            return self._corrupt(b, detail, at)

        page, pos, end = 0, b.data, b.data + b.length
        while pos + 4 <= end:
            (token,) = struct.unpack_from("<I", mm, pos)
            at = pos
            pos += 4
            if token == TOKEN_END:
                break
            if token in (TOKEN_FILL_ONE, TOKEN_FILL_MANY):
                need = 8 if token == TOKEN_FILL_ONE else 12
                if pos + need > end:
                    raise corrupt("a fill token runs past the stored bytes", at)
                (value,) = struct.unpack_from("<Q", mm, pos)
                count = 1 if token == TOKEN_FILL_ONE else struct.unpack_from("<I", mm, pos + 8)[0]
                pos += need
                if count > PAGES_PER_BLOCK - page:
                    raise corrupt(f"a fill of {count} pages goes past the 1 MiB block at page "
                                  f"{page}", at)
                w = HV_PAGE // 8
                words[page * w : (page + count) * w] = value
                zero[page : page + count] = value == 0
                page += count
                continue
            if token == TOKEN_EXPLICIT:
                if pos + 8 > end:
                    raise corrupt("an explicit token runs past the stored bytes", at)
                out_len, size = struct.unpack_from("<II", mm, pos)
                pos += 8
            else:
                out_len, size = HV_PAGE, token
                if size > HV_PAGE:
                    raise corrupt(f"a page of {size} bytes is larger than 4 KiB", at)
            if out_len % HV_PAGE or out_len > (PAGES_PER_BLOCK - page) * HV_PAGE:
                raise corrupt(f"{out_len} bytes of memory at page {page} are not whole pages "
                              "inside the 1 MiB block", at)
            if pos + size > end:
                raise corrupt(f"{size} stored bytes run past the block's", at)
            where = page * HV_PAGE
            if size == out_len:
                out[where : where + size] = np.frombuffer(mm, np.uint8, size, pos)
            elif jobs is not None:
                jobs.append((pos, size, where, out_len))
                sources.append(at)
            else:
                try:
                    plain = decompress(memoryview(mm)[pos : pos + size], out_len)
                except ValueError as e:
                    raise self._lz77_error(b, pos, size, str(e), at) from None
                out[where : where + out_len] = np.frombuffer(plain, np.uint8)
            pos += size
            page += out_len // HV_PAGE
        if page != PAGES_PER_BLOCK:
            raise corrupt(f"its tokens give {page} of the 256 pages of 1 MiB", b.entry)
        if jobs:
            self._inflate(b, out, jobs, sources)
        return out, zero

    def _inflate(self, b: _Block, out: np.ndarray, jobs: list[tuple[int, int, int, int]],
                 sources: list[int]) -> None:
        """Decode the compressed pages ``jobs`` of block ``b`` into ``out``, in C, one call."""
        failed = compiled.lz77_pages(self._mm, np.array(jobs, np.int64), out)
        if failed is not None:
            k, message = failed
            pos, size = jobs[k][:2]
            raise self._lz77_error(b, pos, size, message, sources[k])

    def _lz77_error(self, b: _Block, pos: int, size: int, message: str,
                    at: int) -> CorruptPageError:
        return self._corrupt(b, f"cannot decompress {size} bytes at {pos:#x} (LZ77, "
                             f"compression format 3): {message}", at)

    def _decoded(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Block ``i`` (position in ``self.blocks``) as ``(pages, zero)`` in analysis pages,
        the last one decoded kept."""
        cache = self._cache
        if cache is None or cache[0] != i:
            self._cache = None
            data, zero4k = self._decode(self.blocks[i])
            ps = self.page_size
            zero: np.ndarray
            if ps >= HV_PAGE:
                zero = np.asarray(zero4k.reshape(-1, ps // HV_PAGE).all(axis=1))
            else:
                zero = np.repeat(zero4k, HV_PAGE // ps)
            cache = self._cache = (i, data.reshape(-1, ps), zero)
        return cache[1], cache[2]

    def iter_batches(
        self, batch_pages: int = DEFAULT_BATCH_PAGES, *, shard: int = 0, shards: int = 1
    ) -> Iterator[PageBatch]:
        """Decode block by block (1 MiB each), at most ``batch_pages`` pages a batch."""
        ps = self.page_size
        per = BLOCK // ps
        step = max(1, min(batch_pages, per))
        batch = -1
        for i, b in enumerate(self.blocks):
            for p0 in range(0, per, step):
                batch += 1
                if batch % shards != shard:
                    continue
                pages, zero = self._decoded(i)
                p1 = min(per, p0 + step)
                addrs = np.uint64(b.number * BLOCK + p0 * ps) + np.arange(
                    p1 - p0, dtype=np.uint64) * np.uint64(ps)
                z = zero[p0:p1]
                yield PageBatch(addrs, pages[p0:p1], z if z.any() else None)

    def read_pages(self, addrs: np.ndarray) -> np.ndarray:
        """Decode the pages at ``addrs``, reusing the last block decoded."""
        ps = self.page_size
        want = np.asarray(addrs, dtype=np.uint64)
        out = np.empty((len(want), ps), np.uint8)
        for row, addr in enumerate(want.tolist()):
            index, rel = divmod(addr, BLOCK)
            i = self._by_index.get(index)
            if i is None or rel % ps:
                raise ValueError(f"address {addr:#x} is not a stored page of {self.path}")
            out[row] = self._decoded(i)[0][rel // ps]
        return out

    def info(self) -> dict[str, Any]:
        """Header facts and the RAM blocks."""
        indices = [b.number for b in self.blocks]
        return {
            "header_offset": self.header_offset,
            "sequence": self.sequence,
            "version": self.version,
            "block_size": self.block_size,
            "ram_blocks": len(self.blocks),
            "raw_blocks": sum(1 for b in self.blocks if b.length == BLOCK),
            "missing_blocks_below_last": indices[-1] + 1 - len(indices),
            "stored_bytes": sum(b.length for b in self.blocks),
            "addresses": "RamBlock number x 1 MiB (as volatility3), not guest-physical",
        }

    def close(self) -> None:
        """Drop the decode cache (it may view the map), then release the file."""
        self._cache = None
        super().close()
