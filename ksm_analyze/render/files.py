"""Files: atomic writes, CSV tables and strict JSON.

Every file is written under a temporary name in its folder, synced and renamed into place,
so a reader sees the old file or the whole new one, never a part.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .._files import DIR_MODE, FILE_MODE, atomic_write
from ..analysis import json_safe

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DIR_MODE", "FILE_MODE", "atomic_write", "csv_text", "to_json", "write_csvs"]


class Tables(Protocol):
    """A result with named tables and a JSON form: :class:`Analysis`, ``Plan``."""

    def tables(self) -> dict[str, pd.DataFrame]: ...

    def to_dict(self) -> dict[str, Any]: ...


def write_csvs(result: Tables, directory: str | os.PathLike[str]) -> list[Path]:
    """One CSV per table of ``result.tables()`` into ``directory`` (created if needed, mode
    0700); returns the paths."""
    d = Path(directory)
    d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    written = []
    for name, df in result.tables().items():
        path = d / f"{name}.csv"
        atomic_write(path, csv_text(df))
        written.append(path)
    return written


def csv_text(df: pd.DataFrame) -> str:
    """A table as CSV text: its index as the first column when it names the rows (a plain
    0, 1, ... index is left out: no unnamed column), a list in a cell (a host's ``inputs``)
    as its items separated by spaces, a mapping (a content's ``inputs``: copies per input)
    as ``name:value`` items separated by spaces."""
    nested = [c for c in df.columns
              if df[c].dtype == object and any(isinstance(v, list | dict) for v in df[c])]
    if nested:
        df = df.assign(**{c: [_cell(v) for v in df[c]] for c in nested})
    text: str = df.to_csv(index=df.index.name is not None or df.index.nlevels > 1)
    return text


def _cell(value: Any) -> Any:
    if isinstance(value, dict):
        return " ".join(f"{k}:{v}" for k, v in value.items())
    return " ".join(map(str, value)) if isinstance(value, list) else value


def to_json(value: Tables | dict[str, Any]) -> str:
    """A result (or any record) as indented, strict JSON: no NaN, no infinities."""
    data = json_safe(value) if isinstance(value, dict) else value.to_dict()
    return json.dumps(data, indent=2, allow_nan=False)
