"""Files: atomic writes, CSV tables and strict JSON.

Every file is written under a temporary name in its folder, synced and renamed into place,
so a reader sees the old file or the whole new one, never a part.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..result import json_safe

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DIR_MODE", "FILE_MODE", "atomic_write", "to_json", "write_csvs"]

FILE_MODE = 0o600
"""Output files name inputs and contents of memory dumps: private to their owner."""
DIR_MODE = 0o700


def atomic_write(path: str | os.PathLike[str], data: str | bytes, *, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one.

    A failure or an interruption (a full disk, Ctrl-C, SIGTERM) leaves ``path`` as it was and
    no temporary file: the temporary name is chosen before the file exists, so its removal
    is armed from the moment it is created.
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = os.fspath(path)  # a full disk: say which file could not be written
        raise


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
        atomic_write(path, df.to_csv())
        written.append(path)
    return written


def to_json(value: Tables | dict[str, Any]) -> str:
    """A result (or any record) as indented, strict JSON: no NaN, no infinities."""
    data = json_safe(value) if isinstance(value, dict) else value.to_dict()
    return json.dumps(data, indent=2, allow_nan=False)
