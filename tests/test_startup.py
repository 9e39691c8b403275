"""Start-up cost: ``scan`` and ``scan --json`` never import pandas or matplotlib (issue 11).

pandas alone takes a quarter of a second to import, about five times what the analysis of
the samples takes; only a caller that reads a DataFrame (``--csv``, ``report``, ``plan``,
the Python API's table attributes) pays for it.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, SAMPLES

HEAVY = ("pandas", "matplotlib")

_RUN = """
import json, runpy, sys
sys.argv = ["ksm-analyze", *json.loads(sys.argv[1])]
try:
    runpy.run_module("ksm_analyze", run_name="__main__")
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {heavy})
    print(json.dumps(loaded))
"""


def _modules_loaded_by(*args: str) -> tuple[str, list[str]]:
    """Run ``ksm-analyze ARGS`` in a fresh interpreter: its output, and the heavy modules
    it had imported when it ended."""
    code = _RUN.format(heavy=set(HEAVY))
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    output, _, last = r.stdout.rstrip("\n").rpartition("\n")
    assert r.returncode == 0, r.stderr
    return output, json.loads(last)


def test_a_text_scan_imports_neither_pandas_nor_matplotlib():
    output, loaded = _modules_loaded_by("scan", *SAMPLES)
    assert output.startswith("Inputs") and "Savings" in output
    assert loaded == []


def test_json_is_made_from_the_columns_without_pandas():
    output, loaded = _modules_loaded_by("scan", *SAMPLES, "--json")
    assert json.loads(output)["per_input"]
    assert loaded == []


def test_the_check_sees_pandas_where_a_data_frame_is_made(tmp_path):
    _, loaded = _modules_loaded_by("scan", *SAMPLES, "--csv", str(tmp_path / "csv"))
    assert (tmp_path / "csv" / "per_input.csv").exists()
    assert "pandas" in loaded
    assert not any(m.split(".")[0] == "matplotlib" for m in loaded)
