"""The huge-page what-if: merging only whole identical 2 MiB pages, and the THPs KSM splits.

Every expected figure is worked out by hand from the pages written below (or, for the
samples, by numpy over their bytes), never by the code under test. The rules
(docs/model.md, "Huge pages"): a huge page is a 2 MiB-aligned region all of whose 512
pages are present and in KSM's scope; two are identical when all 512 pages are; merging
them saves ``huge pages - distinct`` of them; KSM splits a THP holding any page it merges
(a zero page, or a content with two or more scanned pages on the host).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import PS, SAMPLES, runner

from dumpwriter.elf import make_elf_core
from dumpwriter.lime import make_avml
from dumpwriter.raw import make_raw
from ksm_analyze import analyze
from ksm_analyze.analysis import TABLES
from ksm_analyze.cli import app
from ksm_analyze.eligibility import Scope
from ksm_analyze.formats import DumpFormat
from ksm_analyze.formats.snapshot import RUN, RunFlags, SnapshotWriter
from ksm_analyze.hashing.stage1 import Fingerprints
from ksm_analyze.pages import Extent, PageState
from ksm_analyze.pipeline import NOT_OUT_OF_CORE
from ksm_analyze.render.report import render_html
from ksm_analyze.whatif import huge_pages
from ksm_analyze.whatif.huge_pages import huge_regions

N = 512  # 4 KiB pages in a 2 MiB page
HUGE = N * PS
ZERO = bytes(HUGE)


def _distinct_pages(seed: int, n: int = N) -> bytearray:
    """``n`` random pages, each unlike any other page of any seed (a 2**-32768 chance)."""
    return bytearray(np.random.default_rng(seed).bytes(n * PS))


R1, R2, R3 = bytes(_distinct_pages(1)), bytes(_distinct_pages(2)), bytes(_distinct_pages(3))
R1_BYTE = bytearray(R1)
R1_BYTE[7 * PS + 100] ^= 0xFF  # one byte of page 7 differs
R1_BYTE = bytes(R1_BYTE)


@pytest.fixture(scope="module")
def guests(tmp_path_factory) -> tuple[Path, Path]:
    """A: an ELF guest dump of R1, R1, R1 with one byte changed, zeros, and R2 with its last
    page missing (a hole at 8 MiB + 511 pages). B: a raw image of R1, zeros, R3."""
    d = tmp_path_factory.mktemp("huge")
    a = d / "a.elf"
    make_elf_core(a, [(0, R1 + R1 + R1_BYTE + ZERO), (4 * HUGE, R2[: (N - 1) * PS])])
    b = make_raw(d / "b.raw", R1 + ZERO + R3)
    return a, b


def _rows(result) -> dict[str, dict]:
    rows = result.columns["huge_pages"].rows()
    return {Path(r["input"]).name: r for r in rows}


@pytest.fixture(params=["default", "small_chunks", "few_passes"])
def steps(request, monkeypatch):
    """The what-if's address ranges as it takes them (1 GiB of rows), of about 700 rows,
    and at most two for rows in no order: the same figures."""
    if request.param == "small_chunks":
        monkeypatch.setattr(huge_pages, "CHUNK_ROWS", 700)
    elif request.param == "few_passes":
        monkeypatch.setattr(huge_pages, "CHUNK_ROWS", 700)
        monkeypatch.setattr(huge_pages, "MAX_PASSES", 2)


def test_identical_2mib_pages_within_and_across_inputs(guests, steps):
    a, b = guests
    rows = _rows(analyze([str(a), str(b)], jobs=1))
    assert list(rows) == ["a.elf", "b.raw", "host"]
    # A: regions 0-3 are whole (R1, R1, R1 one byte off, zeros); region 4 lacks a page.
    # Distinct within A: R1, R1-one-byte-off, zeros -> 3; one 2 MiB page saved.
    ra = rows["a.elf"]
    assert (ra["huge_pages"], ra["zero_huge_pages"], ra["distinct_huge_pages"]) == (4, 1, 3)
    assert ra["thp_intact_saved_pages"] == 1 * N
    assert ra["thp_intact_saved_bytes"] == HUGE
    # 4 KiB within A alone: non-zero pages 3*512 + 511 = 2047, distinct 512 (R1) + 1 (the
    # changed page) + 511 (R2) = 1024, each seen at most 3 times: 1023 saved; 512 zero pages
    # merge into ceil(512/256) = 2 KSM pages (max_page_sharing 256): 510 saved.
    assert ra["ksm_saved_pages"] == 1023 + 510
    assert ra["split_cost_pages"] == 1023 + 510 - 512
    assert ra["split_cost_bytes"] == (1023 + 510 - 512) * PS
    # A guest dump: every whole region counted as a THP; each holds a page KSM merges.
    assert ra["basis"] == "if_thp_backed"
    assert (ra["thp_huge_pages"], ra["split_huge_pages"]) == (4, 4)
    # B: R1, zeros, R3: three whole regions, all distinct within B.
    rb = rows["b.raw"]
    assert (rb["huge_pages"], rb["zero_huge_pages"], rb["distinct_huge_pages"]) == (3, 1, 3)
    assert rb["thp_intact_saved_pages"] == 0
    assert rb["ksm_saved_pages"] == 510  # only zero pages merge within B
    # R3's pages occur nowhere else and none is zero: KSM leaves that THP whole.
    assert (rb["thp_huge_pages"], rb["split_huge_pages"]) == (3, 2)
    # Host: 7 huge pages; distinct R1, R1-one-byte-off, zeros, R3 -> 4; 3 saved.
    rh = rows["host"]
    assert (rh["huge_pages"], rh["zero_huge_pages"], rh["distinct_huge_pages"]) == (7, 2, 4)
    assert rh["thp_intact_saved_pages"] == 3 * N
    # 4 KiB on the host: 1024 zero pages -> 4 KSM pages, 1020 saved; non-zero pages
    # 2047 + 1024 = 3071 of 512 + 1 + 511 + 512 = 1536 contents: 1535 saved.
    assert rh["ksm_saved_pages"] == 1020 + 1535
    assert rh["split_cost_pages"] == 1020 + 1535 - 3 * N
    assert (rh["thp_huge_pages"], rh["split_huge_pages"], rh["basis"]) == (7, 6, "if_thp_backed")


def test_a_region_off_by_one_byte_or_a_page_is_not_identical(tmp_path):
    """Two inputs each of one region: equal but for one byte, then equal but for a hole."""
    a, b = make_raw(tmp_path / "a.raw", R1), make_raw(tmp_path / "b.raw", R1_BYTE)
    rh = _rows(analyze([str(a), str(b)], jobs=1))["host"]
    assert (rh["huge_pages"], rh["distinct_huge_pages"], rh["thp_intact_saved_pages"]) == (2, 2, 0)
    c = tmp_path / "c.elf"
    make_elf_core(c, [(0, R1[: (N - 1) * PS])])  # R1 but for its last page
    rows = _rows(analyze([str(a), str(c)], jobs=1))
    assert rows["c.elf"]["huge_pages"] == 0
    assert (rows["host"]["huge_pages"], rows["host"]["distinct_huge_pages"]) == (1, 1)
    same = make_raw(tmp_path / "same.raw", R1)
    rh = _rows(analyze([str(a), str(same)], jobs=1))["host"]
    assert (rh["huge_pages"], rh["distinct_huge_pages"], rh["thp_intact_saved_pages"]) == (2, 1, N)


def test_zero_regions_merge_into_one(tmp_path, steps):
    """Four all-zero regions in two inputs are one content: three saved; and a region of
    pages the format marks zero (no stored row) is the same content."""
    a = make_raw(tmp_path / "a.raw", ZERO * 3)
    rows = _rows(analyze([str(a)], jobs=1))
    assert (rows["host"]["huge_pages"], rows["host"]["distinct_huge_pages"]) == (3, 1)
    b = tmp_path / "b.elf"
    make_elf_core(b, [(0, b"", HUGE)])  # PT_LOAD with no bytes: not saved, not zero
    assert _rows(analyze([str(b)], jobs=1))["host"]["huge_pages"] == 0
    # AVML leaves an all-zero 16 MiB chunk out: 8 regions of pages marked zero, no rows.
    # The chunk before it: 7 zero regions, then one whose last byte is 1; the chunk after
    # it holds one page (its region is not whole).
    chunk = 16 << 20
    first = bytearray(chunk)
    first[-1] = 1
    c = make_avml(tmp_path / "c.lime", [(0, bytes(first) + bytes(chunk) + b"\1" * PS)],
                  compress=False)
    rows = _rows(analyze([str(c)], jobs=1))
    assert (rows["host"]["huge_pages"], rows["host"]["zero_huge_pages"],
            rows["host"]["distinct_huge_pages"]) == (16, 15, 2)
    assert rows["host"]["thp_intact_saved_pages"] == 14 * N
    assert rows["host"]["split_huge_pages"] == 16  # zero pages in every one


def _runs(*rows: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros(len(rows), RUN)
    for i, row in enumerate(rows):
        out[i] = row
    return out


def test_snapshot_thps_split_as_recorded(tmp_path, steps):
    """A process's mergeable VMA of four 2 MiB regions at an aligned address: regions 0-2
    mapped by THPs, region 3 by 4 KiB pages; one page of region 0 equals one of region 1.
    A second VMA, not mergeable, holds a THP of zero pages: out of scope."""
    base = 0x7F0000000000  # 2 MiB aligned
    pages = bytearray(_distinct_pages(10, 4 * N))
    pages[N * PS + 5 * PS: N * PS + 6 * PS] = pages[3 * PS: 4 * PS]  # region 1 page 5 = region 0 page 3
    stored = RunFlags.PRESENT | RunFlags.STORED
    vma = {"start": base, "end": base + 4 * HUGE, "perms": "rw-p", "offset": 0, "path": "",
           "vmflags": "rd wr mr mw me ac mg"}
    plain = {"start": base + 8 * HUGE, "end": base + 9 * HUGE, "perms": "rw-p", "offset": 0,
             "path": "", "vmflags": "rd wr mr mw me ac"}
    path = tmp_path / "p.snapshot"
    meta = {"kernel": "6.1.0", "pfn_flags": "kpageflags"}
    with SnapshotWriter(path, page_size=PS, meta=meta) as w:
        w.begin_process({"pid": 7, "comm": "p", "cmdline": ["p"], "start_time": 1,
                         "vmas": [vma, plain]})
        w.write_pages(base, bytes(pages))
        w.write_pages(base + 8 * HUGE, ZERO)
        w.add_runs(_runs((base, 3 * N, stored | RunFlags.THP), (base + 3 * HUGE, N, stored),
                         (base + 8 * HUGE, N, stored | RunFlags.THP)))
        w.commit()
    result = analyze([str(path)], jobs=1)
    (row, host) = result.columns["huge_pages"].rows()
    assert row["basis"] == host["basis"] == "recorded"
    # Four whole regions in scope (the plain VMA is not mergeable), none alike.
    assert (row["huge_pages"], row["distinct_huge_pages"], row["thp_intact_saved_pages"]) == (4, 4, 0)
    # Three THPs; regions 0 and 1 hold the duplicated page: those two are split.
    assert (row["thp_huge_pages"], row["split_huge_pages"]) == (3, 2)
    # 4 KiB: the one duplicated page saved; THPs kept whole save nothing.
    assert (row["ksm_saved_pages"], row["split_cost_pages"]) == (1, 1)
    # --scope anon takes in the plain VMA: its zero THP is split too.
    anon = analyze([str(path)], jobs=1, scope="anon").columns["huge_pages"].rows()[0]
    assert (anon["huge_pages"], anon["zero_huge_pages"], anon["thp_huge_pages"],
            anon["split_huge_pages"]) == (5, 1, 4, 3)


def test_samples_against_numpy_over_their_bytes():
    """The samples' rows from their bytes: vm-a.elf holds 2 MiB at 0x3460000 (its PT_LOAD,
    tests/sample_dumps.json), not 2 MiB aligned; vm-b.raw 2 MiB at 0."""
    facts = json.loads((Path(SAMPLES[0]).parent.parent / "tests" / "sample_dumps.json")
                       .read_text())
    assert facts["files"]["vm-a.elf"]["monitor_command"].endswith("0x3460000 0x200000")
    a_bytes = Path(SAMPLES[0]).read_bytes()
    (phoff,), (phentsize, phnum) = struct.unpack_from("<Q", a_bytes, 32), \
        struct.unpack_from("<HH", a_bytes, 54)
    loads = [struct.unpack_from("<IIQQQQQ", a_bytes, phoff + i * phentsize)
             for i in range(phnum)]
    ((_, _, a_at, _, a_addr, a_size, _),) = [p for p in loads if p[0] == 1]  # PT_LOAD
    assert (a_addr, a_size) == (0x3460000, HUGE)
    a = np.frombuffer(a_bytes[a_at: a_at + HUGE], np.uint8).reshape(N, PS)
    b = np.frombuffer(Path(SAMPLES[1]).read_bytes(), np.uint8).reshape(N, PS)
    inputs = {"vm-a.elf": (0x3460000, a), "vm-b.raw": (0, b)}

    def saved(pages: np.ndarray) -> int:  # KSM at 4 KiB, max_page_sharing 256
        _, copies = np.unique(pages, axis=0, return_counts=True)
        return int((copies - -(-copies // 256)).sum())

    def whole(start: int) -> int:  # 2 MiB regions all of whose pages the input holds
        first, end = -(-start // HUGE) * HUGE, start + HUGE
        return max(0, (end - first) // HUGE)

    rows = _rows(analyze(SAMPLES, jobs=1))
    for name, (start, pages) in inputs.items():
        r = rows[name]
        assert r["huge_pages"] == whole(start)
        assert r["ksm_saved_pages"] == saved(pages)
        assert r["split_cost_pages"] == saved(pages)  # nothing identical to merge whole
        zero = not pages.any(axis=1).all()
        assert r["split_huge_pages"] == (whole(start) if zero else 0)
    assert rows["vm-a.elf"]["huge_pages"] == 0 and rows["vm-b.raw"]["huge_pages"] == 1
    h = rows["host"]
    assert h["ksm_saved_pages"] == saved(np.concatenate([a, b]))
    assert (h["huge_pages"], h["distinct_huge_pages"], h["thp_intact_saved_pages"]) == (1, 1, 0)


def test_outputs_carry_the_table(tmp_path):
    assert "huge_pages" in TABLES and "huge_pages" in NOT_OUT_OF_CORE
    r = runner.invoke(app, ["scan", *SAMPLES, "--json"])
    assert r.exit_code == 0, r.output
    host = json.loads(r.stdout)["huge_pages"][-1]
    assert host["input"] == "host" and host["split_cost_bytes"] == host["ksm_saved_bytes"]
    r = runner.invoke(app, ["scan", *SAMPLES, "--csv", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "huge_pages.csv").read_text().splitlines()
    assert lines[0].startswith("input,basis,huge_pages,") and len(lines) == 4
    page = render_html(analyze(SAMPLES, jobs=1), {})
    section = page[page.index('<h2 id="huge-pages">'):]
    assert "KSM at 4 KiB saves 3.59 MiB, splitting 1 of 1 THP: 3.59 MiB more" in section
    assert "huge_pages.csv" in section and "if_thp_backed" in section


def test_rows_in_any_order_and_pages_marked_zero_make_the_same_regions(steps):
    """Stage 1 gives rows in no set order: three regions of labelled rows, shuffled, and a
    zero extent (no rows) covering one whole region and half of the next, whose other half
    is zero rows: by hand, regions 0 and 1 hold labels 0..511 (equal), region 2 the same
    with its last label 600 (another content), regions 3 and 4 all zero -> 5 huge pages,
    3 distinct (0..511, ...600, zero)."""
    labels = np.r_[np.arange(N), np.arange(N), np.arange(N - 1), 600,
                   np.full(N // 2, -1)].astype(np.int32)  # -1: stage 2's ZERO
    addrs = np.r_[np.arange(3 * N) * PS, 4 * HUGE + np.arange(N // 2, N) * PS].astype(np.uint64)
    order = np.random.default_rng(5).permutation(len(addrs))
    prefix = np.where(labels == -1, 0, 1).astype(np.uint64)
    extents = [Extent(0, 3 * N, PageState.DATA, 0), Extent(3 * HUGE, N + N // 2, PageState.ZERO),
               Extent(4 * HUGE + HUGE // 2, N // 2, PageState.DATA, 3 * HUGE)]
    fp = Fingerprints("x", DumpFormat.RAW, "physical", PS, 128, extents, {}, [],
                      addrs[order], prefix[order], dict.fromkeys(PageState, 0))
    got = huge_regions([fp], [labels[order]], 601, Scope.ALL)
    (r,) = got.inputs
    assert (r.huge_pages, r.zero, r.distinct, got.host_distinct) == (5, 2, 3, 3)
    # Split if THP-backed: every region holds a merged page (labels 0..510 are seen in
    # three regions; zero pages merge).
    assert (r.thps, r.split, r.basis) == (5, 5, "if_thp_backed")


def test_fingerprint_files_without_their_dumps_give_the_same_rows(guests, tmp_path):
    """Fingerprint files carry the content hashes stage 2 labels pages by when the dumps
    are elsewhere: the same huge pages, the same figures."""
    copies = []
    for p in guests:
        copy = tmp_path / p.name
        copy.write_bytes(p.read_bytes())
        copies.append(str(copy))
    want = analyze(copies, jobs=1).columns["huge_pages"].rows()
    r = runner.invoke(app, ["fingerprint", *copies, "-o", str(tmp_path / "fp")])
    assert r.exit_code == 0, r.output
    for c in copies:
        Path(c).unlink()
    got = analyze(sorted(map(str, (tmp_path / "fp").iterdir())), jobs=1)
    assert got.columns["stages"].at("hash_bits", "value") == 128  # by content hash
    assert got.columns["huge_pages"].rows() == want
