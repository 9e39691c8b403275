"""Stage 2: decide which pages are equal, byte for byte.

Only pages whose prefix hash is shared by two or more non-zero pages (across all inputs) are
candidates; a prefix hash shared by candidates makes a *group*. Candidates are read in file
order, a block of pages at a time, never one page per Python call: the first member of each
group read becomes its representative, kept in memory, and every other member is compared
with it byte for byte (numpy, a block at once). Reading in file order matters: a page read out
of order costs a page fault and a TLB miss, two to three times the read itself.

Members that differ from their group's representative (equal prefixes, different pages: "false
candidates") get xxh3-64 of the whole page and go through the same pass again, grouped by
(prefix, full hash); a page that still differs from its representative is a full-hash
collision and is settled by comparing it with each distinct page of its group. So two pages
are counted as one only if their bytes are equal.

Representatives are held for at most REP_GROUPS groups at a time (64 MiB of pages, shared
out among the jobs); more groups make more passes over fewer pages each.

A reader that decodes its pages (a compressed wrapper, kdump, AVML) pays for every pass: a
wrapped stream decodes again from its start (or a checkpoint) for each. So the pages that
differ from their representative in the first pass are kept (at most CACHE_PAGES, another
64 MiB shared out among the jobs), and the full hashes and later rounds read them from there:
one pass over the dump in all while the groups fit REP_GROUPS and the false candidates fit
CACHE_PAGES, more passes (over the pages that did not fit) beyond. Pages read in place are
not kept: reading them again costs no more than a copy.

With ``verify=False`` no page is compared: candidates are grouped by (prefix, full hash), and
the report says so with the collision bound. So it is, with a 128-bit content hash, when an
input's dump cannot be read here (its reader is None: a fingerprint file that carries
content hashes, or a Dask worker's input on another machine).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .._parallel import map_shards
from ..errors import InputError
from ..formats.base import DumpReader
from ..options import DEFAULT_OPTIONS, ProgressCallback, ScanOptions
from . import compiled
from .stage1 import Fingerprints
from .xxh3 import xxh3_64_rows

__all__ = ["UNIQUE", "ZERO", "ContentClasses", "StageStats", "check_unchanged", "classify",
           "content_hashes", "page_contents"]

ZERO = -1
"""Label of an all-zero page."""
UNIQUE = -2
"""Label of a page whose content occurs nowhere else."""

PARALLEL_MIN_CANDIDATES = 20000
"""Fewer candidates than this are resolved in one process."""
PART_CANDIDATES = 1 << 18
"""Candidates resolved at a time: bounds stage 2's candidate arrays to some 10 MiB."""
REP_GROUPS = 1 << 14
"""Groups whose representatives are held at once: 64 MiB of 4 KiB pages per process."""
CACHE_PAGES = 1 << 14
"""Candidate pages of a reader that decodes them kept between passes: 64 MiB of 4 KiB pages
per process."""
MAX_EXEMPLARS = 4096
"""Classes whose bytes stage 2 keeps for the report's top contents at most, a part: 16 MiB."""
BLOCK_PAGES = 256
"""Candidate pages read and compared at a time: 1 MiB, which stays in the CPU cache."""
_SCAN_ROWS = 1 << 20  # table rows examined at a time while looking for candidates
_PREFIX_PASSES = 4  # passes a job over the prefix hashes (by their top bits) to find shared ones


@dataclass(frozen=True)
class StageStats:
    """What each stage did; reported so users can see the cost of the partial hash."""

    pages_hashed: int
    """Non-zero stored pages whose prefix was hashed (stage 1)."""
    prefix_candidates: int
    """Pages whose prefix hash is shared with another page: they get a full look."""
    false_candidates: int
    """Candidates whose content turned out unique (prefix equal, content different)."""
    full_hashes: int
    """Candidates whose whole page was hashed to sort out different pages."""
    full_compares: int
    """Byte-for-byte page comparisons made (0 with verify off)."""
    hash_collisions: int
    """Pages with equal prefix and full hashes but different bytes."""
    verified: bool
    """Every merge was verified byte for byte."""
    merges: int = 0
    """Candidate pages that merge into another (a class of n pages makes n - 1)."""
    hash_bits: int = 0
    """Without byte comparison, the bits of full-page hash trusted to tell pages apart: 64
    with ``--no-verify``, 128 for inputs whose dumps are not readable here (fingerprint
    files, Dask workers elsewhere); 0 when bytes were compared."""


@dataclass(frozen=True)
class ContentClasses:
    """What stage 2 found: which stored pages of all inputs hold equal bytes.

    ``labels[i][row]`` is the content of row ``row`` of input ``i``'s fingerprints: a class
    number ``0 .. n_classes - 1`` shared by pages with equal bytes, ``ZERO`` or ``UNIQUE``
    (int32, 4 bytes a stored page).
    """

    labels: list[np.ndarray]
    n_classes: int
    stats: StageStats
    pages: dict[int, bytes] = field(default_factory=dict)
    """The bytes of the classes with the most pages (``options.top`` of them in each part,
    at most MAX_EXEMPLARS; ties to the lower class number), kept by stage 2 from the
    representatives it held: the report's top contents need no second read (for a
    compressed dump, another pass over the stream). Class number -> page."""


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, _SCAN_ROWS):
        yield slice(start, min(n, start + _SCAN_ROWS))


def _shared_prefixes(tables: Sequence[Fingerprints],
                     jobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Prefix hashes that two or more non-zero pages share (sorted), and how many pages each.

    The hash space is sorted a slice at a time (by its top bits), so the sort needs about two
    bytes a page instead of eight: a quarter with one job, an eighth each for two threads
    (numpy sorts without the GIL).
    """
    bits = (_PREFIX_PASSES * max(jobs, 1) - 1).bit_length()
    shift = np.uint64(64 - bits)

    def shared_in(top: int) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for t in tables:
            for sl in _chunks(len(t.prefix)):
                p = t.prefix[sl]
                parts.append(p[((p >> shift) == top) & (p != 0)])
        values = np.concatenate(parts) if parts else np.empty(0, np.uint64)
        del parts
        values.sort()
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]]) if len(values) else (
            np.empty(0, np.int64))
        runs = np.diff(np.r_[starts, len(values)])
        return values[starts[runs > 1]], runs[runs > 1]

    slices = map_shards(shared_in, 1 << bits, jobs, threads=True)
    return (np.concatenate([s for s, _ in slices]), np.concatenate([c for _, c in slices]))


def _prefix_filter(shared: np.ndarray) -> tuple[np.ndarray, np.uint64]:
    """A table of flags indexed by a prefix hash's top bits, set where a ``shared`` hash
    has them: one lookup rules out most pages before the binary search. About 8 entries a
    shared hash (at most 16 MiB), so few pages pass it by chance."""
    bits = min(24, max(16, int(8 * max(len(shared), 1)).bit_length()))
    shift = np.uint64(64 - bits)
    flags = np.zeros(1 << bits, bool)
    flags[shared >> shift] = True
    return flags, shift


def _candidate_rows(table: Fingerprints, shared: np.ndarray,
                    prefilter: tuple[np.ndarray, np.uint64]) -> np.ndarray:
    """Rows of ``table`` whose prefix hash is one of ``shared`` (sorted; ``prefilter`` is
    its :func:`_prefix_filter`), as uint32: four bytes a candidate, so that with the
    fingerprints and labels a page costs 24 bytes."""
    if len(table.prefix) >= 1 << 32:
        raise ValueError(f"{table.path}: more than 2^32 stored pages")
    rows = [np.empty(0, np.uint32)]
    if not len(shared):
        return rows[0]
    flags, shift = prefilter
    for sl in _chunks(len(table.prefix)):
        maybe = np.flatnonzero(flags[table.prefix[sl] >> shift])
        p = table.prefix[sl][maybe]
        pos = np.minimum(np.searchsorted(shared, p), len(shared) - 1)
        hit = (shared[pos] == p) & (p != 0)
        rows.append((maybe[hit] + sl.start).astype(np.uint32))
    return np.concatenate(rows)


class _Candidates:
    """Candidate pages of all inputs, in file order: input number and page address.

    ``read`` hands out the bytes of a run of candidates with one reader call per input.
    """

    def __init__(self, readers: Sequence[DumpReader | None], source: np.ndarray,
                 addrs: np.ndarray, page_size: int, rep_groups: int = REP_GROUPS,
                 cache_pages: int = CACHE_PAGES) -> None:
        self.page_size, self.rep_groups = page_size, rep_groups
        self.readers, self.source, self.addrs = readers, source, addrs
        self.cache_pages = cache_pages
        self._kept = np.empty(0, np.int64)  # candidates kept, and their bytes (same order)
        self._kept_pages = np.empty((0, page_size), np.uint8)
        self._order: np.ndarray | None = None  # argsort of _kept
        self.reads = 0
        """Candidate pages read from the dumps (not from the kept pages)."""

    def keep(self, idx: np.ndarray, pages: np.ndarray) -> None:
        """Keep the bytes ``pages`` of candidates ``idx`` (none kept already) for later reads,
        as far as ``cache_pages`` allows."""
        n = len(self._kept)
        idx, pages = idx[: max(0, self.cache_pages - n)], pages[: max(0, self.cache_pages - n)]
        if not len(idx):
            return
        if n + len(idx) > len(self._kept_pages):  # grow by doubling, up to the budget
            grown = np.empty((min(self.cache_pages, max(2 * n, n + len(idx), 64)),
                              self.page_size), np.uint8)
            grown[:n] = self._kept_pages[:n]
            self._kept_pages = grown
        self._kept_pages[n : n + len(idx)] = pages
        self._kept = np.r_[self._kept, idx]
        self._order = None

    def read(self, idx: np.ndarray) -> np.ndarray:
        """The ``(len(idx), page_size)`` bytes of candidates ``idx`` (sorted)."""
        if len(self._kept) and len(idx):
            if self._order is None:
                self._order = np.argsort(self._kept, kind="stable")
            ordered = self._kept[self._order]
            at = np.minimum(np.searchsorted(ordered, idx), len(ordered) - 1)
            hit = ordered[at] == idx
            if hit.any():
                out = np.empty((len(idx), self.page_size), np.uint8)
                out[hit] = self._kept_pages[self._order[at[hit]]]
                if not hit.all():
                    out[~hit] = self._read(idx[~hit])
                return out
        return self._read(idx)

    def _read(self, idx: np.ndarray) -> np.ndarray:
        self.reads += len(idx)
        src = self.source[idx]
        cuts = np.flatnonzero(src[1:] != src[:-1]) + 1
        if not len(cuts):
            return self._reader(int(src[0])).read_pages(self.addrs[idx]) if len(idx) else (
                np.empty((0, self.page_size), np.uint8))
        out = np.empty((len(idx), self.page_size), np.uint8)
        for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(idx)].tolist(), strict=True):
            out[lo:hi] = self._reader(int(src[lo])).read_pages(self.addrs[idx[lo:hi]])
        return out

    def _reader(self, i: int) -> DumpReader:
        reader = self.readers[i]
        assert reader is not None, "bytes are compared only when every dump is readable"
        return reader

    def blocks(self, idx: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        """``(where in idx, pages)`` for consecutive blocks of candidates ``idx``."""
        for lo in range(0, len(idx), BLOCK_PAGES):
            where = slice(lo, min(lo + BLOCK_PAGES, len(idx)))
            yield where, self.read(idx[where])

    def in_place(self, idx: np.ndarray) -> list[tuple[slice, np.ndarray, np.ndarray]] | None:
        """Where candidates ``idx`` (sorted) lie in their dumps' memory maps, for the compiled
        kernels to read them in place: ``(where in idx, view, rows of view)`` per run of one
        input and one stored extent. None if the kernels are not built or an input's pages
        are not stored raw (compressed formats): then pages are read as copies."""
        if compiled.native is None:
            return None
        runs = []
        src = self.source[idx]
        cuts = (np.flatnonzero(src[1:] != src[:-1]) + 1).tolist()
        for lo, hi in itertools.pairwise([0, *cuts, len(idx)]):
            placed = self._reader(int(src[lo])).page_views(self.addrs[idx[lo:hi]])
            if placed is None:
                return None
            views, which, rows = placed
            breaks = (np.flatnonzero(which[1:] != which[:-1]) + 1).tolist()
            for a, b in itertools.pairwise([0, *breaks, hi - lo]):
                runs.append((slice(lo + a, lo + b), views[int(which[a])], rows[a:b]))
        return runs

    def full_hashes(self, idx: np.ndarray) -> np.ndarray:
        """xxh3-64 of the whole page of each candidate ``idx`` (sorted)."""
        out = np.empty(len(idx), np.uint64)
        runs = self.in_place(idx)
        if runs is not None:
            for where, view, rows in runs:
                out[where] = compiled.page_hashes(view, rows)
            return out
        for where, pages in self.blocks(idx):
            out[where] = xxh3_64_rows(pages)
        return out

    def match_representatives(
        self, idx: np.ndarray, key: np.ndarray, *, keep: bool = False, top: int = 0,
        exemplars: dict[int, tuple[int, bytes]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Compare each candidate with the first one read of its ``key`` (dense ids).

        ``idx`` is sorted (file order). Returns a bool per entry, "equal to its key's first"
        (True for the first itself), and each key's first entry. Holds at most ``rep_groups``
        pages: keys are taken a range at a time, one pass over their members each. With
        ``keep``, the pages read (not in place) that differ from their key's first are kept
        (:meth:`keep`) for the passes after. The ``top`` keys with the most pages equal to
        their first (ties to the lower key) go into ``exemplars``: key -> (those pages, the
        first's bytes).
        """
        equal = np.zeros(len(idx), bool)
        nkeys = int(key.max()) + 1 if len(key) else 0
        first = np.full(nkeys, -1, np.int64)
        # The first entry of each key in file order: scatter in reverse, so the earliest wins.
        first[key[::-1]] = np.arange(len(key) - 1, -1, -1)
        is_first = np.zeros(len(idx), bool)
        is_first[first] = True
        step = self.rep_groups
        for k0 in range(0, nkeys, step):
            mine = np.flatnonzero((key >= k0) & (key < k0 + step))
            reps = np.empty((min(step, nkeys - k0), self.page_size), np.uint8)
            runs = self.in_place(idx[mine])
            if runs is not None:
                # Representatives first (copies), then every member compared in place.
                firsts = mine[is_first[mine]]
                for where, pages in self.blocks(idx[firsts]):
                    reps[key[firsts[where]] - k0] = pages
                for where, view, rows in runs:
                    at = mine[where]
                    equal[at] = compiled.equal_rows(view, rows, reps, key[at] - k0)
                _offer(exemplars, reps, k0, key[mine][equal[mine]], top)
                continue
            words = reps.view(np.uint64)
            for where, pages in self.blocks(idx[mine]):
                at = mine[where]
                k = key[at] - k0
                page_words = pages.view(np.uint64)
                new = is_first[at]
                words[k[new]] = page_words[new]
                equal[at] = (page_words == words[k]).all(axis=1)
                if keep:
                    differ = np.flatnonzero(~equal[at])
                    self.keep(idx[at[differ]], pages[differ])
            _offer(exemplars, reps, k0, key[mine][equal[mine]], top)
        return equal, first


def _offer(kept: dict[int, tuple[int, bytes]] | None, reps: np.ndarray, k0: int,
           equal_keys: np.ndarray, top: int) -> None:
    """Keep in ``kept`` the ``top`` keys with the most ``equal_keys``, of those whose first
    pages are ``reps`` (keys from ``k0``) and those kept before."""
    if kept is None or top <= 0:
        return
    counts = np.bincount(equal_keys - k0, minlength=len(reps))
    best = np.lexsort((np.arange(len(counts)), -counts))[:top]
    for k in best.tolist():
        kept[k + k0] = (int(counts[k]), reps[k].tobytes())
    _prune(kept, top)


def _prune(kept: dict[int, tuple[int, bytes]], top: int) -> None:
    """Keep the ``top`` entries of ``kept`` (key -> (count, bytes)) with the highest counts,
    ties to the lower key."""
    if len(kept) > top:
        for k in sorted(kept, key=lambda k: (-kept[k][0], k))[top:]:
            del kept[k]


def _dense(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An order sorting by ``keys`` (last is primary) and a dense id per distinct key tuple."""
    order = np.lexsort(keys)
    sorted_keys = [k[order] for k in keys]
    new = np.zeros(len(order), dtype=bool)
    if len(order):
        new[0] = True
        for k in sorted_keys:
            new[1:] |= k[1:] != k[:-1]
    return order, np.cumsum(new) - 1


def _dense_ids(*keys: np.ndarray) -> np.ndarray:
    """A dense id per distinct key tuple, in the original order."""
    order, dense = _dense(*keys)
    ids = np.empty(len(order), np.int64)
    ids[order] = dense
    return ids


def _resolve_range(
    cands: _Candidates, group: np.ndarray, members: np.ndarray, top: int = 0
) -> tuple[np.ndarray, int, int, int, int, dict[int, tuple[int, bytes]]]:
    """Split candidates ``members`` (sorted; ``group`` is their prefix group) into classes
    of equal bytes.

    Returns a class label (local to this call) per member, the number of classes, the
    compares, hash collisions and full hashes made, and the ``top`` classes with the most
    members (ties to the lower label): label -> (members, bytes).
    """
    labels = np.full(len(members), -1, np.int64)
    gid = group - group.min() if len(group) else group  # a range of groups, each present
    exemplars: dict[int, tuple[int, bytes]] = {}  # labelled by their group, as below
    equal, first = cands.match_representatives(members, gid, keep=True, top=top,
                                               exemplars=exemplars)
    labels[equal] = gid[equal]
    n = len(first)
    compares = len(members) - n
    rest = np.flatnonzero(~equal)
    full_hashes, collisions = len(rest), 0
    full = cands.full_hashes(members[rest]) if len(rest) else np.empty(0, np.uint64)
    while rest.size:
        # First round: equal prefixes, different pages, grouped by full hash as well. Any
        # later one: equal full hashes, different bytes, a real collision (about never);
        # each round settles at least the first page of every key.
        sub = _dense_ids(full, gid[rest])
        found: dict[int, tuple[int, bytes]] = {}
        equal, first = cands.match_representatives(members[rest], sub, top=top,
                                                   exemplars=found)
        exemplars.update({k + n: v for k, v in found.items()})
        _prune(exemplars, top)
        labels[rest[equal]] = sub[equal] + n
        n += len(first)
        compares += len(rest) - len(first)
        rest, full = rest[~equal], full[~equal]
        collisions += len(rest)
    return labels, n, compares, collisions, full_hashes, exemplars


def classify(
    tables: Sequence[Fingerprints],
    readers: Sequence[DumpReader | None],
    options: ScanOptions = DEFAULT_OPTIONS,
    *,
    progress: ProgressCallback | None = None,
) -> ContentClasses:
    """Find which stored pages of all inputs hold byte-identical content.

    Candidates are resolved in parts of about PART_CANDIDATES pages, each part a range of
    prefix hashes.

    Args:
        tables: stage-1 fingerprints, one per input.
        readers: the open readers the tables came from (same order), to read pages again.
        options: ``verify`` (compare bytes before counting two pages as one) and ``jobs``
            (worker processes for large candidate sets).
        progress: called as ``progress(bytes_done, bytes_total)`` over the candidate pages,
            after each part.

    Returns:
        A label per stored page (class number, ``ZERO`` or ``UNIQUE``), the number of
        classes, and stage statistics.
    """
    jobs = options.workers
    by_content = any(r is None for r in readers)  # a dump not readable here: 128-bit hashes
    verify = options.verify and not by_content
    shared, counts = _shared_prefixes(tables, jobs)  # before the labels: its peak is the larger
    labels_of = []
    for t in tables:
        content = np.full(len(t.prefix), UNIQUE, np.int32)
        content[t.prefix == 0] = ZERO
        labels_of.append(content)
    prefilter = _prefix_filter(shared)
    cand_rows = [_candidate_rows(t, shared, prefilter) for t in tables]
    del prefilter
    for t, r, rows in zip(tables, readers, cand_rows, strict=True):
        if t.source is not None and r is not None:  # fingerprints from a file or the cache
            check_unchanged(t, r, rows)
    ends = np.cumsum(counts)
    cuts = [0]
    while cuts[-1] < len(shared):
        target = (ends[cuts[-1] - 1] if cuts[-1] else 0) + PART_CANDIDATES
        cuts.append(max(cuts[-1] + 1, int(np.searchsorted(ends, target, side="right"))))
    n_classes = candidates = false_candidates = compares = collisions = full_hashes = 0
    merges = 0
    top = min(options.top, MAX_EXEMPLARS) if verify else 0
    exemplars: dict[int, tuple[int, bytes]] = {}
    ps = tables[0].page_size if tables else 0
    total_bytes = int(counts.sum()) * ps
    if progress is not None:
        progress(0, total_bytes)
    for a, b in itertools.pairwise(cuts):
        part = _resolve_part(tables, readers, labels_of, cand_rows, shared[a:b],
                             first_class=n_classes, verify=verify, by_content=by_content,
                             jobs=jobs, top=top)
        labels, n, done, kept = part[0], part[1], part[2:5], part[5]
        exemplars.update({k + n_classes: v for k, v in kept.items()})
        _prune(exemplars, top)
        candidates += len(labels)
        sizes = np.bincount(labels, minlength=n)
        false_candidates += int(np.count_nonzero(sizes == 1))
        merges += int(np.sum(sizes[sizes > 1] - 1))
        compares, collisions, full_hashes = (
            x + y for x, y in zip((compares, collisions, full_hashes), done, strict=True)
        )
        n_classes += n
        if progress is not None:
            progress(candidates * ps, total_bytes)
    stats = StageStats(
        pages_hashed=sum(t.nonzero_pages for t in tables),
        prefix_candidates=candidates,
        false_candidates=false_candidates,
        full_hashes=full_hashes,
        full_compares=compares,
        hash_collisions=collisions,
        verified=verify,
        merges=merges,
        hash_bits=0 if verify else 128 if by_content else 64,
    )
    return ContentClasses(labels_of, n_classes, stats,
                          {k: page for k, (_, page) in exemplars.items()})


def _resolve_part(
    tables: Sequence[Fingerprints],
    readers: Sequence[DumpReader | None],
    labels_of: Sequence[np.ndarray],
    cand_rows: Sequence[np.ndarray],
    wanted: np.ndarray,
    *,
    first_class: int,
    verify: bool,
    by_content: bool,
    jobs: int,
    top: int = 0,
) -> tuple[np.ndarray, int, int, int, int, dict[int, tuple[int, bytes]]]:
    """Classify the candidates whose prefix hash is in ``wanted`` and write their classes,
    numbered from ``first_class``, into ``labels_of`` (one array per table).

    Returns the part's labels, its number of classes, compares, collisions, full hashes,
    and its ``top`` classes with the most members (label -> (members, bytes)).
    """
    lo, hi = wanted[0], wanted[-1]
    rows_per_table = []
    for t, rows in zip(tables, cand_rows, strict=True):
        p = t.prefix[rows]
        rows_per_table.append(rows[(p >= lo) & (p <= hi)].astype(np.int64))
    source = np.concatenate(
        [np.full(len(r), i, np.int32) for i, r in enumerate(rows_per_table)]
    )
    row = np.concatenate(rows_per_table)
    prefix = np.concatenate([t.prefix[r] for t, r in zip(tables, rows_per_table, strict=True)])
    addrs = np.concatenate([t.addrs[r] for t, r in zip(tables, rows_per_table, strict=True)])
    del rows_per_table
    # File order: input by input, by address.
    order = np.lexsort((addrs, source))
    source, row, prefix, addrs = source[order], row[order], prefix[order], addrs[order]
    del order
    # A compressed wrapper decodes serially from its start or a checkpoint: each forked
    # shard would decode it again, for compares that cost little beside the decoding.
    streamed = any(r is not None and r.source is not None for r in readers)
    shards = jobs if len(row) >= PARALLEL_MIN_CANDIDATES and not streamed else 1
    # The representatives' budget is shared: each of the shards resolved at once gets a part.
    cands = _Candidates(readers, source, addrs, tables[0].page_size,
                        rep_groups=max(1, REP_GROUPS // shards))
    group = np.searchsorted(wanted, prefix)
    # Workers take the groups a share each (by prefix), each in file order.
    share = group * shards // max(len(wanted), 1)
    shard_members = [np.flatnonzero(share == k) for k in range(shards)]
    threads = compiled.reads_in_place(readers)
    exemplars: dict[int, tuple[int, bytes]] = {}
    if verify:
        parts = map_shards(
            lambda k: _resolve_range(cands, group[shard_members[k]], shard_members[k], top),
            shards, jobs, threads=threads,
        )
        labels = np.empty(len(row), np.int64)
        n = 0
        for members, part in zip(shard_members, parts, strict=True):
            labels[members] = part[0] + n
            exemplars.update({k + n: v for k, v in part[5].items()})
            _prune(exemplars, top)
            n += part[1]
        compares = sum(p[2] for p in parts)
        collisions = sum(p[3] for p in parts)
        full_hashes = sum(p[4] for p in parts)
    elif by_content:
        content = _content_of(tables, readers, source, row, addrs)
        labels = _dense_ids(content[:, 0], content[:, 1], prefix)
        n = int(labels.max()) + 1 if len(labels) else 0
        compares = collisions = 0
        full_hashes = len(row)
    else:
        full = np.empty(len(row), np.uint64)
        hashed = map_shards(lambda k: cands.full_hashes(shard_members[k]), shards, jobs,
                            threads=threads)
        for members, h in zip(shard_members, hashed, strict=True):
            full[members] = h
        labels = _dense_ids(full, prefix)
        n = int(labels.max()) + 1 if len(labels) else 0
        compares = collisions = 0
        full_hashes = len(row)
    for i, content in enumerate(labels_of):
        mine = source == i
        content[row[mine]] = labels[mine] + first_class
    return labels, n, compares, collisions, full_hashes, exemplars


def _content_of(tables: Sequence[Fingerprints], readers: Sequence[DumpReader | None],
                source: np.ndarray, row: np.ndarray, addrs: np.ndarray) -> np.ndarray:
    """xxh3-128 of each candidate's page: stored in its fingerprints, or read from its dump."""

    content = np.empty((len(row), 2), np.uint64)
    for i, (t, r) in enumerate(zip(tables, readers, strict=True)):
        mine = np.flatnonzero(source == i)
        if not len(mine):
            continue
        if t.content is not None:
            content[mine] = t.content[row[mine]]
        elif r is not None:
            content[mine] = content_hashes(r, addrs[mine])
        else:
            raise InputError("its dump is not readable here and its fingerprints carry no "
                             "content hashes (make them with ksm-analyze fingerprint)",
                             path=t.path)
    return content


_CONTENT_BLOCK = 4096  # pages read at a time for content hashes
CHECK_SAMPLE = 4096
"""Pages besides the candidates whose prefix hash :func:`check_unchanged` checks, spread
evenly over an input's stored pages."""


def check_unchanged(fp: Fingerprints, reader: DumpReader, candidates: np.ndarray) -> None:
    """Check the pages of ``reader`` at rows ``candidates`` of ``fp`` (fingerprints kept in a
    file or the cache), and a sample of CHECK_SAMPLE other rows, against ``fp``'s prefix
    hashes: a dump rewritten in place with its size and mtime restored would otherwise give
    a hybrid answer, old prefixes and new bytes. Stage 2 decides from the candidates' bytes
    past their prefixes, so checking the prefixes of the candidates is enough for them; the
    sample catches a dump rewritten as a whole.

    Raises:
        InputError: ``FILE: does not match its dump DUMP (page at address 0x...): the dump
            changed since it was fingerprinted, or this file is damaged``.
    """
    sample = np.linspace(0, len(fp.addrs) - 1, min(CHECK_SAMPLE, len(fp.addrs))).astype(np.int64)
    rows = np.union1d(candidates.astype(np.int64), sample)
    rows = rows[np.argsort(fp.addrs[rows], kind="stable")]  # file order
    nbytes = fp.prefix_bytes
    for lo in range(0, len(rows), _CONTENT_BLOCK):
        at = rows[lo : lo + _CONTENT_BLOCK]
        pages = reader.read_pages(fp.addrs[at])
        if compiled.usable(pages):
            now = compiled.prefix_hashes(pages, nbytes)
        else:
            now = np.zeros(len(pages), np.uint64)
            nonzero = pages.view(np.uint64).any(axis=1)
            now[nonzero] = xxh3_64_rows(np.ascontiguousarray(pages[nonzero, :nbytes]))
            now[nonzero & (now == 0)] = 1  # as stage 1: 0 means "zero page"
        bad = np.flatnonzero(now != fp.prefix[at])
        if len(bad):
            raise InputError(
                f"does not match its dump {reader.name} (page at address "
                f"{int(fp.addrs[at[bad[0]]]):#x}): the dump changed since it was "
                "fingerprinted, or this file is damaged",
                path=str((fp.source or {}).get("file", fp.path)))


def content_hashes(reader: DumpReader, addrs: np.ndarray) -> np.ndarray:
    """``(n, 2)`` uint64: xxh3-128 (low, high) of the stored pages at ``addrs``; 0 for a page
    of zeros."""
    out = np.zeros((len(addrs), 2), np.uint64)
    for lo in range(0, len(addrs), _CONTENT_BLOCK):
        pages = reader.read_pages(addrs[lo : lo + _CONTENT_BLOCK])
        out[lo : lo + len(pages)] = page_contents(pages)
    return out


def page_contents(pages: np.ndarray, zero: np.ndarray | None = None) -> np.ndarray:
    """``(n, 2)`` uint64: xxh3-128 (low, high) of each page of ``pages`` ``(n, page_size)``;
    0 for a page of zeros (``zero``: which pages are, if known: they are not read)."""
    import xxhash

    digest = xxhash.xxh3_128_intdigest
    out = np.zeros((len(pages), 2), np.uint64)
    rows = np.flatnonzero(pages.any(axis=1) if zero is None else ~zero)
    # The C library per page: one pass over 4 KiB at memory speed (0.3 us), faster than
    # any numpy formulation of a 128-bit hash.
    values = [digest(pages[i]) for i in rows.tolist()]
    out[rows, 0] = [v & 0xFFFFFFFFFFFFFFFF for v in values]
    out[rows, 1] = [v >> 64 for v in values]
    return out
