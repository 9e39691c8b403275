"""Snapshots of live processes against the running kernel's real KSM.

Two workload processes (``tests/workload.py``: patterns, random pages, written and read-only
zero pages, untouched pages, a THP region, a non-mergeable and a shared mapping) are
captured, the prediction is made from the snapshot, then real ksmd merges the same
processes. Host counters and each process's ksm_stat must agree within 0.5%.
"""

from __future__ import annotations

import contextlib

import pytest

import ksm_sysfs
import workload
from ksm_analyze.capture import capture
from ksm_analyze.status import ksm_status

pytestmark = [
    pytest.mark.ksm,
    pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable())),
]
COMPARED = ("pages_shared", "pages_sharing", "general_profit", "ksm_zero_pages")


@pytest.mark.parametrize("use_zero_pages", [0, 1])
def test_snapshot_prediction_matches_real_ksm(tmp_path, use_zero_pages):
    snap = tmp_path / "workloads.snap"
    with contextlib.ExitStack() as stack:
        pids = [stack.enter_context(workload.running(11, thp=True)),
                stack.enter_context(workload.running(12))]
        capture(pids, snap)
        assert not ksm_sysfs.other_ksm_users(pids), "other processes use KSM: host counters not ours"
        with ksm_sysfs.ksm_session(use_zero_pages=use_zero_pages, max_page_sharing=256,
                                   pages_to_scan=10000, sleep_millisecs=10):
            ksm_sysfs.converge()
            status = ksm_status([snap])

    host = status.host
    for counter in COMPARED:
        actual, predicted = host.at[counter, "actual"], host.at[counter, "predicted"]
        assert ksm_sysfs.within(actual, predicted), (counter, actual, predicted)
    # The prediction must be non-trivial: across-process sharing and (with use_zero_pages)
    # zero pages both occur in these workloads.
    assert host.at["pages_sharing", "predicted"] > 1000
    if use_zero_pages:
        assert host.at["ksm_zero_pages", "predicted"] == 2 * workload.LAYOUT["zero_written"][1]
    procs = status.processes
    assert sorted(procs["pid"]) == sorted(pids)
    for _, row in procs.iterrows():
        for field in ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages",
                      "ksm_process_profit"):
            actual, predicted = row[f"{field}_actual"], row[f"{field}_predicted"]
            assert ksm_sysfs.within(actual, predicted), (row["pid"], field, actual, predicted)
