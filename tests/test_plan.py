"""Capacity planning: placements whose per-host memory is exactly what scan prints."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import PS, SAMPLES, runner, scan_memory

from ksm_analyze import KsmSettings, analyze
from ksm_analyze.cli import app
from ksm_analyze.placement import HostModel
from ksm_analyze.planning import plan
from ksm_analyze.projection import Projection

RMAP = 64  # bytes per rmap_item
SHARED, PRIVATE = 200, 20  # pages each pair shares, pages each input has alone


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Four inputs in two pairs: A1/A2 share 200 pages, B1/B2 another 200, nothing across;
    each also holds 20 pages of its own. Every page is random: no sharing within an input."""
    rng = np.random.default_rng(17)
    d = tmp_path_factory.mktemp("pairs")
    paths = []
    for group in "AB":
        common = rng.integers(0, 256, (SHARED, PS), dtype=np.uint8)
        for k in (1, 2):
            path = d / f"{group}{k}.raw"
            np.concatenate([common, rng.integers(0, 256, (PRIVATE, PS), dtype=np.uint8)]
                           ).tofile(path)
            paths.append(str(path))
    # Interleave so that first-fit meets A1, B1, A2, B2 in size order ties by position.
    return [paths[0], paths[2], paths[1], paths[3]]


# Counted by hand: an input alone keeps its 220 pages and 220 rmap_items; a pair keeps the
# 200 shared contents once plus 2 x 20 private pages, with 440 rmap_items.
ALONE = (SHARED + PRIVATE) * PS + (SHARED + PRIVATE) * RMAP
PAIR = (SHARED + 2 * PRIVATE) * PS + 2 * (SHARED + PRIVATE) * RMAP


def test_sharing_aware_placement_finds_the_pairs_first_fit_does_not(pairs):
    result = plan(analyze(pairs, jobs=1), PAIR)
    summary = result.summary.set_index("method")["hosts"].to_dict()
    assert summary == {"sharing": 2, "first_fit": 4, "lower_bound": 2}
    hosts = result.hosts[result.hosts["method"] == "sharing"]
    assert sorted(hosts["inputs"]) == [["A1.raw", "A2.raw"], ["B1.raw", "B2.raw"]]
    assert list(hosts["memory_after_bytes"]) == [PAIR, PAIR]
    ffd = result.hosts[result.hosts["method"] == "first_fit"]
    assert list(ffd["memory_after_bytes"]) == [ALONE] * 4
    saved = result.summary.set_index("method").loc["sharing"]
    assert (saved["hosts_saved"], saved["hosts_saved_percent"]) == (2, 50.0)


def test_every_host_of_every_plan_is_what_scan_prints(pairs):
    analysis = analyze(pairs, jobs=1)
    model = HostModel(analysis.contents, analysis.ksm)  # what the placement fits hosts with
    for capacity in (PAIR, PAIR + 10 * PS, 2 * PAIR, 3 * ALONE, 10 * ALONE):
        result = plan(analysis, capacity)
        for r in result.hosts.itertuples():
            inputs = [p for p in pairs for name in r.inputs if p.endswith("/" + name)]
            assert r.memory_after_bytes == scan_memory(inputs, "-j", "1"), (capacity, r)
            assert r.memory_after_bytes == model.footprint([pairs.index(p) for p in inputs])
            assert r.memory_after_bytes <= capacity


def test_spread_over_a_fixed_number_of_hosts(pairs):
    result = plan(analyze(pairs, jobs=1), 4 * ALONE, hosts=2)
    hosts = result.hosts[result.hosts["method"] == "sharing"]
    assert len(hosts) == 2 and sorted(hosts["inputs"]) == [["A1.raw", "A2.raw"], ["B1.raw", "B2.raw"]]
    with pytest.raises(ValueError, match="does not fit on any of 1 hosts"):
        plan(analyze(pairs, jobs=1), 3 * PAIR // 2, hosts=1)


def test_an_input_that_alone_does_not_fit_is_one_line(pairs):
    r = runner.invoke(app, ["plan", *pairs, "--host-memory", str(ALONE - 1)])
    assert r.exit_code == 2
    # 915,200 bytes = 893.75 KiB: the exact counts follow the rounded sizes.
    assert ALONE == 915_200
    assert r.stderr.strip() == (f"Error: {pairs[0]} alone needs 894 KiB (915,200 bytes) after "
                                "KSM, more than a host holds: 894 KiB (915,199 bytes)")


def test_marginal_footprints_are_exact_for_any_knobs(pairs):
    for mps, zero in ((2, False), (3, True), (256, False)):
        ksm = KsmSettings(max_page_sharing=mps, use_zero_pages=zero)
        model = HostModel(analyze([*pairs, *SAMPLES], ksm=ksm, jobs=1).contents, ksm)
        host = model.empty()
        for i in (4, 0, 5, 2):
            added = int(model.marginal(host, np.array([i]))[0])
            before = model.bytes(host)
            model.add(host, i)
            assert model.bytes(host) == before + added
            assert model.bytes(host) == model.footprint(host.inputs)
        model.remove(host, 0)
        assert model.bytes(host) == model.footprint([4, 5, 2])


def test_projection_is_measured_up_to_the_samples_then_a_model(pairs):
    result = analyze(pairs, jobs=1)
    proj = Projection(HostModel(result.contents, result.ksm), orders=50)
    table = proj.table([1, 2, 3, 4, 10, 100])
    assert list(table["measured"]) == [True] * 4 + [False] * 2
    # One guest alone, and all four together (any order), are exact.
    assert table["memory_after_bytes"].iloc[0] == ALONE
    assert table["memory_after_bytes"].iloc[3] == 2 * PAIR
    assert (table["memory_after_low_bytes"] <= table["memory_after_bytes"]).all()
    assert (table["memory_after_bytes"] <= table["memory_after_high_bytes"]).all()
    assert table["memory_before_bytes"].iloc[-1] == 100 * (SHARED + PRIVATE) * PS
    expected, cautious, hopeful = proj.fits(10 * ALONE)
    assert cautious <= expected <= hopeful
    assert proj.memory(expected)[0] <= 10 * ALONE < proj.memory(expected + 1)[0]


def test_plan_cli_writes_json_csv_and_pngs(pairs, tmp_path):
    r = runner.invoke(app, ["plan", *pairs, "--host-memory", str(PAIR), "--reserve", "0",
                            "--project", "2,8", "--json", "--csv", str(tmp_path / "csv"),
                            "--png", str(tmp_path / "plan")])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout, parse_constant=lambda c: 1 / 0)
    assert [row["hosts"] for row in data["summary"]] == [2, 4, 2]
    assert data["inputs_per_host"]["expected"] == 1  # two random samples are a sharing pair one time in three
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == [
        "assignments.csv", "hosts.csv", "projection.csv", "summary.csv"]
    for chart in ("hosts", "projection"):
        head = (tmp_path / f"plan-{chart}.png").read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", head[16:24])[0] <= 2000


def test_reserve_as_a_percentage(pairs):
    r = runner.invoke(app, ["plan", *pairs, "--host-memory", str(2 * PAIR), "--reserve", "50%"])
    assert r.exit_code == 0, r.output
    assert "Hosts, sharing-aware" in r.stdout
    lines = [line for line in r.stdout.splitlines() if line.startswith("  sharing-aware")]
    assert lines and lines[0].split()[1] == "2"


def test_plan_of_the_samples_from_the_readme():
    r = runner.invoke(app, ["plan", *SAMPLES, "--host-memory", "400KiB"])
    assert r.exit_code == 0, r.output
    assert "Hosts, sharing-aware" in r.stdout


def test_patterns_stay_exact_when_digests_collide(pairs, monkeypatch):
    # With a digest that says every class is alike, the row-by-row check must still keep
    # classes held differently apart: footprints must not change.
    from ksm_analyze import placement

    result = analyze([*pairs, *SAMPLES], ksm=KsmSettings(max_page_sharing=3), jobs=1)
    honest = HostModel(result.contents, result.ksm)
    monkeypatch.setattr(placement, "_mix", lambda x: x * np.uint64(0))
    fooled = HostModel(result.contents, result.ksm)
    assert honest.n_patterns < len(result.contents.classes())  # grouping works at all
    assert fooled.n_patterns > honest.n_patterns  # colliding classes were split again
    for group in ([0], [0, 2], [1, 3, 4], [0, 1, 2, 3, 4, 5]):
        assert fooled.footprint(group) == honest.footprint(group)


def test_the_projection_band_holds_a_larger_fleet_of_the_same_kind(tmp_path):
    # Guests share a base image, pairs of them a group's pages, and hold pages of their own.
    # Projected from 8 of them, 16 such guests must land inside the band.
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (100, PS), dtype=np.uint8)

    def fleet(count: int, prefix: str) -> list[str]:
        paths = []
        for g in range(count):
            group = np.random.default_rng(100 + g // 2).integers(0, 256, (20, PS), np.uint8)
            path = tmp_path / f"{prefix}{g}.raw"
            np.concatenate([base, group, rng.integers(0, 256, (30, PS), np.uint8)]).tofile(path)
            paths.append(str(path))
        return paths

    sampled = analyze(fleet(8, "s"), jobs=1)
    row = Projection(HostModel(sampled.contents, sampled.ksm), orders=100).table([16]).iloc[0]
    truth = analyze(fleet(16, "t"), jobs=1)
    actual = HostModel(truth.contents, truth.ksm).footprint(range(16))
    assert not row["measured"]
    assert row["memory_after_low_bytes"] <= actual <= row["memory_after_high_bytes"]
