"""Write VMware state files (``.vmss``/``.vmsn``) and ``.vmem`` files from known pages.

Layout from crash-utility ``vmware_vmss.h`` (``cptdumpheader``, ``cptgroupdesc``, the tag bit
fields ``MAKE_TAG``) and ``vmware_vmss.c: vmware_vmss_init`` (block tags: ``u64 nbytes, u64
nbytesinmem, u16 padsize``, then the padding and the bytes); the memory group's tags as
volatility3 ``layers/vmware.py: VmwareLayer._read_header`` reads them. Not a file written by
VMware: built from these published readers.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

__all__ = ["GOOD_MAGIC", "Tag", "make_state", "memory_group", "tag"]

GOOD_MAGIC = 0xBED2BED2
Tag = bytes


def tag(name: str, value: int | bytes, indices: tuple[int, ...] = (), *, size: int = 4,
        block: bool = False, compressed: bool = False, memsize: int | None = None,
        pad: int = 0) -> Tag:
    """One tag: a value of ``size`` bytes, or a (compressed) block holding ``value``."""
    raw = name.encode()
    if block or compressed:
        data = bytes(value) if isinstance(value, bytes | bytearray) else b""
        valsize = 62 if compressed else 63
        head = struct.pack("<H", (len(raw) << 8) | (len(indices) << 6) | valsize)
        body = struct.pack("<QQH", len(data), len(data) if memsize is None else memsize, pad)
        return head + raw + struct.pack(f"<{len(indices)}I", *indices) + body + bytes(pad) + data
    assert isinstance(value, int)
    head = struct.pack("<H", (len(raw) << 8) | (len(indices) << 6) | size)
    return head + raw + struct.pack(f"<{len(indices)}I", *indices) + value.to_bytes(size, "little")


def memory_group(regions: list[tuple[int, int, int]], *, memory: bytes | None = None,
                 extra: list[Tag] = ()) -> list[Tag]:
    """The memory group's tags: ``regions`` as ``(ppn, page_num, pages)`` rows (none: no
    regionsCount tag, a flat memory), and a Memory block when ``memory`` is given."""
    tags = [tag("align_mask", 0xFFFF)]
    if regions:
        tags.append(tag("regionsCount", len(regions)))
    for i, (ppn, pagenum, size) in enumerate(regions):
        tags += [tag("regionPageNum", pagenum, (i,)), tag("regionPPN", ppn, (i,)),
                 tag("regionSize", size, (i,))]
    tags += list(extra)
    if memory is not None:
        tags.append(tag("Memory", memory, (0, 0), block=True, pad=6))
    return tags


def make_state(path: str | os.PathLike[str], groups: list[tuple[str, list[Tag]]], *,
               magic: int = GOOD_MAGIC) -> Path:
    """A state file: header, group table, then each group's tags and the NULL tag."""
    table = 12 + 80 * len(groups)
    bodies, descs, at = [], [], table
    for name, tags in groups:
        body = b"".join(tags) + b"\0\0"
        descs.append(struct.pack("<64sQQ", name.encode(), at, len(body)))
        bodies.append(body)
        at += len(body)
    data = struct.pack("<III", magic, 8, len(groups)) + b"".join(descs) + b"".join(bodies)
    Path(path).write_bytes(data)
    return Path(path)
