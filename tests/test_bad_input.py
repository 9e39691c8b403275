"""Every kind of bad input, through the command line: one line naming file, offset and
problem, exit code 1, and never a traceback, a hang, a wrong answer or an allocation the file
cannot back (the bounds themselves: test_resource_bounds.py)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from conftest import PS, ROOT
from typer.testing import CliRunner

from dumpwriter import hostile
from dumpwriter.elf import make_elf_core
from dumpwriter.kdump import make_kdump
from dumpwriter.lime import lime_header, make_avml, make_lime
from ksm_analyze.cli import app
from ksm_analyze.formats import open_dump

RNG = np.random.default_rng(11)
PAGES = [RNG.integers(0, 256, PS, dtype=np.uint8).tobytes() for _ in range(4)]


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def elf_truncated_header(p):
    make_elf_core(p, [(0, PAGES[0])])
    os.truncate(p, 30)
    return "ELF"


def elf_segment_past_eof(p):
    make_elf_core(p, [(0, b"".join(PAGES))])
    os.truncate(p, os.path.getsize(p) - PS)
    return "past the end of the file"


def elf_overlapping_segments(p):
    make_elf_core(p, [(0x1000, PAGES[0] + PAGES[1]), (0x2000, PAGES[2])])
    return "overlap"


def elf_absurd_filesz(p):
    lay = make_elf_core(p, [(0, PAGES[0])])
    # p_filesz and p_memsz of PT_LOAD (program header 1): offsets 32 and 40 in the entry.
    _patch(p, lay.phoff + lay.phentsize + 32, struct.pack("<QQ", 1 << 60, 1 << 60))
    return "past the end of the file"


def elf_absurd_phnum(p):
    make_elf_core(p, [(0, PAGES[0])])
    _patch(p, 56, struct.pack("<H", 0xFFF0))  # e_phnum
    return "program header"


def kdump_truncated_header(p):
    make_kdump(p, {0: PAGES[0]}, max_mapnr=8)
    os.truncate(p, 300)
    return "runs past the end of the file"


def kdump_corrupt_page(p):
    lay = make_kdump(p, {1: bytes(range(256)) * 16}, max_mapnr=8)
    offset, size, _ = lay.descriptors[1]
    _patch(p, offset, b"\xff" * size)
    return "fails to decompress"


def kdump_absurd_max_mapnr(p):
    make_kdump(p, {0: PAGES[0]}, max_mapnr=8)
    _patch(p, 4096 + 96, struct.pack("<Q", 1 << 50))  # sub header max_mapnr_64
    return "implausible"


def kdump_flattened_cut(p):
    make_kdump(p, {i: PAGES[i] for i in range(4)}, max_mapnr=8, flattened=True)
    os.truncate(p, os.path.getsize(p) - 100)
    return "past the end of the file"


def lime_truncated_record(p):
    make_lime(p, [(0, PAGES[0] + PAGES[1])])
    os.truncate(p, 32 + PS + 10)
    return "remain in the file"


def lime_bad_magic_later(p):
    make_lime(p, [(0, PAGES[0])])
    with open(p, "ab") as f:
        f.write(b"XXXX" + lime_header(0x10000, PS)[4:] + PAGES[1])
    return "magic"


def lime_overlap(p):
    make_lime(p, [(0, PAGES[0] + PAGES[1]), (0x1000, PAGES[2])])
    return "overlap"


def lime_hostile_size(p):
    with open(p, "wb") as f:
        f.write(lime_header(0, 1 << 50) + PAGES[0])
    return "remain in the file"


def avml_corrupt(p):
    make_avml(p, [(0, bytes(range(256)) * 64)])
    size = os.path.getsize(p)
    _patch(p, size // 2, b"\x00\xff" * 40)
    return "cannot decompress"


def elf_absurd_memsz(p):
    make_elf_core(p, [(0, PAGES[0]), (0x100000, b"", 1 << 60)])  # was shown as "1.02e+03 PiB"
    return "past 2^56 bytes"


def _whole_pages(p):
    os.truncate(p, -(-os.path.getsize(p) // PS) * PS)  # what raw detection takes


def elf_damaged_e_type(p):
    make_elf_core(p, [(0, PAGES[0])])
    _patch(p, 16, struct.pack("<H", 0x7F7F))
    _whole_pages(p)  # read as a raw image, with exit 0, before
    return "is not ET_CORE"


def elf_overlapping_nt_file(p):
    make_elf_core(p, [(0x10000, PAGES[0] + PAGES[1])], producer="process",
                  nt_file=[(0x10000, 0x12000, 0, "/a"), (0x11000, 0x13000, 0, "/b")])
    return "overlapping"


def kdump_shrunk_max_mapnr_64(p):
    make_kdump(p, {1: PAGES[0], 0x150: PAGES[1]}, max_mapnr=0x200)
    _patch(p, 4096 + 96, struct.pack("<Q", 0x100))  # read as a 1 MiB dump, exit 0, before
    return "bitmap 1 marks PFN 0x150, past max_mapnr 0x100"


def kdump_shrunk_max_mapnrs(p):
    make_kdump(p, {1: PAGES[0], 0x9: PAGES[1]}, max_mapnr=0x200)
    _patch(p, 440, struct.pack("<I", 5))  # both max_mapnr fields, inside a bitmap byte
    _patch(p, 4096 + 96, struct.pack("<Q", 5))
    return "marks PFN 0x9, past max_mapnr 0x5"


def _kdump_descriptor_at(p, offset):
    lay = make_kdump(p, {1: bytes(range(256)) * 16}, max_mapnr=8)
    # A raw page there: its bytes were read as the page, before.
    _patch(p, lay.desc_start, struct.pack("<qII", offset, PS, 0))
    return "before the page data"


def kdump_descriptor_into_header(p):
    return _kdump_descriptor_at(p, 0)


def kdump_descriptor_into_bitmap(p):
    return _kdump_descriptor_at(p, 2 * PS)


def kdump_descriptor_into_descriptors(p):
    return _kdump_descriptor_at(p, 4 * PS)


def kdump_flattened_version_2(p):
    make_kdump(p, {0: PAGES[0]}, max_mapnr=8, flattened=True)
    _patch(p, 24, struct.pack(">q", 2))
    _whole_pages(p)  # read as a raw image, with exit 0, before
    return "only type 1, version 1 is known"


def lime_above_2_56(p):
    # A full 16 MiB AVML chunk, then one on its grid at 2^60: the gap counted as 1 EiB of
    # zero pages, before.
    with open(p, "wb") as f:
        f.write(lime_header(0, 1 << 24))
        f.seek(1 << 24, os.SEEK_CUR)
        f.write(lime_header(1 << 60, PS) + PAGES[1])
    return "above 2^56"


def qemu_migration_stream(p):
    with open(p, "wb") as f:
        f.write(b"QEVM\x00\x00\x00\x03" + bytes(PS - 8))  # then an EOF section: no RAM
    return "the stream ends (EOF section at 0x8) before RAM is complete"


CASES = [
    elf_truncated_header, elf_segment_past_eof, elf_overlapping_segments, elf_absurd_filesz,
    elf_absurd_phnum, elf_absurd_memsz, elf_damaged_e_type, elf_overlapping_nt_file,
    kdump_truncated_header, kdump_corrupt_page, kdump_absurd_max_mapnr,
    kdump_shrunk_max_mapnr_64, kdump_shrunk_max_mapnrs, kdump_descriptor_into_header,
    kdump_descriptor_into_bitmap, kdump_descriptor_into_descriptors, kdump_flattened_cut,
    kdump_flattened_version_2, lime_truncated_record, lime_bad_magic_later, lime_overlap,
    lime_hostile_size, lime_above_2_56, avml_corrupt, qemu_migration_stream,
]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_line_and_exit_1(tmp_path, build):
    path = tmp_path / f"{build.__name__}.dump"
    expect = build(path)
    result = CliRunner().invoke(app, ["scan", str(path)])
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"Error: {path} at offset 0x"), line
    assert expect.lower() in line.lower(), line
    assert "Traceback" not in result.output


# -- snapshot metadata: valid JSON, hostile values --------------------------------------------

_PROCESS = {"pid": 1, "comm": "x", "cmdline": ["x"], "runs": [0, 2], "loads": [0, 1],
            "vmas": [{"start": 0x10000, "end": 0x12000, "perms": "rw-p", "offset": 0,
                      "path": "", "vmflags": "rd wr mg"}]}


def _vma(**changes):
    return {**_PROCESS, "vmas": [{**_PROCESS["vmas"][0], **changes}]}


META_CASES = {
    "infinity": (b'{"kernel": "6.1", "page_size": 1e999, "processes": []}', "out of range"),
    "nan": (b'{"page_size": NaN, "processes": []}', "NaN is not a JSON number"),
    "deep": (b'{"ksm": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "RecursionError"),
    "not-an-object": (b"[4096]", "META is list, not dict"),
    "page-size-0": (b'{"page_size": 0, "processes": []}', "power of two"),
    "kernel-number": (b'{"page_size": 4096, "kernel": 6.1, "processes": []}',
                      "kernel is float, not str"),
    "invalid-utf8": (b'{"page_size": 4096, "kernel": "\xff\xfe"}', "UnicodeDecodeError"),
    "processes-object": (b'{"page_size": 4096, "processes": {}}', "processes is dict, not list"),
    "pid-string": ([{**_PROCESS, "pid": "1"}], "process 0 pid is str, not int"),
    "pid-negative": ([{**_PROCESS, "pid": -1}], "pid -1 is not between 0 and 2^64 - 1"),
    "pid-bool": ([{**_PROCESS, "pid": True}], "pid is bool, not int"),
    "pid-huge": ([{**_PROCESS, "pid": 1 << 70}], "is not between 0 and 2^64 - 1"),
    "comm-number": ([{**_PROCESS, "comm": 5}], "comm is int, not str"),
    "cmdline-string": ([{**_PROCESS, "cmdline": "x"}], "cmdline is str, not list"),
    "runs-short": ([{**_PROCESS, "runs": [0]}], "runs is not [first, count]"),
    "loads-null": ([{**_PROCESS, "loads": None}], "loads is NoneType, not list"),
    "vma-number": ([{**_PROCESS, "vmas": [5]}], "vma is int, not dict"),
    "vmflags-number": ([_vma(vmflags=5)], "vmflags is int, not str"),
    "start-string": ([_vma(start="0x10000")], "start is str, not int"),
    "end-float": ([_vma(end=73728.0)], "end is float, not int"),
    "path-missing": ([{**_PROCESS, "vmas": [{"start": 0x10000, "end": 0x12000,
                                             "vmflags": ""}]}], "KeyError 'path'"),
}


@pytest.mark.parametrize("case", META_CASES)
def test_hostile_snapshot_metadata_is_one_line(tmp_path, case):
    meta, expect = META_CASES[case]
    path = tmp_path / f"{case}.snap"
    if isinstance(meta, bytes):
        hostile.snapshot(path, meta=meta)
    else:
        hostile.snapshot(path, meta)
    result = CliRunner().invoke(app, ["scan", str(path)])
    assert result.exit_code == 1, (result.output, result.exception)
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.output
    assert line.startswith(f"Error: {path} at offset 0x"), line
    assert "bad snapshot metadata" in line and expect in line, line


def test_text_no_output_can_encode_is_escaped(tmp_path):
    # Lone surrogates in META (JSON escapes) and invalid UTF-8 in NT_FILE: "'utf-8' codec
    # can't encode character" with no file named, before.
    snap = tmp_path / "s.snap"
    hostile.snapshot(snap, [{**_vma(path="/x\udcff"), "comm": "\ud800"}])
    core = tmp_path / "core"
    make_elf_core(core, [(0x10000, PAGES[0])], producer="process",
                  nt_file=[(0x10000, 0x11000, 0, "/lib/xQ")])
    data = core.read_bytes()
    core.write_bytes(data.replace(b"/lib/xQ", b"/lib/x\xff"))
    for path, label in ((snap, "/x\\udcff"), (core, "/lib/x\\xff")):
        result = CliRunner().invoke(app, ["info", str(path)])
        assert result.exit_code == 0, result.output
        assert label in result.output
        result.output.encode("utf-8")  # strict: every character can be written


# -- files that are not files -----------------------------------------------------------------


def _scan_in_child(path):
    """The command line in a child, so a regression that blocks fails instead of hanging."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ksm_analyze", "scan", str(path)],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


def test_fifo_device_and_socket_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # open() used to wait for a writer forever
    with tempfile.TemporaryDirectory() as short, socket.socket(socket.AF_UNIX) as sock:
        sock_path = os.path.join(short, "sock")  # AF_UNIX paths are at most 107 bytes
        sock.bind(sock_path)
        for path in (fifo, "/dev/zero", sock_path):
            run = _scan_in_child(path)
            assert run.returncode == 1, run
            assert run.stderr == f"Error: {path}: is not a regular file\n"


def test_base_address_past_2_64(tmp_path):
    path = tmp_path / "raw"
    path.write_bytes(PAGES[0] * 2)
    with pytest.raises(ValueError, match="outside the 64-bit address space"):
        open_dump(path, "raw", base_address=(1 << 64) - PS)
    with open_dump(path, "raw", base_address=(1 << 64) - 2 * PS) as r:
        assert r.extents[0].addr == (1 << 64) - 2 * PS
