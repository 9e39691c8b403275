"""notebooks/capacity_planning.ipynb runs top to bottom and agrees with the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient
from typer.testing import CliRunner

from ksm_analyze.cli import app
from ksm_analyze.render.report import TABLES

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "capacity_planning.ipynb"
SAMPLES = sorted((ROOT / "sample_dumps").iterdir())


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run on the samples, its report written to a temporary folder."""
    out = tmp_path_factory.mktemp("nb") / "report"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = f"dumps = {[str(p) for p in SAMPLES]!r}\nout_dir = Path({str(out)!r})"
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb, out


def test_notebook_runs_and_shows_its_charts(executed):
    nb, _ = executed
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    charts = [c for c in nb.cells if c.cell_type == "code" and ".plot_" in c.source]
    # savings, histogram, pairwise, address map, counters against time, ksmd settings, the
    # savings with compression, near-duplicates, hosts
    assert len(charts) == 9
    for cell in charts:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source


def test_notebook_numbers_equal_the_cli(executed, tmp_path):
    _, nb_out = executed
    cli_out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["report", *map(str, SAMPLES), "-o", str(cli_out)])
    assert r.exit_code == 0, r.output
    for name in TABLES:
        if name == "stages":  # holds wall-clock seconds
            continue
        a = pd.read_csv(nb_out / f"{name}.csv")
        b = pd.read_csv(cli_out / f"{name}.csv")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    a = pd.read_csv(nb_out / "stages.csv", index_col=0)
    b = pd.read_csv(cli_out / "stages.csv", index_col=0)
    counts = [s for s in a.index if not s.endswith("_seconds")]
    pd.testing.assert_frame_equal(a.loc[counts], b.loc[counts])


def test_notebook_over_time_section_runs_a_series(executed):
    """The "Over time" cells start their own churning process, sample it three times and
    show one input seen over time, with the model's columns of the host table."""
    nb, _ = executed

    def shown(marker: str) -> str:
        (cell,) = [c for c in nb.cells if c.cell_type == "code"
                   and c.source.rstrip().endswith(marker)]
        return "".join(o.get("data", {}).get("text/plain", "") for o in cell.outputs)

    stab = shown("over_time.stability")
    assert "stable_duplicate_pages" in stab and "coinciding_duplicate_pages" in stab
    # The process's comm is the interpreter's name: python, python3...
    assert len([line for line in stab.splitlines() if re.search(r"python[\d.]*-", line)]) == 1
    assert re.search(r"python[\d.]*-\d+\s+3\s", stab), stab  # one input, of 3 samples
    host = shown("over_time.host")
    assert "steady_state" in host and "if_memory_stood_still" in host
