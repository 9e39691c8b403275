"""LimeReader: LiME files as the LiME module and uncompressed AVML write them."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
from conftest import PS

from dumpwriter.lime import AVML_CHUNK_BYTES, avml_record, lime_header, make_avml, make_lime
from ksm_analyze.errors import DumpFormatError, TruncatedDumpError
from ksm_analyze.formats import DumpFormat, detect_format, open_dump
from ksm_analyze.formats.lime import LimeReader
from ksm_analyze.pages import PageState


def pages(n: int, seed: int) -> bytes:
    """``n`` distinct, non-zero pages."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, n * PS, dtype=np.uint8).tobytes()


def all_pages(reader: LimeReader, batch_pages: int = 8192) -> dict[int, bytes]:
    """Address -> page bytes from iter_batches, checked against read_pages."""
    out: dict[int, bytes] = {}
    for batch in reader.iter_batches(batch_pages):
        again = reader.read_pages(batch.addrs)
        assert np.array_equal(again, batch.pages)
        for addr, page in zip(batch.addrs.tolist(), batch.pages, strict=True):
            assert addr not in out
            out[addr] = page.tobytes()
    return out


def expected_pages(ranges: list[tuple[int, bytes]]) -> dict[int, bytes]:
    return {addr + i: data[i : i + PS] for addr, data in ranges for i in range(0, len(data), PS)}


def test_round_trip(tmp_path):
    ranges = [(0x1000, pages(3, 1)), (0x100000, pages(5, 2)), (0x100000000, pages(2, 3))]
    path = make_lime(tmp_path / "m.lime", ranges)
    with LimeReader(path) as r:
        assert r.format is DumpFormat.LIME
        assert [(e.addr, e.npages, e.state, e.file_offset) for e in r.extents] == [
            (0x1000, 3, PageState.DATA, 32),
            (0x100000, 5, PageState.DATA, 32 + 3 * PS + 32),
            (0x100000000, 2, PageState.DATA, 32 + 8 * PS + 64),
        ]
        assert r.extents[1].label == f"LiME record 1 (header at {32 + 3 * PS:#x})"
        assert all_pages(r) == expected_pages(ranges)
        assert all_pages(r, batch_pages=2) == expected_pages(ranges)
        assert r.warnings == []
        assert r.info() == {
            "records": 3,
            "ranges": [[0x1000, 0x4000], [0x100000, 0x105000], [0x100000000, 0x100002000]],
            "omitted_zero_pages": 0,
        }


def test_detected_and_opened(tmp_path):
    path = make_lime(tmp_path / "m.lime", [(0, pages(1, 1))])
    assert detect_format(path) is DumpFormat.LIME
    with open_dump(path) as r:
        assert isinstance(r, LimeReader)


def test_pickles_by_path(tmp_path):
    path = make_lime(tmp_path / "m.lime", [(0x2000, pages(2, 4))])
    with LimeReader(path) as r, pickle.loads(pickle.dumps(r)) as r2:
        assert r2.extents == r.extents
        assert all_pages(r2) == all_pages(r)


def test_partial_pages_are_skipped_with_one_warning(tmp_path):
    # /proc/iomem "System RAM" can end mid-page (00001000-0009fbff); a range could start
    # mid-page too. Whole pages keep their addresses; the rest is left out.
    body = pages(4, 5)
    ranges = [(0x9F000, pages(1, 6)[:0xC00]), (0x100800, body[0x800 : 0x800 + 0x800 + 2 * PS])]
    path = make_lime(tmp_path / "m.lime", ranges)
    with LimeReader(path) as r:
        assert [(e.addr, e.npages) for e in r.extents] == [(0x101000, 2)]
        data = all_pages(r)
        assert data == {0x101000: body[PS : 2 * PS], 0x102000: body[2 * PS : 3 * PS]}
        assert r.warnings == [
            (
                f"{path}: 2 LiME record(s) do not start and end on 4096-byte page boundaries "
                "(the first is record 0, [0x9f000, 0x9fc00)); their partial pages, 5 KiB, "
                "are ignored"  # 5120 bytes
            )
        ]


def test_larger_analysis_pages(tmp_path):
    path = make_lime(tmp_path / "m.lime", [(0x10000, pages(32, 7))])
    with LimeReader(path, page_size=0x10000) as r:
        assert [(e.addr, e.npages) for e in r.extents] == [(0x10000, 2)]
        assert r.warnings == []


def test_uncompressed_avml_gaps_are_zero(tmp_path):
    # avml without --compress: LiME records cut at 16 MiB, all-zero chunks left out.
    mem = bytearray(3 * AVML_CHUNK_BYTES)
    mem[:PS] = pages(1, 8)
    mem[2 * AVML_CHUNK_BYTES : 2 * AVML_CHUNK_BYTES + PS] = pages(1, 9)
    path = make_avml(tmp_path / "m.lime", [(0x100000, bytes(mem))], compress=False)
    with LimeReader(path) as r:
        assert detect_format(path) is DumpFormat.LIME
        zero = [e for e in r.extents if e.state == PageState.ZERO]
        assert [(e.addr, e.npages, e.file_offset) for e in zero] == [
            (0x100000 + AVML_CHUNK_BYTES, AVML_CHUNK_BYTES // PS, -1)
        ]
        assert zero[0].label == "all-zero chunks left out between LiME records 0 and 1"
        assert r.page_counts()[PageState.ZERO] == 4096
        assert r.page_counts()[PageState.DATA] == 2 * 4096
        assert r.info()["omitted_zero_pages"] == 4096
        assert r.warnings == []


def test_lime_module_ranges_are_not_taken_for_avml_chunks(tmp_path):
    # One range over 16 MiB means the LiME module wrote the file: gaps are holes.
    big = bytes(AVML_CHUNK_BYTES + PS)
    path = make_lime(tmp_path / "m.lime", [(0, big), (0x4000000, pages(1, 1))])
    with LimeReader(path) as r:
        assert r.page_counts()[PageState.ZERO] == 0


# -- bad input ----------------------------------------------------------------------------


def write(tmp_path, *parts: bytes):
    path = tmp_path / "bad.lime"
    path.write_bytes(b"".join(parts))
    return path


def good(addr: int = 0x1000, n: int = 1) -> bytes:
    return lime_header(addr, n * PS) + pages(n, addr)


def test_bad_magic_in_a_later_record(tmp_path):
    bad = struct.pack("<IIQQQ", 0x12345678, 1, 0x5000, 0x5FFF, 0) + bytes(PS)
    path = write(tmp_path, good(0x1000), good(0x2000), bad)
    with pytest.raises(DumpFormatError) as e:
        LimeReader(path)
    assert type(e.value) is DumpFormatError
    off = 2 * (32 + PS)
    assert str(e.value) == (
        f"{path} at offset {off:#x}: bad LiME magic 0x12345678 in record 2 (expected 0x4c694d45)"
    )
    assert e.value.offset == off


def test_unsupported_version(tmp_path):
    path = write(tmp_path, lime_header(0, PS, version=2) + bytes(PS))
    assert detect_format(path) is DumpFormat.LIME
    with pytest.raises(DumpFormatError, match=r"at offset 0x0: unsupported LiME version 2 in "):
        LimeReader(path)


def test_avml_record_inside_lime(tmp_path):
    path = write(tmp_path, good(0x1000), avml_record(0x2000, pages(1, 2)))
    with pytest.raises(DumpFormatError) as e:
        LimeReader(path)
    assert str(e.value) == (
        f"{path} at offset {32 + PS:#x}: record 1 is an AVML compressed record inside a LiME "
        "file; read the file with --format avml"
    )


def test_truncated_header(tmp_path):
    path = write(tmp_path, good(0x1000), lime_header(0x2000, PS)[:20])
    with pytest.raises(TruncatedDumpError) as e:
        LimeReader(path)
    assert str(e.value) == (
        f"{path} at offset {32 + PS:#x}: truncated: LiME record 1 header, 32 bytes, runs past "
        "the end of the file, which holds 4.05 KiB (4,148 bytes)"  # 32 + 4096 + 20
    )


def test_record_past_eof(tmp_path):
    path = write(tmp_path, good(0x1000), lime_header(0x10000, 4 * PS) + bytes(PS))
    with pytest.raises(TruncatedDumpError) as e:
        LimeReader(path)
    assert str(e.value) == (
        f"{path} at offset {32 + PS:#x}: truncated: LiME record 1 [0x10000, 0x14000) claims "
        "16 KiB but only 4 KiB remain in the file"
    )


def test_end_before_start(tmp_path):
    header = struct.pack("<IIQQQ", 0x4C694D45, 1, 0x2000, 0x1FFE, 0)
    path = write(tmp_path, good(0x1000), header + bytes(PS))
    with pytest.raises(DumpFormatError) as e:
        LimeReader(path)
    assert str(e.value) == (
        f"{path} at offset {32 + PS:#x}: LiME record 1 ends before it starts: "
        "e_addr 0x1ffe < s_addr 0x2000"
    )


def test_overlapping_ranges(tmp_path):
    path = write(tmp_path, good(0x1000, 2), good(0x2000, 1))
    with pytest.raises(DumpFormatError) as e:
        LimeReader(path)
    off = 32 + 2 * PS
    assert str(e.value) == (
        f"{path} at offset {off + 32:#x}: overlapping ranges: LiME record 1 (header at "
        f"{off:#x}) at address 0x2000 overlaps LiME record 0 (header at 0x0) [0x1000, 0x3000)"
    )
