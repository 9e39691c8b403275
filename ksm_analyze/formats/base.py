"""The reader base class and the format names: open a dump read-only, describe it as extents.

A format subclasses :class:`DumpReader`, sets ``format`` and ``probe()``, and implements
``_load_extents()``. Formats whose pages are stored raw (raw, ELF, LiME) get batching and
random access from the memory map for free; compressed formats (kdump, AVML) override
``iter_batches()`` and ``read_pages()``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import mmap
import os
import queue
import stat
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

import numpy as np

from ..errors import DumpFormatError, InputError, TruncatedDumpError
from ..pages import PAGE_SIZE, Choice, Extent, PageBatch, PageState
from ..units import size_text

if TYPE_CHECKING:
    from .streams import Decompressed

__all__ = [
    "ADDRESS_LIMIT", "DEFAULT_BATCH_PAGES", "MIN_LIMIT", "RANGE_BYTES", "DumpFormat", "DumpReader",
    "open_readonly",
]

DEFAULT_BATCH_PAGES = 8192
"""Pages per batch: 32 MiB of 4 KiB pages, small enough to stay cheap, big enough for numpy."""
ADDRESS_LIMIT = 1 << 56
"""No range of a dump spans more, and none of guest-physical memory ends above: 2^56 bytes is
half the largest virtual address space (x86-64 and RISC-V with 5-level paging) and the widest
physical address of any Linux architecture (RISC-V Sv57). Past it, a size is damage, and
counting it (as pages not saved, or zero) would be a wrong answer."""
MIN_LIMIT = 1 << 16
"""Every cap on a count a header claims allows at least this many, whatever the file size."""
RANGE_BYTES = 12
"""A dump describes at most MIN_LIMIT + one range (extent) per this many bytes of file. Each
range costs ~200 bytes of Python objects here and downstream, so memory stays linear in the
file. The cheapest ranges real dumps hold: kdump zero pages between excluded ones, a 24-byte
descriptor per two ranges."""


class DumpFormat(Choice):
    """The dump formats ksm-analyze reads (here, in the leaf module, so readers can name theirs)."""

    RAW = "raw"
    SNAPSHOT = "snapshot"
    ELF = "elf"
    KDUMP = "kdump"
    LIME = "lime"
    AVML = "avml"
    MIGRATION = "migration"
    # microVM snapshots (issue 20): named with --format or found by their companion file
    FIRECRACKER = "firecracker"
    FIRECRACKER_DIFF = "firecracker_diff"
    CLOUD_HYPERVISOR = "cloud_hypervisor"
    OPENVMM = "openvmm"
    VMRS = "vmrs"
    # issue 20, VMware and Windows (vmwin)
    VMWARE = "vmware"
    WINDOWS = "windows"


def open_readonly(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Open ``path`` read-only and return ``(fd, size)``; every failure is an InputError.

    ``O_NONBLOCK`` keeps ``open`` from waiting for a writer when ``path`` is a FIFO; anything
    but a regular file is refused from ``fstat`` before a byte is read, and the flag is cleared
    again on the regular file that remains.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InputError("no such file", path=path) from None
    except PermissionError:
        raise InputError("permission denied", path=path) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a dump file", path=path) from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # open(2): a socket, or a device with no driver
            raise InputError("is not a regular file", path=path) from None
        raise InputError(f"cannot open: {e.strerror}", path=path) from None
    st = os.fstat(fd)
    problem = None
    if stat.S_ISDIR(st.st_mode):
        problem = "is a directory, not a dump file"
    elif not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_size == 0:
        problem = "empty file"
    if problem:
        os.close(fd)
        raise InputError(problem, path=path)
    os.set_blocking(fd, True)
    return fd, st.st_size


class DumpReader(ABC):
    """A dump opened read-only, described as sorted, non-overlapping extents of pages.

    Args:
        path: the dump file.
        page_size: the analysis page size; larger guest pages are split into pages of this size.
        base_address: address of the file's first byte, for formats that do not record one.
        source: the decompressed bytes of a compressed file (:mod:`.streams`), read instead
            of a memory map; the reader then owns ``source.fd``. ``file_size`` is the
            decompressed size and every offset is an offset into the decompressed stream.

    Raises:
        InputError: the file cannot be opened, is empty or is not a regular file.
        DumpFormatError: the file is not a valid dump of this format.
    """

    format: ClassVar[DumpFormat]
    address_space: str = "physical"
    """"physical" for guest RAM, "virtual" for process memory."""
    unwrapped_only: ClassVar[str | None] = "it is read in place, from a memory map of the file"
    """Why this format is refused inside a compressed wrapper (gzip, xz, ...: ``open_dump``
    then says so in one line, naming the command that decompresses it), or None where the
    reader takes ``source=`` (a :class:`~.streams.Decompressed`) and reads its pages through
    it. Each reader declares it; the default refuses, so a new reader is refused cleanly until
    it is made to read a decompressed source."""

    def __init__(
        self, path: str | os.PathLike[str], *, page_size: int = PAGE_SIZE, base_address: int = 0,
        source: Decompressed | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.page_size = page_size
        self.base_address = base_address
        self.warnings: list[str] = []
        self._views: tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None = None
        self._stored_offsets: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._origins: dict[int, int] = {}
        """Address of an extent -> file offset of the header that described it (for errors
        about extents whose bytes are not stored)."""
        self.source = source
        if source is None:
            self._fd, self.file_size = open_readonly(self.path)
        else:
            self._fd, self.file_size = source.fd, source.size
            self.warnings += source.warnings
        try:
            # A decompressed source serves the slices headers are read with (_read); the
            # page paths below check ``self.source`` before using the map.
            self._mm = self._map() if source is None else cast(mmap.mmap, source)
            self.extents = self._validated(self._load_extents())
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        """The input's name in tables and messages (the path; snapshots add the process)."""
        return self.path

    # -- what a format provides -------------------------------------------------------------

    @classmethod
    @abstractmethod
    def probe(cls, head: bytes) -> bool:
        """Whether ``head`` (the file's first 4 KiB or less) looks like this format. Never raises."""

    @classmethod
    def probe_path(cls, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is this format by its name and a companion file beside it (for
        formats without magic); tried after every magic. Never raises."""
        return False

    @abstractmethod
    def _load_extents(self) -> list[Extent]:
        """Parse the headers and describe every page as extents (any order)."""

    def info(self) -> dict[str, Any]:
        """Format-specific header facts for ``ksm-analyze info`` (plain JSON-able values)."""
        return {}

    def _map(self) -> mmap.mmap:
        """Map the whole file read-only; the kernel refusing (no mmap support, no address
        space) is an InputError."""
        try:
            mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise InputError(f"cannot map the file: {e.strerror}", path=self.path) from None
        # Huge pages: where the page cache holds the file in 2 MiB folios, one fault maps 512
        # pages instead of 16 (a warm 16 GiB scan: 0.14 s of faults instead of 0.8 s), and
        # the readahead of a cold file allocates such folios. A kernel that declines keeps
        # 4 KiB mappings.
        with contextlib.suppress(OSError, AttributeError):
            mm.madvise(mmap.MADV_HUGEPAGE)
        mm.madvise(mmap.MADV_SEQUENTIAL)
        return mm

    # -- pages ------------------------------------------------------------------------------

    def iter_batches(
        self, batch_pages: int = DEFAULT_BATCH_PAGES, *, shard: int = 0, shards: int = 1
    ) -> Iterator[PageBatch]:
        """Yield every stored page (DATA extents), ``batch_pages`` at a time.

        With ``shards > 1`` only every ``shards``-th batch, starting at batch ``shard``, is
        produced (and decoded), so ``shards`` workers together see every page exactly once.
        The default serves extents stored raw through the memory map without copying, in file
        order.
        """
        ps = self.page_size
        batch = -1
        pieces = []
        for ext in sorted(self.data_extents(), key=lambda e: e.file_offset):
            if ext.file_offset < 0:
                raise NotImplementedError(f"{type(self).__name__} must override iter_batches")
            for first in range(0, ext.npages, batch_pages):
                batch += 1
                if batch % shards != shard:
                    continue
                n = min(batch_pages, ext.npages - first)
                off = ext.file_offset + first * ps
                if self.source is not None:
                    pieces.append((ext.addr + first * ps, n, off))
                    continue
                pages = np.frombuffer(self._mm, np.uint8, n * ps, off).reshape(n, ps)
                addrs = np.uint64(ext.addr + first * ps) + np.arange(n, dtype=np.uint64) * (
                    np.uint64(ps))
                yield PageBatch(addrs, pages)
        if pieces:
            yield from self._source_batches(pieces)

    def _source_batches(self, pieces: list[tuple[int, int, int]]) -> Iterator[PageBatch]:
        """Batches ``(addr, npages, offset)`` read from the decompressed source in file order
        (forward, so the decoder never restarts), one batch ahead in a thread: the
        decompressors release the GIL, so decoding the next batch overlaps hashing this one."""
        ps, src = self.page_size, self.source
        assert src is not None
        ahead: queue.Queue[tuple[int, int, int, bytes] | BaseException | None] = queue.Queue(1)
        stop = threading.Event()

        def put(item: tuple[int, int, int, bytes] | BaseException | None) -> bool:
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    ahead.put(item, timeout=0.1)
                    return True
            return False

        def decode() -> None:
            try:
                for addr, n, off in pieces:
                    if not put((addr, n, off, src.read_at(off, n * ps))):
                        return
                put(None)
            except BaseException as e:  # noqa: BLE001  # handed to the consumer, raised there
                put(e)

        worker = threading.Thread(target=decode, name="ksm-decompress", daemon=True)
        worker.start()
        try:
            while (item := ahead.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                addr, n, off, data = item
                if len(data) < n * ps:
                    raise TruncatedDumpError(
                        f"the decompressed stream ends at {src.size:#x}, inside pages it "
                        "should hold (a decompressed offset)", path=self.path, offset=off)
                addrs = np.uint64(addr) + np.arange(n, dtype=np.uint64) * np.uint64(ps)
                yield PageBatch(addrs, np.frombuffer(data, np.uint8).reshape(n, ps))
        finally:
            stop.set()
            worker.join()

    def _source_pages(self, addrs: np.ndarray) -> np.ndarray:
        """``read_pages`` from a decompressed source: runs of consecutive pages, read in
        file order (forward reads), each placed where its address asked for it."""
        ps, src = self.page_size, self.source
        assert src is not None
        if self._stored_offsets is None:
            stored = [e for e in self.data_extents() if e.file_offset >= 0]
            starts = np.array([e.addr for e in stored], dtype=np.uint64)
            ends = starts + np.array([e.npages * ps for e in stored], dtype=np.uint64)
            offsets = np.array([e.file_offset for e in stored], np.int64)
            self._stored_offsets = (starts, ends, offsets)
        starts, ends, offsets = self._stored_offsets
        which, rel = self._locate(np.asarray(addrs, dtype=np.uint64), starts, ends)
        out = np.empty((len(which), ps), np.uint8)
        if not len(which):
            return out
        off = offsets[which] + rel * ps
        order = np.argsort(off, kind="stable")
        ordered = off[order]
        cuts = np.flatnonzero(np.diff(ordered) != ps) + 1
        for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(ordered)].tolist(),
                          strict=True):
            data = src.read_at(int(ordered[lo]), (hi - lo) * ps)
            if len(data) < (hi - lo) * ps:
                raise TruncatedDumpError(
                    f"the decompressed stream ends at {src.size:#x}, inside pages it should "
                    "hold (a decompressed offset)", path=self.path, offset=int(ordered[lo]))
            out[order[lo:hi]] = np.frombuffer(data, np.uint8).reshape(-1, ps)
        return out

    def read_pages(self, addrs: np.ndarray) -> np.ndarray:
        """Return the ``(len(addrs), page_size)`` bytes of the stored pages at ``addrs``.

        The default reads pages stored raw: the pages of each stored extent are gathered as
        rows of a 2-D view of the map (one copy, no loop).

        Raises:
            ValueError: an address that is not the start of a stored page of this dump.
        """
        ps = self.page_size
        if self.source is not None:
            return self._source_pages(addrs)
        placed = self.page_views(addrs)
        if placed is None:
            raise NotImplementedError(f"{type(self).__name__} must override read_pages")
        views, which, rel = placed
        if not len(which):
            return np.empty((0, ps), np.uint8)
        if which[0] == which[-1] and (which == which[0]).all():
            return np.asarray(views[int(which[0])][rel])  # the usual case: one copy
        out = np.empty((len(which), ps), np.uint8)
        for ext in np.unique(which).tolist():
            mine = np.flatnonzero(which == ext)
            out[mine] = views[ext][rel[mine]]
        return out

    @property
    def in_place(self) -> bool:
        """Pages are stored raw and read straight from the map (:meth:`page_views`); False
        for a format that decodes them (it overrides :meth:`read_pages`) and for a
        compressed file (its pages are decompressed from :attr:`source`)."""
        return self.source is None and type(self).read_pages is DumpReader.read_pages

    def page_views(
        self, addrs: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray] | None:
        """Where the pages at ``addrs`` lie in the memory map, to be read in place: the
        ``(npages, page_size)`` views of the stored extents (address order), and for each
        address the index of its view and its row there. None for a format whose pages are
        not stored raw (it overrides :meth:`read_pages` to decode them).

        Raises:
            ValueError: an address that is not the start of a stored page of this dump.
        """
        if not self.in_place:
            return None
        starts, ends, views = self._stored_views()
        which, rel = self._locate(np.asarray(addrs, dtype=np.uint64), starts, ends)
        return views, which, rel

    def _locate(
        self, addrs: np.ndarray, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each address, the index of the range ``[starts, ends)`` holding it and the page's
        index in that range; ValueError for an address no range holds at a page boundary."""
        which = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        at = np.maximum(which, 0)
        offset = addrs - starts[at] if len(starts) else addrs
        bad = (which < 0) | (addrs >= ends[at]) if len(starts) else np.ones(len(addrs), bool)
        bad |= offset % np.uint64(self.page_size) != 0
        if bad.any():
            addr = int(addrs[np.flatnonzero(bad)[0]])
            raise ValueError(f"address {addr:#x} is not a stored page of {self.path}")
        return at, (offset // np.uint64(self.page_size)).astype(np.int64)

    def _stored_views(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Start and end addresses, and ``(npages, page_size)`` views, of the raw-stored
        extents, in address order."""
        if self._views is None:
            ps = self.page_size
            stored = [e for e in self.data_extents() if e.file_offset >= 0]
            starts = np.array([e.addr for e in stored], dtype=np.uint64)
            ends = starts + np.array([e.npages * ps for e in stored], dtype=np.uint64)
            views = [
                np.frombuffer(self._mm, np.uint8, e.npages * ps, e.file_offset).reshape(-1, ps)
                for e in stored
            ]
            self._views = (starts, ends, views)
        return self._views

    def data_extents(self) -> list[Extent]:
        """The extents whose bytes are stored."""
        return [e for e in self.extents if e.state == PageState.DATA]

    def page_counts(self) -> dict[PageState, int]:
        """Pages per state, as the extents describe them (before looking at content)."""
        counts = dict.fromkeys(PageState, 0)
        for e in self.extents:
            counts[e.state] += e.npages
        return counts

    # -- parsing helpers --------------------------------------------------------------------

    def _error(self, detail: str, offset: int | None = None) -> DumpFormatError:
        return DumpFormatError(detail, path=self.path, offset=offset)

    def _read(self, offset: int, size: int, what: str) -> bytes:
        """Read exactly ``size`` bytes at ``offset`` or raise TruncatedDumpError naming ``what``."""
        if offset < 0 or size < 0 or offset + size > self.file_size:
            raise TruncatedDumpError(
                f"{what}, {size_text(size)}, runs past the end of the file, which holds "
                f"{size_text(self.file_size)}",
                path=self.path,
                offset=offset,
            )
        return self._mm[offset : offset + size]

    def _unpack(self, st: struct.Struct, offset: int, what: str) -> tuple[Any, ...]:
        """The one place headers are decoded: a short read becomes TruncatedDumpError."""
        return st.unpack(self._read(offset, st.size, what))

    def _over_limit(self, count: int, what: str, per: int) -> str | None:
        """Why ``count`` ``what`` are too many for this file, or None: the cap (MIN_LIMIT plus
        one per ``per`` bytes) keeps what a reader builds proportional to the file's bytes."""
        limit = MIN_LIMIT + self.file_size // per
        if count <= limit:
            return None
        return (
            f"more than {limit:,} {what}, the most a file of {size_text(self.file_size)} may hold "
            f"({MIN_LIMIT:,} plus one per {per} bytes)"
        )

    def _validated(self, extents: list[Extent]) -> list[Extent]:
        """Sort extents, drop empty ones, and reject overlaps and stored bytes past EOF."""
        ps = self.page_size
        if problem := self._over_limit(len(extents), "ranges of pages", RANGE_BYTES):
            raise self._error(problem)
        for e in extents:
            if e.npages < 0 or e.addr < 0:
                raise self._error(f"negative size or address in {e.label or 'range'}")
        out = sorted((e for e in extents if e.npages > 0), key=lambda e: e.addr)
        for prev, cur in itertools.pairwise(out):
            if cur.addr < prev.end_addr(ps):
                raise self._error(
                    f"overlapping ranges: {cur.label or 'range'} at address {cur.addr:#x} "
                    f"overlaps {prev.label or 'range'} "
                    f"[{prev.addr:#x}, {prev.end_addr(ps):#x})",
                    cur.file_offset if cur.file_offset >= 0 else self._origins.get(cur.addr),
                )
        stored = sorted((e for e in out if e.state == PageState.DATA and e.file_offset >= 0),
                        key=lambda e: e.file_offset)
        for e in stored:
            end = e.file_offset + e.npages * ps
            if end > self.file_size:
                raise TruncatedDumpError(
                    f"{e.label or 'range'} of {size_text(e.npages * ps)} ends at {end:#x}, "
                    f"past the end of the file ({self.file_size:#x})",
                    path=self.path,
                    offset=e.file_offset,
                )
        # Each stored byte belongs to one page: a file offset must name one page.
        for prev, cur in itertools.pairwise(stored):
            if cur.file_offset < prev.file_offset + prev.npages * ps:
                raise self._error(
                    f"the stored bytes of {cur.label or 'a range'} (address {cur.addr:#x}) "
                    f"overlap those of {prev.label or 'another range'} (address "
                    f"{prev.addr:#x}) in the file", cur.file_offset)
        return out

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the memory map and the file descriptor."""
        self._views = None  # views export the map's buffer: drop them before closing it
        mm = getattr(self, "_mm", None)
        if getattr(self, "source", None) is not None:
            self.source.close()  # type: ignore[union-attr]
        elif mm is not None:
            # A caller may still hold a view; the map then goes when the view does.
            with contextlib.suppress(BufferError):
                mm.close()
            self._mm = None  # type: ignore[assignment]
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Readers travel by path (e.g. to Dask workers) and re-open on arrival; a compressed
        # file re-opens its wrapper (its size travels along: no second counting pass).
        state = {"path": self.path, "page_size": self.page_size,
                 "base_address": self.base_address}
        if self.source is not None:
            src = self.source
            state["wrapper"] = (src.codec.value, src.start, src.size)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        source = None
        if "wrapper" in state:
            from .streams import Codec, Decompressed

            codec, start, size = state["wrapper"]
            fd, _ = open_readonly(state["path"])
            try:
                source = Decompressed(state["path"], fd, Codec(codec), start, size=size)
            except BaseException:
                os.close(fd)
                raise
        self.__init__(  # type: ignore[misc]
            state["path"], page_size=state["page_size"], base_address=state["base_address"],
            **({"source": source} if source is not None else {}),
        )


def strict_json(raw: bytes | str) -> Any:
    """JSON from a file, as strictly as a header is read: a number too large for a float
    (``1e400``, which Python reads as infinity) and ``NaN``/``Infinity`` are a ValueError.
    Used for the metadata of snapshots and fingerprint files."""
    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text[:40]} is out of range")
        return value

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    return json.loads(raw, parse_float=finite, parse_constant=no_constant)
