"""The vectorised xxh3-64 is bit-exact: every row hashes as the xxhash C library hashes it."""

from __future__ import annotations

import contextlib
import itertools
import warnings

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from ksm_analyze.hashing.xxh3 import _mul128_fold64, xxh3_64_rows

# As in test_fuzz.py: on a failure hypothesis imports its patch writer, whose libcst warns at
# import, which filterwarnings=error turns into an INTERNALERROR hiding the failure.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore")
    import hypothesis.extra._patching  # noqa: F401

LARGE = [511, 512, 1023, 1024, 1025, 1087, 1088, 1089, 2048, 2049, 4095, 4096, 4097, 8191, 8192]
"""Long inputs (the C library hashes them row by row), up to two whole pages."""


def expected(rows: np.ndarray) -> list[int]:
    return [xxhash.xxh3_64_intdigest(row.tobytes()) for row in rows]


def sample_rows(length: int, n: int = 6, seed: int = 0) -> np.ndarray:
    """Random rows plus an all-zero, an all-0xFF and a single-high-byte row."""
    rows = np.random.default_rng(seed + length).integers(0, 256, (n, length), dtype=np.uint8)
    rows[0] = 0
    rows[1] = 0xFF
    if length:
        rows[2] = 0
        rows[2, -1] = 0x80
    return rows


@pytest.mark.parametrize("length", [*range(301), *LARGE])
def test_every_length_matches_xxhash(length):
    rows = sample_rows(length)
    got = xxh3_64_rows(rows)
    assert got.dtype == np.uint64 and got.shape == (len(rows),)
    assert got.tolist() == expected(rows)


@pytest.mark.parametrize(("length", "n"), [(5, 70_000), (128, 12_000), (200, 6_000), (4096, 1_100)])
def test_many_rows_are_hashed_block_by_block(length, n):
    rows = sample_rows(length, n)
    assert xxh3_64_rows(rows).tolist() == expected(rows)


@pytest.mark.parametrize("length", [0, 3, 8, 16, 128, 240, 4096])
def test_no_rows(length):
    got = xxh3_64_rows(np.zeros((0, length), np.uint8))
    assert got.dtype == np.uint64 and got.shape == (0,)


@pytest.mark.parametrize("start", [0, 1, 3, 8])
@pytest.mark.parametrize("length", [2, 7, 12, 100, 128, 129, 241, 1500])
def test_rows_that_are_views(start, length):
    """Column slices of pages (strided, maybe unaligned rows), read-only and Fortran-order rows."""
    pages = sample_rows(2048, 5)
    rows = pages[:, start : start + length]
    assert xxh3_64_rows(rows).tolist() == expected(rows)
    frozen = np.frombuffer(pages.tobytes()[start:], np.uint8)[: 5 * length].reshape(5, length)
    assert xxh3_64_rows(frozen).tolist() == expected(frozen)
    fortran = np.asfortranarray(rows)
    assert xxh3_64_rows(fortran).tolist() == expected(rows)


def test_rejects_what_is_not_a_2d_byte_array():
    with pytest.raises(ValueError):
        xxh3_64_rows(np.zeros(16, np.uint8))
    with pytest.raises(ValueError):
        xxh3_64_rows(np.zeros((2, 16), np.uint16))


def test_mul128_fold64_at_the_edges():
    edges = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63, 2**64 - 2, 2**64 - 1, 0x9E3779B185EBCA87]
    pairs = list(itertools.product(edges, repeat=2))
    a = np.array([x for x, _ in pairs], np.uint64)
    b = np.array([y for _, y in pairs], np.uint64)
    want = [(x * y) % 2**64 ^ (x * y) >> 64 for x, y in pairs]
    got = _mul128_fold64(a, b, np.empty((4, len(pairs)), np.uint64))
    assert got.tolist() == want


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    length=st.one_of(st.integers(0, 260), st.integers(0, 3000)),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    fill=st.one_of(st.none(), st.integers(0, 255)),
)
def test_random_rows_match_xxhash(length, n, seed, fill):
    rows = np.random.default_rng(seed).integers(0, 256, (n, length), dtype=np.uint8)
    if fill is not None:
        rows[0] = fill
    assert xxh3_64_rows(rows).tolist() == expected(rows)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4), st.integers(0, 300))
def test_hypothesis_bytes_match_xxhash(blobs, length):
    """Contents hypothesis chooses (and shrinks), cut or zero-padded to one length."""
    rows = np.array([list(b[:length].ljust(length, b"\0")) for b in blobs], np.uint8)
    rows = rows.reshape(len(blobs), length)
    assert xxh3_64_rows(rows).tolist() == expected(rows)
