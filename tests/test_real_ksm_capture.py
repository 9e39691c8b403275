"""Snapshots of live processes against the running kernel's real KSM.

Two workload processes (``tests/workload.py``: patterns, random pages, written and read-only
zero pages, untouched pages, a THP region with zero-filled subpages, a non-mergeable and a
shared mapping) are captured, the prediction is made from the snapshot, then real ksmd
merges the same processes. Host counters and each process's ksm_stat must agree within 0.5%.
"""

from __future__ import annotations

import pytest

import ksm_sysfs
import validation_runs
import workload

pytestmark = [
    pytest.mark.ksm,
    pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable())),
]
COMPARED = ("pages_shared", "pages_sharing", "general_profit", "ksm_zero_pages")
PER_PROCESS = ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit")


@pytest.mark.parametrize("use_zero_pages", [0, 1])
def test_snapshot_prediction_matches_real_ksm(tmp_path, use_zero_pages):
    run = validation_runs.workloads(tmp_path, use_zero_pages=use_zero_pages)
    host = run.status.host
    for counter in COMPARED:
        actual, predicted = host.at[counter, "actual"], host.at[counter, "predicted"]
        assert ksm_sysfs.within(actual, predicted), (counter, actual, predicted)
    # Non-trivial: sharing across the two processes, and (use_zero_pages) zero pages.
    assert host.at["pages_sharing", "predicted"] > 1000
    if use_zero_pages:
        assert host.at["ksm_zero_pages", "predicted"] == 2 * workload.LAYOUT["zero_written"][1]
    procs = run.status.processes
    assert sorted(procs["pid"]) == sorted(p["pid"] for p in run.summary.processes)
    for _, row in procs.iterrows():
        for field in PER_PROCESS:
            actual, predicted = row[f"{field}_actual"], row[f"{field}_predicted"]
            assert ksm_sysfs.within(actual, predicted), (row["pid"], field, actual, predicted)
