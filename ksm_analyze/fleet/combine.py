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
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..columns import Columns
from ..content_table import INPUT_COLUMNS, ContentTable, input_row
from ..eligibility import ScanMask, Scope, scan_mask
from ..errors import InputError
from ..hashing.stage1 import Fingerprints
from ..options import DEFAULT_OPTIONS
from ..pages import PAGE_SIZE
from . import fingerprint_files

__all__ = ["SPILL", "PartitionCounts", "assemble", "combine", "count_partition", "cut",
           "file_pieces", "prints_pieces"]

SPILL = np.dtype([("lo", "<u8"), ("hi", "<u8"), ("input", "<u4")])
"""One scanned non-zero page in a partition: its 128-bit content hash and its input."""


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
    _check_partitions(partitions)
    rows: list[dict[str, Any]] = []
    page_size = PAGE_SIZE
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ksm-combine-") as tmp:
        with contextlib.ExitStack() as stack:  # the folder is private (0700)
            spills = [stack.enter_context(open(os.path.join(tmp, f"part-{p}"), "wb"))
                      for p in range(partitions)]
            for path in files:
                mine, pieces, page_size = file_pieces(path, scope=scope, partitions=partitions,
                                                      first_input=len(rows))
                rows += mine
                for spill, piece in zip(spills, pieces, strict=True):
                    piece.tofile(spill)
                del pieces
        counts = []
        for p in range(partitions):
            name = os.path.join(tmp, f"part-{p}")
            piece = np.fromfile(name, SPILL)
            os.unlink(name)
            counts.append(count_partition([piece], len(rows)))
            del piece
    return assemble(rows, counts, page_size)


def _check_partitions(partitions: int) -> None:
    if partitions < 1 or partitions & (partitions - 1):
        raise ValueError(f"partitions must be a power of two, not {partitions}")


def file_pieces(path: str | os.PathLike[str], *, scope: Scope, partitions: int,
                first_input: int = 0) -> tuple[list[dict[str, Any]], list[np.ndarray], int]:
    """One fingerprint file's part of :func:`combine`: its inputs' rows of the core table
    (``unique_pages`` still 0), and its scanned non-zero pages as :data:`SPILL` records
    (content hash; input numbered from ``first_input``) cut into ``partitions`` pieces by the
    hash's top bits; and its page size. Holds the file's fingerprints only while it runs.

    Raises:
        DumpFormatError: the file is damaged.
        InputError: it carries no content hashes.
    """
    return prints_pieces(fingerprint_files.load(path), path=path, scope=scope,
                         partitions=partitions, first_input=first_input)


def prints_pieces(prints: Sequence[Fingerprints], *, path: str | os.PathLike[str],
                  scope: Scope, partitions: int, first_input: int = 0,
                  masks: Sequence[ScanMask] | None = None
                  ) -> tuple[list[dict[str, Any]], list[np.ndarray], int]:
    """:func:`file_pieces` of the inputs of fingerprint file ``path`` once loaded
    (``masks``: their scan masks, if already made).

    Raises:
        InputError: an input carries no content hashes.
    """
    _check_partitions(partitions)
    rows: list[dict[str, Any]] = []
    parts: list[list[np.ndarray]] = [[] for _ in range(partitions)]
    page_size = PAGE_SIZE
    for k, fp in enumerate(prints):
        if fp.content is None:
            raise InputError("no content hashes: write it with ksm-analyze fingerprint",
                             path=path)
        page_size = fp.page_size
        mask = masks[k] if masks is not None else scan_mask(fp, scope)
        scanned = mask.scanned & (fp.prefix != 0)
        spill = np.empty(int(np.count_nonzero(scanned)), SPILL)
        spill["lo"], spill["hi"] = fp.content[scanned, 0], fp.content[scanned, 1]
        spill["input"] = first_input + len(rows)
        for part, piece in zip(parts, cut(spill, partitions), strict=True):
            part.append(piece)
        rows.append(input_row(fp, mask, unique_pages=0))  # counted by count_partition
        del spill
    pieces = [ps[0] if len(ps) == 1 else np.concatenate(ps) if ps else np.empty(0, SPILL)
              for ps in parts]
    return rows, pieces, page_size


def cut(records: np.ndarray, partitions: int) -> list[np.ndarray]:
    """``records`` (any dtype with a ``lo`` field: the content hash's low half) in
    ``partitions`` pieces by the top bits of ``lo``, each in the records' order."""
    if partitions == 1:
        return [records]
    part = (records["lo"] >> np.uint64(64 - (partitions.bit_length() - 1))).astype(np.int64)
    order = np.argsort(part, kind="stable")
    cuts = np.searchsorted(part[order], np.arange(partitions + 1))
    return [records[order[cuts[p]:cuts[p + 1]]] for p in range(partitions)]


@dataclass(frozen=True)
class PartitionCounts:
    """One partition of the hash space, counted (:func:`count_partition`).

    Attributes:
        content: per sparse row, its content class numbered within the partition (0, 1, ...;
            sorted).
        owner: per sparse row, the input holding it.
        pages: per sparse row, that input's pages of that content.
        unique: per input, its pages of contents held once in all (the partition's share).
        classes: how many content classes of two or more pages the partition numbered
            (``content`` runs below it).
    """

    content: np.ndarray
    owner: np.ndarray
    pages: np.ndarray
    unique: np.ndarray
    classes: int


def count_partition(pieces: Sequence[np.ndarray], ninputs: int) -> PartitionCounts:
    """Sparse rows (content, owner, pages) of the contents held twice or more among the
    :data:`SPILL` records of ``pieces`` (one partition, from any number of files), and each
    input's pages of contents held once."""
    spill = pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else (
        np.empty(0, SPILL))
    unique = np.zeros(ninputs, np.int64)
    if not len(spill):
        empty = np.zeros(0, np.int64)
        return PartitionCounts(empty, empty.astype(np.int32), empty, unique, 0)
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
    kept = pair_cls[~alone]
    # Renumber the kept classes 0, 1, ... so partitions concatenate without gaps.
    dense = np.cumsum(np.r_[True, kept[1:] != kept[:-1]]) - 1 if len(kept) else kept
    return PartitionCounts(dense.astype(np.int64), pair_owner[~alone].astype(np.int32),
                           pair_pages[~alone].astype(np.int64), unique,
                           int(dense[-1]) + 1 if len(dense) else 0)


def assemble(rows: list[dict[str, Any]], counts: list[PartitionCounts], page_size: int
             ) -> ContentTable:
    """The core table from the inputs' rows (:func:`file_pieces`) and every partition's
    counts, in partition order. Empties ``counts``: each partition's counts are freed as
    they are copied into the table (the sparse rows of a fleet are the largest thing here,
    and holding the partitions' copies until the end would hold them twice), so the caller
    must keep no other reference to them."""
    unique = np.zeros(len(rows), np.int64)
    sizes = [len(c.content) for c in counts]
    content, owner = np.empty(sum(sizes), np.int64), np.empty(sum(sizes), np.int32)
    pages = np.empty(sum(sizes), np.int64)
    at = first = 0
    counts.reverse()  # popped from the end: the first partition first
    while counts:
        c = counts.pop()
        n = len(c.content)
        unique += c.unique
        np.add(c.content, first, out=content[at : at + n])
        owner[at : at + n], pages[at : at + n] = c.owner, c.pages
        first += c.classes
        at += n
        del c
    for row, u in zip(rows, unique.tolist(), strict=True):
        row["unique_pages"] = u
    return ContentTable(Columns.from_records(rows, INPUT_COLUMNS), content, owner, pages,
                        page_size)


def _joined(parts: list[np.ndarray], dtype: np.dtype[Any] | type) -> np.ndarray:
    """``np.concatenate(parts)`` (the part itself, if only one of that type), freeing each
    part as it is copied: the list is emptied."""
    if len(parts) == 1 and parts[0].dtype == dtype:
        only: np.ndarray = parts.pop()
        return only
    out: np.ndarray = np.empty(sum(len(p) for p in parts), dtype)
    parts.reverse()  # popped from the end: the first part first
    at = 0
    while parts:
        part = parts.pop()
        out[at : at + len(part)] = part
        at += len(part)
    return out
