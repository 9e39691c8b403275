"""The core inputs x contents table: a subset's counters are that subset's analysis."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from conftest import PS, SAMPLES

from ksm_analyze import ContentTable, KsmSettings, analyze


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three raw dumps sharing contents in every pattern: within one, across two, all three,
    more copies than max_page_sharing, zero pages and unique pages."""
    rng = np.random.default_rng(3)
    pool = rng.integers(0, 256, (12, PS), dtype=np.uint8)
    d = tmp_path_factory.mktemp("three")
    paths = []
    for k in range(3):
        pages = [pool[rng.integers(0, 4 + 4 * k, 40)],  # overlapping pools: partial sharing
                 np.repeat(pool[11:12], 5 + k, axis=0),  # one content in every input
                 np.zeros((3 * k + 1, PS), np.uint8),
                 rng.integers(0, 256, (7, PS), dtype=np.uint8)]
        path = d / f"in{k}.raw"
        np.concatenate(pages).tofile(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize(("mps", "zero"), [(256, False), (2, False), (3, True)])
def test_every_subset_gives_the_counters_of_analysing_just_that_subset(three, mps, zero):
    ksm = KsmSettings(max_page_sharing=mps, use_zero_pages=zero)
    whole = analyze(three, ksm=ksm, jobs=1)
    for r in (1, 2, 3):
        for group in itertools.permutations(three, r):
            alone = analyze(list(group), ksm=ksm, jobs=1)
            part = whole.contents.subset(list(group))
            assert part.counters(ksm) == alone.counters, group
            assert part.counters(ksm, zero_pages=False).as_dict() == \
                alone.host["without_zero_pages"].to_dict(), group
            mine = part.per_input(ksm)
            theirs = alone.per_input[mine.columns]
            pd.testing.assert_frame_equal(mine, theirs, check_dtype=False)


def test_subset_by_position_and_by_path_agree(three):
    whole = analyze(three, jobs=1).contents
    by_path = whole.subset([three[2], three[0]])
    by_position = whole.subset([2, 0])
    assert by_path.names == by_position.names == [three[2], three[0]]
    assert by_path.counters(KsmSettings()) == by_position.counters(KsmSettings())
    with pytest.raises(ValueError, match="twice"):
        whole.subset([0, 0])


def test_the_table_counts_what_the_tables_print():
    result = analyze(SAMPLES, jobs=1)
    table = result.contents
    assert table.names == SAMPLES
    # Duplicated contents are rows; unique and zero pages are columns.
    assert int(table.copies().sum()) + int(table.inputs["unique_pages"].sum()) == \
        int(result.per_input["nonzero_pages"].sum())
    assert list(table.inputs["zero_pages"]) == list(result.per_input["zero_pages"])
    assert (table.copies() >= 2).all()
    assert np.all(np.diff(table.content) >= 0)


def test_frames_round_trip(three):
    table = analyze(three, jobs=1).contents
    inputs, rows = table.frames()
    back = ContentTable.from_frames(inputs, rows.sample(frac=1, random_state=1), table.page_size)
    pd.testing.assert_frame_equal(back.inputs, table.inputs)
    for name in ("content", "owner", "pages"):
        assert np.array_equal(getattr(back, name), getattr(table, name)), name
    assert back.counters(KsmSettings(max_page_sharing=2)) == \
        table.counters(KsmSettings(max_page_sharing=2))
