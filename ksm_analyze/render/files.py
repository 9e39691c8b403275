"""Files: atomic writes, CSV tables and strict JSON.

Every file is written under a temporary name in its folder, synced and renamed into place,
so a reader sees the old file or the whole new one, never a part.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..result import Analysis, json_safe

__all__ = ["DIR_MODE", "FILE_MODE", "atomic_write", "to_json", "write_csvs"]

FILE_MODE = 0o600
"""Output files name inputs and contents of memory dumps: private to their owner."""
DIR_MODE = 0o700


def atomic_write(path: str | os.PathLike[str], data: str | bytes, *, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_csvs(result: Analysis, directory: str | os.PathLike[str]) -> list[Path]:
    """One CSV per table of :data:`~ksm_analyze.result.TABLES` into ``directory`` (created
    if needed, mode 0700); returns the paths."""
    d = Path(directory)
    d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    written = []
    for name, df in result.tables().items():
        path = d / f"{name}.csv"
        atomic_write(path, df.to_csv())
        written.append(path)
    return written


def to_json(value: Analysis | dict[str, Any]) -> str:
    """An analysis (or any record) as indented, strict JSON: no NaN, no infinities."""
    data = value.to_dict() if isinstance(value, Analysis) else json_safe(value)
    return json.dumps(data, indent=2, allow_nan=False)
