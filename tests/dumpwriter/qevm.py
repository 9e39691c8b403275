"""Write QEMU migration streams from the published layout (QEMU migration/savevm.c and
migration/ram.c, docs/devel/migration/mapped-ram.rst; libvirt src/qemu/qemu_saveimage.h).

:class:`Stream` records each structure's offset (``marks``) so tests can cut the stream at
every structural boundary and the fuzzer can mutate fields by name.
"""

from __future__ import annotations

import struct

PS = 4096
ZERO, MEM_SIZE, PAGE, EOS, CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
XBZRLE, HOOK, COMPRESS_PAGE, MULTIFD_FLUSH = 0x40, 0x80, 0x100, 0x200
EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIG, COMMAND, FOOTER = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7E)


class Stream:
    """A QEVM stream built record by record."""

    def __init__(self, machine: str = "pc-i440fx-7.2", caps: tuple[str, ...] = (),
                 footers: bool = True, start: int = 0) -> None:
        self.buf = bytearray(b"QEVM\x00\x00\x00\x03")
        self.start = start
        """File offset of the stream (a libvirt header goes before it)."""
        self.marks: list[tuple[str, int]] = [("header", 0)]
        self.footers = footers
        self.last: str | None = None
        self.mark("configuration")
        self.buf += bytes([CONFIG]) + struct.pack(">I", len(machine)) + machine.encode()
        if caps:
            self.mark("capabilities")
            name = b"configuration/capabilities"
            self.buf += bytes([SUBSECTION, len(name)]) + name + struct.pack(">II", 1, len(caps))
            for c in caps:
                self.buf += bytes([len(c)]) + c.encode()

    def mark(self, what: str) -> None:
        self.marks.append((what, len(self.buf)))

    @property
    def pos(self) -> int:
        return self.start + len(self.buf)

    def section(self, kind: int, sid: int, name: str = "ram", version: int = 4) -> None:
        self.mark(f"section {kind} {sid}")
        self.buf += bytes([kind]) + struct.pack(">I", sid)
        if kind in (START, FULL):
            self.buf += bytes([len(name)]) + name.encode() + struct.pack(">II", 0, version)

    def footer(self, sid: int) -> None:
        if self.footers:
            self.mark("footer")
            self.buf += bytes([FOOTER]) + struct.pack(">I", sid)

    def mem_size(self, blocks: list[tuple[str, int]], extra: int = 0) -> None:
        """The block list; ``extra`` bytes of per-block fields (x-ignore-shared's address)."""
        self.mark("mem_size")
        self.buf += struct.pack(">Q", sum(n for _, n in blocks) | MEM_SIZE)
        for name, n in blocks:
            self.buf += bytes([len(name)]) + name.encode() + struct.pack(">Q", n)
            self.buf += bytes(extra)

    def record(self, block: str, offset: int, flags: int, payload: bytes = b"") -> int:
        """One page record; CONTINUE is added when ``block`` is the previous record's.
        Returns the file offset of the payload."""
        self.mark("record")
        same = block == self.last
        self.buf += struct.pack(">Q", offset | flags | (CONTINUE if same else 0))
        if not same:
            self.buf += bytes([len(block)]) + block.encode()
            self.last = block
        at = self.pos
        self.buf += payload
        return at

    def page(self, block: str, offset: int, data: bytes) -> int:
        assert len(data) == PS
        return self.record(block, offset, PAGE, data)

    def zero(self, block: str, offset: int, fill: int = 0) -> int:
        return self.record(block, offset, ZERO, bytes([fill]))

    def flag(self, flags: int) -> None:
        self.mark("record")
        self.buf += struct.pack(">Q", flags)

    def ram_part(self, blocks: list[tuple[str, int]]) -> None:
        """The RAM section's START (the block list), then a PART to write pages into, as
        QEMU's setup and first iteration write them (section id 2)."""
        self.section(START, 2)
        self.mem_size(blocks)
        self.flag(EOS)
        self.footer(2)
        self.section(PART, 2)

    def device(self, sid: int, name: str, payload: bytes) -> None:
        self.section(FULL, sid, name, 1)
        self.buf += payload
        self.footer(sid)

    def end(self, json: bytes = b'{"page_size":4096,"devices":[]}') -> bytes:
        self.mark("eof")
        self.buf += bytes([EOF, VMDESC]) + struct.pack(">I", len(json)) + json
        self.mark("end")
        return bytes(self.buf)


def simple(pages: dict[tuple[str, int], bytes | int], blocks: list[tuple[str, int]],
           machine: str = "pc-i440fx-7.2", marks: list[tuple[str, int]] | None = None) -> bytes:
    """A stream: START (block list), one PART with the pages (bytes, or an int fill byte for a
    ZERO record), END, one device section, EOF. ``marks`` receives (structure, offset)."""
    s = Stream(machine)
    s.ram_part(blocks)
    for (block, off), v in pages.items():
        if isinstance(v, int):
            s.zero(block, off, v)
        else:
            s.page(block, off, v)
    s.flag(EOS)
    s.footer(2)
    s.section(END, 2)
    s.flag(EOS)
    s.footer(2)
    s.device(3, "timer", bytes(range(40)))
    data = s.end()
    if marks is not None:
        marks += s.marks
    return data


def libvirt_header(xml: bytes, fmt: int = 0, was_running: int = 1, magic: bytes =
                   b"LibvirtQemudSave", pad: int = 4096) -> bytes:
    """libvirt's 92-byte save header (version 2, little-endian), the XML (NUL-terminated)
    and zero padding; the stream follows at 92 + data_len."""
    body = xml + b"\0" + bytes(pad)
    return magic + struct.pack("<5I", 2, len(body), was_running, fmt, 0) + bytes(56) + body


def mapped_ram(blocks: list[tuple[str, int, dict[int, bytes]]], start: int = 0) -> bytes:
    """A mapped-ram stream (QEMU >= 9.0, ram.c mapped_ram_setup_ramblock): per block after
    its name and length a MappedRamHeader (be32 version 1, be64 page size, bitmap offset,
    pages offset), the bitmap (unsigned longs, LSB first) right after it, the pages at the
    next 1 MiB boundary; the stream continues after the block's pages. ``blocks``: (name,
    length, {page index: data}). Offsets are absolute file offsets (``start`` = where the
    stream begins in the file)."""
    s = Stream(caps=("mapped-ram",), start=start)
    s.section(START, 2)
    s.mark("mem_size")
    s.buf += struct.pack(">Q", sum(n for _, n, _ in blocks) | MEM_SIZE)
    for name, n, pages in blocks:
        s.buf += bytes([len(name)]) + name.encode() + struct.pack(">Q", n)
        npages = n // PS
        bitmap_size = (npages + 63) // 64 * 8
        bitmap_off = s.pos + 28
        pages_off = -(-(bitmap_off + bitmap_size) // (1 << 20)) * (1 << 20)
        s.mark("mapped_ram_header")
        s.buf += struct.pack(">IQQQ", 1, PS, bitmap_off, pages_off)
        bits = bytearray(bitmap_size)
        for i in pages:
            bits[i // 8] |= 1 << (i % 8)
        s.buf += bits
        s.buf += bytes(pages_off - s.pos)
        region = bytearray(n)
        for i, data in pages.items():
            region[i * PS : (i + 1) * PS] = data
        s.buf += region
    s.flag(EOS)
    s.footer(2)
    s.section(END, 2)
    s.flag(EOS)
    s.footer(2)
    return s.end()
