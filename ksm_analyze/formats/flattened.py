"""makedumpfile's *flattened* container: records that write a logical file in any order.

Writers that cannot seek (makedumpfile ``-F``, QEMU ``dump-guest-memory`` to a pipe) emit one
record per write; :class:`FlattenedFile` indexes them in place, reading as ``makedumpfile -R``.
"""

from __future__ import annotations

import heapq
import itertools
import mmap
import struct
from array import array

import numpy as np

from ..errors import DumpFormatError, TruncatedDumpError, UnsupportedDumpError

# Flattened format (makedumpfile print_info.h / QEMU include/sysemu/dump.h): a 4096-byte header
# {char signature[16]; be64 type; be64 version}, then records {be64 offset; be64 buf_size} + data,
# written into the logical file in any order (later records win), ended by offset = size = -1.
MDF_SIGNATURE = b"makedumpfile".ljust(16, b"\0")
MDF_HEADER_SIZE = 4096
_HEADER = struct.Struct(">16sqq")
_RECORD = struct.Struct(">qq")
MAX_OFFSET = 1 << 60  # 2^40 page frames of 1 MiB: a record past this is corrupt


def probe_flattened(head: bytes) -> bool:
    """Whether ``head`` starts with a flattened header of type 1, version 1. Never raises."""
    return len(head) >= _HEADER.size and _HEADER.unpack_from(head) == (MDF_SIGNATURE, 1, 1)


class FlattenedFile:
    """The logical file the records of ``data`` (a reader's memory map) write, indexed in place.

    ``segments`` holds the logical start, logical end and file offset of each written segment,
    sorted and disjoint (a later record wins over an earlier one). Errors name ``path``.
    """

    def __init__(self, data: mmap.mmap | bytes, path: str) -> None:
        self.path, self._data = path, data
        self.warnings: list[str] = []
        end = len(data)
        if end < _HEADER.size:
            raise TruncatedDumpError(
                f"flattened header ({_HEADER.size} bytes) runs past the end of the file "
                f"({end} bytes)",
                path=path,
                offset=0,
            )
        _sig, mtype, version = _HEADER.unpack_from(data)
        if mtype != 1 or version != 1:
            raise UnsupportedDumpError(
                f"flattened makedumpfile header of type {mtype}, version {version}: "
                "only type 1, version 1 is known",
                path=path,
                offset=0,
            )
        starts, sizes, datas = array("q"), array("q"), array("q")
        unpack, pos = _RECORD.unpack_from, MDF_HEADER_SIZE
        while True:
            if pos + _RECORD.size > end:
                raise TruncatedDumpError(
                    "flattened dump ends without its end marker (offset -1, size -1): "
                    "the dump is incomplete (the writer did not finish)",
                    path=path,
                    offset=pos,
                )
            offset, size = unpack(data, pos)
            if offset == -1 and size == -1:
                break
            if offset < 0 or size < 0 or offset > MAX_OFFSET:
                raise DumpFormatError(
                    f"flattened record with bad offset {offset:#x} or size {size:#x}",
                    path=path,
                    offset=pos,
                )
            if pos + _RECORD.size + size > end:
                raise TruncatedDumpError(
                    f"flattened record of {size} bytes for offset {offset:#x} runs past the end "
                    f"of the file ({end:#x})",
                    path=path,
                    offset=pos,
                )
            if size:
                starts.append(offset)
                sizes.append(size)
                datas.append(pos + _RECORD.size)
            pos += _RECORD.size + size
        if pos + _RECORD.size < end:
            self.warnings.append(
                f"{path}: {end - pos - _RECORD.size} bytes after the flattened end "
                f"marker at offset {pos:#x} are ignored"
            )
        self.nrecords = len(starts)
        lstart = np.frombuffer(starts, np.int64)
        lend = lstart + np.frombuffer(sizes, np.int64)
        fstart = np.frombuffer(datas, np.int64)
        order = np.argsort(lstart, kind="stable")
        lstart, lend, fstart = lstart[order], lend[order], fstart[order]
        if len(lstart) > 1 and np.any(lend[:-1] > lstart[1:]):
            lstart, lend, fstart = _paint(starts, sizes, datas)
        self.segments = (lstart, lend, fstart)
        self.size = int(lend.max()) if len(lend) else 0

    def read(self, offset: int, size: int, what: str) -> bytes:
        """Read ``size`` bytes at logical ``offset``; ``what`` names them if that runs past the end.

        Bytes no record wrote read as zero, as in the file ``makedumpfile -R`` makes.
        """
        if offset < 0 or size < 0 or offset + size > self.size:
            raise TruncatedDumpError(
                f"{what} ({size} bytes at offset {offset:#x} of the reassembled dump) runs past "
                f"its end ({self.size:#x})",
                path=self.path,
            )
        lstart, lend, fstart = self.segments
        i = int(lstart.searchsorted(offset, "right")) - 1
        pieces, pos, stop, nseg = [], offset, offset + size, len(lstart)
        while pos < stop:
            if i >= 0 and lstart.item(i) <= pos < lend.item(i):  # inside segment i
                upto = min(stop, lend.item(i))
                at = fstart.item(i) + pos - lstart.item(i)
                pieces.append(self._data[at : at + upto - pos])
            else:  # a gap before segment i + 1: never written, reads as zero
                upto = stop if i + 1 >= nseg else min(stop, lstart.item(i + 1))
                pieces.append(bytes(upto - pos))
            pos = upto
            if i + 1 < nseg and lstart.item(i + 1) <= pos:
                i += 1
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def file_offsets(self, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """File offsets of logical ranges held whole in one segment; -1 for the others."""
        lstart, lend, fstart = self.segments
        i = np.searchsorted(lstart, offsets, "right") - 1
        ok = i >= 0
        i = np.where(ok, i, 0)
        ok &= offsets + sizes <= lend[i]
        return np.where(ok, fstart[i] + offsets - lstart[i], -1)

    def where(self, offset: int) -> tuple[int | None, str]:
        """For an error about logical ``offset``: its file offset (or None) and a text suffix."""
        at = int(self.file_offsets(np.array([offset]), np.array([0]))[0])
        return (at if at >= 0 else None), f" (offset {offset:#x} of the reassembled dump)"

    def check_written(self, start: int, stop: int, what: str) -> None:
        """Refuse a dump whose records never wrote some bytes of logical ``[start, stop)``."""
        lstart, lend, _ = self.segments
        lo = int(np.searchsorted(lend, start, "right"))
        hi = int(np.searchsorted(lstart, stop, "left"))
        covered = np.minimum(lend[lo:hi], stop) - np.maximum(lstart[lo:hi], start)
        if int(covered.sum()) != stop - start:
            raise TruncatedDumpError(
                f"part of the {what} ({stop - start} bytes at offset {start:#x} of the "
                "reassembled dump) was never written by any flattened record: the dump is "
                "incomplete",
                path=self.path,
            )


def _paint(
    starts: array[int], sizes: array[int], datas: array[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resolve overlapping records, the later winning: sorted disjoint segments."""
    n = len(starts)
    order = sorted(range(n), key=lambda r: starts[r])
    bounds = sorted({*starts, *(s + z for s, z in zip(starts, sizes, strict=True))})
    heap: list[int] = []  # -record, for a max-heap: the latest record covering a point wins
    out: list[tuple[int, int, int]] = []
    j = 0
    for lo, hi in itertools.pairwise(bounds):
        while j < n and starts[order[j]] <= lo:
            heapq.heappush(heap, -order[j])
            j += 1
        while heap and starts[-heap[0]] + sizes[-heap[0]] <= lo:
            heapq.heappop(heap)
        if not heap:
            continue
        r = -heap[0]
        f = datas[r] + lo - starts[r]
        if out and out[-1][1] == lo and out[-1][2] + (lo - out[-1][0]) == f:
            out[-1] = (out[-1][0], hi, out[-1][2])
        else:
            out.append((lo, hi, f))
    seg = np.array(out, np.int64).reshape(-1, 3)
    return seg[:, 0].copy(), seg[:, 1].copy(), seg[:, 2].copy()
