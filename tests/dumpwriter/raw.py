"""Write raw memory images: the pages back to back, as ``pmemsave`` does."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["make_raw"]


def make_raw(path: str | os.PathLike[str], pages: bytes | Iterable[bytes]) -> Path:
    """Write ``pages`` (one bytes object, or several written back to back) to ``path``."""
    with open(path, "wb") as f:
        if isinstance(pages, bytes | bytearray | memoryview):
            f.write(pages)
        else:
            f.writelines(pages)
    return Path(path)
