"""How inputs are named and refused: equal file names, a file given twice, outputs that
would replace an input, many inputs in one report, bad option values."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time

import numpy as np
import pytest
from conftest import PS, SAMPLES, runner

from ksm_analyze.cli import app
from ksm_analyze.units import short_names


def _one_line(r, code):
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize(("paths", "names"), [
    (["/x/a/vm.raw", "/x/b/vm.raw", "/x/c.elf"], ["a/vm.raw", "b/vm.raw", "c.elf"]),
    (["p/q/vm", "r/q/vm"], ["p/q/vm", "r/q/vm"]),
    (["vm", "sub/vm"], ["vm", "sub/vm"]),
    (["d/vm", "d/vm"], ["d/vm", "d/vm#2"]),
    (["/s/two.snap:41", "/s/two.snap:42"], ["two.snap:41", "two.snap:42"]),
])
def test_short_names_are_file_names_made_distinct(paths, names):
    assert short_names(paths) == names


def test_inputs_with_equal_file_names_stay_apart_in_every_table(tmp_path):
    # Two different guests whose dumps share a file name: the pairwise table must compare
    # them with each other, not each with itself (it showed 0% where the truth was 100%).
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(SAMPLES[1], tmp_path / d / "vm.raw")
    paths = [str(tmp_path / d / "vm.raw") for d in ("a", "b")]
    r = runner.invoke(app, ["scan", *paths, "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {row["input_a"] for row in data["pairwise"]} == {"a/vm.raw", "b/vm.raw"}
    assert all(row["a_fraction_in_b"] == 1.0 for row in data["pairwise"])
    assert {row["input"] for row in data["address_map"]} == {"a/vm.raw", "b/vm.raw"}
    text = runner.invoke(app, ["scan", *paths]).stdout
    assert "a/vm.raw" in text and "b/vm.raw" in text


def test_a_file_given_twice_is_one_line_and_exit_2(tmp_path):
    line = _one_line(runner.invoke(app, ["scan", SAMPLES[1], SAMPLES[1]]), 2)
    assert line == (f"Error: {SAMPLES[1]} is given twice (inputs 1 and 2): each input is one "
                    "guest or process; to model two identical guests, give a copy")
    link = tmp_path / "link.raw"
    link.symlink_to(SAMPLES[1])
    line = _one_line(runner.invoke(app, ["report", SAMPLES[0], SAMPLES[1], str(link),
                                         "-o", str(tmp_path / "out")]), 2)
    assert f"{link} is given twice (inputs 2 and 3, the first time as {SAMPLES[1]})" in line
    assert not (tmp_path / "out").exists()  # made first (to fail early), removed: no report
    # A copy is another guest that happens to be identical: allowed.
    shutil.copy(SAMPLES[1], tmp_path / "copy.raw")
    assert runner.invoke(app, ["scan", SAMPLES[1], str(tmp_path / "copy.raw")]).exit_code == 0


@pytest.mark.parametrize("output", ["index.html", "per_input.csv", "savings.png"])
def test_report_never_overwrites_an_input(tmp_path, output):
    dump = tmp_path / output
    shutil.copy(SAMPLES[1], dump)
    before = dump.read_bytes()
    line = _one_line(runner.invoke(app, ["report", str(dump), "-o", str(tmp_path)]), 2)
    assert line == (f"Error: {dump}: this input would be overwritten by the output {output}; "
                    "write into another folder")
    assert dump.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [output]


def test_scan_csv_never_overwrites_an_input(tmp_path):
    dump = tmp_path / "host.csv"
    shutil.copy(SAMPLES[1], dump)
    _one_line(runner.invoke(app, ["scan", str(dump), "--csv", str(tmp_path)]), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.csv"]


@pytest.mark.parametrize(("args", "message"), [
    (["--base-address", "zz"], "--base-address 'zz' is not an address (use e.g. 0x100000)"),
    (["--base-address", hex(1 << 64)], f"--base-address {1 << 64:#x} is outside 0 to 2^64-1"),
    (["--base-address", "-1"], "--base-address -0x1 is outside 0 to 2^64-1"),
])
@pytest.mark.parametrize("command", ["scan", "info"])
def test_bad_base_address_is_one_line(command, args, message):
    assert _one_line(runner.invoke(app, [command, SAMPLES[1], *args]), 2) == f"Error: {message}"


def test_a_report_of_many_inputs_stays_a_readable_size(tmp_path):
    # 120 one-page guests sharing a page in pairs: the heatmap and the address map must stay
    # a few thousand pixels, not grow with the number of inputs until memory runs out.
    rng = np.random.default_rng(5)
    shared = rng.integers(0, 256, (60, PS), dtype=np.uint8)
    paths = []
    for i in range(120):
        path = tmp_path / f"g{i:03}.raw"
        np.stack([shared[i // 2], rng.integers(0, 256, PS, dtype=np.uint8)]).tofile(path)
        paths.append(str(path))
    started = time.monotonic()
    r = runner.invoke(app, ["report", *paths, "-o", str(tmp_path / "out"), "-j", "1"])
    assert r.exit_code == 0, r.output
    assert time.monotonic() - started < 120
    for chart in ("pairwise", "address_map", "savings", "histogram"):
        with open(tmp_path / "out" / f"{chart}.png", "rb") as f:
            width, height = struct.unpack(">II", f.read(24)[16:24])  # PNG IHDR
        assert width <= 2200 and height <= 5000, (chart, width, height)
    pairwise = (tmp_path / "out" / "pairwise.csv").read_text().splitlines()
    assert len(pairwise) == 1 + 120  # each shares with its neighbour only: no other pair
    assert pairwise[1].startswith("g000.raw,g001.raw,")
    assert os.path.getsize(tmp_path / "out" / "index.html") < 50 << 20
