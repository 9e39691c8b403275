"""kdump-compressed reader: round trips through every codec, plain and flattened, and bad files."""

from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from dumpwriter.kdump import CODECS as CODEC_FLAGS
from dumpwriter.kdump import make_kdump, write_flattened
from ksm_analyze.errors import (
    CorruptPageError,
    DumpFormatError,
    TruncatedDumpError,
    UnsupportedDumpError,
)
from ksm_analyze.formats import kdump
from ksm_analyze.formats.kdump import KdumpReader
from ksm_analyze.pages import Extent, PageState

BS = 4096
CODECS = ["zlib", "lzo", "snappy", "zstd", "none"]
MAX_MAPNR = 0x200


def guest_pages(block_size: int = BS, seed: int = 1) -> dict[int, bytes]:
    """PFN -> page: compressible, incompressible (stored raw) and zero pages, with holes."""
    rng = np.random.default_rng(seed)
    pages = {}
    for pfn in [*range(0x10, 0x60), *range(0x100, 0x140), 0x1FF]:
        kind = pfn % 5
        if kind in (0, 3):
            pages[pfn] = bytes(block_size)
        elif kind == 1:
            pages[pfn] = rng.bytes(block_size)
        else:
            pages[pfn] = rng.bytes(32) * (block_size // 32)
    return pages


def read_all(reader: KdumpReader) -> dict[int, bytes]:
    """Address -> bytes of every page iter_batches yields not flagged zero, checking
    read_pages agrees (also on the flagged ones: they read as zero)."""
    got: dict[int, bytes] = {}
    for batch in reader.iter_batches(batch_pages=16):
        assert batch.addrs.dtype == np.uint64
        assert batch.pages.shape == (len(batch.addrs), reader.page_size)
        zero = np.zeros(len(batch.addrs), bool) if batch.zero is None else batch.zero
        again = reader.read_pages(batch.addrs[::-1])[::-1]
        np.testing.assert_array_equal(again[~zero], batch.pages[~zero])
        assert not again[zero].any()
        for addr, page in zip(batch.addrs[~zero].tolist(), batch.pages[~zero], strict=True):
            assert addr not in got
            got[addr] = page.tobytes()
    return got


def flagged_zero(reader: KdumpReader) -> set[int]:
    """Addresses iter_batches flags as zero pages (zero descriptors, never decoded)."""
    return {a for b in reader.iter_batches(batch_pages=16) if b.zero is not None
            for a in b.addrs[b.zero].tolist()}


def expected_data(pages: dict[int, bytes], block_size: int, page_size: int) -> dict[int, bytes]:
    out = {}
    for pfn, page in pages.items():
        if any(page):
            for k in range(0, block_size, page_size):
                out[pfn * block_size + k] = page[k : k + page_size]
    return out


def states_by_pfn(reader: KdumpReader, block_size: int) -> dict[int, PageState]:
    ps = reader.page_size
    return {
        (e.addr + k * ps) // block_size: e.state for e in reader.extents for k in range(e.npages)
    }


@pytest.mark.parametrize("flattened", [False, True], ids=["plain", "flattened"])
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip(tmp_path: Path, codec: str, flattened: bool) -> None:
    pages = guest_pages()
    path = tmp_path / "vmcore"
    layout = make_kdump(
        path, pages, max_mapnr=MAX_MAPNR, compression=codec, flattened=flattened, dump_level=1
    )
    flags = {f for _, _, f in layout.descriptors.values()}
    assert flags == ({0} if codec == "none" else {0, CODEC_FLAGS[codec]})
    with KdumpReader(path) as r:
        assert read_all(r) == expected_data(pages, BS, BS)
        zero = [p for p, v in pages.items() if not any(v)]
        assert states_by_pfn(r, BS) == dict.fromkeys(pages, PageState.DATA)
        assert flagged_zero(r) == {p * BS for p in zero}
        info = r.info()
        assert info["flattened"] is flattened
        assert info["compression"] == ([] if codec == "none" else [codec])
        assert info["dumpable_pages"] == len(pages)
        assert info["zero_pages"] == len(zero)
        assert info["excluded_pages"] == 0
        assert (info["block_size"], info["max_mapnr"], info["dump_level"]) == (BS, MAX_MAPNR, 1)
        assert info["utsname"]["machine"] == "x86_64"
        assert r.warnings == []


def test_extents_merge_runs_and_skip_holes(tmp_path: Path) -> None:
    pages = {pfn: b"\x11" * BS for pfn in range(4, 8)}
    pages.update({8: bytes(BS), 9: bytes(BS), 12: b"\x22" * BS})
    make_kdump(tmp_path / "k", pages, max_mapnr=16, excluded_pfns=(10, 11, 13))
    with KdumpReader(tmp_path / "k") as r:
        assert r.extents == [
            Extent(4 * BS, 6, PageState.DATA),  # zero pages 8 and 9 are data, flagged zero
            Extent(10 * BS, 2, PageState.EXCLUDED),
            Extent(12 * BS, 1, PageState.DATA),
            Extent(13 * BS, 1, PageState.EXCLUDED),
        ]


def test_chunked_classification_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PFN chunks smaller than the runs: ranks carry over and runs merge across chunks."""
    pages = guest_pages()
    make_kdump(tmp_path / "k", pages, max_mapnr=MAX_MAPNR, flattened=True, excluded_pfns=(0x70,))
    with KdumpReader(tmp_path / "k") as r:
        extents, data = r.extents, read_all(r)
    monkeypatch.setattr(kdump, "_CHUNK_PFNS", 7)  # not a whole byte of bits
    with KdumpReader(tmp_path / "k") as r:
        assert len(r._chunks) == -(-MAX_MAPNR // 7)
        assert r.extents == extents
        assert read_all(r) == data


@pytest.mark.parametrize("flattened", [False, True], ids=["plain", "flattened"])
def test_64k_guest_pages_are_split(tmp_path: Path, flattened: bool) -> None:
    bs = 0x10000
    pages = {3: bytes(bs), 4: b"\x01" * bs, 5: np.random.default_rng(0).bytes(bs)}
    pages[6] = bytes(bs - 4096) + b"\x07" * 4096  # sub-pages 0-14 zero, 15 not
    make_kdump(tmp_path / "k", pages, max_mapnr=8, block_size=bs, flattened=flattened)
    with KdumpReader(tmp_path / "k", page_size=4096) as r:
        assert r.extents == [
            Extent(3 * bs, 64, PageState.DATA),
        ]
        assert flagged_zero(r) == {3 * bs + k * 4096 for k in range(16)}
        got = read_all(r)
        assert got == expected_data(pages, bs, 4096)
        assert got[6 * bs + 15 * 4096] == b"\x07" * 4096
    with KdumpReader(tmp_path / "k", page_size=bs) as r:
        assert read_all(r) == expected_data(pages, bs, bs)


def test_block_size_smaller_than_page_size(tmp_path: Path) -> None:
    make_kdump(tmp_path / "k", {1: b"\x01" * BS}, max_mapnr=4)
    with pytest.raises(DumpFormatError) as e:
        KdumpReader(tmp_path / "k", page_size=0x10000)
    assert e.value.offset == 0x1AC
    assert "block_size 4096 (the guest page size) is smaller than the analysis page size 65536" in (
        str(e.value)
    )


def test_zero_pages_are_not_decompressed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pages = {pfn: bytes(BS) for pfn in range(20)}
    pages[7] = b"\x05" * BS
    make_kdump(tmp_path / "k", pages, max_mapnr=32)
    calls = []
    decompress = KdumpReader._decompress

    def counting(self: KdumpReader, flags: int, data: bytes, out: np.ndarray) -> None:
        calls.append(flags)
        decompress(self, flags, data, out)

    monkeypatch.setattr(KdumpReader, "_decompress", counting)
    with KdumpReader(tmp_path / "k") as r:
        (batch,) = list(r.iter_batches())
        assert batch.addrs.tolist() == [p * BS for p in range(20)]
        assert batch.zero is not None and batch.zero.tolist() == [p != 7 for p in range(20)]
        assert batch.pages[7].tobytes() == b"\x05" * BS
    assert calls == [0x1]  # one page decompressed: the zero pages were never read


def test_zero_pages_without_zero_descriptor_are_data(tmp_path: Path) -> None:
    """makedumpfile without dump level bit 1 stores zero pages like any other."""
    pages = {1: bytes(BS), 2: b"\x01" * BS, 3: bytes(BS)}
    make_kdump(tmp_path / "k", pages, max_mapnr=4, zero_page_descriptor=False)
    with KdumpReader(tmp_path / "k") as r:
        assert read_all(r) == {a * BS: p for a, p in pages.items()}
        assert flagged_zero(r) == set()


def test_raw_first_page_that_is_not_zero_is_data(tmp_path: Path) -> None:
    """Without a zero page, the first page at data_start looks like pd_zero but is data."""
    page = np.random.default_rng(3).bytes(BS)
    make_kdump(
        tmp_path / "k", {1: page}, max_mapnr=4, compression="none", zero_page_descriptor=False
    )
    with KdumpReader(tmp_path / "k") as r:
        assert r.extents == [Extent(BS, 1, PageState.DATA)]
        assert read_all(r) == {BS: page}


def test_excluded_pages(tmp_path: Path) -> None:
    pages = guest_pages()
    excluded = (0x60, 0x61, 0x62, 0x150)
    make_kdump(tmp_path / "k", pages, max_mapnr=MAX_MAPNR, excluded_pfns=excluded, dump_level=31)
    with KdumpReader(tmp_path / "k") as r:
        states = states_by_pfn(r, BS)
        assert {p for p, s in states.items() if s == PageState.EXCLUDED} == set(excluded)
        assert set(states) == set(pages) | set(excluded)  # holes are not reported
        assert r.info()["excluded_pages"] == 4
        assert read_all(r) == expected_data(pages, BS, BS)


def test_dump_level_warning(tmp_path: Path) -> None:
    make_kdump(tmp_path / "k", {1: b"\x01" * BS}, max_mapnr=4, dump_level=31)
    with KdumpReader(tmp_path / "k") as r:
        assert r.warnings == [
            f"{tmp_path / 'k'}: dump level 31 excludes user/free pages: KSM savings cannot be "
            + "estimated from this dump (take it with makedumpfile -d 0 or -d 1)"
        ]


def test_incomplete_status_warning(tmp_path: Path) -> None:
    path = tmp_path / "k"
    make_kdump(path, {1: b"\x01" * BS}, max_mapnr=4)
    patch(path, 424, struct.pack("<I", 0x1 | 0x8))
    with KdumpReader(path) as r:
        assert len(r.warnings) == 1
        assert "the dump header says the dump is incomplete (status 0x9)" in r.warnings[0]


@pytest.mark.parametrize("layout", [64, 32])
@pytest.mark.parametrize("endian", ["<", ">"], ids=["little", "big"])
@pytest.mark.parametrize("flattened", [False, True], ids=["plain", "flattened"])
def test_byte_order_and_word_size(
    tmp_path: Path, layout: int, endian: str, flattened: bool
) -> None:
    pages = guest_pages()
    make_kdump(
        tmp_path / "k",
        pages,
        max_mapnr=MAX_MAPNR,
        endian=endian,
        layout=layout,
        flattened=flattened,
        excluded_pfns=(0x70,),
    )
    with KdumpReader(tmp_path / "k") as r:
        info = r.info()
        assert info["byte_order"] == ("little" if endian == "<" else "big")
        assert info["layout"] == f"{layout}-bit"
        assert info["max_mapnr"] == MAX_MAPNR
        assert info["excluded_pages"] == 1
        assert read_all(r) == expected_data(pages, BS, BS)


def test_old_header_version_uses_32bit_max_mapnr(tmp_path: Path) -> None:
    pages = guest_pages()
    make_kdump(tmp_path / "k", pages, max_mapnr=MAX_MAPNR, header_version=5)
    with KdumpReader(tmp_path / "k") as r:
        assert (r.info()["header_version"], r.info()["max_mapnr"]) == (5, MAX_MAPNR)
        assert read_all(r) == expected_data(pages, BS, BS)


def test_flattened_later_records_win(tmp_path: Path) -> None:
    pages = guest_pages()
    layout = make_kdump(tmp_path / "k", pages, max_mapnr=MAX_MAPNR, flattened=True)
    decoys = [(at, b) for at, b in layout.records if set(b) <= {0xDD, 0xEE}]
    assert len(decoys) == 2  # over the header, and straddling two data records
    with KdumpReader(tmp_path / "k") as r:
        assert r.info()["flattened_records"] == len(layout.records)
        assert read_all(r) == expected_data(pages, BS, BS)
    # The same records with the decoys last: now they win and the header is garbage.
    write_flattened(tmp_path / "bad", layout.records[2:] + decoys)
    with pytest.raises(DumpFormatError, match="bad kdump signature"):
        KdumpReader(tmp_path / "bad")


def test_flattened_reads_like_the_reassembled_file(tmp_path: Path) -> None:
    """Gaps read as zero, pages straddle records, later records win: as makedumpfile -R."""
    pages = guest_pages()
    layout = make_kdump(tmp_path / "plain", pages, max_mapnr=MAX_MAPNR)
    make_kdump(tmp_path / "flat", pages, max_mapnr=MAX_MAPNR, flattened=True)
    plain = (tmp_path / "plain").read_bytes()
    with KdumpReader(tmp_path / "flat") as r:
        assert r._lread(0, layout.size, "all") == plain
        for at in range(0, layout.size - 5000, 3001):
            assert r._lread(at, 5000, "part") == plain[at : at + 5000]
        with pytest.raises(TruncatedDumpError, match="runs past its end"):
            r._lread(layout.size - 10, 11, "tail")


def test_split_dump_part(tmp_path: Path) -> None:
    pages = guest_pages()
    make_kdump(tmp_path / "k", pages, max_mapnr=MAX_MAPNR, split=(0x20, 0x110))
    with KdumpReader(tmp_path / "k") as r:
        assert r.info()["split"] == [0x20, 0x110]
        assert "holds PFNs 0x20-0x110 only" in r.warnings[0]
        assert set(states_by_pfn(r, BS)) == {p for p in pages if 0x20 <= p < 0x110}
        part = {p: v for p, v in pages.items() if 0x20 <= p < 0x110}
        assert read_all(r) == expected_data(part, BS, BS)


def test_probe() -> None:
    assert KdumpReader.probe(b"KDUMP   " + bytes(100))
    assert KdumpReader.probe(b"DISKDUMP")
    flat = struct.pack(">16sqq", b"makedumpfile", 1, 1)
    assert KdumpReader.probe(flat)
    # The signature is enough: another type is the reader's to refuse, not raw.
    assert KdumpReader.probe(struct.pack(">16sqq", b"makedumpfile", 2, 1))
    assert not KdumpReader.probe(flat[:15])
    assert not KdumpReader.probe(b"")
    assert not KdumpReader.probe(b"\x7fELF" + bytes(60))


def test_pickles_by_path(tmp_path: Path) -> None:
    make_kdump(tmp_path / "k", guest_pages(), max_mapnr=MAX_MAPNR, flattened=True)
    with KdumpReader(tmp_path / "k") as r, pickle.loads(pickle.dumps(r)) as r2:
        assert r2.extents == r.extents
        assert read_all(r2) == read_all(r)


# -- bad files ---------------------------------------------------------------------------------


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_bad_block_size(tmp_path: Path) -> None:
    path = tmp_path / "k"
    make_kdump(path, {1: b"\x01" * BS}, max_mapnr=4)
    patch(path, 428, struct.pack("<i", 3000))
    with pytest.raises(DumpFormatError) as e:
        KdumpReader(path)
    assert e.value.offset == 0x1AC
    assert str(e.value) == (
        f"{path} at offset 0x1ac: block_size 3000 (0xbb8) is not a power of two from 512 to "
        "1 MiB in the kdump header"
    )


def test_bad_signature(tmp_path: Path) -> None:
    path = tmp_path / "k"
    make_kdump(path, {1: b"\x01" * BS}, max_mapnr=4)
    patch(path, 0, b"KDUMPXXX")
    with pytest.raises(DumpFormatError, match=r"at offset 0x0: bad kdump signature b'KDUMPXXX'"):
        KdumpReader(path)


def test_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes(b"KDUMP   " + bytes(192))
    with pytest.raises(TruncatedDumpError) as e:
        KdumpReader(path)
    assert str(e.value) == (
        f"{path} at offset 0x0: truncated: kdump header, 464 bytes, runs past the end of the file, "
        "which holds 200 bytes"
    )


def test_truncated_bitmap(tmp_path: Path) -> None:
    path = tmp_path / "k"
    layout = make_kdump(path, {1: b"\x01" * BS}, max_mapnr=70000)  # 8750-byte bitmaps
    truncate(path, layout.bitmap2 + 100)
    with pytest.raises(TruncatedDumpError) as e:
        KdumpReader(path)
    assert e.value.offset == layout.bitmap2
    # 8750 bytes = 8.545 KiB
    assert ("truncated: bitmap 2 of 0x11170 PFNs, 8.54 KiB (8,750 bytes), runs past the end of "
            "the file" in str(e.value))


def test_descriptor_table_past_eof(tmp_path: Path) -> None:
    path = tmp_path / "k"
    layout = make_kdump(path, guest_pages(), max_mapnr=MAX_MAPNR)
    truncate(path, layout.desc_start + 24 * 10)
    n = len(guest_pages())
    with pytest.raises(TruncatedDumpError) as e:
        KdumpReader(path)
    assert e.value.offset == layout.desc_start
    assert f"page descriptor table ({n} descriptors, {24 * n} bytes) runs past the end of" in (
        str(e.value)
    )


def test_absurd_dumpable_count(tmp_path: Path) -> None:
    """A bitmap 2 full of set bits claims more descriptors than the file can hold."""
    path = tmp_path / "k"
    layout = make_kdump(path, {1: b"\x01" * BS}, max_mapnr=MAX_MAPNR)
    patch(path, layout.bitmap2, b"\xff" * (MAX_MAPNR // 8))
    with pytest.raises(TruncatedDumpError, match=r"page descriptor table \(512 descriptors"):
        KdumpReader(path)


def test_page_data_past_eof(tmp_path: Path) -> None:
    path = tmp_path / "k"
    pages = guest_pages()
    layout = make_kdump(path, pages, max_mapnr=MAX_MAPNR)
    last = max(pages)
    off, size, _ = layout.descriptors[last]
    truncate(path, off + size - 1)
    with pytest.raises(TruncatedDumpError) as e:
        KdumpReader(path)
    assert e.value.offset == off
    assert f"data of the page at PFN {last:#x} ({size} bytes at offset {off:#x}) runs past" in (
        str(e.value)
    )


def test_garbage_zlib_page(tmp_path: Path) -> None:
    path = tmp_path / "k"
    pages = guest_pages()
    layout = make_kdump(path, pages, max_mapnr=MAX_MAPNR)
    pfn = next(p for p, (_, _, f) in sorted(layout.descriptors.items()) if f == 1)
    off, size, _ = layout.descriptors[pfn]
    patch(path, off, b"\xa5" * size)
    with KdumpReader(path) as r, pytest.raises(CorruptPageError) as e:
        read_all(r)
    assert e.value.offset == off
    assert str(e.value).startswith(
        f"{path} at offset {off:#x}: page at PFN {pfn:#x} fails to decompress (zlib: Error -3"
    )


def test_page_of_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "k"
    layout = make_kdump(path, {1: b"\x01" * BS}, max_mapnr=4)
    off, _, _ = layout.descriptors[1]
    short = zlib.compress(b"\x01" * 100)
    patch(path, off, short)
    patch(path, layout.desc_start + 8, struct.pack("<I", len(short)))
    with KdumpReader(path) as r, pytest.raises(CorruptPageError) as e:
        read_all(r)
    assert str(e.value) == (
        f"{path} at offset {off:#x}: page at PFN 0x1 fails to decompress (zlib: 100 bytes, "
        "not 4096)"
    )


def test_read_pages_names_the_pfn(tmp_path: Path) -> None:
    path = tmp_path / "k"
    layout = make_kdump(path, {5: b"\x01" * BS, 9: b"\x02" * BS}, max_mapnr=16)
    with KdumpReader(path) as r:
        addrs = np.concatenate([b.addrs for b in r.iter_batches()])
        off = layout.descriptors[9][0]
        patch(path, off, b"\xa5" * 8)
        with pytest.raises(CorruptPageError, match=r"page at PFN 0x9 fails to decompress"):
            r.read_pages(addrs)
        for wrong in (7 * BS, 5 * BS + 8, 16 * BS):  # not dumpable, not a page, past the end
            with pytest.raises(ValueError, match="is not a stored page of"):
                r.read_pages(np.array([wrong], np.uint64))


def test_unknown_compression_flags(tmp_path: Path) -> None:
    path = tmp_path / "k"
    layout = make_kdump(path, {1: b"\x01" * BS}, max_mapnr=4)
    patch(path, layout.desc_start + 12, struct.pack("<I", 0x40))
    with pytest.raises(CorruptPageError) as e:
        KdumpReader(path)
    assert e.value.offset == layout.desc_start
    assert "page descriptor of PFN 0x1 has unknown compression flags 0x40" in str(e.value)


def test_raw_page_of_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "k"
    layout = make_kdump(path, {1: b"\x01" * BS}, max_mapnr=4)
    patch(path, layout.desc_start + 8, struct.pack("<II", 40, 0))
    with pytest.raises(CorruptPageError, match="gives a raw page of 40 bytes; block_size is 4096"):
        KdumpReader(path)


def test_absurd_max_mapnr(tmp_path: Path) -> None:
    path = tmp_path / "k"
    make_kdump(path, {1: b"\x01" * BS}, max_mapnr=4)
    patch(path, BS + 96, struct.pack("<Q", 1 << 41))
    with pytest.raises(DumpFormatError) as e:
        KdumpReader(path)
    assert e.value.offset == BS + 96
    assert "max_mapnr_64 0x20000000000 is implausible (more than 2^40 page frames)" in str(e.value)


def test_bitmap_smaller_than_max_mapnr(tmp_path: Path) -> None:
    path = tmp_path / "k"
    make_kdump(path, {1: b"\x01" * BS}, max_mapnr=4)
    patch(path, 440, struct.pack("<I", 1 << 20))  # 32-bit max_mapnr: 2 blocks hold 0x10000 bits
    with pytest.raises(DumpFormatError) as e:
        KdumpReader(path)
    assert e.value.offset == 436
    assert "bitmap_blocks 2 cover 0x10000 PFNs, fewer than max_mapnr 0x100000" in str(e.value)


def test_flattened_record_past_eof(tmp_path: Path) -> None:
    path = tmp_path / "k"
    make_kdump(path, guest_pages(), max_mapnr=MAX_MAPNR, flattened=True)
    size = path.stat().st_size
    truncate(path, size - 100)
    with pytest.raises(TruncatedDumpError) as e:
        KdumpReader(path)
    assert "flattened record of" in str(e.value)
    assert f"runs past the end of the file ({size - 100:#x})" in str(e.value)


def test_flattened_without_end_marker(tmp_path: Path) -> None:
    path = tmp_path / "k"
    make_kdump(path, guest_pages(), max_mapnr=MAX_MAPNR, flattened=True, end_marker=False)
    size = path.stat().st_size
    with pytest.raises(TruncatedDumpError) as e:
        KdumpReader(path)
    assert str(e.value) == (
        f"{path} at offset {size:#x}: truncated: flattened dump ends without its end marker "
        "(offset -1, size -1): the dump is incomplete (the writer did not finish)"
    )


def test_flattened_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "k"
    make_kdump(path, guest_pages(), max_mapnr=MAX_MAPNR, flattened=True)
    patch(path, 4096, struct.pack(">q", -5))
    with pytest.raises(
        DumpFormatError, match=r"at offset 0x1000: flattened record with bad offset"
    ):
        KdumpReader(path)


def test_flattened_missing_descriptors(tmp_path: Path) -> None:
    path = tmp_path / "k"
    layout = make_kdump(path, guest_pages(), max_mapnr=MAX_MAPNR, flattened=True)
    records = [(at, b) for at, b in layout.records if at != layout.desc_start]
    write_flattened(path, records)
    with pytest.raises(TruncatedDumpError, match=r"page descriptor table .* was never written"):
        KdumpReader(path)


def test_flattened_elf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k"
    write_flattened(path, [(0, b"\x7fELF\x02\x01\x01" + bytes(1000))])
    with pytest.raises(UnsupportedDumpError, match="holds an ELF core"):
        KdumpReader(path)
