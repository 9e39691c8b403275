"""microVM snapshots: Firecracker (full and diff), Cloud Hypervisor, OpenVMM.

No microVM runs here: every file is built from the published layouts by
``tests/dumpwriter/microvm.py`` (its docstring names the source files and structs):
Firecracker ``src/vmm/src/vstate/memory.rs`` (``dump``, ``dump_dirty``), Cloud Hypervisor
``vmm/src/memory_manager.rs`` (``MemoryManagerSnapshotData``, ``Transportable::send``) and
``vm-migration/src/protocol.rs`` (``MemoryRangeTable``), OpenVMM
``openvmm/openvmm_helpers/src/snapshot.rs`` (``SnapshotManifest``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import PS, runner

from dumpwriter.microvm import (
    ch_state,
    make_cloud_hypervisor,
    make_openvmm,
    make_sparse,
    manifest_bytes,
)
from ksm_analyze.cli import app
from ksm_analyze.errors import DumpFormatError, TruncatedDumpError, UnsupportedDumpError
from ksm_analyze.formats import DumpFormat, detect_format, open_dump
from ksm_analyze.formats.openvmm import _ManifestError, parse_manifest
from ksm_analyze.pages import PageState


def page(byte: int) -> bytes:
    return bytes([byte]) * PS


def stored(reader) -> dict[int, bytes]:
    """Address -> bytes of every page iteration yields, checked against read_pages."""
    out = {}
    for b in reader.iter_batches(3):
        for a, p in zip(b.addrs.tolist(), b.pages, strict=True):
            out[a] = p.tobytes()
    if out:
        again = reader.read_pages(np.array(list(out), dtype=np.uint64))
        assert [p.tobytes() for p in again] == list(out.values())
    return out


def states(reader) -> list[tuple[int, int, str]]:
    return [(e.addr, e.npages, e.state.name) for e in reader.extents]


# -- Firecracker ------------------------------------------------------------------------------


@pytest.fixture
def fc_file(tmp_path):
    """64 pages: pages 0-1, 10 and 63 written (dump_dirty of a diff: dirty pages at their
    place), holes elsewhere."""
    return make_sparse(tmp_path / "mem.snap", 64 * PS,
                       {0: page(1) + page(2), 10 * PS: page(3), 63 * PS: page(4)})


def test_firecracker_full_holes_are_pages_not_present(fc_file):
    with open_dump(fc_file, "firecracker", base_address=0x100000) as r:
        assert stored(r) == {0x100000: page(1), 0x101000: page(2), 0x10a000: page(3),
                             0x13f000: page(4)}
        assert states(r) == [(0x100000, 2, "DATA"), (0x102000, 8, "HOLE"),
                             (0x10a000, 1, "DATA"), (0x10b000, 52, "HOLE"),
                             (0x13f000, 1, "DATA")]
        assert r.info()["snapshot_type"] == "full"
        assert not r.warnings


def test_firecracker_diff_holes_are_excluded_never_counted(fc_file):
    """A diff's holes are pages unchanged since the base: content unknown, so EXCLUDED (not
    zero, not a hole): scan reports 60 excluded pages and counts 4 pages of content."""
    with open_dump(fc_file, "firecracker_diff") as r:
        assert r.page_counts()[PageState.EXCLUDED] == 60
        assert r.page_counts()[PageState.HOLE] == r.page_counts()[PageState.ZERO] == 0
        assert len(stored(r)) == 4
        assert "60 pages of this diff snapshot are holes" in r.warnings[0]
    result = runner.invoke(app, ["scan", "--format", "firecracker_diff", str(fc_file), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["per_input"][0]
    assert (row["excluded_pages"], row["zero_pages"], row["hole_pages"]) == (60, 0, 0)
    assert row["nonzero_pages"] == 4


def test_firecracker_without_format_is_raw(fc_file):
    """No magic: without --format a whole number of pages reads as raw (as before)."""
    assert detect_format(fc_file) == DumpFormat.RAW


def test_firecracker_dense_file_is_one_data_range(tmp_path):
    path = make_sparse(tmp_path / "mem", 8 * PS, {0: page(7) * 8})
    with open_dump(path, "firecracker") as r:
        assert states(r) == [(0, 8, "DATA")]


def test_a_page_partly_data_is_data(tmp_path):
    """With 8 KiB analysis pages, a page whose second 4 KiB is written is data (its hole half
    reads as zero), and the next page, all hole, is a hole."""
    path = make_sparse(tmp_path / "mem", 4 * PS, {PS: page(5)})
    with open_dump(path, "firecracker", page_size=2 * PS) as r:
        assert states(r) == [(0, 1, "DATA"), (2 * PS, 1, "HOLE")]
        assert stored(r) == {0: bytes(PS) + page(5)}


# -- Cloud Hypervisor -------------------------------------------------------------------------

CH_RANGES = [(0, 32 * PS), (1 << 32, 16 * PS)]


def test_cloud_hypervisor_ranges_at_their_gpa(tmp_path):
    """memory-ranges holds the table's ranges back to back: file offset 40 pages is page 8 of
    the second range, at 4 GiB + 8 pages. Holes are pages never written: HOLE."""
    path = make_cloud_hypervisor(tmp_path / "snap", CH_RANGES,
                                 {0: page(1), 31 * PS: page(2), 40 * PS: page(3)})
    assert detect_format(path) == DumpFormat.CLOUD_HYPERVISOR
    with open_dump(path) as r:
        assert stored(r) == {0: page(1), 31 * PS: page(2), (1 << 32) + 8 * PS: page(3)}
        assert states(r) == [(0, 1, "DATA"), (PS, 30, "HOLE"), (31 * PS, 1, "DATA"),
                             (1 << 32, 8, "HOLE"), ((1 << 32) + 8 * PS, 1, "DATA"),
                             ((1 << 32) + 9 * PS, 7, "HOLE")]
        info = r.info()
        assert info["ranges"] == [[0, 32 * PS], [1 << 32, 16 * PS]]
        assert info["boot_ram"] == 48 * PS


def test_memory_ranges_without_state_json_is_not_cloud_hypervisor(tmp_path):
    path = make_cloud_hypervisor(tmp_path / "snap", CH_RANGES, {0: page(1)})
    (tmp_path / "snap" / "state.json").unlink()
    assert detect_format(path) == DumpFormat.RAW
    with pytest.raises(DumpFormatError, match=r"cannot read .*state\.json"):
        open_dump(path, "cloud_hypervisor")


@pytest.mark.parametrize(("state", "message"), [
    (b"{not json", "not valid JSON"),
    (b'{"snapshots": {}}', "no memory-manager memory_ranges table"),
    (ch_state([(0, PS + 1)]), "not made of whole 4096-byte pages"),
    (ch_state([(0, 4 * PS)]).replace(b'\\"gpa\\": 0', b'\\"gpa\\": -4096'),
     "64-bit unsigned integers"),
    (ch_state([(0, 4 * PS)]).replace(b'\\"length\\": 16384', b'\\"length\\": 1e999'),
     "number 1e999 is out of range"),
    (ch_state([(0, 4 * PS)]).replace(b'\\"length\\": 16384', b'\\"length\\": 16384.0'),
     "64-bit unsigned integers"),
    (ch_state([(0, 8 * PS), (4 * PS, 8 * PS)]), "overlapping ranges"),
    (ch_state([((1 << 64) - PS, 8 * PS)]), "past the 64-bit address space"),
], ids=["not-json", "no-memory-manager", "unaligned", "negative", "1e999", "float",
        "overlap", "past-2^64"])
def test_cloud_hypervisor_bad_state(tmp_path, state, message):
    path = make_cloud_hypervisor(tmp_path / "snap", [(0, 16 * PS)], {0: page(1)}, state=state)
    with pytest.raises(DumpFormatError, match=message):
        open_dump(path)


def test_cloud_hypervisor_hostile_length_is_truncation(tmp_path):
    """A range of 2^63 bytes is checked against the file before anything is built."""
    path = make_cloud_hypervisor(tmp_path / "snap", [(0, 16 * PS)], {0: page(1)},
                                 state=ch_state([(0, 1 << 62), (1 << 62, 1 << 62)]))
    with pytest.raises(TruncatedDumpError, match="lists 8192 PiB of memory ranges"):
        open_dump(path)


def test_cloud_hypervisor_state_fifo_does_not_hang(tmp_path):
    path = make_cloud_hypervisor(tmp_path / "snap", [(0, 16 * PS)], {0: page(1)})
    (tmp_path / "snap" / "state.json").unlink()
    os.mkfifo(tmp_path / "snap" / "state.json")
    with pytest.raises(DumpFormatError, match="not a regular file"):
        open_dump(path, "cloud_hypervisor")


# -- OpenVMM ----------------------------------------------------------------------------------


def test_openvmm_memory_bin(tmp_path):
    path = make_openvmm(tmp_path / "snap", 16 * PS, {2 * PS: page(9), 15 * PS: page(8)})
    assert detect_format(path) == DumpFormat.OPENVMM
    with open_dump(path) as r:
        assert stored(r) == {2 * PS: page(9), 15 * PS: page(8)}
        assert states(r) == [(0, 2, "HOLE"), (2 * PS, 1, "DATA"), (3 * PS, 12, "HOLE"),
                             (15 * PS, 1, "DATA")]
        info = r.info()
        assert (info["memory_size_bytes"], info["vp_count"], info["page_size"],
                info["architecture"], info["openvmm_version"]) == (
                    16 * PS, 2, 4096, "x86_64", "0.1.0")


def test_parse_manifest_by_hand():
    """Field 4 = 0x10000 is the varint 80 80 04 (protobuf encoding spec, by hand)."""
    assert parse_manifest(bytes([0x08, 0x01, 0x20, 0x80, 0x80, 0x04])) == {
        "version": 1, "memory_size_bytes": 0x10000}
    for bad, message in [(b"\x08", "unterminated varint"), (b"\x08" + b"\xff" * 11, "varint"),
                         (b"\x1a\x05ab", "runs past the end"), (b"\x0b", "wire type 3"),
                         (b"\x08\x80\x80\x80\x80\x10", "does not fit 32 bits")]:
        with pytest.raises(_ManifestError, match=message):
            parse_manifest(bad)


@pytest.mark.parametrize(("manifest", "error", "message"), [
    (manifest_bytes(16 * PS, version=2), UnsupportedDumpError, "manifest version 2"),
    (manifest_bytes(1 << 63), TruncatedDumpError, "8192 PiB of guest RAM"),
    (manifest_bytes(16 * PS + 1), DumpFormatError, "not a whole number of 4096-byte pages"),
    (manifest_bytes(16 * PS)[:-3], DumpFormatError, "runs past the end"),
])
def test_openvmm_bad_manifest(tmp_path, manifest, error, message):
    path = make_openvmm(tmp_path / "snap", 16 * PS, {0: page(1)}, manifest=manifest)
    with pytest.raises(error, match=message):
        open_dump(path)


# -- the command line -------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path):
    ch = make_cloud_hypervisor(tmp_path / "ch", [(0, 16 * PS)], {0: page(1)},
                               state=ch_state([(0, 32 * PS)]))
    ovmm = make_openvmm(tmp_path / "ov", 16 * PS, {0: page(1)},
                        manifest=manifest_bytes(32 * PS))
    for path, fmt in ((ch, []), (ovmm, []), (tmp_path / "ch" / "config.json",
                                             ["--format", "openvmm"])):
        result = runner.invoke(app, ["scan", *fmt, str(path)])
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {path}"), result.stderr


def test_companion_size_is_capped_before_reading(tmp_path):
    """A state.json past 64 MiB is refused from its size (a sparse one: nothing is read)."""
    path = make_cloud_hypervisor(tmp_path / "snap", [(0, 16 * PS)], {0: page(1)})
    os.truncate(tmp_path / "snap" / "state.json", (64 << 20) + 1)
    with pytest.raises(DumpFormatError, match="is larger than 64 MiB"):
        open_dump(path)
