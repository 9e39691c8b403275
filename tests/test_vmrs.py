"""Hyper-V ``.vmrs`` saved states, built from the layout volatility3's Hyper-V layer reads
(pull request #1969, ``volatility3/framework/layers/vmrs.py``; see tests/dumpwriter/vmrs.py):
no Hyper-V runs here and no public corpus holds a .vmrs, so no file here was written by
Hyper-V. Plain LZ77 ([MS-XCA] 2.4) is checked against the spec's own examples."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import PS, runner
from hypothesis import given, settings
from hypothesis import strategies as st

from dumpwriter.vmrs import (
    END,
    explicit,
    fill,
    fills,
    lz77_compress,
    lz77_periodic,
    make_vmrs,
    page_token,
)
from ksm_analyze.cli import app
from ksm_analyze.errors import CorruptPageError, DumpFormatError, TruncatedDumpError
from ksm_analyze.formats import DumpFormat, detect_format, open_dump
from ksm_analyze.formats import vmrs as vmrs_module
from ksm_analyze.formats.lz77 import decompress
from ksm_analyze.hashing import compiled as kernels
from ksm_analyze.pages import PageState

MiB = 1 << 20
RNG = np.random.default_rng(7)
RAW_BLOCK = RNG.integers(1, 256, MiB, dtype=np.uint8).tobytes()
PAGE_A = RNG.integers(1, 256, PS, dtype=np.uint8).tobytes()
PERIODIC = b"0123456789abcdef" * 256
FILL = 0x1122334455667788


def tokens(zero_tail: int = 246) -> bytes:
    """Pages 0: zero fill; 1-3: fill of FILL; 4: raw; 5: compressed; 6-7: explicit raw;
    8-9: explicit compressed; 10..: zero fills (246 make the 256 pages of 1 MiB)."""
    return (fill(0) + fills(FILL, 3) + page_token(PAGE_A) + page_token(lz77_periodic(PERIODIC, 16))
            + explicit(2 * PS, PAGE_A + PAGE_A) + explicit(2 * PS, lz77_periodic(PERIODIC * 2, 16))
            + fills(0, zero_tail) + END)


def expected_block() -> list[bytes]:
    fill_page = struct.pack("<Q", FILL) * (PS // 8)
    return ([bytes(PS)] + [fill_page] * 3 + [PAGE_A, PERIODIC, PAGE_A, PAGE_A, PERIODIC,
                                             PERIODIC] + [bytes(PS)] * 246)


def pages_of(reader) -> tuple[dict[int, bytes], set[int]]:
    """Address -> bytes of every page iteration gives (zero-flagged ones as zeros), checked
    against read_pages; and the addresses flagged zero."""
    out, zero = {}, set()
    for b in reader.iter_batches(100):
        for k, (a, p) in enumerate(zip(b.addrs.tolist(), b.pages, strict=True)):
            flagged = b.zero is not None and b.zero[k]
            out[a] = bytes(PS) if flagged else p.tobytes()
            if flagged:
                zero.add(a)
    locs = np.array([a for a in out if a not in zero], dtype=np.uint64)
    again = reader.read_pages(locs)
    assert [p.tobytes() for p in again] == [out[a] for a in locs.tolist()]
    return out, zero


@pytest.fixture
def vmrs(tmp_path):
    """RamBlock0: raw 1 MiB in a data object; RamBlock1: tokens inline; RamBlock3: tokens in a
    data object; RamBlock7 under another root (not the saved state's memory)."""
    return make_vmrs(tmp_path / "vm.vmrs", {0: (RAW_BLOCK, True), 1: (tokens(), False),
                                            3: (tokens(), True)},
                     other_keys=("partition_state",), outside={7: RAW_BLOCK[:64]})


def test_known_pages_at_known_addresses(vmrs, kernel_path):
    assert detect_format(vmrs) == DumpFormat.VMRS
    with open_dump(vmrs) as r:
        assert [(e.addr, e.npages, e.state) for e in r.extents] == [
            (0, 256, PageState.DATA), (MiB, 256, PageState.DATA), (3 * MiB, 256, PageState.DATA)]
        got, zero = pages_of(r)
        want = {i * PS: RAW_BLOCK[i * PS : (i + 1) * PS] for i in range(256)}
        for base in (MiB, 3 * MiB):
            want.update({base + i * PS: p for i, p in enumerate(expected_block())})
        assert got == want
        # zero fills are flagged, not decoded: 247 per token block
        assert zero == {b + i * PS for b in (MiB, 3 * MiB) for i in [0, *range(10, 256)]}
        info = r.info()
        assert (info["ram_blocks"], info["raw_blocks"], info["missing_blocks_below_last"]) == (
            3, 1, 1)





def test_scan_counts_fill_zero_pages_as_zero(vmrs):
    """scan --json: 2 x 247 zero fills are zero pages; the fill of FILL (3 pages a block) is
    one content with 6 copies; no hole, nothing excluded."""
    result = runner.invoke(app, ["scan", str(vmrs), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["per_input"][0]
    assert (row["pages"], row["zero_pages"], row["nonzero_pages"]) == (768, 494, 274)
    assert row["excluded_pages"] == row["hole_pages"] == 0


def test_header_at_0x1000(tmp_path):
    path = make_vmrs(tmp_path / "b.vmrs", {0: (RAW_BLOCK, False)}, header_at=0x1000)
    with open_dump(path) as r:
        assert r.info()["header_offset"] == 0x1000
        assert pages_of(r)[0][5 * PS] == RAW_BLOCK[5 * PS : 6 * PS]


def test_lz77_spec_examples():
    """[MS-XCA] 3.1: 26 literals; "abc" x 100 as three literals and one 297-byte match."""
    assert decompress(bytes.fromhex("3f000000") + b"abcdefghijklmnopqrstuvwxyz", 26) == (
        b"abcdefghijklmnopqrstuvwxyz")
    assert decompress(bytes.fromhex("ffffff1f6162631700" + "0fff2601"), 300) == b"abc" * 100


@pytest.mark.parametrize(("data", "out_len", "message"), [
    (bytes.fromhex("ffffff1f6162631700" + "0fff2601"), 299, "writes past the 299 bytes"),
    (bytes.fromhex("ffffff7f") + b"a" + struct.pack("<H", (5 << 3) | 1), 10, "reaches 6 bytes back"),
    (bytes.fromhex("00000000") + b"abc", 26, "a literal at byte 7 runs past the end"),
    (bytes.fromhex("ffffffff"), 26, "decoded 0 bytes, not 26"),
    (b"\x00\x00", 4, "flag word"),
    (bytes.fromhex("ffffff1f6162631700") + b"\x0f\xff\x10\x00", 300, "too short"),
    (bytes.fromhex("ffffff1f6162631700") + b"\x0f\xff\x00\x00\xff\xff\xff\xff", 300,
     "writes past"),
])
def test_lz77_bad_streams_are_bounded_errors(data, out_len, message):
    with pytest.raises(ValueError, match=message):
        decompress(data, out_len)


def _patch(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(raw)


def test_bad_tables(tmp_path):
    base = make_vmrs(tmp_path / "a.vmrs", {0: (tokens(), True)})
    raw = base.read_bytes()
    cases = {
        "object-signature": (0x2000, b"\0\0\0\0", DumpFormatError, "bad object table signature"),
        "object-count": (0x2004, b"\xff\xff\xff\xff", DumpFormatError, "object table entries"),
        "data-object": (0x2000 + 8 + 18 + 5, struct.pack("<Q", 0x7000), DumpFormatError,
                        "which is no data object"),
        "object-past-eof": (0x2000 + 8 + 18 + 13, struct.pack("<I", 1 << 31), None, None),
    }
    for name, (at, data, error, message) in cases.items():
        path = tmp_path / f"{name}.vmrs"
        path.write_bytes(raw)
        _patch(path, at, data)
        if error is None:  # a data object larger than the file: the stored bytes are capped
            with open_dump(path) as r:
                assert len(pages_of(r)[0]) == 256
            continue
        with pytest.raises(error, match=message):
            open_dump(path)
    with pytest.raises(TruncatedDumpError):
        (tmp_path / "cut.vmrs").write_bytes(raw[:0x2010])
        open_dump(tmp_path / "cut.vmrs")


def test_object_table_cycle_ends(tmp_path):
    """A type-1 entry naming its own table: followed once."""
    path = make_vmrs(tmp_path / "c.vmrs", {0: (RAW_BLOCK, False)})
    raw = bytearray(path.read_bytes())
    count = struct.unpack_from("<I", raw, 0x2004)[0]
    struct.pack_into("<I", raw, 0x2004, count + 1)
    struct.pack_into("<BIQIB", raw, 0x2008 + 18 * count, 1, 0, 0x2000, 0, 0)
    path.write_bytes(raw)
    with open_dump(path) as r:
        assert r.info()["ram_blocks"] == 1


@pytest.mark.parametrize(("stream", "message"), [
    (tokens(245), "give 255 of the 256 pages"),
    (tokens(247), "a fill of 247 pages goes past the 1 MiB block"),
    (fills(0, 1 << 31) + END, "a fill of 2147483648 pages"),
    (struct.pack("<I", 5000) + bytes(5000) + END, "larger than 4 KiB"),
    (explicit(PS + 1, b"x") + END, "not whole pages"),
    (page_token(b"\0\0\0\0\x01") + END, "cannot decompress"),
    (fill(0)[:6], "fill token runs past"),
    (fills(0, 255) + fill(0)[:8], "fill token runs past"),
    # the first damage wins: a page that does not decode, before a fill past the block
    (page_token(b"\0\0\0\0\x01") + fills(0, 300) + END,
     "cannot decompress 5 bytes .*a literal at byte 5 runs past the end"),
    (page_token(lz77_compress(PERIODIC)) + page_token(b"\xff\xff\xff\xff\x08\x00") + END,
     "cannot decompress 6 bytes .*reaches 2 bytes back"),
])
def test_corrupt_block_is_a_clean_error(tmp_path, stream, message, kernel_path):
    path = make_vmrs(tmp_path / "d.vmrs", {2: (stream, False)})
    with open_dump(path) as r, pytest.raises(CorruptPageError, match=f"RamBlock2: .*{message}"):
        list(r.iter_batches())


def test_no_savedstate_and_no_ram(tmp_path):
    path = make_vmrs(tmp_path / "e.vmrs", {}, outside={0: RAW_BLOCK[:10]})
    with pytest.raises(DumpFormatError, match="holds no RamBlock"):
        open_dump(path)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"savedstate")] = ord("S")
    path.write_bytes(raw)
    with pytest.raises(DumpFormatError, match="no 'savedstate' key"):
        open_dump(path)


def test_cli_one_line_errors(tmp_path):
    path = make_vmrs(tmp_path / "f.vmrs", {0: (tokens(245), True)})
    for command in ("scan", "info"):
        result = runner.invoke(app, [command, str(path)])
        if command == "info":  # info reads the tables only: the block is fine to list
            assert result.exit_code == 0, result.output
            continue
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {path} at offset 0x"), lines
        assert "RamBlock0" in lines[0]


@pytest.mark.parametrize("at", [0, 0x1000])
def test_signature_alone_is_detected_then_refused_cleanly(tmp_path, at):
    """The signature (once refused by name) now selects this reader, which says what is
    wrong: here the block size is 0."""
    data = bytearray(2 * PS)
    data[at : at + 4] = struct.pack("<I", 0x01282014)
    path = tmp_path / "sig.vmrs"
    path.write_bytes(data)
    assert detect_format(path) == DumpFormat.VMRS
    with pytest.raises(DumpFormatError, match="no valid Hyper-V storage header"):
        open_dump(path)


def test_many_blocks_in_data_objects(tmp_path):
    """300 RamBlocks in data objects (an object table past 4 KiB): every one is read, and the
    zero fills are 300 x 256 zero pages."""
    path = make_vmrs(tmp_path / "many.vmrs", {n: (fills(0, 256) + END, True) for n in range(300)})
    result = runner.invoke(app, ["scan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["per_input"][0]
    assert (row["pages"], row["zero_pages"]) == (300 * 256, 300 * 256)


# -- the compiled LZ77 decoder against the Python one ------------------------------------------


def python_lz77(data: bytes, out_len: int) -> bytes | str:
    try:
        return bytes(decompress(data, out_len))
    except ValueError as e:
        return str(e)


def compiled_lz77(buf: bytes, size: int, out_len: int) -> bytes | str:
    """Decode the first ``size`` bytes of ``buf`` (the rest is there to be misread) into the
    middle of a guarded buffer: nothing may be written outside its ``out_len`` bytes."""
    out = np.full(out_len + 64, 0xA5, np.uint8)
    got = kernels.lz77_pages(buf, np.array([[0, size, 32, out_len]]), out)
    assert (out[:32] == 0xA5).all() and (out[32 + out_len :] == 0xA5).all()
    if got is None:
        return out[32 : 32 + out_len].tobytes()
    assert got[0] == 0
    return got[1]


SPEC_26 = bytes.fromhex("3f000000") + b"abcdefghijklmnopqrstuvwxyz"
SPEC_300 = bytes.fromhex("ffffff1f6162631700" + "0fff2601")


def _streams() -> list[tuple[bytes, int]]:
    """The spec's two examples; matches with every length form (3 bits, shared nibble low and
    high, a byte, 255 + u16, 0 + u32) and offsets from 1 to 8,192; literals past one flag word."""
    rng = np.random.default_rng(11)
    noise = rng.integers(0, 256, 100, dtype=np.uint8).tobytes()
    mixed = noise[:40] + b"x" * 9 + noise[:5] + b"yz" * 20 + noise[40:50] * 30
    mixed += bytes(8192 - len(mixed)) + noise[:30] + b"q" * 300 + b"w" * 70_000  # 8,192 back
    assert lz77_compress(mixed) != lz77_compress(mixed[:-1])
    return [(SPEC_26, 26), (SPEC_300, 300), (lz77_compress(mixed), len(mixed)),
            (lz77_compress(noise), 100)]


@pytest.mark.compiled
def test_compiled_lz77_decodes_the_spec_examples_and_encoded_streams():
    """Both decoders give the bytes encoded (the spec's examples by hand; the rest by the
    tests' own encoder, whose output for the spec's inputs is the spec's)."""
    assert lz77_compress(b"abc" * 100) == SPEC_300
    assert lz77_compress(b"abcdefghijklmnopqrstuvwxyz") == SPEC_26
    streams = _streams()
    assert compiled_lz77(SPEC_26, len(SPEC_26), 26) == b"abcdefghijklmnopqrstuvwxyz"
    assert compiled_lz77(SPEC_300, len(SPEC_300), 300) == b"abc" * 100
    for data, out_len in streams[2:]:
        assert compiled_lz77(data, len(data), out_len) == python_lz77(data, out_len)
        assert isinstance(python_lz77(data, out_len), bytes)


@pytest.mark.compiled
def test_compiled_lz77_agrees_on_every_truncation_and_corruption():
    """Each stream cut at every length (the cut-off rest still in the buffer: a decoder that
    reads past its input would succeed where the other fails), asked for one byte fewer or
    more, and each byte set to 0, 0xff or flipped: the same bytes or the same message."""
    cases = 0
    for data, out_len in _streams():
        variants = [(data, k, out_len) for k in range(len(data))]
        variants += [(data, len(data), out_len + d) for d in (-1, 1)]
        for at in range(len(data)):
            for new in {0, 0xFF, data[at] ^ 0xFF}:
                bad = bytearray(data)
                bad[at] = new
                variants.append((bytes(bad), len(data), out_len))
        for buf, size, n in variants:
            want = python_lz77(buf[:size], n)
            assert compiled_lz77(buf, size, n) == want, (buf[:size].hex(), n, want)
            cases += isinstance(want, str)
    assert cases > 300  # most variants are errors, so errors were compared


@st.composite
def _memory(draw) -> bytes:
    """Page-like bytes: runs of noise, of one byte, and of short repeated patterns."""
    parts = []
    for kind, n in draw(st.lists(st.tuples(st.sampled_from("nbp"), st.integers(0, 600)),
                                 max_size=8)):
        if kind == "n":
            parts.append(draw(st.binary(min_size=n % 40, max_size=n % 40)))
        elif kind == "b":
            parts.append(bytes([draw(st.integers(0, 255))]) * n)
        else:
            parts.append(draw(st.binary(min_size=1, max_size=9)) * (n // 4 + 1))
    return b"".join(parts)


@pytest.mark.compiled
@settings(max_examples=150, deadline=None)
@given(_memory(), st.integers(-2, 2))
def test_compiled_lz77_agrees_on_encoded_memory(data, delta):
    encoded = lz77_compress(data)
    out_len = max(0, len(data) + delta)
    want = python_lz77(encoded, out_len)
    if delta == 0:
        assert want == data
    assert compiled_lz77(encoded, len(encoded), out_len) == want


@pytest.mark.compiled
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 400))
def test_compiled_lz77_agrees_on_any_bytes(data, out_len):
    assert compiled_lz77(data, len(data), out_len) == python_lz77(data, out_len)


@pytest.mark.compiled
def test_compiled_lz77_batch_stops_at_the_first_bad_stream():
    buf = SPEC_300 + SPEC_26[:10] + SPEC_26
    out = np.zeros(1000, np.uint8)
    jobs = np.array([[0, 13, 0, 300], [13, 10, 300, 26], [23, 30, 400, 26]])
    assert kernels.lz77_pages(buf, jobs, out) == (1, "a literal at byte 10 runs past the end")
    assert out[:300].tobytes() == b"abc" * 100
    assert not out[400:].any()  # the job after the bad one was not run
    assert kernels.lz77_pages(buf, jobs[[0, 2]], out) is None
    assert out[400:426].tobytes() == b"abcdefghijklmnopqrstuvwxyz"
    for bad in ([40, 14, 0, 300], [-1, 13, 0, 300], [0, 13, 701, 300], [0, 13, 0, -1]):
        with pytest.raises(ValueError, match="outside the 53-byte source or the 1000-byte"):
            kernels.lz77_pages(buf, np.array([bad]), out)


@pytest.mark.compiled
def test_the_reader_decodes_in_c_where_built(tmp_path, monkeypatch):
    """With the kernels, the Python decoder is not called at all (it would raise here)."""
    def refuse(*_):
        raise AssertionError("the Python decoder ran")

    monkeypatch.setattr(vmrs_module, "decompress", refuse)
    path = make_vmrs(tmp_path / "c.vmrs", {0: (tokens(), False)})
    with open_dump(path) as r:
        got, _ = pages_of(r)
    assert [got[i * PS] for i in range(256)] == expected_block()


def test_compressed_blocks_read_the_same_both_ways(tmp_path, kernel_path):
    """A block of 256 compressed pages of varied contents, and one of explicit runs: the
    pages encoded (the Python path is the reference the compiled one is checked against)."""
    rng = np.random.default_rng(5)
    pages = []
    for i in range(256):
        period = int(rng.integers(1, 300))
        head = rng.integers(0, 256, period, dtype=np.uint8).tobytes()
        pages.append((head * (PS // period + 1))[:PS] if i % 3 else (head * 8)[:8] + bytes(PS - 8))
    one = b"".join(page_token(lz77_compress(p)) for p in pages) + END
    runs = b"".join(explicit(4 * PS, lz77_compress(b"".join(pages[i : i + 4])))
                    for i in range(0, 256, 4)) + END
    path = make_vmrs(tmp_path / "z.vmrs", {0: (one, True), 1: (runs, False)})
    with open_dump(path) as r:
        got, zero = pages_of(r)
    assert not zero
    assert [got[i * PS] for i in range(256)] == pages
    assert [got[MiB + i * PS] for i in range(256)] == pages
