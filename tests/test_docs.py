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
