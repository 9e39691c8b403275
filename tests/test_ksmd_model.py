"""The ksmd time model (ksm_analyze/ksmd/simulate.py, rules.py) against hand-derived scans.

Expected values come from the kernel's rules worked by hand (mm/ksm.c as quoted in
docs/model.md) or from counters measured on this machine's kernel
(shared/reference/ksm-semantics.md), never from the model itself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ksm_analyze.ksmd.knobs import Knobs
from ksm_analyze.ksmd.rules import rules_for
from ksm_analyze.ksmd.simulate import simulate, steady_state
from ksm_analyze.ksmd.timeline import Timeline

NEW = rules_for("6.18.44-fc-v1272")
PS = 4096


def timeline(content, rate=None, aged=None, zero_id=-1) -> Timeline:
    content = np.asarray(content, np.int64)
    n = len(content)
    return Timeline(
        inputs=["t"], owner=np.zeros(n, np.int32), content=content, zero_id=zero_id,
        change_rate=np.zeros(n) if rate is None else np.asarray(rate, np.float64),
        aged=np.zeros(n, bool) if aged is None else np.asarray(aged, bool),
    )


def test_rules_by_release():
    r = rules_for("6.18.44-fc-v1272")
    assert (r.version, r.two_visit_gate, r.has_smart_scan, r.has_advisor) == ((6, 18), True,
                                                                             True, True)
    r = rules_for("6.1.0-28-amd64")
    assert (r.two_visit_gate, r.has_smart_scan, r.has_advisor, r.has_general_profit) == (
        False, False, False, False)
    r = rules_for("6.8.0-45-generic")
    assert (r.two_visit_gate, r.has_smart_scan, r.has_advisor) == (False, True, True)
    assert rules_for("5.15").version == (5, 15)
    assert not rules_for("6.10").two_visit_gate and rules_for("6.11").two_visit_gate
    with pytest.raises(ValueError, match="'linux-next'"):
        rules_for("linux-next")


def test_static_duplicates_merge_on_the_second_scan():
    # 3 copies of one content and 2 unique pages; the checksum gate fails on each page's
    # first visit (oldchecksum starts 0), so nothing merges in full scan 1.
    t = simulate(timeline([7, 7, 7, 8, 9]), Knobs(smart_scan=False), NEW)
    s = t.scans
    assert s.loc[0, ["pages_shared", "pages_sharing", "pages_unshared"]].tolist() == [0, 0, 0]
    assert s.loc[0, "pages_volatile"] == 5
    assert s.loc[1, ["pages_shared", "pages_sharing", "pages_unshared"]].tolist() == [1, 2, 2]
    assert s.loc[1, "general_profit"] == 2 * PS - 5 * 64
    assert t.scans_to["90%"] == 2 and t.steady_scan == 2
    # default timing: 5 pages, pages_to_scan 100: one wake-up, 20 ms, per full scan. The
    # merges happen in scan 2's one wake-up, at its start: 20 ms after KSM started.
    assert t.time_to["90%"] == pytest.approx(0.020)
    assert s["pages_shared"].dtype == np.int64


def test_profit_is_reached_in_the_wake_up_that_merges():
    # 250 pages, pages_to_scan 100: 3 wake-ups of 20 ms per full scan (250 // 100 + 1),
    # 60 ms a scan. The 50 duplicates are pages 200..249: processed by scan 2's third
    # wake-up, which starts 2 x 20 ms into the scan, at 60 + 40 = 100 ms.
    t = simulate(timeline(list(range(200)) + [999] * 50), Knobs(smart_scan=False), NEW)
    assert t.scans["time_seconds"].iloc[0] == pytest.approx(0.060)
    assert t.time_to["50%"] == pytest.approx(0.100)
    assert t.time_to["90%"] == pytest.approx(0.100)


@pytest.mark.parametrize("seed", range(12))
def test_joining_a_ksm_page_needs_two_visits_since_6_11(seed):
    # Two fresh copies merge in scan 2. A third copy took this content after KSM had aged it
    # (phase unknown: processed on scan p in 1..9, then every 9th). Before 6.11 its first
    # processed visit at p >= 2 joins the KSM page (stable search before the gate); since
    # 6.11 that visit only records the checksum and it joins 9 scans later. Processed on
    # scan 1 (no KSM page yet), it joins on scan 10 under both.
    pages = timeline([5, 5, 5], aged=[False, False, True])
    joins = {}
    for release in ("6.8", "6.18"):
        s = simulate(pages, Knobs(), rules_for(release), seed=seed).scans
        joins[release] = int(np.flatnonzero(s["pages_sharing"].to_numpy() == 2)[0]) + 1
        assert s["pages_sharing"].iloc[-1] == 2
    if joins["6.8"] <= 9:
        assert joins["6.18"] == joins["6.8"] + 9
    else:
        assert joins["6.8"] == joins["6.18"] == 10


def test_smart_scan_schedule():
    # One stable unique page created in full scan 1: processed on scans 1, 2, 3, 4, 6, 9,
    # 14, then every 9th (23, 32, 41, ...), skipped on all others; from its second visit on
    # it passes the gate and sits in the unstable tree (pages_unshared 1) after the scans it
    # is processed on.
    s = simulate(timeline([1]), Knobs(), NEW, max_scans=60).scans
    skipped = np.diff(np.concatenate(([0], s["pages_skipped"].to_numpy())))
    processed = [int(k) + 1 for k in np.flatnonzero(skipped == 0)]
    expected = [1, 2, 3, 4, 6, 9, 14, 23, 32, 41, 50, 59]
    assert processed == [k for k in expected if k <= len(s)]
    unshared = [int(k) + 1 for k in np.flatnonzero(s["pages_unshared"].to_numpy() == 1)]
    assert unshared == processed[1:]
    assert (s["ksm_rmap_items"] == 1).all()


def test_no_smart_scan_before_6_7():
    s = simulate(timeline([1, 2, 3]), Knobs(smart_scan=True), rules_for("6.1.0-28-amd64")).scans
    assert (s["pages_skipped"] == 0).all()
    assert (s["pages_unshared"].iloc[1:] == 3).all()


@pytest.mark.parametrize(("mps", "shared", "sharing"), [(2, 7, 7), (4, 4, 11), (256, 3, 14)])
def test_max_page_sharing_leftovers_as_measured(mps, shared, sharing):
    # ksm-semantics.md section 0: 5 + 3 + 9 copies of three contents and 2 random pages,
    # merged by the real ksmd on kernel 6.18.
    content = [1] * 5 + [2] * 3 + [3] * 9 + [4, 5]
    steady = steady_state(timeline(content), Knobs(max_page_sharing=mps), NEW)
    assert (steady.pages_shared, steady.pages_sharing) == (shared, sharing)
    assert steady.ksm_rmap_items == 19


def test_churning_pages_never_merge():
    # 10 copies rewritten faster than any two visits: the gate never passes.
    t = simulate(timeline([3] * 10 + [4, 4], rate=[np.inf] * 10 + [0, 0]), Knobs(), NEW)
    s = t.scans
    assert (s["pages_sharing"].iloc[1:] == 1).all() and (s["pages_shared"].iloc[1:] == 1).all()
    assert t.steady is not None
    assert (t.steady.pages_unshared, t.steady.pages_volatile) == (0, 10)


def test_merged_pages_that_change_break_cow():
    # Written once a second on average, scanned every 20 ms (2 pages, one wake-up): a
    # merged pair stays merged between writes; at a rate of 1e6/s it never stays merged.
    slow = simulate(timeline([2, 2], rate=[1.0, 1.0]), Knobs(smart_scan=False), NEW,
                    max_scans=300, seed=1).scans
    fast = simulate(timeline([2, 2], rate=[1e6, 1e6]), Knobs(smart_scan=False), NEW,
                    max_scans=100, seed=1).scans
    assert (fast["pages_sharing"] == 0).all()
    # P(unchanged over 20 ms) = exp(-0.02) ~ 0.98 per page: merged most of the time
    assert slow["pages_sharing"].mean() > 0.8


@pytest.mark.parametrize("use_zero_pages", [False, True])
def test_zero_pages(use_zero_pages):
    # 5 written zero pages and 2 copies of A.
    pages = timeline([0] * 5 + [9, 9], zero_id=0)
    t = simulate(pages, Knobs(use_zero_pages=use_zero_pages, smart_scan=False), NEW)
    s, steady = t.scans, t.steady
    assert steady is not None
    if use_zero_pages:
        # mapped to the zero page on scan 2; their rmap_items go on scan 3
        assert s.loc[1, ["ksm_zero_pages", "ksm_rmap_items"]].tolist() == [5, 7]
        assert s.loc[2, ["ksm_zero_pages", "ksm_rmap_items"]].tolist() == [5, 2]
        assert (steady.pages_shared, steady.pages_sharing) == (1, 1)
        assert steady.general_profit == (1 + 5) * PS - 2 * 64
    else:
        assert (steady.pages_shared, steady.pages_sharing, steady.ksm_zero_pages) == (2, 5, 0)
        assert steady.general_profit == 5 * PS - 7 * 64
    # before 6.6 the zero pages were not in general_profit
    old = steady_state(pages, Knobs(use_zero_pages=use_zero_pages), rules_for("6.5"))
    assert old.general_profit == (1 if use_zero_pages else 5) * PS - old.ksm_rmap_items * 64


def test_late_duplicates():
    # 200 pairs whose content came after KSM aged them (ksm-semantics.md 1.11): with
    # smart_scan on none merge (the measured rule), the upper bound merges all; off, all
    # merge in two scans.
    pages = timeline(list(range(200)) * 2, aged=[True] * 400)
    on = simulate(pages, Knobs(), NEW)
    assert on.steady is not None and on.steady.pages_sharing == 0
    assert (on.late_duplicates, on.late_duplicates_merged) == (400, 0)
    assert on.if_phases_met is not None
    assert (on.if_phases_met.pages_shared, on.if_phases_met.pages_sharing) == (200, 200)
    off = simulate(pages, Knobs(smart_scan=False), NEW)
    assert off.steady is not None and off.steady.pages_sharing == 200
    assert off.scans_to["steady"] == 2 and off.if_phases_met is None
    # Joining an existing KSM page is not affected: a late copy of a merged content joins.
    join = simulate(timeline([1, 1, 1], aged=[False, False, True]), Knobs(), NEW)
    assert join.late_duplicates_merged == 1 and join.steady is not None
    assert join.steady.pages_sharing == 2


def test_scan_time_and_advisor_hooks():
    class Advisor:
        def __init__(self) -> None:
            self.pages_to_scan = 500
            self.seen: list[tuple[float, float]] = []

        def after_scan(self, wall_seconds: float, cpu_seconds: float) -> int:
            self.seen.append((wall_seconds, cpu_seconds))
            self.pages_to_scan += 1
            return self.pages_to_scan

    def timer(work, knobs):
        return work.processed * 0.001 + work.skipped * 0.0001, work.processed * 0.0005

    adv = Advisor()
    s = simulate(timeline([1, 1, 2]), Knobs(advisor_mode="scan-time", smart_scan=False), NEW,
                 scan_time=timer, advisor=adv, max_scans=20).scans
    assert s["pages_to_scan"].tolist()[:3] == [500, 501, 502]
    assert adv.seen[0] == (0.003, 0.0015)
    assert s["ksmd_cpu_percent"].iloc[0] == pytest.approx(50.0)
    assert s["time_seconds"].iloc[1] == pytest.approx(0.006)
    # without the advisor on the kernel, pages_to_scan stays the knob
    old = simulate(timeline([1, 1, 2]), Knobs(advisor_mode="scan-time"), rules_for("6.7"),
                   advisor=Advisor(), max_scans=5).scans
    assert (old["pages_to_scan"] == 100).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("smart", "zero_pages", "mps", "release", "advised"), [
    (True, False, 256, "6.18", False), (False, False, 256, "6.18", False),
    (True, True, 3, "6.18", False), (False, True, 2, "6.1", False),
    (True, False, 4, "6.8", True), (True, True, 256, "5.10", False),
])
def test_still_memory_shortcut_gives_the_replay_s_rows(seed, smart, zero_pages, mps, release,
                                                      advised):
    from ksm_analyze.ksmd.advisor import Advisor
    from ksm_analyze.ksmd.cost import CpuCost, full_scan

    # Every kind of visit with a cost of its own, so the scans' work must agree too.
    cost = CpuCost(seconds_per_page=4e-6, seconds_per_skipped=3e-7, seconds_per_merged=1e-6,
                   seconds_per_merge=2.5e-5, seconds_per_first_visit=9e-7)

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    content = rng.zipf(1.6, n) % int(rng.integers(2, 400))  # many copies of few contents
    knobs = Knobs(smart_scan=smart, use_zero_pages=zero_pages, max_page_sharing=mps,
                  pages_to_scan=int(rng.integers(1, 700)),
                  advisor_mode="scan-time" if advised else "none")

    def timer(work, k):
        t = full_scan(work.processed, work.skipped, k, cost, merged=work.ksm_pages,
                      merges=work.merges, first_visits=work.first_visits)
        return t.wall_seconds, t.cpu_seconds

    if seed % 2:  # contents held once may come as negative ids (series.still_timeline)
        once = np.bincount(content)[content] == 1
        content = np.where(once & (content != content[0]), -1, content)
    still = Timeline(**{**timeline(content, zero_id=int(content[0])).__dict__,
                        "first_scan_only": int(rng.integers(0, 500))})
    runs = [simulate(still, knobs, rules_for(release),
                     scan_time=timer, advisor=Advisor(knobs) if advised else None,
                     full_replay=full) for full in (False, True)]
    fast, slow = runs
    pd.testing.assert_frame_equal(fast.scans, slow.scans)
    assert fast.steady == slow.steady and fast.time_to == slow.time_to


def test_zero_thp_subpages_cost_the_first_full_scan_only():
    # 200 pages (100 contents x 2) and 300 all-zero subpages of huge pages, which ksmd
    # visits on full scan 1 (an rmap_item each, a share of pages_to_scan) and which its
    # split of the huge page maps to the zero page on scan 2 (measured on 6.18: 23,236
    # pages and 8,599 zero THP subpages of a TCG guest gave 31,835 rmap_items after scan 1).
    base = timeline(np.repeat(np.arange(1, 101), 2))
    with_thp = Timeline(**{**base.__dict__, "first_scan_only": 300})
    knobs = Knobs(smart_scan=False, pages_to_scan=100, sleep_millisecs=20)
    s = simulate(with_thp, knobs, NEW).scans
    # Scan 1: 500 pages in 5 wake-ups of 20 ms; then 200 pages in 2 (sleep-only timing).
    assert s.loc[0, "ksm_rmap_items"] == 500 and s.loc[0, "pages_volatile"] == 500
    assert s.loc[0, "time_seconds"] == pytest.approx(0.100)
    assert s.loc[1, "ksm_rmap_items"] == 200
    assert s.loc[1, "time_seconds"] == pytest.approx(0.140)
    assert s.loc[1, ["pages_shared", "pages_sharing"]].tolist() == [100, 100]
    assert s.loc[0, "general_profit"] == -500 * 64
    plain = simulate(base, knobs, NEW).scans
    assert plain.loc[0, "time_seconds"] == pytest.approx(0.040)
    with pytest.raises(ValueError, match="first_scan_only"):
        Timeline(**{**base.__dict__, "first_scan_only": -1})


def test_wakeup_quantiles_are_numpy_s_quantiles():
    # Counted instead of sorted (merges are many, wake-ups few): the same numbers.
    from ksm_analyze.ksmd.simulate import _QUANTILES, _wakeup_quantiles

    rng = np.random.default_rng(1)
    for _ in range(200):
        wakeup = rng.integers(0, rng.integers(1, 50), rng.integers(1, 500))
        wakeups = int(wakeup.max()) + 1 + int(rng.integers(0, 3))
        np.testing.assert_allclose(_wakeup_quantiles(np.bincount(wakeup, minlength=wakeups)),
                                   np.quantile(wakeup / wakeups, _QUANTILES))
