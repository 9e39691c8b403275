"""Write LiME and AVML images the way LiME and AVML do.

LiME (504ensicsLabs/LiME ``src/main.c``): one 32-byte ``lime_mem_range_header`` per range, then
the range's bytes. AVML (microsoft/avml ``src/image.rs``, ``src/io/snappy.rs``): every range cut
into 16 MiB chunks from its start, all-zero chunks left out, each chunk written as a header
(``"AVML"`` version 2) + a Snappy framed stream + the stream's length as u64 LE; or, without
``--compress``, as LiME version 1 records (cut and left out the same way).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

import cramjam

__all__ = ["AVML_CHUNK_BYTES", "avml_record", "lime_header", "make_avml", "make_lime"]

HEADER = struct.Struct("<IIQQQ")  # magic, version, s_addr, e_addr (inclusive), reserved
LIME_MAGIC = 0x4C694D45
AVML_MAGIC = 0x4C4D5641
AVML_CHUNK_BYTES = 0x1000 * 0x1000  # image.rs MAX_BLOCK_SIZE


def lime_header(s_addr: int, size: int, *, magic: int = LIME_MAGIC, version: int = 1) -> bytes:
    """A record header for ``size`` bytes at ``s_addr`` (``e_addr`` is inclusive)."""
    return HEADER.pack(magic, version, s_addr, s_addr + size - 1, 0)


def avml_record(s_addr: int, data: bytes) -> bytes:
    """One AVML version 2 record: header, Snappy framed stream, u64 LE stream length."""
    stream = bytes(cramjam.snappy.compress(data))
    header = lime_header(s_addr, len(data), magic=AVML_MAGIC, version=2)
    return header + stream + struct.pack("<Q", len(stream))


def make_lime(path: str | os.PathLike[str], ranges: Sequence[tuple[int, bytes]]) -> Path:
    """Write a LiME file (``format=lime``): one record per ``(s_addr, bytes)`` range."""
    with open(path, "wb") as f:
        for s_addr, data in ranges:
            f.write(lime_header(s_addr, len(data)))
            f.write(data)
    return Path(path)


def make_avml(
    path: str | os.PathLike[str],
    ranges: Sequence[tuple[int, bytes]],
    *,
    omit_zero_chunks: bool = True,
    compress: bool = True,
) -> Path:
    """Write what ``avml [--compress]`` writes for memory ranges ``(s_addr, bytes)``.

    Each range is cut into 16 MiB chunks from its start (``Image::copy_block``); chunks that
    are all zero are left out (``copy_if_nonzero``) unless ``omit_zero_chunks`` is False.
    ``compress=False`` writes LiME version 1 records, as ``avml`` without ``--compress``.
    """
    with open(path, "wb") as f:
        for s_addr, data in ranges:
            for start in range(0, len(data), AVML_CHUNK_BYTES):
                chunk = data[start : start + AVML_CHUNK_BYTES]
                if omit_zero_chunks and chunk.count(0) == len(chunk):
                    continue
                if compress:
                    f.write(avml_record(s_addr + start, chunk))
                else:
                    f.write(lime_header(s_addr + start, len(chunk)) + chunk)
    return Path(path)
