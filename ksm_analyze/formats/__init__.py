"""Dump formats: the registry, detection by magic, and ``open_dump``.

Formats are probed in a fixed order (an explicit list beats subclass discovery at this size).
Raw images have no magic: a file that matches nothing is read as raw when its size is a whole
number of pages, and refused as an unknown format otherwise.
"""

from __future__ import annotations

import enum
import os
import struct
from typing import TYPE_CHECKING

from ..errors import DumpFormatError, UnsupportedDumpError
from .base import open_readonly

if TYPE_CHECKING:
    from .base import DumpReader

__all__ = ["DumpFormat", "detect_format", "open_dump", "open_inputs"]

PROBE_BYTES = 4096 + 8
"""Enough for every magic, including Hyper-V's at offset 0x1000."""


class DumpFormat(enum.Enum):
    """The dump formats ksm-analyze reads."""

    RAW = "raw"
    SNAPSHOT = "snapshot"
    ELF = "elf"
    KDUMP = "kdump"
    LIME = "lime"
    AVML = "avml"

    @classmethod
    def parse(cls, name: str | DumpFormat) -> DumpFormat:
        """Normalise a user-given name; ValueError lists the valid ones."""
        if isinstance(name, DumpFormat):
            return name
        try:
            return cls(name.lower())
        except ValueError:
            valid = ", ".join(f.value for f in cls)
            raise ValueError(f"unknown format {name!r}; choose one of: {valid}") from None


# Formats recognised only to be refused with a clear message: (offset, magic, name).
# Sources: ../shared/reference/dump-formats.md (magic bytes table).
_REFUSED: tuple[tuple[int, bytes, str], ...] = (
    (0, b"LibvirtQemudSave", "a libvirt save image (virsh save)"),
    (0, b"LibvirtQemudPart", "an incomplete libvirt save image"),
    (0, b"QEVM\x00\x00\x00\x03", "a QEMU migration stream (virsh dump without --memory-only)"),
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


def _reader_classes() -> dict[DumpFormat, type[DumpReader]]:
    # Imported here: each reader module imports DumpFormat from this package.
    from .avml import AvmlReader
    from .elfcore import ElfCoreReader
    from .kdump import KdumpReader
    from .lime import LimeReader
    from .raw import RawReader
    from .snapshot import SnapshotReader

    return {  # probed in this order: a snapshot is also an ELF core
        DumpFormat.SNAPSHOT: SnapshotReader,
        DumpFormat.ELF: ElfCoreReader,
        DumpFormat.KDUMP: KdumpReader,
        DumpFormat.LIME: LimeReader,
        DumpFormat.AVML: AvmlReader,
        DumpFormat.RAW: RawReader,
    }


def _read_head(path: str | os.PathLike[str]) -> tuple[bytes, int]:
    fd, size = open_readonly(path)
    try:
        return os.pread(fd, PROBE_BYTES, 0), size
    finally:
        os.close(fd)


def detect_format(path: str | os.PathLike[str], *, page_size: int = 4096) -> DumpFormat:
    """Name the format of ``path`` from its first bytes.

    Raises:
        InputError: the file cannot be opened or is empty.
        UnsupportedDumpError: a known format ksm-analyze does not read yet.
        DumpFormatError: no known magic and the size is not a whole number of pages.
    """
    head, size = _read_head(path)
    for fmt, cls in _reader_classes().items():
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
        f"{size} bytes, is not a whole number of {page_size}-byte pages; "
        "use --format raw to read it as a flat memory image anyway",
        path=path,
        offset=0,
    )


def open_dump(
    path: str | os.PathLike[str],
    format: str | DumpFormat | None = None,
    *,
    page_size: int = 4096,
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
    if page_size < 512 or page_size & (page_size - 1):
        raise ValueError(f"page size must be a power of two of at least 512, not {page_size}")
    fmt = detect_format(path, page_size=page_size) if format is None else DumpFormat.parse(format)
    cls = _reader_classes()[fmt]
    return cls(path, page_size=page_size, base_address=base_address)


def open_inputs(
    path: str | os.PathLike[str],
    format: str | DumpFormat | None = None,
    *,
    page_size: int = 4096,
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
