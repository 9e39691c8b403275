"""Predictions on crafted pages against the running kernel's real KSM.

The same pages are written twice: into a raw image that ksm-analyze reads, and into a
MADV_MERGEABLE mapping of this process that the kernel's ksmd merges. The kernel's counters
must equal the prediction (per process always; host-wide when nothing else uses KSM).
"""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from conftest import PS

import ksm_sysfs
from ksm_analyze import analyze

pytestmark = [
    pytest.mark.ksm,
    pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable())),
]


def crafted_pages(seed: int) -> np.ndarray:
    """300 copies of A (past max_page_sharing), 5 of B, 64 zero pages, 50 random pages,
    and 10 pages that share their first 128 bytes but differ further on."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 256, (2, PS), dtype=np.uint8)
    lookalike = np.repeat(rng.integers(0, 256, (1, PS), dtype=np.uint8), 10, axis=0)
    lookalike[np.arange(10), 2000] = np.arange(10)
    parts = [
        np.repeat(a[None], 300, axis=0),
        np.repeat(b[None], 5, axis=0),
        np.zeros((64, PS), np.uint8),
        rng.integers(0, 256, (50, PS), dtype=np.uint8),
        lookalike,
    ]
    pages = np.concatenate(parts)
    return pages[rng.permutation(len(pages))]


@pytest.mark.parametrize(
    ("max_page_sharing", "use_zero_pages"), [(256, 0), (256, 1), (4, 0)]
)
def test_prediction_matches_kernel_ksm(tmp_path, max_page_sharing, use_zero_pages):
    pages = crafted_pages(max_page_sharing + use_zero_pages)
    image = tmp_path / "crafted.raw"
    pages.tofile(image)
    predicted = analyze(
        image, max_page_sharing=max_page_sharing, use_zero_pages=bool(use_zero_pages)
    ).counters

    with ksm_sysfs.ksm_session(
        max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages,
        pages_to_scan=10000, sleep_millisecs=10,
    ):
        region = mmap.mmap(-1, pages.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            region.madvise(mmap.MADV_MERGEABLE)
            region[:] = pages.tobytes()
            host = ksm_sysfs.converge()
            mine = ksm_sysfs.ksm_stat()
        finally:
            region.close()

    assert mine["ksm_rmap_items"] == predicted.ksm_rmap_items
    assert mine["ksm_zero_pages"] == predicted.ksm_zero_pages
    assert mine["ksm_merging_pages"] == predicted.pages_shared + predicted.pages_sharing
    assert mine["ksm_process_profit"] == (
        (predicted.pages_shared + predicted.pages_sharing + predicted.ksm_zero_pages) * PS
        - predicted.ksm_rmap_items * 64
    )
    if host["pages_shared"] + host["pages_sharing"] == mine["ksm_merging_pages"]:
        # Nothing else on this host is merged: the host-wide counters are ours alone.
        assert host["pages_shared"] == predicted.pages_shared
        assert host["pages_sharing"] == predicted.pages_sharing
        assert host["ksm_zero_pages"] == predicted.ksm_zero_pages
        assert host["general_profit"] == predicted.general_profit
        # smart_scan moves unmerged pages between these two; their sum is what we predict.
        assert host["pages_unshared"] + host["pages_volatile"] == predicted.pages_unshared
