"""Stage 2: equal means equal bytes, whatever the hashes say."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PS

from ksm_analyze.formats.raw import RawReader
from ksm_analyze.hashing import compiled as kernels
from ksm_analyze.hashing import stage1
from ksm_analyze.hashing import stage2 as dedup
from ksm_analyze.hashing.stage1 import fingerprint
from ksm_analyze.hashing.stage2 import UNIQUE, classify
from ksm_analyze.options import ScanOptions

pytestmark = pytest.mark.usefixtures("kernel_path")  # each test with both kernel paths


def _write(path, pages):
    np.asarray(pages, dtype=np.uint8).tofile(path)
    return path


def _run(paths, **kw):
    readers = [RawReader(p) for p in paths]
    try:
        tables = [fingerprint(r) for r in readers]
        return tables, classify(tables, readers, ScanOptions(**kw))
    finally:
        for r in readers:
            r.close()


def _truth_counts(*arrays):
    """Copies of each distinct non-zero page content, computed straight from the bytes."""
    pages = np.concatenate(arrays)
    pages = pages[pages.any(axis=1)]
    _, counts = np.unique(pages, axis=0, return_counts=True)
    return sorted(counts.tolist())


def _class_counts(tables, classes):
    """Copies of each distinct non-zero content, as stage 2 says."""
    content = np.concatenate(classes.labels)
    counts = np.bincount(content[content >= 0], minlength=classes.n_classes).tolist()
    singles = int(np.count_nonzero(content == UNIQUE))
    return sorted(counts + [1] * singles)


@pytest.fixture
def mixed(tmp_path):
    rng = np.random.default_rng(7)
    a, b, c = rng.integers(0, 256, (3, PS), dtype=np.uint8)
    a_lookalike = a.copy()
    a_lookalike[-1] ^= 0xFF  # same 128-byte prefix as a, different page
    one = np.stack([a, a, b, np.zeros(PS, np.uint8), a_lookalike, c])
    two = np.stack([b, a, rng.integers(0, 256, PS, dtype=np.uint8), a_lookalike])
    return _write(tmp_path / "one.raw", one), _write(tmp_path / "two.raw", two), one, two


def test_classes_match_the_bytes(mixed):
    p1, p2, one, two = mixed
    tables, classes = _run([p1, p2])
    assert _class_counts(tables, classes) == _truth_counts(one, two)
    st = classes.stats
    # a x3, b x2, lookalike x2 are candidates (prefix shared); c and the random page are not.
    assert st.prefix_candidates == 3 + 2 + 2
    assert st.false_candidates == 0
    # a's prefix group holds a x3 and the lookalikes x2: 4 compares with the first a find
    # the 2 lookalikes, which get full hashes and 1 compare between them; b needs 1.
    assert st.full_compares == 4 + 1 + 1
    assert st.full_hashes == 2
    assert st.hash_collisions == 0


def test_lookalike_prefix_alone_is_a_false_candidate(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, PS, dtype=np.uint8)
    b = a.copy()
    b[300] ^= 1
    _, classes = _run([_write(tmp_path / "x.raw", np.stack([a, b]))])
    assert classes.stats.prefix_candidates == 2
    assert classes.stats.false_candidates == 2
    assert classes.n_classes == 2


def _hash_everything_to_42(monkeypatch):
    def constant(rows):
        return np.full(len(rows), 42, np.uint64)

    real_prefixes = kernels.prefix_hashes

    def prefixes(pages, nbytes, skip=None):  # zero pages keep 0, every other page hashes 42
        return np.where(real_prefixes(pages, nbytes, skip) == 0, 0, 42).astype(np.uint64)

    monkeypatch.setattr(stage1, "xxh3_64_rows", constant)
    monkeypatch.setattr(dedup, "xxh3_64_rows", constant)
    monkeypatch.setattr(kernels, "prefix_hashes", prefixes)
    monkeypatch.setattr(kernels, "page_hashes", lambda pages, rows: constant(rows))


def test_forced_hash_collisions_are_split_by_bytes(mixed, monkeypatch):
    # Every page hashes to the same value in both stages: only the byte comparison can tell
    # the contents apart, and it must.
    _hash_everything_to_42(monkeypatch)
    p1, p2, one, two = mixed
    tables, classes = _run([p1, p2])
    assert _class_counts(tables, classes) == _truth_counts(one, two)
    nonzero = 9
    assert classes.stats.prefix_candidates == nonzero
    assert classes.stats.hash_collisions > 0


def test_no_verify_trusts_the_hashes(mixed, monkeypatch):
    _hash_everything_to_42(monkeypatch)
    p1, p2, _, _ = mixed
    _, classes = _run([p1, p2], verify=False)
    # With every hash equal and no comparison, all non-zero pages fall into one class:
    # exactly the failure --no-verify warns about.
    assert classes.n_classes == 1
    assert classes.stats.full_compares == 0
    assert not classes.stats.verified


def test_random_mix_against_numpy_unique(tmp_path):
    rng = np.random.default_rng(3)
    pool = rng.integers(0, 256, (40, PS), dtype=np.uint8)
    pool[:5, 128:] = 0  # pages equal in their tails
    pool[5:10, :128] = 0  # pages equal in their heads
    picks = [pool[rng.integers(0, 40, 200)] for _ in range(3)]
    paths = [_write(tmp_path / f"{i}.raw", p) for i, p in enumerate(picks)]
    tables, classes = _run(paths)
    assert _class_counts(tables, classes) == _truth_counts(*picks)


def test_many_parts_and_workers_give_the_same_classes(tmp_path, monkeypatch):
    # Stage 2 in parts of a few candidates each, and stage 1 and 2 in forked workers: the
    # classes must still be exactly the contents the bytes say.
    import ksm_analyze.hashing.stage1 as fp

    monkeypatch.setattr(dedup, "PART_CANDIDATES", 5)
    monkeypatch.setattr(dedup, "REP_GROUPS", 2)  # many passes over representatives
    monkeypatch.setattr(dedup, "BLOCK_PAGES", 3)  # groups span blocks
    monkeypatch.setattr(dedup, "PARALLEL_MIN_CANDIDATES", 1)
    monkeypatch.setattr(fp, "PARALLEL_MIN_PAGES", 1)
    rng = np.random.default_rng(9)
    pool = rng.integers(0, 256, (30, PS), dtype=np.uint8)
    picks = [pool[rng.integers(0, 30, 150)] for _ in range(2)]
    paths = [_write(tmp_path / f"{i}.raw", p) for i, p in enumerate(picks)]
    readers = [RawReader(p) for p in paths]
    try:
        tables = [fingerprint(r, ScanOptions(jobs=2), batch_pages=16) for r in readers]
        classes = classify(tables, readers, ScanOptions(jobs=2))
    finally:
        for r in readers:
            r.close()
    assert _class_counts(tables, classes) == _truth_counts(*picks)
    # Pages in one class hold the same bytes across parts and inputs.
    for k in range(classes.n_classes):
        members = [picks[i][(np.asarray(t.addrs) // PS).astype(np.int64)[classes.labels[i] == k]]
                   for i, t in enumerate(tables)]
        rows = np.concatenate(members)
        assert (rows == rows[0]).all()
