"""Constants and fixtures shared by the tests (pytest loads this first; tests import the
constants with ``from conftest import ...``, tests/ being on the path)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

PS = 4096
"""The analysis page size the tests write dumps in."""
ROOT = Path(__file__).resolve().parent.parent
"""The repository."""
SAMPLES = sorted(map(str, (ROOT / "sample_dumps").iterdir()))
"""The committed sample dumps, as paths in the order ``scan sample_dumps/*`` sees them."""
runner = CliRunner()
"""Runs the command line in-process (stderr apart from stdout)."""


def scan_memory(paths: Sequence[str], *options: str) -> int:
    """What ``scan --json`` says a host of ``paths`` needs: memory after KSM (rmap_items
    included, zero pages present), the number a plan's hosts must equal."""
    from ksm_analyze.cli import app

    r = runner.invoke(app, ["scan", *paths, *options, "--json"])
    assert r.exit_code == 0, r.output
    savings = json.loads(r.stdout)["savings"]
    return int(savings["memory_after"]["with_zero_pages_bytes"])



@pytest.fixture(params=["compiled", "numpy"])
def kernel_path(request, monkeypatch):
    """Run a test once with the compiled kernels and once with the numpy code they replace
    (ksm_analyze/hashing/compiled.py). The compiled run fails, not skips, where the extension was not
    built: CI builds it, and its results are what the tests are for."""
    from ksm_analyze.hashing import compiled as kernels

    if request.param == "numpy":
        monkeypatch.setattr(kernels, "native", None)
    else:
        assert kernels.native is not None, "ksm_analyze.hashing._compiled is not built (no C compiler?)"
    return request.param
