"""Samples over time through `scan`: fingerprint files of one process at three moments.

The files are written here with fingerprint_files.save from pages given as letters (as in
test_series.py), so the machine facts they record can be set: the kernel, the KSM knobs,
sizeof(struct ksm_rmap_item), the tuners running. Real live series are in
test_live_fingerprint.py and test_over_time_real.py.
"""

from __future__ import annotations

import json

import pytest
from test_series import _sample
from typer.testing import CliRunner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.fleet import fingerprint_files

runner = CliRunner()
IDENT = "boot:42:1000"
#        page:   0123456789
SERIES = ("aaaabbcxyz", "aaaabbcpqr", "aaaabbcstu")
"""Pages 0-3 hold "a", 4-5 "b" (stable duplicates), 6 "c" (stable unique), 7-9 change
between every two samples (faster than the samples tell)."""


def _write(folder, samples=SERIES, *, machine=None, gap=1.0):
    folder.mkdir(exist_ok=True)
    paths = []
    for k, pages in enumerate(samples):
        fp = _sample(pages, identity=IDENT, at=1000.0 + k * gap, name=f"proc.s{k:03d}")
        fp.info["machine"] = {"kernel": "6.18.1", "ksm": {"run": 0, "smart_scan": 1},
                              **(machine or {})}
        path = folder / f"proc.s{k:03d}.ksmfp.parquet"
        fingerprint_files.save(
            path, [fp], source={"path": f"live:{IDENT}", "size": 0,
                                "mtime_ns": int((1000.0 + k * gap) * 1e9)},
            options={"format": "snapshot", "page_size": 4096, "base_address": 0,
                     "prefix_bytes": 128},
            contents=[fp.content])
        paths.append(path)
    return paths


def test_three_samples_are_one_input_and_count_what_ksm_keeps(tmp_path):
    result = analyze(_write(tmp_path / "fp"), jobs=1)
    assert result.per_input["input"].tolist() == ["proc"]  # its samples, named as one input
    host = result.host
    # KSM keeps: "a" x4 -> 1 KSM page + 3 sharing; "b" x2 -> 1 + 1; c, s, t, u unshared.
    assert (host.at["pages_shared", "with_zero_pages"],
            host.at["pages_sharing", "with_zero_pages"]) == (2, 4)
    assert host.at["general_profit", "with_zero_pages"] == 4 * 4096 - 10 * 64
    # The replay settles at the same figures.
    assert host.at["pages_sharing", "steady_state"] == 4
    assert host.at["general_profit", "steady_state"] == 4 * 4096 - 10 * 64
    # Frozen at the last sample the same: s, t, u are unique there too.
    assert host.at["pages_sharing", "if_memory_stood_still"] == 4
    row = result.stability.iloc[0]
    assert (row["samples"], row["pages_unchanged"], row["pages_changed"]) == (3, 7, 3)
    assert (row["stable_duplicate_pages"], row["coinciding_duplicate_pages"]) == (6, 0)
    assert result.convergence.at["kernel_rules", "value"] == "kernel 6.18.1 (recorded)"


def test_pages_identical_only_at_the_last_sample_are_not_kept(tmp_path):
    # Pages 7-9 change every interval but happen to be equal at the last sample.
    paths = _write(tmp_path / "fp", ("aaaabbcxyz", "aaaabbcpqr", "aaaabbcsss"))
    host = analyze(paths, jobs=1).host
    assert host.at["pages_sharing", "if_memory_stood_still"] == 4 + 2
    assert host.at["pages_sharing", "with_zero_pages"] == 4


def test_recorded_rmap_item_size_sets_the_overhead(tmp_path):
    paths = _write(tmp_path / "fp", machine={"rmap_item_bytes": 80})
    result = analyze(paths, jobs=1)
    assert result.ksm.rmap_item_bytes == 80
    assert result.host.at["general_profit", "with_zero_pages"] == 4 * 4096 - 10 * 80
    # Given, it wins over what was recorded.
    given = analyze(paths, jobs=1, rmap_item_bytes=96)
    assert given.host.at["general_profit", "with_zero_pages"] == 4 * 4096 - 10 * 96


def test_recorded_kernel_and_smart_scan_choose_the_rules(tmp_path):
    paths = _write(tmp_path / "fp", machine={"kernel": "6.1.0-28-amd64"})
    conv = analyze(paths, jobs=1).convergence["value"]
    assert conv["kernel_rules"] == "kernel 6.1.0-28-amd64 (recorded)"
    assert conv["smart_scan"] is False  # 6.1 has no smart_scan
    off = analyze(_write(tmp_path / "b", machine={"ksm": {"run": 0, "smart_scan": 0}}),
                  jobs=1).convergence["value"]
    assert off["smart_scan"] is False


def test_a_tuner_beside_the_advisor_is_a_warning(tmp_path):
    paths = _write(tmp_path / "fp", machine={"tuners": ["ksmtuned"]})
    assert not any("ksmtuned" in w for w in analyze(paths, jobs=1).warnings)
    advised = analyze(paths, jobs=1, advisor_mode="scan-time")
    assert any("ksmtuned" in w and "EINVAL" in w for w in advised.warnings)


def test_scan_json_of_a_series_is_strict_and_has_the_time_tables(tmp_path):
    paths = _write(tmp_path / "fp")
    r = runner.invoke(app, ["scan", *map(str, paths), "--json", "--converge-within", "1h"])
    assert r.exit_code == 0, r.output

    def refuse(constant):
        raise ValueError(constant)

    data = json.loads(r.stdout, parse_constant=refuse)
    assert data["stability"][0]["pages_changed"] == 3
    assert data["timeline"][-1]["pages_sharing"] == 4
    assert data["convergence"]["cheapest_setting"].startswith("within 3600 s, the cheapest")
    # The setting named is the one of least CPU among those within the hour.
    fits = [s for s in data["ksmd_settings"] if s["steady_state_seconds"] <= 3600]
    least = min(s["ksmd_cpu_percent"] for s in fits)
    assert f"{least:.3g}% of a CPU" in data["convergence"]["cheapest_setting"]


@pytest.mark.parametrize(("args", "message"), [
    (["--converge-within", "soon"], "--converge-within 'soon' is not a duration"),
    (["--advisor", "sometimes"], "advisor_mode must be none or scan-time"),
])
def test_bad_time_options_are_one_line(tmp_path, args, message):
    paths = _write(tmp_path / "fp")
    r = runner.invoke(app, ["scan", *map(str, paths), *args])
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_two_samples_at_the_same_moment_are_refused(tmp_path):
    paths = _write(tmp_path / "fp", ("aaaabbcxyz", "aaaabbcpqr"), gap=0.0)
    r = runner.invoke(app, ["scan", *map(str, paths)])
    # Taken at the same moment, they are the same sample given twice.
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "are one guest" in r.stderr


def test_two_captures_of_one_process_are_one_input_over_time(tmp_path):
    import subprocess
    import sys

    code = ("import mmap, sys, time\n"
            "m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
            "m.madvise(mmap.MADV_MERGEABLE)\n"
            "for i in range(64): m[i * 4096:(i + 1) * 4096] = bytes([i % 8 + 1]) * 4096\n"
            "print('ready', flush=True)\nsys.stdin.readline()\n"
            "for i in range(32): m[i * 4096:(i + 1) * 4096] = bytes([100 + i]) * 4096\n"
            "print('changed', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        first = tmp_path / "a.snap"
        assert runner.invoke(app, ["capture", str(proc.pid), "-o", str(first), "-q"]).exit_code == 0
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "changed"
        second = tmp_path / "b.snap"
        assert runner.invoke(app, ["capture", str(proc.pid), "-o", str(second), "-q"]).exit_code == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    result = analyze([first, second], jobs=1)
    assert len(result.per_input) == 1
    row = result.stability.iloc[0]
    # 64 pages of 8 contents; then pages 0-31 rewritten, each with a content of its own.
    assert (row["samples"], row["pages_changed"], row["pages_unchanged"]) == (2, 32, 32)
    # Two samples: each changed page changed in every interval, so is never kept merged; of
    # pages 32-63 (contents 1-8, 4 pages each) 8 KSM pages and 24 sharing stay.
    assert result.host.at["pages_sharing", "with_zero_pages"] == 24
    assert result.host.at["pages_sharing", "if_memory_stood_still"] == 24


def test_dumps_given_as_samples_are_one_input_in_mtime_order(tmp_path):
    import os

    from dumpwriter.raw import make_raw

    def page(letter: str) -> bytes:
        return letter.encode() * 4096

    # Written in the other order than their names: the mtimes give the order.
    late = make_raw(tmp_path / "vm.a.raw", [page(c) for c in "aabbxyzq"])
    early = make_raw(tmp_path / "vm.b.raw", [page(c) for c in "aabbcdef"])
    os.utime(early, (1_000, 1_000))
    os.utime(late, (1_060, 1_060))
    r = runner.invoke(app, ["scan", str(late), str(early), "--samples", "vm=vm.*.raw",
                            "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [row["input"] for row in data["per_input"]] == ["vm"]
    (row,) = data["stability"]
    # Pages 4-7 changed (c d e f -> x y z q) in the one interval of 60 s.
    assert (row["samples"], row["observed_seconds"], row["pages_changed"],
            row["pages_unchanged"]) == (2, 60.0, 4, 4)
    # A guest dump is read as a frozen moment otherwise: two inputs.
    r2 = runner.invoke(app, ["scan", str(late), str(early), "--json"])
    assert len(json.loads(r2.stdout)["per_input"]) == 2


def _seen_once(folder, pages, name):
    """A fingerprint file of one input seen once (no identity), page i holding ``pages[i]``."""
    fp = _sample(pages, identity=None, at=None, name=name)
    path = folder / f"{name}.ksmfp.parquet"
    fingerprint_files.save(
        path, [fp], source={"path": f"/nowhere/{name}", "size": 0, "mtime_ns": 0},
        options={"format": "snapshot", "page_size": 4096, "base_address": 0,
                 "prefix_bytes": 128},
        contents=[fp.content])
    return path


def test_a_series_steady_view_depends_on_the_other_inputs_of_its_host(tmp_path):
    """Why samples over time are not reduced one series at a time out of core, but in two
    levels (fleet/aggregate.py, SeriesRules; out of core: tests/test_series_out_of_core.py):
    what KSM keeps of a series, and its stability row, change with pages of inputs that are
    not its samples. A per-series reduction would give the "alone" figures below on the
    host with the other input too."""
    # Pages 0-1 change in 1 of 2 intervals, to "g", and hold still after; 2-3 hold still.
    series = ("pqcd", "ggcd", "ggcd")
    # 1. smart_scan with KSM running: pages 0-1 are late duplicates, joinable only if the
    #    host has two steady pages of "g" (a content count over every input).
    ran = {"ksm": {"run": 1, "smart_scan": 1}}
    alone = analyze(_write(tmp_path / "a", series, machine=ran), jobs=1)
    assert alone.convergence.at["late_duplicate_pages", "value"] == 2
    assert alone.host.at["pages_sharing", "with_zero_pages"] == 0
    host = analyze([*_write(tmp_path / "b", series, machine=ran),
                    _seen_once(tmp_path, "ggc", "other")], jobs=1)
    # "g" x4 (the series' two join the other's steady pair) and "c" x2: 2 KSM pages, 4 sharing
    # (alone, the series' "g" pages would stay late: "g" x2 and "c" x2, 2 sharing).
    assert host.convergence.at["late_duplicate_pages", "value"] == 0
    assert (host.host.at["pages_shared", "with_zero_pages"],
            host.host.at["pages_sharing", "with_zero_pages"]) == (2, 4)
    # 2. The stability row: "c" is a stable duplicate only with the other input's "c".
    assert alone.stability.iloc[0]["stable_duplicate_pages"] == 0
    assert host.stability.iloc[0]["stable_duplicate_pages"] == 1
    # 3. The time a page must hold still to merge is two full scans of the whole host: pages
    #    0-1 (changed in 1 of 2 intervals of 0.1 s: ln 2 / 0.1 = 6.9 writes a second) hold
    #    long enough for the 4 pages alone (2 x 24 ms), not beside 400 others (2 x 120 ms).
    quick = analyze(_write(tmp_path / "c", series, gap=0.1), jobs=1)
    assert quick.host.at["pages_sharing", "with_zero_pages"] == 1
    many = "".join(chr(0x100 + i) for i in range(400))  # 400 contents of their own
    crowded = analyze([*_write(tmp_path / "d", series, gap=0.1),
                       _seen_once(tmp_path, many, "big")], jobs=1)
    assert crowded.host.at["pages_sharing", "with_zero_pages"] == 0
