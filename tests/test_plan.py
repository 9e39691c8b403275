"""Capacity planning: placements whose per-host memory is exactly what scan prints."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import PS, SAMPLES, runner, scan_memory

from ksm_analyze import KsmSettings, analyze
from ksm_analyze import ksm as ksm_module
from ksm_analyze.cli import app
from ksm_analyze.planning.placement import HostModel, host_tables
from ksm_analyze.planning.plan import plan
from ksm_analyze.planning.projection import Projection
from ksm_analyze.units import human_bytes

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


def _guest_file(folder: Path, name: str, numbers: np.ndarray) -> str:
    """A fingerprint file of a raw dump whose page k holds content ``numbers[k]`` (0: zero)."""
    from ksm_analyze.fleet import fingerprint_files
    from ksm_analyze.formats import DumpFormat
    from ksm_analyze.hashing.stage1 import Fingerprints
    from ksm_analyze.pages import Extent, PageState

    rows = len(numbers)
    content = np.stack([numbers, np.where(numbers > 0, numbers ^ np.uint64(0xA5A5), 0)],
                       axis=1).astype(np.uint64)
    fp = Fingerprints(path=name, format=DumpFormat.RAW, address_space="physical",
                      page_size=PS, prefix_bytes=128, extents=[Extent(0, rows, PageState.DATA, 0)],
                      info={}, warnings=[], addrs=np.arange(rows, dtype=np.uint64) * np.uint64(PS),
                      prefix=content[:, 1], state_pages={**dict.fromkeys(PageState, 0),
                                                         PageState.DATA: rows})
    path = folder / f"{name}{fingerprint_files.SUFFIX}"
    fingerprint_files.save(path, [fp], source={"path": name, "size": rows * PS, "mtime_ns": 0},
                           options={"prefix_bytes": 128}, contents=[content])
    return str(path)


def test_sampled_hosts_of_a_fleet_plan_are_what_scan_prints(tmp_path):
    # 36 guests in 3 families: 8 pages all hold, 30 of the family's own (each guest 20 to 30
    # of them), its own pages (some twice) and zero pages. Hosts of both methods, sampled,
    # each against scan of its inputs alone.
    rng = np.random.default_rng(5)
    files = []
    for g in range(36):
        family = 100 + 100 * (g % 3) + rng.choice(30, rng.integers(20, 31), replace=False)
        own = 10_000 + 100 * g + np.arange(rng.integers(20, 80))
        numbers = np.concatenate([np.arange(1, 9), family, own, own[:2], np.zeros(10, int)])
        files.append(_guest_file(tmp_path, f"g{g:02d}", rng.permutation(numbers).astype(
            np.uint64)))
    r = runner.invoke(app, ["plan", *files, "--host-memory", "2MiB", "--json", "-q"])
    assert r.exit_code == 0, r.output
    hosts = json.loads(r.stdout)["hosts"]
    sharing = [h for h in hosts if h["method"] == "sharing"]
    ffd = [h for h in hosts if h["method"] == "first_fit"]
    assert len(sharing) >= 4 and len(ffd) >= 4
    for h in (sharing[0], sharing[len(sharing) // 2], sharing[-1], ffd[1]):
        inputs = [str(tmp_path / f"{name}.ksmfp.parquet") for name in h["inputs"]]
        assert h["memory_after_bytes"] == scan_memory(inputs), h


def test_spread_over_a_fixed_number_of_hosts(pairs):
    analysis = analyze(pairs, jobs=1)
    result = plan(analysis, 4 * ALONE, hosts=2)
    hosts = result.hosts[result.hosts["method"] == "sharing"]
    assert len(hosts) == 2 and sorted(hosts["inputs"]) == [["A1.raw", "A2.raw"], ["B1.raw", "B2.raw"]]
    # Three hosts for two pairs: one pair kept together (it shares), the other split.
    three = plan(analysis, 4 * ALONE, hosts=3).hosts.query("method == 'sharing'")
    assert sorted(three["memory_after_bytes"]) == [ALONE, ALONE, PAIR]
    assert sorted(three["input_count"]) == [1, 1, 2]
    # Four: each alone.
    four = plan(analysis, 4 * ALONE, hosts=4).hosts.query("method == 'sharing'")
    assert list(four["memory_after_bytes"]) == [ALONE] * 4
    with pytest.raises(ValueError, match=r"do not fit on 1 host of .*: the sharing-aware "
                       r"placement needs 2 \(no placement can use fewer than 2\)"):
        plan(analysis, 3 * PAIR // 2, hosts=1)


def test_hosts_n_puts_an_input_on_every_host_and_never_saves_negative_hosts():
    # The two samples share little: as few hosts as possible is one; asked for two, each
    # host gets one of them (the bug: both on host 0, host 1 empty, "hosts saved -1").
    result = plan(analyze(SAMPLES, jobs=1), 1 << 30, hosts=2)
    hosts = result.hosts.query("method == 'sharing'")
    assert list(hosts["input_count"]) == [1, 1]
    for r in hosts.itertuples():
        assert r.memory_after_bytes == scan_memory([p for p in SAMPLES if Path(p).name in r.inputs])
    summary = result.summary.set_index("method")
    assert summary.loc["first_fit", "hosts"] == 1 and summary.loc["sharing", "hosts"] == 2
    data = result.to_dict()
    assert data["hosts_asked"] == 2
    sharing = next(row for row in data["summary"] if row["method"] == "sharing")
    assert sharing["hosts_saved"] is None and sharing["hosts_saved_percent"] is None
    assert [row["hosts_saved"] for row in data["summary"][1:]] == [0, 0]  # integers
    assert all(type(row["hosts_saved"]) is int for row in data["summary"][1:])
    r = runner.invoke(app, ["plan", *SAMPLES, "--host-memory", "1GiB", "--hosts", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert "-1" not in r.stdout and "-100%" not in r.stdout
    assert "spread over 2 hosts as asked (--hosts 2)" in r.stdout


def test_spread_balances_memory_over_the_hosts(tmp_path):
    # Four inputs of 40, 30, 20 and 10 random pages (nothing shared): over two hosts,
    # 40 + 10 and 30 + 20, 50 pages each, the balanced split (not 40 + 30 + 20 and 10).
    rng = np.random.default_rng(3)
    paths = []
    for n in (10, 40, 20, 30):
        paths.append(str(tmp_path / f"p{n}.raw"))
        rng.integers(0, 256, (n, PS), dtype=np.uint8).tofile(paths[-1])
    hosts = plan(analyze(paths, jobs=1), 1 << 30, hosts=2).hosts.query("method == 'sharing'")
    assert sorted(hosts["inputs"]) == [["p10.raw", "p40.raw"], ["p20.raw", "p30.raw"]]
    assert list(hosts["memory_after_bytes"]) == [50 * (PS + RMAP)] * 2


def test_spread_keeps_copies_of_one_guest_together(tmp_path):
    # Four near-copies of each sample (one page changed each): over two hosts, each host
    # takes the copies of one guest; mixing them would lose most of what they share.
    rng = np.random.default_rng(4)
    paths = []
    for k in range(8):
        src = Path(SAMPLES[k % 2])
        data = bytearray(src.read_bytes())
        at = len(data) - (k + 1) * PS  # a page of the guest's memory, past any header
        data[at:at + PS] = rng.integers(0, 256, PS, dtype=np.uint8).tobytes()
        paths.append(str(tmp_path / f"{src.stem}-{k}{src.suffix}"))
        Path(paths[-1]).write_bytes(bytes(data))
    result = plan(analyze(paths, jobs=1), 1 << 30, hosts=2)
    hosts = result.hosts.query("method == 'sharing'")
    assert sorted(hosts["inputs"]) == [["vm-a-0.elf", "vm-a-2.elf", "vm-a-4.elf", "vm-a-6.elf"],
                                       ["vm-b-1.raw", "vm-b-3.raw", "vm-b-5.raw", "vm-b-7.raw"]]
    for r in hosts.itertuples():
        assert r.memory_after_bytes == scan_memory([p for p in paths
                                                    if Path(p).name in r.inputs])


def test_more_hosts_than_inputs_is_one_line():
    r = runner.invoke(app, ["plan", *SAMPLES, "--host-memory", "1GiB", "--hosts", "3", "-q"])
    assert r.exit_code == 2
    assert r.stderr == ("Error: --hosts 3 is more hosts than the 2 inputs: every host needs "
                        "at least one\n")


def test_a_split_of_a_packed_placement_fills_every_host(pairs, monkeypatch):
    # The fallback of spread(): a placement on fewer hosts, split until each of N holds one.
    from ksm_analyze.planning import placement
    from ksm_analyze.planning.placement import place, split, spread

    model = HostModel(analyze(pairs, jobs=1).contents, KsmSettings())
    packed = place(model, 4 * ALONE).hosts
    assert packed == [[0, 1, 2, 3]]
    for n in (2, 3, 4):
        hosts = split(model, packed, n)
        assert len(hosts) == n and all(hosts)
        assert sorted(i for h in hosts for i in h) == [0, 1, 2, 3]
        assert all(model.footprint(h) <= 4 * ALONE for h in hosts)
    # spread() still fills every host where its balanced greedy finds no room.
    monkeypatch.setattr(placement, "_balanced", lambda *args: None)
    hosts = spread(model, 4 * ALONE, 3).hosts
    assert len(hosts) == 3 and all(hosts) and sorted(i for h in hosts for i in h) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="do not fit on 3 hosts"):
        spread(model, ALONE, 3)  # each input alone fits; four need four hosts


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
            # the same against several hosts at once (sharing-aware best-fit's pass)
            alone = model.footprint([i])
            assert model.marginals([host, model.empty()], i).tolist() == [added, alone]
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
        "assignments.csv", "hosts.csv", "marginal.csv", "overcommit.csv", "projection.csv",
        "summary.csv"]
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

    result = analyze([*pairs, *SAMPLES], ksm=KsmSettings(max_page_sharing=3), jobs=1)
    honest = HostModel(result.contents, result.ksm)
    monkeypatch.setattr(ksm_module, "_mix64", lambda x: x * np.uint64(0))
    fooled = HostModel(result.contents, result.ksm)
    assert honest.n_patterns < len(result.contents.classes())  # grouping works at all
    assert fooled.n_patterns > honest.n_patterns  # colliding classes were split again
    for group in ([0], [0, 2], [1, 3, 4], [0, 1, 2, 3, 4, 5]):
        assert fooled.footprint(group) == honest.footprint(group)


def test_host_tables_are_the_subsets_of_the_hosts(pairs):
    # One pass for every host of a placement must give what subset() gives host by host,
    # also for a host whose inputs are not in table order.
    from ksm_analyze.planning.placement import host_tables

    table = analyze([*pairs, *SAMPLES], jobs=1).contents
    hosts = [[0, 2], [5, 1, 3], [4]]
    got = list(host_tables(table, hosts))
    assert len(got) == 3
    for inputs, sub in zip(hosts, got, strict=True):
        want = table.subset(inputs)
        assert sub.names == want.names and len(want.content)
        for a, b in ((sub.content, want.content), (sub.owner, want.owner),
                     (sub.pages, want.pages)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        assert sub.counters(KsmSettings()) == want.counters(KsmSettings())
    with pytest.raises(ValueError, match="on two hosts"):
        list(host_tables(table, [[0, 1], [1, 2]]))


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


_PLURAL_AFTER_ONE = r"\b1 (inputs|hosts|guests|files|merges|processes|base addresses)\b"


def test_one_guest_and_one_host_are_singular():
    # vm-a.elf alone: 272 KiB after KSM, 2 MiB before (docs/planning.md): it fits a 400 KiB
    # host, two like it (544 KiB) do not, and its copy-on-write worst case exceeds the host.
    r = runner.invoke(app, ["plan", SAMPLES[0], "--host-memory", "400KiB", "--project", "2",
                            "-q"])
    assert r.exit_code == 0, r.output
    assert "  1 input like these fits in 400 KiB (1 to 1 by the band)." in r.stdout
    assert "Warning: 1 of 1 sharing-aware host (host 0) would need more than its " in r.stdout
    assert not re.search(_PLURAL_AFTER_ONE, r.output), r.output


def test_an_input_that_does_not_fit_one_host_says_host():
    r = runner.invoke(app, ["plan", *SAMPLES, "--host-memory", "400KiB", "--hosts", "1"])
    assert r.exit_code != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not re.search(_PLURAL_AFTER_ONE, r.stderr), r.stderr


def _summary_rows(page: str) -> dict[str, str]:
    """The report's summary table (between its heading and the charts) as label: value."""
    section = page[page.index('id="summary"'):page.index('id="charts"')]
    return dict(re.findall(r"<tr><th>([^<]*)</th><td>([^<]*)</td></tr>", section))


def test_report_summary_leads_with_the_hosts_each_method_needs(pairs, tmp_path):
    out = tmp_path / "report"
    r = runner.invoke(app, ["report", *pairs, "-o", str(out), "--host-memory", str(PAIR),
                            "--project", "2,8"])
    assert r.exit_code == 0, r.output
    page = (out / "index.html").read_text()
    rows = _summary_rows(page)
    size = human_bytes(PAIR)
    hosts_caption = ("Each host&#x27;s memory after KSM, with and without sharing-aware "
                     "placement (plan_hosts.png)")
    projection_caption = ("Host memory for more inputs like these, with and without KSM "
                          "(plan_projection.png)")
    for caption in (hosts_caption, projection_caption):
        assert f"<figcaption>{caption}</figcaption>" in page
    # Counted by hand (above): the pairs fill two hosts; first-fit puts one input per host.
    assert rows[f"Hosts of {size} needed, sharing-aware"] == (
        f"2, saving 2 hosts (50%) against first-fit; memory after KSM {human_bytes(2 * PAIR)}")
    assert rows[f"Hosts of {size} needed, first-fit (ignores sharing)"] == (
        f"4; memory after KSM {human_bytes(4 * ALONE)}")
    assert rows[f"Hosts of {size}, lower bound (one infinite host)"] == "2"
    assert rows[f"Inputs like these per host of {size}"].startswith("1 (")
    # The overcommit ratio, by hand: guests of both pairs mixed at random fit one per host
    # at the band's low end: one guest's 220 pages over the host.
    assert rows[f"Overcommit ratio hosts of {size} support"].startswith(
        f"{220 * PS / PAIR:.2f} (expected ")
    assert "Set ram_allocation_ratio to at most 0.89" in page
    assert (out / "plan_overcommit.csv").read_text().startswith("family,inputs,")
    assert next(iter(rows)).startswith("Hosts of")  # the plan comes first
    # Without --host-memory, no plan in the summary.
    r = runner.invoke(app, ["report", *pairs, "-o", str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    assert not any("Hosts" in k for k in _summary_rows((tmp_path / "plain" / "index.html")
                                                        .read_text()))


# -- charts: the Figure objects ----------------------------------------------------------


def _axes_fraction(ax, y: float) -> float:
    """Where the height y (data units) sits on the axis: 0 at the bottom, 1 at the top."""
    return float(ax.transAxes.inverted().transform(ax.transData.transform((0, y)))[1])


@pytest.fixture(scope="module")
def samples_analysis():
    return analyze(SAMPLES, jobs=1)


def test_host_chart_is_scaled_for_the_bars_with_the_worst_case_written(samples_analysis):
    host = 400 * 1024
    result = plan(samples_analysis, host)
    fig = result.plot_hosts()
    panels = [ax for ax in fig.axes if ax.patches]
    assert len(panels) == 2  # sharing-aware, first-fit
    # Before KSM each sample is its whole 2 MiB (the raw one's file size): five hosts' worth
    # of memory, so on a scale for the bars it is written, not drawn.
    worst = human_bytes(os.path.getsize(next(s for s in SAMPLES if s.endswith(".raw"))))
    assert worst == "2 MiB"
    for ax in panels:
        capacity = next(line for line in ax.lines if line.get_ydata()[0] > 0).get_ydata()[0]
        # The host's memory (where the bars end) fills most of the axis.
        assert 0.75 <= _axes_fraction(ax, capacity) < 1
        tops = [p.get_y() + p.get_height() for p in ax.patches]
        assert max(tops) <= ax.get_ylim()[1]
        # Each host's worst case, above the scale, written with its size.
        hosts = len(ax.get_xticks())
        assert [t.get_text() for t in ax.texts].count(f"\N{UPWARDS ARROW} {worst}") == hosts
        # The bars are named by their inputs: every input once per method.
        labels = " ".join(t.get_text() for t in ax.get_xticklabels())
        for name in ("vm-a.elf", "vm-b.raw"):
            assert labels.count(name) == 1, labels
    title = fig.get_suptitle()
    assert "merge=all" in title and "with zero pages" in title
    assert "max_page_sharing=256" in title


def test_projection_shows_the_with_ksm_curve_and_a_small_hosts_capacity(samples_analysis):
    result = plan(samples_analysis, 400 * 1024, project=[1, 2, 10, 100])
    ax = result.plot_projection().axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    capacity = next(v for k, v in lines.items() if k.startswith("host capacity"))
    with_ksm = lines["with KSM (mean over random orders)"]
    # 400 KiB against 100 guests of 2 MiB (200 MiB without KSM): on a linear axis the
    # capacity and the with-KSM curve lie along the bottom 7%.
    assert 0.1 <= _axes_fraction(ax, capacity.get_ydata()[0]) <= 0.9
    heights = [_axes_fraction(ax, y) for y in with_ksm.get_ydata()]
    assert all(0 < h < 1 for h in heights)
    assert max(heights) - min(heights) >= 0.3  # the curve spreads over the axis
    assert "merge=all, with zero pages" in ax.get_title()


def test_every_plan_chart_names_the_policy(samples_analysis):
    zero_only = analyze(SAMPLES, jobs=1, merge="zero-only")
    result = plan(zero_only, 600 * 1024, zero_pages=False, project=[1, 4])
    hosts = result.plot_hosts().get_suptitle()
    projection = result.plot_projection().axes[0].get_title()
    for title in (hosts, projection):
        assert "merge=zero-only" in title and "without zero pages" in title, title
        assert "max_page_sharing=256" in title, title


def test_projection_axis_spans_the_counts_asked_for(samples_analysis):
    # 8 MiB holds more guests than the 4 projected: that number is in the title, and the
    # x axis stays on the counts asked for.
    result = plan(samples_analysis, 8 * 1024 * 1024, project=[1, 2, 4])
    assert result.fits is not None and result.fits[0] > 4
    ax = result.plot_projection().axes[0]
    assert ax.get_xlim()[1] < 5
    assert f"{result.fits[0]:,} fit in 8 MiB" in ax.get_title()
    assert all(float(t).is_integer() for t in ax.get_xticks() if 1 <= t <= 4)


def test_scan_text_of_a_fleet_shows_its_first_50_inputs_and_counts_the_others(tmp_path):
    files = [_guest_file(tmp_path, f"g{g:02d}", np.arange(1, 5, dtype=np.uint64) + g)
             for g in range(53)]
    r = runner.invoke(app, ["scan", *files, "-q"])
    assert r.exit_code == 0, r.output
    inputs = r.stdout.split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in inputs[2:52]] == [f"g{g:02d}" for g in range(50)]
    assert inputs[52] == "  ... and 3 more inputs (every input: --json, --csv)"
    few = runner.invoke(app, ["scan", *files[:50], "-q"]).stdout
    assert "more inputs" not in few and "  g49 " in few


# Placement at fleet size (issue 21): the sharing-aware placement never needs more hosts than
# first-fit, on core tables made here (no dumps: cheap).

def _core_table(unique: list[int], held: dict[int, dict[int, int]] | None = None,
                zero: list[int] | None = None):
    """The core table of inputs holding ``unique[i]`` pages of their own, ``zero[i]`` zero
    pages and ``held[content][i]`` pages of each shared content."""
    from ksm_analyze.columns import Columns
    from ksm_analyze.content_table import ContentTable

    n = len(unique)
    rows = sorted((c, i, p) for c, by in (held or {}).items() for i, p in by.items())
    content, owner, pages = (np.array([r[k] for r in rows], dt) for k, dt in
                             ((0, np.int64), (1, np.int32), (2, np.int64)))
    cols = Columns({"input": [f"/d/g{i:02}.raw" for i in range(n)],
                    "unique_pages": np.array(unique, np.int64),
                    "zero_pages": np.array(zero or [0] * n, np.int64),
                    "domain": np.zeros(n, np.int64)})
    return ContentTable(cols, content, owner, pages, PS)


def _hand_memory(held: dict[int, dict[int, int]], unique: list[int], zero: list[int],
                 inputs: list[int]) -> int:
    """Memory after KSM of a host of ``inputs``, from first principles (default knobs: 256
    pages a KSM page, zero pages merged as any content): a content held c times keeps
    ceil(c / 256) pages, a page of its own one; every scanned page has a 64-byte rmap_item."""
    copies = [sum(by.get(i, 0) for i in inputs) for by in held.values()]
    z = sum(zero[i] for i in inputs)
    left = sum(-(-c // 256) for c in copies) + sum(unique[i] for i in inputs) + -(-z // 256)
    scanned = sum(copies) + sum(unique[i] for i in inputs) + z
    return left * PS + scanned * RMAP


def test_sharing_aware_placement_does_not_fill_hosts_with_the_smallest_first():
    # Nothing shared, hosts of 100 pages (with their rmap_items): first-fit decreasing packs
    # 50 + 50 and 30 + 30 + 20 + 20 on 2 hosts. A greedy that seeds a host with the largest
    # input and then adds the one adding least takes 50 + 20 + 20, then 50 + 30, then 30:
    # 3 hosts (the placement before issue 21).
    from ksm_analyze.planning.placement import first_fit, place

    unique = [20, 50, 30, 20, 50, 30]
    model = HostModel(_core_table(unique), KsmSettings())
    page = PS + RMAP
    ffd, sharing = first_fit(model, 100 * page).hosts, place(model, 100 * page).hosts
    assert len(ffd) == 2 and len(sharing) == 2
    assert sorted(i for h in sharing for i in h) == list(range(6))
    assert [model.footprint(h) for h in sharing] == [100 * page] * 2  # 200 pages in 2 x 100


def _fleet_table(seed: int):
    """12 to 23 inputs of mixed sizes in families: every input holds a base of 1 to 4
    contents; each family shares 2 to 20 contents of its own (each held by a member with
    probability 0.8, one or two pages); 10 to 299 pages of its own, 0 to 9 zero pages."""
    gen = np.random.default_rng(seed)
    n = 12 + seed % 12
    family = gen.integers(0, n // 4, n)
    held: dict[int, dict[int, int]] = {c: dict.fromkeys(range(n), 1)
                                       for c in range(int(gen.integers(1, 5)))}
    for f in range(n // 4):
        members = np.flatnonzero(family == f)
        for c in range(int(gen.integers(2, 21))):
            by = {int(i): int(gen.integers(1, 3)) for i in members if gen.random() < 0.8}
            if sum(by.values()) >= 2:  # a content held once is a page of its own
                held[1000 * (f + 1) + c] = by
    unique = gen.integers(10, 300, n).tolist()
    zero = gen.integers(0, 10, n).tolist()
    return held, unique, zero


@pytest.mark.parametrize("seed", range(8))
def test_sharing_aware_never_needs_more_hosts_than_first_fit(seed):
    # On random fleets of mixed sizes, at several host sizes: at most first-fit's hosts, each
    # input on one host, and each host's memory what it is from first principles.
    from ksm_analyze.planning.placement import first_fit, place

    held, unique, zero = _fleet_table(seed)
    table = _core_table(unique, held, zero)
    model = HostModel(table, KsmSettings())
    everything = _hand_memory(held, unique, zero, list(range(len(unique))))
    for share in (0.12, 0.2, 0.35, 0.6):
        capacity = max(int(model.alone.max()), int(everything * share))
        hosts = place(model, capacity).hosts
        assert len(hosts) <= len(first_fit(model, capacity).hosts), (seed, share)
        assert sorted(i for h in hosts for i in h) == list(range(len(unique)))
        for h in hosts:
            assert model.footprint(h) == _hand_memory(held, unique, zero, h) <= capacity


def test_consolidation_empties_a_host_that_is_not_the_first():
    # Three hosts of 42, 12 and 42 pages (two contents shared by all, the third input holding
    # one of them twice): the emptiest, the second, fits with the first on a host of 52
    # pages and 54 rmap_items (with the third: 55), and is dissolved. (Before issue 21 the
    # host was looked up by value, comparing arrays: a ValueError.)
    from ksm_analyze.planning.placement import _dissolve

    base = {0: {0: 1, 1: 1, 2: 1}, 1: {0: 1, 1: 1, 2: 2}}
    model = HostModel(_core_table([40, 10, 40], base), KsmSettings())
    capacity = _hand_memory(base, [40, 10, 40], [0, 0, 0], [0, 1])
    assert capacity == 52 * PS + 54 * RMAP
    hosts = [model.empty() for _ in range(3)]
    for i, host in enumerate(hosts):
        model.add(host, i)
    _dissolve(model, hosts, capacity)
    assert sorted(sorted(h.inputs) for h in hosts) == [[0, 1], [2]]
    assert [model.bytes(h) for h in hosts] == [capacity, 42 * PS + 43 * RMAP]


def test_patterns_and_host_tables_a_few_rows_at_a_time(pairs, monkeypatch):
    # Issue 21: the classes' digests, their row-by-row check and the hosts' rows are found a
    # few sparse rows at a time (whole classes each): the same patterns, the same footprints
    # (digests colliding or not), and host_tables still gives what subset() does.
    from ksm_analyze.planning import placement

    result = analyze([*pairs, *SAMPLES], ksm=KsmSettings(max_page_sharing=3), jobs=1)
    table, groups = result.contents, ([0], [0, 2], [1, 3, 4], [0, 1, 2, 3, 4, 5])
    whole = HostModel(table, result.ksm)
    assert len(table.content) > 6  # many chunks below
    for rows_at_once in (1, 3):
        monkeypatch.setattr("ksm_analyze.ksm.ROWS_AT_ONCE", rows_at_once)
        monkeypatch.setattr(placement, "ROWS_AT_ONCE", rows_at_once)
        chunked = HostModel(table, result.ksm)
        assert chunked.weight.tolist() == whole.weight.tolist()
        assert [chunked.footprint(g) for g in groups] == [whole.footprint(g) for g in groups]
        hosts = [[0, 2], [5, 1, 3], [4]]
        for inputs, sub in zip(hosts, host_tables(table, hosts), strict=True):
            want = table.subset(inputs)
            assert all(np.array_equal(a, b) for a, b in ((sub.content, want.content),
                                                          (sub.owner, want.owner),
                                                          (sub.pages, want.pages)))
    monkeypatch.setattr(ksm_module, "_mix64", lambda x: x * np.uint64(0))
    fooled = HostModel(table, result.ksm)
    assert fooled.n_patterns > whole.n_patterns
    assert [fooled.footprint(g) for g in groups] == [whole.footprint(g) for g in groups]
