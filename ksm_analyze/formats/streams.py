"""Compressed wrappers: the bytes a gzip, bzip2, xz, zstd or lzop stream decompresses to.

:class:`Decompressed` serves a compressed range of a file (from ``start`` to the end: a
libvirt save image puts a raw header before its compressed stream) as a sliceable source of
decompressed bytes, never decompressed to disk or to memory whole:

- ``size``: the decompressed size. xz states it in its index, zstd in its frame headers, lzop
  in its block headers (walked at open without decompressing); gzip (whose trailer keeps the
  size modulo 4 GiB, one member at a time) and bzip2 (which keeps none) are decompressed
  once at open, streamed, to count it.
- ``read_at``: random access. Reads going forward continue from a cursor that decompresses
  and discards, or jump to a checkpoint ahead; a read behind it restarts from the nearest
  checkpoint: every 64 MiB of output for gzip (a copy of the inflate state, ~40 KiB each),
  every MiB for lzop (a block start, found without decoding), every frame start for zstd,
  block starts for xz (from the index, once liblzma has checked it: :class:`_StreamPass`);
  from the start of the stream otherwise (one zstd frame, one xz block, bzip2).
- ``passes`` and ``decoded_bytes`` count what decoding cost (for tests and measurements).
- Output is bounded: every decompressor is asked for at most what the caller wants
  (``max_length``, ``stream_reader.read(n)``), so a decompression bomb never allocates more
  than one read's worth. Corruption and truncation are :class:`DumpFormatError` /
  :class:`TruncatedDumpError` naming the compressed offset where decoding failed and the
  decompressed offset reached, never a codec's own exception.

Multi-member gzip, concatenated zstd frames (and skippable frames) and multi-stream xz and
bzip2 are one stream, as the command-line tools read them.
"""

from __future__ import annotations

import bisect
import bz2
import importlib
import lzma
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any, Protocol

import lzallright
import zstandard


def _inflater() -> Any:
    """zlib-ng (a dependency) inflates 1.4x faster than zlib here (BENCHMARKS.md), with the
    same API (decompressobj, max_length, copy); zlib does the same, slower."""
    try:
        return importlib.import_module("zlib_ng.zlib_ng")
    except ImportError:  # pragma: no cover
        return zlib


_inflate = _inflater()

from ..errors import DumpFormatError, TruncatedDumpError
from ..pages import Choice
from ..units import size_text

__all__ = ["CHECKPOINT_BYTES", "MAX_SIZE", "Codec", "Decompressed", "probe_codec"]

CHECKPOINT_BYTES = 64 << 20
"""Decompressed bytes between two checkpoints a read behind the cursor restarts from."""
MAX_SIZE = 1 << 56
"""No decompressed stream is larger (base.ADDRESS_LIMIT): a size claimed past it is damage."""
_IN_BYTES = 1 << 20
"""Compressed bytes read from the file at a time."""
_SKIP_BYTES = 4 << 20
"""Decompressed bytes asked for at a time while skipping forward (then dropped)."""
_XZ_MEMLIMIT = 1 << 30
"""liblzma's memory limit: xz -9 needs 65 MiB; a header asking for more is refused."""
_ZSTD_WINDOW = 1 << 27
"""zstd's default window limit (128 MiB): ``zstd --long=31`` files are refused, as by zstd -d."""
_LZOP_MAX_BLOCK = 64 << 20
"""lzop's MAX_BLOCK_SIZE: lzop writes 256 KiB blocks and reads none larger than this."""
_LZOP_PACKED_BLOCK = 1 << 20
"""The most compressed bytes one lzop block may hold (4x what lzop writes): lzallright
decodes a block whole, and LZO1X expands up to 255x, so this bounds what a hostile block
can allocate before its size is checked (255 MiB)."""
_LZOP_CHECKPOINT = 1 << 20
"""An lzop checkpoint is two integers (a block start): one per MiB, so reads that skip
forward hop over blocks without decoding them (16 K checkpoints for 16 GiB)."""
_XZ_CHECKPOINT = 1 << 20
"""Decompressed bytes between two xz block starts kept as checkpoints (at most
_XZ_MAX_CHECKPOINTS of them: an index may list millions of blocks)."""
_XZ_MAX_CHECKPOINTS = 1 << 16


class Codec(Choice):
    """The compressed wrappers ksm-analyze unwraps."""

    GZIP = "gzip"
    BZIP2 = "bzip2"
    XZ = "xz"
    ZSTD = "zstd"
    LZOP = "lzop"


_GZIP_MAGIC = b"\x1f\x8b\x08"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZ2_BLOCK = b"\x31\x41\x59\x26\x53\x59"
_BZ2_EOS = b"\x17\x72\x45\x38\x50\x90"  # an empty bzip2 stream ends at once
_LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"


def _zstd_skippable(head: bytes) -> bool:
    return len(head) >= 8 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


def probe_codec(head: bytes) -> Codec | None:
    """The codec whose magic ``head`` starts with, or None. Never raises."""
    if head.startswith(_GZIP_MAGIC):
        return Codec.GZIP
    if head.startswith(_XZ_MAGIC):
        return Codec.XZ
    if head.startswith(_ZSTD_MAGIC):
        return Codec.ZSTD
    if _zstd_skippable(head):
        size = int.from_bytes(head[4:8], "little")
        after = head[8 + size : 12 + size]
        return Codec.ZSTD if after in (_ZSTD_MAGIC, b"") or _zstd_skippable(
            head[8 + size :]) else None
    if (head[:3] == b"BZh" and len(head) >= 10 and 0x31 <= head[3] <= 0x39
            and head[4:10] in (_BZ2_BLOCK, _BZ2_EOS)):
        return Codec.BZIP2
    if head.startswith(_LZOP_MAGIC):
        return Codec.LZOP
    return None


class _Pass(Protocol):
    """One decoding pass: decompressed bytes in order, from a checkpoint or the start."""

    out_pos: int
    """Decompressed offset of the next byte ``read`` returns."""

    def read(self, n: int) -> bytes:
        """Up to ``n`` (> 0) bytes; b"" only at the end of the stream."""

    def where(self) -> int:
        """The compressed (file) offset decoding has reached, for messages."""

    def checkpoint(self) -> Any:
        """A state to restart from (here), or None where the codec cannot copy its state."""


class Decompressed:
    """The decompressed bytes of the compressed range ``[start, EOF)`` of an open file.

    Args:
        path: the file, for messages.
        fd: an open descriptor of it (not closed here; read with ``pread`` only, so forked
            workers may share it).
        codec: the wrapper's codec (:func:`probe_codec`).
        start: file offset of the compressed stream.
        size: the decompressed size, when known already (a reader re-opened in a worker):
            no counting pass.

    Raises:
        DumpFormatError: the stream is corrupt (or its stated size is impossible).
        TruncatedDumpError: the stream ends early.
    """

    def __init__(self, path: str | os.PathLike[str], fd: int, codec: Codec, start: int = 0,
                 *, size: int | None = None):
        self._setup(path, fd, codec, start)
        stated = self._stated_size() if size is None else size
        self.size_stated = stated is not None
        if stated is None:
            stated = self._count()
        if stated > MAX_SIZE:
            raise self._corrupt(f"claims {size_text(stated)} of decompressed bytes, more than "
                                "any memory holds", self.start, 0)
        self.size = stated

    @classmethod
    def head(cls, path: str | os.PathLike[str], fd: int, codec: Codec, start: int = 0,
             n: int = 4096) -> bytes:
        """The first ``n`` decompressed bytes (fewer if the stream is shorter), without
        finding the size: enough to tell the format inside."""
        src = cls.__new__(cls)
        src._setup(path, fd, codec, start)
        cur, parts, want = src._new_pass(), [], n
        while want and (data := cur.read(want)):
            parts.append(data)
            want -= len(data)
        return b"".join(parts)

    def _setup(self, path: str | os.PathLike[str], fd: int, codec: Codec, start: int) -> None:
        self.path = os.fspath(path)
        self.fd = fd
        self.codec = codec
        self.start = start
        self.end = os.fstat(fd).st_size
        self.compressed_size = self.end - start
        self.warnings: list[str] = []
        self._lock = threading.RLock()
        self._checkpoints: list[tuple[int, Any]] = []  # (out offset, state), ascending
        self._cursor: _Pass | None = None
        self._lzop: _LzopHeader | None = None
        self._xz_streams: list[_XzStream] = []  # from the index, for block checkpoints
        self.size = MAX_SIZE  # until known
        self.passes = 0
        """Decoding passes started (from the start of the stream or a checkpoint)."""
        self.decoded_bytes = 0
        """Decompressed bytes produced by every pass so far (read or skipped): what the
        decoding cost, against :attr:`size` for one pass over the whole stream."""
        if codec is Codec.LZOP:
            self._lzop = _LzopHeader(self)

    # -- the interface ------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.size

    def read_at(self, offset: int, n: int) -> bytes:
        """The ``n`` decompressed bytes at ``offset``; fewer past the end (callers check)."""
        n = min(n, self.size - offset)
        if offset < 0 or n <= 0:
            return b""
        with self._lock:
            cur = self._seek(offset)
            parts, want = [], n
            while want:
                data = cur.read(want)
                if not data:
                    raise self._short(cur)
                self.decoded_bytes += len(data)
                parts.append(data)
                want -= len(data)
                self._mark(cur)
            return parts[0] if len(parts) == 1 else b"".join(parts)

    def __getitem__(self, key: slice) -> bytes:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a decompressed stream is sliced with [start:stop]")
        lo = 0 if key.start is None else key.start
        hi = self.size if key.stop is None else min(key.stop, self.size)
        return self.read_at(lo, hi - lo) if hi > lo else b""

    def chunks(self, offset: int = 0, size: int = 1 << 24) -> Iterator[tuple[int, memoryview]]:
        """Sequential decompressed blocks of ``size`` bytes (the last may be shorter) from
        ``offset``: ``(offset, bytes)``."""
        while offset < self.size:
            data = self.read_at(offset, size)
            if not data:
                return
            yield offset, memoryview(data)
            offset += len(data)

    def close(self) -> None:
        """Drop the decoder and checkpoints (the descriptor belongs to the caller)."""
        self._cursor = None
        self._checkpoints = []

    def info(self) -> dict[str, Any]:
        """What was unwrapped, for ``ksm-analyze info``."""
        return {
            "codec": self.codec.value,
            "compressed_bytes": self.compressed_size,
            "decompressed_bytes": self.size,
            "ratio": round(self.size / self.compressed_size, 2) if self.compressed_size else 0,
            **({"stream_offset": self.start} if self.start else {}),
        }

    # -- cursor and checkpoints -----------------------------------------------------------------

    def _new_pass(self, state: Any = None) -> _Pass:
        self.passes += 1
        if self.codec is Codec.GZIP:
            return _GzipPass(self, state)
        if self.codec is Codec.ZSTD:
            return _ZstdPass(self, state)
        if self.codec is Codec.LZOP:
            assert self._lzop is not None
            return _LzopPass(self, self._lzop, state)
        return _StreamPass(self, state)

    def _seek(self, offset: int) -> _Pass:
        """The cursor, placed at ``offset``: continued, or restarted from a checkpoint."""
        if isinstance(self._cursor, _StreamPass) and self._cursor.out_pos > offset:
            self.decoded_bytes += self._cursor.settle()  # xz: may add checkpoints
        at = bisect.bisect_right(self._checkpoints, offset, key=lambda cp: cp[0])
        best = self._checkpoints[at - 1] if at else None
        cur = self._cursor
        if cur is None or cur.out_pos > offset or (best is not None and best[0] > cur.out_pos):
            cur = self._cursor = self._new_pass(None if best is None else best[1])
        while cur.out_pos < offset:
            skipped = len(cur.read(min(offset - cur.out_pos, _SKIP_BYTES)))
            if not skipped:
                raise self._short(cur)
            self.decoded_bytes += skipped
            self._mark(cur)
        return cur

    def _mark(self, cur: _Pass) -> None:
        last = self._checkpoints[-1][0] if self._checkpoints else 0
        if cur.out_pos >= last + CHECKPOINT_BYTES:
            state = cur.checkpoint()
            if state is not None:
                self._checkpoints.append((cur.out_pos, state))

    def _count(self) -> int:
        """Decompress the whole stream once (streamed), placing checkpoints on the way."""
        cur = self._cursor = self._new_pass()
        while data := cur.read(_SKIP_BYTES):
            self.decoded_bytes += len(data)
            self._mark(cur)
        return cur.out_pos

    def _stated_size(self) -> int | None:
        if self.codec is Codec.XZ:
            return _xz_size(self)
        if self.codec is Codec.ZSTD:
            return _zstd_frames(self)
        if self.codec is Codec.LZOP:
            assert self._lzop is not None
            return self._lzop.walk()
        return None

    # -- errors -------------------------------------------------------------------------------

    def _corrupt(self, detail: str, where: int, out_pos: int) -> DumpFormatError:
        return DumpFormatError(
            f"{self.codec.value} stream {detail} (decompressed offset {out_pos:#x})",
            path=self.path, offset=where)

    def _short(self, cur: _Pass) -> DumpFormatError:
        """The stream ended before the size its headers state (or the size counted)."""
        return self._corrupt(
            f"ends after {size_text(cur.out_pos)}, short of the {size_text(self.size)} its "
            "headers state", cur.where(), cur.out_pos)

    def _truncated(self, where: int, out_pos: int) -> TruncatedDumpError:
        return TruncatedDumpError(
            f"the {self.codec.value} stream ends before its end marker, after "
            f"{size_text(out_pos)} of decompressed bytes (decompressed offset {out_pos:#x})",
            path=self.path, offset=where)

    def _pread(self, n: int, at: int) -> bytes:
        return os.pread(self.fd, max(0, min(n, self.end - at)), at)


# -- gzip -------------------------------------------------------------------------------------

class _GzipPass:
    """zlib over gzip members; the inflate state is copyable, so checkpoints are cheap."""

    def __init__(self, src: Decompressed, state: Any = None) -> None:
        self.src = src
        self.d: Any = None  # None: at a member boundary
        self.pos, self.out_pos = src.start, 0
        if state is not None:
            d, self.pos, self.out_pos = state
            self.d = None if d is None else d.copy()
        self.buf = b""
        self.members = 0

    def where(self) -> int:
        return self.pos - len(self.buf)

    def checkpoint(self) -> Any:
        return (None if self.d is None else self.d.copy(), self.where(), self.out_pos)

    def _fill(self) -> bool:
        if not self.buf:
            self.buf = self.src._pread(_IN_BYTES, self.pos)
            self.pos += len(self.buf)
        return bool(self.buf)

    def read(self, n: int) -> bytes:
        src = self.src
        while True:
            if self.d is None:
                if len(self.buf) < 3:
                    more = self.src._pread(_IN_BYTES, self.pos)
                    self.pos += len(more)
                    self.buf += more
                if not self.buf:
                    return b""  # the end, at a member boundary
                if not self.buf.startswith(_GZIP_MAGIC[:2]):
                    return self._trailing()
                self.d = _inflate.decompressobj(31)
            if not self._fill():
                raise src._truncated(self.where(), self.out_pos)
            before = len(self.buf)
            try:
                out: bytes = self.d.decompress(self.buf, n)
            except _inflate.error as e:
                raise src._corrupt(f"is corrupt ({e})", self.where(), self.out_pos) from None
            if self.d.eof:
                self.buf, self.d = self.d.unused_data, None
            else:
                self.buf = self.d.unconsumed_tail
            if out:
                self.out_pos += len(out)
                return out
            if self.d is not None and len(self.buf) == before and before:
                raise src._corrupt("makes no progress", self.where(), self.out_pos)

    def _trailing(self) -> bytes:
        at = self.where()
        tail = self.src._pread(_IN_BYTES, at)
        if tail.count(0) != len(tail) or at + len(tail) < self.src.end:
            self.src.warnings.append(
                f"{self.src.path}: {size_text(self.src.end - at)} after the last gzip member "
                f"(offset {at:#x}) are not gzip data and are ignored, as gzip -d does")
        self.buf, self.pos = b"", self.src.end
        return b""


# -- bzip2 and xz: decompressors whose state cannot be copied ---------------------------------------

class _XzStream:
    """One xz stream as its index describes it: where it and its blocks start, where its
    index starts (the end of its blocks) and where it ends, compressed and decompressed."""

    def __init__(self, start: int, index_at: int, end: int, out_size: int,
                 blocks: list[tuple[int, int]]) -> None:
        self.start, self.index_at, self.end = start, index_at, end
        self.out_size = out_size
        self.blocks = blocks  # (file offset, decompressed offset in the stream), some of them
        self.out_start = 0  # set once the streams before are counted


class _StreamPass:
    """bz2 or lzma streams back to back; restarts from the start of the file, or for xz at a
    block start (``state``: the stream's number, the block's file offset and decompressed
    offset).

    xz blocks are independent: a pass from a block feeds liblzma the stream's header and
    then the blocks from there up to the stream's index (not the index: it lists the blocks
    skipped), and goes on with the next stream from its start. Block starts come from the
    index, and become checkpoints only once liblzma has checked that index against the
    blocks it describes, in a pass over the whole stream (:meth:`_verified`): a damaged
    index never places bytes at a wrong offset.
    """

    def __init__(self, src: Decompressed, state: Any = None) -> None:
        self.src = src
        self.pos, self.out_pos = src.start, 0
        self.buf = b""
        self.d: Any = None
        self.stream = 0  # the xz stream being decoded
        self.limit: int | None = None  # a pass from a block stops feeding at the index
        self.failed = False  # the decoder raised: nothing more to settle
        if state is not None:
            self.stream, self.pos, self.out_pos = state
            self.limit = src._xz_streams[self.stream].index_at
            self.buf = src._pread(12, src._xz_streams[self.stream].start)  # the header
            self.d = self._new()

    def where(self) -> int:
        return self.pos - len(self.buf)

    def checkpoint(self) -> Any:
        return None

    def _new(self) -> Any:
        if self.src.codec is Codec.XZ:
            return lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)
        return bz2.BZ2Decompressor()

    def read(self, n: int) -> bytes:
        src = self.src
        while True:
            if self.d is None:
                if not self.buf:
                    self.buf = src._pread(_IN_BYTES, self.pos)
                    self.pos += len(self.buf)
                if src.codec is Codec.XZ:
                    self._skip_padding()
                if not self.buf:
                    return b""
                self.d = self._new()
            if self.d.needs_input and not self.buf:
                if self.limit is not None and self.pos >= self.limit:
                    self._next_stream()
                    continue
                want = _IN_BYTES if self.limit is None else min(_IN_BYTES, self.limit - self.pos)
                self.buf = src._pread(want, self.pos)
                self.pos += len(self.buf)
                if not self.buf:
                    raise src._truncated(self.pos, self.out_pos)
            out = self._decompress(n)
            if self.d.eof:
                self.buf, self.d = self.d.unused_data, None
                self._verified()
            if out:
                self.out_pos += len(out)
                if src._xz_streams and self.limit is None and self.d is not None:
                    self._finish_stream()
                return out

    def settle(self) -> int:
        """Before this pass is dropped for a read behind it: if it is at most _SKIP_BYTES
        short of its xz stream's end (a dump whose last bytes are no page), decode to there,
        so liblzma checks the index and the block starts become checkpoints. Returns the
        bytes decoded."""
        streams = self.src._xz_streams
        if self.failed or self.limit is not None or self.d is None or (
                self.stream >= len(streams)):
            return 0
        xs = streams[self.stream]
        end = xs.out_start + xs.out_size
        done = 0
        if 0 < end - self.out_pos <= _SKIP_BYTES:
            while self.out_pos < end and (data := self.read(end - self.out_pos)):
                done += len(data)
        return done

    def _decompress(self, n: int) -> bytes:
        """Up to ``n`` bytes from the decoder, fed what is buffered."""
        try:
            out: bytes = self.d.decompress(self.buf, n)
        except (OSError, EOFError, lzma.LZMAError, ValueError, MemoryError) as e:
            self.failed = True
            why = str(e) or type(e).__name__
            if "Memory usage limit" in why:
                why = f"needs more than {size_text(_XZ_MEMLIMIT)} to decompress"
            raise self.src._corrupt(f"is corrupt near here ({why})", self.pos,
                                    self.out_pos) from None
        self.buf = b""
        return out

    def _next_stream(self) -> None:
        """A pass from a block has fed its stream's last block: on to the next stream."""
        xs = self.src._xz_streams[self.stream]
        if self.out_pos != xs.out_start + xs.out_size:  # checked already: never expected
            raise self.src._corrupt("has blocks that do not match its index", self.pos,
                                    self.out_pos)
        self.d, self.buf, self.pos, self.limit = None, b"", xs.end, None
        self.stream += 1

    def _finish_stream(self) -> None:
        """Once a stream's last byte is out, let liblzma read its index (checking it against
        the blocks), so its block starts become checkpoints."""
        streams, src = self.src._xz_streams, self.src
        if self.stream >= len(streams):
            return
        xs = streams[self.stream]
        if self.out_pos != xs.out_start + xs.out_size:
            return
        while not self.d.eof:
            if self.d.needs_input and not self.buf:
                self.buf = src._pread(_IN_BYTES, self.pos)
                self.pos += len(self.buf)
                if not self.buf:
                    raise src._truncated(self.pos, self.out_pos)
            if self._decompress(1):
                raise src._corrupt("holds more bytes than its index states", self.pos,
                                   self.out_pos)
        self.buf, self.d = self.d.unused_data, None
        self._verified()

    def _verified(self) -> None:
        """liblzma read a whole stream, index included: its block starts are checkpoints."""
        streams = self.src._xz_streams
        if self.stream < len(streams):
            xs = streams[self.stream]
            if self.limit is None and xs.blocks:
                cps = self.src._checkpoints
                cps += [(xs.out_start + out, (self.stream, at, xs.out_start + out))
                        for at, out in xs.blocks if xs.out_start + out]
                cps.sort(key=lambda cp: cp[0])
                xs.blocks = []
        self.stream += 1

    def _skip_padding(self) -> None:
        """xz stream padding: zero bytes between and after streams."""
        while True:
            stripped = self.buf.lstrip(b"\0")
            if stripped or self.pos >= self.src.end:
                self.buf = stripped
                return
            self.buf = self.src._pread(_IN_BYTES, self.pos)
            self.pos += len(self.buf)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(9):
        if pos + i >= len(data):
            raise ValueError("a number runs past the index")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ValueError("a number longer than 9 bytes")


def _xz_size(src: Decompressed) -> int:
    """The sum of the uncompressed sizes in each stream's index, walking streams backwards
    from the end (xz file format 1.2.1, sections 2.1.2 and 4). liblzma checks the index
    against the blocks it decodes, so a wrong index fails the scan."""
    total, end = 0, src.end
    streams = 0
    found: list[_XzStream] = []
    kept = 0
    while end > src.start:
        # Stream padding: zero bytes, a multiple of four.
        tail = src._pread(min(end - src.start, 4096), end - min(end - src.start, 4096))
        zeros = len(tail) - len(tail.rstrip(b"\0"))
        if zeros == len(tail) and len(tail) == 4096:
            zeros = zeros // 4 * 4
            end -= zeros
            continue
        zeros = zeros // 4 * 4
        end -= zeros
        if end - src.start < 24:
            raise src._corrupt("is too short for an xz stream header and footer", end, total)
        footer = src._pread(12, end - 12)
        if footer[10:12] != b"YZ":
            raise src._corrupt("has no xz stream footer (the file is truncated or has data "
                               "after the stream)", end - 12, 0)
        backward = (int.from_bytes(footer[4:8], "little") + 1) * 4
        index_at = end - 12 - backward
        if backward > 16 << 20 or index_at < src.start + 12:
            raise src._corrupt(f"claims an index of {size_text(backward)}, which does not fit",
                               end - 8, 0)
        index = src._pread(backward, index_at)
        try:
            if index[0] != 0:
                raise ValueError("no index indicator")
            count, pos = _varint(index, 1)
            if count > backward:
                raise ValueError(f"{count} records in {backward} bytes")
            stored = out = 0
            blocks, last = [], -_XZ_CHECKPOINT
            for _ in range(count):
                if out - last >= _XZ_CHECKPOINT and kept < _XZ_MAX_CHECKPOINTS:
                    blocks.append((stored, out))
                    last, kept = out, kept + 1
                unpadded, pos = _varint(index, pos)
                size, pos = _varint(index, pos)
                stored += (unpadded + 3) // 4 * 4
                out += size
            total += out
        except (ValueError, IndexError) as e:
            raise src._corrupt(f"has a damaged index ({e})", index_at, 0) from None
        begin = index_at - stored - 12
        if begin < src.start or src._pread(6, begin) != _XZ_MAGIC:
            raise src._corrupt("has an index that does not match its blocks", index_at, 0)
        found.append(_XzStream(begin, index_at, end, out,
                               [(begin + 12 + at, o) for at, o in blocks]))
        streams += 1
        end = begin
    out_start = 0
    for xs in reversed(found):
        xs.out_start = out_start
        out_start += xs.out_size
    src._xz_streams = found[::-1]
    return total


# -- zstd -------------------------------------------------------------------------------------

class _Source:
    """A file range read with pread, as the file object zstandard's stream_reader wants."""

    def __init__(self, src: Decompressed, pos: int) -> None:
        self.src, self.pos = src, pos

    def read(self, n: int = -1) -> bytes:
        data = self.src._pread(_IN_BYTES if n < 0 else n, self.pos)
        self.pos += len(data)
        return data


class _ZstdPass:
    """zstd frames back to back; restarts at a frame start (checkpoints from the frame walk)."""

    def __init__(self, src: Decompressed, state: Any = None) -> None:
        self.src = src
        pos: int
        self.out_pos: int
        pos, self.out_pos = (src.start, 0) if state is None else state
        self.source = _Source(src, pos)
        # _Source has the one method stream_reader calls (read).
        self.reader = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW).stream_reader(
            self.source, read_size=_IN_BYTES, read_across_frames=True)  # type: ignore[arg-type]

    def where(self) -> int:
        return self.source.pos

    def checkpoint(self) -> Any:
        return None  # only frame starts (placed by the walk)

    def read(self, n: int) -> bytes:
        try:
            out: bytes = self.reader.read(n)
        except zstandard.ZstdError as e:
            raise self.src._corrupt(f"is corrupt near here ({e})", self.source.pos,
                                    self.out_pos) from None
        self.out_pos += len(out)
        return out


def _zstd_frames(src: Decompressed) -> int | None:
    """Walk the frames and their block headers (RFC 8878, 3.1) without decompressing:
    the sum of the frames' content sizes, or None if a frame does not state its own.
    A truncated or mangled frame is an error here, at open (zstandard's stream reader
    would end quietly). Frame starts become checkpoints."""
    pos, total, known = src.start, 0, True
    frames: list[tuple[int, int]] = []
    while pos < src.end:
        head = src._pread(18, pos)
        if len(head) < 4:
            raise src._truncated(pos, total)
        if _zstd_skippable(head):
            size = int.from_bytes(head[4:8], "little")
            if pos + 8 + size > src.end:
                raise src._truncated(pos, total)
            pos += 8 + size
            continue
        if head[:4] != _ZSTD_MAGIC:
            raise src._corrupt(f"has {head[:4].hex(' ')} where a zstd frame should start",
                               pos, total)
        if len(head) < 6:
            raise src._truncated(pos, total)
        fhd = head[4]
        single = fhd >> 5 & 1
        if fhd & 0x08:
            raise src._corrupt("sets a reserved bit in a frame header", pos + 4, total)
        fcs_size = (1 if single else 0, 2, 4, 8)[fhd >> 6]
        at = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
        if len(head) < at + fcs_size:
            raise src._truncated(pos, total)
        content = None
        if fcs_size:
            content = int.from_bytes(head[at : at + fcs_size], "little") + (
                256 if fcs_size == 2 else 0)
        if content is None:
            known = False
        else:
            frames.append((pos, total))
            total += content
        pos += at + fcs_size
        while True:
            block = src._pread(3, pos)
            if len(block) < 3:
                raise src._truncated(pos, total)
            h = int.from_bytes(block, "little")
            kind, size = h >> 1 & 3, h >> 3
            if kind == 3:
                raise src._corrupt("has a block of the reserved type", pos, total)
            pos += 3 + (1 if kind == 1 else size)
            if pos > src.end:
                raise src._truncated(pos, total)
            if h & 1:
                break
        pos += 4 if fhd & 0x04 else 0
        if pos > src.end:
            raise src._truncated(src.end, total)
    if not known:
        return None
    src._checkpoints = [(out, (at, out)) for at, out in frames if out]
    return total


# -- lzop -------------------------------------------------------------------------------------

_F_ADLER32_D, _F_ADLER32_C, _F_H_EXTRA_FIELD = 0x1, 0x2, 0x40
_F_CRC32_D, _F_CRC32_C, _F_H_FILTER, _F_H_CRC32 = 0x100, 0x200, 0x800, 0x1000
_LZOP_METHODS = {1: "LZO1X-1", 2: "LZO1X-1(15)", 3: "LZO1X-999"}


class _LzopHeader:
    """An lzop file header (lzop 1.04, ``lzop.c``: ``read_header``): big-endian fields after
    the 9-byte magic, a checksum over them, then blocks of ``u32 dst_len, u32 src_len``,
    checksums, and ``src_len`` bytes (stored raw when equal to ``dst_len``); ``dst_len`` 0
    ends the file."""

    def __init__(self, src: Decompressed) -> None:
        self.src = src
        head = src._pread(512, src.start)
        try:
            self.first = self._parse(head)
        except (struct.error, IndexError):
            raise src._truncated(src.start + len(head), 0) from None

    def _parse(self, head: bytes) -> int:
        src = self.src
        pos = 9
        version, _lib, = struct.unpack_from(">HH", head, pos)
        pos += 4
        if version >= 0x0940:
            pos += 2  # version needed to extract
        method = head[pos]
        pos += 1
        if method not in _LZOP_METHODS:
            raise src._corrupt(f"uses method {method}, not LZO1X (1-3)", src.start + pos - 1, 0)
        if version >= 0x0940:
            pos += 1  # level
        (self.flags,) = struct.unpack_from(">I", head, pos)
        pos += 4
        if self.flags & _F_H_FILTER:
            raise src._corrupt("uses an lzop filter, which is not read", src.start + pos, 0)
        pos += 8 + (4 if version >= 0x0940 else 0)  # mode, mtime (low, high)
        pos += 1 + head[pos]  # name
        (stored,) = struct.unpack_from(">I", head, pos)
        data = head[9:pos]
        check = zlib.crc32(data) if self.flags & _F_H_CRC32 else zlib.adler32(data)
        if check != stored:
            raise src._corrupt(f"header checksum {stored:#010x} is not {check:#010x}",
                               src.start + pos, 0)
        pos += 4
        if self.flags & _F_H_EXTRA_FIELD:
            (extra,) = struct.unpack_from(">I", head, pos)
            pos += 4 + extra + 4
            if pos > len(head):
                raise src._corrupt("has an extra field longer than its header", src.start, 0)
        return src.start + pos

    def block(self, pos: int, out_pos: int) -> tuple[int, int, int, list[int]]:
        """``(dst_len, src_len, data offset, [d_check, c_check])`` of the block at ``pos``."""
        src, f = self.src, self.flags
        raw = src._pread(8, pos)
        if len(raw) < 4:
            raise src._truncated(pos, out_pos)
        (dst,) = struct.unpack_from(">I", raw)
        if dst == 0:
            return 0, 0, pos + 4, []
        if len(raw) < 8:
            raise src._truncated(pos, out_pos)
        (size,) = struct.unpack_from(">I", raw, 4)
        if dst > _LZOP_MAX_BLOCK or size > dst or (size < dst and size > _LZOP_PACKED_BLOCK):
            raise src._corrupt(f"block claims {dst:#x} bytes from {size:#x} (lzop allows at "
                               f"most {_LZOP_MAX_BLOCK:#x}, never more stored than decoded; "
                               f"compressed blocks of at most {_LZOP_PACKED_BLOCK:#x} bytes "
                               "are read, lzop writes 256 KiB ones)", pos, out_pos)
        nd = bool(f & _F_ADLER32_D) + bool(f & _F_CRC32_D)
        nc = (bool(f & _F_ADLER32_C) + bool(f & _F_CRC32_C)) if size < dst else 0
        checks = src._pread(4 * (nd + nc), pos + 8)
        if len(checks) < 4 * (nd + nc):
            raise src._truncated(pos + 8, out_pos)
        data = pos + 8 + 4 * (nd + nc)
        if data + size > src.end:
            raise src._truncated(data, out_pos)
        return dst, size, data, list(struct.unpack(f">{nd + nc}I", checks))

    def walk(self) -> int:
        """Hop from block header to block header: the decompressed size, and a checkpoint
        (a block start) every CHECKPOINT_BYTES."""
        pos, total, last = self.first, 0, 0
        src = self.src
        while True:
            if total - last >= _LZOP_CHECKPOINT:
                src._checkpoints.append((total, (pos, total)))
                last = total
            dst, size, data, _ = self.block(pos, total)
            if dst == 0:
                if data < src.end and src._pread(1 << 16, data).strip(b"\0"):
                    src.warnings.append(f"{src.path}: data after the lzop end marker (offset "
                                        f"{data:#x}) is ignored")
                return total
            total += dst
            pos = data + size


class _LzopPass:
    """lzop blocks decoded one at a time (at most 64 MiB each); every block start is a
    possible checkpoint."""

    def __init__(self, src: Decompressed, header: _LzopHeader, state: Any = None) -> None:
        self.src, self.header = src, header
        self.pos: int
        self.out_pos: int
        self.pos, self.out_pos = (header.first, 0) if state is None else state
        self.block = memoryview(b"")
        self.used = 0
        self.block_pos = self.pos

    def where(self) -> int:
        return self.block_pos

    def checkpoint(self) -> Any:
        return None if self.used < len(self.block) else (self.pos, self.out_pos)

    def read(self, n: int) -> bytes:
        if self.used >= len(self.block):
            self._next()
            if not self.block:
                return b""
        out = bytes(self.block[self.used : self.used + n])
        self.used += len(out)
        self.out_pos += len(out)
        return out

    def _next(self) -> None:
        src, f = self.src, self.header.flags
        self.block_pos = pos = self.pos
        dst, size, data, checks = self.header.block(pos, self.out_pos)
        if dst == 0:
            self.block, self.used = memoryview(b""), 0
            return
        stored = src._pread(size, data)
        if size < dst:
            c = checks[(bool(f & _F_ADLER32_D) + bool(f & _F_CRC32_D)):]
            self._check(stored, c, f & _F_ADLER32_C, f & _F_CRC32_C, "compressed")
            try:
                out = _LZO.decompress(stored, dst)
            except lzallright.LZOError as e:
                raise src._corrupt(f"block does not decode ({e})", pos, self.out_pos) from None
            if len(out) != dst:
                raise src._corrupt(f"block decodes to {len(out):#x} bytes, not {dst:#x}", pos,
                                   self.out_pos)
        else:
            out = stored
        self._check(out, checks, f & _F_ADLER32_D, f & _F_CRC32_D, "decompressed")
        self.block, self.used = memoryview(out), 0
        self.pos = data + size

    def _check(self, data: bytes, checks: list[int], adler: int, crc: int, what: str) -> None:
        i = 0
        for on, fn in ((adler, zlib.adler32), (crc, zlib.crc32)):
            if on:
                if fn(data) != checks[i]:
                    raise self.src._corrupt(f"block's {what} checksum does not match",
                                            self.block_pos, self.out_pos)
                i += 1


_LZO = lzallright.LZOCompressor()
