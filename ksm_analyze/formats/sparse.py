"""Sparse memory files: where the data is and where the holes are (``SEEK_DATA``/``SEEK_HOLE``).

Firecracker, Cloud Hypervisor and OpenVMM write guest RAM as a flat file whose holes are pages
never written. What a hole means depends on the writer (a page never populated, or one left
unchanged since a base snapshot), so the caller names the state holes get. A filesystem
without ``SEEK_HOLE`` reports the whole file as data (Linux's generic fallback), which is
still right: the holes then read as zero bytes.
"""

from __future__ import annotations

import errno
import os

from ..pages import Extent, PageState
from .base import RANGE_BYTES, DumpReader

__all__ = ["sparse_extents"]


def _data_runs(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """``(offset, end)`` byte runs of data in ``[start, end)`` of ``fd``."""
    runs: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data at or after pos
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(start, end)]  # no sparse-seek here: all data
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        runs.append((data, hole))
        pos = hole
    return runs


def sparse_extents(
    reader: DumpReader, start: int, length: int, addr: int, hole_state: PageState, label: str,
    budget: list[int],
) -> list[Extent]:
    """Extents for the file bytes ``[start, start + length)`` holding memory from ``addr``:
    DATA (stored at their file offset) where the file holds data, ``hole_state`` where it has
    a hole. A page partly data is data (its hole part reads as zero). ``budget`` is the count
    of extents made so far across calls: past the reader's cap the file is refused before the
    list grows further (a file of alternating 4 KiB holes could otherwise make millions)."""
    ps = reader.page_size
    end = start + length
    out: list[Extent] = []
    cursor = start
    for d0, d1 in _data_runs(reader._fd, start, end):
        p0 = start + (d0 - start) // ps * ps
        p1 = min(end, start + -(-(d1 - start) // ps) * ps)
        p0 = max(p0, cursor)
        if p0 > cursor:
            out.append(Extent(addr + cursor - start, (p0 - cursor) // ps, hole_state, -1, label))
        if p1 > p0:
            if out and out[-1].state == PageState.DATA and out[-1].file_offset + (
                    out[-1].npages * ps) == p0:
                last = out.pop()
                out.append(last._replace(npages=last.npages + (p1 - p0) // ps))
            else:
                out.append(Extent(addr + p0 - start, (p1 - p0) // ps, PageState.DATA, p0, label))
            cursor = p1
        if problem := reader._over_limit(budget[0] + len(out), "ranges of data and holes",
                                         RANGE_BYTES):
            raise reader._error(problem, d0)
    if cursor < end:
        out.append(Extent(addr + cursor - start, (end - cursor) // ps, hole_state, -1, label))
    budget[0] += len(out)
    return out
