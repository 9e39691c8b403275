"""Per-input ksm_stat predictions add up to the host counters, whatever the mix."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PS

from ksm_analyze import analyze


@pytest.mark.parametrize("max_page_sharing", [2, 3, 256])
@pytest.mark.parametrize("use_zero_pages", [False, True])
def test_per_input_ksm_stat_sums_to_host_counters(tmp_path, max_page_sharing, use_zero_pages):
    rng = np.random.default_rng(max_page_sharing * 2 + use_zero_pages)
    contents = rng.integers(0, 256, (12, PS), dtype=np.uint8)
    contents[0] = 0  # content 0 is the zero page
    paths = []
    for i in range(3):
        picks = rng.integers(0, 12, rng.integers(5, 40))
        path = tmp_path / f"in{i}.raw"
        contents[picks].tofile(path)
        paths.append(path)
    result = analyze(paths, max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages)
    c, pi = result.counters, result.per_input
    assert pi["ksm_rmap_items"].sum() == c.ksm_rmap_items
    assert pi["ksm_merging_pages"].sum() == c.pages_shared + c.pages_sharing
    assert pi["ksm_zero_pages"].sum() == c.ksm_zero_pages
    assert pi["ksm_process_profit"].sum() == (
        (c.pages_shared + c.pages_sharing + c.ksm_zero_pages) * PS - c.ksm_rmap_items * 64
    )
