"""Windows crash dumps: PAGEDU64 / PAGEDUMP, full and bitmap.

Files are built by tests/dumpwriter/windows.py from the published layouts (volatility3
``symbols/windows/crash64.json`` ``_DUMP_HEADER64``, ``crash.json`` ``_DUMP_HEADER``,
``crash_common.json`` ``_SUMMARY_DUMP``; ``layers/crash.py: WindowsCrashDump32Layer.
_load_segments`` for where pages lie; QEMU ``include/qemu/win_dump_defs.h`` ``WinDumpHeader64``,
what ``dump-guest-memory -w`` writes), not written by Windows. Expected addresses are worked
out by hand from the runs and the bitmap.
"""

from __future__ import annotations

import resource
import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from dumpwriter.windows import make_windows
from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.errors import DumpFormatError, TruncatedDumpError, UnsupportedDumpError
from ksm_analyze.formats import DumpFormat, detect_format, open_dump
from ksm_analyze.pages import PageState

P = 4096
runner = CliRunner()


def page(i: int) -> bytes:
    return struct.pack("<Q", 0xD0D00000 + i) * (P // 8)


def all_pages(reader) -> dict[int, bytes]:
    out = {}
    for b in reader.iter_batches(2):
        for a, row in zip(b.addrs.tolist(), b.pages, strict=True):
            out[a] = bytes(row)
    return out


@pytest.mark.parametrize("bits", [64, 32])
def test_full_dump_runs_back_to_back(tmp_path, bits):
    # runs: pages 1-2, then 0x100-0x102: five pages stored after the header in that order
    path = make_windows(tmp_path / "full.dmp", [(1, 2), (0x100, 3)],
                        b"".join(page(i) for i in range(5)), bits=bits)
    assert detect_format(path) is DumpFormat.WINDOWS
    with open_dump(path) as r:
        assert all_pages(r) == {P: page(0), 2 * P: page(1), 0x100 * P: page(2),
                                0x101 * P: page(3), 0x102 * P: page(4)}
        assert [bytes(x) for x in r.read_pages(np.array([0x102 * P, P], np.uint64))] == [
            page(4), page(0)]
        info = r.info()
        assert info["dump_type"] == "full (1)"
        assert info["header"] == f"{bits}-bit"
        assert info["runs"] == 2
        assert info["bugcheck_code"] == "0x161"
        assert info["machine"] == "x86_64"


@pytest.mark.parametrize("bits", [64, 32])
def test_bitmap_dump_left_out_pages_are_excluded(tmp_path, bits):
    # RAM: pages 0-9 and 16-19; the bitmap (24 pages) stores 1, 2, 7 and 17; pages 20-23 are
    # not RAM (no run): neither stored nor excluded
    path = make_windows(tmp_path / "bmp.dmp", [(0, 10), (16, 4)],
                        b"".join(page(i) for i in range(4)), bits=bits, dump_type=5,
                        bitmap=[1, 2, 7, 17], bitmap_pages=24, machine=0x14C)
    with open_dump(path) as r:
        assert all_pages(r) == {P: page(0), 2 * P: page(1), 7 * P: page(2), 17 * P: page(3)}
        excluded = [(e.addr // P, e.npages) for e in r.extents if e.state is PageState.EXCLUDED]
        assert excluded == [(0, 1), (3, 4), (8, 2), (16, 1), (18, 2)]
        counts = r.page_counts()
        assert counts[PageState.EXCLUDED] == 10
        assert counts[PageState.ZERO] == 0
        assert r.info()["dump_type"] == "bitmap (5)"
        assert r.info()["stored_pages"] == 4
    row = analyze([path]).per_input.iloc[0]  # excluded: neither zero nor any content
    assert (row["excluded_pages"], row["zero_pages"], row["nonzero_pages"]) == (10, 0, 4)
    assert row["ksm_rmap_items"] == 4


def test_bitmap_without_run_table_excludes_every_clear_bit(tmp_path):
    path = make_windows(tmp_path / "b.dmp", [], page(0), dump_type=5, bitmap=[3],
                        bitmap_pages=8)
    with open_dump(path) as r:
        assert r.page_counts()[PageState.EXCLUDED] == 7
        assert all_pages(r) == {3 * P: page(0)}


def test_bitmap_spanning_chunks(tmp_path, monkeypatch):
    """Runs of pages that cross the decoder's chunks come out whole."""
    from ksm_analyze.formats import windows

    monkeypatch.setattr(windows, "BITMAP_CHUNK", 1)  # 8 pages per chunk
    stored = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20]
    path = make_windows(tmp_path / "b.dmp", [(0, 24)],
                        b"".join(page(i) for i in range(len(stored))), dump_type=5,
                        bitmap=stored, bitmap_pages=24)
    with open_dump(path) as r:
        assert [(e.addr // P, e.npages, e.state) for e in r.extents] == [
            (0, 10, PageState.DATA), (10, 10, PageState.EXCLUDED), (20, 1, PageState.DATA),
            (21, 3, PageState.EXCLUDED)]
        assert all_pages(r) == {s * P: page(i) for i, s in enumerate(stored)}


@pytest.mark.parametrize(("dump_type", "name"), [
    (2, "a kernel (summary) memory dump"), (4, "a small memory dump (triage, minidump)"),
    (6, "a kernel memory dump (bitmap of kernel pages only)"), (3, "a header-only dump")])
def test_dumps_without_full_memory_are_refused(tmp_path, dump_type, name):
    path = make_windows(tmp_path / "k.dmp", [(0, 1)], page(0), dump_type=dump_type)
    with pytest.raises(UnsupportedDumpError) as e:
        open_dump(path)
    assert f"this is {name} (DumpType {dump_type})" in str(e.value)
    assert e.value.offset == 0xF98


def test_unknown_dump_type(tmp_path):
    path = make_windows(tmp_path / "u.dmp", [(0, 1)], page(0), dump_type=9)
    with pytest.raises(DumpFormatError, match="unknown DumpType 9"):
        open_dump(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "t.dmp"
    path.write_bytes(b"PAGEDU64" + bytes(100))
    with pytest.raises(TruncatedDumpError, match="the 64-bit dump header, 8 KiB, runs past"):
        open_dump(path)


def test_pages_past_the_end(tmp_path):
    path = make_windows(tmp_path / "s.dmp", [(0, 4)], page(0) * 3)
    with pytest.raises(TruncatedDumpError, match="run 0 of 16 KiB ends at 0x6000"):
        open_dump(path)


def test_too_many_runs(tmp_path):
    path = make_windows(tmp_path / "r.dmp", [(0, 1)], page(0))
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 0x88, 0xFFFFFFFF)
    path.write_bytes(data)
    with pytest.raises(DumpFormatError, match="NumberOfRuns is 4,294,967,295; "
                                              "PhysicalMemoryBlockBuffer holds at most 43"):
        open_dump(path)


def test_bitmap_count_must_match(tmp_path):
    path = make_windows(tmp_path / "c.dmp", [(0, 8)], page(0) * 2, dump_type=5,
                        bitmap=[1, 2], present=3)
    with pytest.raises(DumpFormatError, match="the bitmap marks 2 pages present but the "
                                              "_SUMMARY_DUMP says 3"):
        open_dump(path)


def test_bad_summary_signature(tmp_path):
    path = make_windows(tmp_path / "s.dmp", [(0, 8)], page(0), dump_type=5, bitmap=[1],
                        signature=b"XXXX")
    with pytest.raises(DumpFormatError, match="bitmap dump without its _SUMMARY_DUMP"):
        open_dump(path)


def test_hostile_bitmap_size_allocates_nothing(tmp_path):
    """BitmapSize 2^44 pages in a file of 12 KiB: refused before any bitmap is decoded."""
    path = make_windows(tmp_path / "h.dmp", [(0, 8)], page(0), dump_type=5, bitmap=[1])
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 0x2000 + 0x30, 1 << 44)
    path.write_bytes(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TruncatedDumpError, match="the bitmap of 17,592,186,044,416 pages"):
        open_dump(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB


def test_alternating_bitmap_is_capped(tmp_path):
    """A bitmap of alternating bits makes a range per page: capped like every reader's."""
    n = 8 * 200_000  # 200 KB of bitmap -> 1.6 M ranges, far over the cap for this size
    path = make_windows(tmp_path / "a.dmp", [(0, n)], b"", dump_type=5, bitmap=[],
                        bitmap_pages=n)
    data = bytearray(path.read_bytes())
    data[0x2038 : 0x2038 + n // 8] = b"\x55" * (n // 8)
    struct.pack_into("<Q", data, 0x2028, n // 2)
    path.write_bytes(data)
    with pytest.raises(DumpFormatError, match="ranges of pages, the most a file of"):
        open_dump(path)


def test_runs_disagreeing_with_number_of_pages_warn(tmp_path):
    path = make_windows(tmp_path / "w.dmp", [(0, 2)], page(0) * 2, number_of_pages=5)
    with open_dump(path) as r:
        assert r.warnings == [f"{path}: the runs hold 2 pages but NumberOfPages says 5"]


@pytest.mark.parametrize("case", ["truncated", "kernel", "past-end"])
def test_cli_errors_are_one_line(tmp_path, case):
    path = tmp_path / f"{case}.dmp"
    if case == "truncated":
        path.write_bytes(b"PAGEDUMP" + bytes(8))
    elif case == "kernel":
        make_windows(path, [(0, 1)], page(0), dump_type=6)
    else:
        make_windows(path, [(0, 9)], page(0))
    r = runner.invoke(app, ["scan", str(path)])
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1
    assert r.output.startswith(f"Error: {path}")


def test_bitmap_batches_are_cut_across_ranges(tmp_path):
    """Scattered stored pages still make full batches (one area of the file), in address
    order, the same pages as the ranges say; two shards see every page once."""
    stored = [1, 3, 5, 6, 9, 12, 13, 14, 20]
    path = make_windows(tmp_path / "s.dmp", [(0, 24)],
                        b"".join(page(i) for i in range(len(stored))), dump_type=5,
                        bitmap=stored, bitmap_pages=24)
    with open_dump(path) as r:
        batches = list(r.iter_batches(4))
        assert [len(b.addrs) for b in batches] == [4, 4, 1]
        assert [a // P for b in batches for a in b.addrs.tolist()] == stored
        assert [bytes(p) for b in batches for p in b.pages] == [page(i) for i in range(9)]
        halves = [[a for b in r.iter_batches(4, shard=k, shards=2) for a in b.addrs.tolist()]
                  for k in (0, 1)]
        assert sorted(halves[0] + halves[1]) == [s * P for s in stored]


@pytest.mark.parametrize("dump_type", [1, 5])
def test_a_gzip_of_a_dump_reads_as_the_dump(tmp_path, dump_type):
    # MEMORY.DMP.gz, by the gzip CLI: pages by hand (full: the runs back to back; bitmap:
    # pages 1, 2, 7 and 17 stored, the rest of RAM excluded), read through the stream
    import subprocess

    pages = b"".join(page(i) for i in range(4))
    path = (make_windows(tmp_path / "full.dmp", [(1, 2), (0x100, 2)], pages)
            if dump_type == 1 else
            make_windows(tmp_path / "bmp.dmp", [(0, 10), (16, 4)], pages, dump_type=5,
                         bitmap=[1, 2, 7, 17], bitmap_pages=24))
    subprocess.run(["gzip", "-k", str(path)], check=True)
    wrapped = path.with_name(path.name + ".gz")
    assert detect_format(wrapped) is DumpFormat.WINDOWS
    want = ({P: page(0), 2 * P: page(1), 0x100 * P: page(2), 0x101 * P: page(3)}
            if dump_type == 1 else
            {P: page(0), 2 * P: page(1), 7 * P: page(2), 17 * P: page(3)})
    with open_dump(wrapped) as r:
        assert r.source is not None and r.source.codec.value == "gzip"
        assert all_pages(r) == want
        got = r.read_pages(np.array(sorted(want, reverse=True), np.uint64))
        assert [bytes(p) for p in got] == [want[a] for a in sorted(want, reverse=True)]
        assert r.page_counts()[PageState.EXCLUDED] == (0 if dump_type == 1 else 10)
    assert analyze([wrapped]).host.to_dict() == analyze([path]).host.to_dict()
