"""The measured overcommit ratio: guests' memory a host holds over its memory for guests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PS, runner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.planning.overcommit import ALL_INPUTS, supported, supported_ratio
from ksm_analyze.planning.plan import plan

RMAP = 64  # bytes per rmap_item
PAGES, COMMON = 64, 48  # pages per guest; of those, contents every guest of the family holds


def _write(path, pages: np.ndarray) -> str:
    pages.tofile(path)
    return str(path)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Eight guests of 64 random pages, 48 of them (75%) the same in every guest."""
    rng = np.random.default_rng(23)
    d = tmp_path_factory.mktemp("family")
    common = rng.integers(0, 256, (COMMON, PS), dtype=np.uint8)
    return [_write(d / f"g{k}.raw", np.concatenate(
        [common, rng.integers(0, 256, (PAGES - COMMON, PS), dtype=np.uint8)]))
        for k in range(8)]


def _after(k: int) -> int:
    """Memory after KSM of k guests of the family, by hand: the 48 common contents once,
    16 pages of each guest's own, and an rmap_item per scanned page."""
    return (COMMON + k * (PAGES - COMMON)) * PS + k * PAGES * RMAP


def _before(k: int) -> int:
    return k * PAGES * PS


def test_ratio_is_memory_before_over_after_on_a_host_that_holds_the_family(family):
    # A host exactly as large as the 8 guests after KSM holds the 8 (measured): its ratio is
    # their memory before KSM over after. A host of 20 guests after KSM (plus half a page:
    # the model's float sum) holds 20, beyond the samples: 20 guests' memory over the host.
    host, big = _after(8), _after(20) + PS // 2
    p = plan(analyze(family, jobs=1), host, host_sizes=[big])
    rows = p.overcommit.set_index("host_memory_bytes")
    assert list(rows.index) == [host, big]
    assert set(rows["family"]) == {"g0.raw+7 more"} and list(rows["input_count"]) == [8, 8]
    assert list(rows["vms_per_host"]) == [8, 20]
    assert rows.loc[host, "ratio"] == pytest.approx(_before(8) / _after(8), rel=1e-12)
    assert rows.loc[big, "ratio"] == pytest.approx(_before(20) / big, rel=1e-12)
    assert list(rows["method"]) == ["measured", "fit a+b/k"]
    # Guests alike in every order: the band is the point.
    assert (rows["ratio_low"] == rows["ratio"]).all() and (rows["ratio_high"] == rows["ratio"]).all()
    assert supported_ratio(p) == pytest.approx(_before(8) / _after(8), rel=1e-12)


def _mixed_guests(folder, count: int) -> list[str]:
    """Guests of 64 random pages: 24 common to all, then a share (0 to 32 pages, random per
    guest) of a family layer of 32 pages, the rest the guest's own: guests that add more or
    less to a host."""
    rng = np.random.default_rng(5)
    common = rng.integers(0, 256, (24, PS), dtype=np.uint8)
    layer = rng.integers(0, 256, (32, PS), dtype=np.uint8)
    paths = []
    for k in range(count):
        shared = int(rng.integers(0, 33))
        own = rng.integers(0, 256, (PAGES - 24 - shared, PS), dtype=np.uint8)
        paths.append(_write(folder / f"m{k:02}.raw", np.concatenate([common, layer[:shared],
                                                                     own])))
    return paths


def test_band_contains_the_ratio_and_narrows_with_more_guests(tmp_path):
    paths = _mixed_guests(tmp_path, 16)
    host = 40 * PAGES * PS // 2  # some 40 guests like these: beyond 4 samples and 16 alike
    widths = []
    for n in (4, 16):
        r = plan(analyze(paths[:n], jobs=1), host).overcommit
        assert len(r) == 1, r  # one family: every guest shares the common pages
        row = r.iloc[0]
        assert row["ratio_low"] <= row["ratio"] <= row["ratio_high"]
        assert row["vms_per_host_low"] < row["vms_per_host_high"]  # a band, not a point
        widths.append(row["ratio_high"] - row["ratio_low"])
    assert widths[1] < widths[0], widths


@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
    """A1/A2 share 200 pages, B1/B2 another 200, nothing across; 20 pages each alone."""
    rng = np.random.default_rng(17)
    d = tmp_path_factory.mktemp("two")
    paths = []
    for group in "AB":
        common = rng.integers(0, 256, (200, PS), dtype=np.uint8)
        paths += [_write(d / f"{group}{k}.raw", np.concatenate(
            [common, rng.integers(0, 256, (20, PS), dtype=np.uint8)])) for k in (1, 2)]
    return paths


PAIR = (200 + 2 * 20) * PS + 2 * 220 * RMAP  # by hand: a family's pair on one host
ALONE = 220 * PS + 220 * RMAP


def test_families_that_share_nothing_get_rows_of_their_own(two_families):
    p = plan(analyze(two_families, jobs=1), PAIR)
    rows = p.overcommit.set_index("family")
    assert list(rows.index) == ["A1.raw+A2.raw", "B1.raw+B2.raw", ALL_INPUTS]
    assert rows.loc["A1.raw+A2.raw", "inputs"] == ["A1.raw", "A2.raw"]
    for fam in ("A1.raw+A2.raw", "B1.raw+B2.raw"):  # a pair fits exactly
        assert rows.loc[fam, "vms_per_host"] == 2
        assert rows.loc[fam, "ratio"] == pytest.approx(2 * 220 * PS / PAIR, rel=1e-12)
    # Mixed at random, two guests share one time in three: one guest per host by the mean,
    # two by the hopeful end; the number to set is the mix's low end, one guest per host.
    mix = rows.loc[ALL_INPUTS]
    assert (mix["vms_per_host"], mix["vms_per_host_low"], mix["vms_per_host_high"]) == (1, 1, 2)
    s = supported(p)
    assert (s.family, s.host_memory) == (ALL_INPUTS, PAIR)
    assert s.ratio == pytest.approx(220 * PS / PAIR, rel=1e-12)
    assert 2 * ALONE > PAIR  # why: two guests of different families do not fit


def test_domains_are_the_families(two_families):
    r = runner.invoke(app, ["plan", *two_families, "--host-memory", str(PAIR), "-q", "--json",
                            "--domain", "web=*A?.raw", "--domain", "db=*B?.raw"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout, parse_constant=lambda c: 1 / 0)["overcommit"]
    assert [row["family"] for row in rows] == ["web", "db", ALL_INPUTS]


def test_cli_json_csv_text_and_the_number_to_set(two_families, tmp_path):
    args = ["plan", *two_families, "--host-memory", str(PAIR), "-q",
            "--host-sizes", f"{2 * PAIR},{4 * PAIR}"]
    r = runner.invoke(app, [*args, "--json", "--csv", str(tmp_path / "csv")])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout, parse_constant=lambda c: 1 / 0)  # strict: no NaN
    assert sorted({row["host_memory_bytes"] for row in data["overcommit"]}) == [
        PAIR, 2 * PAIR, 4 * PAIR]
    assert len(data["overcommit"]) == 9  # 3 families (with the mix) x 3 sizes
    csv = (tmp_path / "csv" / "overcommit.csv").read_text().splitlines()
    assert csv[0].startswith("family,inputs,input_count,host_memory_bytes")
    assert csv[1].startswith("A1.raw+A2.raw,A1.raw A2.raw,2,")
    text = runner.invoke(app, args)
    assert text.exit_code == 0, text.output
    ratio = 220 * PS / PAIR  # 0.891...: rounded down
    assert (f"Set ram_allocation_ratio to at most {int(ratio * 100) / 100:.2f} (KubeVirt "
            f"memoryOvercommit: at most {int(ratio * 100)}%)") in text.stdout


@pytest.mark.parametrize("sizes", ["64GiB,lots", "0", "64GiB,,1TiB", "-1GiB"])
def test_bad_host_sizes_exit_2_with_one_line(two_families, sizes):
    r = runner.invoke(app, ["plan", *two_families, "--host-memory", str(PAIR), "-q",
                            "--host-sizes", sizes])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and "--host-sizes" in r.stderr, r.stderr
    assert "Traceback" not in r.output


def test_guests_that_cost_nothing_set_no_limit(tmp_path):
    # All-zero guests planned without zero pages (never touched) cost no host memory after
    # KSM: memory sets no overcommit limit. Before, the band divided by a cost of 0.
    paths = [_write(tmp_path / f"z{i}.raw", np.zeros((16, PS), np.uint8)) for i in range(3)]
    r = runner.invoke(app, ["plan", *paths, "--host-memory", "1MiB", "--without-zero-pages",
                            "--json", "-q"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["overcommit"]  # strict JSON: no Infinity
    assert [row["method"] for row in rows] == ["no memory limit"] * 4  # 3 families + the mix
    assert all(row[k] is None for row in rows for k in ("vms_per_host", "ratio", "ratio_low"))
    r = runner.invoke(app, ["plan", *paths, "--host-memory", "1MiB", "--without-zero-pages",
                            "-q"])
    assert r.exit_code == 0, r.output
    assert "cost no host memory after KSM: memory sets no overcommit limit" in r.stdout
