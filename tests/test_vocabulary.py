"""One vocabulary and one unit policy: counts are integers, lists are lists, every key is
labelled, and a size a person reads is in KiB/MiB/GiB (docs/glossary.md)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import series_target
from conftest import ROOT, SAMPLES, runner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.summary import SCENARIOS
from ksm_analyze.units import human_bytes, size_text

# The sample facts (tests/sample_dumps.json): each sample is 512 pages, 419 of them zero.
PAGES, ZERO = 512, 419
NAMES = [Path(p).name for p in SAMPLES]


def _json(*args: str) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


NOT_COUNTS = (*SCENARIOS, "use_zero_pages")  # column names, and a KSM knob (a flag)


def _page_counts(value):
    """Every value of a JSON value whose key names a count of pages (``pages``, ``*_pages``;
    not the scenarios' names, which end in ``_pages`` but name a column)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict | list):
                yield from _page_counts(v)
            elif (k == "pages" or k.endswith("_pages")) and k not in NOT_COUNTS:
                yield v
    elif isinstance(value, list):
        for v in value:
            yield from _page_counts(v)


@pytest.fixture(scope="module")
def scan_json():
    return _json("scan", *SAMPLES)


def test_scan_json_page_counts_are_integers(scan_json):
    counts = list(_page_counts(scan_json))
    assert len(counts) > 100 and all(v is None or type(v) is int for v in counts), counts
    before = scan_json["savings"]["memory_before"]
    assert before["with_zero_pages_pages"] == 2 * PAGES
    assert before["without_zero_pages_pages"] == 2 * (PAGES - ZERO)
    assert scan_json["savings"]["rmap_overhead"]["with_zero_pages_pages"] is None
    # Every page KSM scans gets an rmap_item, zero pages included.
    assert scan_json["convergence"]["scanned_pages"] == 2 * PAGES


def test_scan_csv_page_counts_are_integers(tmp_path):
    r = runner.invoke(app, ["scan", *SAMPLES, "--csv", str(tmp_path)])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "savings.csv", newline="") as f:
        savings = {row["item"]: row for row in csv.DictReader(f)}
    assert savings["memory_before"]["with_zero_pages_pages"] == str(2 * PAGES)  # not 1024.0
    assert savings["rmap_overhead"]["with_zero_pages_pages"] == ""
    with open(tmp_path / "convergence.csv", newline="") as f:
        conv = {row["item"]: row for row in csv.DictReader(f)}
    assert conv["scanned_pages"]["value"] == str(2 * PAGES)  # not 1024.0
    assert conv["full_scans_to_steady_state"]["value"] == "2"


def test_the_savings_frame_holds_page_counts_as_integers():
    savings = analyze(SAMPLES, jobs=1).savings
    assert str(savings["with_zero_pages_pages"].dtype) == "Int64"
    assert savings.at["memory_before", "with_zero_pages_pages"] == 2 * PAGES


def test_scan_json_copies_per_input_are_a_mapping(scan_json, tmp_path):
    zero = scan_json["top_contents"][0]  # the zero page: 419 in each sample
    assert (zero["content_class"], zero["inputs"]) == ("zero", dict.fromkeys(NAMES, ZERO))
    r = runner.invoke(app, ["scan", *SAMPLES, "--csv", str(tmp_path)])
    assert r.exit_code == 0, r.output
    with open(tmp_path / "top_contents.csv", newline="") as f:
        assert next(csv.DictReader(f))["inputs"] == " ".join(f"{n}:{ZERO}" for n in NAMES)


@pytest.fixture(scope="module")
def plan_json():
    return _json("plan", *SAMPLES, "--host-memory", "1MiB", "--project", "2,5")


def test_plan_json_host_inputs_are_a_list(plan_json):
    assert [h["inputs"] for h in plan_json["hosts"]] == [NAMES, NAMES]


def test_plan_json_keys_are_labelled_with_their_unit(plan_json):
    assert plan_json["host_memory_bytes"] == plan_json["capacity_bytes"] == 1 << 20
    assert plan_json["host_memory_human"] == plan_json["capacity_human"] == "1 MiB"
    assert "fits" not in plan_json and "host_memory" not in plan_json
    fit = plan_json["inputs_per_host"]
    assert set(fit) == {"expected", "cautious", "hopeful"}
    assert all(type(v) is int for v in fit.values())
    assert fit["cautious"] <= fit["expected"] <= fit["hopeful"]
    assert [row["input_count"] for row in plan_json["projection"]] == [2, 5]


def test_plan_json_without_a_projection_says_null(tmp_path):
    assert _json("plan", *SAMPLES, "--host-memory", "1MiB")["inputs_per_host"] is None


def test_plan_csv_has_no_unnamed_column(tmp_path):
    r = runner.invoke(app, ["plan", *SAMPLES, "--host-memory", "1MiB", "--project", "2",
                            "--csv", str(tmp_path)])
    assert r.exit_code == 0, r.output
    for name in ("summary", "hosts", "assignments", "projection"):
        with open(tmp_path / f"{name}.csv", newline="") as f:
            header = next(csv.reader(f))
        assert all(header) and header[0] in ("method", "input_count"), (name, header)
    with open(tmp_path / "hosts.csv", newline="") as f:
        assert next(csv.DictReader(f))["inputs"] == " ".join(NAMES)


# --- sizes a person reads ----------------------------------------------------------------

@pytest.mark.parametrize(("n", "text"), [
    (0, "0 bytes"), (56, "56 bytes"), (1024, "1 KiB"), (1536, "1.5 KiB"), (1 << 20, "1 MiB"),
    (1_000_001, "977 KiB (1,000,001 bytes)"), (102_400, "100 KiB"),
])
def test_size_text(n, text):
    assert size_text(n) == text


@pytest.mark.parametrize(("n", "text"), [
    (1023, "1023 B"), (1000 * 1024, "1000 KiB"), (1023 * 1024, "1023 KiB"),
    # 1 GiB less 480 KiB (a plan's free memory): 1023.53 MiB is 0.9995 GiB, "1 GiB" to
    # three digits, never "1.02e+03 MiB"
    ((1 << 30) - 480 * 1024, "1 GiB"), (999 * 1024, "999 KiB"), (998 * 1024 + 400, "998 KiB"),
])
def test_sizes_from_1000_up_are_whole_numbers_not_exponents(n, text):
    assert human_bytes(n) == text


def _error(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code in (1, 2), r.output
    return r.stderr.strip()


def test_an_input_too_large_for_a_host_is_said_in_human_units():
    line = _error("plan", SAMPLES[0], "--host-memory", "100KiB")
    assert re.fullmatch(r"Error: \S+vm-a\.elf alone needs [\d.]+ KiB after KSM, more than a "
                        r"host holds: 100 KiB", line), line


def test_a_reserve_larger_than_the_host_is_said_in_human_units():
    assert _error("plan", SAMPLES[0], "--host-memory", "1MiB", "--reserve", "2MiB") == (
        "Error: --reserve '2MiB' (2 MiB) leaves no memory of a host of 1 MiB (--host-memory): "
        "give less")


def test_the_worst_case_warning_is_in_human_units(plan_json):
    # Memory before KSM of both samples: 2 x 512 pages of 4 KiB = 4 MiB.
    assert plan_json["warnings"] == [(
        "1 of 1 sharing-aware host (host 0) would need more than its 1 MiB if every "
        "merged page were written again (the copy-on-write worst case is memory before KSM, "
        "up to 4 MiB): keep headroom or swap")]


def test_report_plan_tables_show_sizes_in_human_units(tmp_path):
    r = runner.invoke(app, ["report", *SAMPLES, "-o", str(tmp_path), "-q",
                            "--host-memory", "1MiB"])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "index.html").read_text()
    plan = page[page.index('id="plan"'):]
    assert "<td>4 MiB</td>" in plan  # memory before KSM of the one host: 2 x 512 x 4 KiB
    assert "4,194,304" not in page
    assert "<td>vm-a.elf, vm-b.raw</td>" in plan



# --- the glossary names what the outputs use ---------------------------------------------

def _glossary() -> list[tuple[str, list[str]]]:
    """(text name, [keys]) of every row of docs/glossary.md's name tables."""
    rows = []
    for line in (ROOT / "docs" / "glossary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or cells[:2] == ["text", "key"]:
            continue
        keys = re.findall(r"`([a-z0-9_]+)`", cells[1])
        assert keys, f"docs/glossary.md: a row without a key: {line}"
        rows.append((cells[0], keys))
    return rows


def _keys(value) -> set[str]:
    """Every key of a JSON value, and the values of its ``method`` fields (names too)."""
    if isinstance(value, dict):
        out = set(value)
        if isinstance(value.get("method"), str):
            out.add(value["method"])
        for v in value.values():
            out |= _keys(v)
        return out
    if isinstance(value, list):
        return set().union(*map(_keys, value)) if value else set()
    return set()


@pytest.fixture(scope="module")
def series_files(tmp_path_factory):
    """A live series of a churning process (tests/series_target.py): inputs over time."""
    return series_target.series(tmp_path_factory.mktemp("series"))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, scan_json, series_files):
    """Every key and every line of text the outputs use: scan and plan, text, JSON, CSV;
    scan of a series too."""
    plan = ["plan", *SAMPLES, "--host-memory", "1MiB", "--project", "1,2,10"]
    series = ["scan", *series_files, "--converge-within", "10m"]
    csv_dir = tmp_path_factory.mktemp("csv")
    keys = _keys(scan_json) | _keys(_json(*plan)) | _keys(_json(*series))
    texts = []
    for args in (["scan", *SAMPLES, "--csv", str(csv_dir / "scan")],
                 [*plan, "--csv", str(csv_dir / "plan")],
                 [*series, "--csv", str(csv_dir / "series")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        texts.append(r.stdout)
    for path in csv_dir.rglob("*.csv"):
        with open(path, newline="") as f:
            keys |= set(next(csv.reader(f), []))
    return keys, "\n".join(texts)


def test_the_glossary_keys_are_the_keys_the_outputs_use(outputs):
    keys, _ = outputs
    rows = _glossary()
    assert len(rows) > 50
    missing = sorted({k for _, ks in rows for k in ks} - keys)
    assert not missing, f"docs/glossary.md names keys no output uses: {missing}"


def test_the_glossary_text_names_are_the_names_the_text_prints(outputs):
    _, text = outputs
    missing = [name for name, _ in _glossary() if name != "—" and name not in text]
    assert not missing, f"docs/glossary.md names text no output prints: {missing}"


def test_the_glossary_names_every_column_of_the_ksmd_model(series_files):
    """Every column of the over-time tables, every convergence item and the host table's
    model columns have a row (a column added without words fails here)."""
    out = _json("scan", *series_files)
    named = {k for _, ks in _glossary() for k in ks}
    model = (set(out["stability"][0]) | set(out["timeline"][0]) | set(out["ksmd_settings"][0])
             | set(out["convergence"]) | set(out["host"]["general_profit"]))
    assert {"if_memory_stood_still", "steady_state", "stable_duplicate_pages",
            "time_to_90_percent_seconds", "advised_pages_to_scan", "pages_skipped"} <= model
    assert not sorted(model - named), f"docs/glossary.md has no row for: {sorted(model - named)}"


def test_the_scenarios_text_names_are_their_keys_words(outputs):
    _, text = outputs
    for key in SCENARIOS:
        assert key.replace("_", " ") in text
    assert "zero pages present" not in text and "untouched" not in text


def test_the_savings_chart_names_the_scenarios_as_the_text_does():
    fig = analyze(SAMPLES, jobs=1).plot_savings()
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split(" (")[0] for t in titles] == ["with zero pages", "without zero pages"]
