"""AvmlReader: Snappy-compressed AVML files, left-out zero chunks, corrupt streams."""

from __future__ import annotations

import struct

import cramjam
import numpy as np
import pytest
from conftest import PS

from dumpwriter.lime import AVML_CHUNK_BYTES, avml_record, lime_header, make_avml
from ksm_analyze.errors import CorruptPageError, DumpFormatError, TruncatedDumpError
from ksm_analyze.formats import DumpFormat, detect_format, open_dump
from ksm_analyze.formats.avml import AvmlReader
from ksm_analyze.pages import PageState
from ksm_analyze.units import size_text

CHUNK = AVML_CHUNK_BYTES
AVML_HEADER = struct.Struct("<IIQQQ")


def pages(n: int, seed: int) -> bytes:
    """``n`` distinct pages, half random (stored uncompressed by Snappy), half compressible."""
    rng = np.random.default_rng(seed)
    out = rng.integers(1, 256, (n, PS), dtype=np.uint8)
    out[1::2, 64:] = out[1::2, :1]  # every other page compresses well
    return out.tobytes()


def read_all(reader: AvmlReader, batch_pages: int = 8192) -> dict[int, bytes]:
    """Address -> page bytes from iter_batches, checked against read_pages."""
    out: dict[int, bytes] = {}
    addresses = []  # in iteration order
    for batch in reader.iter_batches(batch_pages):
        assert batch.pages.shape == (len(batch.addrs), PS)
        assert len(batch.addrs) <= batch_pages
        addresses.append(batch.addrs)
        for addr, page in zip(batch.addrs.tolist(), batch.pages, strict=True):
            assert addr not in out
            out[addr] = page.tobytes()
    if addresses:
        locs = np.concatenate(addresses)
        assert [p.tobytes() for p in reader.read_pages(locs)] == list(out.values())
        values = list(out.values())
        sample = np.random.default_rng(0).permutation(len(locs))[:300]  # random access
        assert [p.tobytes() for p in reader.read_pages(locs[sample])] == [values[i] for i in sample]
    return out


def by_address(ranges: list[tuple[int, bytes]]) -> dict[int, bytes]:
    """Address -> page for whole pages of ``ranges`` that are not all zero."""
    out = {}
    for addr, data in ranges:
        for i in range(0, len(data) - PS + 1, PS):
            if data[i : i + PS].count(0) != PS:
                out[addr + i] = data[i : i + PS]
    return out


def test_round_trip(tmp_path):
    ranges = [(0x1000, pages(7, 1)), (0x100000, pages(40, 2))]
    path = make_avml(tmp_path / "m.avml", ranges)
    assert detect_format(path) is DumpFormat.AVML
    with open_dump(path) as r:
        assert isinstance(r, AvmlReader)
        assert [(e.addr, e.npages, e.state, e.file_offset) for e in r.extents] == [
            (0x1000, 7, PageState.DATA, -1),
            (0x100000, 40, PageState.DATA, -1),
        ]
        assert r.extents[0].label == "AVML record 0 (header at 0x0)"
        assert read_all(r) == by_address(ranges)
        assert read_all(r, batch_pages=3) == by_address(ranges)
        assert r.warnings == []
        info = r.info()
        assert info["records"] == info["compressed_records"] == 2
        assert info["ranges"] == [[0x1000, 0x8000], [0x100000, 0x128000]]
        assert info["snappy_chunks"] == 1 + 3  # 64 KiB each


def test_record_is_what_avml_writes(tmp_path):
    # image.rs: header (end inclusive, padding 0), framed stream, u64 LE stream length.
    # The header test vectors of image.rs (encode_header_lime, encode_header_avml):
    assert lime_header(0x1000, 0x20001 - 0x1000) == (
        b"\x45\x4d\x69\x4c\x01\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00"
        b"\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    )
    assert lime_header(0x1000, 0x20001 - 0x1000, magic=0x4C4D5641, version=2) == (
        b"\x41\x56\x4d\x4c\x02\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00"
        b"\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    )
    data = pages(2, 3)
    rec = avml_record(0x1000, data)
    assert rec[:32] == AVML_HEADER.pack(0x4C4D5641, 2, 0x1000, 0x2FFF, 0)
    assert rec[:4] == b"AVML"
    assert rec[32:42] == b"\xff\x06\x00\x00sNaPpY"
    (n,) = struct.unpack("<Q", rec[-8:])
    assert n == len(rec) - 40
    assert bytes(cramjam.snappy.decompress(rec[32:-8])) == data


def test_left_out_zero_chunks(tmp_path):
    # Range A as AVML reads /proc/iomem (end one byte short): three full chunks and a tail of
    # 4095 bytes; the middle chunk is all zero. Range B starts with a zero chunk.
    a = bytearray(3 * CHUNK + PS - 1)
    a[5 * PS : 7 * PS] = pages(2, 4)
    a[2 * CHUNK + 9 * PS : 2 * CHUNK + 10 * PS] = pages(1, 5)
    a[3 * CHUNK :] = b"\x01" * (PS - 1)
    b = bytearray(2 * CHUNK)
    b[CHUNK : CHUNK + 3 * PS] = pages(3, 6)
    ranges = [(0x100000, bytes(a)), (0x100000000, bytes(b))]
    path = make_avml(tmp_path / "m.avml", ranges)
    with AvmlReader(path) as r:
        assert [(e.addr, e.npages, e.state) for e in r.extents] == [
            (0x100000, 4096, PageState.DATA),
            (0x100000 + CHUNK, 4096, PageState.ZERO),
            (0x100000 + 2 * CHUNK, 4096, PageState.DATA),
            (0x100000000 + CHUNK, 4096, PageState.DATA),
        ]
        assert r.extents[1].label == "all-zero chunks left out between AVML records 0 and 1"
        stored = read_all(r)
        assert len(stored) == 3 * 4096
        assert {a: p for a, p in stored.items() if p.count(0) != PS} == by_address(ranges)
        assert r.warnings == [
            (
                f"{path}: 1 AVML record(s) do not start and end on 4096-byte page boundaries "
                "(the first is record 2, [0x3100000, 0x3100fff)); "
                "their partial pages, 4 KiB (4,095 bytes), are ignored"  # 4095 B = 3.999 KiB
            )
        ]
        assert r.info()["omitted_zero_pages"] == 4096
        counts = r.page_counts()
    # Nothing left out: the same memory, zero pages stored as data.
    full = make_avml(tmp_path / "full.avml", ranges, omit_zero_chunks=False)
    with AvmlReader(full) as r2:
        assert r2.page_counts()[PageState.ZERO] == 0
        stored = read_all(r2)
    zero = bytes(PS)
    assert len(stored) == counts[PageState.DATA] + counts[PageState.ZERO] + 4096  # B's chunk 0
    assert {a: p for a, p in stored.items() if p != zero} == by_address(ranges)


def test_zero_tail_chunks_cannot_be_placed(tmp_path):
    a = bytearray(CHUNK + PS - 1)  # the tail of 4095 zero bytes is left out
    a[:PS] = pages(1, 7)
    path = make_avml(tmp_path / "m.avml", [(0x100000, bytes(a)), (0x100000000, pages(1, 8))])
    with AvmlReader(path) as r:
        assert r.page_counts()[PageState.ZERO] == 0
        assert r.warnings == [
            (
                f"{path}: 1 gap(s) between records follow a full 16 MiB chunk but do not continue "
                "its range; AVML may have left out all-zero chunks there, which are not counted as "
                "zero pages"
            )
        ]


def test_lime_records_in_an_avml_file(tmp_path):
    # avml reads either kind of record (image.rs Header::read); take them both.
    one, two = pages(3, 9), pages(2, 10)
    path = tmp_path / "mixed.avml"
    path.write_bytes(avml_record(0x1000, one) + lime_header(0x10000, len(two)) + two)
    with AvmlReader(path) as r:
        assert [(e.addr, e.file_offset) for e in r.extents][1] == (
            0x10000,
            len(path.read_bytes()) - len(two),
        )
        assert read_all(r) == by_address([(0x1000, one), (0x10000, two)])
        assert r.info()["compressed_records"] == 1


def test_chunks_that_split_pages(tmp_path):
    # Any framed stream is valid: chunks of odd sizes, padding, skippable chunks, and a
    # repeated stream identifier.
    data = pages(6, 11)
    pieces = [
        bytes(cramjam.snappy.compress(data[c : c + 5000]))[10:] for c in range(0, len(data), 5000)
    ]
    extras = [b"\xfe\x03\x00\x00abc", b"\x80\x00\x00\x00", b"\xff\x06\x00\x00sNaPpY"]
    stream = b"\xff\x06\x00\x00sNaPpY"
    for i, piece in enumerate(pieces):
        stream += (extras[i % 3] if i else b"") + piece
    rec = AVML_HEADER.pack(0x4C4D5641, 2, 0x3000, 0x3000 + len(data) - 1, 0) + stream
    path = tmp_path / "odd.avml"
    path.write_bytes(rec + struct.pack("<Q", len(stream)))
    with AvmlReader(path) as r:
        assert read_all(r) == by_address([(0x3000, data)])
        assert read_all(r, batch_pages=1) == by_address([(0x3000, data)])


# -- bad input ----------------------------------------------------------------------------


def write(tmp_path, *parts: bytes):
    path = tmp_path / "bad.avml"
    path.write_bytes(b"".join(parts))
    return path


DATA_CHUNK = 32 + 10
"""Offset in a record of the first Snappy data chunk: after the header and stream identifier."""


def test_corrupt_snappy_data(tmp_path):
    good = avml_record(0x1000, pages(2, 12))
    bad = bytearray(avml_record(0x100000, pages(2, 13)))
    bad[DATA_CHUNK + 100] ^= 0x55  # inside the data: open works, decoding fails
    path = write(tmp_path, good, bytes(bad))
    with AvmlReader(path) as r:
        batches = r.iter_batches()
        next(batches)
        with pytest.raises(CorruptPageError) as e:
            next(batches)
        off = len(good)
        msg = str(e.value)
        assert msg.startswith(
            f"{path} at offset {off:#x}: AVML record 1: cannot decompress the Snappy chunks at "
            f"{off + 42:#x}-"
        )
        assert e.value.offset == off
        with pytest.raises(CorruptPageError, match="AVML record 1: cannot decompress"):
            r.read_pages(np.array([0x100000], np.uint64))


def test_bad_crc(tmp_path):
    rec = bytearray(avml_record(0x1000, pages(1, 14)))
    rec[DATA_CHUNK + 4] ^= 1  # the chunk's masked CRC-32C
    path = write(tmp_path, bytes(rec))
    with AvmlReader(path) as r, pytest.raises(CorruptPageError, match="bad checksum"):
        list(r.iter_batches())


def test_unskippable_chunk(tmp_path):
    rec = bytearray(avml_record(0x1000, pages(1, 15)))
    rec[DATA_CHUNK] = 0x05
    path = write(tmp_path, bytes(rec))
    with pytest.raises(CorruptPageError) as e:
        AvmlReader(path)
    assert str(e.value) == (
        f"{path} at offset 0x0: AVML record 0: unknown unskippable Snappy chunk type 0x5 at 0x2a"
    )


def test_no_stream_identifier(tmp_path):
    rec = bytearray(avml_record(0x1000, pages(1, 16)))
    del rec[32:42]
    rec[-8:] = struct.pack("<Q", len(rec) - 40)
    path = write(tmp_path, bytes(rec))
    with pytest.raises(CorruptPageError) as e:
        AvmlReader(path)
    assert (
        str(e.value) == f"{path} at offset 0x0: AVML record 0: no sNaPpY stream identifier at 0x20"
    )


def test_stream_holds_more_than_the_header_says(tmp_path):
    data = pages(2, 17)
    stream = bytes(cramjam.snappy.compress(data))
    header = AVML_HEADER.pack(0x4C4D5641, 2, 0x1000, 0x1000 + PS - 1, 0)  # claims one page
    path = write(tmp_path, header, stream, struct.pack("<Q", len(stream)))
    with pytest.raises(CorruptPageError) as e:
        AvmlReader(path)
    assert str(e.value) == (
        f"{path} at offset 0x0: AVML record 0: Snappy chunk at 0x2a holds 8192 bytes, past the "
        "4096 bytes the header covers or the 64 KiB a chunk may hold"
    )


def test_size_trailer_mismatch(tmp_path):
    rec = bytearray(avml_record(0x1000, pages(1, 18)))
    rec[-8:] = struct.pack("<Q", 12345)
    path = write(tmp_path, bytes(rec))
    with pytest.raises(DumpFormatError) as e:
        AvmlReader(path)
    assert str(e.value) == (
        f"{path} at offset {len(rec) - 8:#x}: AVML record 0: the size trailer says the Snappy "
        f"stream is 12345 bytes but it is {len(rec) - 40}"
    )


def test_truncated_stream(tmp_path):
    good = avml_record(0x1000, pages(1, 19))
    rec = avml_record(0x100000, pages(40, 20))
    path = write(tmp_path, good, rec[:-5000])
    with pytest.raises(TruncatedDumpError) as e:
        AvmlReader(path)
    assert str(e.value).startswith(f"{path} at offset ")
    assert "AVML record 1: Snappy chunk of " in str(e.value)
    assert str(e.value).endswith(
        f"runs past the end of the file, which holds {size_text(len(good) + len(rec) - 5000)}"
    )


def test_missing_size_trailer(tmp_path):
    rec = avml_record(0x1000, pages(1, 21))
    path = write(tmp_path, rec[:-8])
    with pytest.raises(TruncatedDumpError) as e:
        AvmlReader(path)
    assert str(e.value) == (
        f"{path} at offset {len(rec) - 8:#x}: truncated: AVML record 0 size trailer, 8 bytes, "
        f"runs past the end of the file, which holds {size_text(len(rec) - 8)}"
    )


def test_absurd_size(tmp_path):
    header = AVML_HEADER.pack(0x4C4D5641, 2, 0, (1 << 40) - 1, 0)
    path = write(tmp_path, header, bytes(cramjam.snappy.compress(b"x" * 100)), bytes(8))
    with pytest.raises(DumpFormatError) as e:
        AvmlReader(path)
    assert str(e.value) == (
        f"{path} at offset 0x0: AVML record 0 claims 1099511627776 bytes of memory, more than "
        f"the {path.stat().st_size - 32} bytes left in the file can hold compressed"
    )


def test_bad_magic_in_a_later_record(tmp_path):
    one = avml_record(0x1000, pages(1, 22))
    two = avml_record(0x2000, pages(1, 26))
    bad = AVML_HEADER.pack(0xDEADBEEF, 2, 0x5000, 0x5FFF, 0) + bytes(64)
    path = write(tmp_path, one, two, bad)
    with pytest.raises(DumpFormatError) as e:
        AvmlReader(path)
    assert type(e.value) is DumpFormatError
    assert str(e.value) == (
        f"{path} at offset {len(one) + len(two):#x}: bad AVML magic 0xdeadbeef in record 2 "
        "(expected 0x4c4d5641)"
    )


def test_unsupported_version(tmp_path):
    path = write(tmp_path, AVML_HEADER.pack(0x4C4D5641, 3, 0, 0xFFF, 0), bytes(64))
    assert detect_format(path) is DumpFormat.AVML
    with pytest.raises(DumpFormatError) as e:
        AvmlReader(path)
    assert str(e.value) == (
        f"{path} at offset 0x0: unsupported AVML version 3 in record 0 (expected 2)"
    )


def test_truncated_header(tmp_path):
    good = avml_record(0x1000, pages(1, 23))
    path = write(tmp_path, good, good[:31])
    with pytest.raises(TruncatedDumpError) as e:
        AvmlReader(path)
    assert str(e.value) == (
        f"{path} at offset {len(good):#x}: truncated: AVML record 1 header, 32 bytes, runs past "
        f"the end of the file, which holds {size_text(len(good) + 31)}"
    )


def test_end_before_start(tmp_path):
    path = write(tmp_path, AVML_HEADER.pack(0x4C4D5641, 2, 0x2000, 0x1000, 0), bytes(64))
    with pytest.raises(DumpFormatError) as e:
        AvmlReader(path)
    assert str(e.value) == (
        f"{path} at offset 0x0: AVML record 0 ends before it starts: e_addr 0x1000 < s_addr 0x2000"
    )


def test_overlapping_ranges(tmp_path):
    one = avml_record(0x1000, pages(2, 24))
    two = avml_record(0x2000, pages(1, 25))
    path = write(tmp_path, one, two)
    with pytest.raises(DumpFormatError) as e:
        AvmlReader(path)
    assert str(e.value) == (  # issue 9: every error names an offset, here record 1's header
        f"{path} at offset {len(one):#x}: overlapping ranges: AVML record 1 (header at "
        f"{len(one):#x}) at address 0x2000 overlaps AVML record 0 (header at 0x0) [0x1000, 0x3000)"
    )
