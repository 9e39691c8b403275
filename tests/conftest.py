"""Constants and fixtures shared by the tests (pytest loads this first; tests import the
constants with ``from conftest import ...``, tests/ being on the path)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

PS = 4096
"""The analysis page size the tests write dumps in."""
ROOT = Path(__file__).resolve().parent.parent
"""The repository."""
SAMPLES = sorted(map(str, (ROOT / "sample_dumps").iterdir()))
"""The committed sample dumps, as paths in the order ``scan sample_dumps/*`` sees them."""
runner = CliRunner()
"""Runs the command line in-process (stderr apart from stdout)."""
