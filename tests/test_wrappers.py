"""Compressed wrappers (formats/streams.py): gzip, bzip2, xz, zstd and lzop around raw, ELF and
LiME dumps read as the plain files are, and damaged streams fail in one line.

Expected values come from the plain files (read through the memory map, another code path);
the compressed files are written here by the stdlib, zstandard and the lzop CLI (lzop 1.04),
not by the code under test.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import pickle
import random
import shutil
import subprocess
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard
from conftest import ROOT, runner

from dumpwriter.kdump import make_kdump
from dumpwriter.lime import make_lime
from ksm_analyze.cli import app
from ksm_analyze.errors import DumpFormatError, UnsupportedDumpError
from ksm_analyze.formats import DumpFormat, detect_format, open_dump, streams
from ksm_analyze.formats.streams import Codec, Decompressed, probe_codec
from ksm_analyze.hashing import stage1
from ksm_analyze.options import ScanOptions
from ksm_analyze.pages import PageState

SAMPLES = {"vm-a.elf": ROOT / "sample_dumps" / "vm-a.elf",
           "vm-b.raw": ROOT / "sample_dumps" / "vm-b.raw"}
HAVE_LZOP = shutil.which("lzop") is not None


def compress(codec: Codec, data: bytes, out: Path) -> Path:
    """``data`` wrapped by ``codec``'s own tool or library."""
    if codec is Codec.GZIP:
        out.write_bytes(gzip.compress(data, mtime=0))
    elif codec is Codec.BZIP2:
        out.write_bytes(bz2.compress(data))
    elif codec is Codec.XZ:
        out.write_bytes(lzma.compress(data))
    elif codec is Codec.ZSTD:
        out.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    else:
        if not HAVE_LZOP:
            pytest.skip("the lzop CLI is not installed")
        plain = out.with_suffix(".plain")
        plain.write_bytes(data)
        subprocess.run(["lzop", "-q", "-f", "-o", str(out), str(plain)], check=True)
        plain.unlink()
    return out


def scan_json(path: Path | str, *options: str) -> dict:
    r = runner.invoke(app, ["scan", str(path), "--json", *options])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def without_names(result: dict, path: Path) -> str:
    result.pop("stages", None)  # timings
    text = json.dumps(result, sort_keys=True)
    for name in (str(path), path.name):
        text = text.replace(json.dumps(name), '"INPUT"')
    return text


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.value)
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_a_wrapped_sample_scans_like_the_plain_file(tmp_path, codec, sample):
    # vm-a.elf is a real QEMU dump-guest-memory file: a gzip of it predicts what it does.
    src = SAMPLES[sample]
    wrapped = compress(codec, src.read_bytes(), tmp_path / f"{sample}.{codec.value}")
    plain = without_names(scan_json(src), src)
    assert without_names(scan_json(wrapped), wrapped) == plain


def test_info_says_what_was_unwrapped(tmp_path):
    data = SAMPLES["vm-a.elf"].read_bytes()
    wrapped = compress(Codec.GZIP, data, tmp_path / "vm-a.elf.gz")
    r = runner.invoke(app, ["info", str(wrapped)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == f"{wrapped}: elf inside gzip"
    size = wrapped.stat().st_size
    assert lines[1].startswith(f"  unwrapped: gzip, {size / 1024:.3g} KiB compressed -> 2 MiB "
                               f"decompressed (ratio {len(data) / size:.1f})")
    assert detect_format(wrapped) is DumpFormat.ELF  # the format inside


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.value)
def test_pages_read_in_shuffled_order_are_the_plain_files(tmp_path, codec, monkeypatch):
    # Checkpoints every 64 KiB, so reads behind the cursor restart from one.
    monkeypatch.setattr(streams, "CHECKPOINT_BYTES", 1 << 16)
    src = SAMPLES["vm-a.elf"]
    wrapped = compress(codec, src.read_bytes(), tmp_path / f"a.{codec.value}")
    with open_dump(src) as plain, open_dump(wrapped) as reader:
        assert not reader.in_place and reader.source is not None
        assert reader.extents == plain.extents
        addrs = np.concatenate([b.addrs for b in plain.iter_batches()])
        random.Random(7).shuffle(addrs)
        for part in np.array_split(addrs, 9):
            assert np.array_equal(reader.read_pages(part), plain.read_pages(part))
        again = pickle.loads(pickle.dumps(reader))
        try:
            assert again.source.size == reader.source.size
            assert np.array_equal(again.read_pages(addrs[:50]), plain.read_pages(addrs[:50]))
        finally:
            again.close()


def test_a_stream_at_an_offset_and_multi_member_gzip(tmp_path):
    # libvirt save images put a header before the stream: Decompressed(start=...).
    data = os.urandom(300_000)
    path = tmp_path / "x"
    path.write_bytes(b"H" * 1000 + gzip.compress(data[:100_000]) + gzip.compress(data[100_000:]))
    fd = os.open(path, os.O_RDONLY)
    try:
        src = Decompressed(path, fd, Codec.GZIP, start=1000)
        assert len(src) == len(data)
        assert src[123_456:200_000] == data[123_456:200_000]
        assert src.read_at(299_990, 100) == data[299_990:]  # past the end: fewer bytes
        assert b"".join(bytes(m) for _, m in src.chunks(5, 1 << 16)) == data[5:]
    finally:
        os.close(fd)


def test_probe_codec_by_magic():
    assert probe_codec(gzip.compress(b"x")) is Codec.GZIP
    assert probe_codec(bz2.compress(b"x")) is Codec.BZIP2
    assert probe_codec(lzma.compress(b"x")) is Codec.XZ
    assert probe_codec(zstandard.ZstdCompressor().compress(b"x")) is Codec.ZSTD
    skippable = b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd"  # pzstd writes one first
    assert probe_codec(skippable + zstandard.ZstdCompressor().compress(b"x")) is Codec.ZSTD
    assert probe_codec(b"\x89LZO\x00\r\n\x1a\n\x10\x30") is Codec.LZOP
    for head in (b"BZh0", b"\x7fELF", b"\x1f\x8b\x07", b"BZh9xxxxxx", b""):
        assert probe_codec(head) is None


# -- bad input ----------------------------------------------------------------------------------

def _open_fails(path: Path, kind: type[Exception], *words: str) -> str:
    with pytest.raises(kind) as e, open_dump(path) as r:
        for _ in r.iter_batches():
            pass
    message = str(e.value)
    assert message.startswith(str(path)) and "\n" not in message
    for w in words:
        assert w in message, message
    return message


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.value)
def test_a_truncated_stream_is_an_error(tmp_path, codec):
    wrapped = compress(codec, SAMPLES["vm-b.raw"].read_bytes(), tmp_path / "b")
    data = wrapped.read_bytes()
    wrapped.write_bytes(data[: len(data) * 2 // 3])
    message = _open_fails(wrapped, DumpFormatError, "at offset 0x")
    assert codec.value in message or "truncated" in message


@pytest.mark.parametrize("codec", list(Codec), ids=lambda c: c.value)
def test_corrupt_bytes_mid_stream_are_an_error(tmp_path, codec):
    payload = np.random.default_rng(1).integers(0, 4, 1 << 20, dtype=np.uint8).tobytes()
    wrapped = compress(codec, payload, tmp_path / "r")
    data = bytearray(wrapped.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 64):
        data[k] ^= 0x5A
    wrapped.write_bytes(data)
    message = _open_fails(wrapped, DumpFormatError, "decompressed offset", "at offset 0x")
    assert codec.value in message


@pytest.mark.parametrize(("codec", "back"), [(Codec.GZIP, 8), (Codec.XZ, 40)])
def test_a_bad_checksum_is_an_error(tmp_path, codec, back):
    # gzip: the CRC32 in the member trailer; xz: the CRC64 after the block (lzma.compress
    # writes CHECK_CRC64), before the index.
    wrapped = compress(codec, SAMPLES["vm-b.raw"].read_bytes(), tmp_path / "b")
    data = bytearray(wrapped.read_bytes())
    data[-back] ^= 0xFF
    wrapped.write_bytes(data)
    _open_fails(wrapped, DumpFormatError, "decompressed offset")


def test_a_bomb_stays_within_bounded_memory_and_time(tmp_path):
    # 1 GiB of zeros in ~40 KiB of zstd, and 256 MiB in ~250 KiB of gzip: opened and read
    # at the end, holding at most a read's worth.
    zbomb, gbomb = tmp_path / "bomb.zst", tmp_path / "bomb.gz"
    chunk = bytes(16 << 20)
    z = zstandard.ZstdCompressor(level=1).compressobj(size=64 * len(chunk))
    zbomb.write_bytes(b"".join([*(z.compress(chunk) for _ in range(64)), z.flush()]))
    g = zlib.compressobj(1, zlib.DEFLATED, 31)
    gbomb.write_bytes(b"".join([*(g.compress(chunk) for _ in range(16)), g.flush()]))
    tracemalloc.start()
    started = time.monotonic()
    try:
        for bomb, size in ((zbomb, 1 << 30), (gbomb, 256 << 20)):
            with open_dump(bomb) as r:
                assert r.file_size == size and r.format.value == "raw"
                assert r.source.read_at(size - 4096, 1 << 20) == bytes(4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert time.monotonic() - started < 60


def test_a_size_claim_the_stream_does_not_hold_is_an_error(tmp_path):
    # A zstd frame that claims 1 TiB of content and holds 8 KiB: the header is believed for
    # the size, and the first read past what the frame holds fails.
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(bytes(8192)))
    fhd = frame[4]
    assert fhd >> 6 == 1  # a 2-byte content size field follows the frame header descriptor
    fcs = 5 + (0 if fhd >> 5 & 1 else 1)
    frame[4] = (fhd & 0x3F) | 0xC0  # 8-byte content size
    frame[fcs : fcs + 2] = (1 << 40).to_bytes(8, "little")
    path = tmp_path / "claims.zst"
    path.write_bytes(bytes(frame))
    with pytest.raises(DumpFormatError) as e, open_dump(path) as r:
        assert r.file_size == 1 << 40
        for _ in r.iter_batches():
            pass
    assert "decompressed offset" in str(e.value)


@pytest.mark.skipif(not HAVE_LZOP, reason="the lzop CLI is not installed")
def test_an_lzop_block_that_could_expand_past_the_bound_is_refused(tmp_path):
    # LZO1X expands up to 255x and lzallright decodes a block whole: a compressed block of
    # more than 1 MiB (lzop writes 256 KiB blocks) is refused before it is decoded.
    data = bytearray(compress(Codec.LZOP, bytes(8192) + os.urandom(8192), tmp_path / "z.lzo")
                     .read_bytes())
    fd = os.open(tmp_path / "z.lzo", os.O_RDONLY)
    try:
        first = Decompressed.__new__(Decompressed)
        first._setup(tmp_path / "z.lzo", fd, Codec.LZOP, 0)
        at = first._lzop.first
    finally:
        os.close(fd)
    dst, src = int.from_bytes(data[at : at + 4], "big"), int.from_bytes(data[at + 4 : at + 8], "big")
    assert src < dst  # the first block is compressed
    data[at : at + 8] = (48 << 20).to_bytes(4, "big") + ((1 << 20) + 1).to_bytes(4, "big")
    (tmp_path / "z.lzo").write_bytes(data)
    _open_fails(tmp_path / "z.lzo", DumpFormatError, "compressed blocks of at most 0x100000")


def test_garbage_inside_a_wrapper_names_the_decompressed_stream(tmp_path):
    path = tmp_path / "junk.gz"
    path.write_bytes(gzip.compress(b"\x01\x02\x03" * 1000))
    message = _open_fails(path, DumpFormatError, "inside the gzip stream", "decompressed size")
    assert "at offset 0x0" in message


def test_nested_wrappers_and_kdump_inside_are_refused(tmp_path):
    nested = tmp_path / "b.gz.gz"
    nested.write_bytes(gzip.compress(gzip.compress(SAMPLES["vm-b.raw"].read_bytes())))
    _open_fails(nested, UnsupportedDumpError, "a gzip-compressed gzip stream")
    make_kdump(tmp_path / "k", {0: b"\x01" * 4096}, max_mapnr=16)
    kdump = tmp_path / "k.zst"
    kdump.write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "k").read_bytes()))
    _open_fails(kdump, UnsupportedDumpError, "a zstd-compressed kdump dump", "zstd -dc")


def test_the_cli_says_one_line_and_exits_1(tmp_path):
    wrapped = compress(Codec.XZ, SAMPLES["vm-b.raw"].read_bytes(), tmp_path / "b.xz")
    wrapped.write_bytes(wrapped.read_bytes()[:-30])
    r = runner.invoke(app, ["scan", str(wrapped)])
    assert r.exit_code == 1
    assert len(r.stderr.strip().splitlines()) == 1 and str(wrapped) in r.stderr


def test_a_lime_file_in_a_wrapper(tmp_path):
    pages = [bytes([k]) * 4096 for k in range(1, 5)]
    make_lime(tmp_path / "l", [(0x1000, pages[0] + pages[1]), (0x100000, pages[2] + pages[3])])
    wrapped = compress(Codec.ZSTD, (tmp_path / "l").read_bytes(), tmp_path / "l.zst")
    with open_dump(wrapped) as r:
        assert r.format.value == "lime"
        got = r.read_pages(np.array([0x100000, 0x1000, 0x101000, 0x2000], np.uint64))
    assert [bytes(p) for p in got] == [pages[2], pages[0], pages[3], pages[1]]


def test_stage1_decodes_a_wrapped_stream_once_with_two_jobs(tmp_path, monkeypatch):
    # 80 MiB of stored pages (past PARALLEL_MIN_PAGES): a plain file would be sharded.
    rng = np.random.default_rng(3)
    data = np.zeros((20480, 4096), np.uint8)
    data[::3, :64] = rng.integers(0, 255, (len(data[::3]), 64), dtype=np.uint8)
    wrapped = compress(Codec.ZSTD, data.tobytes(), tmp_path / "big.zst")

    def no_shards(*a, **k):
        raise AssertionError("a wrapped input was sharded: each shard decodes the stream")

    monkeypatch.setattr(stage1, "imap_shards", no_shards)
    monkeypatch.setattr(stage1, "imap_threads", no_shards)
    with open_dump(wrapped) as r:
        fp = stage1.fingerprint(r, ScanOptions(jobs=2))
    assert fp.state_pages[PageState.DATA] == 20480
    assert fp.zero_pages == 20480 - len(data[::3])


# -- xz block starts as checkpoints ------------------------------------------------------------

HAVE_XZ = shutil.which("xz") is not None


def _xz_blocks(data: bytes, block: int) -> bytes:
    """``data`` as the xz CLI writes it in independent blocks of ``block`` bytes (as xz -T0
    and pixz do), two streams back to back with stream padding between."""
    half = len(data) // 2
    parts = [subprocess.run(["xz", "-1", "-T1", f"--block-size={block}", "-c"], input=d,
                            capture_output=True, check=True).stdout
             for d in (data[:half], data[half:])]
    return parts[0] + b"\0" * 8 + parts[1]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _lying_index(packed: bytes, shift: int) -> bytes:
    """The last xz stream of ``packed`` with an index that moves ``shift`` bytes from its first
    block's decompressed size to its second's (same total, CRC32s recomputed: only the blocks
    themselves contradict it; xz file format 1.2.1, sections 2.1.2.2 and 4)."""
    backward = (int.from_bytes(packed[-8:-4], "little") + 1) * 4
    at = len(packed) - 12 - backward
    index = packed[at : len(packed) - 12]
    pos, records = 1, []
    count = index[pos]
    pos += 1
    for _ in range(count * 2):
        value = shift_ = 0
        while True:
            byte = index[pos]
            pos += 1
            value |= (byte & 0x7F) << shift_
            shift_ += 7
            if not byte & 0x80:
                break
        records.append(value)
    records[1] -= shift
    records[3] += shift
    body = b"\0" + _varint(count) + b"".join(_varint(v) for v in records)
    body += b"\0" * (-len(body) % 4)
    body += zlib.crc32(body).to_bytes(4, "little")
    flags = packed[-4:-2]
    footer_body = ((len(body) // 4 - 1).to_bytes(4, "little") + flags)
    footer = zlib.crc32(footer_body).to_bytes(4, "little") + footer_body + b"YZ"
    return packed[:at] + body + footer


@pytest.mark.skipif(not HAVE_XZ, reason="the xz CLI is not installed")
def test_xz_block_starts_are_checkpoints_once_the_index_is_checked(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 4, 4 << 20, dtype=np.uint8).tobytes()  # compresses, slowly
    path = tmp_path / "blocks.xz"
    path.write_bytes(_xz_blocks(data, 1 << 20))  # 4 blocks in 2 streams
    fd = os.open(path, os.O_RDONLY)
    try:
        src = Decompressed(path, fd, Codec.XZ)
        offsets = [3 << 20, (1 << 20) + 5, 7, (3 << 20) + 4000, 2 << 20]
        for off in offsets:  # before the index is checked: from the start, right bytes
            assert src.read_at(off, 5000) == data[off : off + 5000]
        # One pass over all but the last bytes (as an ELF dump's, which are no page): the
        # first read behind it decodes those bytes, so liblzma checks the last index.
        assert src.read_at(0, len(data) - 11) == data[:-11]
        for off in offsets:
            before = src.decoded_bytes
            assert src.read_at(off, 5000) == data[off : off + 5000]
            # Restarted at the block holding ``off``: at most one block decoded to get there.
            assert src.decoded_bytes - before <= (1 << 20) + 5000 + 11
        assert [cp[0] for cp in src._checkpoints] == [1 << 20, 2 << 20, 3 << 20]
    finally:
        os.close(fd)


@pytest.mark.skipif(not HAVE_XZ, reason="the xz CLI is not installed")
def test_an_xz_index_that_lies_about_block_sizes_never_misplaces_bytes(tmp_path):
    rng = np.random.default_rng(6)
    data = rng.integers(0, 4, 4 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "lies.xz"
    # The second stream's second block claimed 4 KiB later than it starts: a checkpoint
    # placed from this index would serve the bytes at 3 MiB for 3 MiB + 4 KiB.
    path.write_bytes(_lying_index(_xz_blocks(data, 1 << 20), -4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        src = Decompressed(path, fd, Codec.XZ)
        assert src.size == len(data)  # the totals agree: the lie is in the blocks' sizes
        with pytest.raises(DumpFormatError, match="corrupt"):
            for _ in src.chunks(0, 1 << 20):
                pass
        off = (3 << 20) + 8192  # past the claimed start of the second stream's second block
        assert src.read_at(off, 5000) == data[off : off + 5000]
        assert [cp[0] for cp in src._checkpoints] == [1 << 20]  # the first stream's, checked
    finally:
        os.close(fd)
