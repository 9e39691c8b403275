"""makedumpfile's *flattened* container: records that write a logical file in any order.

Writers that cannot seek (makedumpfile ``-F``, QEMU ``dump-guest-memory`` to a pipe) emit one
record per write; :class:`FlattenedFile` indexes them in place, reading as ``makedumpfile -R``.
"""

from __future__ import annotations

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
    """Whether ``head`` starts with the flattened signature. Never raises; the type and version
    are :class:`FlattenedFile`'s to check, so a damaged one is an error, not a raw image."""
    return head[:16] == MDF_SIGNATURE


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
            lstart = np.frombuffer(starts, np.int64)
            lstart, lend, fstart = _paint(
                lstart, lstart + np.frombuffer(sizes, np.int64), np.frombuffer(datas, np.int64)
            )
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
    lstart: np.ndarray, lend: np.ndarray, fstart: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resolve overlapping records (arrays in file order), the later winning: sorted disjoint
    segments.

    Each piece between two record bounds takes the latest record covering it. The records'
    ranges go into a segment tree over the pieces (each range is O(log n) nodes holding the
    latest record), then every piece takes the latest record among its ancestors: numpy work
    in O(n log n), never a Python loop per record (a file may hold millions of them).
    """
    bounds = np.sort(np.concatenate((lstart, lend)))
    bounds = bounds[np.append(True, bounds[1:] != bounds[:-1])]  # np.unique, without its hash
    leaves = 1 << max(0, len(bounds) - 2).bit_length()  # a power of two >= the pieces
    tree = np.full(2 * leaves, -1, np.int64)
    rec = np.arange(len(lstart))
    lo = np.searchsorted(bounds, lstart) + leaves
    hi = np.searchsorted(bounds, lend) + leaves
    while len(rec):
        # The iterative segment tree update, for every live range at once: a left end that is
        # a right child, or a right end that is a left one, is a node of the range.
        left = (lo < hi) & (lo & 1 == 1)
        np.maximum.at(tree, lo[left], rec[left])
        right = (lo < hi) & (hi & 1 == 1)
        np.maximum.at(tree, hi[right] - 1, rec[right])
        lo, hi = (lo + left) >> 1, (hi - right) >> 1
        live = lo < hi
        lo, hi, rec = lo[live], hi[live], rec[live]
    k = 1
    while k < leaves:  # push each node's latest record down to its children
        tree[2 * k : 4 * k] = np.maximum(tree[2 * k : 4 * k], np.repeat(tree[k : 2 * k], 2))
        k *= 2
    win = tree[leaves : leaves + len(bounds) - 1]
    keep = win >= 0
    r, lo_b, hi_b = win[keep], bounds[:-1][keep], bounds[1:][keep]
    f = fstart[r] + lo_b - lstart[r]
    # Join pieces that continue each other in the logical file and in the file.
    new = np.ones(len(r), bool)
    new[1:] = (lo_b[1:] != hi_b[:-1]) | (f[1:] != f[:-1] + hi_b[:-1] - lo_b[:-1])
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, len(r) - 1)
    return lo_b[first], hi_b[last], f[first]
