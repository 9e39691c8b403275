"""ElfCoreReader: synthetic cores of every producer, corrupt headers, and real cores."""

from __future__ import annotations

import os
import re
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PS

from dumpwriter.elf import Seg, make_elf_core, make_xen_core
from ksm_analyze.errors import DumpFormatError, TruncatedDumpError, UnsupportedDumpError
from ksm_analyze.formats import DumpFormat, detect_format, open_dump
from ksm_analyze.formats.elfcore import ElfCoreReader
from ksm_analyze.pages import Extent, PageState


def page(tag: object) -> bytes:
    """A page whose bytes name ``tag``."""
    return (f"<page {tag}>".encode() * PS)[:PS]


def stored(reader: ElfCoreReader) -> dict[int, bytes]:
    """Address -> bytes of every stored page, through iter_batches and read_pages."""
    out = {}
    for batch in reader.iter_batches(batch_pages=3):
        again = reader.read_pages(batch.addrs)
        assert np.array_equal(again, batch.pages)
        for addr, pg in zip(batch.addrs.tolist(), batch.pages, strict=True):
            out[addr] = pg.tobytes()
    return out


def page_map(reader: ElfCoreReader) -> dict[int, Extent]:
    """Address -> extent of every page the dump describes."""
    return {e.addr + i * PS: e for e in reader.extents for i in range(e.npages)}


def states(reader: ElfCoreReader) -> dict[PageState, int]:
    return {s: n for s, n in reader.page_counts().items() if n}


# -- synthetic guest dumps ------------------------------------------------------------------


@pytest.mark.parametrize(("elfclass", "endian"), [(64, "<"), (64, ">"), (32, "<"), (32, ">")])
def test_qemu_round_trip(tmp_path: Path, elfclass: int, endian: str) -> None:
    low = [page(i) for i in range(3)]
    high = [page(f"high{i}") for i in range(4)]
    path = tmp_path / "guest.elf"
    layout = make_elf_core(
        path,
        [(0x0, b"".join(low)), (0x100000, b"".join(high), 6 * PS)],
        elfclass=elfclass,
        endian=endian,
        vcpus=2,
    )
    assert layout.p_offsets[0] % PS  # stored unaligned, as QEMU does
    assert detect_format(path) is DumpFormat.ELF
    with open_dump(path) as r:
        assert isinstance(r, ElfCoreReader)
        assert r.address_space == "physical"
        info = r.info()
        assert info["producer"] == "qemu"
        assert info["class"] == elfclass
        assert info["byte_order"] == ("little" if endian == "<" else "big")
        assert info["vcpus"] == 2
        assert info["paging"] is False
        assert [s["p_paddr"] for s in info["segments"]] == [0, 0x100000]
        expected = {i * PS: p for i, p in enumerate(low)}
        expected |= {0x100000 + i * PS: p for i, p in enumerate(high)}
        assert stored(r) == expected
        assert states(r) == {PageState.DATA: 7, PageState.NOT_SAVED: 2}
        assert r.extents[-1] == Extent(0x104000, 2, PageState.NOT_SAVED, -1, "PT_LOAD[2]")
        assert r.warnings == []


def test_pn_xnum_more_than_65535_program_headers(tmp_path: Path) -> None:
    n = 70_000
    segs = [Seg(0x1000_0000 + i * PS, b"", PS) for i in range(n)]  # MMIO-like, nothing stored
    segs[5] = Seg(segs[5].addr, page("x"))
    path = tmp_path / "many.elf"
    make_elf_core(path, segs, pn_xnum=True)
    assert struct.unpack_from("<H", path.read_bytes(), 0x38)[0] == 0xFFFF
    with open_dump(path) as r:
        assert r.info()["pn_xnum"] is True
        assert r.info()["program_headers"] == n + 1
        assert states(r) == {PageState.DATA: 1, PageState.NOT_SAVED: n - 1}
        assert stored(r) == {0x1000_0000 + 5 * PS: page("x")}


def test_pn_xnum_elf32_big_endian(tmp_path: Path) -> None:
    path = tmp_path / "x.elf"
    make_elf_core(path, [(0x2000, page(1))], elfclass=32, endian=">", pn_xnum=True)
    with open_dump(path) as r:
        assert r.info()["pn_xnum"] is True
        assert stored(r) == {0x2000: page(1)}


def test_virtualbox_mmio_is_not_saved(tmp_path: Path) -> None:
    path = tmp_path / "vbox.elf"
    make_elf_core(
        path,
        [(0x0, page(0) + page(1)), (0xE0000000, b"", 0x10 * PS), (0x100000000, page(2))],
        producer="vbox",
        vcpus=2,
    )
    with open_dump(path) as r:
        assert r.info()["producer"] == "vbox"
        assert r.info()["vcpus"] == 2
        assert r.address_space == "physical"
        assert states(r) == {PageState.DATA: 3, PageState.NOT_SAVED: 0x10}
        assert r.extents[1] == Extent(0xE0000000, 0x10, PageState.NOT_SAVED, -1, "PT_LOAD[2]")
        assert stored(r) == {0: page(0), PS: page(1), 0x100000000: page(2)}


def test_partial_page_is_ignored_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "odd.elf"
    make_elf_core(path, [(0x0, page(0) + page(1)[:100]), (0x10000, page(2))])
    with open_dump(path) as r:
        assert stored(r) == {0: page(0), 0x10000: page(2)}
        assert len(r.warnings) == 1
        assert "PT_LOAD[1]: address or size not a whole number of 4096-byte pages" in r.warnings[0]


def test_paging_dump_counts_shared_file_bytes_once(tmp_path: Path) -> None:
    """dump-guest-memory -p: one PT_LOAD per virtual range; aliases share file bytes."""
    ram = b"".join(page(i) for i in range(8))
    segs = [
        Seg(0x0, ram, vaddr=0xFFFF888000000000),  # the direct map: all RAM
        Seg(0x2000, vaddr=0xFFFFC90000000000, shares=(0, 0x2000, 2 * PS)),  # vmalloc alias
        Seg(0x7000, vaddr=0xFFFFFFFFC0000000, shares=(0, 0x7000, PS)),  # module alias
        Seg(0xFEE00000, b"", PS, vaddr=0xFFFFFFFFFF5FC000),  # LAPIC MMIO, mapped twice
        Seg(0xFEE00000, b"", PS, vaddr=0xFFFFFFFFFF5FD000),
    ]
    path = tmp_path / "paging.elf"
    make_elf_core(path, segs)
    with open_dump(path) as r:
        assert r.info()["paging"] is True
        assert states(r) == {PageState.DATA: 8, PageState.NOT_SAVED: 1}
        assert stored(r) == {i * PS: page(i) for i in range(8)}
        assert any("3 pages of PT_LOAD segments repeat file bytes" in w for w in r.warnings)


def test_kernel_vmcore_text_segment_is_counted_once(tmp_path: Path) -> None:
    ram = b"".join(page(i) for i in range(4))
    segs = [
        Seg(0x1000, ram[PS : 3 * PS], vaddr=0xFFFFFFFF81000000),  # kernel text view
        Seg(0x0, ram, vaddr=0xFFFF888000000000),
    ]
    path = tmp_path / "vmcore"
    make_elf_core(path, segs, producer="kernel", unaligned=False)
    with open_dump(path) as r:
        assert r.info()["producer"] == "kernel"
        assert stored(r) == {i * PS: page(i) for i in range(4)}
        assert r.warnings == [
            (
                f"{path}: PT_LOAD[1] (virtual 0xffffffff81000000) repeats physical memory "
                "[0x1000, 0x3000) of PT_LOAD[2]; counted once"
            )
        ]


def test_unknown_producer_reads_physical_addresses(tmp_path: Path) -> None:
    path = tmp_path / "bare.elf"
    make_elf_core(path, [(0x5000, page(5))], producer="none")
    with open_dump(path) as r:
        assert r.info()["producer"] == "unknown"
        assert stored(r) == {0x5000: page(5)}
        assert "producer unknown" in r.warnings[0]


# -- synthetic process cores ----------------------------------------------------------------

EXE = "/usr/bin/example"


def _process_core(path: Path, **kw: object) -> None:
    segs = [
        Seg(0x400000, page("elf-header"), 3 * PS),  # text: only the ELF header page dumped
        Seg(0x600000, page("data0") + page("data1")),  # a written private file mapping
        Seg(0x700000, page("heap0") + page("heap1") + page("heap2")),  # [heap]: anonymous
        Seg(0x800000, page("shm")),  # MAP_SHARED|MAP_ANONYMOUS
        Seg(0x900000, page("memfd") + page("after")),  # memfd mapping, then anonymous
    ]
    nt_file = [
        (0x400000, 0x403000, 0, EXE),
        (0x600000, 0x602000, 3, EXE),
        (0x800000, 0x801000, 0, "/dev/zero (deleted)"),
        (0x900000, 0x901000, 0, "/memfd:jit (deleted)"),
    ]
    make_elf_core(path, segs, producer="process", nt_file=nt_file, unaligned=False, **kw)


@pytest.mark.parametrize(("elfclass", "endian"), [(64, "<"), (32, ">")])
def test_process_core_nt_file_tells_anon_from_file(
    tmp_path: Path, elfclass: int, endian: str
) -> None:
    path = tmp_path / "core"
    _process_core(path, elfclass=elfclass, endian=endian)
    with open_dump(path) as r:
        assert r.address_space == "virtual"
        info = r.info()
        assert (info["producer"], info["class"]) == ("process", elfclass)
        assert info["threads"] == 1
        assert info["mapped_files"] == 4
        pages = page_map(r)
        want = {
            0x400000: (PageState.DATA, False, EXE),
            0x401000: (PageState.NOT_SAVED, False, EXE),
            0x402000: (PageState.NOT_SAVED, False, EXE),
            0x600000: (PageState.DATA, False, EXE),
            0x601000: (PageState.DATA, False, EXE),
            0x700000: (PageState.DATA, True, "anon"),
            0x702000: (PageState.DATA, True, "anon"),
            0x800000: (PageState.DATA, False, "/dev/zero (deleted)"),
            0x900000: (PageState.DATA, False, "/memfd:jit (deleted)"),
            0x901000: (PageState.DATA, True, "anon"),
        }
        assert {a: (pages[a].state, pages[a].anon, pages[a].label) for a in want} == want
        data = stored(r)
        assert data[0x901000] == page("after")
        assert data[0x700000 + 2 * PS] == page("heap2")
        assert r.mapped_files[1].offset == 3 * PS


def test_process_core_sparse_holes_are_hole_pages(tmp_path: Path) -> None:
    zero = bytes(PS)
    segs = [Seg(0x10000, page(0) + zero + zero + page(3) + zero), Seg(0x20000, zero + page(9))]
    path = tmp_path / "core"
    make_elf_core(path, segs, producer="process", nt_file=[], unaligned=False, sparse=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.lseek(fd, 0, os.SEEK_HOLE) >= os.fstat(fd).st_size:
            pytest.skip("this filesystem does not keep sparse-file holes")
    finally:
        os.close(fd)
    with open_dump(path) as r:
        assert states(r) == {PageState.DATA: 3, PageState.HOLE: 4}
        holes = [e for e in r.extents if e.state == PageState.HOLE]
        assert [(e.addr, e.npages, e.file_offset, e.anon) for e in holes] == [
            (0x11000, 2, -1, True),
            (0x14000, 1, -1, True),
            (0x20000, 1, -1, True),
        ]
        assert stored(r) == {0x10000: page(0), 0x13000: page(3), 0x21000: page(9)}


def test_guest_dump_holes_stay_data(tmp_path: Path) -> None:
    """On a guest dump a hole is a zero page the guest has; zero detection finds it."""
    path = tmp_path / "guest.elf"
    make_elf_core(path, [(0, page(0) + bytes(2 * PS))], unaligned=False, sparse=True)
    with open_dump(path) as r:
        assert states(r) == {PageState.DATA: 3}


# -- probe ------------------------------------------------------------------------------------


def test_probe(tmp_path: Path) -> None:
    make_elf_core(tmp_path / "le", [(0, page(0))])
    make_elf_core(tmp_path / "be", [(0, page(0))], endian=">", elfclass=32)
    assert ElfCoreReader.probe((tmp_path / "le").read_bytes()[:4096])
    assert ElfCoreReader.probe((tmp_path / "be").read_bytes()[:4096])
    # Any ELF magic: the reader, not detection, refuses an executable (test_not_a_core), so a
    # damaged e_type is an error rather than a file read as raw.
    exe = bytearray((tmp_path / "le").read_bytes()[:64])
    exe[16:18] = struct.pack("<H", 2)  # ET_EXEC
    assert ElfCoreReader.probe(bytes(exe))
    assert ElfCoreReader.probe(b"\x7fELF")
    assert not ElfCoreReader.probe(b"\x7fEL")
    assert not ElfCoreReader.probe(b"")
    assert not ElfCoreReader.probe(b"KDUMP   " + bytes(100))


# -- corrupt and unsupported files ------------------------------------------------------------


def _core(tmp_path: Path, **kw: object) -> tuple[Path, bytearray]:
    path = tmp_path / "core.elf"
    make_elf_core(path, [(0x0, page(0) + page(1)), (0x10000, page(2))], **kw)
    return path, bytearray(path.read_bytes())


def _open_broken(path: Path, data: bytes, error: type[Exception]) -> DumpFormatError:
    path.write_bytes(data)
    with pytest.raises(error) as info:
        ElfCoreReader(path)
    assert type(info.value) is error
    assert "\n" not in str(info.value)
    return info.value  # type: ignore[return-value]


def test_bad_magic(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    data[0:4] = b"\x7fELG"
    e = _open_broken(path, data, DumpFormatError)
    assert (e.offset, e.detail) == (0, "bad ELF magic 7f 45 4c 47 (expected 7f 45 4c 46)")


def test_bad_class(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    data[4] = 3
    e = _open_broken(path, data, DumpFormatError)
    assert e.offset == 4
    assert e.detail.startswith("bad ELF class (EI_CLASS) 0x3: expected 1 (ELFCLASS32)")


def test_bad_byte_order(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    data[5] = 0
    e = _open_broken(path, data, DumpFormatError)
    assert e.offset == 5
    assert e.detail.startswith("bad ELF byte order (EI_DATA) 0x0")


def test_not_a_core(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    data[16:18] = struct.pack("<H", 2)
    e = _open_broken(path, data, DumpFormatError)
    assert (e.offset, e.detail) == (16, "ELF e_type 0x2 is not ET_CORE (4): not a core dump")


@pytest.mark.parametrize("size", [10, 40])
def test_truncated_elf_header(tmp_path: Path, size: int) -> None:
    path, data = _core(tmp_path)
    e = _open_broken(path, data[:size], TruncatedDumpError)
    assert "runs past the end of the file" in e.detail
    assert e.detail.startswith("ELF identification" if size < 16 else "ELF64 header")


def test_program_header_table_past_eof(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    struct.pack_into("<Q", data, 0x20, len(data) - 60)  # e_phoff
    e = _open_broken(path, data, TruncatedDumpError)
    assert e.offset == len(data) - 60
    assert e.detail == (
        f"program header table (0x3 entries of 56 bytes) ends at {len(data) - 60 + 168:#x}, "
        f"past the end of the file ({len(data):#x})"
    )


def test_absurd_e_phnum(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    struct.pack_into("<H", data, 0x38, 0xFFF0)
    e = _open_broken(path, data, TruncatedDumpError)
    assert e.detail.startswith("program header table (0xfff0 entries of 56 bytes) ends at")


def test_absurd_pn_xnum_count(tmp_path: Path) -> None:
    path = tmp_path / "x.elf"
    layout = make_elf_core(path, [(0, page(0))], pn_xnum=True)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, layout.shoff + 44, 0xFFFFFFFF)  # sh_info of section 0
    e = _open_broken(path, data, DumpFormatError)
    assert e.detail == (
        "the ELF header claims 0xffffffff program headers, more than the 0x100000 any real "
        "dump has"
    )


def test_pn_xnum_without_section_headers(tmp_path: Path) -> None:
    path = tmp_path / "x.elf"
    make_elf_core(path, [(0, page(0))], pn_xnum=True)
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 0x28, 0)  # e_shoff
    e = _open_broken(path, data, DumpFormatError)
    assert e.detail == "section header 0 is needed but e_shoff is 0"


def test_pn_xnum_section_header_past_eof(tmp_path: Path) -> None:
    path = tmp_path / "x.elf"
    make_elf_core(path, [(0, page(0))], pn_xnum=True)
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, 0x28, len(data) - 10)
    e = _open_broken(path, data, TruncatedDumpError)
    assert e.detail.startswith("section header 0, 64 bytes, runs past the end of the file")


def test_wrong_e_phentsize(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    struct.pack_into("<H", data, 0x36, 32)
    e = _open_broken(path, data, DumpFormatError)
    assert (e.offset, e.detail) == (0x36, "e_phentsize 0x20 does not match ELF64 (0x38)")


def _phdr(phoff: int, i: int) -> int:
    """File offset of ELF64 program header ``i``."""
    return phoff + i * 56


def test_segment_past_eof(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    where = _phdr(64, 2)
    off = struct.unpack_from("<Q", data, where + 8)[0]
    del data[-100:]
    e = _open_broken(path, data, TruncatedDumpError)
    assert e.offset == where
    assert e.detail == (
        f"PT_LOAD[2] claims 0x1000 bytes at file offset {off:#x}, past the end of the file "
        f"({len(data):#x})"
    )


def test_absurd_p_filesz(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    struct.pack_into("<QQ", data, _phdr(64, 1) + 32, 1 << 62, 1 << 62)  # p_filesz, p_memsz
    e = _open_broken(path, data, TruncatedDumpError)
    assert e.detail.startswith("PT_LOAD[1] claims 0x4000000000000000 bytes at file offset")


def test_filesz_larger_than_memsz(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    struct.pack_into("<Q", data, _phdr(64, 1) + 40, PS)  # p_memsz
    e = _open_broken(path, data, DumpFormatError)
    assert e.detail == "PT_LOAD[1] p_filesz 0x2000 is larger than p_memsz 0x1000"


def test_segment_past_address_space(tmp_path: Path) -> None:
    path, data = _core(tmp_path, elfclass=32)
    struct.pack_into("<IIII", data, 52 + 2 * 32 + 12, 0xFFFFE000, PS, 3 * PS, 0)  # PT_LOAD[2]
    e = _open_broken(path, data, DumpFormatError)
    assert e.detail == (
        "PT_LOAD[2] of 0x3000 bytes at address 0xffffe000 runs past the end of the 32-bit "
        "address space"
    )


def test_overlapping_segments(tmp_path: Path) -> None:
    path = tmp_path / "overlap.elf"
    make_elf_core(path, [(0x0, page(0) + page(1)), (0x1000, page(2))])
    with pytest.raises(DumpFormatError) as info:
        ElfCoreReader(path)
    assert info.value.detail == (
        "overlapping ranges: PT_LOAD[2] at address 0x1000 overlaps PT_LOAD[1] [0x0, 0x2000)"
    )


def test_note_past_pt_note(tmp_path: Path) -> None:
    path, data = _core(tmp_path)
    note = struct.unpack_from("<Q", data, _phdr(64, 0) + 8)[0]
    struct.pack_into("<I", data, note + 4, 0x10000)  # n_descsz of the first note
    e = _open_broken(path, data, DumpFormatError)
    assert e.offset == note
    assert re.fullmatch(
        r"note with a 0x5-byte name and a 0x10000-byte descriptor runs past the end of "
        r"PT_NOTE\[0\] \(0x[0-9a-f]+\)",
        e.detail,
    )


def test_nt_file_count_too_big(tmp_path: Path) -> None:
    path = tmp_path / "core"
    make_elf_core(
        path, [(0x1000, page(0))], producer="process", nt_file=[(0x1000, 0x2000, 0, "/x")]
    )
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<QQ", 1, PS))
    struct.pack_into("<Q", data, at, 1000)
    e = _open_broken(path, data, DumpFormatError)
    assert e.detail.startswith("NT_FILE claims 0x3e8 mappings, more than its")


def test_no_pt_load(tmp_path: Path) -> None:
    path = tmp_path / "empty.elf"
    make_elf_core(path, [])
    e = _open_broken(path, path.read_bytes(), DumpFormatError)
    assert e.detail == "no PT_LOAD program headers: the core holds no memory"


def test_xen_dump_core_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "xen.core"
    make_xen_core(path)
    assert detect_format(path) is DumpFormat.ELF
    with pytest.raises(UnsupportedDumpError) as info:
        open_dump(path)
    assert info.value.detail == (
        "this is a Xen dump-core (xl dump-core; found section .note.Xen and no PT_LOAD), "
        "which ksm-analyze cannot read yet"
    )


# -- real process cores -----------------------------------------------------------------------

_CHILD = r"""
import ctypes, mmap, os, resource, sys
npages = 64
m = mmap.mmap(-1, npages * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
for i in range(0, npages, 2):  # odd pages are never touched
    m[i * 4096 : (i + 1) * 4096] = (b"ksm-analyze test page %d " % i).ljust(4096, b".")
print(hex(addr), flush=True)
if sys.argv[1] == "abort":
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
    os.abort()
sys.stdin.read()
"""
_NPAGES = 64


def _child_page(i: int) -> bytes:
    return (b"ksm-analyze test page %d " % i).ljust(PS, b".")


def _check_child_pages(r: ElfCoreReader, base: int) -> dict[str, int]:
    """The written pages are DATA at their virtual address; say what untouched pages became."""
    assert r.info()["producer"] == "process"
    assert r.address_space == "virtual"
    pages, data = page_map(r), stored(r)
    for i in range(0, _NPAGES, 2):
        ext = pages[base + i * PS]
        assert (ext.state, ext.anon, ext.label) == (PageState.DATA, True, "anon")
        assert data[base + i * PS] == _child_page(i)
    untouched: dict[str, int] = {}
    for i in range(1, _NPAGES, 2):
        ext = pages.get(base + i * PS)
        kind = "absent" if ext is None else ext.state.name
        if kind == "DATA":
            assert data[base + i * PS] == bytes(PS), "an untouched page must read as zero"
        untouched[kind] = untouched.get(kind, 0) + 1
    assert any(e.anon is False and e.label.startswith("/") for e in r.extents)
    return untouched


def _readelf_loads(path: Path) -> int | None:
    if shutil.which("readelf") is None:
        return None
    out = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True, check=True)
    return sum(line.split()[:1] == ["LOAD"] for line in out.stdout.splitlines())


def test_real_gcore(tmp_path: Path) -> None:
    if shutil.which("gcore") is None:
        pytest.skip("gcore (gdb) is not installed")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        base = int(child.stdout.readline(), 16)
        prefix = tmp_path / "gcore"
        run = subprocess.run(
            ["gcore", "-o", str(prefix), str(child.pid)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        child.communicate(b"", timeout=30)
    core = Path(f"{prefix}.{child.pid}")
    if not core.exists():
        pytest.skip(f"gcore could not dump the child (ptrace not allowed?): {run.stderr[-300:]}")
    with open_dump(core) as r:
        untouched = _check_child_pages(r, base)
        # gdb 13 reads the pages through /proc/PID/mem and writes the untouched ones as
        # zeros (DATA); newer gdb may leave holes. Either way they are never non-zero DATA.
        assert set(untouched) <= {"DATA", "HOLE", "absent"}
        assert r.info()["mapped_files"] > 0
        loads = _readelf_loads(core)
        if loads is not None:
            assert len(r.info()["segments"]) == loads


def test_real_kernel_core(tmp_path: Path) -> None:
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern != "core":
        pytest.skip(f"core_pattern is {pattern!r}; this test needs the plain 'core'")
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("the hard RLIMIT_CORE is 0")
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, "abort"], cwd=tmp_path, capture_output=True, check=False
    )
    base = int(run.stdout.split()[0], 16)
    cores = sorted(tmp_path.glob("core*"))  # "core", or "core.PID" with core_uses_pid
    if not cores:
        pytest.skip("the kernel wrote no core file")
    with open_dump(cores[0]) as r:
        untouched = _check_child_pages(r, base)
        fd = os.open(cores[0], os.O_RDONLY)
        sparse = os.lseek(fd, 0, os.SEEK_HOLE) < os.fstat(fd).st_size
        os.close(fd)
        # fs/coredump.c dump_skip(): never-touched anonymous pages are left as holes.
        assert untouched == ({"HOLE": _NPAGES // 2} if sparse else {"DATA": _NPAGES // 2})
        # The kernel dumps only the first page (the ELF header) of a file's text mapping.
        assert any(e.state == PageState.NOT_SAVED and e.anon is False for e in r.extents)
        loads = _readelf_loads(cores[0])
        if loads is not None:
            assert len(r.info()["segments"]) == loads


# -- real QEMU guest --------------------------------------------------------------------------


@pytest.mark.qemu
def test_real_qemu_dump_with_and_without_paging(tmp_path: Path) -> None:
    qemu_guest = pytest.importorskip("qemu_guest")
    if not qemu_guest.qemu_available():
        pytest.skip("qemu-system-x86_64 is not installed")
    try:
        assets = qemu_guest.ensure_guest_assets()
    except qemu_guest.GuestError as e:
        pytest.skip(f"no guest kernel: {e}")
    with qemu_guest.Guest(assets, mem_mib=128, cmdline_extra="ksmfill=7:2:2") as guest:
        guest.pause()
        plain = guest.dump_elf(tmp_path / "plain.elf")
        paging = guest._dump(tmp_path / "paging.elf", flags="-p")
    with open_dump(plain) as a, open_dump(paging) as b:
        assert a.info()["producer"] == b.info()["producer"] == "qemu"
        assert a.info()["vcpus"] == 1
        assert (a.info()["paging"], b.info()["paging"]) == (False, True)
        assert a.warnings == []
        pa, pb = stored(a), stored(b)
        ram = sum(e.npages for e in a.extents)
        assert ram * PS >= 128 << 20
        # Every page the -p dump describes is the same page of the plain dump, once.
        assert 0 < len(pb) <= len(pa)
        assert all(pa[addr] == data for addr, data in pb.items())
        assert any("repeat file bytes" in w for w in b.warnings)
        assert _readelf_loads(plain) in (None, len(a.info()["segments"]))
