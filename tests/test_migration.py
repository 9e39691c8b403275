"""The QEMU migration stream reader, on streams built from the published layout
(tests/dumpwriter/qevm.py: QEMU migration/savevm.c, migration/ram.c,
docs/devel/migration/mapped-ram.rst; libvirt src/qemu/qemu_saveimage.h)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from dumpwriter.qevm import (
    COMPRESS_PAGE,
    END,
    EOS,
    FULL,
    MULTIFD_FLUSH,
    PART,
    START,
    XBZRLE,
    Stream,
    libvirt_header,
    mapped_ram,
    simple,
)
from ksm_analyze.errors import DumpFormatError, TruncatedDumpError, UnsupportedDumpError
from ksm_analyze.formats import DumpFormat, detect_format, open_dump
from ksm_analyze.formats.migration import LIBVIRT_FORMATS
from ksm_analyze.pages import PageState

PS = 4096
MiB = 1 << 20
SYNTH = 1 << 48


def page(tag: int) -> bytes:
    return bytes([tag]) * 8 + np.random.default_rng(tag).integers(0, 256, PS - 8, np.uint8).tobytes()


def write(tmp_path, data: bytes, name: str = "s.qevm"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


BLOCKS = [("pc.ram", 8 * PS), ("pc.bios", 2 * PS)]


def test_pages_zero_fill_and_blocks_by_name(tmp_path):
    pages = {("pc.ram", 0): page(1), ("pc.ram", PS): 0, ("pc.ram", 2 * PS): page(2),
             ("pc.ram", 3 * PS): 0x5A, ("pc.bios", PS): page(3), ("pc.ram", 5 * PS): page(4)}
    p = write(tmp_path, simple(pages, BLOCKS))
    assert detect_format(p) is DumpFormat.MIGRATION
    with open_dump(p) as r:
        counts = r.page_counts()
        # pc.ram: data at 0, 2, 3 (fill 0x5a is a page of that byte), 5; zero at 1;
        # pages 4, 6, 7 were never sent. pc.bios: data at 1, page 0 never sent.
        assert counts[PageState.DATA] == 5
        assert counts[PageState.ZERO] == 1
        assert counts[PageState.NOT_SAVED] == 4
        got = r.read_pages(np.array([0, 2 * PS, 3 * PS, 5 * PS, SYNTH + PS], np.uint64))
        assert got[0].tobytes() == page(1)
        assert got[1].tobytes() == page(2)
        assert got[2].tobytes() == b"\x5a" * PS
        assert got[3].tobytes() == page(4)
        assert got[4].tobytes() == page(3)
        batches = list(r.iter_batches(batch_pages=2))
        seen = {int(a): bytes(row) for b in batches for a, row in zip(b.addrs, b.pages,
                                                                       strict=True)}
        assert all(b.pages.flags.c_contiguous for b in batches)
        assert seen == {0: page(1), 2 * PS: page(2), 3 * PS: b"\x5a" * PS, 5 * PS: page(4),
                        SYNTH + PS: page(3)}
        assert not r.in_place
        info = r.info()
        assert info["machine_type"] == "pc-i440fx-7.2"
        assert [b["block"] for b in info["blocks"]] == ["pc.ram", "pc.bios"]
        assert info["blocks"][1]["address_kind"] == "synthetic"
        assert info["ram_records"] == 6
        with pytest.raises(ValueError, match="not a stored page"):
            r.read_pages(np.array([PS], np.uint64))  # a zero page: not stored


def test_last_copy_wins_and_long_runs(tmp_path):
    s = Stream()
    s.ram_part([("pc.ram", 64 * PS)])
    for i in range(40):  # a long PAGE|CONTINUE run (the vectorised path)
        s.page("pc.ram", i * PS, page(i))
    for i in range(40, 64):
        s.zero("pc.ram", i * PS)
    s.flag(MULTIFD_FLUSH)
    s.flag(EOS)
    s.footer(2)
    s.section(PART, 2)  # a running guest's resends: page 3 rewritten, page 50 now data,
    s.page("pc.ram", 3 * PS, page(103))  # page 7 now zero, page 9 sent twice in one run
    s.page("pc.ram", 9 * PS, page(109))
    s.page("pc.ram", 9 * PS, page(209))
    s.page("pc.ram", 50 * PS, page(150))
    s.zero("pc.ram", 7 * PS)
    s.flag(EOS)
    s.footer(2)
    s.section(END, 2)
    s.flag(EOS)
    s.footer(2)
    p = write(tmp_path, s.end())
    with open_dump(p) as r:
        counts = r.page_counts()
        assert counts[PageState.DATA] == 40 - 1 + 1
        assert counts[PageState.ZERO] == 24 - 1 + 1
        got = r.read_pages(np.array([3 * PS, 9 * PS, 50 * PS, 0], np.uint64))
        assert [row.tobytes() for row in got] == [page(103), page(209), page(150), page(0)]
        assert r.info()["ram_records"] == 64 + 5


def test_device_section_before_ram_is_complete_is_named(tmp_path):
    s = Stream()
    s.device(5, "virtio-mem-early", b"\x01\x02")
    p = write(tmp_path, s.end())
    with pytest.raises(UnsupportedDumpError) as e:
        open_dump(p)
    assert "FULL section 5 ('virtio-mem-early') at 0x" in str(e.value)
    assert e.value.offset == dict(s.marks)["section 4 5"]


def test_other_iterable_section_is_named(tmp_path):
    s = Stream()
    s.section(START, 7, "block", 1)
    p = write(tmp_path, s.end())
    with pytest.raises(UnsupportedDumpError, match=r"START section 7 \('block'\)"):
        open_dump(p)


@pytest.mark.parametrize(("flag", "what"), [(XBZRLE, "XBZRLE"), (COMPRESS_PAGE, "zlib")])
def test_encoded_pages_are_refused_at_their_offset(tmp_path, flag, what):
    s = Stream()
    s.section(START, 2)
    s.mem_size(BLOCKS)
    s.flag(EOS)
    s.section(PART, 2)
    at = s.record("pc.ram", 0, flag, bytes(16))
    p = write(tmp_path, s.end())
    with pytest.raises(UnsupportedDumpError, match=what) as e:
        open_dump(p)
    assert e.value.offset == at - 8 - 1 - len("pc.ram")


def test_libvirt_header_raw(tmp_path):
    xml = b"<domain type='kvm'><name>web-01</name><uuid>secret-ish</uuid></domain>"
    head = libvirt_header(xml)
    pages = {("pc.ram", 0): page(1), ("pc.ram", PS): 0}
    p = write(tmp_path, head + simple(pages, BLOCKS))
    with open_dump(p) as r:
        assert r.read_pages(np.array([0], np.uint64))[0].tobytes() == page(1)
        info = r.info()
        assert info["libvirt_domain"] == "web-01"
        assert info["libvirt_format"] == "raw"
        assert info["libvirt_was_running"] is True
        assert info["stream_offset"] == len(head)
        assert "secret-ish" not in repr(info)


def test_libvirt_partial_header_is_a_clear_error(tmp_path):
    p = write(tmp_path, libvirt_header(b"<domain/>", magic=b"LibvirtQemudPart") + bytes(64))
    with pytest.raises(DumpFormatError, match="incomplete libvirt save image"):
        open_dump(p)


# -- compressed libvirt images and streams inside a wrapper ------------------------------------

# libvirt's compressors (src/qemu/qemu_saveimage.c, qemuSaveImageGetCompressionProgram):
# ``<format> -c`` (xz: ``-c -3``) writes the whole rest of the file after the header.
LIBVIRT_COMPRESSORS = {1: ["gzip", "-c"], 2: ["bzip2", "-c"], 3: ["xz", "-c", "-3"],
                       4: ["lzop", "-c"], 5: ["zstd", "-c"]}


def compressed_image(tmp_path, stream: bytes, fmt: int, xml: bytes = b"<domain/>",
                     name: str = "c.save"):
    """A libvirt save image of format ``fmt``: the raw header, then the stream piped through
    the real compressor CLI, as libvirt writes it (the tool must be installed)."""
    import shutil
    import subprocess

    argv = LIBVIRT_COMPRESSORS[fmt]
    if shutil.which(argv[0]) is None:
        pytest.skip(f"the {argv[0]} CLI is not installed")
    packed = subprocess.run(argv, input=stream, capture_output=True, check=True).stdout
    return write(tmp_path, libvirt_header(xml, fmt=fmt) + packed, name)


def _everything(path, **kw):
    """Counts, extents, info facts and every page (by address) a reader gives."""
    with open_dump(path, **kw) as r:
        pages = {a: bytes(p) for b in r.iter_batches(3) for a, p in
                 zip(b.addrs.tolist(), b.pages, strict=True)}
        addrs = np.array(sorted(pages)[::-1], np.uint64)  # read_pages, backwards
        again = [bytes(p) for p in r.read_pages(addrs)]
        assert again == [pages[a] for a in addrs.tolist()]
        info = r.info()
        facts = {k: info[k] for k in ("ram_records", "sections", "machine_type", "blocks")}
        return (r.page_counts(), [(e.addr, e.npages, e.state) for e in r.extents], facts,
                pages, r.in_place)


def _resent_stream(tmp_path):
    """A running guest's stream: 96 pc.ram pages sent shuffled, some twice (the last copy
    wins), fill bytes, a second block; and the raw dump of what QEMU would load."""
    rng = np.random.default_rng(11)
    order = list(range(96)) + rng.integers(0, 96, 40).tolist()
    rng.shuffle(order)
    final: dict[int, bytes] = {}
    s = Stream()
    s.ram_part([("pc.ram", 96 * PS), ("pc.bios", 2 * PS)])
    for k, i in enumerate(order):
        if k % 7 == 0:
            fill = (0, 0x5A)[k % 2]
            s.zero("pc.ram", i * PS, fill)
            final[i] = bytes([fill]) * PS
        else:
            final[i] = page(1 + (k % 50))
            s.page("pc.ram", i * PS, final[i])
    s.page("pc.bios", PS, page(77))
    s.flag(EOS)
    s.footer(2)
    s.section(END, 2)
    s.flag(EOS)
    s.footer(2)
    s.device(3, "timer", bytes(8))
    return s.end(), final


@pytest.mark.parametrize("fmt", sorted(LIBVIRT_COMPRESSORS), ids=lambda f: LIBVIRT_FORMATS[f])
def test_libvirt_compressed_image_reads_as_the_raw_image(tmp_path, fmt):
    stream, final = _resent_stream(tmp_path)
    xml = b"<domain><name>web1</name></domain>"
    raw = write(tmp_path, libvirt_header(xml) + stream, "raw.save")
    packed = compressed_image(tmp_path, stream, fmt, xml)
    counts, extents, facts, pages, _ = _everything(packed)
    assert (counts, extents, facts, pages) == _everything(raw)[:4]
    # and what the stream says, by hand: every pc.ram page's last copy, bios page 1
    assert {a: p for a, p in pages.items() if a < SYNTH} == {
        i * PS: final[i] for i in range(96) if final[i] != bytes(PS)}
    assert pages[SYNTH + PS] == page(77)
    with open_dump(packed) as r:
        assert not r.in_place
        info = r.info()
        assert info["libvirt_format"] == LIBVIRT_FORMATS[fmt]
        assert info["libvirt_domain"] == "web1"
        head = len(libvirt_header(xml))
        assert info["libvirt_stream_offset"] == info["stream_offset"] == head
        assert r.source is not None and r.source.start == head
        assert r.source.info()["decompressed_bytes"] == len(stream)


def test_records_straddling_windows_kernel_and_numpy(tmp_path, monkeypatch):
    """The walk reads a compressed stream through a window: with windows of a few hundred
    odd bytes every kind of record straddles a boundary; the index (offsets in the
    decompressed stream) is the bare stream's, with the compiled walk and the numpy one."""
    from ksm_analyze.formats import migration
    from ksm_analyze.hashing import compiled as kernels

    stream, _ = _resent_stream(tmp_path)
    raw = _outcome(write(tmp_path, stream, "bare.qevm"))  # offsets from the stream's start
    packed = compressed_image(tmp_path, stream, 1)
    for window in (1, 7, 4099, 3 * (PS + 8) + 5):
        monkeypatch.setattr(migration, "WINDOW_BYTES", window)
        assert _outcome(packed) == raw, window
        monkeypatch.setattr(kernels, "native", None)
        assert _outcome(packed) == raw, window
        monkeypatch.undo()


def test_a_bare_stream_and_a_libvirt_image_inside_gzip(tmp_path):
    # virsh dump (no --memory-only) or a Proxmox vmstate, gzip'ed: the gzip CLI's output
    import subprocess

    stream, _ = _resent_stream(tmp_path)
    plain = write(tmp_path, stream, "s.qevm")
    image = write(tmp_path, libvirt_header(b"<domain/>") + stream, "i.save")
    for p in (plain, image):
        subprocess.run(["gzip", "-k", "-1", str(p)], check=True)
        wrapped = p.with_name(p.name + ".gz")
        assert detect_format(wrapped) is DumpFormat.MIGRATION
        assert _everything(wrapped)[:4] == _everything(p)[:4]


def test_compressed_image_errors_name_the_stream(tmp_path):
    stream, _ = _resent_stream(tmp_path)
    # a record naming an offset outside its block, deep in the stream
    at = stream.index(b"pc.bios", 200) - 9  # the record that names pc.bios
    bad = bytearray(stream)
    bad[at : at + 8] = (64 * PS | 0x08).to_bytes(8, "big")
    packed = compressed_image(tmp_path, bytes(bad), 5)
    head = len(libvirt_header(b"<domain/>"))
    with pytest.raises(DumpFormatError) as e:
        open_dump(packed)
    msg = str(e.value)
    assert f"RAM record at {at:#x}" in msg and "\n" not in msg
    assert f"decompressed from the zstd data at file offset {head:#x}" in msg
    # cut short: the compressed data ends early (the codec's own error, at its offset)
    data = packed.read_bytes()
    cut = write(tmp_path, data[: head + (len(data) - head) // 2], "cut.save")
    with pytest.raises(DumpFormatError, match="zstd"):
        open_dump(cut)
    # a compressed image inside a wrapper: refused by name, not decompressed twice
    import gzip

    nested = write(tmp_path, gzip.compress(data), "n.save.gz")
    with pytest.raises(UnsupportedDumpError, match="a zstd-compressed libvirt save image "
                       "inside a gzip stream"):
        open_dump(nested)
    # an empty stream after the header
    empty = write(tmp_path, libvirt_header(b"<domain/>", fmt=1) + gzip.compress(b""), "e.save")
    with pytest.raises(DumpFormatError, match="QEVM"):
        open_dump(empty)


def test_a_compressed_image_travels_to_a_worker(tmp_path):
    import pickle

    stream, _ = _resent_stream(tmp_path)
    packed = compressed_image(tmp_path, stream, 3, b"<domain><name>x</name></domain>")
    with open_dump(packed) as r:
        want = _everything(packed)[:4]
        again = pickle.loads(pickle.dumps(r))
    try:
        assert again.source is not None and again.source.size == len(stream)
        assert again.libvirt["format"] == "xz" and again.stream_offset == r.stream_offset
        pages = {a: bytes(p) for b in again.iter_batches(3)
                 for a, p in zip(b.addrs.tolist(), b.pages, strict=True)}
        assert pages == want[3]
        assert again.page_counts() == want[0]
    finally:
        again.close()


def test_mapped_ram_holes_are_zero_and_pages_read_in_place(tmp_path):
    head = libvirt_header(b"<domain><name>m</name></domain>", fmt=6)
    data = mapped_ram([("pc.ram", 16 * PS, {0: page(1), 5: page(5), 6: page(6)}),
                       ("pc.bios", 2 * PS, {1: page(9)})], start=len(head))
    p = write(tmp_path, head + data)
    with open_dump(p) as r:
        counts = r.page_counts()
        assert counts[PageState.DATA] == 4
        assert counts[PageState.ZERO] == 16 - 3 + 1
        assert r.in_place
        got = r.read_pages(np.array([0, 5 * PS, 6 * PS, SYNTH + PS], np.uint64))
        assert [row.tobytes() for row in got] == [page(1), page(5), page(6), page(9)]
        assert r.info()["mapped_ram"] is True
        stored = [e for e in r.extents if e.state is PageState.DATA]
        # pages at 1 MiB-aligned fixed offsets, read from the map
        assert all(e.file_offset % MiB == (e.addr % (1 << 30)) % MiB for e in stored)


def test_pc_ram_split_above_4g_for_q35(tmp_path):
    # q35 with >= 2.75 GiB: pc.ram offsets from 2 GiB on map to 4 GiB + (offset - 2 GiB).
    size = 3 << 30
    s = Stream(machine="pc-q35-7.2")
    s.section(START, 2)
    s.mem_size([("pc.ram", size)])
    s.flag(EOS)
    s.section(END, 2)
    s.page("pc.ram", (2 << 30) + PS, page(7))
    s.flag(EOS)
    # Padding after the stream, as on a Proxmox vmstate volume (and a file large enough for
    # an index of 3 GiB of pages: one page per byte of file at most).
    p = write(tmp_path, s.end() + bytes(MiB))
    with open_dump(p) as r:
        assert r.read_pages(np.array([(4 << 30) + PS], np.uint64))[0].tobytes() == page(7)
        assert r.info()["below_4g"] == "2 GiB"


def test_unknown_machine_type_warns(tmp_path):
    p = write(tmp_path, simple({("pc.ram", 0): page(1)}, BLOCKS, machine="microvm"))
    with open_dump(p) as r:
        assert any("microvm" in w for w in r.warnings)
        assert r.info()["blocks"][0]["address_kind"] == "synthetic"


def test_truncated_at_every_structural_boundary(tmp_path):
    s = Stream()
    s.ram_part(BLOCKS)
    s.page("pc.ram", 0, page(1))
    s.page("pc.ram", PS, page(2))
    s.zero("pc.ram", 2 * PS)
    s.flag(EOS)
    s.footer(2)
    s.section(END, 2)
    s.flag(EOS)
    s.footer(2)
    whole = s.end()
    ram_end = dict(s.marks)["eof"]
    cuts = sorted({at for _, at in s.marks if 8 < at < ram_end} | {ram_end - 3})
    for cut in cuts:
        p = write(tmp_path, whole[:cut], f"cut{cut}")
        with pytest.raises((TruncatedDumpError, DumpFormatError)) as e:
            open_dump(p)
        assert e.value.offset is not None, cut


def test_stream_it_cannot_follow(tmp_path):
    s = Stream()
    s.buf += b"\x42" + bytes(16)
    p = write(tmp_path, s.end())
    with pytest.raises(DumpFormatError, match=r"section type 0x42 at 0x"):
        open_dump(p)


def test_record_outside_its_block(tmp_path):
    s = Stream()
    s.section(START, 2)
    s.mem_size(BLOCKS)
    s.flag(EOS)
    s.section(END, 2)
    s.page("pc.bios", 2 * PS, page(1))  # pc.bios holds 2 pages
    s.flag(EOS)
    p = write(tmp_path, s.end())
    with pytest.raises(DumpFormatError, match=r"is not a page of block 'pc\.bios'"):
        open_dump(p)


def test_start_section_header_layout():
    # The writer's START header is the one savevm.c writes: type, be32 id, u8 len + idstr,
    # be32 instance, be32 version.
    s = Stream()
    at = len(s.buf)
    s.section(START, 2)
    assert bytes(s.buf[at:]) == b"\x01" + struct.pack(">I", 2) + b"\x03ram" + struct.pack(
        ">II", 0, 4)
    assert FULL == 4 and END == 3


def _outcome(path):
    """What the reader makes of a stream: each block's page index, the records counted and the
    extents; or the error's type and message."""
    try:
        with open_dump(path) as r:
            return ({b.name: b.where.tolist() for b in r.blocks.values()}, r.ram_records,
                    [(e.addr, e.npages, e.state) for e in r.extents])
    except DumpFormatError as e:
        return type(e), str(e)


def test_record_walk_kernel_and_numpy_agree(tmp_path, monkeypatch):
    """The compiled record walk (hashing/_compiled.c qevm_ram_records) and the numpy one give
    the same index, counts and errors: short mixed runs of PAGE and ZERO records, resends,
    fill bytes, a record outside its block, and the stream cut at every record boundary and
    inside records."""
    from ksm_analyze.hashing import compiled as kernels

    if kernels.native is None:
        pytest.skip(f"compiled kernels not in use ({kernels.numpy_reason})")
    rng = np.random.default_rng(5)
    s = Stream()
    s.ram_part([("pc.ram", 64 * PS), ("pc.bios", 4 * PS)])
    for n in rng.integers(0, 64, 120).tolist():  # resends: 120 records over 64 pages
        if rng.random() < 0.5:
            s.zero("pc.ram", n * PS, int(rng.choice([0, 0, 0x5A])))
        else:
            s.page("pc.ram", n * PS, page(n + 1))
    s.page("pc.bios", PS, page(99))
    s.zero("pc.bios", 0)
    s.page("pc.ram", 5 * PS, page(200))
    s.flag(EOS)
    s.footer(2)
    s.section(END, 2)
    s.flag(EOS)
    s.footer(2)
    s.device(3, "timer", bytes(8))
    data = s.end()
    cuts = sorted({at for what, at in s.marks if what == "record"} | {len(data)}
                  | set(rng.integers(0, len(data), 40).tolist()))
    bad = bytearray(data)  # a CONTINUE record past its block's end, in the middle of a run
    at = [a for w, a in s.marks if w == "record"][60]
    bad[at : at + 8] = (64 * PS | 0x28).to_bytes(8, "big")
    inputs = [data[:c] for c in cuts] + [bytes(bad)]
    for i, blob in enumerate(inputs):
        p = write(tmp_path, blob, f"s{i}.qevm")
        native = _outcome(p)
        monkeypatch.setattr(kernels, "native", None)
        numpy = _outcome(p)
        monkeypatch.undo()
        assert native == numpy, (i, len(blob))
    assert isinstance(_outcome(write(tmp_path, data, "whole.qevm"))[0], dict)


@pytest.mark.compiled
def test_record_walk_kernel_by_hand():
    from ksm_analyze.hashing import compiled as kernels

    rec = lambda off, flags: (off | flags).to_bytes(8, "big")
    buf = (bytes(3) + rec(0, 0x28) + bytes([1]) * PS + rec(2 * PS, 0x22) + b"\x07"
           + rec(0, 0x28) + bytes([2]) * PS + rec(0, 0x10))  # ... then EOS
    where = np.full(4, -1, np.int64)
    pos, taken = kernels.qevm_ram_records(buf, 3, PS, 4 * PS, where)
    second = 3 + 8 + PS + 9 + 8
    assert (pos, taken) == (second + PS, 3)  # stops at the EOS record
    assert where.tolist() == [second, -1, -2 - 7, -1]  # the second copy of page 0 won
    where[:] = -1
    assert kernels.qevm_ram_records(buf, 3, PS, 2 * PS, where) == (3 + 8 + PS, 1)  # page 2
    assert where.tolist() == [3 + 8, -1, -1, -1]  # is outside a 2-page block: left to Python
    assert kernels.qevm_ram_records(buf[: 3 + 8 + PS - 1], 3, PS, 4 * PS, where) == (3, 0)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.qevm_ram_records(buf, 3, PS, 8 * PS, where)  # index shorter than the block
    with pytest.raises(ValueError, match="do not fit"):
        kernels.qevm_ram_records(buf, len(buf) + 1, PS, 4 * PS, where)


def _stream_and_raw(tmp_path, order, zero_every=5):
    """A stream of 96 pc.ram pages (zero records between runs of data records, as a paused
    guest's stream has them; the pages sent in ``order``) and a raw dump of the same pages."""
    contents = [page(1 + i % 40) if i % zero_every else bytes(PS) for i in range(96)]
    s = Stream()
    s.ram_part([("pc.ram", 96 * PS)])
    for i in order:
        if contents[i] == bytes(PS):
            s.zero("pc.ram", i * PS)
        else:
            s.page("pc.ram", i * PS, contents[i])
    s.flag(EOS)
    s.footer(2)
    s.section(END, 2)
    s.flag(EOS)
    s.footer(2)
    s.device(3, "timer", bytes(8))
    return write(tmp_path, s.end()), write(tmp_path, b"".join(contents), "same.raw")


@pytest.mark.parametrize("jobs", [1, 2])
def test_stream_pages_in_place_predict_as_a_raw_dump(tmp_path, kernel_path, jobs):
    from ksm_analyze import analyze
    from ksm_analyze.formats.migration import MigrationReader

    stream, raw = _stream_and_raw(tmp_path, range(96))
    with open_dump(stream) as r:
        assert r.in_place  # runs of raw pages
        starts, _ends, views = r._stored_views()
        assert [len(v) for v in views] == [4] * 19  # cut by every 5th page (zero)
        assert starts.tolist() == [PS * (5 * k + 1) for k in range(19)]
        assert all(v.strides == (PS + 8, 1) for v in views)
        addrs = np.array([PS * i for i in range(96) if i % 5], np.uint64)
        placed = r.page_views(addrs)
        assert placed is not None
        vs, which, rel = placed
        got = np.stack([vs[w][k] for w, k in zip(which.tolist(), rel.tolist(), strict=True)])
        assert np.array_equal(got, r.read_pages(addrs))
        batches = list(r.iter_batches(3))
        assert sorted(a for b in batches for a in b.addrs.tolist()) == addrs.tolist()
        assert isinstance(r, MigrationReader)
    a = analyze([stream], jobs=jobs)
    b = analyze([raw], jobs=jobs)
    assert a.host.to_dict() == b.host.to_dict()
    # 20 zero pages; 76 data pages, page(1 + i % 40) for i not a multiple of 5: 32 contents
    assert a.host["with_zero_pages"]["pages_sharing"] == 19 + (76 - 32)


def test_scattered_or_fill_pages_are_copied_not_viewed(tmp_path):
    order = list(range(96))
    np.random.default_rng(3).shuffle(order)  # resends of a running guest: no runs
    stream, _ = _stream_and_raw(tmp_path, order, zero_every=1000)
    with open_dump(stream) as r:
        assert not r.in_place
        got = [b for b in r.iter_batches()]
        assert all(b.pages.flags.c_contiguous for b in got)
        assert sum(len(b.addrs) for b in got) == 95  # page 0 is zero
    pages = {("pc.ram", 0): page(1), ("pc.ram", PS): 0x5A, ("pc.ram", 2 * PS): page(2)}
    with open_dump(write(tmp_path, simple(pages, [("pc.ram", 4 * PS)]), "fill.qevm")) as r:
        assert not r.in_place  # a page of one non-zero byte has no bytes in the file
        assert r.read_pages(np.array([PS], np.uint64)).tobytes() == b"\x5a" * PS


def test_mapped_ram_pages_offset_past_the_file_is_a_clear_error(tmp_path):
    # Found by fuzzing (fuzz/crashes/migration-mapped-pages-offset-overflow.bin): a block with
    # no page in its bitmap and a pages offset of 2^63 was an OverflowError.
    data = bytearray(mapped_ram([("pc.ram", 4 * PS, {})]))
    at = data.index(struct.pack(">IQ", 1, PS))  # the MappedRamHeader: version, page size
    data[at + 20 : at + 28] = struct.pack(">Q", 1 << 63)  # pages_offset
    with pytest.raises(TruncatedDumpError, match="pages at 0x8000000000000000 runs past the end"):
        open_dump(write(tmp_path, bytes(data)))
