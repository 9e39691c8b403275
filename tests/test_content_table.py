"""The core inputs x contents table: a subset's counters are that subset's analysis."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from conftest import PS, SAMPLES

from ksm_analyze import ContentTable, KsmSettings, analyze, summary
from ksm_analyze.columns import Columns


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


@pytest.mark.parametrize("rows_at_once", [1, 2, 3, 1 << 20])
def test_per_input_columns_summed_a_few_rows_at_a_time(monkeypatch, rows_at_once):
    # Issue 21: the per-input sums run over the sparse rows a chunk at a time (whole
    # contents each): the same numbers, derived here row by row from first principles.
    monkeypatch.setattr("ksm_analyze.ksm.ROWS_AT_ONCE", rows_at_once)
    rows = [(0, 0, 3), (0, 1, 1), (1, 1, 2), (2, 0, 1), (2, 1, 1), (2, 2, 5), (3, 2, 4)]
    content, owner, pages = (np.array([r[i] for r in rows], dt)
                             for i, dt in ((0, np.int64), (1, np.int32), (2, np.int64)))
    unique = np.array([2, 0, 1])
    cols = Columns({"input": ["a", "b", "c"], "unique_pages": unique,
                    "zero_pages": np.zeros(3, np.int64), "domain": np.zeros(3, np.int64)})
    table = ContentTable(cols, content, owner, pages, PS)
    got = table.per_input_columns(KsmSettings(max_page_sharing=2))
    # max_page_sharing 2: p pages of a content alone save p - ceil(p / 2) (3 -> 1, 2 -> 1,
    # 5 -> 2, 4 -> 2, 1 -> 0).
    assert got["nonzero_pages"].tolist() == [2 + 3 + 1, 0 + 1 + 2 + 1, 1 + 5 + 4]
    assert got["distinct_contents"].tolist() == [2 + 2, 0 + 3, 1 + 2]
    assert got["self_sharing_pages"].tolist() == [1, 1, 4]
    assert table.nonzero_pages().tolist() == [6, 4, 10]
    assert unique.tolist() == [2, 0, 1]  # the column is summed into a copy
    # Every page of a content held twice or more merges (contents 0 to 3 all do); of a
    # content of k * 2 + 1 copies, one stays unmerged: the last input's (content 0: 4
    # copies; 1: 2; 2: 7 -> input c; 3: 4).
    assert got["ksm_merging_pages"].tolist() == [3 + 1, 1 + 2 + 1, 5 + 4 - 1]
    # The histogram, summed a few contents at a time: copies 4, 2, 7, 4 and 3 seen once;
    # after merging (2 a KSM page) 2, 1, 3 + 1, 2 and 3.
    monkeypatch.setattr(summary, "ROWS_AT_ONCE", min(rows_at_once, 1 << 18))
    hist = summary._histogram(table, KsmSettings(max_page_sharing=2))
    assert {k: v.tolist() for k, v in hist.data.items() if k.startswith(("c", "p"))} == {
        "copies": [1, 2, 4], "contents": [3, 1, 3], "pages_referenced": [3, 2, 4 + 7 + 4],
        "pages_after_merging": [3, 1, 2 + 4 + 2]}
