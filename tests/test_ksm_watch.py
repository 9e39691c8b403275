"""``ksm-status --watch``: readings of a fake /sys/kernel/mm/ksm (a folder the tests write,
a "fake ksmd" moving its counters between readings) beside a prediction.

Predictions here are hand-written replays (alignment), or the sample dumps' replay from
``analyze()`` (the model's code path, not the watch's). The real kernel: test_ksm_watch_real.py.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, SAMPLES, runner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.live import procfs, status
from ksm_analyze.live.status import KsmWatch, read_counters, watch

KNOBS = {"run": 0, "max_page_sharing": 256, "use_zero_pages": 0, "pages_to_scan": 100,
         "sleep_millisecs": 20, "smart_scan": 1, "advisor_mode": "[none] scan-time"}
IDLE = {"full_scans": 50, "pages_shared": 0, "pages_sharing": 0, "pages_unshared": 0,
        "pages_volatile": 0, "ksm_zero_pages": 0, "general_profit": 0}


def write_sysfs(d: Path, **values: object) -> None:
    d.mkdir(exist_ok=True)
    for k, v in values.items():
        (d / k).write_text(f"{v}\n")


@pytest.fixture
def sysfs(tmp_path):
    d = tmp_path / "ksm"
    write_sysfs(d, **KNOBS, **IDLE)
    return d


class FakeKsmd:
    """Between readings (at each sleep), the next state of the counters is written."""

    def __init__(self, d: Path, states: list[dict[str, int]], interrupt_at: int | None = None,
                 on_sleep=None):
        self.d, self.states, self.interrupt_at, self.on_sleep = d, list(states), interrupt_at, on_sleep
        self.calls = 0
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.calls += 1
        if self.on_sleep:
            self.on_sleep(self.calls)
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        self.now += max(seconds, 0.0)
        if self.states:
            write_sysfs(self.d, **self.states.pop(0))

    def clock(self) -> float:
        return self.now


# A replay by hand: 3 full scans, then steady.
REPLAY = pd.DataFrame({
    "full_scans": [1, 2, 3], "time_seconds": [0.3, 0.6, 0.9], "pages_to_scan": [100, 100, 100],
    "pages_shared": [0, 40, 52], "pages_sharing": [0, 700, 920],
    "pages_unshared": [0, 60, 52], "pages_volatile": [1024, 0, 0],
    "pages_skipped": [0, 0, 0], "ksm_zero_pages": [0, 0, 0], "ksm_rmap_items": [1024] * 3,
    "general_profit": [-65536, 2800000, 3702784], "ksmd_cpu_percent": [1.5] * 3,
})


def test_a_fresh_start_aligns_on_full_scans_since_the_watch_began(sysfs):
    # The kernel's full_scans counts since boot (50 when the watch begins).
    fake = FakeKsmd(sysfs, [{"full_scans": 50}, {"full_scans": 51, "pages_sharing": 650},
                            {"full_scans": 52, "pages_sharing": 910},
                            {"full_scans": 53, "pages_sharing": 919},
                            {"full_scans": 57, "pages_sharing": 920}])
    w = KsmWatch(REPLAY, directory=sysfs)
    rows = list(w.readings(0.5, count=6, sleep=fake.sleep, clock=fake.clock))
    assert w.alignment == "from_start"
    assert [r["full_scans"] for r in rows] == [0, 0, 1, 2, 3, 7]
    assert [r["time_seconds"] for r in rows] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [r["pages_sharing_actual"] for r in rows] == [0, 0, 650, 910, 919, 920]
    # None before the first full scan ends; the replay's row k after k; its last row past it.
    assert [r["pages_sharing_predicted"] for r in rows] == [None, None, 0, 700, 920, 920]
    assert [r["general_profit_predicted"] for r in rows] == [
        None, None, -65536, 2800000, 3702784, 3702784]
    frame = w.frame
    assert str(frame["pages_sharing_predicted"].dtype) == "Int64"
    assert str(frame["pages_sharing_actual"].dtype) == "int64"
    assert frame["pages_sharing_predicted"].isna().tolist() == [True, True] + [False] * 4
    assert list(frame.columns[:4]) == ["time_seconds", "full_scans", "pages_to_scan_actual",
                                       "pages_to_scan_predicted"]


@pytest.mark.parametrize("merged", [{"pages_shared": 10, "pages_sharing": 30},
                                    {"ksm_zero_pages": 7}])
def test_ksm_already_merging_aligns_on_the_steady_state(sysfs, merged):
    write_sysfs(sysfs, run=1, **merged)
    fake = FakeKsmd(sysfs, [{"full_scans": 51}])
    w = KsmWatch(REPLAY, directory=sysfs)
    rows = list(w.readings(1.0, count=2, sleep=fake.sleep, clock=fake.clock))
    assert w.alignment == "steady_state"
    assert [r["pages_sharing_predicted"] for r in rows] == [920, 920]  # the last row, at once
    assert [r["pages_shared_predicted"] for r in rows] == [52, 52]


def test_a_kernel_without_a_counter_goes_without_its_column(sysfs):
    (sysfs / "ksm_zero_pages").unlink()  # before 6.10
    (sysfs / "general_profit").unlink()  # before 6.7
    w = KsmWatch(directory=sysfs)
    w.read()
    assert "ksm_zero_pages_actual" not in w.frame.columns
    assert "general_profit_actual" not in w.frame.columns
    assert "pages_sharing_predicted" not in w.frame.columns  # no prediction, no column


def test_no_ksm_is_one_clear_error(tmp_path):
    with pytest.raises(status.KsmAnalyzeError, match="kernel built without KSM"):
        read_counters(tmp_path / "none")


def test_the_library_generator_reads_the_given_folder(sysfs):
    write_sysfs(sysfs, pages_sharing=5, pages_shared=1)
    df = pd.DataFrame(watch(interval=0.01, count=2, directory=sysfs))
    assert df["pages_sharing_actual"].tolist() == [5, 5]
    assert df["full_scans"].tolist() == [0, 0]


@pytest.fixture
def fake_kernel(sysfs, monkeypatch):
    """The command line's /sys/kernel/mm/ksm is the fake folder."""
    monkeypatch.setattr(procfs, "KSM_SYSFS", sysfs)
    return sysfs


def _steps(*pairs):
    return [{"full_scans": 50 + k, "pages_sharing": s} for k, s in pairs]


def test_cli_writes_the_csv_after_each_reading(fake_kernel, tmp_path, monkeypatch):
    out = tmp_path / "watch.csv"
    seen = []

    def look(calls):  # before reading `calls`, the CSV holds the `calls` readings before it
        with open(out, newline="") as f:
            seen.append(len(list(csv.DictReader(f))))

    fake = FakeKsmd(fake_kernel, _steps((0, 0), (1, 400), (2, 900)), on_sleep=look)
    monkeypatch.setattr(status.time, "sleep", fake.sleep)
    r = runner.invoke(app, ["ksm-status", *SAMPLES, "--watch", "10ms", "--count", "4",
                            "--csv", str(out)])
    assert r.exit_code == 0, r.output
    assert seen == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ksm", "watch.csv"]  # no temp file
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    # The prediction is the sample dumps' replay with the kernel's knobs (the defaults here).
    timeline = analyze(SAMPLES, smart_scan=True, advisor_mode="none").timeline
    by_scans = timeline.set_index("full_scans")
    assert [row["full_scans"] for row in rows] == ["0", "0", "1", "2"]
    assert [row["pages_sharing_actual"] for row in rows] == ["0", "0", "400", "900"]
    assert [row["pages_sharing_predicted"] for row in rows] == [
        "", "", str(by_scans.at[1, "pages_sharing"]), str(by_scans.at[2, "pages_sharing"])]
    assert rows[3]["general_profit_predicted"] == str(by_scans.at[2, "general_profit"])
    assert list(rows[0]) == [
        "time_seconds", "full_scans",
        *(f"{c}_{k}" for c in status.WATCHED_COUNTERS for k in ("actual", "predicted"))]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Each cell: actual / predicted after as many full scans")
    assert lines[1].split() == ["seconds", "full_scans", *status.WATCHED_COUNTERS]
    assert lines[2].split()[:4] == ["0.00", "0", "100", "/"]
    assert f"Wrote {out}" in lines
    assert lines[-1].startswith("At the last reading (2 full scans): pages_sharing 900 actual, "
                                f"{by_scans.at[2, 'pages_sharing']:,} predicted")


def test_cli_predicts_with_the_kernels_knobs(fake_kernel, tmp_path, monkeypatch):
    write_sysfs(fake_kernel, pages_to_scan=10, sleep_millisecs=5)
    fake = FakeKsmd(fake_kernel, _steps((1, 0)))
    monkeypatch.setattr(status.time, "sleep", fake.sleep)
    r = runner.invoke(app, ["ksm-status", *SAMPLES, "--watch", "10ms", "--count", "2",
                            "--csv", str(tmp_path / "w.csv")])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "w.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert last["pages_to_scan_predicted"] == "10"
    expected = analyze(SAMPLES, pages_to_scan=10, sleep_millisecs=5, smart_scan=True,
                       advisor_mode="none").timeline
    assert int(last["pages_sharing_predicted"]) == expected.iloc[0]["pages_sharing"]


def test_cli_ctrl_c_ends_the_watch_with_the_files_written(fake_kernel, tmp_path, monkeypatch):
    fake = FakeKsmd(fake_kernel, _steps((1, 300), (2, 900)), interrupt_at=3)
    monkeypatch.setattr(status.time, "sleep", fake.sleep)
    png, out = tmp_path / "w.png", tmp_path / "w.csv"
    r = runner.invoke(app, ["ksm-status", *SAMPLES, "--watch", "1s", "--csv", str(out),
                            "--png", str(png)])  # no --count: until Ctrl-C
    assert r.exit_code == 0, r.output
    assert "Watch ended by SIGINT after 3 readings." in r.stdout
    with open(out, newline="") as f:
        assert [row["pages_sharing_actual"] for row in csv.DictReader(f)] == ["0", "300", "900"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # two panels drawn, not an empty canvas


def test_cli_png_without_prediction(fake_kernel, tmp_path, monkeypatch):
    fake = FakeKsmd(fake_kernel, _steps((1, 0)))
    monkeypatch.setattr(status.time, "sleep", fake.sleep)
    png = tmp_path / "w.png"
    r = runner.invoke(app, ["ksm-status", "--watch", "10ms", "--for", "20ms", "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == "No inputs: the kernel's counters alone."
    assert len(r.stdout.splitlines()) == 2 + 2 + 1  # note, header, 2 readings (--for), Wrote
    assert png.read_bytes()[:4] == b"\x89PNG"


FORMS = "(a number and ms, s, m or h: 500ms, 2s, 1m, 1h)"


@pytest.mark.parametrize(("args", "message"), [
    (["--count", "3"], "Error: --count goes with --watch INTERVAL"),
    (["--csv", "x.csv"], "Error: --csv goes with --watch INTERVAL"),
    (["--watch", "0s"], "Error: --watch '0s': give an interval above 0 (e.g. 500ms)"),
    (["--watch", "fast"], "Error: --watch 'fast' is not a duration " + FORMS),
    (["--watch", "1s", "--count", "0"], "Error: --count 0: at least 1"),
    (["--watch", "1s", "--count", "2", "--for", "5s"],
     "Error: --watch takes --count N or --for DURATION, not both"),
    (["--watch", "1s", "--for", "soon"], "Error: --for 'soon' is not a duration " + FORMS),
    (["--watch", "1s", "--json"],
     "Error: --json does not go with --watch: write the readings with --csv FILE"),
])
def test_bad_watch_options_are_one_line_and_exit_2(fake_kernel, args, message):
    r = runner.invoke(app, ["ksm-status", *args])
    assert r.exit_code == 2
    assert r.stderr == message + "\n"


def test_an_output_in_a_missing_folder_fails_before_the_watch(fake_kernel, tmp_path):
    out = tmp_path / "no" / "w.csv"
    r = runner.invoke(app, ["ksm-status", "--watch", "1s", "--csv", str(out)])
    assert r.exit_code == 1
    assert r.stderr == f"Error: {out}: cannot write the file: No such file or directory\n"
    assert r.stdout == ""  # no reading taken


def test_an_output_over_an_input_is_refused(fake_kernel):
    r = runner.invoke(app, ["ksm-status", SAMPLES[0], "--watch", "1s", "--png", SAMPLES[0]])
    assert r.exit_code == 2
    assert "would be overwritten" in r.stderr


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/ksm"), reason="kernel without KSM")
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 0), (signal.SIGTERM, 143)])
def test_a_signal_ends_a_real_watch_with_the_files_written(tmp_path, signum, code):
    """The console command (its signal handling) on the real /sys/kernel/mm/ksm, read only."""
    out, png = tmp_path / "w.csv", tmp_path / "w.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ksm_analyze", "ksm-status", "--watch", "20ms", "--csv", str(out),
         "--png", str(png)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(5)]  # note, header, 3 readings
    assert lines[1].split()[:2] == ["seconds", "full_scans"], lines
    time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"Watch ended by {signal.Signals(signum).name} after" in stdout
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) >= 3
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.csv", "w.png"]
    if signum == signal.SIGTERM:
        assert stderr == "Error: interrupted by SIGTERM\n"
