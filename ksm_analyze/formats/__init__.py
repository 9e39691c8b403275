"""Dump formats: the registry, detection by magic, and ``open_dump``.

Formats are probed in a fixed order (an explicit list beats subclass discovery at this size).
Raw images have no magic: a file that matches nothing is read as raw when its size is a whole
number of pages, and refused as an unknown format otherwise. A fingerprint file (named
``*.ksmfp.parquet``, or any file starting with Parquet's ``PAR1``) is never a dump, whatever
``format`` says: a damaged one must be an error, not a small raw image.

A compressed file (gzip, bzip2, xz, zstd, lzop: :mod:`.streams`) is unwrapped first: the
format is detected from the head of the decompressed stream, and the reader reads the
decompressed bytes instead of a memory map. Each reader declares whether it can
(``DumpReader.unwrapped_only``): formats that decode their own pages (kdump, AVML, Hyper-V),
whose holes carry meaning (the microVM snapshots), or that are read in place beside a
companion (snapshots, VMware) are refused inside a wrapper, as is a wrapper inside a wrapper.
"""

from __future__ import annotations

import os
import stat

from ..errors import DumpFormatError, UnsupportedDumpError
from ..pages import PAGE_SIZE, check_page_size
from ..units import size_text
from .avml import AvmlReader
from .base import DumpFormat, DumpReader, open_readonly
from .cloudhv import CloudHypervisorReader
from .elfcore import ElfCoreReader
from .firecracker import FirecrackerDiffReader, FirecrackerReader
from .kdump import KdumpReader
from .lime import LimeReader
from .migration import MigrationReader
from .openvmm import OpenVmmReader
from .raw import RawReader
from .snapshot import SnapshotReader
from .streams import Codec, Decompressed, probe_codec
from .vmrs import VmrsReader
from .vmware import VmwareReader
from .windows import WindowsReader

__all__ = ["FINGERPRINT_SUFFIX", "PARQUET_MAGIC", "Codec", "DumpFormat", "detect_format",
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
    DumpFormat.VMRS: VmrsReader,
    # microVM snapshots: no magic; Cloud Hypervisor and OpenVMM are found by their companion
    # file (probe_path), Firecracker only by --format.
    DumpFormat.FIRECRACKER: FirecrackerReader,
    DumpFormat.FIRECRACKER_DIFF: FirecrackerDiffReader,
    DumpFormat.CLOUD_HYPERVISOR: CloudHypervisorReader,
    DumpFormat.OPENVMM: OpenVmmReader,
    # issue 20, VMware and Windows (vmwin): a .vmem is VMware by its companion .vmss/.vmsn
    # (detect_format), a state file by its magic
    DumpFormat.VMWARE: VmwareReader,
    DumpFormat.WINDOWS: WindowsReader,
    DumpFormat.RAW: RawReader,
}

# Formats recognised only to be refused with a clear message: (offset, magic, name).
# Sources: ../shared/reference/dump-formats.md (magic bytes table).
_REFUSED: tuple[tuple[int, bytes, str], ...] = (
    (0, b"HIBR", "a Windows hibernation file"),
)


_SUFFIX = {Codec.GZIP: "gz", Codec.BZIP2: "bz2", Codec.XZ: "xz", Codec.ZSTD: "zst",
           Codec.LZOP: "lzo"}
_DECOMPRESS = {Codec.GZIP: "gzip -dc", Codec.BZIP2: "bzip2 -dc", Codec.XZ: "xz -dc",
               Codec.ZSTD: "zstd -dc", Codec.LZOP: "lzop -dc"}


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
    if (codec := probe_codec(head)) is not None:
        fd, _ = open_readonly(path)
        try:
            return _inner_format(path, fd, codec, None, page_size)
        finally:
            os.close(fd)
    return _format_of(path, head, size, page_size)


def _format_of(path: str | os.PathLike[str], head: bytes, size: int | None, page_size: int,
               where: str = "") -> DumpFormat:
    """Detect from ``head``; ``size`` None: not known yet (a wrapper's stream), so raw is
    returned for a head no probe matches and the caller checks the size."""
    for fmt, cls in READERS.items():
        if cls.probe(head):
            return fmt
    for fmt, cls in READERS.items():
        if cls.probe_path(path):
            return fmt
    for offset, magic, name in _REFUSED:
        if head[offset : offset + len(magic)] == magic:
            raise UnsupportedDumpError(
                f"this is {where}{name}, which ksm-analyze cannot read yet; "
                "take a memory-only dump instead (see README, Formats)",
                path=path,
                offset=offset,
            )
    if size is None or size % page_size == 0:
        return DumpFormat.RAW
    raise DumpFormatError(
        f"unknown format: {where}no known magic (first bytes {head[:8].hex(' ')}) and the size, "
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
    head, _ = _read_head(path)
    if (codec := probe_codec(head)) is not None:
        return _open_wrapped(path, codec, format, page_size, base_address)
    fmt = detect_format(path, page_size=page_size) if format is None else DumpFormat.parse(format)
    cls = READERS[fmt]
    return cls(path, page_size=page_size, base_address=base_address)


def _inner_format(path: str | os.PathLike[str], fd: int, codec: Codec,
                  format: str | DumpFormat | None, page_size: int) -> DumpFormat:
    """The format inside a wrapper, from the decompressed head; refuses nested wrappers and
    the formats that cannot be read from a stream."""
    head = Decompressed.head(path, fd, codec)
    what = f"a {codec.value}-compressed "
    if (inner := probe_codec(head)) is not None:
        raise UnsupportedDumpError(
            f"{what}{inner.value} stream (a wrapper inside a wrapper): decompress the outer "
            f"one first ({_DECOMPRESS[codec]} FILE > FILE.{_SUFFIX[inner]})", path=path, offset=0)
    if not head:
        raise DumpFormatError(f"the {codec.value} stream decompresses to nothing", path=path,
                              offset=0)
    if format is not None:
        fmt = DumpFormat.parse(format)
    elif head.startswith(PARQUET_MAGIC):
        raise DumpFormatError(f"{what}fingerprint file: decompress it first", path=path, offset=0)
    else:
        fmt = _format_of(path, head, None, page_size, where=f"inside the {codec.value} stream, ")
    if (why := READERS[fmt].unwrapped_only) is not None:
        raise UnsupportedDumpError(
            f"{what}{fmt.value} dump: ksm-analyze reads {fmt.value} files only uncompressed "
            f"({why}); decompress it first: {_DECOMPRESS[codec]} FILE > "
            f"FILE.{fmt.value}", path=path, offset=0)
    return fmt


def _open_wrapped(path: str | os.PathLike[str], codec: Codec, format: str | DumpFormat | None,
                  page_size: int, base_address: int) -> DumpReader:
    """Open the dump inside a compressed file over its decompressed bytes."""
    fd, _ = open_readonly(path)
    try:
        fmt = _inner_format(path, fd, codec, format, page_size)
        source = Decompressed(path, fd, codec)
        if fmt is DumpFormat.RAW and format is None and source.size % page_size:
            head = source.read_at(0, 8)
            raise DumpFormatError(
                f"unknown format inside the {codec.value} stream: no known magic (first "
                f"decompressed bytes {head.hex(' ')}) and its decompressed size, "
                f"{size_text(source.size)}, is not a whole number of {page_size}-byte pages; "
                "use --format raw to read it as a flat memory image anyway",
                path=path, offset=0)
    except BaseException:
        os.close(fd)
        raise
    try:
        return READERS[fmt](path, page_size=page_size, base_address=base_address, source=source)
    except DumpFormatError as e:
        if e.offset is None or "decompressed offset" in e.detail:
            raise
        raise type(e)(f"{e.detail} (offset {e.offset:#x} of the decompressed {codec.value} "
                      "stream)", path=path, offset=e.offset) from None


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
