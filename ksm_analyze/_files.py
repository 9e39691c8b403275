"""Atomic, private output files: the one way ksm-analyze writes a file.

Every file is written under a temporary name in its folder, synced and renamed into place,
so a reader sees the old file or the whole new one, never a part.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "atomic_file", "atomic_write"]

FILE_MODE = 0o600
"""Output files name inputs and contents of memory dumps: private to their owner."""
DIR_MODE = 0o700


def atomic_write(path: str | os.PathLike[str], data: str | bytes, *, mode: int = FILE_MODE) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one.

    A failure or an interruption (a full disk, Ctrl-C, SIGTERM) leaves ``path`` as it was and
    no temporary file: the temporary name is chosen before the file exists, so its removal
    is armed from the moment it is created.
    """
    raw = data.encode() if isinstance(data, str) else data
    with atomic_file(path, mode=mode) as tmp, open(tmp, "wb") as f:
        f.write(raw)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, mode: int = FILE_MODE) -> Iterator[Path]:
    """A temporary file (empty, mode 0600) to write ``path``'s new contents into, by name,
    for a writer that streams them (:func:`atomic_write` takes them whole): synced and
    renamed into place when the block ends, removed if it raises (or is interrupted): the
    temporary name is chosen before the file exists, so its removal is armed from the moment
    it is created."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = os.fspath(path)
        raise
