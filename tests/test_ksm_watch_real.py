"""``ksm-status --watch`` against the running kernel: a churning process, a live fingerprint
series of it, then the watch while ksmd starts (run=1, pages_to_scan 100, sleep_millisecs
20). The watch's last reading: the kernel's pages_sharing and general_profit within 2% of
the prediction it prints beside them. Every knob is put back (tests/ksm_sysfs.py)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import series_target
from conftest import ROOT

import ksm_sysfs

pytestmark = [
    pytest.mark.ksm,
    pytest.mark.skipif(ksm_sysfs.usable() is not None, reason=str(ksm_sysfs.usable())),
]


@pytest.fixture
def target():
    with series_target.churning() as pid:
        yield pid


def test_the_watch_sets_the_kernels_counters_beside_the_prediction(tmp_path: Path, target):
    if ksm_sysfs.read("run") != 0 or ksm_sysfs.read("pages_shared"):
        pytest.skip("KSM is in use on this host: the host-wide counters would mix")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fp = tmp_path / "fp"
    subprocess.run([sys.executable, "-m", "ksm_analyze", "fingerprint", str(target), "-o",
                    str(fp), "--every", "0.3s", "--count", "3", "-q"], check=True, env=env)
    files = sorted(map(str, fp.iterdir()))
    out = tmp_path / "watch.csv"
    with ksm_sysfs.ksm_session(smart_scan=1, pages_to_scan=100, sleep_millisecs=20):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ksm_analyze", "ksm-status", *files, "--watch", "0.05s",
             "--for", "14s", "--csv", str(out), "--png", str(tmp_path / "watch.png")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout is not None
            note, header, first = (proc.stdout.readline() for _ in range(3))
            assert note.startswith("Each cell: actual / predicted"), note  # a fresh start
            assert header.split()[:2] == ["seconds", "full_scans"] and first.split()[1] == "0"
            ksm_sysfs._write("run", 1)  # after the watch began, as its help says
            rest, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    assert int(last["full_scans"]) >= 25, "ksmd did too few full scans to reach steady state"
    for counter in ("pages_sharing", "general_profit"):
        actual, predicted = int(last[f"{counter}_actual"]), int(last[f"{counter}_predicted"])
        assert abs(actual - predicted) <= 0.02 * abs(actual), (counter, actual, predicted)
    # Before the first full scan ends there is no prediction; after, one per reading.
    assert rows[0]["pages_sharing_predicted"] == ""
    assert all(r["pages_sharing_predicted"] for r in rows if int(r["full_scans"]) >= 1)
    assert "At the last reading" in rest.splitlines()[-1]
