"""The command line: output, exit codes, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import PS, runner

from ksm_analyze.cli import app
from ksm_analyze.hashing import compiled as kernels


@pytest.fixture
def two_raw(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, PS, dtype=np.uint8)
    one = np.stack([a, a, a, np.zeros(PS, np.uint8), rng.integers(0, 256, PS, dtype=np.uint8)])
    two = np.stack([a, np.zeros(PS, np.uint8)])
    p1, p2 = tmp_path / "one.raw", tmp_path / "two.raw"
    one.tofile(p1)
    two.tofile(p2)
    return p1, p2


def test_scan_prints_tables(two_raw):
    r = runner.invoke(app, ["scan", *map(str, two_raw)])
    assert r.exit_code == 0, r.output
    assert "Inputs" in r.stdout and "one.raw" in r.stdout and "two.raw" in r.stdout
    assert "pages_sharing" in r.stdout
    assert "Sharing-degree histogram" in r.stdout


def test_scan_json_is_what_the_api_returns(two_raw):
    r = runner.invoke(app, ["scan", *map(str, two_raw), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    host = data["host"]
    # a x4, zero x2, one unique page: 2 KSM pages, 4 sharing, 1 unshared, 7 rmap items.
    assert host["pages_shared"]["with_zero_pages"] == 2
    assert host["pages_sharing"]["with_zero_pages"] == 3 + 1
    assert host["pages_unshared"]["with_zero_pages"] == 1
    assert host["ksm_rmap_items"]["with_zero_pages"] == 7
    assert host["pages_sharing"]["without_zero_pages"] == 3
    assert [row["zero_pages"] for row in data["per_input"]] == [1, 1]


def test_scan_csv_writes_one_file_per_table(two_raw, tmp_path):
    out = tmp_path / "csv"
    r = runner.invoke(app, ["scan", *map(str, two_raw), "--csv", str(out)])
    assert r.exit_code == 0, r.output
    # Every table, as report writes them (issue 8: one list of tables for --csv and report).
    assert sorted(p.name for p in out.iterdir()) == [
        "address_map.csv", "compression.csv", "convergence.csv", "exclusions.csv", "histogram.csv",
        "host.csv", "huge_pages.csv", "ksmd_settings.csv", "near_duplicate_histogram.csv",
        "near_duplicates.csv", "numa.csv", "pairwise.csv", "per_input.csv", "savings.csv",
        "stability.csv", "stages.csv", "timeline.csv", "top_contents.csv",
    ]
    assert "pages_sharing" in (out / "host.csv").read_text()


def test_use_zero_pages_and_max_page_sharing_reach_the_model(two_raw):
    r = runner.invoke(app, ["scan", *map(str, two_raw), "--json", "--use-zero-pages",
                            "--max-page-sharing", "2"])
    assert r.exit_code == 0, r.output
    host = json.loads(r.stdout)["host"]
    # a x4 with max_page_sharing 2: 2 KSM pages, 2 sharing; 2 zero pages -> ksm_zero_pages.
    assert host["pages_shared"]["with_zero_pages"] == 2
    assert host["pages_sharing"]["with_zero_pages"] == 2
    assert host["ksm_zero_pages"]["with_zero_pages"] == 2


def _one_error_line(result, path):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {path}"), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def test_missing_file(tmp_path):
    p = tmp_path / "nope.raw"
    line = _one_error_line(runner.invoke(app, ["scan", str(p)]), p)
    assert line == f"Error: {p}: no such file"


def test_directory(tmp_path):
    line = _one_error_line(runner.invoke(app, ["scan", str(tmp_path)]), tmp_path)
    assert line == f"Error: {tmp_path}: is a directory, not a dump file"


def test_empty_file(tmp_path):
    p = tmp_path / "empty.raw"
    p.touch()
    line = _one_error_line(runner.invoke(app, ["scan", str(p)]), p)
    assert line == f"Error: {p}: empty file"


def test_unknown_format(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, this is not a memory dump\n")
    line = _one_error_line(runner.invoke(app, ["info", str(p)]), p)
    assert "at offset 0x0: unknown format" in line


def test_permission_denied(tmp_path, monkeypatch):
    # Tests run as root, which chmod cannot stop: make the open itself fail.
    p = tmp_path / "secret.raw"
    p.write_bytes(bytes(PS))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    line = _one_error_line(runner.invoke(app, ["scan", str(p)]), p)
    assert line == f"Error: {p}: permission denied"


def test_bad_option_value_is_exit_2(two_raw):
    r = runner.invoke(app, ["scan", str(two_raw[0]), "--max-page-sharing", "1"])
    assert r.exit_code == 2
    assert "max_page_sharing must be at least 2" in r.stderr


def test_info_lists_ranges(two_raw):
    r = runner.invoke(app, ["info", str(two_raw[0]), "--base-address", "0x100000"])
    assert r.exit_code == 0, r.output
    assert "raw" in r.stdout and "0x100000" in r.stdout


def test_info_shows_what_a_fingerprint_file_holds(two_raw, tmp_path):
    dump = two_raw[0]  # 5 pages at 0x100000: a page three times, a zero page, another
    r = runner.invoke(app, ["fingerprint", str(dump), "-o", str(tmp_path / "fp"), "-q",
                            "--base-address", "0x100000", "--prefix-bytes", "64"])
    assert r.exit_code == 0, r.output
    (fp,) = (tmp_path / "fp").iterdir()
    r = runner.invoke(app, ["info", str(fp)])
    assert r.exit_code == 0, r.output
    lines = [" ".join(line.split()) for line in r.stdout.splitlines()]
    assert lines[0].startswith(f"{fp}: fingerprint file (written by ksm-analyze ")
    assert f"source dump: {dump} (20 KiB), here and unchanged" in lines
    assert ("hashing: format raw, page size 4096, base address 0x100000, the first 64 "
            "bytes of each page hashed") in lines
    assert ("content hashes: stored (scan, report and plan work without the source dump)"
            in lines)
    assert f"Input {dump}: raw, physical address space" in lines
    assert "0x100000 20 KiB 0x0 data raw image" in lines  # address, size, offset, state, label
    assert "data 5 20 KiB" in lines and "zero 0 0 B" in lines
    assert "stored pages found all zero when fingerprinted: 1 (4 KiB)" in lines
    # Without its dump, it says so.
    dump.rename(tmp_path / "elsewhere.raw")
    r = runner.invoke(app, ["info", str(fp)])
    assert r.exit_code == 0, r.output
    assert (f"source dump: {dump} (20 KiB), not here or changed since: stage 2 compares "
            "content hashes") in [" ".join(line.split()) for line in r.stdout.splitlines()]


def test_console_script_and_module_entry_points(two_raw):
    for cmd in (["ksm-analyze"], [sys.executable, "-m", "ksm_analyze"]):
        r = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("ksm-analyze ")
        # CI builds them (tests/test_compiled.py); else the reason, as this process has it
        built = ("yes" if kernels.native is not None
                 else f"no (numpy code: {kernels.numpy_reason})")
        assert f"compiled kernels: {built}\n" in r.stdout


def test_report_options_reach_the_model(two_raw, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(app, ["report", *map(str, two_raw), "-o", str(out), "--max-page-sharing",
                            "2", "--use-zero-pages", "--pages-to-scan", "1",
                            "--sleep-millisecs", "1000", "--kernel", "6.1"])
    assert r.exit_code == 0, r.output
    host = (out / "host.csv").read_text().splitlines()
    # Same counts as test_use_zero_pages_and_max_page_sharing_reach_the_model.
    assert "pages_shared,2,2,2" in host and "ksm_zero_pages,2,0,2" in host  # steady too
    with open(out / "convergence.csv", newline="") as f:
        conv = {row["item"]: row["value"] for row in csv.DictReader(f)}
    # Once steady, the 2 zero pages map the zero page (use_zero_pages) and are not scanned:
    # 5 pages, one a wake-up: 5 // 1 + 1 = 6 wake-ups (the last finds the scan's end), each
    # sleeping 1000 ms (250 ticks at HZ 250) that the timer wheel rounds up to its
    # granularity there (8 ticks) and ends a tick later: at most 1.036 s, so 6.0 to 6.3 s.
    assert 6.0 <= float(conv["full_scan_seconds"]) <= 6.3
    assert conv["kernel_rules"] == "kernel 6.1 (--kernel)" and conv["smart_scan"] == "False"


def _strict_json(text):
    """Parse as strict parsers do: NaN and Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_scan_json_is_strict_json(two_raw):
    r = runner.invoke(app, ["scan", *map(str, two_raw), "--json"])
    assert r.exit_code == 0, r.output
    data = _strict_json(r.stdout)
    # The one value that has no number: rmap_item overhead counted in pages.
    assert data["savings"]["rmap_overhead"]["with_zero_pages_pages"] is None
    assert "address_map" in data


def test_counts_of_one_are_singular(two_raw):
    from ksm_analyze.units import counted

    assert [counted(n, "input") for n in (0, 1, 2, 1234)] == [
        "0 inputs", "1 input", "2 inputs", "1,234 inputs"]
    assert counted(1, "process", "processes") == "1 process"
    assert counted(3, "process", "processes") == "3 processes"
    # A domain of one input, and two base addresses for one input.
    r = runner.invoke(app, ["scan", str(two_raw[0]), "--domain", "solo=*", "-q"])
    assert r.exit_code == 0, r.output
    assert "within domains solo (1 input)." in r.stdout
    r = runner.invoke(app, ["info", str(two_raw[0]), "--base-address", "0",
                            "--base-address", "0x1000"])
    assert r.exit_code == 2
    assert r.stderr.strip() == ("Error: 2 base addresses for 1 input: give one, or one per "
                                "input")


@pytest.mark.parametrize(("args", "line"), [
    (["scan", "--page-size", "1e3", "x.raw"],
     "Error: ksm-analyze scan: Invalid value for '--page-size': '1e3' is not a valid int."),
    (["scan"], "Error: ksm-analyze scan: Missing argument 'dumps'."),
    (["plan", "x.raw"], "Error: ksm-analyze plan: Missing option '--host-memory'."),
    (["nocommand"], "Error: ksm-analyze: No such command 'nocommand'."),
])
def test_a_usage_error_is_one_line_and_exit_2(args, line):
    # The command line as a user runs it (the console script's main): typer drew a box of
    # five lines for these; a usage error is one line like every other error.
    r = subprocess.run([sys.executable, "-c", "from ksm_analyze.cli import main; main()",
                        *args], capture_output=True, text=True, check=False, timeout=60,
                       env={**os.environ, "COLUMNS": "80"})
    assert (r.returncode, r.stdout, r.stderr) == (2, "", line + "\n")


def test_help_and_no_arguments_still_show_the_help():
    for args in ([], ["--help"], ["scan", "--help"]):
        r = subprocess.run([sys.executable, "-c", "from ksm_analyze.cli import main; main()",
                            *args], capture_output=True, text=True, check=False, timeout=60)
        assert "Usage: ksm-analyze" in r.stdout + r.stderr, args
        assert r.returncode == (2 if not args else 0), args


def test_more_hosts_than_one_input_says_input():
    r = runner.invoke(app, ["plan", "sample_dumps/vm-b.raw", "--host-memory", "1GiB",
                            "--hosts", "2"])
    assert r.exit_code == 2
    assert r.stderr == ("Error: --hosts 2 is more hosts than the 1 input: every host needs at "
                        "least one\n")
