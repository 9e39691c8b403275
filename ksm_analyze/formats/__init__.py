"""Dump formats: the registry, detection by magic, and ``open_dump``.

Formats are probed in a fixed order (an explicit list beats subclass discovery at this size).
Raw images have no magic: a file that matches nothing is read as raw when its size is a whole
number of pages, and refused as an unknown format otherwise. A fingerprint file (named
``*.ksmfp.parquet``, or any file starting with Parquet's ``PAR1``) is never a dump, whatever
``format`` says: a damaged one must be an error, not a small raw image.
"""

from __future__ import annotations

import os
import stat
import struct

from ..errors import DumpFormatError, UnsupportedDumpError
from ..pages import PAGE_SIZE, check_page_size
from ..units import size_text
from .avml import AvmlReader
from .base import DumpFormat, DumpReader, open_readonly
from .elfcore import ElfCoreReader
from .kdump import KdumpReader
from .lime import LimeReader
from .migration import MigrationReader
from .raw import RawReader
from .snapshot import SnapshotReader

__all__ = ["FINGERPRINT_SUFFIX", "PARQUET_MAGIC", "DumpFormat", "detect_format",
           "looks_like_fingerprint_file", "open_dump", "open_inputs"]

FINGERPRINT_SUFFIX = ".ksmfp.parquet"
"""The name every fingerprint file ends with (``ksm_analyze.fleet.fingerprint_files``)."""
PARQUET_MAGIC = b"PAR1"
"""The first (and last) four bytes of every Parquet file."""

PROBE_BYTES = 4096 + 8
"""Enough for every magic, including Hyper-V's at offset 0x1000."""

# In probe order: a snapshot is also an ELF core, so it must be tried before ELF; raw has no
# magic (its probe never matches) and is listed only so open_dump can name it.
READERS: dict[DumpFormat, type[DumpReader]] = {
    DumpFormat.SNAPSHOT: SnapshotReader,
    DumpFormat.ELF: ElfCoreReader,
    DumpFormat.KDUMP: KdumpReader,
    DumpFormat.LIME: LimeReader,
    DumpFormat.AVML: AvmlReader,
    DumpFormat.MIGRATION: MigrationReader,
    DumpFormat.RAW: RawReader,
}

# Formats recognised only to be refused with a clear message: (offset, magic, name).
# Sources: ../shared/reference/dump-formats.md (magic bytes table).
_REFUSED: tuple[tuple[int, bytes, str], ...] = (
    (0, b"PAGEDU64", "a Windows 64-bit crash dump"),
    (0, b"PAGEDUMP", "a Windows 32-bit crash dump"),
    (0, b"HIBR", "a Windows hibernation file"),
    (0, b"\xd2\xbe\xd2\xbe", "a VMware suspend/snapshot state file (.vmss/.vmsn)"),
    (0, b"\xd3\xbe\xd3\xbe", "a VMware suspend/snapshot state file (.vmss/.vmsn)"),
    (0, b"\xd1\xba\xd1\xba", "a VMware suspend/snapshot state file (.vmss/.vmsn)"),
    (0, b"\xd0\xbe\xd2\xbe", "a VMware suspend/snapshot state file (.vmss/.vmsn)"),
    (0, struct.pack("<I", 0x01282014), "a Hyper-V saved state (.vmrs)"),
    (0x1000, struct.pack("<I", 0x01282014), "a Hyper-V saved state (.vmrs)"),
)


def _read_head(path: str | os.PathLike[str]) -> tuple[bytes, int]:
    fd, size = open_readonly(path)
    try:
        return os.pread(fd, PROBE_BYTES, 0), size
    finally:
        os.close(fd)


def looks_like_fingerprint_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is named like a fingerprint file or starts with ``PAR1`` (never
    raises): such a file is read as a fingerprint file or refused, never read as a dump."""
    if os.fspath(path).lower().endswith(FINGERPRINT_SUFFIX):
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 4, 0) == PARQUET_MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def _not_a_dump(path: str | os.PathLike[str]) -> DumpFormatError:
    return DumpFormatError(
        "a fingerprint file (Parquet, from 'ksm-analyze fingerprint' or --cache), not a memory "
        "dump: scan, report, plan and info read it as one when no --format is given",
        path=path, offset=0)


def detect_format(path: str | os.PathLike[str], *, page_size: int = PAGE_SIZE) -> DumpFormat:
    """Name the format of ``path`` from its first bytes.

    Raises:
        InputError: the file cannot be opened or is empty.
        UnsupportedDumpError: a known format ksm-analyze does not read yet.
        DumpFormatError: no known magic and the size is not a whole number of pages, or a
            fingerprint file (by name or magic).
    """
    head, size = _read_head(path)
    if head.startswith(PARQUET_MAGIC) or os.fspath(path).lower().endswith(FINGERPRINT_SUFFIX):
        raise _not_a_dump(path)
    for fmt, cls in READERS.items():
        if cls.probe(head):
            return fmt
    for offset, magic, name in _REFUSED:
        if head[offset : offset + len(magic)] == magic:
            raise UnsupportedDumpError(
                f"this is {name}, which ksm-analyze cannot read yet; "
                "take a memory-only dump instead (see README, Formats)",
                path=path,
                offset=offset,
            )
    if size % page_size == 0:
        return DumpFormat.RAW
    raise DumpFormatError(
        f"unknown format: no known magic (first bytes {head[:8].hex(' ')}) and the size, "
        f"{size_text(size)}, is not a whole number of {page_size}-byte pages; "
        "use --format raw to read it as a flat memory image anyway",
        path=path,
        offset=0,
    )


def open_dump(
    path: str | os.PathLike[str],
    format: str | DumpFormat | None = None,
    *,
    page_size: int = PAGE_SIZE,
    base_address: int = 0,
) -> DumpReader:
    """Open a dump read-only, detecting its format unless ``format`` is given.

    Args:
        path: the dump file.
        format: a :class:`DumpFormat` or its name; None detects it from the magic bytes.
        page_size: analysis page size in bytes (a power of two, at least 512).
        base_address: address of the first byte of a raw image.

    Returns:
        A :class:`~ksm_analyze.formats.base.DumpReader`; use it as a context manager.

    Raises:
        KsmAnalyzeError: the file cannot be read as a dump (the message says why and where).
        ValueError: an unknown format name or a bad page size.
    """
    check_page_size(page_size)
    if format is not None and looks_like_fingerprint_file(path):
        raise _not_a_dump(path)
    fmt = detect_format(path, page_size=page_size) if format is None else DumpFormat.parse(format)
    cls = READERS[fmt]
    return cls(path, page_size=page_size, base_address=base_address)


def open_inputs(
    path: str | os.PathLike[str],
    format: str | DumpFormat | None = None,
    *,
    page_size: int = PAGE_SIZE,
    base_address: int = 0,
) -> list[DumpReader]:
    """Open ``path`` as one input per address space: a snapshot of N processes gives N readers.

    Same arguments and errors as :func:`open_dump`; every reader must be closed.
    """
    first = open_dump(path, format, page_size=page_size, base_address=base_address)
    readers = [first]
    try:
        for i in range(1, len(getattr(first, "processes", ()))):
            readers.append(type(first)(path, page_size=page_size, process=i))  # type: ignore[call-arg]
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers
