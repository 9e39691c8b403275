"""``ksm-analyze tune``: the prefix length swept with scan's own stages (issue 22, part 5)."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from conftest import PS, ROOT, SAMPLES, runner

from dumpwriter.raw import make_raw
from ksm_analyze.cli import app
from ksm_analyze.pipeline import analyze
from ksm_analyze.whatif.tune import recommend, tune

_STAGE_COUNTERS = ("pages_hashed", "prefix_candidates", "false_candidates", "full_hashes",
                   "full_compares", "hash_collisions", "merges")


def _row(result, prefix):
    rows = [r for r in result.columns["prefixes"].rows() if r["prefix_bytes"] == prefix]
    assert len(rows) == 1
    return rows[0]


def _strict(text):
    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_counters_at_128_equal_scan_stages():
    """The samples through `scan --json` and through tune: the same stage counters at 128."""
    r = runner.invoke(app, ["scan", *SAMPLES, "--json", "--jobs", "1"])
    assert r.exit_code == 0, r.output
    stages = _strict(r.stdout)["stages"]
    t = runner.invoke(app, ["tune", *SAMPLES, "--json", "--jobs", "1", "--runs", "1",
                            "--prefixes", "64,128"])
    assert t.exit_code == 0, t.output
    data = _strict(t.stdout)
    at128 = next(row for row in data["prefixes"] if row["prefix_bytes"] == 128)
    assert {c: at128[c] for c in _STAGE_COUNTERS} == {c: stages[c] for c in _STAGE_COUNTERS}
    assert at128["bytes_hashed"] == stages["pages_hashed"] * 128
    # Strict JSON, with every table and the recommendation.
    assert set(data) >= {"prefixes", "collisions", "comparing", "recommended_prefix_bytes",
                         "reason", "method"}
    assert data["recommended_prefix_bytes"] in (64, 128)
    assert sum(row["recommended"] for row in data["prefixes"]) == 1


def _crafted(tmp_path):
    """Six pages equal in their first 64 bytes (0xAA) that differ at byte 64; two equal
    pages of 0x55; two unique pages; one zero page."""
    pages = []
    for i in range(6):
        page = bytearray(PS)
        page[:64] = b"\xaa" * 64
        page[64] = i + 1
        pages.append(bytes(page))
    pages += [b"\x55" * PS] * 2 + [b"\x11" * PS, b"\x22" * PS, bytes(PS)]
    return make_raw(tmp_path / "crafted.raw", pages)


def test_crafted_false_candidates(tmp_path):
    """By hand: at 16, 32 and 64 bytes the six pages share their prefix: 8 candidates (the
    six and the 0x55 pair), 6 false ones (the six are each unique); stage 2 compares the
    five that are not their group's first with it (and the pair's second: 6 compares), and
    hashes whole the five that differ. From 128 bytes on, only the pair is a candidate: 2
    candidates, none false, 1 compare, no full hash. One merge everywhere; 10 non-zero
    pages hashed."""
    path = _crafted(tmp_path)
    result = tune([path], jobs=1, prefixes=(16, 32, 64, 128, 256, 4096), runs=1)
    for p in (16, 32, 64):
        row = _row(result, p)
        assert (row["prefix_candidates"], row["false_candidates"], row["full_compares"],
                row["full_hashes"], row["merges"]) == (8, 6, 6, 5, 1), p
    for p in (128, 256, 4096):
        row = _row(result, p)
        assert (row["prefix_candidates"], row["false_candidates"], row["full_compares"],
                row["full_hashes"], row["merges"]) == (2, 0, 1, 0, 1), p
    for p in (16, 32, 64, 128, 256, 4096):
        assert _row(result, p)["pages_hashed"] == 10
        assert _row(result, p)["bytes_hashed"] == 10 * p
    assert result.stored_bytes == 11 * PS


def test_real_qemu_dump():
    """vm-a.elf (QEMU's dump-guest-memory): the counters at 128 are scan's; a longer prefix
    never makes more candidates (pages equal over n bytes are equal over fewer); a
    verified merge does not depend on the prefix; the whole page hashed leaves no false
    candidate."""
    path = str(ROOT / "sample_dumps" / "vm-a.elf")
    stats = analyze(path, jobs=1).stages
    result = tune(path, jobs=1, runs=1)
    row = _row(result, 128)
    assert {c: row[c] for c in _STAGE_COUNTERS} == {c: int(stats.loc[c, "value"])
                                                     for c in _STAGE_COUNTERS}
    table = result.prefixes
    assert list(table["prefix_bytes"]) == [16, 32, 64, 128, 256, 512, 1024, 4096]
    assert table["prefix_candidates"].is_monotonic_decreasing
    assert table["merges"].nunique() == 1
    assert _row(result, 4096)["false_candidates"] == 0
    assert (table["total_seconds_per_gib"] > 0).all()
    assert result.prefixes["recommended"].sum() == 1


def test_collision_bound():
    """The birthday bound n(n-1)/2 / 2^bits, computed here with exact fractions, for the
    samples' non-zero pages and for 1 PiB of 4 KiB pages (2^38)."""
    import ksm_analyze  # the public API: a lazy name

    result = ksm_analyze.tune(SAMPLES, jobs=1, runs=1, prefixes=(128,))
    assert list(result.tables()) == ["prefixes", "collisions", "comparing"]
    n = int(analyze(SAMPLES, jobs=1).stages.loc["pages_hashed", "value"])
    rows = {(r["population"], r["hash_bits"]): r for r in result.columns["collisions"].rows()}
    for population, pages in (("these inputs", n), ("1 PiB fleet", 2**38)):
        for bits in (64, 128):
            expected = Fraction(pages * (pages - 1), 2) / 2**bits
            row = rows[(population, bits)]
            assert row["pages"] == pages
            assert row["expected_collisions"] == pytest.approx(float(expected), rel=1e-12)
            assert row["probability_bound"] == pytest.approx(min(1.0, float(expected)),
                                                             rel=1e-12)
    # A fleet of 2^38 pages under a 64-bit hash: about 2,048 colliding pairs expected.
    assert rows[("1 PiB fleet", 64)]["expected_collisions"] == pytest.approx(2048, rel=1e-6)
    assert rows[("1 PiB fleet", 64)]["probability_bound"] == 1.0


def test_recommend_rule():
    """The shortest prefix within 5% of the fastest total."""
    assert recommend([16, 64, 128, 4096], [2.0, 1.04, 1.0, 1.5]) == 64
    assert recommend([16, 64, 128, 4096], [2.0, 1.06, 1.0, 1.5]) == 128
    assert recommend([16, 128], [None, None]) == 16


def test_fingerprint_file_refused(tmp_path):
    r = runner.invoke(app, ["fingerprint", SAMPLES[1], "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (made,) = tmp_path.glob("*.ksmfp.parquet")
    t = runner.invoke(app, ["tune", str(made)])
    assert t.exit_code == 1
    assert t.stdout == ""
    lines = t.stderr.splitlines()
    assert len(lines) == 1 and "fingerprint file holds no page bytes" in lines[0]
    assert str(made) in lines[0]


@pytest.mark.parametrize("value", ["abc", "0", "-16", "8192", "", "16,16", "16,,32"])
def test_bad_prefixes_exit_2(value):
    r = runner.invoke(app, ["tune", SAMPLES[1], "--prefixes", value])
    assert r.exit_code == 2, r.output
    assert len(r.stderr.splitlines()) == 1 and "--prefixes" in r.stderr


def test_text_output():
    r = runner.invoke(app, ["tune", *SAMPLES, "--jobs", "1", "--runs", "1"])
    assert r.exit_code == 0, r.output
    assert "<- recommended" in r.stdout and "1 PiB fleet" in r.stdout


def test_report_tune_section(tmp_path):
    out = tmp_path / "report"
    r = runner.invoke(app, ["report", *SAMPLES, "-o", str(out), "--tune", "--jobs", "1"])
    assert r.exit_code == 0, r.output
    for name in ("tune_prefixes.csv", "tune_collisions.csv", "tune_comparing.csv", "tune.png"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "index.html").read_text()
    assert '<h2 id="tune">Prefix length</h2>' in page and "Recommended: " in page
    plain = runner.invoke(app, ["report", *SAMPLES, "-o", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    assert not (tmp_path / "plain" / "tune.png").exists()


def test_report_tune_refuses_fingerprint_files(tmp_path):
    r = runner.invoke(app, ["fingerprint", SAMPLES[1], "-o", str(tmp_path / "fp")])
    assert r.exit_code == 0, r.output
    (made,) = (tmp_path / "fp").glob("*.ksmfp.parquet")
    t = runner.invoke(app, ["report", str(made), "-o", str(tmp_path / "out"), "--tune"])
    assert t.exit_code == 1
    assert len(t.stderr.splitlines()) == 1 and "no page bytes" in t.stderr
