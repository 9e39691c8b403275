"""Stage 1: zero detection in bulk and prefix hashing."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from conftest import PS

from ksm_analyze.formats.raw import RawReader
from ksm_analyze.hashing.stage1 import fingerprint, zero_rows
from ksm_analyze.options import ScanOptions

pytestmark = pytest.mark.usefixtures("kernel_path")  # each test with both kernel paths


@pytest.mark.parametrize("pos", [0, 63, 64, 2047, 4095])
def test_a_single_nonzero_byte_anywhere_makes_a_page_nonzero(pos):
    pages = np.zeros((5, PS), np.uint8)
    pages[2, pos] = 1
    assert zero_rows(pages).tolist() == [True, True, False, True, True]


def test_zero_rows_on_an_unaligned_view():
    buf = np.zeros(3 * PS + 1, np.uint8)
    buf[1 + PS + 4000] = 9
    pages = buf[1:].reshape(3, PS)  # as a QEMU ELF segment at an odd file offset gives
    assert zero_rows(pages).tolist() == [True, False, True]


@pytest.mark.parametrize("prefix_bytes", [128, 1, 4096, 0])
def test_prefix_hash_is_xxh3_of_the_first_bytes(tmp_path, prefix_bytes):
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 256, (4, PS), dtype=np.uint8)
    pages[1] = 0
    path = tmp_path / "r.raw"
    pages.tofile(path)
    with RawReader(path, base_address=0x10000) as r:
        t = fingerprint(r, ScanOptions(prefix_bytes=prefix_bytes), batch_pages=3)
    n = prefix_bytes or PS
    assert t.prefix_bytes == n
    assert t.zero.tolist() == [False, True, False, False]
    assert t.addrs.tolist() == [0x10000 + i * PS for i in range(4)]
    for i in (0, 2, 3):
        assert int(t.prefix[i]) == xxhash.xxh3_64_intdigest(pages[i, :n].tobytes())
    assert t.zero_pages == 1
    assert t.nonzero_pages == 3


def test_parallel_stage_1_gives_the_same_fingerprints(tmp_path, monkeypatch):
    # Two jobs (threads with the kernels, forked processes without) each write the batches
    # they hash into the one table: every page once, with the prefix one job gives it.
    import ksm_analyze.hashing.stage1 as fp

    monkeypatch.setattr(fp, "PARALLEL_MIN_PAGES", 1)
    rng = np.random.default_rng(5)
    pages = rng.integers(0, 256, (300, PS), dtype=np.uint8)
    pages[::7] = 0
    path = tmp_path / "r.raw"
    pages.tofile(path)
    with RawReader(path) as r:
        one = fingerprint(r, ScanOptions(jobs=1), batch_pages=16)
        two = fingerprint(r, ScanOptions(jobs=2), batch_pages=16)
    assert sorted(one.addrs.tolist()) == [i * PS for i in range(300)]
    assert dict(zip(one.addrs.tolist(), one.prefix.tolist(), strict=True)) == dict(
        zip(two.addrs.tolist(), two.prefix.tolist(), strict=True))
    assert len(two.addrs) == 300
