"""Pairwise sharing, most duplicated contents and the address map, against counts the test
makes itself from the pages it wrote (hashlib and dicts; no ksm-analyze code)."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import PS, runner

from dumpwriter.raw import make_raw
from ksm_analyze import analyze, sharing
from ksm_analyze import ksm as ksm_module
from ksm_analyze.cli import app
from ksm_analyze.columns import Columns
from ksm_analyze.content_table import ContentTable
from ksm_analyze.sharing import classify_content, pairwise, twin_warnings

rng = np.random.default_rng(42)


def rnd() -> bytes:
    return rng.integers(0, 256, PS, dtype=np.uint8).tobytes()


X, Y, Z, W, U1, U2, U3 = (rnd() for _ in range(7))
ZERO = bytes(PS)
POISON = b"\x6b" * PS
PATTERN = b"\xde\xad\xbe\xef" * (PS // 4)
LOW = bytes(PS - 16) + bytes(range(1, 17))

INPUTS = {
    "a.raw": [X, X, Y, Z, ZERO, ZERO, U1, POISON, POISON, PATTERN, LOW, LOW],
    "b.raw": [X, Y, Y, W, ZERO, U2, POISON],
    "c.raw": [Z, W, W, W, U3, PATTERN],
}


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharing")
    return [make_raw(d / name, pages) for name, pages in INPUTS.items()]


def _saved(c: int, mps: int) -> int:
    """Pages KSM frees for c copies: Documentation/admin-guide/mm/ksm.rst chains."""
    q, r = divmod(c, mps)
    return c - q - (1 if r >= 2 else 0) - (1 if r == 1 else 0)


def _expected_pairwise(mps: int) -> dict[tuple[str, str], tuple[int, int, int]]:
    counts = {n: Counter(p for p in pages if p != ZERO) for n, pages in INPUTS.items()}
    out = {}
    for a in INPUTS:
        for b in INPUTS:
            if a == b:
                continue
            common = counts[a].keys() & counts[b].keys()
            in_b = sum(counts[a][c] for c in common)
            extra = sum(
                _saved(counts[a][c] + counts[b][c], mps)
                - _saved(counts[a][c], mps) - _saved(counts[b][c], mps)
                for c in common
            )
            out[a, b] = (sum(counts[a].values()), in_b, extra)
    return out


@pytest.mark.parametrize("mps", [256, 3])
def test_pairwise_matches_counts_made_from_the_pages(dumps, mps):
    result = analyze(dumps, max_page_sharing=mps, jobs=1)
    expected = _expected_pairwise(mps)
    got = {
        (r.input_a, r.input_b): (r.a_nonzero_pages, r.a_pages_in_b, r.extra_saved_pages)
        for r in result.pairwise.itertuples()
    }
    assert got == expected
    assert (result.pairwise["extra_saved_bytes"] == result.pairwise["extra_saved_pages"] * PS
            ).all()
    fr = result.pairwise["a_pages_in_b"] / result.pairwise["a_nonzero_pages"]
    assert np.allclose(result.pairwise["a_fraction_in_b"], fr)


def test_pairwise_of_hand_counted_pairs(dumps):
    # By hand, mps 256: a and b share X (2+1) and Y (1+2) and POISON (2+1): a's pages in b
    # are X, X, Y, POISON, POISON = 5. Together each content saves 2, alone 1+1 or 0+1...
    # X: 3 copies save 2, alone a saves 1, b 0 -> +1; Y the same -> +1; POISON -> +1.
    result = analyze(dumps, jobs=1)
    pw = result.pairwise.set_index(["input_a", "input_b"])
    assert pw.loc[("a.raw", "b.raw"), "a_pages_in_b"] == 5
    assert pw.loc[("b.raw", "a.raw"), "a_pages_in_b"] == 4  # X, Y, Y, POISON
    assert pw.loc[("a.raw", "b.raw"), "extra_saved_pages"] == 3
    # With max_page_sharing 3, c's three W plus b's W make 4 = one full KSM page and a single
    # leftover, which saves 2 as c alone does: b and c together save no more than apart.
    pw3 = analyze(dumps, max_page_sharing=3, jobs=1).pairwise.set_index(["input_a", "input_b"])
    assert pw3.loc[("b.raw", "c.raw"), "extra_saved_pages"] == 0
    assert pw.loc[("b.raw", "c.raw"), "extra_saved_pages"] == 1


def test_pairs_top_keeps_each_inputs_most_alike_and_says_how_many_were_left_out(dumps):
    # By hand from INPUTS: a has 5 pages in b, 2 in c; b 4 in a, 1 in c; c 2 in a, 3 in b.
    r = runner.invoke(app, ["scan", *map(str, dumps), "--json", "--pairs-top", "1", "-j", "1"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [(p["input_a"], p["input_b"], p["a_pages_in_b"]) for p in data["pairwise"]] == [
        ("a.raw", "b.raw", 5), ("b.raw", "a.raw", 4), ("c.raw", "b.raw", 3)]
    assert any(w.startswith("pairwise: 3 of the 6 ordered pairs of inputs that share pages "
                            "are left out") for w in data["warnings"])
    r = runner.invoke(app, ["scan", *map(str, dumps), "--pairs-top", "-1"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == "Error: --pairs-top cannot be negative, not -1"


def test_two_inputs_pairwise_extra_equals_sharing_across_inputs(dumps):
    result = analyze(dumps[:2], jobs=1)
    across = result.savings.at["sharing_across_inputs", "with_zero_pages_pages"]
    assert set(result.pairwise["extra_saved_pages"]) == {across}


def test_top_contents_lists_copies_inputs_and_classes(dumps):
    result = analyze(dumps, jobs=1, top=50)
    top = result.top_contents
    all_pages = [p for pages in INPUTS.values() for p in pages]
    copies = Counter(all_pages)
    repeated = {p: n for p, n in copies.items() if n > 1}
    assert len(top) == len(repeated)
    assert list(top["copies"]) == sorted(top["copies"], reverse=True)
    by_hash = top.set_index("content_hash")
    for page, n in repeated.items():
        row = by_hash.loc[hashlib.sha256(page).hexdigest()]
        assert row["copies"] == n
        assert row["bytes"] == n * PS
        where = {name: pages.count(page) for name, pages in INPUTS.items() if page in pages}
        assert row["input_count"] == len(where)
        assert row["inputs"] == where
    cls = {p: by_hash.loc[hashlib.sha256(p).hexdigest(), "content_class"] for p in repeated}
    assert cls[ZERO] == "zero"
    assert cls[POISON] == "repeated_byte"
    assert by_hash.loc[hashlib.sha256(POISON).hexdigest(), "class_detail"] == \
        "0x6b (POISON_FREE)"
    assert cls[PATTERN] == "repeated_pattern"
    assert cls[LOW] == "low_entropy"
    assert cls[X] == "other"
    assert "content_hex" not in top.columns
    assert len(analyze(dumps, jobs=1, top=2).top_contents) == 2


def test_top_contents_with_show_content_has_the_first_bytes(dumps):
    top = analyze(dumps, jobs=1, show_content=True).top_contents.set_index("content_hash")
    assert top.loc[hashlib.sha256(X).hexdigest(), "content_hex"] == X[:64].hex()


@pytest.mark.parametrize(
    ("page", "kind"),
    [
        (bytes(PS), "zero"),
        (b"\xff" * PS, "repeated_byte"),
        (b"\x00\x01" * (PS // 2), "repeated_pattern"),
        (bytes(range(256)) * 16, "other"),
        (b"\x00" * (PS - 64) + b"\x01" * 64, "low_entropy"),
    ],
)
def test_classify_content(page, kind):
    assert classify_content(page)[0] == kind


def test_address_map_kinds_follow_the_pages(dumps):
    result = analyze(dumps, jobs=1)
    amap = result.address_map
    a = amap[amap["input"] == "a.raw"].reset_index(drop=True)
    pages = INPUTS["a.raw"]
    assert len(a) == len(pages)  # fewer pages than bins: one page a bin
    assert list(a["first_address"]) == [i * PS for i in range(len(pages))]
    elsewhere = {p for n, ps in INPUTS.items() if n != "a.raw" for p in ps}
    mine = Counter(pages)
    for i, p in enumerate(pages):
        expect = ("zero_pages" if p == ZERO
                  else "duplicate_across_pages" if p in elsewhere
                  else "duplicate_within_pages" if mine[p] > 1
                  else "unique_pages")
        row = a.loc[i]
        assert row[expect] == 1, (i, expect)
        assert row[["zero_pages", "unique_pages", "duplicate_within_pages",
                    "duplicate_across_pages", "ineligible_pages", "not_stored_pages"]].sum() == 1


def test_address_map_bins_a_larger_dump(tmp_path):
    # 1000 pages into 256 bins; pages 0-499 zero, 500-999 unique: every bin's counts add up.
    pages = [ZERO] * 500 + [rng.integers(0, 256, PS, dtype=np.uint8).tobytes()
                            for _ in range(500)]
    dump = make_raw(tmp_path / "big.raw", pages)
    amap = analyze([dump], jobs=1, base_address=0x100000).address_map
    assert len(amap) == 256
    assert amap["pages"].sum() == 1000
    assert amap["zero_pages"].sum() == 500 and amap["unique_pages"].sum() == 500
    assert amap["first_address"].iloc[0] == 0x100000
    assert amap["last_address"].iloc[-1] == 0x100000 + 999 * PS
    assert (amap[["zero_pages", "unique_pages"]].sum(axis=1) == amap["pages"]).all()


def test_process_core_counts_only_pages_ksm_may_merge(tmp_path):
    from dumpwriter.elf import Seg, make_elf_core

    dup = rnd()
    exe = "/usr/bin/example"
    segs = [
        Seg(0x400000, dup, 3 * PS),  # file-backed text: one page stored, two not saved
        Seg(0x700000, dup + dup + rnd()),  # anonymous heap
    ]
    path = tmp_path / "core"
    make_elf_core(path, segs, producer="process", nt_file=[(0x400000, 0x403000, 0, exe)],
                  unaligned=False)
    result = analyze([path], jobs=1)
    top = result.top_contents.set_index("content_hash")
    # The file-backed copy of dup is not mergeable: two copies, not three.
    assert top.loc[hashlib.sha256(dup).hexdigest(), "copies"] == 2
    amap = result.address_map
    assert amap["ineligible_pages"].sum() == 1
    assert amap["not_stored_pages"].sum() == 2
    assert amap["duplicate_within_pages"].sum() == 2
    assert amap["unique_pages"].sum() == 1
    assert list(amap["first_address"]) == [0x400000, 0x401000, 0x402000, 0x700000, 0x701000,
                                            0x702000]


def _pairwise_loop(table, mps: int) -> list[dict]:
    """The pairwise table the plain way, one pair of inputs at a time (the implementation
    before issue 18, kept here as a reference): dicts of counts, no numpy."""
    held: list[dict[int, int]] = [{} for _ in table.names]
    for c, o, p in zip(table.content.tolist(), table.owner.tolist(), table.pages.tolist(),
                       strict=True):
        held[o][c] = p
    nonzero = [int(u) + sum(h.values())
               for u, h in zip(table.column("unique_pages").tolist(), held, strict=True)]
    names = [name.rsplit("/", 1)[-1] for name in table.names]
    rows = []
    for a, b in itertools.permutations(range(len(held)), 2):
        both = held[a].keys() & held[b].keys()
        in_b = sum(held[a][c] for c in both)
        extra = sum(_saved(held[a][c] + held[b][c], mps) - _saved(held[a][c], mps)
                    - _saved(held[b][c], mps) for c in both)
        rows.append({"input_a": names[a], "input_b": names[b], "a_nonzero_pages": nonzero[a],
                     "a_pages_in_b": in_b,
                     "a_fraction_in_b": in_b / nonzero[a] if nonzero[a] else 0.0,
                     "extra_saved_pages": extra, "extra_saved_bytes": extra * PS})
    return rows


def _random_table(seed: int, n: int) -> ContentTable:
    gen = np.random.default_rng(seed)
    rows = [(c, o, int(gen.integers(1, 9))) for c in range(int(gen.integers(0, 40)))
            for o in sorted(gen.choice(n, int(gen.integers(1, n + 1)), replace=False).tolist())]
    rows = [r for r in rows if sum(p for c, _, p in rows if c == r[0]) >= 2]
    content, owner, pages = (np.array([r[i] for r in rows], dt)
                             for i, dt in ((0, np.int64), (1, np.int32), (2, np.int64)))
    cols = Columns({"input": [f"/d/g{i}.raw" for i in range(n)],
                    "unique_pages": gen.integers(0, 5, n), "zero_pages": np.zeros(n, np.int64),
                    "domain": np.zeros(n, np.int64)})
    return ContentTable(cols, content, owner, pages, PS)


def _sharing_rows(loop: list[dict], order: list[str], top: int = 0) -> list[dict]:
    """The rows of the pair-by-pair loop that share, as pairwise orders them (by input A,
    most pages of A in B, then most extra saved, then B's order), ``top`` per input A."""
    at = {name: i for i, name in enumerate(order)}
    rows = sorted((r for r in loop if r["a_pages_in_b"] > 0),
                  key=lambda r: (at[r["input_a"]], -r["a_pages_in_b"], -r["extra_saved_pages"],
                                 at[r["input_b"]]))
    if top:
        seen: Counter[str] = Counter()
        kept = []
        for r in rows:
            seen[r["input_a"]] += 1
            if seen[r["input_a"]] <= top:
                kept.append(r)
        rows = kept
    return rows


def _names(table) -> list[str]:
    return [name.rsplit("/", 1)[-1] for name in table.names]


@pytest.mark.parametrize("seed", range(40))
def test_pairwise_equals_the_pair_by_pair_loop_on_random_tables(seed):
    # Issue 18 class 11: the table is computed over the sparse rows at once; issue 21: only
    # the pairs that share, grouped by the inputs holding each content. Every row and type
    # must be what the pair-by-pair loop gives, with the pairs that share nothing left out.
    n = 1 + seed % 7
    table = _random_table(seed, n)
    for mps in (2, 3, 256):
        got = pairwise(table, max_page_sharing=mps)
        loop = _pairwise_loop(table, mps)
        expected = _sharing_rows(loop, _names(table))
        assert got.rows.records() == expected
        assert got.sharing == len(expected) and got.left_out == 0
        if expected:
            frame = Columns.from_records(expected, list(got.rows.data)).frame()
            assert got.rows.frame().dtypes.to_dict() == frame.dtypes.to_dict()


def _family_table(mps_heavy: int = 200) -> ContentTable:
    """30 inputs: a base image of 40 contents every input holds (one page each; 3 of them
    held 200 times by input 7: more than half a KSM page), 6 families of 5 holding 20
    contents each (input 5 * f + i holds i + 1 copies), neighbours 2i and 2i + 1 sharing 3
    contents, and inputs 28 and 29 sharing nothing with anyone but the base."""
    rows = [(c, o, mps_heavy if o == 7 and c < 3 else 1) for c in range(40) for o in range(30)]
    rows += [(100 + 20 * f + c, 5 * f + i, i + 1) for f in range(6) for c in range(20)
             for i in range(5)]
    rows += [(1000 + 3 * i + c, o, 1) for i in range(14) for c in range(3)
             for o in (2 * i, 2 * i + 1)]
    content, owner, pages = (np.array([r[i] for r in rows], dt)
                             for i, dt in ((0, np.int64), (1, np.int32), (2, np.int64)))
    order = np.lexsort((owner, content))
    cols = Columns({"input": [f"/d/g{i:02}.raw" for i in range(30)],
                    "unique_pages": np.arange(30) % 4, "zero_pages": np.zeros(30, np.int64),
                    "domain": np.zeros(30, np.int64)})
    return ContentTable(cols, content[order], owner[order], pages[order], PS)


@pytest.mark.parametrize("mps", [2, 3, 256])
def test_pairwise_of_families_equals_the_pair_by_pair_loop(monkeypatch, mps):
    # Contents held by many inputs alike are summed as one group: the rows must be those of
    # the loop, whether a block of inputs is summed densely or sparsely, at once or in
    # pieces of a few pair terms.
    table = _family_table()
    expected = _sharing_rows(_pairwise_loop(table, mps), _names(table))
    assert len(expected) == 30 * 29  # the base image: every pair shares
    for cells, at_once in ((1 << 21, 1 << 21), (30, 7), (1, 1), (450, 100)):
        monkeypatch.setattr(sharing, "_CELLS_AT_ONCE", cells)
        monkeypatch.setattr(sharing, "_PAIRS_AT_ONCE", at_once)
        got = pairwise(table, max_page_sharing=mps)
        assert got.rows.records() == expected, (cells, at_once)
        for top in (1, 4, 29):
            cut = pairwise(table, max_page_sharing=mps, top=top)
            assert cut.rows.records() == _sharing_rows(expected, _names(table), top)
            assert (cut.sharing, cut.left_out) == (30 * 29, 30 * 29 - 30 * top)


def test_top_keeps_the_k_largest_per_input_ties_by_extra_then_input_order():
    # g0 holds 1 page of contents 0..4, each also in one of g1..g5, and 2 copies of content
    # 5, also in g6 (2 copies): a_pages_in_b 2 for g6, 1 for the others. With
    # max_page_sharing 2, 1 + 1 copies save one page more together (g2, g4); 1 + 2 or 2 + 2
    # copies save nothing more (3 copies: 1 saved, as 2 alone; 4: 2, as 2 + 2 alone).
    rows = [(0, 0, 1), (0, 1, 2), (1, 0, 1), (1, 2, 1), (2, 0, 1), (2, 3, 2), (3, 0, 1),
            (3, 4, 1), (4, 0, 1), (4, 5, 2), (5, 0, 2), (5, 6, 2)]
    content, owner, pages = (np.array([r[i] for r in rows], dt)
                             for i, dt in ((0, np.int64), (1, np.int32), (2, np.int64)))
    cols = Columns({"input": [f"g{i}.raw" for i in range(7)],
                    "unique_pages": np.zeros(7, np.int64), "zero_pages": np.zeros(7, np.int64),
                    "domain": np.zeros(7, np.int64)})
    table = ContentTable(cols, content, owner, pages, PS)
    got = pairwise(table, max_page_sharing=2, top=3)
    g0 = [(r["input_b"], r["a_pages_in_b"], r["extra_saved_pages"])
          for r in got.rows.records() if r["input_a"] == "g0.raw"]
    # g6 (2 pages), then of the 1-page ties those saving one more (g2, g4), by input order.
    assert g0 == [("g6.raw", 2, 0), ("g2.raw", 1, 1), ("g4.raw", 1, 1)]
    assert got.sharing == 12 and got.left_out == 3  # g0 -> g1, g3, g5 cut
    assert "3 of the 12 ordered pairs" in (got.note() or "")
    assert pairwise(table, max_page_sharing=2, top=5).left_out == 1
    assert pairwise(table, max_page_sharing=2, top=6).note() is None


def test_pairs_that_share_nothing_are_absent():
    # Two families of three that share nothing across: 2 x 3 x 2 ordered pairs, no other.
    rows = [(c, o, 1) for c in range(4) for o in (0, 1, 2)] + \
        [(10 + c, o, 1) for c in range(4) for o in (3, 4, 5)]
    content, owner, pages = (np.array([r[i] for r in rows], dt)
                             for i, dt in ((0, np.int64), (1, np.int32), (2, np.int64)))
    cols = Columns({"input": [f"g{i}.raw" for i in range(7)],
                    "unique_pages": np.ones(7, np.int64), "zero_pages": np.zeros(7, np.int64),
                    "domain": np.zeros(7, np.int64)})
    got = pairwise(ContentTable(cols, content, owner, pages, PS), max_page_sharing=256)
    pairs = {(r["input_a"], r["input_b"]) for r in got.rows.records()}
    family = [{f"g{i}.raw" for i in f} for f in ((0, 1, 2), (3, 4, 5))]
    assert pairs == {(x, y) for f in family for x in f for y in f if x != y}
    assert got.sharing == 12


def test_twin_warnings_name_the_same_pairs_as_the_pair_by_pair_rule():
    # 4 inputs: g1 holds all of g0's pages (g0 is g1's twin), g2 shares half of g3's.
    rows = [(c, o, 1) for c in range(10) for o in (0, 1)] + [(100 + c, o, 1) for c in range(5)
                                                            for o in (2, 3)]
    content, owner, pages = (np.array([r[i] for r in rows], dt)
                             for i, dt in ((0, np.int64), (1, np.int32), (2, np.int64)))
    order = np.lexsort((owner, content))
    cols = Columns({"input": [f"g{i}.raw" for i in range(4)],
                    "unique_pages": np.array([0, 5, 5, 5]), "zero_pages": np.zeros(4, np.int64),
                    "domain": np.zeros(4, np.int64)})
    table = ContentTable(cols, content[order], owner[order], pages[order], PS)
    pw = pairwise(table, max_page_sharing=256)
    fps = [SimpleNamespace(page_size=PS, address_space="virtual")] * 4
    warnings = twin_warnings(pw, fps)  # type: ignore[arg-type]
    assert len(warnings) == 1
    assert warnings[0].startswith("g0.raw and g1.raw are nearly the same input: 100% of the 10 ")


def test_twins_are_all_found_when_the_table_is_cut():
    # 6 clones of one guest (10 pages each, all shared): 15 pairs of nearly identical inputs,
    # whatever the table keeps per input; 5 named, the rest counted in one line.
    rows = [(c, o, 1) for c in range(10) for o in range(6)]
    content, owner, pages = (np.array([r[i] for r in rows], dt)
                             for i, dt in ((0, np.int64), (1, np.int32), (2, np.int64)))
    cols = Columns({"input": [f"g{i}.raw" for i in range(6)],
                    "unique_pages": np.zeros(6, np.int64), "zero_pages": np.zeros(6, np.int64),
                    "domain": np.zeros(6, np.int64)})
    table = ContentTable(cols, content, owner, pages, PS)
    fps = [SimpleNamespace(page_size=PS, address_space="virtual")] * 6
    every = twin_warnings(pairwise(table, max_page_sharing=256), fps)  # type: ignore[arg-type]
    cut = pairwise(table, max_page_sharing=256, top=1)
    assert len(cut.rows) == 6 and len(cut.twins) == 15
    assert twin_warnings(cut, fps) == every  # type: ignore[arg-type]
    assert every[0].startswith("g0.raw and g1.raw are nearly the same input")
    assert every[4].startswith("g0.raw and g5.raw are")  # itertools.combinations order
    assert every[5].startswith("10 more pairs of inputs are nearly the same")


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_pairwise_in_chunks_of_a_few_rows_equals_the_pair_by_pair_loop(monkeypatch, seed):
    # Issue 21: the groups are found a few sparse rows at a time (whole contents each), so
    # their temporaries are a few arrays of ROWS_AT_ONCE, not of the table (tens of bytes a
    # row of a fleet's millions). Cut into chunks of 1 to 5 rows, the rows must be the loop's.
    table = _random_table(seed, 1 + seed % 7)
    for rows_at_once in (1, 2, 5):
        monkeypatch.setattr("ksm_analyze.ksm.ROWS_AT_ONCE", rows_at_once)
        monkeypatch.setattr(sharing, "ROWS_AT_ONCE", rows_at_once)
        for mps in (2, 3, 256):
            expected = _sharing_rows(_pairwise_loop(table, mps), _names(table))
            assert pairwise(table, max_page_sharing=mps).rows.records() == expected


def test_pairwise_stays_exact_when_digests_collide(monkeypatch):
    # Contents are grouped by a 64-bit digest of their rows, then checked row by row (and
    # by length) against their group's first: with a digest that says every content is
    # alike, the rows must still be the pair-by-pair loop's.
    monkeypatch.setattr(ksm_module, "_mix64", lambda x: x * np.uint64(0))
    for seed in (1, 5, 12, 20):
        table = _random_table(seed, 2 + seed % 6)
        for mps in (2, 3, 256):
            expected = _sharing_rows(_pairwise_loop(table, mps), _names(table))
            assert pairwise(table, max_page_sharing=mps).rows.records() == expected
