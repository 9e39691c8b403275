"""Exception hierarchy.

Every problem with an input is a :class:`KsmAnalyzeError` whose message is one line naming
the file, the file offset (when there is one) and the problem. Only ``cli.py`` turns these
into exit codes; library users catch them like any exception. Every one survives pickling
whole (message, path, offset, detail), so an error raised in a worker process is raised
again, the same, in the parent.
"""

from __future__ import annotations

import os
import re
from typing import Any, TypeVar

__all__ = [
    "CorruptPageError",
    "DumpFormatError",
    "InputError",
    "KsmAnalyzeError",
    "TruncatedDumpError",
    "UnsupportedDumpError",
    "WorkerError",
    "printable",
]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
                     r"\ud800-\udfff]")
"""Control characters (C0, DEL, C1), line and paragraph separators, bidirectional marks and
overrides, and lone surrogates (an undecodable byte of a file name)."""


def _escape(found: re.Match[str]) -> str:
    ch = found[0]
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's surrogateescape: the byte it stands for
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` made safe to print on a terminal, for anything that came from a file (a dump's
    name, metadata, a warning, a path): control characters and the like escaped as Python
    writes them (ESC -> ``\\x1b``, newline -> ``\\n``), the rest unchanged. Printing it
    twice changes nothing more."""
    return _UNSAFE.sub(_escape, str(text))


class KsmAnalyzeError(Exception):
    """Base class of every error ksm-analyze raises on bad input (or a worker's death).

    Its message names files and quotes what it found in them, so it prints escaped
    (:func:`printable`): a file's name or bytes never reach a terminal as control characters
    or a second line. ``args`` and the attributes (``path``, ``detail``) stay exact."""

    def __str__(self) -> str:
        return printable(super().__str__())

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles as cls(*args), which keyword-only arguments do not survive;
        # rebuild from the message and the attributes instead, whatever the signature.
        return _rebuild, (type(self), self.args, self.__dict__)


E = TypeVar("E", bound=BaseException)


def _rebuild(cls: type[E], args: tuple[Any, ...], state: dict[str, Any]) -> E:
    error = cls.__new__(cls, *args)  # sets .args, hence the message
    error.__dict__.update(state)
    return error


class InputError(KsmAnalyzeError):
    """The input cannot be opened at all: missing, unreadable, a directory, empty."""

    def __init__(self, detail: str, *, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")


class DumpFormatError(KsmAnalyzeError):
    """The file's bytes do not make a valid dump of the format being read."""

    _KIND = ""
    """What kind of problem, said before the detail (``truncated: ``)."""

    def __init__(
        self, detail: str, *, path: str | os.PathLike[str], offset: int | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.detail = detail
        where = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(f"{self.path}{where}: {self._KIND}{detail}")


class TruncatedDumpError(DumpFormatError):
    """A structure or page runs past the end of the file: the message says ``truncated``
    (``detail`` is what ran past the end, and where)."""

    _KIND = "truncated: "


class UnsupportedDumpError(DumpFormatError):
    """The file is a recognised format that ksm-analyze does not read (yet)."""


class CorruptPageError(DumpFormatError):
    """A stored page cannot be decoded (for example it fails to decompress)."""


class WorkerError(KsmAnalyzeError):
    """A worker process died without an answer: killed (``SIGKILL``, out of memory) or crashed."""
