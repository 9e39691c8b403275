"""The KSM model: the counters the kernel would report for a set of page contents.

Definitions follow ``Documentation/admin-guide/mm/ksm.rst`` and ``mm/ksm.c`` (notes in
``shared/reference/ksm-semantics.md``), for a host whose memory no longer changes:

* Content seen ``c`` times merges into KSM pages of at most ``max_page_sharing`` mappings
  each (a *chain* of *dups* once one is full). ``q, r = divmod(c, max_page_sharing)``:
  ``q`` full KSM pages, plus one more if ``r >= 2``; a single leftover page (``r == 1``) has
  no partner to merge with and stays in the unstable tree (``pages_unshared``).
* ``pages_shared`` counts KSM pages, ``pages_sharing`` every further mapping of one,
  ``pages_unshared`` unique pages KSM keeps checking; ``pages_volatile`` is 0 for a dump.
* With ``use_zero_pages`` an all-zero page is mapped to the kernel's zero page instead
  (``ksm_zero_pages``); its rmap_item is freed on the next scan, since the zero page is not
  an anonymous folio.
* ``general_profit = (pages_sharing + ksm_zero_pages) * PAGE_SIZE - ksm_rmap_items *
  sizeof(struct ksm_rmap_item)`` (64 bytes on today's 64-bit kernels).
* Memory after KSM (:func:`memory_after`) is what the host then needs: the pages left after
  merging plus those rmap_items, so memory before minus memory after is
  ``general_profit``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np

from .pages import PAGE_SIZE, check_page_size

__all__ = ["KSM_STAT_FIELDS", "KsmCounters", "KsmSettings", "convergence", "memory_after",
           "merged_pages", "predict", "predict_processes", "saved_pages"]

RMAP_ITEM_BYTES = 64
"""sizeof(struct ksm_rmap_item) on 64-bit kernels."""
KSM_STAT_FIELDS = ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit")
"""The ``/proc/PID/ksm_stat`` fields predicted per input."""

_Count = TypeVar("_Count", int, np.ndarray)


def memory_after(pages_left: _Count, rmap_items: _Count, page_size: int,
                 rmap_item_bytes: int = RMAP_ITEM_BYTES) -> _Count:
    """Bytes a host needs after KSM: the one definition of "memory after KSM".

    The pages left after merging (KSM pages and pages that stay unmerged, ``page_size``
    bytes each) plus the ``rmap_item_bytes`` (``sizeof(struct ksm_rmap_item)``) of metadata
    KSM keeps for every page it tracks (``ksm_rmap_items``). ``scan``'s savings table, ``plan``'s hosts, placement's
    footprints and the report all take it from here; elementwise on arrays.
    """
    after: _Count = pages_left * page_size + rmap_items * rmap_item_bytes
    return after


@dataclass(frozen=True)
class KsmSettings:
    """The KSM knobs the prediction depends on, with the kernel's defaults.

    The one declaration of these options: the CLI reads its defaults from here, and a bad
    value is refused here, once.
    """

    max_page_sharing: int = 256
    use_zero_pages: bool = False
    pages_to_scan: int = 100
    sleep_millisecs: int = 20
    page_size: int = PAGE_SIZE
    rmap_item_bytes: int | None = None
    """``sizeof(struct ksm_rmap_item)`` on the host; None: what the inputs recorded (a live
    fingerprint reads it from ``/sys/kernel/slab``), else :data:`RMAP_ITEM_BYTES`."""
    smart_scan: bool | None = None
    """ksmd's ``smart_scan``; None: as the inputs recorded, else on where the kernel has it."""
    advisor_mode: str | None = None
    """``none`` or ``scan-time``; None: as the inputs recorded, else ``none``."""
    kernel: str | None = None
    """The kernel release whose ksmd rules the time model replays (``6.1``, ``6.18.4``...);
    None: the kernel the inputs were taken on, else the newest rules known."""
    cpu_cost: str | None = None
    """A ksmd CPU calibration file (``ksm-analyze calibrate``); None: the shipped default."""
    converge_within: float | None = None
    """Seconds: name the cheapest ksmd setting that reaches steady state within this."""

    def __post_init__(self) -> None:
        check_page_size(self.page_size)
        if self.max_page_sharing < 2:
            raise ValueError(f"max_page_sharing must be at least 2, not {self.max_page_sharing}")
        if self.pages_to_scan < 1:
            raise ValueError(f"pages_to_scan must be at least 1, not {self.pages_to_scan}")
        if self.sleep_millisecs < 0:
            raise ValueError(f"sleep_millisecs cannot be negative, not {self.sleep_millisecs}")
        if self.advisor_mode not in (None, "none", "scan-time"):
            raise ValueError(f"advisor_mode must be none or scan-time, not {self.advisor_mode!r}")
        if self.converge_within is not None and not self.converge_within > 0:
            raise ValueError(f"converge_within must be positive, not {self.converge_within}")
        if self.rmap_item_bytes is not None and not 1 <= self.rmap_item_bytes <= 4096:
            raise ValueError(f"rmap_item_bytes must be 1 to 4096, not {self.rmap_item_bytes}")

    @property
    def rmap_bytes(self) -> int:
        """``rmap_item_bytes``, or the 64 of today's 64-bit kernels when it is not known."""
        return self.rmap_item_bytes or RMAP_ITEM_BYTES


@dataclass(frozen=True)
class KsmCounters:
    """What ``/sys/kernel/mm/ksm/`` would show once KSM has converged."""

    pages_shared: int
    pages_sharing: int
    pages_unshared: int
    pages_volatile: int
    ksm_zero_pages: int
    ksm_rmap_items: int
    general_profit: int
    """Bytes: saved pages minus rmap_item overhead (can be negative)."""

    def as_dict(self) -> dict[str, int]:
        """The counters by their sysfs names."""
        return asdict(self)


ROWS_AT_ONCE = 1 << 18
"""Sparse rows of the core table taken at a time by the passes over all of them (per-input
sums, pairwise groups): their temporaries are a few arrays of this length, not of the
table's (tens of bytes a row over millions of rows)."""


def content_chunks(content: np.ndarray, size: int | None = None
                   ) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` row ranges of sorted ``content`` of about ``size`` rows each (default
    :data:`ROWS_AT_ONCE`), never cutting a content's rows apart (a content of more rows is
    one range of its own)."""
    size = size or ROWS_AT_ONCE
    lo, n = 0, len(content)
    while lo < n:
        hi = min(n, lo + size)
        if hi < n:
            cut = int(np.searchsorted(content, content[hi], side="left"))
            hi = cut if cut > lo else int(np.searchsorted(content, content[hi], side="right"))
        yield lo, hi
        lo = hi


def run_ranks(length: np.ndarray) -> np.ndarray:
    """0, 1, ..., length-1 for each run of ``length``, concatenated."""
    if not len(length):
        return np.empty(0, np.int64)
    ends = np.cumsum(length)
    ranks: np.ndarray = np.arange(int(ends[-1])) - np.repeat(ends - length, length)
    return ranks


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the bits of each uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    mixed: np.ndarray = x ^ (x >> np.uint64(31))
    return mixed


def row_digests(owner: np.ndarray, value: np.ndarray, start: np.ndarray, length: np.ndarray
                ) -> np.ndarray:
    """A 64-bit digest per content of sparse rows (``start``/``length``: each content's run
    of ``owner`` and ``value``), equal for contents whose rows are equal; not a proof of
    equality: callers check candidates row by row (and a digest equal by chance only costs
    a second group)."""
    key = owner.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ value.astype(np.uint64)
    digests: np.ndarray = np.add.reduceat(_mix64(key), start) + _mix64(
        length.astype(np.uint64) * np.uint64(3))
    return digests


def merged_pages(copies: np.ndarray, max_page_sharing: int) -> tuple[np.ndarray, np.ndarray]:
    """For contents seen ``copies`` times each, the KSM pages and the unmerged leftovers.

    Returns:
        ``(ksm_pages, unshared)`` arrays: KSM pages needed for each content and whether a
        page of it stays unmerged. Mapped pages saved are ``copies - ksm_pages - unshared``.
    """
    copies = np.asarray(copies, dtype=np.int64)
    full, rest = np.divmod(copies, max_page_sharing)
    ksm_pages = full + (rest >= 2)
    unshared = (rest == 1).astype(np.int64)
    return ksm_pages, unshared


def predict(
    copies: np.ndarray, zero_pages: int | np.ndarray, settings: KsmSettings, *,
    singletons: int = 0,
) -> KsmCounters:
    """Predict the converged KSM counters.

    Args:
        copies: for each distinct non-zero content, how many eligible pages hold it.
        zero_pages: eligible all-zero pages (present on the host, so scanned); an array
            of them per domain when pages merge only within a domain.
        settings: the KSM knobs.
        singletons: further contents seen exactly once, passed as a count rather than as
            that many 1s in ``copies``.

    Returns:
        The counters the kernel would show.
    """
    copies = np.asarray(copies, dtype=np.int64)
    zero = np.atleast_1d(np.asarray(zero_pages, np.int64))
    if not settings.use_zero_pages:
        copies = np.append(copies, zero[zero > 0])  # the zero page merges like any content
    ksm_pages, unshared = merged_pages(copies, settings.max_page_sharing)
    rmap_items = int(copies.sum()) + singletons
    shared = int(ksm_pages.sum())
    unshared_n = int(unshared.sum()) + singletons
    sharing = rmap_items - shared - unshared_n
    ksm_zero = int(zero.sum()) if settings.use_zero_pages else 0
    profit = (sharing + ksm_zero) * settings.page_size - rmap_items * settings.rmap_bytes
    return KsmCounters(
        pages_shared=shared,
        pages_sharing=sharing,
        pages_unshared=unshared_n,
        pages_volatile=0,
        ksm_zero_pages=ksm_zero,
        ksm_rmap_items=rmap_items,
        general_profit=profit,
    )


def saved_pages(copies: np.ndarray, max_page_sharing: int) -> int:
    """Pages KSM frees merging contents seen ``copies`` times each."""
    ksm, unshared = merged_pages(copies, max_page_sharing)
    return int((np.asarray(copies, np.int64) - ksm - unshared).sum())


def predict_processes(
    content: np.ndarray,
    owner: np.ndarray,
    pages: np.ndarray,
    nonzero_pages: np.ndarray,
    zero_pages: np.ndarray,
    settings: KsmSettings,
    *,
    domain: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The ``/proc/PID/ksm_stat`` fields KSM would show for each input on one host.

    Args:
        content, owner, pages: the duplicated contents as sparse rows sorted by content,
            then input: input ``owner[k]`` holds ``pages[k]`` pages of content
            ``content[k]``.
        nonzero_pages: per input, every scanned non-zero page (duplicated or not).
        zero_pages: per input, scanned all-zero pages.
        settings: the KSM knobs.
        domain: per input, its domain: zero pages merge within a domain only.

    Returns:
        One array per field of :data:`KSM_STAT_FIELDS`, one value per input.

    A page merges when its content has a partner on the host; of a content seen
    ``k * max_page_sharing + 1`` times one page stays unmerged, and which one is the kernel's
    scan order: it is charged here to the last input holding the content.
    """
    mps, n_inputs = settings.max_page_sharing, len(nonzero_pages)
    merging = np.zeros(n_inputs, np.int64)
    for lo, hi in content_chunks(content):  # a content's rows are never cut apart
        c, o, p = content[lo:hi], owner[lo:hi], pages[lo:hi]
        first = np.ones(len(c), bool)
        first[1:] = c[1:] != c[:-1]
        group = np.cumsum(first) - 1
        copies = np.bincount(group, weights=p).astype(np.int64)[group]  # per row, host-wide
        last = np.append(first[1:], True)[: len(c)]
        leftover = last & (copies % mps == 1) & (copies > 1)
        merging += np.bincount(o, weights=p * (copies >= 2) - leftover,
                               minlength=n_inputs).astype(np.int64)
    zero_pages = np.asarray(zero_pages, np.int64)
    nonzero_pages = np.asarray(nonzero_pages, np.int64)
    if settings.use_zero_pages:
        kzero, rmap = zero_pages, nonzero_pages
    else:
        kzero, rmap = np.zeros(n_inputs, np.int64), nonzero_pages + zero_pages
        domain = np.zeros(n_inputs, np.int64) if domain is None else domain
        for d in np.unique(domain).tolist():
            mine = domain == d
            zero_total = int(zero_pages[mine].sum())
            if zero_total >= 2:
                merging[mine] += zero_pages[mine]
                if zero_total % mps == 1:  # the zero page's leftover, charged like the others
                    merging[np.flatnonzero(mine & (zero_pages > 0))[-1]] -= 1
    profit = (merging + kzero) * settings.page_size - rmap * settings.rmap_bytes
    return dict(zip(KSM_STAT_FIELDS, (rmap, merging, kzero, profit), strict=True))


def convergence(scanned_pages: int, settings: KsmSettings) -> dict[str, float]:
    """Seconds for ksmd to visit every page once, and to merge static duplicates.

    ksmd wakes every ``sleep_millisecs`` and scans ``pages_to_scan`` pages; a page merges on
    its second visit (its checksum must be stable), so steady state takes two full scans.
    The CPU time of scanning itself and smart_scan's skipping are not modelled.
    """
    wakeups = -(-scanned_pages // settings.pages_to_scan)
    full = wakeups * settings.sleep_millisecs / 1000.0
    return {"scanned_pages": scanned_pages, "full_scan_seconds": full,
            "steady_state_seconds": 2 * full}
