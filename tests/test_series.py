"""Samples of one input over time (ksm_analyze/series.py): grouping, stability, the Timeline.

Each sample is built by hand: page address -> content letter, so every expected number
below is counted from the letters, not computed by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ksm_analyze.eligibility import Scope, scan_mask
from ksm_analyze.formats import DumpFormat
from ksm_analyze.hashing.stage1 import Fingerprints
from ksm_analyze.pages import Extent, MapFlags, PageState
from ksm_analyze.series import group_samples, stability, timeline

PS = 4096
BASE = 0x7F0000000000
_MERGEABLE = MapFlags.ANON | MapFlags.MERGEABLE


def _hash(letter: str) -> tuple[int, int]:
    """A stand-in content hash per letter; ``0`` is the all-zero page, hashed (0, 0)."""
    return (0, 0) if letter == "0" else (ord(letter) * 1_000_003, ord(letter) * 7)


def _sample(pages: str, *, identity: str | None, at: float | None, name: str = "p:1"
            ) -> Fingerprints:
    """One input whose page i (``.`` = absent) holds content ``pages[i]``."""
    present = [i for i, c in enumerate(pages) if c != "."]
    addrs = np.array([BASE + i * PS for i in present], np.uint64)
    content = np.array([_hash(pages[i]) for i in present], np.uint64).reshape(-1, 2)
    info: dict[str, object] = {}
    if identity is not None:
        info["identity"] = identity
    if at is not None:
        info["sampled_at"] = at
    return Fingerprints(
        path=name, format=DumpFormat.SNAPSHOT, address_space="virtual", page_size=PS,
        prefix_bytes=128, extents=[Extent(BASE, len(pages), PageState.DATA, flags=_MERGEABLE)],
        info=info, warnings=[], addrs=addrs,
        prefix=np.array([0 if pages[i] == "0" else 1 + ord(pages[i]) for i in present],
                        np.uint64),
        state_pages={s: 0 for s in PageState}, content=content)


def test_samples_of_one_identity_are_one_input_latest_last():
    prints = [_sample("ab", identity="boot:7:100", at=20.0),
              _sample("cd", identity=None, at=None, name="dump.elf"),
              _sample("ab", identity="boot:7:100", at=10.0),
              _sample("ab", identity="boot:8:100", at=10.0, name="p:8")]
    got = group_samples(prints)
    assert got.series == [[2, 0], [1], [3]]
    assert got.latest == [0, 1, 3]
    assert got.over_time


def test_samples_without_distinct_times_are_refused():
    prints = [_sample("ab", identity="b:1:1", at=5.0), _sample("ab", identity="b:1:1", at=5.0)]
    with pytest.raises(ValueError, match="distinct sample times"):
        group_samples(prints)


def test_stability_counts_each_kind_of_page():
    # page: 0 1 2 3 4 5 6 7
    # t=0   a a b c d . 0 e
    # t=10  a a b x d f 0 .
    # t=20  a a y z d f 0 .
    first, mid, last = "aabcd.0e", "aabxdf0.", "aayzdf0."
    ident = "boot:1:1"
    prints = [_sample(s, identity=ident, at=t) for s, t in ((first, 0.0), (mid, 10.0),
                                                            (last, 20.0))]
    masks = [scan_mask(fp, Scope.MERGEABLE) for fp in prints]
    (row,) = stability(prints, masks, group_samples(prints))
    # unchanged: 0, 1, 4, 6 (a, a, d, zero); changed: 2 (b->y), 3 (c->x->z);
    # appeared: 5 (f); gone: 7 (e).
    assert row["samples"] == 3
    assert row["observed_seconds"] == 20.0
    assert (row["pages_unchanged"], row["pages_changed"], row["pages_appeared"],
            row["pages_gone"]) == (4, 2, 1, 1)
    assert row["change_rate_per_second"] == pytest.approx(2 / 20)
    # At the last sample only "a" is held twice, by two unchanged pages: stable.
    assert (row["stable_duplicate_pages"], row["coinciding_duplicate_pages"]) == (2, 0)


def test_duplicates_that_only_coincide_are_told_apart():
    # Pages 0 and 1 become equal only at the last sample: they coincide, they are not stable.
    prints = [_sample("pq", identity="b:2:2", at=0.0), _sample("rr", identity="b:2:2", at=1.0)]
    masks = [scan_mask(fp, Scope.MERGEABLE) for fp in prints]
    (row,) = stability(prints, masks, group_samples(prints))
    assert (row["stable_duplicate_pages"], row["coinciding_duplicate_pages"]) == (0, 2)


def test_an_input_seen_once_has_no_stability_row():
    prints = [_sample("ab", identity=None, at=None, name="d.elf")]
    masks = [scan_mask(fp, Scope.MERGEABLE) for fp in prints]
    assert stability(prints, masks, group_samples(prints)) == []


def test_timeline_rates_ids_and_aged_pages():
    # Two processes on one host, three samples each, 10 s apart.
    #        page: 0 1 2 3
    # A t=0..20:   a b c 0 / a x c 0 / a y c 0      (page 1 changes every interval)
    # B t=0..20:   a d . . / a d e . / a c e .      (page 1 changes once, page 2 appears)
    a = [_sample(s, identity="b:1:1", at=t, name="A") for s, t in
         (("abc0", 0.0), ("axc0", 10.0), ("ayc0", 20.0))]
    b = [_sample(s, identity="b:2:1", at=t, name="B") for s, t in
         (("ad..", 0.0), ("ade.", 10.0), ("ace.", 20.0))]
    prints = [*a, *b]
    masks = [scan_mask(fp, Scope.MERGEABLE) for fp in prints]
    tl = timeline(prints, masks, group_samples(prints), ksm_was_running=True)
    assert tl.inputs == ["A", "B"]
    assert tl.owner.tolist() == [0, 0, 0, 0, 1, 1, 1]
    ids = tl.content.tolist()
    # A: a y c 0; B: a c e. Equal letters, equal ids; the zero page is id 0.
    assert ids[3] == 0 and tl.zero_id == 0
    assert ids[0] == ids[4] and ids[2] == ids[5]
    assert len({ids[0], ids[1], ids[2], ids[6]}) == 4 and 0 not in (ids[0], ids[1], ids[6])
    rate = tl.change_rate.tolist()
    # A's page 1 changed in both intervals: faster than the samples tell.
    assert math.isinf(rate[1])
    # B's page 1 changed in 1 of 2 intervals of 10 s: -ln(1 - 1/2) / 10.
    assert rate[5] == pytest.approx(math.log(2) / 10)
    assert [rate[i] for i in (0, 2, 3, 4, 6)] == [0.0] * 5
    # Aged: present at the first sample and holding another content now, KSM running.
    assert tl.aged.tolist() == [False, True, False, False, False, True, False]
    assert tl.observed_seconds == 20.0
    tl_off = timeline(prints, masks, group_samples(prints), ksm_was_running=False)
    assert not tl_off.aged.any()


def test_timeline_needs_content_hashes():
    fp = _sample("ab", identity=None, at=None)
    bare = Fingerprints(**{**fp.__dict__, "content": None})
    with pytest.raises(ValueError, match="content hashes"):
        timeline([bare], [scan_mask(bare, Scope.MERGEABLE)], group_samples([bare]),
                 ksm_was_running=False)


def test_still_timeline_from_stage2_labels():
    from ksm_analyze.hashing.stage2 import UNIQUE, ZERO

    fp = _sample("abcd", identity=None, at=None, name="d.elf")
    # Rows in reverse address order: the timeline puts them back in address order.
    order = np.arange(4)[::-1]
    fp = Fingerprints(**{**fp.__dict__, "addrs": fp.addrs[order], "prefix": fp.prefix[order]})
    labels = np.array([UNIQUE, 3, ZERO, 3], np.int32)  # rows: d, c, b, a
    mask = scan_mask(fp, Scope.MERGEABLE)
    from ksm_analyze.series import still_timeline

    tl = still_timeline([fp], [mask], [labels])
    ids = tl.content.tolist()  # address order: a (class 3), b (zero), c (class 3), d (unique)
    assert ids[1] == 0 and ids[0] == ids[2] != 0 and ids[3] not in (0, ids[0])
    assert tl.zero_id == 0 and not tl.change_rate.any() and not tl.aged.any()


def _labels_by_letter(fp: Fingerprints, pages: str) -> np.ndarray:
    """Stage 2 labels standing in for byte comparison: a class per letter held twice or
    more on the host (given), ZERO for '0', UNIQUE otherwise."""
    from ksm_analyze.hashing.stage2 import UNIQUE, ZERO

    counts = {c: pages.count(c) for c in set(pages)}
    out = []
    for addr in fp.addrs.tolist():
        c = pages[(addr - BASE) // PS]
        out.append(ZERO if c == "0" else ord(c) if counts[c] >= 2 else UNIQUE)
    return np.array(out, np.int32)


def test_steady_view_unmerges_changing_pages_and_late_duplicates():
    from ksm_analyze.hashing.stage2 import UNIQUE
    from ksm_analyze.series import churn, steady_view

    # One process, two samples 5 s apart, KSM running meanwhile.
    # page:  0 1 2 3 4 5 6 7
    # t=0    a a b c d e 0 0
    # t=5    a a f g g a 0 0    pages 2, 3, 4, 5 changed once (rate inf: every interval)
    # At the last sample: "a" x3 (pages 0, 1 stable + page 5 late), "g" x2 (both late).
    first, last = "aabcde00", "aafgga00"
    prints = [_sample(first, identity="b:1:1", at=0.0), _sample(last, identity="b:1:1", at=5.0)]
    masks = [scan_mask(fp, Scope.MERGEABLE) for fp in prints]
    samples = group_samples(prints)
    got = churn(prints, masks, samples, ksm_was_running=True)
    latest = prints[1]
    page = ((latest.addrs - BASE) // PS).astype(int)
    assert got.aged[0][np.argsort(page)].tolist() == [False, False, True, True, True, True,
                                                      False, False]
    labels = [_labels_by_letter(latest, last)]
    views, new_labels, late = steady_view([latest], [masks[1]], labels, got, hold_seconds=1.0,
                                          smart_scan=True)
    by_page = dict(zip(page.tolist(), new_labels[0].tolist(), strict=True))
    assert views[0].zero[page >= 6].all()  # the two stable zero pages stay zero pages
    # Pages 2, 3, 4, 5 changed between every two samples: rate inf, so never merged.
    assert [by_page[p] for p in (2, 3, 4, 5)] == [UNIQUE] * 4
    assert late == 0  # a changing page is counted as changing, not as a late duplicate
    assert by_page[0] == by_page[1] == ord("a")

    # With three samples, the late pages hold still over the last interval: their rate is
    # finite, they are late duplicates, and "g" has no KSM page to join; page 5 joins "a".
    prints3 = [*prints, _sample(last, identity="b:1:1", at=10.0)]
    masks3 = [scan_mask(fp, Scope.MERGEABLE) for fp in prints3]
    got3 = churn(prints3, masks3, group_samples(prints3), ksm_was_running=True)
    latest3 = prints3[2]
    page3 = ((latest3.addrs - BASE) // PS).astype(int)
    lab3 = [_labels_by_letter(latest3, last)]
    # Changed in 1 of 2 intervals of 5 s: rate ln(2)/5 = 0.139 a second, a page that holds
    # still for 7.2 s on average: changing if KSM needs 10 s to merge it, not if 1 s.
    assert got3.rate[0][page3 == 2][0] == pytest.approx(math.log(2) / 5)
    _, slow, _ = steady_view([latest3], [masks3[2]], lab3, got3, hold_seconds=10.0,
                             smart_scan=False)
    assert (slow[0][page3 >= 3][:2] == UNIQUE).all()
    _, lab_on, late_on = steady_view([latest3], [masks3[2]], lab3, got3, hold_seconds=1.0,
                                     smart_scan=True)
    on = dict(zip(page3.tolist(), lab_on[0].tolist(), strict=True))
    assert late_on == 2  # pages 3 and 4 (g, g): no KSM page to join; page 2 is unique anyway
    assert (on[3], on[4], on[5]) == (UNIQUE, UNIQUE, ord("a"))
    _, lab_off, late_off = steady_view([latest3], [masks3[2]], lab3, got3, hold_seconds=1.0,
                                       smart_scan=False)
    off = dict(zip(page3.tolist(), lab_off[0].tolist(), strict=True))
    assert late_off == 0 and off[3] == off[4] == ord("g")


def test_the_churn_of_a_series_is_its_own():
    """The per-series half of the steady view (docs/architecture.md, "Fleet scale"): each
    page's change rate and age come from its own series' samples only, whatever else is on
    the host (two series and an input seen once, samples interleaved)."""
    from ksm_analyze.series import churn

    a = [_sample(p, identity="A", at=t, name="a")
         for p, t in (("pqcdgg00", 0.0), ("ggcd0gxy", 5.0), ("ggcdg0zy", 7.0))]
    b = [_sample(p, identity="B", at=t, name="b") for p, t in (("gg.c00ab", 1.0),
                                                               ("ggxc0.ab", 4.0))]
    host = [a[0], b[0], a[1], _sample("ggcc0", identity=None, at=None, name="c"), b[1], a[2]]
    masks = [scan_mask(fp, Scope.MERGEABLE) for fp in host]
    everything = churn(host, masks, group_samples(host), ksm_was_running=True)
    for k, own in enumerate((a, b)):
        alone = churn(own, [scan_mask(fp, Scope.MERGEABLE) for fp in own], group_samples(own),
                      ksm_was_running=True)
        assert np.array_equal(alone.rate[0], everything.rate[k])
        assert np.array_equal(alone.aged[0], everything.aged[k])
    # By hand, series A's latest sample (pages 0-7; intervals of 5 s and 2 s, so a page
    # changed in 1 of 2 has rate ln 2 / 3.5 s): pages 0-1 (p, q -> g -> g) and 5 (g -> g ->
    # 0) and 7 (0 -> y -> y) changed once, 2-3 never, 4 (g -> 0 -> g) and 6 (0 -> x -> z)
    # twice (inf); aged: their content at the end is not the one at the start (KSM ran),
    # so page 4, back to "g", is not.
    once = math.log(2) / 3.5
    assert everything.rate[0].tolist() == pytest.approx(
        [once, once, 0.0, 0.0, math.inf, once, math.inf, once])
    assert everything.aged[0].tolist() == [True, True, False, False, False, True, True, True]
