"""VMware suspended and snapshot state: ``.vmss``/``.vmsn`` and the ``.vmem`` beside them.

Format (crash-utility ``vmware_vmss.h``/``vmware_vmss.c``, volatility3
``framework/layers/vmware.py``): a state file is a header ``u32 magic, u32 version, u32
numgroups``, then ``numgroups`` group descriptors ``{char name[64]; u64 position; u64 size}``.
At each group's position, a list of tags ends with a 16-bit zero. A tag is a little-endian
``u16``: bits 15-8 the name's length, bits 7-6 the number of ``u32`` indices after the name,
bits 5-0 the value's size in bytes; a size of 63 marks a block and 62 a compressed block,
whose value is ``u64 bytes in the file, u64 bytes in memory, u16 padding`` followed by the
padding and the block's bytes.

The ``memory`` group says where guest RAM is: ``regionsCount`` (0 or absent: the memory is
flat, file offset = guest-physical address), and per region ``i`` ``regionPPN[i]`` (its first
guest-physical page), ``regionPageNum[i]`` (its first page in the memory bytes) and
``regionSize[i]`` (pages), in 4 KiB pages. The memory bytes are either the ``Memory`` block
of the state file itself (older products, and suspends that keep everything in one file) or
the ``.vmem`` file of the same stem beside it.

Either file may be given. A ``.vmem`` with a ``.vmss`` or ``.vmsn`` of the same stem beside
it is detected as this format (by the companion, it has no magic); without one it is read
as raw. Whichever is given, the input is the file that holds the pages (``path``: the
``.vmem``, or the state file with a ``Memory`` block), and ``state_path`` is the state file:
giving both is one guest given twice, refused as such.

VMware's compression of a ``Memory`` block is not published; a compressed one is refused,
naming its offset (crash-utility refuses it too).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any, NamedTuple

from ..errors import DumpFormatError, TruncatedDumpError, UnsupportedDumpError
from ..pages import PAGE_SIZE, Extent, PageState
from ..units import size_text
from .base import ADDRESS_LIMIT, MIN_LIMIT, DumpFormat, DumpReader, open_readonly

__all__ = ["STATE_SUFFIXES", "VmwareReader", "companion_state"]

HEADER = struct.Struct("<III")
GROUP = struct.Struct("<64sQQ")
BLOCK = struct.Struct("<QQH")
VMW_PAGE = 4096
"""VMware's page: the unit of regionPPN, regionPageNum and regionSize."""

MAGICS = {
    0xBED2BED2: "checkpoint",
    0xBED3BED3: "partial checkpoint",
    0xBAD1BAD1: "restored checkpoint",
    0xBAD2BAD2: "checkpoint not to restore",
}
"""The 64-bit state files (crash-utility ``CPTDUMP_*_MAGIC_NUMBER``)."""
OLD_MAGICS = (0xBED0BED0, 0xBED2BED0)
"""The old 32-bit layout (crash ``CPTDUMP_OLD_MAGIC_NUMBER``; volatility3's ``D0 BE D2 BE``):
4-byte block sizes, refused."""
TAG_BLOCK, TAG_BLOCK_COMPRESSED = 63, 62
TAG_BYTES = 3
"""Every tag but the end marker takes at least 3 bytes of file: the cap on tags read, over
all groups (groups may point at the same place), is MIN_LIMIT plus one per this many bytes."""
STATE_SUFFIXES = (".vmss", ".vmsn")


def companion_state(path: str | os.PathLike[str]) -> str | None:
    """The ``.vmss`` (first) or ``.vmsn`` of the same stem beside a ``.vmem``, or None."""
    text = os.fspath(path)
    stem, ext = os.path.splitext(text)
    if ext.lower() != ".vmem":
        return None
    for suffix in STATE_SUFFIXES:
        for candidate in (stem + suffix, stem + suffix.upper()):
            if os.path.isfile(candidate):
                return candidate
    return None


def _companion_vmem(state: str) -> str | None:
    stem, ext = os.path.splitext(state)
    if ext.lower() not in STATE_SUFFIXES:
        return None
    for candidate in (stem + ".vmem", stem + ".VMEM"):
        if os.path.isfile(candidate):
            return candidate
    return None


class Block(NamedTuple):
    """A block tag: where its bytes are in the state file."""

    name: str
    indices: tuple[int, ...]
    tag_offset: int
    data_offset: int
    file_bytes: int
    memory_bytes: int
    compressed: bool


class Region(NamedTuple):
    """One row of the memory group's region table, in bytes."""

    number: int
    gpa: int
    offset: int
    """Offset in the memory bytes (the .vmem, or the Memory block)."""
    size: int
    tag_offset: int = 0
    """File offset of the state file's tag that sized the region (for errors)."""


class StateFile:
    """The tag tree of a ``.vmss``/``.vmsn``: the memory group's values and blocks, and counts.

    Raises:
        InputError: the file cannot be opened.
        UnsupportedDumpError: the old 32-bit layout.
        DumpFormatError / TruncatedDumpError: a damaged header, group or tag (path and offset).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        fd, self.size = open_readonly(path)
        try:
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        try:
            self._parse()
        finally:
            self._mm.close()

    def _error(self, detail: str, offset: int | None) -> DumpFormatError:
        return DumpFormatError(detail, path=self.path, offset=offset)

    def _read(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise TruncatedDumpError(
                f"{what}, {size_text(size)}, runs past the end of the file, which holds "
                f"{size_text(self.size)}", path=self.path, offset=offset)
        return self._mm[offset : offset + size]

    def _parse(self) -> None:
        magic, self.version, ngroups = HEADER.unpack(self._read(0, HEADER.size, "VMware header"))
        if magic in OLD_MAGICS:
            raise UnsupportedDumpError(
                f"an old 32-bit VMware state file (magic {magic:#010x}), which ksm-analyze "
                "cannot read; convert it with vmss2core, or suspend the VM again on a current "
                "VMware product", path=self.path, offset=0)
        if magic not in MAGICS:
            raise self._error(f"not a VMware state file: magic {magic:#010x}", 0)
        self.kind = MAGICS[magic]
        self._read(HEADER.size, ngroups * GROUP.size, f"the table of {ngroups:,} groups")
        self.groups: list[tuple[str, int, int]] = []
        self.values: dict[tuple[str, tuple[int, ...]], int] = {}
        self.where: dict[tuple[str, tuple[int, ...]], int] = {}
        """File offset of each value's tag, for errors."""
        self.memory_group: int | None = None
        self.blocks: list[Block] = []
        self.tags = 0
        self.tag_limit = MIN_LIMIT + self.size // TAG_BYTES
        for g in range(ngroups):
            at = HEADER.size + g * GROUP.size
            raw_name, position, size = GROUP.unpack(self._read(at, GROUP.size, f"group {g}"))
            name = raw_name.split(b"\0", 1)[0].decode("latin-1")
            self.groups.append((name, position, size))
            if name == "memory" and self.memory_group is None:
                self.memory_group = position
            self._parse_tags(name, position, memory=name == "memory")

    def _parse_tags(self, group: str, offset: int, *, memory: bool) -> None:
        if offset >= self.size:
            raise TruncatedDumpError(
                f"group {group!r} starts at {offset:#x}, past the end of the file "
                f"({self.size:#x})", path=self.path, offset=offset)
        while True:
            (tag,) = struct.unpack("<H", self._read(offset, 2, f"a tag of group {group!r}"))
            if tag == 0:
                return
            self.tags += 1
            if self.tags > self.tag_limit:
                raise self._error(
                    f"more than {self.tag_limit:,} tags, the most a file of "
                    f"{size_text(self.size)} may hold ({MIN_LIMIT:,} plus one per "
                    f"{TAG_BYTES} bytes)", offset)
            at = offset
            namelen, nindex, valsize = tag >> 8, (tag >> 6) & 3, tag & 0x3F
            offset += 2
            name = self._read(offset, namelen, f"the name of the tag at {at:#x}").decode(
                "latin-1")
            offset += namelen
            indices = struct.unpack(f"<{nindex}I", self._read(
                offset, 4 * nindex, f"the indices of tag {name!r}"))
            offset += 4 * nindex
            if valsize in (TAG_BLOCK, TAG_BLOCK_COMPRESSED):
                nbytes, inmem, pad = BLOCK.unpack(self._read(offset, BLOCK.size,
                                                             f"the size of block {name!r}"))
                data = offset + BLOCK.size + pad
                if data + nbytes > self.size:
                    raise TruncatedDumpError(
                        f"block {name!r} of group {group!r} ({size_text(nbytes)} at {data:#x}) "
                        f"runs past the end of the file, which holds {size_text(self.size)}",
                        path=self.path, offset=at)
                if memory:
                    self.blocks.append(Block(name, indices, at, data, nbytes, inmem,
                                             valsize == TAG_BLOCK_COMPRESSED))
                offset = data + nbytes
            else:
                value = int.from_bytes(self._read(offset, valsize, f"the value of {name!r}"),
                                       "little")
                if memory and (name, indices) not in self.values:  # the first one counts
                    self.values[(name, indices)] = value
                    self.where[(name, indices)] = at
                offset += valsize

    def memory_block(self) -> Block | None:
        """The ``Memory`` block of the memory group, if the state file holds RAM itself."""
        found = [b for b in self.blocks if b.name == "Memory"]
        if len(found) > 1:
            raise UnsupportedDumpError(
                f"{len(found)} Memory blocks (the second at {found[1].tag_offset:#x}); "
                "ksm-analyze reads a state file that holds its memory in one block",
                path=self.path, offset=found[1].tag_offset)
        if not found:
            return None
        b = found[0]
        if b.compressed:
            raise UnsupportedDumpError(
                f"the Memory block at offset {b.data_offset:#x} is compressed "
                f"({size_text(b.file_bytes)} holding {size_text(b.memory_bytes)}), in a "
                "compression VMware does not document; convert the state file with "
                "vmss2core (-N6: an ELF core, -W8: a Windows dump) and read that",
                path=self.path, offset=b.tag_offset)
        if b.file_bytes != b.memory_bytes:
            raise self._error(
                f"the Memory block holds {size_text(b.file_bytes)} in the file but says "
                f"{size_text(b.memory_bytes)} in memory, and is not marked compressed",
                b.tag_offset)
        return b

    def regions(self, memory_bytes: int) -> list[Region]:
        """The region table; one flat region of ``memory_bytes`` when there is none."""
        count = self.values.get(("regionsCount", ()), 0)
        if count == 0:
            return [Region(0, 0, 0, memory_bytes)]
        at = self.where[("regionsCount", ())]
        if count > self.tags:  # each region needs three tags of its own
            raise self._error(
                f"regionsCount is {count:,}, but the file holds only {self.tags:,} tags", at)
        out = []
        for i in range(count):
            row = []
            for field in ("regionPPN", "regionPageNum", "regionSize"):
                value = self.values.get((field, (i,)))
                if value is None:
                    raise self._error(
                        f"regionsCount is {count:,} but the memory group has no {field}[{i}]",
                        at)
                row.append(value * VMW_PAGE)
            gpa, offset, size = row
            if gpa + size > ADDRESS_LIMIT:
                raise self._error(
                    f"region {i} ends at {gpa + size:#x}, above 2^56 (64 PiB): past any "
                    "physical address", self.where[("regionPPN", (i,))])
            out.append(Region(i, gpa, offset, size, self.where[("regionSize", (i,))]))
        return out


class VmwareReader(DumpReader):
    """A VMware guest: the memory bytes (``.vmem`` or the state file's ``Memory`` block)
    placed at guest-physical addresses by the state file's region table."""

    format = DumpFormat.VMWARE
    unwrapped_only = "its state file is read in place, with the .vmem beside it"

    def __init__(self, path: str | os.PathLike[str], *, page_size: int = PAGE_SIZE,
                 base_address: int = 0) -> None:
        given = os.fspath(path)
        state_path = given if _is_state_file(given) else companion_state(given)
        if state_path is None:
            raise DumpFormatError(
                "neither a VMware state file nor a .vmem with a .vmss or .vmsn of the same "
                "name beside it; read a lone .vmem with --format raw (guest-physical "
                "addresses unknown)", path=given, offset=0)
        self.state_path = state_path
        self.state = StateFile(state_path)
        self.block = self.state.memory_block()
        notes = []
        if self.block is not None:
            memory_path = state_path
            if given != state_path:
                notes.append(f"{given}: not read: {state_path} holds the guest's memory itself "
                             "(a Memory block), which is read instead")
        elif state_path != given:
            memory_path = given
        else:
            vmem = _companion_vmem(state_path)
            if vmem is None:
                raise DumpFormatError(
                    "the state file holds no memory (no Memory block) and there is no .vmem "
                    "of the same name beside it", path=state_path,
                    offset=self.state.memory_group or 0)
            memory_path = vmem
        super().__init__(memory_path, page_size=page_size, base_address=base_address)
        self.warnings[:0] = notes

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """A state file's magic (old ones too, to refuse them by name); a ``.vmem`` is
        detected by its companion (:meth:`probe_path`)."""
        return len(head) >= 4 and struct.unpack_from("<I", head)[0] in (*MAGICS, *OLD_MAGICS)

    @classmethod
    def probe_path(cls, path: str | os.PathLike[str]) -> bool:
        """A ``.vmem`` with its ``.vmss``/``.vmsn`` beside it."""
        return companion_state(path) is not None

    def _load_extents(self) -> list[Extent]:
        base = 0 if self.block is None else self.block.data_offset
        memory = self.file_size if self.block is None else self.block.memory_bytes
        where = self.path if self.block is None else f"the Memory block of {self.path}"
        self.regions = self.state.regions(memory)
        ps = self.page_size
        extents, trimmed = [], 0
        for r in self.regions:
            if r.offset + r.size > memory:
                raise TruncatedDumpError(
                    f"VMware region {r.number} (guest-physical [{r.gpa:#x}, {r.gpa + r.size:#x})) "
                    f"needs bytes [{r.offset:#x}, {r.offset + r.size:#x}) of {where}, which "
                    f"holds {size_text(memory)}", path=self.state_path, offset=r.tag_offset)
            lead = -r.gpa % ps
            npages = max(0, r.size - lead) // ps
            trimmed += r.size - npages * ps
            extents.append(Extent(r.gpa + lead, npages, PageState.DATA, base + r.offset + lead,
                                  f"VMware region {r.number}"))
        if trimmed:
            self.warnings.append(
                f"{self.path}: {size_text(trimmed)} of the VMware regions are not whole "
                f"{ps}-byte pages at their guest-physical addresses and are ignored")
        return extents

    def info(self) -> dict[str, Any]:
        """The state file, where the memory is, and the region table."""
        return {
            "state_file": self.state_path,
            "state_kind": self.state.kind,
            "memory": (f"Memory block at {self.block.data_offset:#x} of the state file"
                       if self.block else "the .vmem beside the state file"),
            "groups": len(self.state.groups),
            "tags": self.state.tags,
            "regions_count": len(self.regions),
            "regions": [[r.gpa, r.gpa + r.size, r.offset] for r in self.regions],
        }


def _is_state_file(path: str) -> bool:
    """Whether ``path`` starts with a state file's magic (InputError if it cannot be read)."""
    fd, _size = open_readonly(path)
    try:
        return VmwareReader.probe(os.pread(fd, 4, 0))
    finally:
        os.close(fd)
