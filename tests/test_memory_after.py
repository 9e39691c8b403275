"""One definition of "memory after KSM": what the host needs, rmap_items included, the same
in ``scan`` (text, JSON, CSV, API), ``plan``, the HTML report and the savings chart."""

from __future__ import annotations

import csv
import json
import re

import pytest
from conftest import PS, SAMPLES, runner

import ksm_analyze
from ksm_analyze.cli import app
from ksm_analyze.render.report import render_html
from ksm_analyze.units import human_bytes

RMAP_ITEM = 64  # bytes: sizeof(struct ksm_rmap_item) on 64-bit, Documentation/mm/ksm.rst
SCENARIOS = ("with_zero_pages", "without_zero_pages")


def _json(*args: str) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def scan():
    return _json("scan", *SAMPLES, "-j", "1")


@pytest.fixture(scope="module")
def one_host():
    """``plan`` of the samples on a host big enough for both: one host each method."""
    plan = _json("plan", *SAMPLES, "--host-memory", "1GiB", "-j", "1")
    hosts = [h for h in plan["hosts"] if h["method"] == "sharing"]
    assert len(hosts) == 1
    return hosts[0]


def test_scan_headline_is_plans_host_after_ksm(scan, one_host, tmp_path):
    after = scan["savings"]["memory_after"]["with_zero_pages_bytes"]
    assert after == one_host["memory_after_bytes"]
    # The same figure in the API, the CSV and the text scan prints.
    api = ksm_analyze.analyze(SAMPLES, jobs=1)
    assert api.savings.at["memory_after", "with_zero_pages_bytes"] == after
    r = runner.invoke(app, ["scan", *SAMPLES, "-j", "1", "--csv", str(tmp_path)])
    assert r.exit_code == 0, r.output
    with (tmp_path / "savings.csv").open() as f:
        rows = {row["item"]: row for row in csv.DictReader(f)}
    assert int(rows["memory_after"]["with_zero_pages_bytes"]) == after
    text = runner.invoke(app, ["scan", *SAMPLES, "-j", "1"]).stdout
    line = re.search(r"^  memory after KSM +(\S+ \S+) ", text, re.MULTILINE)
    assert line and line.group(1) == human_bytes(after)
    # The headroom ratio divides by the same figure.
    before = scan["savings"]["memory_before"]["with_zero_pages_bytes"]
    ratio = re.search(r"([\d.]+)x what it needs after KSM", text)
    assert ratio and ratio.group(1) == f"{before / after:.1f}"


def test_memory_after_is_pages_left_plus_rmap_items(scan):
    sav, host = scan["savings"], scan["host"]
    for s in SCENARIOS:
        b = {item: row[f"{s}_bytes"] for item, row in sav.items()}
        assert b["memory_after"] == b["pages_after_merging"] + b["rmap_overhead"], s
        # Pages left after merging: what was not saved; the KSM pages plus the unmerged pages
        # of the counters (a dump has no volatile pages).
        assert b["pages_after_merging"] == b["memory_before"] - b["saved"], s
        left = host["pages_shared"][s] + host["pages_unshared"][s]
        assert sav["pages_after_merging"][f"{s}_pages"] == left, s
        assert b["pages_after_merging"] == left * PS, s
        # Not whole pages: no pages value, rather than a rounded one.
        assert sav["memory_after"][f"{s}_pages"] is None
        assert sav["memory_after"][f"{s}_percent"] == pytest.approx(
            100 * b["memory_after"] / b["memory_before"])
    # The histogram (another path) leaves the same pages after merging, zero pages present.
    assert (sum(r["bytes_after_merging"] for r in scan["histogram"])
            == sav["pages_after_merging"]["with_zero_pages_bytes"])


@pytest.mark.parametrize("options", [(), ("--use-zero-pages",), ("--max-page-sharing", "2")])
def test_rmap_overhead_is_64_bytes_per_rmap_item_and_profit_closes_the_sum(options):
    data = _json("scan", *SAMPLES, "-j", "1", *options)
    sav, host = data["savings"], data["host"]
    for s in SCENARIOS:
        c = {name: row[s] for name, row in host.items()}
        assert sav["rmap_overhead"][f"{s}_bytes"] == c["ksm_rmap_items"] * RMAP_ITEM
        # The kernel's general_profit, from its own formula over the counters ...
        profit = (c["pages_sharing"] + c["ksm_zero_pages"]) * PS - c["ksm_rmap_items"] * RMAP_ITEM
        assert c["general_profit"] == profit
        # ... is exactly what KSM takes off the host: memory before minus memory after.
        before, after = sav["memory_before"][f"{s}_bytes"], sav["memory_after"][f"{s}_bytes"]
        assert before - after == profit, (options, s)


def test_sample_figures_by_hand(scan):
    # Both samples: 512 pages, 419 of them zero, every page present and scanned, so 1,024
    # rmap_items with zero pages present, 2 x 93 = 186 without.
    sav = scan["savings"]
    assert sav["rmap_overhead"]["with_zero_pages_bytes"] == 1024 * RMAP_ITEM
    assert sav["rmap_overhead"]["without_zero_pages_bytes"] == 186 * RMAP_ITEM


def test_scan_text_shows_the_split_that_adds_up(scan):
    text = runner.invoke(app, ["scan", *SAMPLES, "-j", "1"]).stdout
    sav = scan["savings"]
    for label, item in (("memory after KSM", "memory_after"),
                        ("  pages left after merging", "pages_after_merging"),
                        ("  rmap_item overhead", "rmap_overhead")):
        shown = re.search(rf"^  {label} +(\S+ \S+) \(\S+\) +(\S+ \S+) ", text, re.MULTILINE)
        assert shown, label
        assert shown.groups() == tuple(human_bytes(sav[item][f"{s}_bytes"]) for s in SCENARIOS)


def test_report_summary_and_savings_chart_use_the_figure(one_host):
    result = ksm_analyze.analyze(SAMPLES, jobs=1)
    after = one_host["memory_after_bytes"]
    page = render_html(result, {})
    assert f"→ {human_bytes(after)} (" in page
    # The waterfall: before, minus each saving, plus the rmap_items, lands on memory after.
    fig = result.plot_savings()
    ax = fig.axes[0]  # zero pages present
    bars = ax.patches
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[-2:] == ["rmap_item\noverhead", "memory\nafter KSM"]
    sav = result.savings
    scale = sav.at["memory_before", "with_zero_pages_bytes"] / bars[0].get_height()
    assert bars[-1].get_height() * scale == pytest.approx(after)
    assert bars[-2].get_height() * scale == pytest.approx(
        sav.at["rmap_overhead", "with_zero_pages_bytes"])
    assert bars[-1].get_height() == pytest.approx(bars[-2].get_y() + bars[-2].get_height())
