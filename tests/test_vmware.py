"""VMware .vmem + .vmss/.vmsn, and state files holding their memory.

The files are built by tests/dumpwriter/vmware.py from the published readers (crash-utility
``vmware_vmss.h``/``vmware_vmss.c: vmware_vmss_init``, volatility3 ``layers/vmware.py:
VmwareLayer._read_header``), not written by VMware. Expected addresses follow crash-utility's
``read_vmware_vmss`` arithmetic: guest page ``regionPPN[i] + k`` is ``.vmem`` page
``regionPageNum[i] + k``.
"""

from __future__ import annotations

import resource
import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from dumpwriter.vmware import make_state, memory_group, tag
from ksm_analyze.cli import app
from ksm_analyze.errors import DumpFormatError, TruncatedDumpError, UnsupportedDumpError
from ksm_analyze.formats import DumpFormat, detect_format, open_dump
from ksm_analyze.pages import PageState

P = 4096
runner = CliRunner()


def page(i: int) -> bytes:
    """Page ``i`` of a .vmem: its number in every 8-byte word, so any page is recognisable."""
    return struct.pack("<Q", 0x5EED0000 + i) * (P // 8)


VMEM = b"".join(page(i) for i in range(8))
# (ppn, page_num, pages): low RAM, a gap, then RAM above 4 GiB, as VMware splits at the PCI hole
REGIONS = [(0, 0, 3), (0x100000, 3, 5)]
EXPECTED = {0: 0, P: 1, 2 * P: 2, **{(0x100000 + k) * P: 3 + k for k in range(5)}}
"""Guest-physical address -> .vmem page, worked out by hand from REGIONS."""


def vm(tmp_path, suffix=".vmss", regions=REGIONS, vmem=VMEM, name="vm"):
    (tmp_path / f"{name}.vmem").write_bytes(vmem)
    return make_state(tmp_path / f"{name}{suffix}",
                      [("cpu", [tag("cpu:numVCPUs", 1)]), ("memory", memory_group(regions))])


def all_pages(reader) -> dict[int, bytes]:
    out = {}
    for b in reader.iter_batches(3):
        for a, row in zip(b.addrs.tolist(), b.pages, strict=True):
            out[a] = bytes(row)
    return out


@pytest.mark.parametrize("suffix", [".vmss", ".vmsn"])
@pytest.mark.parametrize("given", ["vmem", "state"])
def test_vmem_pages_at_their_guest_physical_addresses(tmp_path, suffix, given):
    state = vm(tmp_path, suffix)
    path = tmp_path / "vm.vmem" if given == "vmem" else state
    assert detect_format(path) is DumpFormat.VMWARE
    with open_dump(path) as r:
        assert r.path == str(tmp_path / "vm.vmem")  # the input is the file holding the pages
        assert r.state_path == str(state)
        assert all_pages(r) == {a: page(i) for a, i in EXPECTED.items()}
        addrs = np.array([0x100004 * P, P], np.uint64)
        assert [bytes(x) for x in r.read_pages(addrs)] == [page(7), page(1)]
        assert r.page_counts()[PageState.DATA] == 8
        info = r.info()
        assert info["regions_count"] == 2
        assert info["memory"] == "the .vmem beside the state file"


def test_vmem_without_its_state_file_reads_as_raw_and_says_so(tmp_path):
    (tmp_path / "lone.vmem").write_bytes(VMEM)
    assert detect_format(tmp_path / "lone.vmem") is DumpFormat.RAW
    out = runner.invoke(app, ["info", str(tmp_path / "lone.vmem")]).output
    assert ("vmware: no .vmss/.vmsn beside it: read as a flat image, guest-physical addresses "
            "unknown") in out
    with pytest.raises(DumpFormatError, match=r"neither a VMware state file nor a \.vmem with"):
        open_dump(tmp_path / "lone.vmem", "vmware")


def test_state_file_holding_its_memory(tmp_path):
    path = make_state(tmp_path / "s.vmsn", [("memory", memory_group(REGIONS, memory=VMEM))])
    with open_dump(path) as r:
        assert r.path == str(path)
        assert all_pages(r) == {a: page(i) for a, i in EXPECTED.items()}
        assert r.info()["memory"].startswith("Memory block at ")


def test_vmem_beside_a_state_file_holding_memory_is_not_read(tmp_path):
    path = make_state(tmp_path / "s.vmsn", [("memory", memory_group(REGIONS, memory=VMEM))])
    (tmp_path / "s.vmem").write_bytes(bytes(8 * P))
    with open_dump(tmp_path / "s.vmem") as r:
        assert r.path == str(path)
        assert all_pages(r)[P] == page(1)
        assert r.warnings == [(f"{tmp_path / 's.vmem'}: not read: {path} holds the guest's "
                               "memory itself (a Memory block), which is read instead")]


def test_flat_memory_without_a_region_table(tmp_path):
    path = make_state(tmp_path / "flat.vmss", [("memory", memory_group([], memory=VMEM))])
    with open_dump(path) as r:
        assert all_pages(r) == {i * P: page(i) for i in range(8)}


def test_larger_analysis_pages_keep_whole_ones(tmp_path):
    vm(tmp_path, regions=[(1, 0, 3), (0x100000, 3, 5)])  # region 0 starts mid 8 KiB page
    with open_dump(tmp_path / "vm.vmem", page_size=2 * P) as r:
        assert [(e.addr, e.npages) for e in r.extents] == [(2 * P, 1), (0x100000 * P, 2)]
        assert bytes(r.read_pages(np.array([2 * P], np.uint64))[0]) == page(1) + page(2)
        assert any("not whole 8192-byte pages" in w for w in r.warnings)


# -- giving both files ----------------------------------------------------------------------


@pytest.mark.parametrize("order", [("vm.vmss", "vm.vmem"), ("vm.vmem", "vm.vmss")])
def test_state_file_and_its_vmem_are_one_guest(tmp_path, order):
    vm(tmp_path)
    r = runner.invoke(app, ["scan", *(str(tmp_path / n) for n in order)])
    assert r.exit_code != 0
    first, second = (str(tmp_path / n) for n in order)
    assert (f"{first} and {second} are one guest (inputs 1 and 2: both read their pages from "
            f"{tmp_path / 'vm.vmem'})") in r.output


def test_two_vms_are_two_guests(tmp_path):
    vm(tmp_path, name="a")
    vm(tmp_path, name="b")
    r = runner.invoke(app, ["scan", str(tmp_path / "a.vmss"), str(tmp_path / "b.vmem")])
    assert r.exit_code == 0, r.output


# -- bad input ------------------------------------------------------------------------------


def test_state_file_without_memory_or_vmem(tmp_path):
    path = make_state(tmp_path / "alone.vmsn", [("memory", memory_group(REGIONS))])
    with pytest.raises(DumpFormatError, match=r"holds no memory \(no Memory block\) and there "
                                              r"is no \.vmem of the same name beside it"):
        open_dump(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "t.vmss"
    path.write_bytes(struct.pack("<I", 0xBED2BED2) + b"\0\0")
    with pytest.raises(TruncatedDumpError, match="VMware header, 12 bytes, runs past the end"):
        open_dump(path)


def test_group_table_past_the_end(tmp_path):
    path = tmp_path / "g.vmss"
    path.write_bytes(struct.pack("<III", 0xBED2BED2, 8, 0xFFFFFFFF) + bytes(100))
    with pytest.raises(TruncatedDumpError, match="the table of 4,294,967,295 groups"):
        open_dump(path)


def test_region_past_the_end_of_the_vmem(tmp_path):
    vm(tmp_path, vmem=VMEM[: 7 * P])
    with pytest.raises(TruncatedDumpError) as e:
        open_dump(tmp_path / "vm.vmem")
    assert "VMware region 1 (guest-physical [0x100000000, 0x100005000)) needs bytes " \
           "[0x3000, 0x8000)" in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "vm.vmss"))


def test_overlapping_regions(tmp_path):
    vm(tmp_path, regions=[(0, 0, 3), (2, 3, 5)])
    with pytest.raises(DumpFormatError, match="overlapping ranges: VMware region 1 at address "
                                              "0x2000 overlaps VMware region 0"):
        open_dump(tmp_path / "vm.vmem")


def test_regions_sharing_vmem_bytes(tmp_path):
    vm(tmp_path, regions=[(0, 0, 3), (0x100000, 2, 5)])
    with pytest.raises(DumpFormatError, match=r"stored bytes of VMware region 1 .* overlap"):
        open_dump(tmp_path / "vm.vmem")


def test_hostile_region_count_is_refused_at_once(tmp_path):
    tags = [tag("regionsCount", 0xFFFFFFFF), tag("regionPPN", 0, (0,))]
    make_state(tmp_path / "vm.vmss", [("memory", tags)])
    (tmp_path / "vm.vmem").write_bytes(VMEM)
    with pytest.raises(DumpFormatError, match="regionsCount is 4,294,967,295, but the file "
                                              "holds only 2 tags"):
        open_dump(tmp_path / "vm.vmem")


def test_missing_region_row(tmp_path):
    tags = [tag("regionsCount", 2), *memory_group([(0, 0, 3)])[2:]]
    make_state(tmp_path / "vm.vmss", [("memory", [*tags, tag("pad", 0), tag("pad2", 0)])])
    (tmp_path / "vm.vmem").write_bytes(VMEM)
    with pytest.raises(DumpFormatError,
                       match=r"regionsCount is 2 but the memory group has no regionPPN\[1\]"):
        open_dump(tmp_path / "vm.vmem")


def test_hostile_sizes_allocate_nothing(tmp_path):
    """A block and a region claiming 2^64 and 2^44 bytes: refused, memory bounded."""
    huge_block = tag("Memory", b"", (0, 0), block=True, memsize=1 << 63)
    big = struct.pack("<H", (6 << 8) | 63) + b"Memory" + struct.pack("<QQH", (1 << 64) - 1, 0, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    make_state(tmp_path / "a.vmss", [("memory", [big])])
    with pytest.raises(TruncatedDumpError, match="block 'Memory' of group 'memory'"):
        open_dump(tmp_path / "a.vmss")
    make_state(tmp_path / "b.vmss", [("memory", [huge_block])])
    with pytest.raises(DumpFormatError, match="says 8192 PiB in memory, and is not marked"):
        open_dump(tmp_path / "b.vmss")
    vm(tmp_path, regions=[(0, 0, 0xFFFFFFFF)], name="c")
    with pytest.raises(TruncatedDumpError, match="needs bytes"):
        open_dump(tmp_path / "c.vmem")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB


def test_compressed_memory_block_is_refused_naming_its_offset(tmp_path):
    path = make_state(tmp_path / "z.vmsn",
                      [("memory", [tag("Memory", b"x" * 100, (0, 0), compressed=True,
                                       memsize=8 * P)])])
    with pytest.raises(UnsupportedDumpError) as e:
        open_dump(path)
    assert "the Memory block at offset 0x" in str(e.value)
    assert "is compressed (100 bytes holding 32 KiB)" in str(e.value)
    assert e.value.offset == 12 + 80


def test_old_32_bit_state_file_is_refused_by_name(tmp_path):
    path = make_state(tmp_path / "old.vmss", [("memory", [])], magic=0xBED2BED0)
    with pytest.raises(UnsupportedDumpError, match="an old 32-bit VMware state file"):
        open_dump(path)


def test_tag_past_the_end(tmp_path):
    path = make_state(tmp_path / "t.vmss", [("memory", memory_group(REGIONS))])
    data = path.read_bytes()
    path.write_bytes(data[:-9])
    with pytest.raises(TruncatedDumpError, match="runs past the end of the file"):
        open_dump(path)


@pytest.mark.parametrize("case", ["truncated", "overlap", "compressed"])
def test_cli_errors_are_one_line(tmp_path, case):
    if case == "truncated":
        target = tmp_path / "t.vmss"
        target.write_bytes(struct.pack("<I", 0xBED2BED2))
    elif case == "overlap":
        vm(tmp_path, regions=[(0, 0, 3), (2, 3, 5)])
        target = tmp_path / "vm.vmem"
    else:
        target = make_state(tmp_path / "z.vmsn", [("memory", [tag(
            "Memory", b"x", (0, 0), compressed=True, memsize=P)])])
    r = runner.invoke(app, ["scan", str(target)])
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1
    assert r.output.startswith("Error: ")
