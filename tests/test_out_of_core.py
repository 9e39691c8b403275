"""``--memory-limit``: fingerprint files that would not fit are aggregated out of core
(ksm_analyze/fleet/aggregate.py), with the counters and tables of the in-memory path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import PS, ROOT, runner
from test_fleet import _fingerprint, _many_inputs

from ksm_analyze import analyze, pipeline
from ksm_analyze.cli import app
from ksm_analyze.fleet import fingerprint_files as fpfile
from ksm_analyze.formats import DumpFormat
from ksm_analyze.hashing.stage1 import Fingerprints
from ksm_analyze.ksm import KsmSettings
from ksm_analyze.pages import Extent, PageState

COMPUTED = ("per_input", "savings", "histogram", "exclusions", "pairwise")
"""Tables computed out of core exactly as in memory (``host``, ``stages`` and
``top_contents`` are compared apart: see the tests)."""
NOT_COMPUTED = ("convergence", "timeline", "ksmd_settings", "address_map", "huge_pages")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 (as benchmarks/bench_fleet.py): a content's hash from its number."""
    z = x * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) | np.uint64(1)


def _synthetic(folder: Path, guests: int, rows: int, families: int,
               identity: str | None = None, image: float = 0.5) -> list[Path]:
    """Fingerprint files of ``guests`` guests of ``rows`` pages: the first half (``image``)
    of each guest's pages is its family's image (``guests // families`` guests share it),
    the rest its own, and every 8th page zero."""
    folder.mkdir(exist_ok=True)
    out = []
    for g in range(guests):
        number = np.empty(rows, np.uint64)
        half = int(rows * image)
        number[:half] = np.uint64((g % families) * rows + 1) + np.arange(half, dtype=np.uint64)
        number[half:] = np.uint64((1 << 40) + g * rows) + np.arange(rows - half,
                                                                      dtype=np.uint64)
        number[::8] = 0
        nz = number != 0
        content = np.zeros((rows, 2), np.uint64)
        content[nz, 0] = _mix(number[nz])
        content[nz, 1] = _mix(number[nz] ^ np.uint64(0x5555555555555555))
        prefix = np.where(nz, content[:, 0] >> np.uint64(1) | np.uint64(1), np.uint64(0))
        info = {"identity": identity, "sampled_at": float(g)} if identity else {}
        fp = Fingerprints(
            path=f"guest-{g:04d}", format=DumpFormat.RAW, address_space="physical",
            page_size=PS, prefix_bytes=128, extents=[Extent(0, rows, PageState.DATA, 0)],
            info=info, warnings=[], addrs=np.arange(rows, dtype=np.uint64) * np.uint64(PS),
            prefix=prefix, state_pages={**dict.fromkeys(PageState, 0), PageState.DATA: rows})
        path = folder / f"guest-{g:04d}{fpfile.SUFFIX}"
        fpfile.save(path, [fp], source={"path": f"/nowhere/guest-{g}", "size": rows * PS,
                                        "mtime_ns": 0},
                    options={"prefix_bytes": 128}, contents=[content])
        out.append(path)
    return out


@pytest.fixture(scope="module")
def fleet_files(tmp_path_factory) -> list[Path]:
    """The test inputs as fingerprint files whose dumps are gone (as on a fleet's
    aggregating machine: pages are told apart by content hash in both paths)."""
    tmp = tmp_path_factory.mktemp("ooc")
    inputs = _many_inputs(tmp)
    files = _fingerprint(inputs, tmp / "fp")
    for dump in inputs:
        dump.unlink()
    return files


@pytest.fixture(scope="module")
def in_memory(fleet_files):
    return analyze(fleet_files, jobs=1, top=10_000)


def _spied(monkeypatch, tmp_path: Path, partitions: int) -> dict[str, int]:
    """Force ``partitions``, spill under ``tmp_path``, and record the size of each
    partition file as it is removed."""
    monkeypatch.setattr(pipeline, "out_of_core_partitions",
                        lambda paths, limit, jobs: (partitions, 3072, 1 << 30, jobs))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    removed: dict[str, int] = {}
    unlink = os.unlink

    def spy(path, *args, **kwargs):
        if "ksm-aggregate-" in str(path):
            removed[os.path.basename(path)] = os.path.getsize(path)
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", spy)
    return removed


def _rows(columns) -> list[dict]:
    return [dict(zip(columns.data, r, strict=True)) for r in zip(*columns.data.values(),
                                                                  strict=True)]


@pytest.mark.parametrize(("partitions", "jobs"), [(1, 1), (4, 1), (64, 1), (4, 2)])
def test_out_of_core_gives_the_counters_and_tables_of_the_in_memory_path(
        fleet_files, in_memory, monkeypatch, tmp_path, partitions, jobs):
    removed = _spied(monkeypatch, tmp_path, partitions)
    got = analyze(fleet_files, jobs=jobs, top=10_000, memory_limit=1 << 20)
    want = in_memory
    for ksm in (KsmSettings(), KsmSettings(max_page_sharing=2, use_zero_pages=True)):
        assert got.contents.counters(ksm) == want.contents.counters(ksm)
    assert got.counters == want.counters
    for name in COMPUTED:
        assert got.columns[name].data.keys() == want.columns[name].data.keys(), name
        assert json.dumps(_rows(got.columns[name]), default=str) == \
            json.dumps(_rows(want.columns[name]), default=str), name
    # host: every counter but the ksmd model's steady state.
    host, want_host = got.columns["host"].data, want.columns["host"].data
    assert "steady_state" in want_host and "steady_state" not in host
    assert {k: list(v) for k, v in host.items()} == \
        {k: list(v) for k, v in want_host.items() if k != "steady_state"}
    # stages: the same counts; the timings differ.
    stages = [dict(zip(t.data["statistic"], t.data["value"], strict=True))
              for t in (got.columns["stages"], want.columns["stages"])]
    for s in stages:
        assert s.pop("stage1_seconds") >= 0 and s.pop("stage2_seconds") >= 0
    assert stages[0] == stages[1]
    assert stages[0]["hash_bits"] == 128 and stages[0]["prefix_candidates"] > 0
    # top contents: the same rows (ties in copies may come in another order).
    key = json.dumps
    assert sorted(map(key, _rows(got.columns["top_contents"]))) == \
        sorted(map(key, _rows(want.columns["top_contents"])))
    # The ksmd time model and the address map: empty, and a warning says so.
    for name in NOT_COMPUTED:
        assert len(got.columns[name]) == 0 and len(want.columns[name]) > 0, name
    (note,) = [w for w in got.warnings if w.startswith("out of core")]
    assert all(name in note for name in NOT_COMPUTED) and "steady_state" in note
    # Partition files were written (20 bytes a scanned non-zero page in all) and removed.
    rows = {k: v for k, v in removed.items() if k.startswith("rows-")}
    assert len(rows) == partitions and len(removed) == 2 * partitions
    assert sum(rows.values()) == 20 * int(want.contents.nonzero_pages().sum())
    assert list(tmp_path.iterdir()) == []


def test_a_small_memory_limit_aggregates_out_of_core(tmp_path, monkeypatch):
    """The limit itself chooses: 16 files of 2,048 pages (in memory: about 3.2 MiB) under
    --memory-limit 3MiB are cut into several partitions; scan --json equals the in-memory
    scan but for the tables of the time model."""
    files = list(map(str, _synthetic(tmp_path / "fp", 16, 2048, 4)))
    cuts = []
    choose = pipeline.out_of_core_partitions
    monkeypatch.setattr(pipeline, "out_of_core_partitions",
                        lambda *a: cuts.append(choose(*a)) or cuts[-1])

    def scan(*extra: str) -> dict:
        out = runner.invoke(app, ["scan", *files, "--json", "-q", "-j", "1", *extra])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)

    got, want = scan("--memory-limit", "3MiB"), scan()
    assert cuts[0] is not None and cuts[0][0] > 1 and cuts[1] is None
    for name in (*COMPUTED, "top_contents"):
        assert got[name] == want[name], name
    assert got["host"] == {k: {s: v for s, v in by.items() if s != "steady_state"}
                           for k, by in want["host"].items()}
    # By hand: 4 families of 4 guests share 1,024 pages (every 8th zero: 896 non-zero).
    assert got["host"]["pages_shared"]["without_zero_pages"] == 4 * 896
    assert got["host"]["pages_sharing"]["without_zero_pages"] == 4 * 3 * 896
    # 32,768 pages x 100 bytes + 16 inputs x 6 KiB: 3,375,104 bytes.
    assert ("out of core: these 32,768 pages of fingerprint files need about 3.22 MiB "
            "(3,375,104 bytes) in memory, more than --memory-limit 3 MiB, so they were "
            "aggregated in 4 parts") in got["warnings"][0]
    # report: the charts of the tables not computed are left out, the others drawn.
    out = runner.invoke(app, ["report", *files, "-o", str(tmp_path / "r"), "-q",
                              "--memory-limit", "3MiB"])
    assert out.exit_code == 0, out.output
    charts = {p.stem for p in (tmp_path / "r").glob("*.png")}
    assert {"histogram", "pairwise", "savings"} <= charts
    assert not charts & {"timeline", "ksmd_settings", "address_map"}


@pytest.mark.parametrize(("given", "says"), [
    ("lots", "--memory-limit 'lots' is not a size"),
    ("-1GiB", "--memory-limit '-1GiB' is not a size"),
    ("0", "--memory-limit must be at least 1 MiB, not 0 bytes"),
    ("512KiB", "--memory-limit must be at least 1 MiB, not 524,288 bytes"),
])
def test_a_bad_memory_limit_is_one_line(given, says):
    out = runner.invoke(app, ["scan", str(ROOT / "sample_dumps" / "vm-a.elf"),
                              "--memory-limit", given, "-q"])
    assert out.exit_code == 2  # a bad option value, as --top -1 or --host-memory lots
    assert out.output.strip().splitlines() == [f"Error: {says} (use e.g. 256GiB, 512M or "
                                               "bytes)" if "not a size" in says
                                               else f"Error: {says}"]


def test_a_limit_too_small_for_one_file_is_one_line(tmp_path):
    files = _synthetic(tmp_path / "fp", 2, 16384, 1)
    out = runner.invoke(app, ["plan", *map(str, files), "--memory-limit", "2MiB",
                              "--host-memory", "1GiB", "-q"])
    assert out.exit_code == 2  # a bad option value, as --top -1 or --host-memory lots
    (line,) = out.output.strip().splitlines()
    # At least: 1 MiB + 2 inputs x 6 KiB + 16,384 pages x 160 (the largest file) + 32,768
    # pages x 20 (the result) + 32,768 x 96 / 4,096 (a partition at the most partitions).
    least = (1 << 20) + 2 * 6144 + 16384 * 160 + 32768 * 20 + 32768 * 96 // 4096
    assert least == 4_338_432
    assert line == ("Error: --memory-limit 2 MiB is too small for these 2 fingerprint files "
                    "(32,768 pages, the largest 16,384): give at least 4.14 MiB (4,338,432 "
                    "bytes)")


def test_given_samples_are_refused_out_of_core(tmp_path):
    """Inputs --samples makes samples of one input (recorded samples aggregate:
    tests/test_series_out_of_core.py)."""
    plain = list(map(str, _synthetic(tmp_path / "plain", 32, 2048, 1)))
    out = runner.invoke(app, ["scan", *plain, "--memory-limit", "4MiB", "-q", "--samples",
                              "vm=guest-*"])
    assert out.exit_code == 2
    (line,) = out.output.strip().splitlines()
    assert line == ("Error: --samples: samples of one input over time are not aggregated "
                    "out of core yet; give a --memory-limit large enough to analyse them "
                    "in memory, or analyse each series on its own")


def test_a_series_larger_than_the_limit_is_one_line(tmp_path):
    """A series' samples are read together: the limit must hold the largest series."""
    files = list(map(str, _synthetic(tmp_path / "fp", 32, 2048, 1, identity="vm-1")))
    out = runner.invoke(app, ["scan", *files, "--memory-limit", "4MiB", "-q"])
    assert out.exit_code == 2
    (line,) = out.output.strip().splitlines()
    # 1 MiB + 32 inputs x 6 KiB + 65,536 pages x 160 (the series, read together) + 65,536
    # x 20 (the result) + 65,536 x 140 / 4,096 (a partition at the most partitions).
    least = (1 << 20) + 32 * 6144 + 65536 * 160 + 65536 * 20 + 65536 * 140 // 4096
    assert least == 13_043_904
    assert line == ("Error: --memory-limit 4 MiB is too small for these 32 fingerprint files "
                    "(65,536 pages, the largest series (its samples are read together) "
                    "65,536): give at least 12.4 MiB (13,043,904 bytes)")


AGGREGATE_1000 = """
import glob, json, sys, threading, time
import pandas, pyarrow.parquet  # imported before the baseline: not the aggregation's
from ksm_analyze.eligibility import Scope
from ksm_analyze.fleet.aggregate import aggregate, out_of_core_partitions

def pss():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(l.split()[1]) << 10 for l in f if l.startswith("Pss_Anon:"))

files = sorted(glob.glob(sys.argv[1] + "/*.parquet"))
limit = int(sys.argv[2])
partitions, _, _, _ = out_of_core_partitions(files, limit)
aggregate(files[:2], scope=Scope.MERGEABLE, page_size=4096, prefix_bytes=128, partitions=2)
base, peak = pss(), [0]
def sample():
    while True:
        peak[0] = max(peak[0], pss()); time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
a = aggregate(files, scope=Scope.MERGEABLE, page_size=4096, prefix_bytes=128,
              partitions=partitions)
time.sleep(0.01)
print(json.dumps({"partitions": partitions, "peak": max(peak[0], pss()) - base,
                  "sharing": a.table.counters(__import__("ksm_analyze").KsmSettings(),
                                              zero_pages=False).pages_sharing}))
"""


def test_a_thousand_files_aggregate_within_the_limit(tmp_path):
    """1,000 guests of 256 pages (in memory: about 31 MiB) under a limit of 16 MiB: the
    aggregation's peak private memory (Pss_Anon, above the interpreter's) stays under it."""
    # 100 guests written, each copied 9 times (a copy is cheap; writing a file syncs it).
    for path in _synthetic(tmp_path, 100, 256, 100):
        for k in range(1, 10):
            shutil.copyfile(path, path.with_name(f"copy{k}-{path.name}"))
    limit = 16 << 20
    out = subprocess.run([sys.executable, "-c", AGGREGATE_1000, str(tmp_path), str(limit)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    got = json.loads(out.stdout)
    assert got["partitions"] > 1
    assert 0 < got["peak"] < limit
    # By hand: each guest's 224 non-zero pages (every 8th of 256 is zero) are held 10
    # times: 9 merge into the first.
    assert got["sharing"] == 100 * 9 * 224


SCAN_WHOLE = """
import contextlib, glob, io, json, sys, threading, time, tracemalloc
import pandas, pyarrow.parquet  # imported before the baseline: not the run's
import ksm_analyze.ksm, ksm_analyze.sharing
from ksm_analyze.cli import app
from ksm_analyze.planning import placement

def pss():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(l.split()[1]) << 10 for l in f if l.startswith("Pss_Anon:"))

def scan(files, limit):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        app(["scan", *files, "--json", "-q", "-j", "1", "--memory-limit", str(limit)],
            standalone_mode=False)
    return json.loads(out.getvalue())

# The chunk of sparse rows the passes after the aggregation take at a time, scaled down
# with this fleet (ROWS_AT_ONCE rows of a fleet's millions).
for module in (ksm_analyze.ksm, ksm_analyze.sharing, placement):
    module.ROWS_AT_ONCE = 4096
files, limit = sorted(glob.glob(sys.argv[2] + "/*.parquet")), int(sys.argv[1])
scan(files[:8], 5 << 20)  # out of core: the modules a run imports, and their caches
base, peak = pss(), [0]
def sample():
    while True:
        peak[0] = max(peak[0], pss()); time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
tracemalloc.start()  # numpy's arrays too, however briefly held (sampling may miss them)
got = scan(files, limit)
time.sleep(0.01)
print(json.dumps({"peak": max(peak[0], pss()) - base, "warnings": got["warnings"],
                  "traced": tracemalloc.get_traced_memory()[1],
                  "sharing": got["host"]["pages_sharing"]["without_zero_pages"]}))
"""


def test_the_whole_scan_out_of_core_stays_within_the_limit(tmp_path):
    """Issue 21: not only the aggregation, the whole ``scan`` (pairwise, the summary
    tables, the JSON) of fingerprint files out of core stays under ``--memory-limit`` (the
    tables after the aggregation held 100 bytes a sparse row at once: 5 times the result)."""
    # 48 guests of 8,192 pages, every 8th zero: 12 families of 4 guests holding one image
    # (so a sparse row for nearly every page).
    _synthetic(tmp_path, 48, 8192, 12, image=1.0)
    limit = 20 << 20
    out = subprocess.run([sys.executable, "-c", SCAN_WHOLE, str(limit), str(tmp_path)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    got = json.loads(out.stdout)
    assert got["warnings"][0].startswith("out of core: ")
    # By hand: of the 8,192 pages of a family's image, 1,024 are zero; its 7,168 non-zero
    # pages are held by 4 guests (3 merge into the first).
    assert got["sharing"] == 12 * 7168 * 3
    assert 0 < got["peak"] < limit and 0 < got["traced"] < limit, got


def test_one_guest_given_twice_is_refused_out_of_core_too(tmp_path):
    files = list(map(str, _synthetic(tmp_path / "fp", 16, 2048, 4)))
    lines = []
    for limit in ("3MiB", "1GiB"):  # out of core, in memory
        out = runner.invoke(app, ["scan", *files, files[0], "--memory-limit", limit, "-q"])
        assert out.exit_code == 2
        lines.append(out.output.strip())
    assert lines[0] == lines[1] == (f"Error: {files[0]} is given twice (inputs 1 and 17): each "
                                    "input is one guest or process; to model two identical "
                                    "guests, give a copy")


def test_the_default_limit_is_half_the_memory_or_half_the_cgroup_limit(tmp_path):
    from ksm_analyze.fleet.aggregate import default_memory_limit

    meminfo, cgroup = tmp_path / "meminfo", tmp_path / "memory.max"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:        1000 kB\n")
    assert default_memory_limit(str(meminfo), str(tmp_path / "none")) == 24576000 * 1024 // 2
    cgroup.write_text("max\n")  # no limit
    assert default_memory_limit(str(meminfo), str(cgroup)) == 24576000 * 1024 // 2
    cgroup.write_text("4294967296\n")  # a container of 4 GiB
    assert default_memory_limit(str(meminfo), str(cgroup)) == 2 << 30
