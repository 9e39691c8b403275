"""The migration reader against a real QEMU guest: one paused 256 MiB TCG guest written as
``dump-guest-memory`` (ELF), as ``migrate "exec:cat > FILE"`` (a bare QEVM stream), and as the
same stream behind a libvirt save header built here from libvirt's published struct
(``src/qemu/qemu_saveimage.h``, ``struct _virQEMUSaveHeader``: ``char magic[16]`` =
``"LibvirtQemudSave"``, then ``uint32_t version`` (2), ``data_len``, ``was_running``,
``format`` (0 = ``QEMU_SAVE_FORMAT_RAW``), ``cookieOffset``, ``unused[14]``, in the host's
byte order; the domain XML, NUL-terminated, follows, then the stream).

Checks: every page of ``pc.ram`` in the stream equals the ELF's page at the same
guest-physical address, byte for byte; the ``vga.vram`` and ``pc.bios`` blocks equal the
ELF's PT_LOADs of their size; the blocks the ELF does not hold are listed by ``info``; QEMU's
own ``info migrate`` page counts (``normal``, ``duplicate``) equal the reader's data and zero
pages; and ``scan --json``'s counters equal counters computed here from a dict of page
digests (blake2b), from the ELF's pages for every address both files hold, so the sharing
inside ``pc.ram`` (the guest fills 24 MiB with pages written three times) is checked against
an independent count. The libvirt image gives the same extents and pages as the bare stream.

``mapped-ram`` (``migrate-set-capabilities mapped-ram on`` with ``migrate file:F``) is QEMU
9.0+; this machine's QEMU (Debian 12's 7.2) has no such capability, so it is not tested here
(tests/test_migration.py covers it with files built from QEMU's published layout). The
compressed libvirt formats (gzip, bzip2, xz, lzop, zstd: the raw header, then the stream piped
through the real compressor CLI, as libvirt's qemu_saveimage.c does, at ``-1`` for speed) give
the raw image's extents, pages and counters.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ksm_analyze.formats import DumpFormat, detect_format, open_dump
from ksm_analyze.pages import PageState
from qemu_guest import Guest, ensure_guest_assets, qemu_available

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
]

PS = 4096
MiB = 1 << 20
GUEST_MIB = 256
CMDLINE = "ksmfill=7:24:3"  # 24 MiB of pages written three times each (qemu_guest.py)
BLOCK = 8192  # pages compared at a time
MAX_PAGE_SHARING = 256  # the kernel default, as scan uses
DOMAIN_XML = b"<domain type='kvm'><name>ksm-migration-test</name><memory>262144</memory></domain>"


def libvirt_save_header(xml: bytes, was_running: int = 0) -> bytes:
    """``struct _virQEMUSaveHeader`` (libvirt src/qemu/qemu_saveimage.h) + the XML + NUL."""
    body = xml + b"\0"
    header = struct.pack("<16s5I14I", b"LibvirtQemudSave", 2, len(body), was_running,
                         0, 0, *([0] * 14))
    assert len(header) == 92
    return header + body


def _migrate(guest: Guest, path: Path) -> str:
    """``migrate "exec:cat > PATH"`` and wait for ``info migrate`` to say completed."""
    out = guest.hmp(f'migrate "exec:cat > {path}"').strip()
    assert not out, out
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = guest.hmp("info migrate")
        if re.search(r"Migration status: (completed|failed)", status):
            break
        time.sleep(0.2)
    assert "Migration status: completed" in status, status
    return status


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("migration")
    with Guest(ensure_guest_assets(), mem_mib=GUEST_MIB, cmdline_extra=CMDLINE,
               workdir=d / "guest") as g:
        g.pause()
        elf = g.dump_elf(d / "guest.elf")
        stream = d / "guest.qevm"
        status = _migrate(g, stream)
    libvirt = d / "guest.save"
    with open(libvirt, "wb") as out, open(stream, "rb") as src:
        out.write(libvirt_save_header(DOMAIN_XML))
        while chunk := src.read(16 * MiB):
            out.write(chunk)
    return {"elf": elf, "stream": stream, "libvirt": libvirt, "status": status}


def _pt_loads(path: Path) -> list[tuple[int, int]]:
    """(p_paddr, p_filesz) of every PT_LOAD, read here from the ELF64 headers."""
    with open(path, "rb") as f:
        head = f.read(64)
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        p_type, _, _, _, paddr, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", table, i * phentsize)
        if p_type == 1:
            out.append((paddr, filesz))
    return out


def _addresses(reader, block: str) -> np.ndarray:
    """Guest addresses of the block's DATA and ZERO pages, from the reader's extents."""
    parts = [np.uint64(e.addr) + np.arange(e.npages, dtype=np.uint64) * np.uint64(PS)
             for e in reader.extents if e.label == f"RAM block {block}"
             and e.state in (PageState.DATA, PageState.ZERO)]
    return np.concatenate(parts) if parts else np.empty(0, np.uint64)


def _pages(reader, addrs: np.ndarray):
    """The pages at ``addrs`` (DATA read, ZERO as zeros), BLOCK at a time."""
    for i in range(0, len(addrs), BLOCK):
        yield addrs[i : i + BLOCK], _read(reader, addrs[i : i + BLOCK])


def _read(reader, addrs: np.ndarray) -> np.ndarray:
    """read_pages for stored pages; the ZERO pages of a stream are zero-filled here."""
    out = np.zeros((len(addrs), PS), np.uint8)
    zero = np.zeros(len(addrs), bool)
    for e in reader.extents:
        if e.state is PageState.ZERO:
            zero |= (addrs >= np.uint64(e.addr)) & (addrs < np.uint64(e.addr + e.npages * PS))
    if (~zero).any():
        out[~zero] = reader.read_pages(addrs[~zero])
    return out


def _elf_ranges(elf) -> list[tuple[int, int]]:
    return [(e.addr, e.addr + e.npages * PS) for e in elf.extents if e.state is PageState.DATA]


def _inside(addrs: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    ok = np.zeros(len(addrs), bool)
    for lo, hi in ranges:
        ok |= (addrs >= np.uint64(lo)) & (addrs < np.uint64(hi))
    return ok


def _digests(pages: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in pages]


def _counters(counts: Counter) -> dict[str, int]:
    """KSM's counters for pages with these content counts, by hand: a content held n >= 2
    times is merged into ceil(n / max_page_sharing) KSM pages (pages_shared), the other
    pages map them (pages_sharing); a content held once is pages_unshared."""
    shared = sum(-(-n // MAX_PAGE_SHARING) for n in counts.values() if n > 1)
    sharing = sum(n - -(-n // MAX_PAGE_SHARING) for n in counts.values() if n > 1)
    unshared = sum(1 for n in counts.values() if n == 1)
    return {"pages_shared": shared, "pages_sharing": sharing, "pages_unshared": unshared}


def _scan(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "ksm_analyze", "scan", str(path), "--json"],
                         capture_output=True, check=True)
    return json.loads(out.stdout)


def test_formats_and_blocks(saved):
    assert detect_format(saved["stream"]) is DumpFormat.MIGRATION
    assert detect_format(saved["libvirt"]) is DumpFormat.MIGRATION
    with open_dump(saved["stream"]) as r:
        info = r.info()
        names = [b["block"] for b in info["blocks"]]
        assert names[0] == "pc.ram"
        # What QEMU 7.2's pc machine registers besides guest RAM (firmware, option ROMs,
        # ACPI tables, the VGA's memory): listed, with synthetic addresses.
        assert {"pc.bios", "pc.rom", "/rom@etc/acpi/tables"} <= set(names)
        assert any(n.endswith("/vga.vram") for n in names)
        for row in info["blocks"]:
            assert f"block {row['block']}" in info
            assert row["not_saved_pages"] == 0  # a paused guest's stream sends every page
            assert row["address_kind"] == ("guest-physical" if row["block"] == "pc.ram"
                                           else "synthetic")
        assert info["machine_type"].startswith("pc-i440fx")
        assert info["blocks"][0]["pages"] == GUEST_MIB * MiB // PS


def test_qemu_page_counts_equal_the_readers(saved):
    """QEMU's ``info migrate`` counts what it sent: ``normal`` pages (PAGE records) and
    ``duplicate`` pages (ZERO records); a paused guest sends each page once."""
    status = saved["status"]
    normal = int(re.search(r"^normal: (\d+) pages", status, re.MULTILINE)[1])
    duplicate = int(re.search(r"^duplicate: (\d+) pages", status, re.MULTILINE)[1])
    with open_dump(saved["stream"]) as r:
        counts = r.page_counts()
        assert counts[PageState.DATA] == normal
        assert counts[PageState.ZERO] == duplicate
        assert r.info()["ram_records"] == normal + duplicate


def test_pc_ram_equals_the_elf_byte_for_byte(saved):
    with open_dump(saved["stream"]) as s, open_dump(saved["elf"]) as e:
        addrs = _addresses(s, "pc.ram")
        assert len(addrs) == GUEST_MIB * MiB // PS
        held = _inside(addrs, _elf_ranges(e))
        # The ELF leaves out what is not RAM in the address space: the legacy VGA window
        # 0xa0000-0xc0000 (32 pages), where pc.ram is hidden behind the VGA's MMIO.
        missing = addrs[~held]
        assert ((missing >= 0xA0000) & (missing < 0xC0000)).all(), missing[:8]
        assert len(missing) <= 32
        shared = addrs[held]
        compared = 0
        for part, ours in _pages(s, shared):
            theirs = e.read_pages(part)
            if not np.array_equal(ours, theirs):
                bad = int(part[np.flatnonzero((ours != theirs).any(axis=1))[0]])
                pytest.fail(f"page {bad:#x} of pc.ram differs from the ELF's")
            compared += len(part)
        assert compared == len(addrs) - len(missing)


@pytest.mark.parametrize("suffix,size", [("vga.vram", 16 * MiB), ("pc.bios", 256 * 1024)])
def test_other_blocks_equal_the_elf_segment_of_their_size(saved, suffix, size):
    loads = [(a, n) for a, n in _pt_loads(saved["elf"]) if n == size]
    assert len(loads) == 1, loads  # matched by size: one PT_LOAD each
    base = loads[0][0]
    with open_dump(saved["stream"]) as s, open_dump(saved["elf"]) as e:
        name = next(b.name for b in s.blocks.values() if b.name.endswith(suffix))
        addrs = _addresses(s, name)
        assert len(addrs) == size // PS
        start = int(addrs.min())
        for part, ours in _pages(s, addrs):
            theirs = e.read_pages(part - np.uint64(start) + np.uint64(base))
            assert np.array_equal(ours, theirs), f"{name} differs from the ELF at {base:#x}"


def test_scan_counters_equal_an_independent_count(saved):
    """Counters over every page of the stream, by hand: pages at the addresses the ELF also
    holds are taken from the ELF (pc.ram, and vga.vram and pc.bios at their ELF addresses),
    the few pages only the stream holds (ROMs, ACPI tables, the VGA window of pc.ram) from the
    stream. The ELF's own scan is checked against the same count over its pages."""
    with open_dump(saved["stream"]) as s, open_dump(saved["elf"]) as e:
        loads = _pt_loads(saved["elf"])
        vram = next(a for a, n in loads if n == 16 * MiB)
        bios = next(a for a, n in loads if n == 256 * 1024)
        elf_ranges = _elf_ranges(e)
        stream_counts: Counter = Counter()
        stream_only = 0
        for b in s.blocks.values():
            addrs = _addresses(s, b.name)
            if b.name == "pc.ram":
                there = addrs
            elif b.name.endswith("/vga.vram"):
                there = addrs - addrs.min() + np.uint64(vram)
            elif b.name == "pc.bios":
                there = addrs - addrs.min() + np.uint64(bios)
            else:
                there = np.full(len(addrs), np.uint64(1 << 63))
            held = _inside(there, elf_ranges)
            for i in range(0, len(addrs), BLOCK):
                h = held[i : i + BLOCK]
                if h.any():
                    stream_counts.update(_digests(e.read_pages(there[i : i + BLOCK][h])))
                if (~h).any():
                    stream_only += int((~h).sum())
                    stream_counts.update(_digests(_read(s, addrs[i : i + BLOCK][~h])))
        assert stream_only < 32 + 200  # the VGA window and the small ROM blocks
        elf_counts: Counter = Counter()
        elf_addrs = np.concatenate([np.arange(lo, hi, PS, dtype=np.uint64)
                                    for lo, hi in elf_ranges])
        for i in range(0, len(elf_addrs), BLOCK):
            elf_counts.update(_digests(e.read_pages(elf_addrs[i : i + BLOCK])))
    zero = hashlib.blake2b(bytes(PS), digest_size=16).digest()
    for path, counts in ((saved["stream"], stream_counts), (saved["elf"], elf_counts)):
        got = _scan(path)
        want = _counters(counts)
        assert {k: got["host"][k]["with_zero_pages"] for k in want} == want, path
        assert got["per_input"][0]["zero_pages"] == counts[zero]
        assert got["per_input"][0]["pages"] == sum(counts.values())
    # The sharing the guest wrote: 24 MiB of pages three times each, in both.
    assert stream_counts[zero] > GUEST_MIB * MiB // PS // 4
    assert sum(1 for n in stream_counts.values() if n == 3) >= 24 * MiB // PS // 3


def test_libvirt_image_reads_as_the_bare_stream(saved):
    with open_dump(saved["stream"]) as s, open_dump(saved["libvirt"]) as v:
        info = v.info()
        assert info["libvirt_format"] == "raw"
        assert info["libvirt_domain"] == "ksm-migration-test"
        assert info["stream_offset"] == 92 + len(DOMAIN_XML) + 1
        assert v.page_counts() == s.page_counts()
        assert [(x.addr, x.npages, x.state) for x in v.extents] == [
            (x.addr, x.npages, x.state) for x in s.extents]
        addrs = np.concatenate([_addresses(s, b) for b in s.blocks])
        for part, ours in _pages(s, addrs):
            assert np.array_equal(_read(v, part), ours)


@pytest.fixture(scope="module")
def raw_prediction(saved):
    from ksm_analyze import analyze

    return analyze([saved["libvirt"]], jobs=1).host.to_dict()


# The fast codecs on the real guest; bzip2 and xz (libvirt formats 2 and 3: 20-50 s each here)
# are checked on a built stream in tests/test_migration.py, through the same code.
@pytest.mark.parametrize("fmt,tool", [(1, "gzip"), (4, "lzop"), (5, "zstd")],
                         ids=lambda v: str(v))
def test_compressed_libvirt_image_reads_as_the_raw_one(saved, raw_prediction, tmp_path, fmt,
                                                         tool):
    import shutil

    from ksm_analyze import analyze

    assert shutil.which(tool), f"the {tool} CLI is missing (.ci/install-system-deps.sh installs it)"
    image = tmp_path / f"guest.{tool}.save"
    head = bytearray(saved["libvirt"].read_bytes()[:92 + len(DOMAIN_XML) + 1])
    struct.pack_into("<I", head, 28, fmt)  # the header's format field
    with open(image, "wb") as out, open(saved["stream"], "rb") as src:
        out.write(head)
        out.flush()
        subprocess.run([tool, "-c", "-1"], stdin=src, stdout=out, check=True)
    with open_dump(saved["libvirt"]) as v, open_dump(image) as c:
        assert c.info()["libvirt_format"] == tool
        assert c.page_counts() == v.page_counts()
        assert [(x.addr, x.npages, x.state) for x in c.extents] == [
            (x.addr, x.npages, x.state) for x in v.extents]
        seen = 0
        for batch in c.iter_batches():  # stream order, read forward
            assert np.array_equal(batch.pages, v.read_pages(batch.addrs))
            seen += len(batch.addrs)
        assert seen == v.page_counts()[PageState.DATA]
    if tool == "gzip":  # the same pages at the same addresses predict the same: once, end to
        # end (stage 2's re-reads restart bzip2 and xz streams from their start: slow here)
        assert analyze([image], jobs=1).host.to_dict() == raw_prediction


def test_compiled_and_numpy_walks_index_the_real_stream_alike(saved, monkeypatch):
    from ksm_analyze.hashing import compiled as kernels

    with open_dump(saved["stream"]) as r:
        native = {b.name: b.where.copy() for b in r.blocks.values()}
        assert r.in_place  # a paused guest's pages lie in long runs of records
    monkeypatch.setattr(kernels, "native", None)
    with open_dump(saved["stream"]) as r:
        numpy = {b.name: b.where for b in r.blocks.values()}
        assert native.keys() == numpy.keys()
        assert all(np.array_equal(native[k], numpy[k]) for k in native)
