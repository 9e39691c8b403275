"""The makedumpfile flattened container on its own: records, overlaps, gaps and bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from dumpwriter.kdump import write_flattened
from ksm_analyze.errors import DumpFormatError, TruncatedDumpError, UnsupportedDumpError
from ksm_analyze.formats import flattened
from ksm_analyze.formats.flattened import MDF_HEADER_SIZE, FlattenedFile, probe_flattened

REC = 16  # {be64 offset; be64 size}


def flat(tmp_path: Path, records: list[tuple[int, bytes]], **kw: bool) -> tuple[Path, bytes]:
    path = tmp_path / "flat"
    write_flattened(path, records, **kw)
    return path, path.read_bytes()


def test_probe() -> None:
    head = struct.pack(">16sqq", b"makedumpfile", 1, 1)
    assert probe_flattened(head)
    assert probe_flattened(head.ljust(MDF_HEADER_SIZE, b"\0"))
    assert not probe_flattened(head[:15])
    # Another type or version is the reader's to refuse (test_bad_headers_and_records).
    assert probe_flattened(struct.pack(">16sqq", b"makedumpfile", 1, 2))
    assert not probe_flattened(b"KDUMP   " + bytes(40))


def test_records_in_order(tmp_path: Path) -> None:
    path, data = flat(tmp_path, [(0, b"a" * 100), (100, b"b" * 50), (150, b"c" * 10)])
    f = FlattenedFile(data, str(path))
    assert (f.nrecords, f.size, f.warnings) == (3, 160, [])
    assert f.read(0, 160, "all") == b"a" * 100 + b"b" * 50 + b"c" * 10
    assert f.read(90, 20, "straddling") == b"a" * 10 + b"b" * 10
    first = MDF_HEADER_SIZE + REC  # file offset of the first record's data
    np.testing.assert_array_equal(
        f.file_offsets(np.array([0, 10, 90, 100]), np.array([100, 5, 20, 50])),
        [first, first + 10, -1, first + 100 + REC],
    )
    f.check_written(0, 160, "all")


def test_later_records_win(tmp_path: Path) -> None:
    path, data = flat(tmp_path, [(0, b"a" * 100), (40, b"b" * 20), (50, b"c" * 20)])
    f = FlattenedFile(data, str(path))
    assert f.read(0, 100, "all") == b"a" * 40 + b"b" * 10 + b"c" * 20 + b"a" * 30
    lstart, lend, _ = f.segments
    assert lstart.tolist() == [0, 40, 50, 70] and lend.tolist() == [40, 50, 70, 100]


def test_gap_reads_as_zero_but_is_not_written(tmp_path: Path) -> None:
    path, data = flat(tmp_path, [(200, b"z" * 10), (0, b"a" * 10)])
    f = FlattenedFile(data, str(path))
    assert f.size == 210
    assert f.read(5, 200, "gap") == b"a" * 5 + bytes(190) + b"z" * 5
    assert f.where(100) == (None, " (offset 0x64 of the reassembled dump)")
    assert f.where(200) == (MDF_HEADER_SIZE + REC, " (offset 0xc8 of the reassembled dump)")
    with pytest.raises(TruncatedDumpError) as e:
        f.check_written(5, 15, "table")
    assert str(e.value) == (
        f"{path}: truncated: part of the table (10 bytes at offset 0x5 of the reassembled dump) was never "
        "written by any flattened record: the dump is incomplete"
    )
    with pytest.raises(TruncatedDumpError, match=r"runs past its end \(0xd2\)"):
        f.read(200, 11, "tail")


def test_record_past_eof(tmp_path: Path) -> None:
    path, data = flat(tmp_path, [(0, b"a" * 100), (100, b"b" * 100)])
    cut = data[:-50]
    with pytest.raises(TruncatedDumpError) as e:
        FlattenedFile(cut, str(path))
    assert e.value.offset == MDF_HEADER_SIZE + REC + 100
    assert str(e.value) == (
        f"{path} at offset {MDF_HEADER_SIZE + REC + 100:#x}: truncated: flattened record of "
        f"100 bytes for offset 0x64 runs past the end of the file ({len(cut):#x})"
    )


def test_missing_end_marker(tmp_path: Path) -> None:
    path, data = flat(tmp_path, [(0, b"a" * 100)], end_marker=False)
    with pytest.raises(TruncatedDumpError) as e:
        FlattenedFile(data, str(path))
    assert str(e.value) == (
        f"{path} at offset {len(data):#x}: truncated: flattened dump ends without its end marker "
        "(offset -1, size -1): the dump is incomplete (the writer did not finish)"
    )


def test_bad_headers_and_records(tmp_path: Path) -> None:
    path, data = flat(tmp_path, [(0, b"a" * 100)])
    with pytest.raises(TruncatedDumpError, match=r"flattened header \(32 bytes\) runs past"):
        FlattenedFile(data[:20], str(path))
    bad_type = data[:16] + struct.pack(">q", 2) + data[24:]
    with pytest.raises(UnsupportedDumpError, match="of type 2, version 1: only type 1"):
        FlattenedFile(bad_type, str(path))
    bad_offset = data[:MDF_HEADER_SIZE] + struct.pack(">q", -5) + data[MDF_HEADER_SIZE + 8 :]
    with pytest.raises(DumpFormatError, match="at offset 0x1000: flattened record with bad"):
        FlattenedFile(bad_offset, str(path))
    f = FlattenedFile(data + bytes(100), str(path))
    at = MDF_HEADER_SIZE + REC + 100
    assert f.warnings == [
        f"{path}: 100 bytes after the flattened end marker at offset {at:#x} are ignored"
    ]


def test_overlapping_records_paint_like_writes() -> None:
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        starts = [int(x) for x in rng.integers(0, 100, n)]
        sizes = [int(x) for x in rng.integers(1, 40, n)]
        datas = [1000 * (r + 1) for r in range(n)]  # record r's data: file offset 1000 (r + 1)
        image = np.full(140, -1, np.int64)
        for s, z, d in zip(starts, sizes, datas, strict=True):
            image[s : s + z] = np.arange(d, d + z)
        lstart, lend, fstart = flattened._paint(
            np.array(starts), np.array(starts) + np.array(sizes), np.array(datas)
        )
        painted = np.full(140, -1, np.int64)
        for s, e, f in zip(lstart.tolist(), lend.tolist(), fstart.tolist(), strict=True):
            painted[s:e] = np.arange(f, f + e - s)
        np.testing.assert_array_equal(painted, image)
        assert np.all(lend[:-1] <= lstart[1:])
