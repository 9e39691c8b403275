"""ksmd replayed full scan by full scan over a :class:`Timeline`: what KSM keeps, and when.

One full scan is one step, done with numpy over all pages at once (no Python per page).
The rules follow ``mm/ksm.c`` (``scan_get_next_rmap_item()``, ``should_skip_rmap_item()``,
``cmp_and_merge_page()``), switched by :class:`KernelRules`; ``docs/model.md`` ("The time
model") states each one and what is approximated.

Per page the state is the kernel's ``rmap_item``: whether it exists, its smart_scan ``age``
and ``remaining_skips``, when its checksum was last taken, the KSM page (stable node) it
is mapped to, and whether it sits in the unstable tree. A page with change rate ``λ``
changes between two checksums ``g`` seconds apart with probability ``1 - exp(-λ g)``,
drawn (Monte Carlo, ``seed``); rates 0 and ``inf`` are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from ..ksm import KsmCounters
from .knobs import Knobs
from .rules import KernelRules
from .timeline import Timeline

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "COUNTER_COLUMNS",
    "SMART_SCAN_PERIOD",
    "AdvisorLike",
    "ScanTimer",
    "ScanWork",
    "Trajectory",
    "simulate",
    "sleep_only_scan_time",
    "steady_state",
]

SMART_SCAN_PERIOD = 9
"""A page that keeps failing is processed on one full scan in 9 (8 skips, ``skip_age``)."""
_TRANSIENT_SCANS = 22
"""A new page is processed on scans a, a+1, a+2, a+3, a+5, a+8, a+13, then a+22 + 9k."""
_AGE_MAX = 255  # rmap_item->age is a saturating u8
COUNTER_COLUMNS = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                   "pages_skipped", "ksm_zero_pages", "ksm_rmap_items", "general_profit")
_STEADY_TOLERANCE = 0.005
_QUANTILES = np.linspace(0.0, 1.0, 101)
"""Where a scan's merges fall is kept as these quantiles of their places in the scan."""
"""Two successive windows agree when their means differ by at most 0.5% (or one page)."""

class ScanWork(NamedTuple):
    """What a full scan does, for its time: pages processed and skipped, of the processed
    those already KSM pages, the merges it makes (KSM pages made or joined, zero pages
    mapped), and the pages visited for the first time (no tree search)."""

    processed: int
    skipped: int
    ksm_pages: int = 0
    merges: int = 0
    first_visits: int = 0


ScanTimer = Callable[[ScanWork, Knobs], tuple[float, float]]
"""``(processed, skipped, knobs) -> (wall_seconds, cpu_seconds)`` of one full scan."""


class AdvisorLike(Protocol):
    """The scan-time advisor: ``pages_to_scan`` now, and its update after a full scan."""

    @property
    def pages_to_scan(self) -> int: ...

    def after_scan(self, wall_seconds: float, cpu_seconds: float) -> int: ...


def sleep_only_scan_time(work: ScanWork, knobs: Knobs) -> tuple[float, float]:
    """A full scan's time counting only ksmd's sleeps: one wake-up per ``pages_to_scan``
    processed pages (skipped pages do not count), ``sleep_millisecs`` each, no CPU time.

    The default when no CPU cost model is given: a lower bound on the wall time.
    """
    wakeups = max(1, -(-work.processed // knobs.pages_to_scan))
    return wakeups * knobs.sleep_millisecs / 1000.0, 0.0


@dataclass(frozen=True)
class Trajectory:
    """ksmd's counters full scan by full scan, and what they settle at.

    Attributes:
        scans: one row per full scan: ``full_scans``, ``time_seconds`` (at the scan's end),
            ``pages_to_scan``, the :data:`COUNTER_COLUMNS` (as ``/sys/kernel/mm/ksm`` shows
            them after that scan; ``pages_scanned``, the pages processed, and
            ``pages_skipped`` cumulative), ``ksmd_cpu_percent``.
        steady: the counters in steady state: each the mean over the last
            :data:`SMART_SCAN_PERIOD` scans, rounded (``None`` when not steady within the
            scans run).
        steady_scan: the first full scan (1-based) from which ``pages_shared``,
            ``pages_sharing`` and ``general_profit`` stay within their steady band: the
            mean of the last 9 scans +- max(0.5%, 3 standard deviations over the last 18
            scans, half a page). The replay stops once two successive 9-scan windows agree
            (within 0.5% or one page), and not before smart_scan's first 22 scans plus two
            windows.
        time_to: seconds (end of the full scan) until ``general_profit`` first reaches 50%
            and 90% of its steady value, and until steady state (keys ``"50%"``, ``"90%"``,
            ``"steady"``); ``None`` where not reached or the steady profit is not positive.
        scans_to: the same in full scans.
        late_duplicates: pages aged by KSM before they took their content (``Timeline.aged``)
            whose content another page holds too.
        late_duplicates_merged: of those, how many are merged at the end.
        if_phases_met: the steady counters if the late duplicates' smart_scan phases met
            (as if all processed on the same scans): an upper bound; ``None`` when there are
            none or smart_scan is off.
    """

    columns: dict[str, np.ndarray]
    """The rows of :attr:`scans` as plain columns (no pandas): what the library reads."""
    steady: KsmCounters | None
    steady_scan: int | None
    time_to: dict[str, float | None]
    scans_to: dict[str, int | None]
    late_duplicates: int
    late_duplicates_merged: int
    if_phases_met: KsmCounters | None

    @property
    def scans(self) -> pd.DataFrame:
        """One row per full scan (made when read: the library needs no pandas)."""
        import pandas as pd

        return pd.DataFrame(self.columns)


def _skip_age(age: np.ndarray) -> np.ndarray:
    """``skip_age()``: 1 for age <= 3, 2 for <= 5, 4 for <= 8, else 8."""
    return np.select([age <= 3, age <= 5, age <= 8], [1, 2, 4], 8).astype(np.int16)


def _dense(values: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, inverse = np.unique(values, return_inverse=True)
    return inverse.astype(np.int64), len(uniq)


def _ranks(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable order of ``groups`` and, in that order, each entry's rank within its group."""
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    start = np.ones(len(g), bool)
    start[1:] = g[1:] != g[:-1]
    first = np.flatnonzero(start)
    rank = np.arange(len(g)) - np.repeat(first, np.diff(np.append(first, len(g))))
    return order, rank


class _Nodes:
    """KSM pages (stable nodes): their content; membership is ``node`` per page."""

    def __init__(self) -> None:
        self.content = np.empty(0, np.int64)

    def counts(self, node: np.ndarray) -> np.ndarray:
        return np.bincount(node[node >= 0], minlength=len(self.content)).astype(np.int64)

    def join(self, pages: np.ndarray, content: np.ndarray, node: np.ndarray, mps: int,
             n_contents: int) -> np.ndarray:
        """Attach ``pages`` (indices, scan order) to KSM pages of their content with room
        left, fullest first as the kernel does; returns the mask of those that joined."""
        joined = np.zeros(len(pages), bool)
        if len(pages) == 0 or len(self.content) == 0:
            return joined
        count = self.counts(node)
        free = np.where(count >= 1, np.maximum(mps - count, 0), 0)
        if not free.any():
            return joined
        # Nodes by content, fullest first: their free slots laid end to end per content.
        norder = np.lexsort((-count, self.content))
        nfree = free[norder]
        cum_end = np.cumsum(nfree)
        per_content = np.bincount(self.content, weights=free,
                                  minlength=n_contents).astype(np.int64)
        base = np.concatenate(([0], np.cumsum(per_content)[:-1])).astype(np.int64)
        c = content[pages]
        order, rank = _ranks(c)
        cs = c[order]
        take = rank < per_content[cs]
        key = base[cs[take]] + rank[take]
        slot = np.searchsorted(cum_end, key, side="right")
        node[pages[order[take]]] = norder[slot]
        joined[order[take]] = True
        return joined

    def pair(self, pages: np.ndarray, content: np.ndarray, node: np.ndarray,
             mps: int) -> np.ndarray:
        """The unstable tree: pages of one content merge into new KSM pages of ``mps``
        each, a last one of the rest when >= 2 (``ksm.merged_pages``'s rule); returns the
        mask of those left alone in the tree."""
        alone = np.ones(len(pages), bool)
        if len(pages) == 0:
            return alone
        c = content[pages]
        order, rank = _ranks(c)
        cs = c[order]
        copies = np.bincount(cs)[cs]
        full, rest = np.divmod(copies, mps)
        group = rank // mps
        merges = (group < full) | (rest >= 2)
        if not merges.any():
            return alone
        # New node ids: one per (content, group), in order.
        keys = cs[merges] * (int(rank.max()) // mps + 2) + group[merges]
        uniq, inverse = np.unique(keys, return_inverse=True)
        new_content = uniq // (int(rank.max()) // mps + 2)
        first_id = len(self.content)
        self.content = np.concatenate((self.content, new_content))
        node[pages[order[merges]]] = first_id + inverse
        alone[order[merges]] = False
        return alone


def _run(timeline: Timeline, knobs: Knobs, rules: KernelRules, *, scan_time: ScanTimer,
         advisor: AdvisorLike | None, max_scans: int, seed: int,
         aged_meet: bool) -> tuple[Scans, int, int, list[np.ndarray | None]]:
    n = timeline.pages
    rng = np.random.default_rng(seed)
    smart = knobs.smart_scan and rules.has_smart_scan
    mps = knobs.max_page_sharing if rules.max_page_sharing_limit else np.iinfo(np.int32).max
    content = np.array(timeline.content, np.int64)
    fresh = content < 0  # a content no other page holds: an id of its own here
    content[fresh] = int(content.max(initial=-1)) + 1 + np.arange(int(fresh.sum()))
    content, n_contents = _dense(content)
    copies = np.bincount(content, minlength=n_contents)
    rate = np.asarray(timeline.change_rate, np.float64)
    aged = np.asarray(timeline.aged, bool)
    is_zero = (np.asarray(timeline.content) == timeline.zero_id) if timeline.zero_id >= 0 \
        else np.zeros(n, bool)
    zero_merge = is_zero if knobs.use_zero_pages else np.zeros(n, bool)
    may_merge = (copies[content] >= 2) & ~zero_merge  # a partner exists somewhere
    restrict_aged = smart and not aged_meet

    has_item = aged.copy()
    age = np.where(aged, _AGE_MAX, 0).astype(np.int16)
    if smart and aged.any() and not aged_meet:
        rem = np.where(aged, rng.integers(0, SMART_SCAN_PERIOD, n), 0).astype(np.int16)
    else:
        rem = np.zeros(n, np.int16)
    checked = np.full(n, np.nan)  # when the checksum was last taken; NaN: never
    dirty = aged.copy()  # changed since the last checksum: the next gate fails
    node = np.full(n, -1, np.int64)
    broken = np.zeros(n, bool)  # merged, written since: COW-broken until its next visit
    zero_mapped = np.zeros(n, bool)  # mapped to the zero page: no rmap_item, not scanned
    zero_fresh = np.zeros(n, bool)  # mapped this scan: its rmap_item goes next scan
    nodes = _Nodes()
    t = 0.0
    skipped_total = scanned_total = 0
    rows: list[dict[str, float | int]] = []
    curves: list[np.ndarray | None] = []
    pages_to_scan = advisor.pages_to_scan if advisor is not None else knobs.pages_to_scan

    for scan in range(max_scans):
        has_item[zero_fresh] = False
        zero_fresh[:] = False
        visit = ~zero_mapped
        new = visit & ~has_item
        has_item[new] = True
        age[new] = 0
        rem[new] = 0
        checked[new] = np.nan
        dirty[new] = False

        ksm_page = (node >= 0) & ~broken
        other = visit & ~ksm_page
        skip = np.zeros(n, bool)
        if smart:
            idx = np.flatnonzero(other)
            a = age[idx]
            age[idx] = np.minimum(a + 1, _AGE_MAX)
            old = a >= 3
            reset = old & (rem[idx] == 0)
            rem[idx[reset]] = _skip_age(a[reset])
            sk = idx[old & ~reset]
            rem[sk] -= 1
            skip[sk] = True
        # A visit, processed or skipped, takes a COW-broken page out of its KSM page.
        dirty[broken] = True
        node[broken] = -1
        broken[:] = False

        processed = visit & ~skip
        work = np.flatnonzero(processed & ~ksm_page)
        lam = rate[work]
        gap = t - checked[work]
        with np.errstate(invalid="ignore"):
            held = np.exp(-lam * np.where(np.isnan(gap), 0.0, gap))
        held = np.where(lam == 0, 1.0, np.where(np.isinf(lam), 0.0, held))
        passed = ~np.isnan(gap) & ~dirty[work] & (rng.random(len(work)) < held)
        checked[work] = t
        dirty[work] = False
        gate = work[passed]

        # Joining an existing KSM page: after the gate (6.11+), or before it on older
        # kernels, where any page holding its content (rate 0) joins on any visit.
        seekers = gate[may_merge[gate]]
        if not rules.two_visit_gate:
            still = work[(rate[work] == 0) & may_merge[work]]
            seekers = np.union1d(seekers, still)
        before = node >= 0
        joined = nodes.join(seekers, content, node, mps, n_contents)
        in_gate = np.zeros(n, bool)
        in_gate[gate] = True
        rest = seekers[~joined & in_gate[seekers]]
        zero_now = gate[zero_merge[gate]]
        zero_mapped[zero_now] = True
        zero_fresh[zero_now] = True
        pairing = rest[~aged[rest]] if restrict_aged else rest
        alone = pairing[nodes.pair(pairing, content, node, mps)]
        if restrict_aged:
            late = rest[aged[rest]]
            late = late[~nodes.join(late, content, node, mps, n_contents)]
            alone = np.concatenate((alone, late))
        if not rules.two_visit_gate:  # pages still seeking may join one made this scan
            nodes.join(seekers[~joined & ~in_gate[seekers]], content, node, mps, n_contents)
        unique_gate = gate[~may_merge[gate] & ~zero_merge[gate]]
        unshared = len(alone) + len(unique_gate)

        # Where in the scan the merges fall: profit grows page by page, not at its end.
        order = np.flatnonzero(processed)
        merged = (node >= 0) & ~before
        merged[zero_now] = True
        merged_now = np.flatnonzero(merged)
        # A wake-up processes its pages_to_scan pages at once, then sleeps: a page's place
        # in time is its wake-up's.
        wakeup = np.searchsorted(order, merged_now) // pages_to_scan
        curves.append(_wakeup_quantiles(np.bincount(
            wakeup, minlength=len(order) // pages_to_scan + 1)) if len(merged_now) else None)
        count = nodes.counts(node)
        shared = int((count >= 1).sum())
        sharing = int(count.sum()) - shared
        extra = timeline.first_scan_only if scan == 0 else 0  # zero THP subpages
        rmap = int(has_item.sum()) + extra
        zero_pages = int(zero_mapped.sum())
        n_processed = int(processed.sum()) + extra
        n_skipped = int(skip.sum())
        skipped_total += n_skipped
        scanned_total += n_processed
        done = ScanWork(n_processed, n_skipped, int((processed & ksm_page).sum()),
                        len(merged_now), int(new.sum()) + extra)
        wall, cpu = scan_time(done, replace(knobs, pages_to_scan=pages_to_scan))
        t += wall
        rows.append(_row(scan, t, pages_to_scan, shared, sharing, unshared, zero_pages, rmap,
                         scanned_total, skipped_total, wall, cpu, knobs, rules))
        if advisor is not None:
            pages_to_scan = advisor.after_scan(wall, cpu)

        # Writes until the next visit (about one full scan): merged pages that change
        # break COW (counted until ksmd visits them); zero-page mappings become pages again.
        changing = np.flatnonzero(((node >= 0) | zero_mapped) & (rate > 0))
        if len(changing):
            hit = changing[rng.random(len(changing)) < -np.expm1(-rate[changing] * wall)]
            broken[hit[node[hit] >= 0]] = True
            back = hit[zero_mapped[hit]]
            zero_mapped[back] = False
            zero_fresh[back] = False
            has_item[back] = False
        if len(rows) >= _min_scans(smart) and _settled(rows, knobs.page_size):
            break
    late = aged & may_merge
    return _as_columns(rows), int(late.sum()), int((late & (node >= 0)).sum()), curves


def _run_still(timeline: Timeline, knobs: Knobs, rules: KernelRules, *,
               scan_time: ScanTimer, advisor: AdvisorLike | None, max_scans: int, seed: int,
               aged_meet: bool) -> tuple[Scans, int, int, list[np.ndarray | None]]:
    """:func:`_run` for memory that stands still (no page changes, none aged), in
    O(pages) once and O(1) a scan: every page gets its rmap_item in scan 1 (the checksum
    gate fails), every duplicate merges in scan 2 by ``ksm.merged_pages``' rule, and the
    pages left unmerged share one smart_scan schedule, being all made in scan 1. The same
    rows as :func:`_run` (tests/test_ksmd_model.py compares them)."""
    n = timeline.pages
    smart = knobs.smart_scan and rules.has_smart_scan
    mps = knobs.max_page_sharing if rules.max_page_sharing_limit else np.iinfo(np.int32).max
    content = np.asarray(timeline.content)
    if n and int(content.max()) >= 4 * n:  # ids too sparse to count by
        content = np.where(content >= 0, _dense(np.maximum(content, 0))[0], -1)
    zero_id = timeline.zero_id if knobs.use_zero_pages and timeline.zero_id >= 0 else None
    # Pass 1, a chunk at a time (a few bytes a page at most): each content's copies; a
    # negative id is a content no other page holds.
    top = int(content.max()) + 1 if n else 0
    copies = np.zeros(top, np.int64)
    zero = 0
    for lo, ids, keep in _chunks(content, zero_id):
        zero += len(keep) - int(keep.sum()) - int((content[lo:lo + len(keep)] < 0).sum())
        copies += np.bincount(ids[keep], minlength=top)
    full, rest = np.divmod(copies, mps)
    pairs = copies >= 2
    # The single leftover of a content seen k * mps + 1 times (rare): its last page in scan
    # order, found in a pass over those contents' pages only.
    odd = pairs & (rest == 1)
    last = np.full(top, -1, np.int64)
    if odd.any():
        for lo, ids, keep in _chunks(content, zero_id):
            sel = keep & odd[ids]
            np.maximum.at(last, ids[sel], np.flatnonzero(sel) + lo)
    alone_at = np.sort(last[odd])
    ksm_pages = int((full + (rest >= 2))[pairs].sum())
    merging = int(copies[pairs].sum())
    sharing = merging - len(alone_at) - ksm_pages
    left = len(alone_at) + n - zero - merging  # unshared when processed

    def merged_wakeups(pages_to_scan: int) -> np.ndarray:
        """Pass 2: how many pages merge in each wake-up of full scan 2."""
        counts = np.zeros(n // pages_to_scan + 1, np.int64)
        for lo, ids, keep in _chunks(content, zero_id):
            merged = keep & pairs[ids]
            if zero_id is not None:
                merged |= content[lo:lo + len(keep)] == zero_id
            at = np.flatnonzero(merged) + lo
            at = at[~_member(at, alone_at)]
            counts += np.bincount(at // pages_to_scan, minlength=len(counts))
        return counts

    t = 0.0
    age, remaining = 0, 0
    skipped_total = scanned_total = 0
    rows: list[dict[str, float | int]] = []
    curves: list[np.ndarray | None] = []
    pages_to_scan = advisor.pages_to_scan if advisor is not None else knobs.pages_to_scan
    for scan in range(max_scans):
        # Pages not merged after scan 2 follow one schedule (all made in scan 1).
        processed_rest = True
        if smart and scan >= 2:
            a, age = age, min(age + 1, _AGE_MAX)
            if a >= 3:
                if remaining == 0:
                    remaining = int(_skip_age(np.array([a]))[0])
                else:
                    remaining -= 1
                    processed_rest = False
        elif smart:
            age += 1
        if scan == 0:  # zero THP subpages too, until the first merge splits their THP
            shared_now = sharing_now = unshared = zero_now = 0
            rmap = n_processed = n + timeline.first_scan_only
            n_skipped = 0
            curves.append(None)
        else:
            shared_now, sharing_now, zero_now = ksm_pages, sharing, zero
            rmap = n if scan == 1 else n - zero
            unshared = left if processed_rest else 0
            n_skipped = 0 if processed_rest else left
            n_processed = (n if scan == 1 else n - zero) - n_skipped
            if scan == 1 and merging + zero:
                curves.append(_wakeup_quantiles(merged_wakeups(pages_to_scan)))
            else:
                curves.append(None)
        skipped_total += n_skipped
        scanned_total += n_processed
        done = ScanWork(n_processed, n_skipped, ksm_pages + sharing if scan >= 2 else 0,
                        merging - len(alone_at) + zero if scan == 1 else 0,
                        n_processed if scan == 0 else 0)
        wall, cpu = scan_time(done, replace(knobs, pages_to_scan=pages_to_scan))
        t += wall
        rows.append(_row(scan, t, pages_to_scan, shared_now, sharing_now, unshared, zero_now,
                         rmap, scanned_total, skipped_total, wall, cpu, knobs, rules))
        if advisor is not None:
            pages_to_scan = advisor.after_scan(wall, cpu)
        if len(rows) >= _min_scans(smart) and _settled(rows, knobs.page_size):
            break
    return _as_columns(rows), 0, 0, curves


def _wakeup_quantiles(counts: np.ndarray) -> np.ndarray:
    """:data:`_QUANTILES` of the merges' wake-ups, from how many merges each wake-up of the
    scan made (``counts``), as fractions of the scan's wake-ups: counted rather than sorted
    (wake-ups are few, merges many), the same numbers as ``np.quantile``."""
    at = _QUANTILES * (int(counts.sum()) - 1)
    below, above = np.floor(at).astype(np.int64), np.ceil(at).astype(np.int64)
    ends = np.cumsum(counts)
    lo = np.searchsorted(ends, below, side="right")
    hi = np.searchsorted(ends, above, side="right")
    value: np.ndarray = (lo + (at - below) * (hi - lo)) / len(counts)
    return value


_CHUNK = 1 << 20
"""Pages the still-memory replay counts at a time: its memory stays a few MiB."""


def _chunks(content: np.ndarray, zero_id: int | None
            ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``content`` a chunk at a time: its first page, the ids (negative ones as 0) and
    which pages count by content (id >= 0 and not ``zero_id``)."""
    for lo in range(0, len(content), _CHUNK):
        c = content[lo:lo + _CHUNK]
        keep = c >= 0
        if zero_id is not None:
            keep &= c != zero_id
        yield lo, np.maximum(c, 0), keep


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which of ``values`` are in ``sorted_set``."""
    if not len(sorted_set):
        return np.zeros(len(values), bool)
    i = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    found: np.ndarray = sorted_set[i] == values
    return found


def _row(scan: int, t: float, pages_to_scan: int, shared: int, sharing: int, unshared: int,
         zero_pages: int, rmap: int, scanned: int, skipped: int, wall: float, cpu: float,
         knobs: Knobs, rules: KernelRules) -> dict[str, float | int]:
    """One full scan's row: the counters as ``/sys/kernel/mm/ksm`` shows them after it
    (``pages_volatile`` and ``general_profit`` derived as the kernel derives them)."""
    profit_pages = sharing + (zero_pages if rules.zero_pages_in_profit else 0)
    return {
        "full_scans": scan + 1, "time_seconds": t, "pages_to_scan": pages_to_scan,
        "pages_shared": shared, "pages_sharing": sharing, "pages_unshared": unshared,
        "pages_volatile": rmap - shared - sharing - unshared,
        "pages_scanned": scanned, "pages_skipped": skipped, "ksm_zero_pages": zero_pages,
        "ksm_rmap_items": rmap,
        "general_profit": profit_pages * knobs.page_size - rmap * knobs.rmap_item_bytes,
        "ksmd_cpu_percent": 100.0 * cpu / wall if wall > 0 else 0.0,
    }


def _min_scans(smart: bool) -> int:
    """Scans to run at least: past smart_scan's transient, then two windows."""
    return (_TRANSIENT_SCANS if smart else 0) + 2 * SMART_SCAN_PERIOD


def _agree(a: float, b: float, unit: float) -> bool:
    return abs(a - b) <= max(_STEADY_TOLERANCE * max(abs(a), abs(b)), unit)


_WATCHED = ("pages_shared", "pages_sharing", "general_profit")


def _units(page_size: int) -> dict[str, float]:
    return {"pages_shared": 1.0, "pages_sharing": 1.0, "general_profit": float(page_size)}


def _settled(rows: list[dict[str, float | int]], page_size: int) -> bool:
    """The last two 9-scan windows agree: their means of :data:`_WATCHED` differ by at most
    0.5% (or one page)."""
    w = SMART_SCAN_PERIOD
    if len(rows) < 2 * w:
        return False
    units = _units(page_size)
    for k in _WATCHED:
        v = np.array([r[k] for r in rows[-2 * w:]], np.float64)
        a, b = v[:w].mean(), v[w:].mean()
        if abs(a - b) > max(_STEADY_TOLERANCE * max(abs(a), abs(b)), units[k]):
            return False
    return True


Scans = dict[str, np.ndarray]
"""A replay's rows as columns: ``time_seconds`` and ``ksmd_cpu_percent`` floats, the others
int64."""
_FLOATS = ("time_seconds", "ksmd_cpu_percent")


def _as_columns(rows: list[dict[str, float | int]]) -> Scans:
    return {k: np.array([r[k] for r in rows], np.float64 if k in _FLOATS else np.int64)
            for k in rows[0]}


def _steady_from(scans: Scans, page_size: int) -> int | None:
    """The first 0-based scan from which every later value of :data:`_WATCHED` stays in
    the steady band (the last window's mean, +- max(0.5%, 3 standard deviations of the last
    two windows, half a page)), if the replay settled."""
    n = len(scans["time_seconds"])
    rows = [{k: scans[k][i] for k in _WATCHED} for i in range(max(0, n - 2 * SMART_SCAN_PERIOD), n)]
    if not _settled(rows, page_size):
        return None
    w = SMART_SCAN_PERIOD
    units = _units(page_size)
    outside = np.zeros(n, bool)
    for k in _WATCHED:
        v = scans[k].astype(np.float64)
        mean = v[-w:].mean()
        band = max(_STEADY_TOLERANCE * abs(mean), 3 * v[-2 * w:].std(), units[k] / 2)
        outside |= np.abs(v - mean) > band
    hits = np.flatnonzero(outside)
    return int(hits[-1]) + 1 if len(hits) else 0


def _crossing(scans: Scans, curves: list[np.ndarray | None], k: int, target: float) -> float:
    """When during full scan ``k`` (0-based) ``general_profit`` reaches ``target``: the
    scan's merges fall in known wake-ups (a wake-up processes its pages at once, then
    sleeps), and its wake-ups take equal time."""
    times, profit = scans["time_seconds"], scans["general_profit"]
    end = float(times[k])
    start = float(times[k - 1]) if k else 0.0
    before = float(profit[k - 1]) if k else 0.0
    gain = float(profit[k]) - before
    curve = curves[k] if k < len(curves) else None
    if curve is None or gain <= 0:
        return end
    share = min(max((target - before) / gain, 0.0), 1.0)
    position = float(np.interp(share, _QUANTILES, curve))
    return start + position * (end - start)


def _counters(scans: Scans) -> KsmCounters:
    return KsmCounters(**{k: round(float(scans[k][-SMART_SCAN_PERIOD:].mean())) for k in
                          ("pages_shared", "pages_sharing", "pages_unshared",
                           "pages_volatile", "ksm_zero_pages", "ksm_rmap_items",
                           "general_profit")})


def simulate(timeline: Timeline, knobs: Knobs, rules: KernelRules, *,
             scan_time: ScanTimer | None = None, advisor: AdvisorLike | None = None,
             max_scans: int = 400, seed: int = 0, full_replay: bool = False) -> Trajectory:
    """Replay ksmd over ``timeline`` from a fresh start (no rmap_items, nothing merged).

    Args:
        timeline: the pages, in ksmd's scan order.
        knobs: ksmd's settings (``smart_scan`` and the advisor only where ``rules`` has them).
        rules: the kernel's rules (:func:`~ksm_analyze.ksmd.rules.rules_for`).
        scan_time: a full scan's wall and CPU seconds (the CPU cost model); by default
            :func:`sleep_only_scan_time`.
        advisor: the scan-time advisor, when ``knobs.advisor_mode`` is ``scan-time`` on a
            kernel that has it: it sets ``pages_to_scan`` after every full scan.
        max_scans: full scans to replay at most; the replay stops earlier once steady (and
            past smart_scan's first 22 scans).
        seed: for the pages that change at a finite rate, and the late duplicates' phases.
        full_replay: replay page by page even memory that stands still (which has a
            shortcut giving the same rows: tests compare the two).
    """
    if max_scans < 1:
        raise ValueError(f"max_scans must be at least 1, not {max_scans}")
    timer = scan_time or sleep_only_scan_time
    use_advisor = advisor if (rules.has_advisor and knobs.advisor_mode == "scan-time") else None
    smart = knobs.smart_scan and rules.has_smart_scan
    still = not np.any(timeline.aged) and not np.any(timeline.change_rate)
    run = _run_still if still and not full_replay else _run
    scans, late, late_merged, curves = run(timeline, knobs, rules, scan_time=timer,
                                    advisor=use_advisor, max_scans=max_scans, seed=seed,
                                    aged_meet=False)
    start = _steady_from(scans, knobs.page_size)
    steady = _counters(scans) if start is not None else None
    time_to: dict[str, float | None] = {"50%": None, "90%": None, "steady": None}
    scans_to: dict[str, int | None] = {"50%": None, "90%": None, "steady": None}
    if steady is not None and start is not None:
        scans_to["steady"] = start + 1
        time_to["steady"] = float(scans["time_seconds"][start])
        if steady.general_profit > 0:
            profit = scans["general_profit"]
            for label, share in (("50%", 0.5), ("90%", 0.9)):
                reached = np.flatnonzero(profit >= share * steady.general_profit)
                if len(reached):
                    scans_to[label] = int(reached[0]) + 1
                    time_to[label] = _crossing(scans, curves, int(reached[0]),
                                               share * steady.general_profit)
    upper = None
    if late and smart:
        met, _, _, _ = _run(timeline, knobs, rules, scan_time=timer, advisor=None,
                         max_scans=max_scans, seed=seed, aged_meet=True)
        upper = _counters(met)
    return Trajectory(columns=scans, steady=steady, steady_scan=None if start is None else start + 1,
                      time_to=time_to, scans_to=scans_to, late_duplicates=late,
                      late_duplicates_merged=late_merged, if_phases_met=upper)


def steady_state(timeline: Timeline, knobs: Knobs, rules: KernelRules, **kwargs: object
                 ) -> KsmCounters:
    """The counters KSM settles at (``simulate(...).steady``).

    Raises:
        ValueError: no steady state within ``max_scans``.
    """
    trajectory = simulate(timeline, knobs, rules, **kwargs)  # type: ignore[arg-type]
    if trajectory.steady is None:
        raise ValueError(f"no steady state within {len(trajectory.columns['full_scans'])} "
                         "full scans")
    return trajectory.steady

