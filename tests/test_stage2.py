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


# -- a dump that decodes its pages (a compressed wrapper): the same answer, one pass -------------

def _lookalike_groups(groups, seed=11):
    """Pages in ``groups`` prefix groups: each holds two copies of one page, two copies of a
    second page with the same 128-byte prefix, and two single pages with it (false
    candidates), shuffled among zero pages; the last page is a single one (a pass over the
    candidates reads to the end). Also the full hashes stage 2 makes, known by construction:
    the pages of a group that differ from the first one in file order (4 if that one is
    one of a pair, 5 if it is a single)."""
    rng = np.random.default_rng(seed)
    pages, kind = [], []
    for g in range(groups):
        base = rng.integers(0, 256, PS, dtype=np.uint8)
        kinds = [base.copy() for _ in range(4)]
        for k, page in enumerate(kinds):
            page[128 + k * 7 :] = rng.integers(0, 256, PS - 128 - k * 7, dtype=np.uint8)
        pages += [kinds[0], kinds[0], kinds[1], kinds[1], kinds[2], kinds[3]]
        kind += [(g, 0), (g, 0), (g, 1), (g, 1), (g, 2), (g, 3)]
    pages += [np.zeros(PS, np.uint8)] * groups
    kind += [(-1, -1)] * groups
    order = rng.permutation(len(pages))
    last = int(np.flatnonzero(order == 4)[0])  # group 0's first single page goes last
    order[[last, -1]] = order[[-1, last]]
    first_kind: dict[int, int] = {}
    for i in order.tolist():
        first_kind.setdefault(kind[i][0], kind[i][1])
    full_hashes = sum(4 if k < 2 else 5 for g, k in first_kind.items() if g >= 0)
    return np.stack(pages)[order], full_hashes


def _wrapped(codec, pages, path):
    import bz2
    import gzip
    import lzma

    import zstandard

    data = pages.tobytes()
    packed = {"gzip": lambda: gzip.compress(data, mtime=0), "bzip2": lambda: bz2.compress(data),
              "xz": lambda: lzma.compress(data),
              "zstd": lambda: zstandard.ZstdCompressor().compress(data)}[codec]()
    path.write_bytes(packed)
    return path


def _classify_one(path, **kw):
    from ksm_analyze.formats import open_dump

    with open_dump(path) as r:
        tables = [fingerprint(r)]
        before = r.source.decoded_bytes if r.source is not None else 0
        classes = classify(tables, [r], ScanOptions(**kw))
        decoded = (r.source.decoded_bytes - before) / r.source.size if r.source else 0
    return tables, classes, decoded


@pytest.mark.parametrize("codec", ["gzip", "bzip2", "xz", "zstd"])
@pytest.mark.parametrize("budget", ["passes", "small cache", "collisions"])
def test_a_wrapped_dump_gives_the_plain_files_stage2_counters(tmp_path, monkeypatch, codec,
                                                               budget):
    # 30 groups, 2 held at a time: 15 passes over the representatives; with a cache of 5
    # pages most false candidates are read again; with every hash forced equal, collisions.
    monkeypatch.setattr(dedup, "REP_GROUPS", 2)
    monkeypatch.setattr(dedup, "BLOCK_PAGES", 7)
    if budget == "small cache":
        monkeypatch.setattr(dedup, "CACHE_PAGES", 5)
    if budget == "collisions":
        _hash_everything_to_42(monkeypatch)
    pages, full_hashes = _lookalike_groups(30)
    plain = _write(tmp_path / "g.raw", pages)
    _, plain_classes = _run([plain])
    wtables, classes, _ = _classify_one(_wrapped(codec, pages, tmp_path / "g.wrapped"))
    assert classes.stats == plain_classes.stats
    assert _class_counts(wtables, classes) == _truth_counts(pages)
    assert (classes.labels[0] == plain_classes.labels[0]).all()
    st = classes.stats
    assert st.prefix_candidates == 30 * 6 and st.false_candidates == 30 * 2
    if budget == "collisions":  # one prefix group and one full hash: only bytes tell apart
        assert st.hash_collisions > 0
    else:
        assert st.full_hashes == full_hashes and st.hash_collisions == 0


@pytest.mark.parametrize("jobs", [1, 2])
def test_stage2_decodes_a_wrapped_stream_at_most_once(tmp_path, monkeypatch, jobs):
    # xz keeps no checkpoints: a second pass over the candidates would decode the stream
    # again from its start (the last page is a false candidate: every pass reads to the end).
    monkeypatch.setattr(dedup, "PARALLEL_MIN_CANDIDATES", 1)  # two jobs would fork shards
    pages, _ = _lookalike_groups(40)
    _, classes, decoded = _classify_one(_wrapped("xz", pages, tmp_path / "g.xz"), jobs=jobs)
    assert classes.stats.false_candidates == 80
    assert _class_counts([], classes) == _truth_counts(pages)
    assert 0.9 < decoded <= 1.0


def test_a_scan_of_a_wrapped_dump_decodes_it_once_after_stage_1(tmp_path, monkeypatch):
    # The whole scan (report included: its top contents show one page of each) decodes the
    # xz stream once for stage 1 and at most once more; the report is the plain file's.
    import json

    from conftest import runner

    from ksm_analyze.cli import app
    from ksm_analyze.formats import streams

    decoded = []
    real_close = streams.Decompressed.close

    def close(self):
        decoded.append(self.decoded_bytes / self.size)
        real_close(self)

    monkeypatch.setattr(streams.Decompressed, "close", close)
    rng = np.random.default_rng(12)
    pool = rng.integers(0, 256, (8, PS), dtype=np.uint8)
    pages, _ = _lookalike_groups(20)
    pages = np.concatenate([pages, pool[rng.integers(0, 8, 60)], pool[:1]])  # late copies
    plain = _write(tmp_path / "g.raw", pages)
    wrapped = _wrapped("xz", pages, tmp_path / "g.xz")
    out = {}
    for path in (plain, wrapped):
        r = runner.invoke(app, ["scan", str(path), "--json"])
        assert r.exit_code == 0, r.output
        out[path] = json.loads(r.stdout)
    assert decoded and max(decoded) <= 2.0
    for name in ("top_contents", "histogram"):
        assert json.dumps(out[plain][name]).replace("g.raw", "X") == json.dumps(
            out[wrapped][name]).replace("g.xz", "X")
