"""The documentation says what the code does: README output, commands, public API."""

from __future__ import annotations

import re

from conftest import ROOT
from typer.testing import CliRunner

import ksm_analyze
from ksm_analyze.cli import app

README = (ROOT / "README.md").read_text()
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()
REPORTS_DOC = (ROOT / "docs" / "reports.md").read_text()


def test_readme_sample_output_is_what_scan_prints_today():
    shown = re.search(r"```text\n(.*?)\n```", README, re.DOTALL)
    assert shown, "README has no sample output block"
    result = CliRunner().invoke(app, ["scan", *sorted(map(str, (ROOT / "sample_dumps").iterdir()))])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == shown.group(1)


def test_readme_gives_the_two_commands_ci_runs():
    # The first one pasted as it stands into a shell: a venv, the install and a scan.
    first = re.search(r"```console\n(.*?)\n```", README, re.DOTALL).group(1)
    assert first == ("python3 -m venv .venv && . .venv/bin/activate && pip install . && "
                     "ksm-analyze scan sample_dumps/*")
    assert "bash tests/run.sh" in README
    assert "bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_command_has_help_and_is_documented():
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        assert command.callback.__doc__, name
        assert f"ksm-analyze {name}" in README, name
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0


def test_every_scan_option_is_in_the_cli_doc():
    result = CliRunner().invoke(app, ["scan", "--help"], env={"COLUMNS": "200"})
    options = set(re.findall(r"--[a-z][a-z-]+", result.stdout)) - {"--help", "--verify"}
    missing = sorted(o for o in options if f"`{o}" not in CLI_DOC)
    assert not missing


def test_every_report_option_is_in_the_cli_doc():
    result = CliRunner().invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    options = set(re.findall(r"--[a-z][a-z-]+", result.stdout)) - {"--help", "--verify"}
    assert {"--output", "--show-content", "--top", "--quiet"} <= options
    missing = sorted(o for o in options if f"`{o}" not in CLI_DOC)
    assert not missing


def test_analysis_tables_and_plots_are_documented():
    doc = ksm_analyze.Analysis.__doc__ or ""
    result = ksm_analyze.analyze(sorted((ROOT / "sample_dumps").iterdir()), jobs=1)
    for table in ("pairwise", "top_contents", "address_map"):
        assert f"{table}:" in doc, table
        for column in getattr(result, table).columns:
            assert f"``{column}``" in doc, (table, column)
            assert column in REPORTS_DOC, (table, column)
    for name in dir(result):
        if name.startswith("plot_"):
            assert getattr(result, name).__doc__, name
            assert name in REPORTS_DOC, name


def test_public_api_is_exported():
    for name in ksm_analyze.__all__:
        assert hasattr(ksm_analyze, name), name
    assert {"analyze", "open_dump", "Analysis", "KsmAnalyzeError"} <= set(ksm_analyze.__all__)


def test_planning_doc_sample_output_is_what_plan_prints_today():
    doc = (ROOT / "docs" / "planning.md").read_text()
    shown = re.search(r"```text\n(.*?)\n```", doc, re.DOTALL)
    assert shown, "docs/planning.md has no sample output block"
    samples = sorted(map(str, (ROOT / "sample_dumps").iterdir()))
    result = CliRunner().invoke(app, ["plan", *samples, "--host-memory", "400KiB",
                                      "--project", "1,2,10,100"])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == shown.group(1)


def _cells(row: str) -> int:
    """Cells of a GFM table row: its unescaped pipes split it (inside code spans too)."""
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


def _broken_tables(text: str) -> list[str]:
    """Tables whose rows have another number of cells than the header, and runs of table
    rows with no header (a blank line inside a table starts a run that renders as text)."""
    problems = []
    lines = text.splitlines()
    fenced = False
    block: list[tuple[int, str]] = []
    for number, line in enumerate([*lines, ""], 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.lstrip().startswith("|"):
            block.append((number, line))
            continue
        if block:
            first, header = block[0]
            delimiter = block[1][1] if len(block) > 1 else ""
            if not re.fullmatch(r"\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*", delimiter):
                problems.append(f"line {first}: table rows with no header and delimiter row")
            else:
                problems += [f"line {n}: {_cells(row)} cells, the header has {_cells(header)}"
                             for n, row in block[1:] if _cells(row) != _cells(header)]
            block = []
    return problems


def test_every_markdown_table_has_a_header_and_as_many_cells_per_row():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert not _broken_tables(doc.read_text()), (doc.name, _broken_tables(doc.read_text()))


def test_the_table_check_finds_broken_tables():
    good = "| a | b |\n|---|---|\n| `x \\| y` | 2 |\n"
    assert _broken_tables(good) == []
    assert _broken_tables("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n") == [
        "line 3: 3 cells, the header has 2"]
    assert _broken_tables(good + "\n| c | d |\n") == [
        "line 5: table rows with no header and delimiter row"]


def test_plan_help_does_not_put_the_dumps_on_one_host():
    result = CliRunner().invoke(app, ["plan", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "on one host" not in result.stdout
    assert "Dump files to spread over hosts" in result.stdout
