"""QEMU saved state: the migration stream (``QEVM``), bare or behind a libvirt save header.

One reader for what QEMU's ``savevm``/``migrate`` code writes to a file: ``migrate
"exec:cat > F"`` and ``migrate file:F``, ``virsh dump`` without ``--memory-only`` (a bare
stream), Proxmox ``vmstate`` volumes (a bare stream, then padding), ``virsh save`` and
``managedsave`` images (a ``LibvirtQemudSave`` header, then the stream), and ``mapped-ram``
streams (QEMU 9.0+, libvirt's ``sparse`` format: pages at fixed offsets, a bitmap of written
pages). Layout from QEMU's own source (``migration/savevm.c``, ``migration/ram.c``,
``docs/devel/migration/mapped-ram.rst``) and libvirt's ``src/qemu/qemu_saveimage.h``::

    be32 0x5145564d 'QEVM', be32 3
    0x07 CONFIGURATION  be32 len, machine type; subsections (0x05, u8 len, name, be32 version,
                        fields): target-page-bits, capabilities, uuid
    0x01 START / 0x04 FULL   be32 section id, u8 len + idstr, be32 instance, be32 version
    0x02 PART  / 0x03 END    be32 section id
    ... payload ..., then (machine types >= 2.4) 0x7e FOOTER be32 section id
    0x08 COMMAND        be16 command, be16 length, payload
    0x00 EOF, then 0x06 VMDESCRIPTION be32 length + JSON

The ``"ram"`` section's payload is a list of records, a be64 of (offset in the RAM block |
flags): MEM_SIZE (0x04, the block list), ZERO (0x02, one fill byte), PAGE (0x08, a raw page),
CONTINUE (0x20: same block as the previous record, else u8 len + block name follows the be64),
EOS (0x10, end of this part), MULTIFD_FLUSH (0x200); XBZRLE (0x40, a delta against the previous
copy) and COMPRESS_PAGE (0x100, zlib) are refused, naming the offset. A running guest's stream
resends pages: the last copy wins, as when QEMU loads it.

Device sections are not self-sizing (their layout lives in QEMU's C structures); they are not
read. They need not be: ``savevm.c`` writes every iterable section's END (the RAM's last part)
before the first device's FULL section (``qemu_savevm_state_complete_precopy``), so RAM is
complete when the first FULL section after the RAM's END begins, and the walk stops there. A
FULL section before that (an early-setup device), or any section of another iterable device
(block migration, dirty bitmaps, VFIO), cannot be skipped without guessing: an error names the
section (id, name) and its offset.

The stream is indexed, not loaded: one int64 per page of each RAM block (the file offset of
its last copy, or a fill byte, or absent). A paused guest's stream is mostly 4104-byte
PAGE|CONTINUE and 9-byte ZERO|CONTINUE records, mixed in short runs: the compiled kernel
``qevm_ram_records`` (hashing/_compiled.c) walks them (a 4 GiB guest's million records in
about 10 ms); where it is not built, vectorised runs of records at a constant stride do
(about 1.5 s for the same, one numpy pass per run). Addresses: ``pc.ram`` offsets map to guest-physical ones (below 4 GiB up to the split
the machine type implies, the rest from 4 GiB); every other block (``vga.vram``, ``pc.bios``,
option ROMs, ACPI tables) gets a disjoint synthetic range at or above 2^48, listed by name in
``info``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from ..errors import DumpFormatError, TruncatedDumpError, UnsupportedDumpError
from ..hashing import compiled
from ..pages import Extent, PageBatch, PageState
from ..units import size_text
from .base import DEFAULT_BATCH_PAGES, DumpFormat, DumpReader
from .streams import Codec, Decompressed

__all__ = ["LIBVIRT_FORMATS", "MigrationReader"]

QEVM = b"QEVM\x00\x00\x00\x03"
LIBVIRT_MAGIC = b"LibvirtQemudSave"
LIBVIRT_PARTIAL = b"LibvirtQemudPart"
LIBVIRT_HEADER = 92
"""magic[16], version, data_len, was_running, format, cookieOffset, unused[14] (u32 each)."""
LIBVIRT_FORMATS = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd", 6: "sparse"}
"""libvirt's ``virQEMUSaveFormat``: what follows the header (compressed for 1-5; ``sparse`` is a
mapped-ram stream)."""
LIBVIRT_CODECS = {1: Codec.GZIP, 2: Codec.BZIP2, 3: Codec.XZ, 4: Codec.LZOP, 5: Codec.ZSTD}
"""The compressed formats: libvirt pipes the stream through ``<format> -c`` (xz: ``-c -3``)
into the rest of the file after the header (qemu_saveimage.c,
qemuSaveImageGetCompressionProgram), and restores through ``<format> -dc``."""
WINDOW_BYTES = 8 << 20
"""Decompressed bytes the record walk holds at a time when the stream is compressed."""

# Section types (migration/savevm.c)
EOF, START, PART, END, FULL, SUBSECTION, VMDESCRIPTION, CONFIGURATION, COMMAND, FOOTER = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7E)
_SECTION_NAMES = {EOF: "EOF", START: "START", PART: "PART", END: "END", FULL: "FULL",
                  SUBSECTION: "SUBSECTION", VMDESCRIPTION: "VMDESCRIPTION",
                  CONFIGURATION: "CONFIGURATION", COMMAND: "COMMAND", FOOTER: "FOOTER"}

# RAM record flags (migration/ram.h)
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
F_XBZRLE, F_HOOK, F_COMPRESS_PAGE, F_MULTIFD_FLUSH = 0x40, 0x80, 0x100, 0x200
FLAG_MASK = 0x3FF
"""Every flag fits below 2^10, the smallest target page QEMU has (ARM's TARGET_PAGE_BITS_MIN)."""

# Migration commands (savevm.c enum qemu_vm_cmd)
CMD_POSTCOPY_ADVISE, CMD_PACKAGED = 3, 7

MAPPED_RAM_HEADER = struct.Struct(">IQQQ")
"""version (1), page_size, bitmap_offset, pages_offset (ram.c MappedRamHeader, packed)."""

DEFAULT_TARGET_PAGE = 1 << 12
"""The target page size of a stream without a target-page-bits subsection (x86's)."""

ABSENT = -1
"""A page slot of the index no record filled."""
ZERO_FILL = -2
"""A ZERO record with fill byte 0; fill byte b is ``ZERO_FILL - b``."""

RUN_PAGES_MIN = 16
"""Pages are read in place when their runs average at least this many pages (a view each)."""

SYNTHETIC_BASE = 1 << 48
"""Where blocks with no guest-physical address are placed, one after another, 1 GiB aligned."""
GiB = 1 << 30
FOUR_GIB = 4 * GiB

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U16x2 = struct.Struct(">HH")


@dataclass
class RamBlock:
    """One RAM block of the stream and its page index."""

    name: str
    used_length: int
    offset: int
    """File offset of the block's entry in the MEM_SIZE list."""
    where: np.ndarray = field(repr=False)
    """int64 per page: file offset of its last copy (>= 0), ABSENT, or ZERO_FILL - fill."""
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    """(first page, pages, address): where the block's pages go in the address space."""
    mapped: tuple[int, int] | None = None
    """mapped-ram: (bitmap_offset, pages_offset)."""
    ignored: bool = False
    """x-ignore-shared left it out (mapped-ram offsets 0/0): no page is in the file."""
    synthetic: bool = True


def _block_label(b: RamBlock) -> str:
    return f"RAM block {b.name}"


class MigrationReader(DumpReader):
    """A QEMU migration stream, bare or behind libvirt's save header, or a mapped-ram file."""

    format = DumpFormat.MIGRATION
    unwrapped_only = None

    @classmethod
    def probe(cls, head: bytes) -> bool:
        return head.startswith((QEVM, LIBVIRT_MAGIC, LIBVIRT_PARTIAL))

    # -- parsing ----------------------------------------------------------------------------

    def _load_extents(self) -> list[Extent]:
        self.libvirt: dict[str, Any] | None = None
        self.machine: str | None = None
        self.capabilities: list[str] = []
        self.target_page_size = DEFAULT_TARGET_PAGE
        self.blocks: dict[str, RamBlock] = {}
        self.mapped_ram = False
        self.ram_records = 0
        self.sections: dict[str, int] = {}
        self.devices_offset: int | None = None
        self.below_4g: int | None = None
        self.split_note = ""
        self._last_block: RamBlock | None = None
        self._window: tuple[int, bytes] = (0, b"")
        """(offset, bytes) of the decompressed stream the walk reads from (a source only)."""
        if self.source is not None and self.source.start:
            # A compressed libvirt image re-opened from its state (a worker): the source is
            # the stream after the header, whose bytes are the file's own.
            start = self._libvirt_header(self._file_bytes)
        elif self._mm[:16] == LIBVIRT_PARTIAL:
            raise self._error(
                "an incomplete libvirt save image (LibvirtQemudPart): libvirt was still "
                "writing it, or the save failed; it holds no usable state", 0)
        elif self._mm[:16] == LIBVIRT_MAGIC:
            start = self._libvirt_header(lambda at, n: self._mm[at : at + n])
        else:
            start = 0
        self.stream_offset = start
        if self.source is None or not self.source.start:
            self._walk(start)
            return self._extents()
        try:
            self._walk(0)
        except DumpFormatError as e:  # offsets in the decompressed stream: say which one
            if e.offset is None or "decompressed offset" in e.detail:
                raise
            raise type(e)(f"{e.detail} (offset {e.offset:#x} of the QEMU stream decompressed "
                          f"from the {self.source.codec.value} data at file offset "
                          f"{start:#x})", path=self.path, offset=e.offset) from None
        return self._extents()

    def _file_bytes(self, at: int, n: int) -> bytes:
        """Bytes of the file itself (the header of a compressed image, not its stream)."""
        return os.pread(self._fd, n, at)

    def _unwrap(self, start: int, codec: Codec) -> None:
        """Read the stream from the compressed rest of the file (a libvirt save image of a
        compressed format): the reader's source becomes it, as for a wrapped file, and every
        offset from here on is one of the decompressed stream."""
        if self.source is not None:
            raise UnsupportedDumpError(
                f"a {codec.value}-compressed libvirt save image inside a "
                f"{self.source.codec.value} stream (a wrapper inside a wrapper): decompress "
                "the outer one first", path=self.path, offset=28)
        source = Decompressed(self.path, self._fd, codec, start)
        mm, self._mm = self._mm, cast(mmap.mmap, source)
        with contextlib.suppress(BufferError):
            mm.close()
        self.source, self.file_size = source, source.size
        self.warnings += source.warnings

    def _libvirt_header(self, read: Callable[[int, int], bytes]) -> int:
        """Parse the save header (``read(offset, n)``: its bytes); returns the stream's
        file offset. A compressed format makes the stream the reader's source."""
        size = self.file_size
        raw = bytes(read(0, LIBVIRT_HEADER))
        if len(raw) < LIBVIRT_HEADER:
            raise TruncatedDumpError(
                f"the libvirt save header, {LIBVIRT_HEADER} bytes, runs past the end of the "
                f"file, which holds {size_text(size)}", path=self.path, offset=0)
        order = "<"
        (version,) = struct.unpack_from("<I", raw, 16)
        if version > 2:  # written on a host of the other byte order (qemu_saveimage.c)
            order = ">"
            (version,) = struct.unpack_from(">I", raw, 16)
        version, data_len, was_running, fmt, cookie = struct.unpack_from(order + "5I", raw, 16)
        if version != 2:
            raise UnsupportedDumpError(
                f"libvirt save header version {version}; ksm-analyze reads version 2",
                path=self.path, offset=16)
        name = LIBVIRT_FORMATS.get(fmt)
        if name is None:
            raise self._error(f"unknown libvirt save image format {fmt}", 28)
        start = LIBVIRT_HEADER + int(data_len)
        reopened = self.source is not None and self.source.start
        if not reopened and start >= size:
            raise TruncatedDumpError(
                f"the libvirt save header's domain XML ({size_text(data_len)}) runs past the "
                f"end of the file, which holds {size_text(size)}",
                path=self.path, offset=20)
        xml = bytes(read(LIBVIRT_HEADER, min(data_len, 1 << 20)))
        found = re.search(rb"<name>([^<]{1,200})</name>", xml)
        self.libvirt = {
            "version": version,
            "byte_order": "little" if order == "<" else "big",
            "format": name,
            "was_running": bool(was_running),
            "xml_bytes": data_len,
            "cookie_offset": cookie,
            "domain": found[1].decode("utf-8", "replace") if found else None,
            "stream_offset": start,
        }
        if fmt in LIBVIRT_CODECS and not reopened:
            self._unwrap(start, LIBVIRT_CODECS[fmt])
        return start

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos + n > self.file_size:
            where = "the file" if self.source is None else "the decompressed stream"
            raise TruncatedDumpError(
                f"{what} at {pos:#x} runs past the end of {where}, which holds "
                f"{size_text(self.file_size)} (a truncated stream)",
                path=self.path, offset=pos)

    def _at(self, pos: int, n: int) -> tuple[Any, int]:
        """A buffer holding the stream's bytes ``[pos, pos + n)`` (checked with
        :meth:`_need`) and where ``pos`` is in it: the map itself, or for a decompressed
        stream a window of at least WINDOW_BYTES from ``pos`` on (read forward: the walk
        moves forward, so the decoder goes on where it stopped)."""
        if self.source is None:
            return self._mm, pos
        base, buf = self._window
        if not base <= pos <= pos + n <= base + len(buf):
            end = base + len(buf)
            keep = bytes(memoryview(buf)[pos - base :]) if base <= pos < end else b""
            more = max(n, WINDOW_BYTES) - len(keep)
            buf = keep + self.source.read_at(pos + len(keep), more) if more > 0 else keep
            base = pos
            self._window = (base, buf)
        return buf, pos - base

    def _u8(self, pos: int, what: str) -> int:
        self._need(pos, 1, what)
        buf, i = self._at(pos, 1)
        return int(buf[i])

    def _be32(self, pos: int, what: str) -> int:
        self._need(pos, 4, what)
        return int(_U32.unpack_from(*self._at(pos, 4))[0])

    def _be64(self, pos: int, what: str) -> int:
        self._need(pos, 8, what)
        return int(_U64.unpack_from(*self._at(pos, 8))[0])

    def _bytes(self, pos: int, n: int, what: str) -> bytes:
        self._need(pos, n, what)
        buf, i = self._at(pos, n)
        return bytes(buf[i : i + n])

    def _idstr(self, pos: int, what: str) -> tuple[str, int]:
        n = self._u8(pos, what)
        return self._bytes(pos + 1, n, what).decode("utf-8", "replace"), pos + 1 + n

    def _walk(self, pos: int) -> None:
        """Follow the stream's sections from ``pos`` until RAM is complete."""
        if pos + 8 > self.file_size or self._bytes(pos, 8, "the stream's magic") != QEVM:
            raise self._error(
                f"no QEMU migration stream (QEVM, version 3) at {pos:#x}, where the libvirt "
                "header says it starts", pos)
        pos += 8
        names: dict[int, str] = {}
        ram_id: int | None = None
        ram_done = False
        postcopy_ok = True
        while True:
            at = pos
            kind = self._u8(pos, "the next section's type")
            pos += 1
            self.sections[_SECTION_NAMES.get(kind, "?")] = (
                self.sections.get(_SECTION_NAMES.get(kind, "?"), 0) + 1)
            if kind == CONFIGURATION:
                pos = self._configuration(pos)
                continue
            if kind == COMMAND:
                cmd, length = _U16x2.unpack(self._bytes(pos, 4, "a COMMAND section header"))
                self._need(pos + 4, length, f"COMMAND {cmd}")
                if cmd == CMD_PACKAGED:
                    raise UnsupportedDumpError(
                        f"COMMAND section at {at:#x}: a packaged (postcopy) stream inside the "
                        "stream, which this reader does not follow", path=self.path, offset=at)
                if cmd == CMD_POSTCOPY_ADVISE and length == 16:
                    summary = self._be64(pos + 4, "POSTCOPY_ADVISE")
                    postcopy_ok = summary == self.target_page_size
                pos += 4 + length
                continue
            if kind in (START, FULL):
                sid = self._be32(pos, "a section header")
                name, pos = self._idstr(pos + 4, "a section name")
                _instance = self._be32(pos, "a section header")
                version = self._be32(pos + 4, "a section header")
                pos += 8
                names[sid] = name
                if kind == FULL:
                    if ram_done:
                        self.devices_offset = at
                        return
                    raise self._cannot_follow(at, kind, sid, name, "a device's state before "
                                              "RAM is complete (an early-setup device)")
                if name != "ram":
                    raise self._cannot_follow(at, kind, sid, name, "an iterable device other "
                                              "than RAM (block migration, dirty bitmaps, VFIO)")
                if version != 4:
                    raise UnsupportedDumpError(
                        f"RAM section version {version} at {at:#x}; QEMU writes version 4",
                        path=self.path, offset=at)
                if ram_id is not None:
                    raise self._error(f"a second RAM START section at {at:#x}", at)
                if not postcopy_ok:
                    raise UnsupportedDumpError(
                        f"START section at {at:#x}: a postcopy stream with huge-page RAM "
                        "blocks (a page size per block), which this reader does not follow",
                        path=self.path, offset=at)
                ram_id = sid
                pos = self._ram(pos, at)
                pos = self._footer(pos, sid)
                continue
            if kind in (PART, END):
                sid = self._be32(pos, "a section header")
                pos += 4
                if sid != ram_id:
                    raise self._cannot_follow(at, kind, sid, names.get(sid, "(no START)"),
                                              "not the RAM section")
                if ram_done:
                    raise self._error(f"RAM section part at {at:#x} after RAM's END", at)
                pos = self._ram(pos, at)
                pos = self._footer(pos, sid)
                ram_done = kind == END
                continue
            if kind == EOF:
                if ram_done:
                    self.devices_offset = at
                    return
                raise self._error(f"the stream ends (EOF section at {at:#x}) before RAM is "
                                  "complete (no END section of the RAM)", at)
            raise self._error(
                f"section type {kind:#04x} at {at:#x} is not one QEMU writes here "
                f"({_SECTION_NAMES.get(kind, 'unknown')}); the stream cannot be followed", at)

    def _cannot_follow(self, at: int, kind: int, sid: int, name: str, why: str) -> Exception:
        return UnsupportedDumpError(
            f"{_SECTION_NAMES[kind]} section {sid} ({name!r}) at {at:#x}: {why}; its contents "
            "are not self-sizing, so the stream cannot be followed past it",
            path=self.path, offset=at)

    def _footer(self, pos: int, sid: int) -> int:
        if pos < self.file_size and self._u8(pos, "a section footer") == FOOTER:
            got = self._be32(pos + 1, "a section footer")
            if got != sid:
                raise self._error(f"section footer at {pos:#x} names section {got}, not {sid}",
                                  pos)
            self.sections["FOOTER"] = self.sections.get("FOOTER", 0) + 1
            return pos + 5
        return pos

    def _configuration(self, pos: int) -> int:
        n = self._be32(pos, "the CONFIGURATION section")
        if n > 256:
            raise self._error(f"machine type of {n} bytes at {pos:#x}", pos)
        self.machine = self._bytes(pos + 4, n, "the machine type").decode("utf-8", "replace")
        pos += 4 + n
        while pos < self.file_size and self._u8(pos, "a subsection") == SUBSECTION:
            at = pos
            name, pos = self._idstr(pos + 1, "a configuration subsection")
            pos += 4  # version
            if name == "configuration/target-page-bits":
                bits = self._be32(pos, name)
                if not 9 <= bits <= 16:
                    raise self._error(f"target page bits {bits} at {pos:#x}", pos)
                self.target_page_size = 1 << bits
                pos += 4
            elif name == "configuration/capabilities":
                count = self._be32(pos, name)
                if count > 64:
                    raise self._error(f"{count} capabilities at {pos:#x}", pos)
                pos += 4
                for _ in range(count):
                    cap, pos = self._idstr(pos, "a capability")
                    self.capabilities.append(cap)
            elif name == "configuration/uuid":
                self._need(pos, 16, name)
                pos += 16
            else:
                raise UnsupportedDumpError(
                    f"configuration subsection {name!r} at {at:#x} is not one this reader "
                    "knows; the stream cannot be followed past it", path=self.path, offset=at)
        if self.target_page_size != self.page_size:
            raise UnsupportedDumpError(
                f"this stream's pages are {size_text(self.target_page_size)}; read it with "
                f"--page-size {self.target_page_size}", path=self.path, offset=pos)
        self.mapped_ram = "mapped-ram" in self.capabilities
        return pos

    # -- RAM records ------------------------------------------------------------------------

    def _ram(self, pos: int, section: int) -> int:
        """Parse RAM records from ``pos`` to the EOS record; returns the offset after it."""
        tps = self.target_page_size
        if tps != self.page_size:
            raise UnsupportedDumpError(
                f"this stream's pages are {size_text(tps)}; read it with --page-size {tps}",
                path=self.path, offset=pos)
        block = self._last_block
        size = self.file_size
        while True:
            at = pos
            word = self._be64(pos, "a RAM record")
            flags, addr = word & FLAG_MASK, word & ~FLAG_MASK
            pos += 8
            if flags == F_EOS:
                self._last_block = block
                return pos
            if flags == F_MULTIFD_FLUSH:
                continue
            if flags == F_MEM_SIZE:
                pos = self._mem_size(pos, addr, at)
                continue
            kind = flags & ~F_CONTINUE
            if kind & F_HOOK:
                raise UnsupportedDumpError(
                    f"RAM record at {at:#x} is an RDMA hook, which a file cannot hold",
                    path=self.path, offset=at)
            if kind in (F_XBZRLE, F_COMPRESS_PAGE):
                what = "XBZRLE-encoded (a delta against the page's previous copy)" if (
                    kind == F_XBZRLE) else "zlib-compressed (the compress capability)"
                raise UnsupportedDumpError(
                    f"RAM record at {at:#x} holds a {what} page, which this reader does not "
                    "decode; save with that migration capability off", path=self.path,
                    offset=at)
            if kind not in (F_ZERO, F_PAGE):
                raise self._error(
                    f"RAM record at {at:#x} has the flags {flags:#x}, a combination QEMU does "
                    "not write", at)
            if flags & F_CONTINUE:
                if block is None:
                    raise self._error(f"RAM record at {at:#x} continues a block, but no block "
                                      "came before it", at)
            else:
                name, pos = self._idstr(pos, "a RAM block name")
                found = self.blocks.get(name)
                if found is None:
                    raise self._error(f"RAM record at {at:#x} names the block {name!r}, which "
                                      "the block list (MEM_SIZE) does not hold", at)
                block = found
            if self.mapped_ram:
                raise self._error(f"RAM record at {at:#x} in a mapped-ram stream, whose pages "
                                  "are at fixed offsets", at)
            if addr % tps or addr >= block.used_length:
                raise self._error(
                    f"RAM record at {at:#x}: offset {addr:#x} is not a page of block "
                    f"{block.name!r} ({size_text(block.used_length)})", at)
            page = addr // tps
            if kind == F_ZERO:
                block.where[page] = ZERO_FILL - self._u8(pos, "a ZERO record's fill byte")
                pos += 1
                stride = 9
            else:
                self._need(pos, tps, "a page")
                block.where[page] = pos
                pos += tps
                stride = 8 + tps
            self.ram_records += 1
            if compiled.native is not None:  # every CONTINUE record that follows, in C
                buf, i = self._at(pos, 0)  # a window ends inside a record: C stops there
                end, taken = compiled.qevm_ram_records(buf, i, tps, block.used_length,
                                                       block.where, pos - i)
                pos += end - i
                self.ram_records += taken
            elif flags & F_CONTINUE and pos + stride <= size:
                pos = self._run(pos, block, flags, stride)

    def _run(self, pos: int, block: RamBlock, flags: int, stride: int) -> int:
        """Index the run of records with ``flags`` at ``stride`` bytes from ``pos``, all at
        once; returns the offset of the first record that is not one of them."""
        tps = self.target_page_size
        want = np.uint64(flags)
        mask = np.uint64(FLAG_MASK)
        n = 16
        while True:
            buf, i = self._at(pos, 0)
            fit = (len(buf) - i) // stride  # in the window: the walk reads the record after
            k = min(n, fit)
            if k <= 0:
                return pos
            words = np.ndarray((k,), ">u8", buffer=buf, offset=i, strides=(stride,))
            ok = (words & mask) == want
            good = k if ok.all() else int(np.argmin(ok))
            if good:
                addrs = words[:good] & ~mask
                bad = (addrs % np.uint64(tps) != 0) | (addrs >= np.uint64(block.used_length))
                if bad.any():
                    first = int(np.argmax(bad))
                    at = pos + first * stride
                    raise self._error(
                        f"RAM record at {at:#x}: offset {int(addrs[first]):#x} is not a page "
                        f"of block {block.name!r} ({size_text(block.used_length)})", at)
                pages = (addrs // np.uint64(tps)).astype(np.int64)
                if flags & F_PAGE:
                    values = pos + 8 + np.arange(good, dtype=np.int64) * stride
                else:
                    fills = np.ndarray((good,), np.uint8, buffer=buf, offset=i + 8,
                                       strides=(stride,))
                    values = ZERO_FILL - fills.astype(np.int64)
                if good > 1 and not (np.diff(pages) > 0).all():  # a page twice: last wins
                    _, last = np.unique(pages[::-1], return_index=True)
                    keep = good - 1 - last
                    pages, values = pages[keep], values[keep]
                block.where[pages] = values
                self.ram_records += good
                pos += good * stride
            if good < k or k == fit:
                return pos
            n = min(n * 4, 1 << 20)

    def _mem_size(self, pos: int, total: int, at: int) -> int:
        """The block list: u8 len + name, be64 used_length, then per capability more."""
        if self.blocks:
            raise self._error(f"a second RAM block list (MEM_SIZE) at {at:#x}", at)
        tps = self.target_page_size
        ignore_shared = "x-ignore-shared" in self.capabilities
        remaining = total
        while remaining > 0:
            entry = pos
            name, pos = self._idstr(pos, "a RAM block's name")
            length = self._be64(pos, f"RAM block {name!r}'s length")
            pos += 8
            if length == 0 or length % tps or length > remaining:
                raise self._error(
                    f"RAM block {name!r} at {entry:#x} is {length:#x} bytes: not a whole number "
                    f"of pages, or more than the {remaining:#x} the block list has left", entry)
            if name in self.blocks:
                raise self._error(f"RAM block {name!r} listed twice, at {entry:#x}", entry)
            if problem := self._over_limit(len(self.blocks) + 1, "RAM blocks", 4096):
                raise self._error(problem, entry)
            npages = length // tps
            if problem := self._over_limit(npages, "pages in a RAM block", 1):
                raise self._error(f"RAM block {name!r}: {problem}", entry)
            if ignore_shared:
                self._need(pos, 8, "a RAM block's address")
                pos += 8
            block = RamBlock(name, length, entry, np.full(npages, ABSENT, np.int64))
            if self.mapped_ram:
                pos = self._mapped(pos, block)
            self.blocks[name] = block
            remaining -= length
        return pos

    def _mapped(self, pos: int, block: RamBlock) -> int:
        version, psize, bitmap, pages = MAPPED_RAM_HEADER.unpack(
            self._bytes(pos, MAPPED_RAM_HEADER.size, "a mapped-ram header"))
        if version != 1 or psize != self.target_page_size:
            raise UnsupportedDumpError(
                f"mapped-ram header at {pos:#x}: version {version}, page size {psize}; this "
                f"reader reads version 1 with {self.target_page_size}-byte pages",
                path=self.path, offset=pos)
        if bitmap == 0 and pages == 0:  # x-ignore-shared: not in the file
            block.ignored = True
            return pos + MAPPED_RAM_HEADER.size
        npages = len(block.where)
        nbytes = (npages + 63) // 64 * 8
        self._need(bitmap, nbytes, f"RAM block {block.name!r}'s bitmap")
        buf, i = self._at(bitmap, nbytes)
        bits = np.unpackbits(np.frombuffer(buf, np.uint8, nbytes, i),
                             bitorder="little")[:npages].astype(bool)
        present = np.flatnonzero(bits)
        # The stream goes on after the block's pages, so all of them lie in the file (holes
        # unwritten): checked whether or not the bitmap names a page.
        self._need(pages, block.used_length, f"RAM block {block.name!r}'s pages")
        block.where[:] = ZERO_FILL
        block.where[present] = pages + present.astype(np.int64) * self.target_page_size
        block.mapped = (bitmap, pages)
        return int(pages + block.used_length)  # QEMU goes on writing the stream there

    # -- addresses and extents --------------------------------------------------------------

    def _place(self) -> None:
        ps = self.target_page_size
        ram = self.blocks.get("pc.ram")
        top = 0
        if ram is not None:
            below = self._split(ram.used_length)
            if below is not None:
                ram.synthetic = False
                n_below = below // ps
                ram.segments = [(0, min(n_below, len(ram.where)), 0)]
                if len(ram.where) > n_below:
                    ram.segments.append((n_below, len(ram.where) - n_below, FOUR_GIB))
                top = ram.segments[-1][2] + ram.segments[-1][1] * ps
        base = max(SYNTHETIC_BASE, -(-top // GiB) * GiB)
        for b in self.blocks.values():
            if b.segments:
                continue
            b.segments = [(0, len(b.where), base)]
            base += -(-b.used_length // GiB) * GiB

    def _split(self, ram_size: int) -> int | None:
        """Bytes of pc.ram below 4 GiB for this machine type (hw/i386/pc_q35.c, pc_piix.c),
        or None (warned) where the machine type does not say."""
        m = self.machine or ""
        if "q35" in m:
            self.below_4g = 2 * GiB if ram_size >= 0xB0000000 else ram_size
            self.split_note = ("q35: 2 GiB below 4 GiB when RAM >= 2.75 GiB, else all; "
                               "max-ram-below-4g, if given on QEMU's command line, is not in "
                               "the stream and would change it")
        elif m == "pc" or m.startswith("pc-i440fx") or re.fullmatch(r"pc-[0-9.]+", m):
            self.below_4g = 3 * GiB if ram_size >= 0xE0000000 else ram_size
            self.split_note = ("i440fx: 3 GiB below 4 GiB when RAM >= 3.5 GiB, else all; "
                               "max-ram-below-4g, if given on QEMU's command line, is not in "
                               "the stream and would change it")
        else:
            self.split_note = (f"machine type {m or '(none recorded)'!r}: its RAM layout is "
                               "not known here, so pc.ram has synthetic addresses")
            self.warnings.append(f"{self.path}: {self.split_note}")
            return None
        if ram_size > self.below_4g and ram_size - self.below_4g > (1 << 40) - FOUR_GIB:
            self.split_note += ("; with RAM reaching 1 TiB, AMD hosts may move RAM above "
                                "4 GiB to 1 TiB (not modelled)")
        return self.below_4g

    def _extents(self) -> list[Extent]:
        self._place()
        ps = self.page_size
        out: list[Extent] = []
        for b in self.blocks.values():
            if b.ignored:
                for _first, n, addr in b.segments:
                    out.append(Extent(addr, n, PageState.NOT_SAVED, -1,
                                      f"{_block_label(b)} (x-ignore-shared)"))
                continue
            state = np.where(b.where >= 0, 0, np.where(b.where == ABSENT, 2, 1)).astype(np.int8)
            state[b.where < ZERO_FILL] = 0  # a non-zero fill byte: a page of that byte
            label = _block_label(b)
            kinds = (PageState.DATA, PageState.ZERO, PageState.NOT_SAVED)
            for first, n, addr in b.segments:
                s = state[first : first + n]
                cuts = np.flatnonzero(np.diff(s)) + 1
                starts = np.concatenate(([0], cuts))
                lengths = np.diff(np.concatenate((starts, [n]))).tolist()
                codes = s[starts].tolist()
                offs = (b.where[first + starts] if b.mapped is not None
                        else np.full(len(starts), -1, np.int64)).tolist()
                for a, length, code, off in zip(starts.tolist(), lengths, codes, offs,
                                                strict=True):
                    out.append(Extent(addr + a * ps, length, kinds[code],
                                      off if code == 0 else -1, label))
        return out

    # -- pages ------------------------------------------------------------------------------

    @property
    def in_place(self) -> bool:
        """mapped-ram pages lie raw at fixed offsets; a stream's pages lie raw too, each behind
        its 8-byte record header, so runs of them are read in place as views with a pitch of
        a page and 8 bytes (the kernels take such rows). Not where a page is a non-zero fill
        byte (no bytes in the file) or the pages lie in too many short runs (a running guest's
        resends, scattered): those are copied into contiguous batches."""
        return self.source is None and (self.mapped_ram or self._raw_runs() is not None)

    def _raw_runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(first address, pages, file offset) of each run of stored pages at consecutive
        addresses in consecutive records (``page_size + 8`` bytes apart), in address order; or
        None (see :attr:`in_place`). Computed once."""
        if hasattr(self, "_runs"):
            return self._runs
        self._runs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        ps, pitch = self.page_size, self.page_size + 8
        addrs, counts, offsets = [], [], []
        stored = nruns = 0
        for b in self.blocks.values():
            for first, n, addr in b.segments:
                w = b.where[first : first + n]
                if (w < ZERO_FILL).any():  # a page of one non-zero byte: not in the file
                    return None
                idx = np.flatnonzero(w >= 0)
                if not len(idx):
                    continue
                at = w[idx]
                cuts = np.flatnonzero((np.diff(idx) != 1) | (np.diff(at) != pitch)) + 1
                starts = np.concatenate(([0], cuts))
                addrs.append(np.uint64(addr) + idx[starts].astype(np.uint64) * np.uint64(ps))
                counts.append(np.diff(np.concatenate((starts, [len(idx)]))))
                offsets.append(at[starts])
                stored += len(idx)
                nruns += len(starts)
        if nruns > max(64, stored // RUN_PAGES_MIN):
            return None
        if not nruns:
            empty = np.empty(0, np.int64)
            self._runs = (empty.astype(np.uint64), empty, empty)
            return self._runs
        a = np.concatenate(addrs)
        order = np.argsort(a, kind="stable")
        self._runs = (a[order], np.concatenate(counts)[order], np.concatenate(offsets)[order])
        return self._runs

    def _stored_views(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """The runs of :meth:`_raw_runs` as ``(pages, page_size)`` views of the map with a
        pitch of ``page_size + 8`` (mapped-ram: the base class's contiguous views)."""
        runs = None if self.mapped_ram else self._raw_runs()
        if runs is None:
            return super()._stored_views()
        if self._views is None:
            ps = self.page_size
            starts, counts, offsets = runs
            views = [np.ndarray((n, ps), np.uint8, buffer=self._mm, offset=off,
                                strides=(ps + 8, 1))
                     for n, off in zip(counts.tolist(), offsets.tolist(), strict=True)]
            self._views = (starts, starts + counts.astype(np.uint64) * np.uint64(ps), views)
        return self._views

    def _stream_pages(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(addresses, where) of every DATA page, block by block, in page order."""
        ps = self.page_size
        for b in self.blocks.values():
            for first, n, addr in b.segments:
                w = b.where[first : first + n]
                idx = np.flatnonzero((w >= 0) | (w < ZERO_FILL))
                yield np.uint64(addr) + idx.astype(np.uint64) * np.uint64(ps), w[idx]

    def _gather(self, where: np.ndarray) -> np.ndarray:
        """Copy the pages ``where`` names (file offsets, or fill bytes) into a C-contiguous
        ``(n, page_size)`` array: runs at a constant stride as one strided copy each."""
        ps = self.page_size
        n = len(where)
        out = np.empty((n, ps), np.uint8)
        if not n:
            return out
        if self.source is not None:
            self._gather_source(where, out)
            return out
        cuts = np.flatnonzero(np.diff(where) != np.int64(ps + 8)) + 1
        starts = np.concatenate(([0], cuts)).tolist()
        ends = np.concatenate((cuts, [n])).tolist()
        for a, e in zip(starts, ends, strict=True):
            w0 = int(where[a])
            if w0 < 0:  # fill pages: each its own run unless strided by chance
                for i in range(a, e):
                    out[i] = ZERO_FILL - int(where[i])
                continue
            if e - a == 1:
                out[a] = np.frombuffer(self._mm, np.uint8, ps, w0)
            else:
                out[a:e] = np.ndarray((e - a, ps), np.uint8, buffer=self._mm, offset=w0,
                                      strides=(ps + 8, 1))
        return out

    def _gather_source(self, where: np.ndarray, out: np.ndarray) -> None:
        """:meth:`_gather` from a decompressed stream: the pages in stream order (forward
        reads, so the decoder never restarts within a call), runs of consecutive records
        read at once (at most DEFAULT_BATCH_PAGES records a read), each page put in its row."""
        ps, pitch, src = self.page_size, self.page_size + 8, self.source
        assert src is not None
        order = np.argsort(where, kind="stable")
        ordered = where[order]
        cuts = np.flatnonzero(np.diff(ordered) != np.int64(pitch)) + 1
        starts = np.concatenate(([0], cuts)).tolist()
        ends = np.concatenate((cuts, [len(where)])).tolist()
        for a, e in zip(starts, ends, strict=True):
            if ordered[a] < 0:  # fill pages (sorted first): no bytes in the stream
                for i in range(a, e):
                    out[order[i]] = ZERO_FILL - int(ordered[i])
                continue
            for lo in range(a, e, DEFAULT_BATCH_PAGES):
                k = min(DEFAULT_BATCH_PAGES, e - lo)
                at, span = int(ordered[lo]), (k - 1) * pitch + ps
                data = src.read_at(at, span)
                if len(data) < span:
                    raise TruncatedDumpError(
                        f"the decompressed stream ends at {src.size:#x}, inside pages it "
                        "should hold (a decompressed offset)", path=self.path, offset=at)
                out[order[lo : lo + k]] = np.ndarray((k, ps), np.uint8, buffer=data,
                                                     strides=(pitch, 1))

    def iter_batches(
        self, batch_pages: int = DEFAULT_BATCH_PAGES, *, shard: int = 0, shards: int = 1
    ) -> Iterator[PageBatch]:
        """Every DATA page, block by block, copied into contiguous batches (mapped-ram: read
        in place from the map; a decompressed stream: in stream order)."""
        if self.mapped_ram:
            yield from super().iter_batches(batch_pages, shard=shard, shards=shards)
            return
        if self.source is not None:  # forward through the stream: one decoding pass
            pairs = list(self._stream_pages())
            addrs = np.concatenate([a for a, _ in pairs]) if pairs else np.empty(0, np.uint64)
            where = np.concatenate([w for _, w in pairs]) if pairs else np.empty(0, np.int64)
            order = np.argsort(where, kind="stable")
            addrs, where = addrs[order], where[order]
            for batch, p0 in enumerate(range(0, len(addrs), batch_pages)):
                if batch % shards == shard:
                    yield PageBatch(addrs[p0 : p0 + batch_pages],
                                    self._gather(where[p0 : p0 + batch_pages]))
            return
        if self.in_place:  # views of the map, run by run in file order
            starts, _, views = self._stored_views()
            offsets = self._runs[2] if self._runs is not None else np.empty(0, np.int64)
            ps = np.uint64(self.page_size)
            batch = -1
            for k in np.argsort(offsets, kind="stable").tolist():
                view = views[k]
                for p0 in range(0, len(view), batch_pages):
                    batch += 1
                    if batch % shards != shard:
                        continue
                    n = min(batch_pages, len(view) - p0)
                    addrs = starts[k] + (np.uint64(p0) + np.arange(n, dtype=np.uint64)) * ps
                    yield PageBatch(addrs, view[p0 : p0 + n])
            return
        batch = -1
        for addrs, where in self._stream_pages():
            for p0 in range(0, len(addrs), batch_pages):
                batch += 1
                if batch % shards != shard:
                    continue
                yield PageBatch(addrs[p0 : p0 + batch_pages],
                                self._gather(where[p0 : p0 + batch_pages]))

    def _index(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        if not hasattr(self, "_by_addr"):
            starts, ends, wheres = [], [], []
            for b in self.blocks.values():
                for first, n, addr in b.segments:
                    starts.append(addr)
                    ends.append(addr + n * self.page_size)
                    wheres.append(b.where[first : first + n])
            order = np.argsort(np.array(starts, np.uint64), kind="stable")
            self._by_addr = (np.array(starts, np.uint64)[order],
                             np.array(ends, np.uint64)[order],
                             [wheres[i] for i in order.tolist()])
        return self._by_addr

    def read_pages(self, addrs: np.ndarray) -> np.ndarray:
        """The stored pages at ``addrs`` (ValueError for an address that is not one)."""
        if self.mapped_ram:
            return super().read_pages(addrs)
        want = np.asarray(addrs, dtype=np.uint64)
        starts, ends, wheres = self._index()
        which, rel = self._locate(want, starts, ends)
        where = np.empty(len(want), np.int64)
        for k in np.unique(which).tolist():
            mine = np.flatnonzero(which == k)
            where[mine] = wheres[k][rel[mine]]
        bad = (where < 0) & (where >= ZERO_FILL)
        if bad.any():
            addr = int(want[np.flatnonzero(bad)[0]])
            raise ValueError(f"address {addr:#x} is not a stored page of {self.path}")
        return self._gather(where)

    # -- facts ------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Stream facts: version, machine type, capabilities, every RAM block with its pages
        and addresses, the libvirt header (never the XML beyond the domain's name)."""
        ps = self.page_size
        blocks: list[dict[str, Any]] = []
        for b in self.blocks.values():
            w = b.where
            zero = int(np.count_nonzero(w == ZERO_FILL))
            absent = int(np.count_nonzero(w == ABSENT))
            blocks.append({
                "block": b.name,
                "size": size_text(b.used_length),
                "pages": len(w),
                "data_pages": len(w) - zero - absent,
                "zero_pages": zero,
                "not_saved_pages": absent,
                "addresses": [[f"{addr:#x}", f"{addr + n * ps:#x}"] for _, n, addr in b.segments],
                "address_kind": "synthetic" if b.synthetic else "guest-physical",
            })
        facts: dict[str, Any] = {
            "stream_version": 3,
            "stream_offset": self.stream_offset,
            "machine_type": self.machine,
            "target_page_size": self.target_page_size,
            "capabilities": self.capabilities,
            "mapped_ram": self.mapped_ram,
            "ram_records": self.ram_records,
            "sections": self.sections,
            "device_sections_offset": self.devices_offset,
            "below_4g": size_text(self.below_4g) if self.below_4g is not None else None,
            "address_split": self.split_note,
            "blocks": blocks,
        }
        for row in blocks:  # one line each in the text output (which shows no lists)
            spans = ", ".join(f"{lo}-{hi}" for lo, hi in row["addresses"])
            facts[f"block {row['block']}"] = (
                f"{row['size']}: {row['data_pages']:,} data, {row['zero_pages']:,} zero, "
                f"{row['not_saved_pages']:,} not saved pages at {spans} "
                f"({row['address_kind']})")
        if self.libvirt is not None:
            for key, value in self.libvirt.items():
                facts[f"libvirt_{key}"] = value
        return facts

    def close(self) -> None:
        """Drop the page index, then release the file."""
        self.__dict__.pop("_by_addr", None)
        self.__dict__.pop("_runs", None)
        super().close()
