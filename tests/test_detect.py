"""Format detection, open_dump, input errors, and the raw reader."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from conftest import PS

from dumpwriter.lime import make_avml, make_lime
from dumpwriter.raw import make_raw
from ksm_analyze.errors import (
    DumpFormatError,
    InputError,
    TruncatedDumpError,
    UnsupportedDumpError,
)
from ksm_analyze.formats import DumpFormat, base, detect_format, open_dump
from ksm_analyze.formats.raw import RawReader
from ksm_analyze.pages import PageState

REFUSED = [
    (0, b"HIBR", "a Windows hibernation file"),
]


def pages(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, n * PS, dtype=np.uint8).tobytes()


# -- detection ----------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "magic", "name"), REFUSED)
def test_refused_formats_are_named(tmp_path, offset, magic, name):
    data = bytearray(pages(2))  # a whole number of pages: would otherwise be read as raw
    data[:0x1004] = bytes(0x1004)
    data[offset : offset + len(magic)] = magic
    path = tmp_path / "dump"
    path.write_bytes(data)
    expected = (
        f"{path} at offset {offset:#x}: this is {name}, which ksm-analyze cannot read yet; "
        "take a memory-only dump instead (see README, Formats)"
    )
    with pytest.raises(UnsupportedDumpError) as e:
        detect_format(path)
    assert str(e.value) == expected
    assert e.value.offset == offset
    with pytest.raises(UnsupportedDumpError) as e:
        open_dump(path)
    assert str(e.value) == expected


def test_unknown_bytes_that_are_not_whole_pages(tmp_path):
    path = tmp_path / "dump"
    path.write_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08" + bytes(4992))
    with pytest.raises(DumpFormatError) as e:
        detect_format(path)
    assert type(e.value) is DumpFormatError
    assert str(e.value) == (
        f"{path} at offset 0x0: unknown format: no known magic (first bytes "
        "01 02 03 04 05 06 07 08) and the size, 4.88 KiB (5,000 bytes), is not a whole number of "
        "4096-byte pages; use --format raw to read it as a flat memory image anyway"
    )
    with pytest.raises(DumpFormatError, match="unknown format: no known magic"):
        open_dump(path)


def test_whole_pages_without_magic_are_raw(tmp_path):
    path = make_raw(tmp_path / "dump", pages(3))
    assert detect_format(path) is DumpFormat.RAW
    with open_dump(path) as r:
        assert isinstance(r, RawReader)
        assert r.format is DumpFormat.RAW
    # ...but not whole pages of the size asked for.
    with pytest.raises(DumpFormatError, match="not a whole number of 8192-byte pages"):
        detect_format(path, page_size=8192)


def test_lime_and_avml_are_detected(tmp_path):
    lime = make_lime(tmp_path / "m.lime", [(0x1000, pages(1))])
    avml = make_avml(tmp_path / "m.avml", [(0x1000, pages(1))])
    assert detect_format(lime) is DumpFormat.LIME
    assert detect_format(avml) is DumpFormat.AVML


def test_short_file_with_a_magic(tmp_path):
    path = tmp_path / "dump"
    path.write_bytes(b"EMiL\x01\x00\x00\x00")
    assert detect_format(path) is DumpFormat.LIME
    with pytest.raises(TruncatedDumpError, match="LiME record 0 header"):
        open_dump(path)


def test_explicit_format_skips_detection(tmp_path):
    path = make_raw(tmp_path / "dump", pages(2))
    with pytest.raises(DumpFormatError, match=r"at offset 0x0: bad LiME magic 0x"):
        open_dump(path, "lime")
    with open_dump(path, DumpFormat.RAW) as r:
        assert r.format is DumpFormat.RAW


def test_format_names():
    assert DumpFormat.parse("LiME") is DumpFormat.LIME
    assert DumpFormat.parse(DumpFormat.AVML) is DumpFormat.AVML
    with pytest.raises(ValueError) as e:
        DumpFormat.parse("vmss")
    assert str(e.value) == (
        "unknown format 'vmss'; choose one of: raw, snapshot, elf, kdump, lime, avml, migration, "
        "firecracker, firecracker_diff, cloud_hypervisor, openvmm, vmrs, vmware, windows")


@pytest.mark.parametrize("page_size", [0, 256, 1000, 4097])
def test_bad_page_size(tmp_path, page_size):
    path = make_raw(tmp_path / "dump", pages(1))
    with pytest.raises(ValueError) as e:
        open_dump(path, page_size=page_size)
    assert str(e.value) == f"page size must be a power of two of at least 512, not {page_size}"


# -- files that cannot be opened ------------------------------------------------------------


def assert_input_error(path, detail: str) -> None:
    for call in (detect_format, open_dump, RawReader):
        with pytest.raises(InputError) as e:
            call(path)
        assert str(e.value) == f"{path}: {detail}"
        assert (e.value.path, e.value.detail) == (os.fspath(path), detail)


def test_missing_file(tmp_path):
    assert_input_error(tmp_path / "nothing", "no such file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert_input_error(path, "empty file")


def test_directory(tmp_path):
    assert_input_error(tmp_path, "is a directory, not a dump file")


def test_not_a_regular_file():
    assert_input_error("/dev/null", "is not a regular file")


def test_other_open_errors(tmp_path):
    assert_input_error(tmp_path / ("x" * 300), "cannot open: File name too long")


def test_permission_denied(tmp_path, monkeypatch):
    # Tests usually run as root, where chmod 000 does not stop a read: make open() refuse.
    path = make_raw(tmp_path / "dump", pages(1))
    real_open = os.open

    def refuse(p, *args, **kwargs):
        if os.fspath(p) == os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(base.os, "open", refuse)
    assert_input_error(path, "permission denied")


# -- raw images ---------------------------------------------------------------------------


def test_raw_base_address(tmp_path):
    data = pages(3, 1)
    path = make_raw(tmp_path / "dump", [data[:PS], data[PS:]])
    with open_dump(path, "raw", base_address=0x100000) as r:
        assert r.extents == [r.extents[0]._replace(addr=0x100000, npages=3)]
        assert (r.extents[0].state, r.extents[0].file_offset) == (PageState.DATA, 0)
        (batch,) = list(r.iter_batches())
        assert batch.addrs.tolist() == [0x100000, 0x101000, 0x102000]
        assert batch.pages.tobytes() == data
        assert (
            r.read_pages(batch.addrs[::-1]).tobytes()
            == data[2 * PS :] + data[PS : 2 * PS] + data[:PS]
        )
        assert r.info() == {"base_address": 0x100000}
        assert r.warnings == []


def test_raw_trailing_partial_page(tmp_path):
    path = make_raw(tmp_path / "dump", pages(2) + b"\x01" * 100)
    with open_dump(path, "raw") as r:
        assert [(e.addr, e.npages) for e in r.extents] == [(0, 2)]
        assert r.warnings == [
            f"{path}: the last 100 bytes are not a whole 4096-byte page and are ignored"
        ]
        assert sum(len(b.addrs) for b in r.iter_batches()) == 2


def test_raw_large_pages(tmp_path):
    path = make_raw(tmp_path / "dump", pages(32))
    with open_dump(path, page_size=65536) as r:
        assert [(e.addr, e.npages) for e in r.extents] == [(0, 2)]
        (batch,) = list(r.iter_batches())
        assert batch.pages.shape == (2, 65536)
