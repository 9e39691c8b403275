"""The model's input: every page ksmd would scan, its content, and how fast it changes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Timeline"]


@dataclass(frozen=True)
class Timeline:
    """Pages of the inputs on one host, in ksmd's scan order (input order, then address).

    Built from a series of fingerprints (``series.py``) or, in tests, by hand.

    Attributes:
        inputs: input names; ``owner`` indexes them.
        owner: int32 per page, its input.
        content: int64 (or int32) per page, its content at the last sample (equal ids
            mean equal bytes, confirmed like any duplicate); a negative id is a content no
            other page holds.
        zero_id: the id of the all-zero content, or -1 where no page is all zero.
        change_rate: float64 per page, its estimated writes per second: 0 for a page seen
            unchanged in every sample, ``inf`` for one changed between every two samples
            (faster than the samples can tell).
        aged: bool per page: KSM was running over the page before it took its current
            content (its smart_scan age is high and its skip phase unknown).
        observed_seconds: from the first sample to the last (0 for one sample).
        first_scan_only: pages ksmd visits on its first full scan only, and which never
            merge: the all-zero subpages of huge pages (rule ``thp_zero``). They take an
            rmap_item and a share of ``pages_to_scan`` on that scan; a merge in their huge
            page on the next scan splits it, and the split maps them to the zero page
            (measured on 6.18: a fresh TCG guest's 23,236 pages and 8,599 zero THP
            subpages gave 31,835 rmap_items after full scan 1).
    """

    inputs: list[str]
    owner: np.ndarray
    content: np.ndarray
    zero_id: int
    change_rate: np.ndarray
    aged: np.ndarray
    observed_seconds: float = 0.0
    first_scan_only: int = 0

    def __post_init__(self) -> None:
        n = len(self.content)
        for name in ("owner", "change_rate", "aged"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} pages")
        if self.first_scan_only < 0:
            raise ValueError("first_scan_only cannot be negative")

    @property
    def pages(self) -> int:
        return len(self.content)
