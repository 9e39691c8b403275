"""The ksmd time model against the running kernel's real ksmd (run under flock /work/ksm.lock).

(a) churn: stable duplicates, duplicates a thread rewrites without pause, stable and
rewritten unique pages, written zero pages; the steady counters with smart_scan 1 and 0.
(b) late duplicates: two mappings aged by KSM, then made equal page by page.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time

import numpy as np
import pytest
from conftest import PS

import ksm_sysfs
from ksm_analyze.ksm import KsmSettings, predict
from ksm_analyze.ksmd.knobs import Knobs
from ksm_analyze.ksmd.rules import rules_for
from ksm_analyze.ksmd.simulate import simulate
from ksm_analyze.ksmd.timeline import Timeline

pytestmark = [
    pytest.mark.ksm,
    pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable())),
]

RULES = rules_for(os.uname().release)
WATCH = ("full_scans", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
         "general_profit")


def _region(pages: int) -> tuple[mmap.mmap, np.ndarray]:
    region = mmap.mmap(-1, pages * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_MERGEABLE)
    # No huge pages: the layout is built by hand, and a huge page split by the first merge
    # maps its zero subpages to the zero page (6.12+), which the hand layout does not know.
    region.madvise(mmap.MADV_NOHUGEPAGE)
    return region, np.frombuffer(region, np.uint8).reshape(-1, PS)


def _per_scan(scans: int, timeout: float) -> list[dict[str, int]]:
    """The counters right after each of the next ``scans`` full scans (polled). A reading
    counts only if ``full_scans`` did not move while it was taken (the files are read one
    by one), and the GIL is handed over often: the test's own thread rewrites pages."""
    out: list[dict[str, int]] = []
    last = ksm_sysfs.read("full_scans")
    deadline = time.monotonic() + timeout
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        while len(out) < scans and time.monotonic() < deadline:
            now = ksm_sysfs.read("full_scans")
            if now != last:
                row = {k: ksm_sysfs.read(k) for k in WATCH}
                if row["full_scans"] == now == ksm_sysfs.read("full_scans"):
                    out.append(row)
                last = now
            time.sleep(0.0005)
    finally:
        sys.setswitchinterval(interval)
    return out


# (a) churn -------------------------------------------------------------------------------
CONTENTS, COPIES, UNIQUE, ZERO, CHURN, CHURN_UNIQUE = 40, 15, 300, 100, 400, 100


def _churn_layout(rng: np.random.Generator) -> tuple[np.ndarray, slice, slice]:
    stable = np.repeat(rng.integers(0, 256, (CONTENTS, PS), dtype=np.uint8), COPIES, axis=0)
    unique = rng.integers(0, 256, (UNIQUE, PS), dtype=np.uint8)
    churn = np.repeat(rng.integers(0, 256, (1, PS), dtype=np.uint8), CHURN, axis=0)
    churn_unique = rng.integers(0, 256, (CHURN_UNIQUE, PS), dtype=np.uint8)
    pages = np.concatenate([stable, unique, np.zeros((ZERO, PS), np.uint8), churn,
                            churn_unique])
    first = CONTENTS * COPIES + UNIQUE + ZERO
    return pages, slice(first, first + CHURN), slice(first + CHURN, first + CHURN + CHURN_UNIQUE)


def _churn_timeline() -> Timeline:
    """The test's known layout: contents by id, rates 0 (stable) or inf (rewritten)."""
    stable = np.repeat(np.arange(CONTENTS), COPIES)
    unique = 1000 + np.arange(UNIQUE)
    zero = np.full(ZERO, 9000)  # one content (a negative id would mean "held once")
    churn = np.full(CHURN, 5000)  # identical to each other at most instants
    churn_unique = 6000 + np.arange(CHURN_UNIQUE)
    content = np.concatenate([stable, unique, zero, churn, churn_unique]).astype(np.int64)
    rate = np.concatenate([np.zeros(len(content) - CHURN - CHURN_UNIQUE),
                           np.full(CHURN + CHURN_UNIQUE, np.inf)])
    n = len(content)
    return Timeline(["churn"], np.zeros(n, np.int32), content, 9000, rate, np.zeros(n, bool))


@pytest.mark.parametrize("smart_scan", [1, 0])
def test_churn_steady_state_matches_kernel(smart_scan):
    if ksm_sysfs.other_ksm_users([os.getpid()]):
        pytest.skip("other processes use KSM: the host counters are not ours alone")
    pages, churn, churn_unique = _churn_layout(np.random.default_rng(smart_scan))
    knobs = Knobs(pages_to_scan=500, sleep_millisecs=10, smart_scan=bool(smart_scan))
    stop = threading.Event()
    with ksm_sysfs.ksm_session(pages_to_scan=knobs.pages_to_scan,
                               sleep_millisecs=knobs.sleep_millisecs, smart_scan=smart_scan,
                               max_page_sharing=256, use_zero_pages=0):
        region, m = _region(len(pages))
        m[:] = pages

        def rewrite(words_c: np.ndarray, words_u: np.ndarray) -> None:
            stamp = np.uint64(0)
            while not stop.is_set():
                stamp += np.uint64(1)
                words_c[:, 0] = stamp  # the same stamp in every churning copy
                words_u[:, 0] = stamp

        writer = threading.Thread(target=rewrite, daemon=True, args=(
            m[churn].view(np.uint64), m[churn_unique].view(np.uint64)))
        writer.start()
        try:
            start = ksm_sysfs.read("full_scans")
            (ksm_sysfs.KSM / "run").write_text("1\n")
            measured = _per_scan(60, timeout=90)
        finally:
            stop.set()
            writer.join()
            del writer, m
            region.close()
    assert len(measured) == 60, "ksmd did not complete 60 full scans in 90 s"
    predicted = simulate(_churn_timeline(), knobs, RULES)
    assert predicted.steady is not None
    last = {k: float(np.mean([r[k] for r in measured[-9:]])) for k in WATCH}
    for k in ("pages_shared", "pages_sharing", "general_profit"):
        expected = getattr(predicted.steady, k)
        assert abs(last[k] - expected) <= 0.02 * abs(expected), (k, last[k], expected)
    # unmerged pages: their sum is exact; the split between unshared and volatile depends on
    # the smart_scan phase at the moment of reading (see docs/model.md)
    assert last["pages_unshared"] + last["pages_volatile"] == pytest.approx(
        predicted.steady.pages_unshared + predicted.steady.pages_volatile, rel=0.02)
    # Time to 90% of steady general_profit, in full scans (the CPU cost model is separate).
    profit = np.array([r["general_profit"] for r in measured])
    reached = measured[int(np.flatnonzero(profit >= 0.9 * last["general_profit"])[0])]
    measured_90 = reached["full_scans"] - start
    assert predicted.scans_to["90%"] is not None
    assert abs(predicted.scans_to["90%"] - measured_90) <= 0.25 * measured_90
    # A one-time count of the same pages: the 400 churning copies look like 2 KSM pages
    # (max_page_sharing 256) and 398 more pages saved, which the kernel never keeps.
    copies = np.array([COPIES] * CONTENTS + [CHURN])
    once = predict(copies, ZERO, KsmSettings(), singletons=UNIQUE + CHURN_UNIQUE)
    assert once.pages_sharing - predicted.steady.pages_sharing == CHURN - 2
    assert once.pages_sharing - last["pages_sharing"] == pytest.approx(CHURN - 2, abs=0.02 * 659)
    print(f"smart_scan={smart_scan} measured {last} predicted {predicted.steady} "
          f"90%: {measured_90} vs {predicted.scans_to['90%']} one-time {once.pages_sharing}")


# (b) late duplicates ---------------------------------------------------------------------
PAIRS = 200


@pytest.mark.parametrize("smart_scan", [1, 0])
def test_late_duplicates_match_kernel(smart_scan):
    if ksm_sysfs.other_ksm_users([os.getpid()]):
        pytest.skip("other processes use KSM: the host counters are not ours alone")
    rng = np.random.default_rng(7)
    with ksm_sysfs.ksm_session(pages_to_scan=100, sleep_millisecs=5, smart_scan=smart_scan,
                               max_page_sharing=256, use_zero_pages=0):
        region_a, a = _region(PAIRS)
        a[:] = rng.integers(0, 256, a.shape, dtype=np.uint8)
        (ksm_sysfs.KSM / "run").write_text("1\n")
        # B's rmap_items are made 4 full scans after A's: their smart_scan phases differ.
        assert len(_per_scan(4, timeout=30)) == 4
        region_b, b = _region(PAIRS)
        b[:] = rng.integers(0, 256, b.shape, dtype=np.uint8)
        try:
            assert len(_per_scan(25, timeout=60)) == 25  # both aged
            b[:] = a  # page i of B now equals page i of A
            after = _per_scan(100 if smart_scan else 10, timeout=90)
            merging = ksm_sysfs.ksm_stat()["ksm_merging_pages"]
        finally:
            del a, b
            region_a.close()
            region_b.close()
    content = np.tile(np.arange(PAIRS, dtype=np.int64), 2)
    pages = Timeline(["late"], np.zeros(2 * PAIRS, np.int32), content, -1,
                     np.zeros(2 * PAIRS), np.ones(2 * PAIRS, bool))
    predicted = simulate(pages, Knobs(pages_to_scan=100, sleep_millisecs=5,
                                      smart_scan=bool(smart_scan)), RULES)
    assert predicted.steady is not None
    measured_sharing = after[-1]["pages_sharing"]
    print(f"smart_scan={smart_scan}: {len(after)} full scans after the overwrite, "
          f"pages_sharing {measured_sharing}, merging {merging}; predicted "
          f"{predicted.steady.pages_sharing}")
    if smart_scan:
        assert measured_sharing == 0 and merging == 0
        assert predicted.steady.pages_sharing == 0
        assert predicted.if_phases_met is not None
        assert predicted.if_phases_met.pages_sharing == PAIRS
    else:
        assert measured_sharing == PAIRS and merging == 2 * PAIRS
        assert predicted.steady.pages_sharing == PAIRS
