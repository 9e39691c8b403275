"""The KSM model against counters computed by hand from the kernel's definitions."""

from __future__ import annotations

import numpy as np
import pytest

from ksm_analyze.ksm import KsmSettings, merged_pages, predict


def test_300_identical_pages_need_two_ksm_pages():
    c = predict(np.array([300]), 0, KsmSettings())
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (2, 298, 0)
    assert c.ksm_rmap_items == 300
    assert c.general_profit == 298 * 4096 - 300 * 64


def test_a_single_leftover_page_stays_unshared():
    # 257 = one full KSM page of 256 mappings + 1 page with no partner (mm/ksm.c:
    # "we need to wait the scanned page to find itself a match in the unstable tree").
    c = predict(np.array([257]), 0, KsmSettings())
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (1, 255, 1)


@pytest.mark.parametrize(
    ("copies", "mps", "shared", "sharing", "unshared"),
    [
        ([5, 3], 2, 3, 3, 2),  # 5 -> 2+2 (+1 left), 3 -> 1+1 (+1 left); seen on kernel 6.18
        ([9, 6, 2], 4, 5, 11, 1),  # 9 -> 2 KSM pages + 1 left, 6 -> 4+2, 2 -> 1
        ([256], 256, 1, 255, 0),
        ([512], 256, 2, 510, 0),
        ([1, 1, 1], 256, 0, 0, 3),
    ],
)
def test_max_page_sharing(copies, mps, shared, sharing, unshared):
    c = predict(np.array(copies), 0, KsmSettings(max_page_sharing=mps))
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared) == (shared, sharing, unshared)
    assert c.ksm_rmap_items == sum(copies)


def test_zero_pages_merge_like_any_content_by_default():
    c = predict(np.array([3]), 600, KsmSettings())
    # 600 zero pages: 2 full KSM pages (512) + one of 88 -> 3 KSM pages, 597 sharing.
    assert (c.pages_shared, c.pages_sharing, c.ksm_zero_pages) == (1 + 3, 2 + 597, 0)
    assert c.ksm_rmap_items == 603


def test_use_zero_pages_maps_zero_pages_to_the_zero_page():
    # Kernel 6.18 with 7 zero pages, 3 equal pages and 4 unique ones gave ksm_zero_pages 7,
    # rmap_items 7 (zero pages lose theirs), general_profit (2 + 7) * 4096 - 7 * 64.
    c = predict(np.array([3]), 7, KsmSettings(use_zero_pages=True), singletons=4)
    assert (c.pages_shared, c.pages_sharing, c.ksm_zero_pages) == (1, 2, 7)
    assert c.ksm_rmap_items == 7
    assert c.general_profit == 36416


def test_singletons_are_unshared_and_cost_an_rmap_item_each():
    c = predict(np.array([2]), 0, KsmSettings(), singletons=10)
    assert (c.pages_shared, c.pages_sharing, c.pages_unshared, c.ksm_rmap_items) == (1, 1, 10, 12)
    assert c.general_profit == 4096 - 12 * 64


def test_merged_pages_is_ceil_of_copies_over_limit():
    copies = np.arange(1, 2000)
    ksm, unshared = merged_pages(copies, 256)
    assert np.array_equal(ksm + unshared, -(-copies // 256))


@pytest.mark.parametrize("bad", [{"max_page_sharing": 1}, {"pages_to_scan": 0},
                                 {"sleep_millisecs": -1}])
def test_settings_reject_impossible_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        KsmSettings(**bad)
