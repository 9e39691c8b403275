"""Near-duplicates (``--near-duplicates N``, issue 22 part 4): pages equal but for a few
bytes, reported by offsets and counts, on a raw image built here whose differences are
known; the expected values are written by hand from how the image is built."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import PS, SAMPLES, runner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.whatif import near_duplicates as nd

RNG = np.random.default_rng(22)


def _random() -> np.ndarray:
    return RNG.integers(0, 256, PS, dtype=np.uint8)


def _changed(page: np.ndarray, offsets: range | list[int]) -> np.ndarray:
    out = page.copy()
    out[list(offsets)] ^= 0xFF  # every byte named differs, no other
    return out


def _crafted() -> list[np.ndarray]:
    """The pages of the crafted image, in address order (expected values: the tests)."""
    pages = []
    # A: 40 contents equal but for bytes 4088-4095, each with its own trailer (all 8 bytes
    # differ between any two); the sixth stored three times, so it has the most pages.
    a = _random()
    family = []
    for k in range(40):
        p = a.copy()
        p[4088:4096] = k + 1
        family.append(p)
    pages += [*family, family[5], family[5]]
    # B: 10 contents differing at byte 0 only (0, 1, ... 9 there).
    b = _random()
    for k in range(10):
        p = b.copy()
        p[0] = k
        pages.append(p)
    # C: a pair differing in two separate ranges inside one band (1024-1535).
    c = _random()
    pages += [c, _changed(c, [*range(1024, 1028), *range(1100, 1104)])]
    # D: a pair differing in two bands (bytes 100 and 3000: bands 0 and 5).
    d = _random()
    pages += [d, _changed(d, [100, 3000])]
    # E: a pair differing in three bands (bytes 10, 2000 and 4000): beyond the method.
    e = _random()
    pages += [e, _changed(e, [10, 2000, 4000])]
    return pages + _unrelated()


def _unrelated() -> list[np.ndarray]:
    """Exact duplicates (5 copies of one page), 20 random pages and 8 zero pages."""
    dup = _random()
    return [dup] * 5 + [_random() for _ in range(20)] + [np.zeros(PS, np.uint8)] * 8


def _write(path: Path, pages: list[np.ndarray]) -> str:
    np.concatenate(pages).tofile(path)
    return str(path)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _write(tmp_path_factory.mktemp("near") / "crafted.raw", _crafted())


def test_known_differences_are_reported_exactly(crafted):
    r = analyze(crafted, near_duplicates=20, jobs=1)
    rows = r.columns["near_duplicates"].records()
    for row in rows:
        row.pop("inputs")
    assert rows == [
        # A: 42 pages, 40 contents; KSM saves 2 (the three copies) and would save 41.
        {"group": 1, "pages": 42, "contents": 40, "input_count": 1,
         "differing_ranges": ["4088-4095"], "differing_range_count": 1,
         "differing_bytes_min": 8, "differing_bytes_max": 8, "first_differing_offset": 4088,
         "saved_pages": 2, "saved_if_equal_pages": 41, "extra_saved_pages": 39,
         "extra_saved_bytes": 39 * 4096},
        {"group": 2, "pages": 10, "contents": 10, "input_count": 1,
         "differing_ranges": ["0-0"], "differing_range_count": 1,
         "differing_bytes_min": 1, "differing_bytes_max": 1, "first_differing_offset": 0,
         "saved_pages": 0, "saved_if_equal_pages": 9, "extra_saved_pages": 9,
         "extra_saved_bytes": 9 * 4096},
        {"group": 3, "pages": 2, "contents": 2, "input_count": 1,
         "differing_ranges": ["1024-1027", "1100-1103"], "differing_range_count": 2,
         "differing_bytes_min": 8, "differing_bytes_max": 8, "first_differing_offset": 1024,
         "saved_pages": 0, "saved_if_equal_pages": 1, "extra_saved_pages": 1,
         "extra_saved_bytes": 4096},
        {"group": 4, "pages": 2, "contents": 2, "input_count": 1,
         "differing_ranges": ["100-100", "3000-3000"], "differing_range_count": 2,
         "differing_bytes_min": 2, "differing_bytes_max": 2, "first_differing_offset": 100,
         "saved_pages": 0, "saved_if_equal_pages": 1, "extra_saved_pages": 1,
         "extra_saved_bytes": 4096},
    ]  # E (three bands apart), the exact duplicates and the random pages: not there
    assert r.near_duplicates["inputs"].tolist() == [{"crafted.raw": n} for n in (42, 10, 2, 2)]
    hist = {(h["histogram"], h["low"]): (h["contents"], h["pages"])
            for h in r.columns["near_duplicate_histogram"].records()}
    # Members other than the representatives: A's 39 (8 bytes, from 4088), B's 9 (1 byte,
    # at 0), C's one (8 bytes, from 1024), D's one (2 bytes, from 100).
    assert {k: v for k, v in hist.items() if v != (0, 0)} == {
        ("differing_bytes", 1): (9, 9), ("differing_bytes", 2): (1, 1),
        ("differing_bytes", 8): (40, 40),
        ("first_differing_offset", 0): (10, 10), ("first_differing_offset", 1024): (1, 1),
        ("first_differing_offset", 3584): (39, 39)}
    assert len(hist) == 13 + 8  # 1, 2-3, ... 4096; eight bands
    assert not r.warnings


def test_at_most_n_groups_most_pages_first(crafted):
    r = analyze(crafted, near_duplicates=1, jobs=1)
    assert r.near_duplicates[["pages", "contents"]].values.tolist() == [[42, 40]]


def test_nothing_for_exact_duplicates_and_unrelated_pages(tmp_path):
    r = analyze(_write(tmp_path / "plain.raw", _unrelated()), near_duplicates=20, jobs=1)
    assert len(r.near_duplicates) == 0
    assert r.near_duplicate_histogram["contents"].sum() == 0  # ran: its buckets, all empty
    assert len(r.near_duplicate_histogram) == 21


def test_off_by_default_and_scan_text_only_when_asked(crafted):
    assert len(analyze(crafted, jobs=1).near_duplicate_histogram) == 0
    plain = runner.invoke(app, ["scan", crafted, "-j", "1"])
    asked = runner.invoke(app, ["scan", crafted, "-j", "1", "--near-duplicates", "2"])
    assert plain.exit_code == asked.exit_code == 0, asked.output
    assert "Near-duplicates" not in plain.stdout
    assert asked.stdout.startswith(plain.stdout.rstrip("\n").rsplit("\nWarning", 1)[0])
    lines = asked.stdout.splitlines()
    assert "  1         42        40       1                8     4,088" \
        "         4088-4095  +156 KiB (39 pages)" in lines
    assert "  Contents by bytes differing: 1: 9, 8-15: 39" in lines  # the top two groups


def test_a_uniform_sample_beyond_the_cap_is_said(crafted, monkeypatch):
    # 77 distinct non-zero contents: A 40, B 10, C, D and E 2 each, the duplicate, 20 random.
    monkeypatch.setattr(nd, "MAX_CONTENTS", 50)
    r = analyze(crafted, near_duplicates=20, jobs=1)
    [w] = r.warnings
    assert w.startswith("near_duplicates: 77 distinct contents, more than 50: a uniform "
                        "sample of 50 (64.9%) was compared")
    assert r.near_duplicates["contents"].sum() <= 50


def test_fingerprint_files_without_their_dumps_are_named(tmp_path):
    dump = _write(tmp_path / "gone.raw", _crafted())
    r = runner.invoke(app, ["fingerprint", dump, "-o", str(tmp_path), "-j", "1", "-q"])
    assert r.exit_code == 0, r.output
    Path(dump).unlink()  # its bytes are elsewhere now
    [fp] = tmp_path.glob("*.ksmfp.parquet")
    r = runner.invoke(app, ["scan", str(fp), "--near-duplicates", "5", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["near_duplicates"] == []
    assert [w for w in out["warnings"] if w.startswith("near_duplicates")] == [
        ("near_duplicates: no page bytes of gone.raw (fingerprint files whose dumps are not "
         "readable here): contents found only there are left out")]


def test_bad_value_exits_2():
    r = runner.invoke(app, ["scan", *SAMPLES, "--near-duplicates", "-1"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == \
        "Error: --near-duplicates cannot be negative, not -1"


def test_samples_run_and_json_is_strict(tmp_path):
    r = runner.invoke(app, ["scan", *SAMPLES, "--near-duplicates", "5", "--json", "-j", "1",
                            "--csv", str(tmp_path)])
    assert r.exit_code == 0, r.output

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    out = json.loads(r.stdout, parse_constant=refuse)
    groups = out["near_duplicates"]
    assert 1 <= len(groups) <= 5
    for g in groups:  # what the columns say of each other
        assert g["pages"] == sum(g["inputs"].values()) and g["contents"] >= 2
        assert g["extra_saved_pages"] == g["saved_if_equal_pages"] - g["saved_pages"]
        first, _, last = g["differing_ranges"][0].partition("-")
        assert int(first) == g["first_differing_offset"] <= int(last)
    assert (tmp_path / "near_duplicates.csv").read_text().startswith("group,pages,contents,")


def test_report_has_the_section_and_chart_only_when_asked(crafted, tmp_path):
    from ksm_analyze.render.report import CHARTS, report_files

    for asked in (0, 3):
        out = tmp_path / f"report{asked}"
        r = runner.invoke(app, ["report", crafted, "-o", str(out), "-q", "-j", "1",
                                "--near-duplicates", str(asked)])
        assert r.exit_code == 0, r.output
        assert sorted(out.iterdir()) == sorted(report_files(out, near_duplicates=asked > 0))
        page = (out / "index.html").read_text()
        assert ('id="near-duplicates"' in page) is (asked > 0)
        assert ("<td>4088-4095</td>" in page) is (asked > 0)
        assert page.count("<img ") == len(CHARTS) + (1 if asked else 0)
