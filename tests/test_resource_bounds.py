"""Hostile inputs under time and memory bounds (docs/formats.md, "Limits on hostile input").

Each class of blow-up (ranges a few bits apart, floods of records, headers or notes, claims of
2^60 bytes, decompression bombs, snapshots of very many processes or deep META) is opened in a
child process, pages decoded where a bomb waits in them, and must end with the stated result
within :func:`seconds_for` and :func:`memory_for` its file size. The child runs under
``RLIMIT_AS``, so a regression ends in MemoryError instead of eating the machine. Files that are
big but well-formed (half a million kdump runs, 70,000 program headers, 5,000 processes) must
still open within the same bounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT

from dumpwriter import hostile

MIB = 1 << 20


def seconds_for(size: int) -> float:
    """The time bound the docs state: 2 s plus 0.5 s per MiB of file."""
    return 2 + 0.5 * size / MIB


def memory_for(size: int) -> int:
    """The memory bound the docs state: 64 MiB plus 32 bytes per byte of file."""
    return 64 * MIB + 32 * size


_CHILD = r"""
import json, resource, sys, time
from ksm_analyze.errors import KsmAnalyzeError
from ksm_analyze.formats import open_inputs

path, limit, decode = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
base = kib("VmRSS:")
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + limit, resource.RLIM_INFINITY))
out = {}
start = time.perf_counter()
try:
    readers = open_inputs(path)
    out["readers"] = len(readers)
    out["ranges"] = sum(len(r.extents) for r in readers)
    for r in readers if decode else ():
        for _ in r.iter_batches():
            pass
except KsmAnalyzeError as e:
    out.update(error=type(e).__name__, message=str(e))
except MemoryError:
    out["error"] = "MemoryError"
out.update(seconds=time.perf_counter() - start, memory=kib("VmHWM:") - base)
print(json.dumps(out))
"""


def open_bounded(path: Path, *, decode: bool = False) -> dict[str, object]:
    """Open ``path`` (and decode every page) in a child; assert the bounds; return its report."""
    size = path.stat().st_size
    # Address space: the bound, the file's map, and room for numpy's temporaries to fail in.
    limit = 2 * memory_for(size) + size
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(limit), "1" if decode else "0"],
        capture_output=True, text=True, env=env, timeout=seconds_for(size) + 60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report: dict[str, object] = json.loads(run.stdout)
    assert report.get("error") != "MemoryError", report
    assert report["seconds"] <= seconds_for(size), (report, size)  # type: ignore[operator]
    assert report["memory"] <= memory_for(size), (report, size)  # type: ignore[operator]
    return report


def refused(report: dict[str, object], path: Path, error: str, *words: str) -> None:
    """The report is one ``error`` line naming the file, an offset and every one of ``words``."""
    message = str(report.get("message"))
    assert report.get("error") == error, report
    assert "\n" not in message
    assert message.startswith(f"{path} at offset 0x"), message
    for w in words:
        assert w in message, (w, message)


# -- kdump: runs of pages a few bits apart -----------------------------------------------------


@pytest.mark.parametrize(("nbytes", "pattern"), [(8 * MIB, 0x55), (2 * MIB, 0x33), (2 * MIB, 0x5A)])
def test_kdump_bitmap_of_alternating_runs(tmp_path, nbytes, pattern):
    # 0x55 is the 8 MB file that grew past 3.6 GB and two minutes: 16.7 million runs.
    path = tmp_path / "alternating.kdump"
    hostile.kdump_alternating(path, nbytes, pattern)
    report = open_bounded(path)
    refused(report, path, "DumpFormatError", "ranges of pages in the bitmaps",
            "65,536 plus one per 12 bytes")


def test_kdump_half_a_million_runs_still_open(tmp_path):
    # The cheapest runs a real kdump holds (zero pages between excluded ones): 524,288 of them.
    path = tmp_path / "fragmented.kdump"
    hostile.kdump_zero_runs(path, 1 << 19)
    report = open_bounded(path)
    assert report.get("error") is None and report["ranges"] == 1 << 19, report


@pytest.mark.parametrize("flattened", [False, True], ids=["plain", "flattened"])
def test_kdump_bitmap_larger_than_the_file(tmp_path, flattened):
    path = tmp_path / "bitmap.kdump"
    hostile.kdump_bitmap_past_eof(path, flattened=flattened)
    report = open_bounded(path)
    assert report["error"] == "TruncatedDumpError", report
    assert "bitmap 1 of 1073741823 blocks" in str(report["message"])


@pytest.mark.parametrize("codec", hostile.BOMB_CODECS)
def test_kdump_page_that_decompresses_to_megabytes(tmp_path, codec):
    path = tmp_path / f"bomb-{codec}.kdump"
    hostile.kdump_bomb(path, codec)
    report = open_bounded(path, decode=True)
    refused(report, path, "CorruptPageError", "page at PFN 0x1 fails to decompress", codec)


# -- flattened records -------------------------------------------------------------------------


def test_flattened_kdump_of_one_byte_records(tmp_path):
    path = tmp_path / "tiny.flat"
    hostile.flattened_tiny_records(path, 1 << 18)  # 4.5 MiB of 17-byte records
    assert open_bounded(path, decode=True)["readers"] == 1


def test_flattened_records_that_all_overlap(tmp_path):
    path = tmp_path / "overlap.flat"
    hostile.flattened_overlapping(path, 1 << 19)  # 11 MiB, a million overlapping bounds
    assert open_bounded(path, decode=True)["readers"] == 1


# -- LiME and AVML -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 100])
def test_lime_floods_of_ranges_smaller_than_a_page(tmp_path, size):
    # A record holding a page or more is never capped: the cap counts a record per 4 KiB.
    path = tmp_path / "tiny.lime"
    hostile.lime_tiny_ranges(path, 80_000, size)
    refused(open_bounded(path), path, "DumpFormatError", "LiME records",
            "65,536 plus one per 4096 bytes")


def test_avml_stream_of_one_byte_chunks(tmp_path):
    path = tmp_path / "tiny.avml"
    hostile.avml_tiny_chunks(path, 1 << 19)
    report = open_bounded(path, decode=True)
    refused(report, path, "CorruptPageError", "bad checksum")


def test_avml_chunk_that_decompresses_to_megabytes(tmp_path):
    path = tmp_path / "bomb.avml"
    hostile.avml_bomb(path)
    refused(open_bounded(path), path, "CorruptPageError", "holds 1048576 bytes", "64 KiB")


# -- ELF ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("nsegs", [70_000, 1 << 17])
def test_elf_floods_of_program_headers_still_open(tmp_path, nsegs):
    # PN_XNUM: more than 65,535 headers are legitimate (one per VMA of a process core), up
    # to the 2^20 cap of test_elfcore.test_absurd_pn_xnum_count; 56 bytes of file each.
    path = tmp_path / "segments.elf"
    hostile.elf_many_segments(path, nsegs)
    assert open_bounded(path)["ranges"] == nsegs


def test_elf_flood_of_notes(tmp_path):
    path = tmp_path / "notes.elf"
    hostile.elf_many_notes(path, 1 << 19)  # 6 MiB of empty notes
    refused(open_bounded(path), path, "DumpFormatError", "ELF notes",
            "65,536 plus one per 128 bytes")


def test_elf_nt_file_entries_that_overlap(tmp_path):
    path = tmp_path / "ntfile.elf"
    hostile.elf_nt_file_flood(path, 3000, 3000)  # took 35 s: every entry split every segment
    refused(open_bounded(path), path, "DumpFormatError", "NT_FILE maps /lib/x", "overlapping")


@pytest.mark.parametrize("memsz", [1 << 60, (1 << 56) + 4096, (1 << 64) - (1 << 20)])
def test_elf_segment_claiming_exabytes(tmp_path, memsz):
    path = tmp_path / "memsz.elf"
    hostile.elf_huge_memsz(path, memsz)
    refused(open_bounded(path), path, "DumpFormatError", "PT_LOAD[2]")


# -- snapshots ---------------------------------------------------------------------------------

PROCESS = {"pid": 1, "comm": "x", "cmdline": ["x"], "runs": [0, 2], "loads": [0, 1],
           "vmas": [{"start": 0x10000, "end": 0x12000, "perms": "rw-p", "offset": 0, "path": "",
                     "vmflags": "rd wr mg"}]}


def test_snapshot_of_5000_processes_opens_in_linear_time(tmp_path):
    # Each reader used to parse the whole file: 1,000 processes took 21 s and 1.4 GB.
    path = tmp_path / "many.snap"
    hostile.snapshot(path, [{**PROCESS, "pid": pid} for pid in range(5000)])
    assert open_bounded(path)["readers"] == 5000


@pytest.mark.parametrize(
    ("processes", "words"),
    [
        ([PROCESS] * 3000, ("process 1 repeats pid 1",)),
        ([{**PROCESS, "pid": pid} for pid in range(70_000)], ("70,000 processes", "65,536")),
    ],
    ids=["one-process-3000-times", "70000-processes"],
)
def test_snapshot_listing_too_many_processes(tmp_path, processes, words):
    path = tmp_path / "many.snap"
    hostile.snapshot(path, processes)
    refused(open_bounded(path), path, "DumpFormatError", "bad snapshot metadata", *words)


@pytest.mark.parametrize(
    "meta",
    [b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
     b'{"x": ' + b'{"a":' * 200_000 + b"0" + b"}" * 200_000 + b"}",
     b'{"x": [' + b"[]," * (3 * MIB) + b"[]]}"],
    ids=["deep-arrays", "deep-objects", "3-million-arrays"],
)
def test_snapshot_meta_deep_or_wide(tmp_path, meta):
    path = tmp_path / "meta.snap"
    hostile.snapshot(path, meta=meta)
    refused(open_bounded(path), path, "DumpFormatError", "bad snapshot metadata")


# -- the bounds are what the docs say ----------------------------------------------------------


def test_docs_state_these_bounds():
    text = (ROOT / "docs" / "formats.md").read_text()
    section = " ".join(text[text.index("## Limits on hostile input") :].split())
    for fact in ("2 s plus 0.5 s per MiB", "64 MiB plus 32 bytes per byte", "65,536 plus one",
                 "2^56", "2^20 program headers"):
        assert fact in section, fact


BUILDERS: list[Callable[..., None]] = [
    hostile.kdump_alternating, hostile.kdump_zero_runs, hostile.kdump_bitmap_past_eof,
    hostile.kdump_bomb, hostile.flattened_tiny_records, hostile.flattened_overlapping,
    hostile.lime_tiny_ranges, hostile.avml_tiny_chunks, hostile.avml_bomb,
    hostile.elf_many_segments, hostile.elf_many_notes, hostile.elf_nt_file_flood,
    hostile.elf_huge_memsz, hostile.snapshot,
]


def test_every_hostile_builder_is_tested():
    source = Path(__file__).read_text()
    assert sorted(hostile.__all__) == sorted(["BOMB_CODECS", *(b.__name__ for b in BUILDERS)])
    for b in BUILDERS:
        assert source.count(f"hostile.{b.__name__}(") >= 1, b.__name__
