"""Small files that claim or describe far more than they hold, one builder per class.

Each builder writes a file whose size it is told (or a few MiB) and which would cost a naive
reader time or memory out of proportion to that size: ranges two bits apart in a kdump bitmap,
records of one byte, floods of headers or notes, sizes near 2^60, pages that decompress to
more than a page. ``tests/test_resource_bounds.py`` opens each under a time and memory bound;
fuzzers may start from them too.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cramjam
import lzallright
import numpy as np
import zstandard

from ksm_analyze.formats.snapshot import RUN, RunFlags, SnapshotWriter

from .elf import Seg, make_elf_core
from .kdump import CODECS, make_kdump, write_flattened
from .lime import lime_header

__all__ = [
    "BOMB_CODECS", "avml_bomb", "avml_tiny_chunks", "elf_huge_memsz", "elf_many_notes",
    "elf_many_segments", "elf_nt_file_flood", "flattened_overlapping", "flattened_tiny_records",
    "kdump_alternating", "kdump_bitmap_past_eof", "kdump_bomb", "kdump_zero_runs",
    "lime_tiny_ranges", "snapshot",
]

PAGE = 4096
AVML_MAGIC = 0x4C4D5641
STREAM_ID = b"\xff\x06\x00\x00sNaPpY"
BOMB_CODECS = ("zlib", "lzo", "snappy", "zstd")


def kdump_alternating(path: str | os.PathLike[str], nbytes: int, pattern: int = 0x55) -> None:
    """Bitmap 1 repeats the byte ``pattern`` (0x55: present and hole page by page), bitmap 2 is
    empty: ``nbytes`` of bitmaps describe up to ``2 * nbytes`` runs of excluded pages."""
    mapnr = nbytes // 2 * 8
    lay = make_kdump(path, {}, max_mapnr=mapnr)
    with open(path, "r+b") as f:
        f.seek(lay.bitmap1)
        f.write(bytes([pattern]) * (mapnr // 8))


def kdump_zero_runs(path: str | os.PathLike[str], npfns: int) -> None:
    """Every other PFN dumped as the shared zero page, the others excluded: the cheapest runs
    a kdump can hold that count (a 24-byte descriptor per two runs)."""
    make_kdump(path, dict.fromkeys(range(0, npfns, 2), bytes(PAGE)), max_mapnr=npfns,
               excluded_pfns=range(1, npfns, 2))


def kdump_bitmap_past_eof(path: str | os.PathLike[str], *, flattened: bool = False) -> None:
    """A 20 KiB kdump whose header claims 2^31 - 2 bitmap blocks (8 TiB of bitmap)."""
    make_kdump(path, {}, max_mapnr=8, flattened=flattened)
    data = bytearray(Path(path).read_bytes())
    # bitmap_blocks (64-bit layout), in the file or in the flattened record of the header
    at = 436 if not flattened else data.index(b"KDUMP   ") + 436
    struct.pack_into("<I", data, at, (1 << 31) - 2)
    Path(path).write_bytes(data)


def _bomb_payload(codec: str, size: int) -> bytes:
    """A stream of ``size`` zero bytes in ``codec``: far more than the page it stands for."""
    data = bytes(size)
    if codec == "zlib":
        return zlib.compress(data, 9)
    if codec == "lzo":
        return bytes(lzallright.LZOCompressor().compress(data))
    if codec == "snappy":
        return bytes(cramjam.snappy.compress_raw(data))
    return zstandard.ZstdCompressor(level=19).compress(data)


def kdump_bomb(path: str | os.PathLike[str], codec: str, size: int = 64 << 20) -> None:
    """A kdump of one page whose compressed data, smaller than the page, inflates to ``size``."""
    page = bytes(range(256)) * (PAGE // 256)
    lay = make_kdump(path, {1: page}, max_mapnr=8, compression="none")
    payload = _bomb_payload(codec, size)
    if len(payload) >= PAGE:  # zlib and snappy cannot pack 64 MiB into a page: keep what fits
        payload = _bomb_payload(codec, size * (PAGE - 64) // len(payload))
    offset = lay.descriptors[1][0]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(payload)
        f.seek(lay.desc_start)
        f.write(struct.pack("<qII", offset, len(payload), CODECS[codec]))


def flattened_tiny_records(path: str | os.PathLike[str], nrecords: int) -> None:
    """A flattened kdump whose bitmaps and descriptors come one byte per record."""
    lay = make_kdump(path, {0: b"\x01" * PAGE}, max_mapnr=nrecords * 4, compression="none")
    image = Path(path).read_bytes()
    head = [(0, image[: lay.bitmap1])]
    tiny = [(at, image[at : at + 1]) for at in range(lay.bitmap1, lay.data_start)]
    write_flattened(path, [*head, *tiny, (lay.data_start, image[lay.data_start :])])


def flattened_overlapping(path: str | os.PathLike[str], nrecords: int) -> None:
    """A flattened kdump that first writes ``nrecords`` staggered overlapping records (5 bytes
    every 3), then the dump over them: every record overlaps its neighbours."""
    make_kdump(path, {0: b"\x01" * PAGE}, max_mapnr=8, compression="none")
    image = Path(path).read_bytes()
    write_flattened(path, [*((3 * i, b"\xee" * 5) for i in range(nrecords)), (0, image)])


def lime_tiny_ranges(path: str | os.PathLike[str], nrecords: int, size: int = 1) -> None:
    """``nrecords`` LiME records of ``size`` bytes each, a page apart."""
    with open(path, "wb") as f:
        f.writelines(lime_header(PAGE * i, size) + b"\x01" * size for i in range(nrecords))


def avml_tiny_chunks(path: str | os.PathLike[str], nchunks: int) -> None:
    """One AVML record of ``nchunks`` bytes, one uncompressed Snappy chunk per byte (a CRC of
    0: chunks are indexed at open and checked only when decoded)."""
    stream = STREAM_ID + b"\x01\x05\x00\x00\x00\x00\x00\x00\x07" * nchunks
    header = lime_header(0, nchunks, magic=AVML_MAGIC, version=2)
    Path(path).write_bytes(header + stream + struct.pack("<Q", len(stream)))


def avml_bomb(path: str | os.PathLike[str], size: int = 1 << 20) -> None:
    """An AVML record of one page whose Snappy chunk inflates to ``size`` bytes."""
    body = bytes(cramjam.snappy.compress_raw(bytes(size)))
    # A compressed chunk: type 0 and length, a CRC (never reached), the raw Snappy block.
    stream = STREAM_ID + struct.pack("<I", (len(body) + 4) << 8) + bytes(4) + body
    header = lime_header(0, PAGE, magic=AVML_MAGIC, version=2)
    Path(path).write_bytes(header + stream + struct.pack("<Q", len(stream)))


def elf_many_segments(path: str | os.PathLike[str], nsegs: int) -> None:
    """A guest ELF core (PN_XNUM from 65,535) with ``nsegs`` PT_LOADs of one page not saved."""
    make_elf_core(path, [Seg(PAGE * 2 * i, b"", PAGE) for i in range(nsegs)],
                  pn_xnum=nsegs >= 0xFFFF)


def elf_many_notes(path: str | os.PathLike[str], nnotes: int) -> None:
    """An ELF core whose PT_NOTE holds ``nnotes`` empty notes (12 bytes each)."""
    make_elf_core(path, [(0, b"\x01" * PAGE)], producer="qemu",
                  notes=[("", 0, b"")] * nnotes)


def elf_nt_file_flood(path: str | os.PathLike[str], nentries: int, nsegs: int = 1000) -> None:
    """A process core of ``nsegs`` segments whose NT_FILE maps one file ``nentries`` times over
    all of them (overlapping entries: no kernel writes that)."""
    segs = [Seg(0x10000000 + PAGE * 2 * i, b"", PAGE) for i in range(nsegs)]
    end = 0x10000000 + PAGE * 2 * nsegs
    make_elf_core(path, segs, producer="process",
                  nt_file=[(0x10000000, end, 0, "/lib/x")] * nentries)


def elf_huge_memsz(path: str | os.PathLike[str], memsz: int = 1 << 60) -> None:
    """A guest ELF core with one stored page and a PT_LOAD claiming ``memsz`` bytes."""
    make_elf_core(path, [(0, b"\x01" * PAGE), Seg(0x100000, b"", memsz)])


def snapshot(path: str | os.PathLike[str], processes: list[dict[str, object]] | None = None,
             meta: bytes | None = None) -> None:
    """A one-process snapshot; ``processes`` replaces its META process list, ``meta`` (any
    bytes) the whole META descriptor (padded with spaces, which JSON ignores)."""
    vma = {"start": 0x10000, "end": 0x12000, "perms": "rw-p", "offset": 0, "path": "",
           "vmflags": "rd wr mg"}
    pad = " " * len(meta or b"")
    with SnapshotWriter(path, page_size=PAGE, meta={"kernel": "6.1.0", "pad": pad}) as w:
        w.begin_process({"pid": 1, "comm": "x", "cmdline": ["x"], "vmas": [vma]})
        w.write_pages(0x10000, b"\x01" * PAGE)
        w.add_runs(np.array([(0x10000, 1, RunFlags.PRESENT | RunFlags.STORED),
                             (0x11000, 1, 0)], RUN))
        if processes is not None:
            w.meta["processes"] = processes
        w.commit()
    if meta is not None:
        data = bytearray(Path(path).read_bytes())
        at = data.index(b'{"kernel"')
        (size,) = struct.unpack_from("<I", data, at - 20)  # n_descsz of the META note
        data[at : at + size] = meta.ljust(size)
        Path(path).write_bytes(data)
