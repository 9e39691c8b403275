"""Exception hierarchy.

Every problem with an input is a :class:`KsmAnalyzeError` whose message is one line naming
the file, the file offset (when there is one) and the problem. Only ``cli.py`` turns these
into exit codes; library users catch them like any exception.
"""

from __future__ import annotations

import os

__all__ = [
    "CorruptPageError",
    "DumpFormatError",
    "InputError",
    "KsmAnalyzeError",
    "TruncatedDumpError",
    "UnsupportedDumpError",
]


class KsmAnalyzeError(Exception):
    """Base class of every error ksm-analyze raises on bad input."""


class InputError(KsmAnalyzeError):
    """The input cannot be opened at all: missing, unreadable, a directory, empty."""

    def __init__(self, detail: str, *, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")


class DumpFormatError(KsmAnalyzeError):
    """The file's bytes do not make a valid dump of the format being read."""

    def __init__(
        self, detail: str, *, path: str | os.PathLike[str], offset: int | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.detail = detail
        where = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(f"{self.path}{where}: {detail}")


class TruncatedDumpError(DumpFormatError):
    """A structure or page runs past the end of the file."""


class UnsupportedDumpError(DumpFormatError):
    """The file is a recognised format that ksm-analyze does not read (yet)."""


class CorruptPageError(DumpFormatError):
    """A stored page cannot be decoded (for example it fails to decompress)."""
