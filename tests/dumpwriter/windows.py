"""Write Windows crash dumps (``PAGEDU64``/``PAGEDUMP``) from known pages.

Field offsets from volatility3 ``symbols/windows/crash64.json`` (``_DUMP_HEADER64``),
``crash.json`` (``_DUMP_HEADER``), ``crash_common.json`` (``_SUMMARY_DUMP``), and QEMU
``include/qemu/win_dump_defs.h`` (``WinDumpHeader64``: what ``dump-guest-memory -w`` writes);
the bitmap signatures from rizin ``dmp_specs.h``. Not a file written by Windows: built from
these published layouts.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["make_windows"]

PAGE = 4096


def make_windows(path: str | os.PathLike[str], runs: list[tuple[int, int]], pages: bytes, *,
                 bits: int = 64, dump_type: int = 1, bitmap: list[int] | None = None,
                 bitmap_pages: int | None = None, signature: bytes = b"FDMP",
                 machine: int = 0x8664, bugcheck: int = 0x161, present: int | None = None,
                 number_of_pages: int | None = None) -> Path:
    """A dump with RAM ``runs`` (first page, count). Full (``dump_type`` 1): ``pages`` are
    the runs' pages back to back. Bitmap (5): ``bitmap`` lists the stored page numbers in
    order, ``pages`` their bytes; the bitmap covers ``bitmap_pages`` pages."""
    if bits == 64:
        head = bytearray(0x2000)
        head[0:8] = b"PAGEDU64"
        struct.pack_into("<IIII", head, 0x30, machine, 2, bugcheck, 0)
        struct.pack_into("<IIQ", head, 0x88, len(runs), 0,
                         sum(c for _, c in runs) if number_of_pages is None else number_of_pages)
        for i, (b, c) in enumerate(runs):
            struct.pack_into("<QQ", head, 0x88 + 0x10 + 16 * i, b, c)
        struct.pack_into("<I", head, 0xF98, dump_type)
    else:
        head = bytearray(0x1000)
        head[0:8] = b"PAGEDUMP"
        struct.pack_into("<III", head, 0x20, machine, 1, bugcheck)
        struct.pack_into("<II", head, 0x64, len(runs),
                         sum(c for _, c in runs) if number_of_pages is None else number_of_pages)
        for i, (b, c) in enumerate(runs):
            struct.pack_into("<II", head, 0x64 + 8 + 8 * i, b, c)
        struct.pack_into("<I", head, 0xF88, dump_type)
    out = bytes(head)
    if dump_type == 5:
        assert bitmap is not None
        nbits = bitmap_pages if bitmap_pages is not None else max(bitmap, default=-1) + 1
        flags = np.zeros(((nbits + 31) // 32) * 32, np.uint8)
        flags[bitmap] = 1
        packed = np.packbits(flags, bitorder="little").tobytes()
        first = len(head) + 0x38 + len(packed)
        first += -first % PAGE
        summary = struct.pack("<4s4sI20xQQQ", signature, b"DUMP", 0, first,
                              len(bitmap) if present is None else present, nbits)
        out += summary + packed
        out += bytes(first - len(out))
    Path(path).write_bytes(out + pages)
    return Path(path)
