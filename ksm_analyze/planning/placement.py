"""Placement: which inputs share a host, and how many hosts they need.

Every number comes from the core :class:`~ksm_analyze.content_table.ContentTable`, exactly: a
host's memory is the memory after KSM of its inputs (pages left after merging, plus one
64-byte rmap_item per scanned page), the same number ``scan`` prints for those inputs. A
host is held as its copies per content class, so the memory one more input would add (its
*marginal footprint*) costs one pass over that input's classes, and a placement tries many
groupings without analysing any of them again.

Placements:

* ``sharing``: sharing-aware best-fit decreasing. Inputs by their own footprint, largest
  first, each onto the open host where it adds the least memory among those where it fits
  (ties: the host it leaves fullest), a new host where it fits none. Afterwards, local
  improvement: the emptiest host is dissolved when its inputs fit elsewhere. The same
  improvement is made to first-fit's hosts (feasible with sharing too: a host's memory
  after KSM is at most the sum of its inputs' own) and, up to 2,000 inputs, to the hosts
  of the seed-and-grow order (a host starts with the largest input left, then takes the
  input that adds least while one fits: it collects inputs that share much, but packs
  mixed sizes poorly); the fewer hosts win (then the least memory), so never more hosts
  than first-fit. Cost: best-fit, one pass over an input's classes per open host,
  O(inputs x hosts x classes of an input); seed-and-grow, one pass over the remaining
  inputs' classes per input placed, O(inputs^2 x classes of an input).
* ``first_fit``: sharing-oblivious first-fit decreasing: inputs by their own footprint
  (KSM within the input only), each into the first host where the sum of footprints fits.
* the lower bound: every input on one infinitely large host, divided by the host size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..content_table import ContentTable
from ..ksm import (
    ROWS_AT_ONCE,
    KsmSettings,
    content_chunks,
    memory_after,
    merged_pages,
    row_digests,
    run_ranks,
)
from ..units import counted, size_text

if TYPE_CHECKING:
    from ..analysis import Analysis
    from ..whatif.compression import Compressed

__all__ = ["HostModel", "HostState", "Placement", "first_fit", "host_tables", "lower_bound",
           "place", "split", "spread", "unmerged_bytes"]


def unmerged_bytes(analysis: Analysis) -> np.ndarray:
    """Bytes per input (``per_input`` order) a host holds that KSM never scans: for an input
    whose VM configuration opts out of KSM (``--vm-config``, exclusion rule ``vm_config``),
    its pages that rule keeps from KSM (every page the other rules would have left to
    KSM: for a guest's dump, every page stored in it, zero pages included) times the page
    size; 0 for every other input. Its RAM costs the host all of that, unmerged."""
    pages = np.asarray(analysis.columns["exclusions"]["vm_config"], np.int64)
    out: np.ndarray = pages * analysis.contents.page_size
    return out


def _saved(copies: np.ndarray, max_page_sharing: int) -> np.ndarray:
    """Pages KSM frees for contents seen ``copies`` times (elementwise)."""
    ksm, unshared = merged_pages(copies, max_page_sharing)
    saved: np.ndarray = np.asarray(copies, np.int64) - ksm - unshared
    return saved


class HostModel:
    """The inputs of a table as candidates for hosts: footprints, exact and incremental.

    Content classes that every input holds alike (the same inputs, the same pages each: the
    pages of a shared base image, say) behave alike on every host, so they are kept as one
    *pattern* with a weight, the number of classes following it. A host is its copies per
    pattern; an input is its pages per pattern. With one base image under hundreds of guests,
    hundreds of thousands of classes become a handful of patterns.

    Args:
        table: the core table of every input to place.
        settings: the KSM knobs.
        zero_pages: count scanned zero pages as present on the host (the default, as
            ``scan``'s ``with_zero_pages`` column); False: as never touched.
        unmerged: bytes per input that KSM never scans but the host holds (an input whose
            VM configuration opts out of KSM, :func:`unmerged_bytes`): added whole to its
            host's memory before and after KSM, merging with nothing. None: 0 for every
            input.
    """

    def __init__(self, table: ContentTable, settings: KsmSettings, *, zero_pages: bool = True,
                 unmerged: np.ndarray | Sequence[int] | None = None) -> None:
        self.table, self.settings = table, settings
        self.n = len(table.input_columns)
        self.unmerged = (np.zeros(self.n, np.int64) if unmerged is None
                         else np.asarray(unmerged, np.int64))
        if self.unmerged.shape != (self.n,):
            raise ValueError(f"unmerged: {len(self.unmerged)} values for {self.n} inputs")
        self.nonzero = table.nonzero_pages()
        self.zero = table.column("zero_pages") * zero_pages
        self.domain = table.column("domain")  # zero pages merge within one
        pattern_rows, self.pattern, self.weight = _patterns(table)
        self.n_patterns = len(self.weight)
        owner, self.pages = table.owner[pattern_rows], table.pages[pattern_rows]
        by_input = np.argsort(owner, kind="stable")
        bounds = np.searchsorted(owner[by_input], np.arange(self.n + 1))
        self.rows = [by_input[a:b] for a, b in itertools.pairwise(bounds.tolist())]
        self.owner = owner
        self.alone = np.array([self.footprint([i]) for i in range(self.n)], np.int64)

    def empty(self) -> HostState:
        """A host holding nothing yet."""
        zero = np.zeros(int(self.domain.max(initial=0)) + 1, np.int64)
        return HostState(np.zeros(self.n_patterns, np.int64), [], 0, zero, 0, 0)

    def holding(self, inputs: Sequence[int]) -> HostState:
        """A host holding ``inputs``."""
        host = self.empty()
        for i in inputs:
            self.add(host, i)
        return host

    def footprint(self, inputs: Sequence[int]) -> int:
        """Bytes a host holding ``inputs`` needs after KSM (pages plus rmap_items)."""
        return self.bytes(self.holding(inputs))

    def bytes(self, host: HostState) -> int:
        """Memory after KSM of ``host``, rmap_items included (and its inputs' unmerged
        bytes)."""
        s, zero = self.settings, int(host.zero.sum())
        zero_saved = zero if s.use_zero_pages else int(_saved(host.zero, s.max_page_sharing).sum())
        pages = host.nonzero + zero - host.saved - zero_saved
        rmap = host.nonzero + (0 if s.use_zero_pages else zero)
        return memory_after(pages, rmap, self.table.page_size,
                            self.settings.rmap_bytes) + host.unmerged

    def before(self, inputs: Sequence[int]) -> int:
        """Bytes ``inputs`` take before KSM (every scanned page, and their unmerged bytes)."""
        idx = list(inputs)
        return (int(self.nonzero[idx].sum() + self.zero[idx].sum()) * self.table.page_size
                + int(self.unmerged[idx].sum()))

    def _gain(self, host: HostState, rows: np.ndarray, sign: int) -> np.ndarray:
        """Pages KSM frees more when the pages of ``rows`` join (+1) or leave (-1) ``host``."""
        g, p = self.pattern[rows], self.pages[rows]
        h, mps = host.counts[g], self.settings.max_page_sharing
        after, before = (h + p, h) if sign > 0 else (h, h - p)
        gain: np.ndarray = (_saved(after, mps) - _saved(before, mps)) * self.weight[g]
        return gain

    def add(self, host: HostState, i: int) -> None:
        """Put input ``i`` on ``host``."""
        rows = self.rows[i]
        host.saved += int(self._gain(host, rows, +1).sum())
        host.counts[self.pattern[rows]] += self.pages[rows]
        host.nonzero += int(self.nonzero[i])
        host.zero[self.domain[i]] += self.zero[i]
        host.unmerged += int(self.unmerged[i])
        host.inputs.append(i)

    def remove(self, host: HostState, i: int) -> None:
        """Take input ``i`` off ``host``."""
        rows = self.rows[i]
        host.saved -= int(self._gain(host, rows, -1).sum())
        host.counts[self.pattern[rows]] -= self.pages[rows]
        host.nonzero -= int(self.nonzero[i])
        host.zero[self.domain[i]] -= self.zero[i]
        host.unmerged -= int(self.unmerged[i])
        host.inputs.remove(i)

    def marginal(self, host: HostState, candidates: np.ndarray) -> np.ndarray:
        """Bytes each of ``candidates`` would add to ``host``, all in one pass."""
        s, ps, mps = self.settings, self.table.page_size, self.settings.max_page_sharing
        rows = np.concatenate([self.rows[i] for i in candidates.tolist()] or [candidates])
        saved = np.bincount(self.owner[rows], weights=self._gain(host, rows, +1),
                            minlength=self.n).astype(np.int64)[candidates]
        z = self.zero[candidates]
        if s.use_zero_pages:
            zero_saved, rmap = z, self.nonzero[candidates]
        else:
            had = host.zero[self.domain[candidates]]
            zero_saved = _saved(had + z, mps) - _saved(had, mps)
            rmap = self.nonzero[candidates] + z
        pages = self.nonzero[candidates] + z - saved - zero_saved
        added: np.ndarray = memory_after(pages, rmap, ps, s.rmap_bytes) + self.unmerged[candidates]
        return added

    def marginals(self, hosts: Sequence[HostState], i: int) -> np.ndarray:
        """Bytes input ``i`` would add to each of ``hosts``, all in one pass."""
        s, mps = self.settings, self.settings.max_page_sharing
        rows = self.rows[i]
        g, p = self.pattern[rows], self.pages[rows]
        had = np.array([h.counts[g] for h in hosts], np.int64).reshape(len(hosts), len(g))
        saved = ((_saved(had + p, mps) - _saved(had, mps)) * self.weight[g]).sum(axis=1)
        z, nonzero = int(self.zero[i]), int(self.nonzero[i])
        if s.use_zero_pages:  # every zero page merged, none tracked
            zero_saved, tracked = np.full(len(hosts), z, np.int64), nonzero
        else:
            zeros = np.array([h.zero[self.domain[i]] for h in hosts], np.int64)
            zero_saved, tracked = _saved(zeros + z, mps) - _saved(zeros, mps), nonzero + z
        pages = nonzero + z - saved - zero_saved
        rmap = np.full(len(hosts), tracked, np.int64)
        added: np.ndarray = (memory_after(pages, rmap, self.table.page_size, s.rmap_bytes)
                             + self.unmerged[i])
        return added


def _patterns(table: ContentTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The table rows of one class per pattern (classes held alike), the pattern of each of
    those rows, and each pattern's weight (its number of classes).

    Classes are grouped by a 64-bit digest of their rows, then every class is compared row
    by row (and by length) with its group's first: a class that differs (a digest
    collision) is a pattern of its own, so the grouping is exact.
    """
    content, owner, pages = table.content, table.owner, table.pages
    if not len(content):
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    # Per class: its first row, rows and a digest of both, a chunk of whole classes at a
    # time (temporaries of ROWS_AT_ONCE rows, not of every row; one 64-bit digest sorted:
    # a few words a class).
    parts = []
    for lo, hi in content_chunks(content):
        c = content[lo:hi]
        start = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
        length = np.diff(np.append(start, len(c)))
        parts.append((start + lo, length, row_digests(owner[lo:hi], pages[lo:hi], start,
                                                      length)))
        del c
    first, length, digest = (np.concatenate([p[i] for p in parts]) for i in range(3))
    del parts
    # A group is a run of classes of one digest, in digest order.
    order = np.argsort(digest)
    starts = np.r_[True, digest[order[1:]] != digest[order[:-1]]]
    del digest
    group = np.empty(len(first), np.int64)
    group[order] = np.cumsum(starts) - 1
    rep = order[starts]
    del order, starts
    # Exactness: each class must equal its group's first class, length and row by row (row
    # r of a class is row r - first + first of its group's class; past the table's end
    # where that class is shorter: it differs anyway).
    lone_parts = []
    for lo, hi in content_chunks(content):  # rows [lo, hi): whole classes [a, b)
        a, b = np.searchsorted(first, [lo, hi]).tolist()
        theirs = np.minimum(np.arange(lo, hi) + np.repeat(first[rep[group[a:b]]] - first[a:b],
                                                          length[a:b]), len(content) - 1)
        differs = (owner[lo:hi] != owner[theirs]) | (pages[lo:hi] != pages[theirs])
        differs |= np.repeat(length[a:b] != length[rep[group[a:b]]], length[a:b])
        lone_parts.append(np.searchsorted(first, np.flatnonzero(differs) + lo,
                                          side="right") - 1)
    lone = np.unique(np.concatenate(lone_parts))
    if len(lone):
        group[lone] = len(rep) + np.arange(len(lone))
        rep = np.concatenate([rep, lone])
    weight = np.bincount(group, minlength=len(rep))
    rows = np.repeat(first[rep], length[rep]) + run_ranks(length[rep])
    return rows, np.repeat(np.arange(len(rep)), length[rep]), weight


@dataclass(eq=False)
class HostState:
    """One host of a placement in progress: copies per class, and what they add up to.
    Equal only to itself (a list of hosts removes the one it is given)."""

    counts: np.ndarray
    inputs: list[int]
    nonzero: int
    zero: np.ndarray
    """Zero pages per domain."""
    saved: int
    """Non-zero pages KSM frees on this host."""
    unmerged: int = 0
    """Bytes of its inputs KSM never scans (:attr:`HostModel.unmerged`)."""


@dataclass(frozen=True)
class Placement:
    """Inputs assigned to hosts by one method.

    Attributes:
        method: ``sharing`` or ``first_fit``.
        hosts: per host, the positions of its inputs in the table.
    """

    method: str
    hosts: list[list[int]]


def host_tables(table: ContentTable, hosts: Sequence[Sequence[int]]) -> Iterator[ContentTable]:
    """``table.subset(inputs)`` for the ``inputs`` of each host in turn, no input on two
    hosts: one pass over the sparse rows for all of them (a stable sort by host, a radix sort
    of 16-bit keys for fewer than 32,768 hosts), not one each (a plan of 2,000 guests on 130
    hosts: 70 million rows, 130 times)."""
    host_of = np.full(len(table.input_columns), len(hosts),
                      np.int16 if len(hosts) < (1 << 15) - 1 else np.int64)
    for k, inputs in enumerate(hosts):
        if np.any(host_of[list(inputs)] != len(hosts)) or len(set(inputs)) != len(inputs):
            raise ValueError("an input is on two hosts")
        host_of[list(inputs)] = k
    row_host = host_of[table.owner]
    counts = np.bincount(row_host, minlength=len(hosts) + 1)
    bounds = np.r_[0, np.cumsum(counts)]
    # Each host's rows in table order (a stable counting sort, a chunk of rows at a time:
    # int32 positions, no int64 sort index of every row).
    order = np.empty(len(row_host), np.int32 if len(row_host) < 1 << 31 else np.int64)
    at = bounds[:-1].copy()
    for lo in range(0, len(row_host), ROWS_AT_ONCE):
        h = row_host[lo:lo + ROWS_AT_ONCE]
        local = np.argsort(h, kind="stable")
        c = np.bincount(h, minlength=len(hosts) + 1)
        order[np.repeat(at - (np.cumsum(c) - c), c) + np.arange(len(h))] = local + lo
        at += c
    bounds = bounds.tolist()
    del row_host
    for k, inputs in enumerate(hosts):
        rows = order[bounds[k]:bounds[k + 1]]
        renumber = np.full(len(table.input_columns), -1, np.int32)
        renumber[list(inputs)] = np.arange(len(inputs), dtype=np.int32)
        content, owner, pages = table.content[rows], renumber[table.owner[rows]], table.pages[rows]
        if list(inputs) != sorted(inputs):  # the new input order within each content
            again = np.lexsort((owner, content))
            content, owner, pages = content[again], owner[again], pages[again]
        yield ContentTable(table.input_columns.take(list(inputs)), content, owner, pages,
                           table.page_size)
        del content, owner, pages  # the next host's are made without this one's


def _too_big(model: HostModel, capacity: int) -> None:
    big = np.flatnonzero(model.alone > capacity)
    if len(big):
        i = int(big[0])
        raise ValueError(f"{model.table.names[i]} alone needs {size_text(int(model.alone[i]))} "
                         f"after KSM, more than a host holds: {size_text(capacity)}")


def place(model: HostModel, capacity: int) -> Placement:
    """Sharing-aware placement into hosts of ``capacity`` bytes (see the module doc)."""
    _too_big(model, capacity)
    orders = [_best_fit(model, capacity), first_fit(model, capacity).hosts]
    if model.n <= GROW_INPUTS:
        orders.append(_grow(model, capacity))
    best: list[HostState] | None = None
    for groups in orders:
        hosts = [model.holding(inputs) for inputs in groups]
        _dissolve(model, hosts, capacity)
        if best is None or _fewer(model, hosts, best):
            best = hosts
    assert best is not None
    return Placement("sharing", [sorted(h.inputs) for h in best])


GROW_INPUTS = 2000
"""Inputs up to which :func:`place` also tries the seed-and-grow order (:func:`_grow`): its
cost grows with the square of the inputs (4 s for 2,000 guests of 1 to 64 GiB on 63 hosts,
48 s for 5,000 smaller ones on 163)."""


def _grow(model: HostModel, capacity: int) -> list[list[int]]:
    """Seed and grow: a host starts with the largest input left, then takes the input that
    adds the least memory while one fits; then a new host. Collects inputs that share
    much, but fills hosts with small inputs first: more hosts than best-fit on mixed sizes."""
    left = set(range(model.n))
    hosts: list[list[int]] = []
    while left:
        host = model.empty()
        seed = max(left, key=lambda i: (model.alone[i], -i))
        model.add(host, seed)
        left.discard(seed)
        used = model.bytes(host)
        while left:
            cand = np.array(sorted(left))
            added = model.marginal(host, cand)
            fits = used + added <= capacity
            if not fits.any():
                break
            best = int(cand[fits][np.argmin(added[fits])])
            model.add(host, best)
            used += int(added[fits].min())
            left.discard(best)
        hosts.append(host.inputs)
    return hosts


def _fewer(model: HostModel, hosts: list[HostState], than: list[HostState]) -> bool:
    """Whether ``hosts`` are fewer than ``than``, or as many holding less memory in all."""
    return (len(hosts), sum(map(model.bytes, hosts))) < (len(than), sum(map(model.bytes, than)))


def _best_fit(model: HostModel, capacity: int) -> list[list[int]]:
    """Sharing-aware best-fit decreasing: inputs by their own footprint, largest first, each
    onto the host where it adds least (then the one it leaves fullest, then the first)
    among those where it fits; a new host where it fits none."""
    hosts: list[HostState] = []
    used = np.zeros(0, np.int64)
    for i in sorted(range(model.n), key=lambda i: (-model.alone[i], i)):
        added = model.marginals(hosts, i)
        fits = np.flatnonzero(used + added <= capacity)
        if len(fits):
            k = int(fits[np.lexsort((fits, -(used[fits] + added[fits]), added[fits]))[0]])
            model.add(hosts[k], i)
            used[k] += added[k]
        else:
            hosts.append(model.holding([i]))
            used = np.append(used, model.alone[i])
    return [h.inputs for h in hosts]


def _dissolve(model: HostModel, hosts: list[HostState], capacity: int) -> None:
    """Empty the least used host into the others while its inputs fit there (moves)."""
    while len(hosts) > 1:
        victim = min(hosts, key=model.bytes)
        others = [h for h in hosts if h is not victim]
        used = np.array([model.bytes(h) for h in others], np.int64)
        moves = []
        for i in sorted(victim.inputs, key=lambda i: -model.alone[i]):
            added = model.marginals(others, i)
            fits = np.flatnonzero(used + added <= capacity)
            if not len(fits):
                break
            k = int(fits[np.lexsort((fits, added[fits]))[0]])
            model.add(others[k], i)
            used[k] += added[k]
            moves.append((k, i))
        if len(moves) < len(victim.inputs):
            for k, i in moves:  # undo: this host cannot be emptied
                model.remove(others[k], i)
            return
        hosts.remove(victim)


def first_fit(model: HostModel, capacity: int) -> Placement:
    """Sharing-oblivious first-fit decreasing by each input's own footprint."""
    _too_big(model, capacity)
    loads: list[int] = []
    hosts: list[list[int]] = []
    for i in sorted(range(model.n), key=lambda i: (-model.alone[i], i)):
        k = next((k for k, load in enumerate(loads) if load + model.alone[i] <= capacity),
                 len(loads))
        if k == len(loads):
            loads.append(0)
            hosts.append([])
        loads[k] += int(model.alone[i])
        hosts[k].append(i)
    return Placement("first_fit", [sorted(h) for h in hosts])


def lower_bound(model: HostModel, capacity: int) -> int:
    """Hosts no placement can beat: all inputs' footprint together over the host size."""
    return max(1, math.ceil(model.footprint(range(model.n)) / capacity)) if model.n else 0


def spread(model: HostModel, capacity: int, hosts: int) -> Placement:
    """Sharing-aware placement onto exactly ``hosts`` hosts, every one holding an input.

    Two candidates; the one whose fullest host holds least wins (then the least memory in
    all). *Tightest*: the sharing-aware placement of :func:`place` into hosts made as small
    as still gives at most ``hosts`` of them (a bisection of the host size), then split
    over the rest (:func:`split`): inputs that share stay together. *Balanced*: seeds the
    largest input, then each time the input that adds most memory to a host holding every
    seed so far (the one sharing least with them), one per host; then the other inputs,
    largest first, each onto the host it leaves least full among those where it fits.

    Raises:
        ValueError: more hosts than inputs, an input that alone does not fit a host, or
            inputs that neither way fit on ``hosts`` hosts.
    """
    if hosts > model.n:
        raise ValueError(f"--hosts {hosts:,} is more hosts than the "
                         f"{counted(model.n, 'input')}: every host needs at least one")
    _too_big(model, capacity)
    packed = place(model, capacity).hosts
    candidates = [] if len(packed) > hosts else [
        split(model, _tightest(model, capacity, hosts, packed), hosts)]
    balanced = _balanced(model, capacity, hosts)
    if balanced is not None:
        candidates.append(balanced)
    if not candidates:
        raise ValueError(
            f"the inputs do not fit on {counted(hosts, 'host')} of {size_text(capacity)} for "
            f"inputs: the sharing-aware placement needs {len(packed)} (no placement can use "
            f"fewer than {lower_bound(model, capacity)})")

    def fullest_then_total(p: list[list[int]]) -> tuple[int, int]:
        loads = [model.footprint(h) for h in p]
        return max(loads), sum(loads)

    return Placement("sharing", min(candidates, key=fullest_then_total))


TIGHTEN_STEPS = 12
"""Bisection steps of :func:`spread`'s host size (to 1/4096 of the range)."""


def _tightest(model: HostModel, capacity: int, hosts: int, packed: list[list[int]]
              ) -> list[list[int]]:
    """The sharing-aware placement into the smallest host size (down to the largest input
    alone) that still needs at most ``hosts`` hosts; ``packed`` is that of ``capacity``."""
    lo, hi, best = int(model.alone.max()), max(model.footprint(h) for h in packed), packed
    for _ in range(TIGHTEN_STEPS):
        if hi - lo <= model.table.page_size:
            break
        mid = (lo + hi) // 2
        trial = place(model, mid).hosts
        if len(trial) <= hosts:
            hi, best = mid, trial
        else:
            lo = mid
    return best


def _balanced(model: HostModel, capacity: int, hosts: int) -> list[list[int]] | None:
    """The balanced greedy of :func:`spread`, or None where an input fits on no host."""
    states = [model.empty() for _ in range(hosts)]
    union = model.empty()  # every seed: the next seed is what adds most to it
    left = list(range(model.n))
    for state in states:
        cand = np.array(left)
        added = model.marginal(union, cand)
        seed = int(cand[np.lexsort((cand, -model.alone[cand], -added))[0]])
        model.add(union, seed)
        model.add(state, seed)
        left.remove(seed)
    for i in sorted(left, key=lambda i: (-model.alone[i], i)):
        options = []
        for k, h in enumerate(states):
            after = model.bytes(h) + int(model.marginal(h, np.array([i]))[0])
            if after <= capacity:
                options.append((after, k))
        if not options:
            return None
        model.add(states[min(options)[1]], i)
    return [sorted(h.inputs) for h in states]


def split(model: HostModel, packed: list[list[int]], hosts: int) -> list[list[int]]:
    """``packed`` (a placement on at most ``hosts`` hosts) spread to exactly ``hosts``: while
    a host is empty, the input whose leaving frees most on the fullest host of two or more
    inputs (the one sharing least there) moves to it. Taking an input off a host never adds
    memory to it, and every input fits a host alone, so every host still fits."""
    states = [model.empty() for _ in range(hosts)]
    for state, inputs in zip(states, packed, strict=False):
        for i in inputs:
            model.add(state, i)
    for empty in states[len(packed):]:
        donor = max((h for h in states if len(h.inputs) > 1), key=model.bytes)
        cheapest = min(donor.inputs, key=lambda i: (
            model.footprint([j for j in donor.inputs if j != i]) - model.bytes(donor), i))
        model.remove(donor, cheapest)
        model.add(empty, cheapest)
    return [sorted(h.inputs) for h in states]


class CompressedModel:
    """The inputs of a table as zram would hold them after KSM: a host's footprint is its
    distinct non-zero contents compressed (``--compress``; zero pages cost nothing).

    Each duplicated content is priced once per host (one page of it is compressed), each
    unique page where it lies (:class:`~ksm_analyze.whatif.compression.Compressed`).
    """

    def __init__(self, table: ContentTable, compressed: Compressed) -> None:
        if compressed.sample:
            raise ValueError("plan --compress prices every page a host holds: drop "
                             "--compress-sample")
        self.table, self.n = table, len(table.input_columns)
        zram = compressed.content_costs[:, 1]  # zram bytes of one page of each content
        self.unique = compressed.unique_costs[:, 1]
        at = np.searchsorted(compressed.content, table.content)
        self.cost = zram  # by position in compressed.content
        by_input = np.argsort(table.owner, kind="stable")
        bounds = np.searchsorted(table.owner[by_input], np.arange(self.n + 1))
        self.contents = [np.unique(at[by_input[a:b]]) for a, b in
                         itertools.pairwise(bounds.tolist())]
        self.alone = np.array([self.unique[i] + int(zram[c].sum())
                               for i, c in enumerate(self.contents)], np.int64)

    def footprint(self, inputs: Sequence[int]) -> int:
        """zram bytes of a host holding ``inputs``."""
        held = np.unique(np.concatenate([self.contents[i] for i in inputs] or
                                        [np.empty(0, np.int64)]))
        return int(self.unique[list(inputs)].sum() + self.cost[held].sum())


def place_compressed(model: CompressedModel, capacity: int) -> Placement:
    """Best-fit decreasing on zram footprints: inputs largest first, each onto the host
    where it adds the fewest compressed bytes (its unique pages, and the contents that host
    does not hold yet) among those it fits, else onto a new host. Method ``sharing_zram``.

    Raises:
        ValueError: an input alone needs more than ``capacity``.
    """
    big = np.flatnonzero(model.alone > capacity)
    if len(big):
        i = int(big[0])
        raise ValueError(f"{model.table.names[i]} alone needs {size_text(int(model.alone[i]))} "
                         f"compressed after KSM, more than a host holds: {size_text(capacity)}")
    hosts: list[list[int]] = []
    held: list[np.ndarray] = []  # bool per content, per host
    used: list[int] = []
    for i in np.argsort(-model.alone, kind="stable").tolist():
        mine = model.contents[i]
        best, best_add = -1, 0
        for k in range(len(hosts)):
            add = int(model.unique[i] + model.cost[mine[~held[k][mine]]].sum())
            if used[k] + add <= capacity and (best < 0 or add < best_add):
                best, best_add = k, add
        if best < 0:
            hosts.append([])
            held.append(np.zeros(len(model.cost), bool))
            used.append(0)
            best, best_add = len(hosts) - 1, int(model.alone[i])
        hosts[best].append(i)
        held[best][mine] = True
        used[best] += best_add
    return Placement("sharing_zram", [sorted(h) for h in hosts])
