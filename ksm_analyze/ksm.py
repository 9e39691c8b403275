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
* ``general_profit = (pages_sharing + ksm_zero_pages) * PAGE_SIZE - ksm_rmap_items * 64``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["KsmCounters", "KsmSettings", "merged_pages", "predict"]

RMAP_ITEM_BYTES = 64
"""sizeof(struct ksm_rmap_item) on 64-bit kernels."""


@dataclass(frozen=True)
class KsmSettings:
    """The KSM knobs the prediction depends on (kernel defaults)."""

    max_page_sharing: int = 256
    use_zero_pages: bool = False
    pages_to_scan: int = 100
    sleep_millisecs: int = 20
    page_size: int = 4096

    def __post_init__(self) -> None:
        if self.max_page_sharing < 2:
            raise ValueError(f"max_page_sharing must be at least 2, not {self.max_page_sharing}")
        if self.pages_to_scan < 1:
            raise ValueError(f"pages_to_scan must be at least 1, not {self.pages_to_scan}")
        if self.sleep_millisecs < 0:
            raise ValueError(f"sleep_millisecs cannot be negative, not {self.sleep_millisecs}")


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
    copies: np.ndarray, zero_pages: int, settings: KsmSettings, *, singletons: int = 0
) -> KsmCounters:
    """Predict the converged KSM counters.

    Args:
        copies: for each distinct non-zero content, how many eligible pages hold it.
        zero_pages: eligible all-zero pages (present on the host, so scanned).
        settings: the KSM knobs.
        singletons: further contents seen exactly once, passed as a count rather than as
            that many 1s in ``copies``.

    Returns:
        The counters the kernel would show.
    """
    copies = np.asarray(copies, dtype=np.int64)
    if not settings.use_zero_pages and zero_pages:
        copies = np.append(copies, zero_pages)
    ksm_pages, unshared = merged_pages(copies, settings.max_page_sharing)
    rmap_items = int(copies.sum()) + singletons
    shared = int(ksm_pages.sum())
    unshared_n = int(unshared.sum()) + singletons
    sharing = rmap_items - shared - unshared_n
    ksm_zero = zero_pages if settings.use_zero_pages else 0
    profit = (sharing + ksm_zero) * settings.page_size - rmap_items * RMAP_ITEM_BYTES
    return KsmCounters(
        pages_shared=shared,
        pages_sharing=sharing,
        pages_unshared=unshared_n,
        pages_volatile=0,
        ksm_zero_pages=ksm_zero,
        ksm_rmap_items=rmap_items,
        general_profit=profit,
    )
