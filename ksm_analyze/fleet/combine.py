"""Combining fingerprint files of a whole fleet in bounded memory.

``analyze()`` holds every input's fingerprints at once (24 bytes a page at the peak): right
for a host, too much for a fleet of thousands of guests. :func:`combine` never does. It reads
the files one at a time and spills each scanned non-zero page's 128-bit content hash and input
number (20 bytes) into one of ``partitions`` files by the hash's top bits; then it sorts and
counts one partition at a time. Peak memory is one fingerprint file plus one partition, not
the fleet. What does grow with the fleet is the result: 20 bytes for each (content, input)
pair of a content held twice or more (BENCHMARKS.md, "Fleet scale": 100 million pages).

Pages are told apart by their xxh3-128 content hashes (``ksm-analyze fingerprint`` stores
them), not by comparing bytes: the dumps of a fleet are not on one machine. The chance that
two different pages share a hash is below n^2 / 2^129 for n pages.

The result is the same core table ``analyze()`` builds (:class:`~ksm_analyze.content_table.
ContentTable`), so counters, subsets and planning work on it unchanged.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..columns import Columns
from ..content_table import INPUT_COLUMNS, ContentTable, input_row
from ..eligibility import Scope, scan_mask
from ..errors import InputError
from ..options import DEFAULT_OPTIONS
from ..pages import PAGE_SIZE
from . import fingerprint_files

__all__ = ["combine"]

_SPILL = np.dtype([("lo", "<u8"), ("hi", "<u8"), ("input", "<u4")])


def combine(files: Sequence[str | os.PathLike[str]], *, partitions: int = 16,
            scope: Scope = DEFAULT_OPTIONS.scope, workdir: str | None = None) -> ContentTable:
    """The inputs x contents table of every input of ``files`` (fingerprint files with
    content hashes), built a partition of the hash space at a time.

    Args:
        files: fingerprint files (``ksm-analyze fingerprint``).
        partitions: how many parts the hash space is cut into (a power of two); memory is
            about 60 bytes times the fleet's non-zero pages divided by this.
        scope: which process memory KSM scans (as ``--scope``).
        workdir: where the partition files go (default: the system's temporary folder);
            they hold hashes only and are removed at the end.

    Raises:
        DumpFormatError: a file is damaged.
        InputError: a file carries no content hashes.
    """
    if partitions < 1 or partitions & (partitions - 1):
        raise ValueError(f"partitions must be a power of two, not {partitions}")
    shift = np.uint64(64 - (partitions.bit_length() - 1)) if partitions > 1 else None
    rows: list[dict[str, Any]] = []
    page_size = PAGE_SIZE
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ksm-combine-") as tmp:
        with contextlib.ExitStack() as stack:  # the folder is private (0700)
            spills = [stack.enter_context(open(os.path.join(tmp, f"part-{p}"), "wb"))
                      for p in range(partitions)]
            for path in files:
                for fp in fingerprint_files.load(path):
                    if fp.content is None:
                        raise InputError("no content hashes: write it with ksm-analyze "
                                         "fingerprint", path=path)
                    page_size = fp.page_size
                    mask = scan_mask(fp, scope)
                    scanned = mask.scanned & (fp.prefix != 0)
                    spill = np.empty(int(np.count_nonzero(scanned)), _SPILL)
                    spill["lo"], spill["hi"] = fp.content[scanned, 0], fp.content[scanned, 1]
                    spill["input"] = len(rows)
                    part = (spill["lo"] >> shift).astype(np.int64) if shift is not None else (
                        np.zeros(len(spill), np.int64))
                    order = np.argsort(part, kind="stable")
                    cuts = np.searchsorted(part[order], np.arange(partitions + 1))
                    for p in range(partitions):
                        spill[order[cuts[p]:cuts[p + 1]]].tofile(spills[p])
                    rows.append(input_row(fp, mask, unique_pages=0))  # counted below
                    del spill, part, order
        content, owner, pages, unique = _count_partitions(tmp, partitions, len(rows))
    for row, n in zip(rows, unique.tolist(), strict=True):
        row["unique_pages"] = n
    return ContentTable(Columns.from_records(rows, INPUT_COLUMNS), content, owner, pages,
                        page_size)


def _count_partitions(folder: str, partitions: int, ninputs: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sparse rows (content, owner, pages) of contents held twice or more, and each input's
    pages of contents held once, one partition at a time."""
    contents, owners, counts = [], [], []
    unique = np.zeros(ninputs, np.int64)
    first = 0
    for p in range(partitions):
        spill = np.fromfile(os.path.join(folder, f"part-{p}"), _SPILL)
        os.unlink(os.path.join(folder, f"part-{p}"))
        if not len(spill):
            continue
        spill = spill[np.lexsort((spill["input"], spill["hi"], spill["lo"]))]
        new = np.r_[True, (spill["lo"][1:] != spill["lo"][:-1])
                    | (spill["hi"][1:] != spill["hi"][:-1])]
        cls = np.cumsum(new) - 1
        owner = spill["input"].astype(np.int64)
        del spill, new
        # (class, input) pairs, with pages; classes of one page in all are unique pages.
        key = cls * ninputs + owner
        cut = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        pair_pages = np.diff(np.r_[cut, len(key)])
        pair_cls, pair_owner = cls[cut], owner[cut]
        alone = np.bincount(pair_cls, weights=pair_pages)[pair_cls] == 1
        unique += np.bincount(pair_owner[alone], minlength=ninputs)
        contents.append(pair_cls[~alone] + first)
        owners.append(pair_owner[~alone].astype(np.int32))
        counts.append(pair_pages[~alone].astype(np.int64))
        first += int(cls[-1]) + 1
    return _joined(contents, np.int64), _joined(owners, np.int32), _joined(counts, np.int64), \
        unique


def _joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    """``np.concatenate(parts)``, freeing each part as it is copied: the rows of a fleet are
    the largest thing here, and concatenating would hold them twice."""
    out: np.ndarray = np.empty(sum(len(p) for p in parts), dtype)
    at = 0
    while parts:
        part = parts.pop(0)
        out[at : at + len(part)] = part
        at += len(part)
    return out
