"""Every kind of bad input, through the command line: one line naming file, offset and
problem, exit code 1, and never a traceback or an allocation the file cannot back."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from conftest import PS
from typer.testing import CliRunner

from dumpwriter.elf import make_elf_core
from dumpwriter.kdump import make_kdump
from dumpwriter.lime import lime_header, make_avml, make_lime
from ksm_analyze.cli import app

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


def qemu_migration_stream(p):
    with open(p, "wb") as f:
        f.write(b"QEVM\x00\x00\x00\x03" + bytes(PS - 8))
    return "QEMU migration stream"


CASES = [
    elf_truncated_header, elf_segment_past_eof, elf_overlapping_segments, elf_absurd_filesz,
    elf_absurd_phnum, kdump_truncated_header, kdump_corrupt_page, kdump_absurd_max_mapnr,
    kdump_flattened_cut, lime_truncated_record, lime_bad_magic_later, lime_overlap,
    lime_hostile_size, avml_corrupt, qemu_migration_stream,
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
