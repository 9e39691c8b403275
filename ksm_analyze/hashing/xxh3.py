"""XXH3-64 (seed 0, default secret) of many equal-length byte strings at once, in numpy.

xxh3-64 is the fingerprint this package names (the prefix hash of stage 1, the whole-page hash
of stage 2), so a vectorised version is only usable if it is bit-exact: every row must hash to
``xxhash.xxh3_64_intdigest(row.tobytes())``. Calling that once per row costs more in Python than
the hash itself; here each step of the algorithm (xxhash.h, doc/xxhash_spec.md) runs once over
a block of rows, with no Python per row. Python loops run only over blocks of rows (sized so
the temporaries stay in cache). Rows longer than 240 bytes go to the C library one by one,
which is faster there.

numpy has no 128-bit multiply, so ``_mul128_fold64`` builds one from 32-bit halves. Arithmetic
is on uint64 arrays, which wrap mod 2**64 without warnings (numpy warns only on scalars, so
scalar constants are reduced mod 2**64 in Python). Words are read little-endian through strided
views of the rows; the first step (xor with the secret) writes them into contiguous scratch,
allocated once per call and reused, where the other steps run in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np
import numpy.typing as npt
import xxhash
from numpy.lib.stride_tricks import as_strided

__all__ = ["xxh3_64_rows"]

U64 = npt.NDArray[np.uint64]
Bytes = npt.NDArray[np.uint8]

_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
"""XXH3_kSecret: the 192-byte default secret."""

_P64_1 = 0x9E3779B185EBCA87
_P64_2 = 0xC2B2AE3D27D4EB4F
_P64_3 = 0x165667B19E3779F9
_MX1 = np.uint64(0x165667919E3779F9)
_MX2 = np.uint64(0x9FB21C651E98DF25)
_M32 = np.uint64(0xFFFFFFFF)

_SCRATCH_BYTES = 2 << 20
"""Scratch per block of rows: about the L2 cache of a core (measured: less is slower)."""


def _u64(x: int) -> np.uint64:
    """``x`` mod 2**64 as a numpy scalar (numpy would warn on a scalar overflow)."""
    return np.uint64(x % 2**64)


def _key(offset: int, size: int = 8) -> int:
    """The little-endian word of ``size`` bytes of the secret at byte ``offset``."""
    return int.from_bytes(_SECRET[offset : offset + size], "little")


@cache
def _keys(offsets: Sequence[int], lanes: int = 1) -> U64:
    """(lanes, len(offsets)): the secret words at ``offset + 8 * lane`` for each offset.

    Read-only and cached: ``offsets`` is a tuple or a range.
    """
    keys = np.array([[_key(o + 8 * lane) for o in offsets] for lane in range(lanes)], np.uint64)
    keys.flags.writeable = False
    return keys


@lru_cache(maxsize=8)
def _row_keys(offsets: tuple[int, ...], n: int) -> U64:
    """(2, n, len(offsets)): ``_keys(offsets, 2)`` repeated for n rows, read-only.

    Materialised, not broadcast, so a ufunc runs over (row, chunk) as one long loop.
    """
    keys = np.repeat(_keys(offsets, 2)[:, None, :], n, axis=1)
    keys.flags.writeable = False
    return keys


def _words(
    rows: Bytes,
    offset: int,
    shape: tuple[int, ...] = (),
    strides: tuple[int, ...] = (),
    size: int = 8,
) -> npt.NDArray[np.unsignedinteger]:
    """(n, *shape) little-endian words of ``size`` bytes of every row from byte ``offset`` on.

    A view of the rows, no copy; ``strides`` are in bytes and may overlap or be unaligned.
    """
    first = rows[:, offset : offset + size].view(f"<u{size}")[:, 0]
    return as_strided(first, (rows.shape[0], *shape), (rows.strides[0], *strides), writeable=False)


def _mul128_fold64(a: U64, b: U64, tmp: U64) -> U64:
    """Low 64 bits xor high 64 bits of the 128-bit products ``a * b``.

    a and b are clobbered; ``tmp`` is (4, *a.shape) scratch, and the result is a view into it.
    """
    a_hi: U64  # becomes the result
    low, a_hi, b_hi, cross = tmp
    np.multiply(a, b, out=low)  # the low half wraps by itself
    np.right_shift(a, 32, out=a_hi)
    np.right_shift(b, 32, out=b_hi)
    a &= _M32
    b &= _M32
    np.multiply(a, b, out=cross)  # lo * lo
    a *= b_hi  # lo * hi
    b *= a_hi  # hi * lo
    a_hi *= b_hi  # hi * hi
    cross >>= 32
    cross += b  # (lo*lo >> 32) + hi*lo < 2**64
    np.bitwise_and(cross, _M32, out=b)
    a += b  # lo*hi + low half of the above < 2**64
    cross >>= 32
    a >>= 32
    a_hi += cross
    a_hi += a  # the high half
    a_hi ^= low
    return a_hi


def _avalanche(h: U64) -> U64:
    """XXH3_avalanche, in place."""
    h ^= h >> 37
    h *= _MX1
    h ^= h >> 32
    return h


def _avalanche_xxh64(h: U64) -> U64:
    """XXH64_avalanche, in place."""
    h ^= h >> 33
    h *= _u64(_P64_2)
    h ^= h >> 29
    h *= _u64(_P64_3)
    h ^= h >> 32
    return h


# Each length class hashes one block of rows (n, length) with ``work`` as flat uint64 scratch.


def _len_1to3(rows: Bytes, work: U64) -> U64:
    length = rows.shape[1]
    h = rows[:, length - 1].astype(np.uint64)
    h |= rows[:, 0].astype(np.uint64) << 16
    h |= rows[:, length >> 1].astype(np.uint64) << 24
    h ^= np.uint64((length << 8) ^ _key(0, 4) ^ _key(4, 4))
    return _avalanche_xxh64(h)


def _len_4to8(rows: Bytes, work: U64) -> U64:
    length = rows.shape[1]
    h = _words(rows, 0, size=4).astype(np.uint64)
    h <<= 32
    h += _words(rows, length - 4, size=4)
    h ^= np.uint64(_key(8) ^ _key(16))
    h ^= ((h << 49) | (h >> 15)) ^ ((h << 24) | (h >> 40))  # rrmxmx
    h *= _MX2
    h ^= (h >> 35) + np.uint64(length)
    h *= _MX2
    h ^= h >> 28
    return h


def _len_9to16(rows: Bytes, work: U64) -> U64:
    length = rows.shape[1]
    lo = _words(rows, 0) ^ np.uint64(_key(24) ^ _key(32))
    hi = _words(rows, length - 8) ^ np.uint64(_key(40) ^ _key(48))
    h = lo.byteswap()
    h += hi
    h += np.uint64(length)
    h += _mul128_fold64(lo, hi, work[: 4 * len(h)].reshape(4, -1))
    return _avalanche(h)


def _mix16(rows: Bytes, offset: int, keys: tuple[int, ...], work: U64) -> U64:
    """Sum of mix16B over 16-byte chunks from ``offset`` on, chunk i with the secret at keys[i]."""
    k, n = len(keys), rows.shape[0]
    chunks = _words(rows, offset, (k, 2), (16, 8)).transpose(2, 0, 1)  # (lo/hi, row, chunk)
    x = work[: 2 * k * n].reshape(2, n, k)
    np.bitwise_xor(chunks, _row_keys(keys, n), out=x)
    fold = _mul128_fold64(x[0], x[1], work[2 * k * n : 6 * k * n].reshape(4, n, k))
    return np.einsum("ij->i", fold)  # type: ignore[no-any-return]  # faster than sum(axis=1)


_MID_WORK = 6 * 8  # words of scratch per row: 8 chunks at most


def _len_17to128(rows: Bytes, work: U64) -> U64:
    length = rows.shape[1]
    rounds = (length - 1) // 32 + 1
    # Chunk i from the start mixes with secret 32i, chunk i from the end with 32i + 16.
    head = tuple(32 * i for i in range(rounds))
    tail = tuple(32 * i + 16 for i in reversed(range(rounds)))  # in input order
    if length == 32 * rounds:  # the chunks tile the row: one pass (128 bytes, the hot path)
        acc = _mix16(rows, 0, head + tail, work)
    else:
        acc = _mix16(rows, 0, head, work)
        acc += _mix16(rows, length - 16 * rounds, tail, work)
    acc += _u64(length * _P64_1)
    return _avalanche(acc)


def _len_129to240(rows: Bytes, work: U64) -> U64:
    length = rows.shape[1]
    acc = _mix16(rows, 0, tuple(range(0, 128, 16)), work)
    acc += _u64(length * _P64_1)
    _avalanche(acc)
    acc += _mix16(rows, length - 16, (136 - 17,), work)  # SECRET_SIZE_MIN - MIDSIZE_LASTOFFSET
    rest = length // 16 - 8
    if rest:
        acc += _mix16(rows, 128, tuple(range(3, 16 * rest, 16)), work)
    return _avalanche(acc)


def xxh3_64_rows(rows: np.ndarray) -> U64:
    """XXH3-64 (seed 0) of each row of a C-contiguous (n, length) uint8 array; returns uint64[n].

    Equal to ``xxhash.xxh3_64_intdigest(row.tobytes())`` for every row and every length >= 0.
    Rows need not follow each other in memory (a column slice of pages is fine), but each row's
    bytes must be contiguous, or the array is copied first.
    """
    if rows.ndim != 2 or rows.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 array, got {rows.ndim}-D {rows.dtype}")
    n, length = rows.shape
    if length == 0:
        return _avalanche_xxh64(np.full(n, _key(56) ^ _key(64), dtype=np.uint64))
    if rows.strides[1] != 1:
        rows = np.ascontiguousarray(rows)
    if length <= 16:
        hash_block = _len_1to3 if length <= 3 else _len_4to8 if length <= 8 else _len_9to16
        row_work = 4
    elif length <= 240:
        hash_block = _len_17to128 if length <= 128 else _len_129to240
        row_work = _MID_WORK
    else:
        # Long rows: the C library's SIMD loop beats numpy's half-dozen passes per word
        # (measured at 4 KiB: 0.3 us a row against 1.8 us), and only whole-page hashes of
        # false candidates, or a long --prefix-bytes, get here.
        digest = xxhash.xxh3_64_intdigest
        return np.fromiter((digest(row) for row in rows), np.uint64, n)
    step = max(1, _SCRATCH_BYTES // (8 * row_work))
    work = np.empty(row_work * min(n, step), dtype=np.uint64)
    if n <= step:
        return hash_block(rows, work)
    out = np.empty(n, dtype=np.uint64)
    for start in range(0, n, step):
        out[start : start + step] = hash_block(rows[start : start + step], work)
    return out
