"""Write kdump-compressed dumps the way QEMU ``dump-guest-memory -z`` and makedumpfile do.

Layout from QEMU ``dump/dump.c`` (``create_kdump_vmcore``) and makedumpfile ``IMPLEMENTATION``:
header block, one sub-header block, bitmap 1 and bitmap 2, the page descriptors, then the page
data, starting with the shared zero page when ``zero_page_descriptor`` is set. Pages are
compressed only when that makes them smaller, as both producers do.

The flattened form writes the same logical file as ``{be64 offset; be64 size}`` records after a
4096-byte header, shuffled, with decoy records that later records overwrite.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from dataclasses import dataclass, field

import cramjam
import lzallright
import numpy as np
import zstandard

__all__ = ["KdumpLayout", "make_kdump", "write_flattened"]

CODECS = {"none": 0, "zlib": 0x1, "lzo": 0x2, "snappy": 0x4, "zstd": 0x20}
_HEADER_FMT = {64: "8si390s6xqqIiiIIIIIIi", 32: "8si390s2xiiIiiIIIIIIi"}
_SUB_FMT = {64: "QiiQQQQQQQQQQQ", 32: "IiiIIQIQIQIQQQ"}  # 32-bit: the IA-32 packing
_UTS = (b"Linux", b"testhost", b"6.1.0-test", b"#1 SMP", b"x86_64", b"(none)")
FLAT_CHUNK = 16384
"""QEMU flushes its descriptor and data caches in 4-page (16 KiB) writes: one record each."""


@dataclass
class KdumpLayout:
    """Where ``make_kdump`` put things, in logical (reassembled) file offsets."""

    block_size: int
    bitmap1: int
    bitmap2: int
    desc_start: int
    data_start: int
    descriptors: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    """PFN -> (offset, size, flags) of its page data."""
    records: list[tuple[int, bytes]] = field(default_factory=list)
    """The flattened records in file order (empty for the plain form)."""
    size: int = 0
    """Size of the logical file."""


def _compress(codec: str, page: bytes) -> bytes:
    if codec == "zlib":
        return zlib.compress(page, 1)  # QEMU: compress2(..., Z_BEST_SPEED)
    if codec == "lzo":
        return lzallright.LZOCompressor().compress(page)
    if codec == "snappy":
        return bytes(cramjam.snappy.compress_raw(page))
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(page)
    return page


def make_kdump(
    path: str | os.PathLike[str],
    pages: dict[int, bytes],
    *,
    max_mapnr: int,
    block_size: int = 4096,
    compression: str = "zlib",
    flattened: bool = False,
    excluded_pfns: tuple[int, ...] | list[int] | set[int] = (),
    dump_level: int = 0,
    endian: str = "<",
    header_version: int = 6,
    zero_page_descriptor: bool = True,
    layout: int = 64,
    end_marker: bool = True,
    split: tuple[int, int] | None = None,
    seed: int = 0,
) -> KdumpLayout:
    """Write a kdump file holding ``pages`` (PFN -> ``block_size`` bytes); return its layout.

    ``excluded_pfns`` are present (bitmap 1) but not dumped (bitmap 2). ``layout`` is the header
    word size, 64 or 32. ``split=(start_pfn, end_pfn)`` writes one part of a makedumpfile
    ``--split`` dump: full bitmaps, but descriptors and data for that PFN range only.
    """
    bs, e = block_size, endian
    flag = CODECS[compression]
    excluded = set(excluded_pfns) - set(pages)
    for pfn, page in pages.items():
        assert 0 <= pfn < max_mapnr and len(page) == bs, (pfn, len(page))
    writes: list[tuple[int, bytes]] = []

    sub_hdr_size = 1
    bitmap_bytes = (max_mapnr + 7) // 8
    bitmap_len = max(1, (bitmap_bytes + bs - 1) // bs) * bs  # one bitmap, whole blocks
    bitmap_blocks = 2 * bitmap_len // bs
    uts = b"".join(f.ljust(65, b"\0") for f in _UTS)
    if layout == 32:
        uts = uts.replace(b"x86_64".ljust(65, b"\0"), b"i686".ljust(65, b"\0"))
    head = struct.pack(
        e + _HEADER_FMT[layout],
        b"KDUMP   ",
        header_version,
        uts,
        1700000000,
        0,
        flag,
        bs,
        sub_hdr_size,
        bitmap_blocks,
        min(max_mapnr, 0xFFFFFFFF),
        0,
        0,
        0,
        0,
        1,
    )
    writes.append((0, head))
    v6 = header_version >= 6
    sub = struct.pack(
        e + _SUB_FMT[layout],
        0x1000000 if layout == 64 else 0,  # phys_base
        dump_level,
        split is not None,
        *(split or (0, 0)),
        *(0,) * 6,  # vmcoreinfo, note, eraseinfo: none
        *(split or (0, max_mapnr if v6 else 0)),
        max_mapnr if v6 else 0,
    )
    writes.append((bs, sub))

    b1 = np.zeros(bitmap_len * 8, bool)
    b2 = np.zeros(bitmap_len * 8, bool)
    dumpable = sorted(pages)
    b1[dumpable] = True
    b1[sorted(excluded)] = True
    b2[dumpable] = True
    bitmap1 = bs * (1 + sub_hdr_size)
    bitmap2 = bitmap1 + bitmap_len
    for at, bits in ((bitmap1, b1), (bitmap2, b2)):
        packed = np.packbits(bits, bitorder="little").tobytes()
        writes.extend((at + i, packed[i : i + bs]) for i in range(0, len(packed), bs))

    if split is not None:
        dumpable = [pfn for pfn in dumpable if split[0] <= pfn < split[1]]
    desc_start = bs * (1 + sub_hdr_size + bitmap_blocks)
    data_start = desc_start + 24 * len(dumpable)
    descs, data = bytearray(), bytearray()
    out = KdumpLayout(bs, bitmap1, bitmap2, desc_start, data_start)
    zero = bytes(bs)
    if zero_page_descriptor:
        data += zero
    for pfn in dumpable:
        page = pages[pfn]
        if zero_page_descriptor and page == zero:
            d = (data_start, bs, 0)
        else:
            packed = _compress(compression, page)
            if len(packed) < bs:
                d = (data_start + len(data), len(packed), flag)
            else:
                packed, d = page, (data_start + len(data), bs, 0)
            data += packed
        descs += struct.pack(e + "qIIQ", *d, 0)
        out.descriptors[pfn] = d
    for area, at in ((descs, desc_start), (data, data_start)):
        writes.extend(
            (at + i, bytes(area[i : i + FLAT_CHUNK])) for i in range(0, len(area), FLAT_CHUNK)
        )
    out.size = max(at + len(b) for at, b in writes)

    if not flattened:
        image = bytearray(out.size)
        for at, b in writes:
            image[at : at + len(b)] = b
        with open(path, "wb") as f:
            f.write(image)
        return out

    rng = random.Random(seed)
    rng.shuffle(writes)
    # Decoys that later records overwrite: one over the header, one straddling two data records.
    decoys = [(0, b"\xee" * 64)]
    if len(data) > FLAT_CHUNK:
        decoys.append((data_start + FLAT_CHUNK - 100, b"\xdd" * 200))
    out.records = decoys + writes
    write_flattened(path, out.records, end_marker=end_marker)
    return out


def write_flattened(
    path: str | os.PathLike[str], records: list[tuple[int, bytes]], *, end_marker: bool = True
) -> None:
    """Write makedumpfile flattened records (logical offset, bytes) after the 4 KiB header."""
    with open(path, "wb") as f:
        f.write(struct.pack(">16sqq", b"makedumpfile", 1, 1).ljust(4096, b"\0"))
        for at, b in records:
            f.write(struct.pack(">qq", at, len(b)))
            f.write(b)
        if end_marker:
            f.write(struct.pack(">qq", -1, -1))
