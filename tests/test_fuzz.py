"""Fuzzing every reader: hypothesis mutates small valid dumps of every format, structurally.

Each format has seeds (small valid dumps built here with ``tests/dumpwriter`` and
``SnapshotWriter``) and a table of their fields: headers, program headers, notes, kdump
descriptors, flattened records, LiME/AVML records and Snappy chunks, snapshot runs. A case
sets fields to values near the edges (0, -1, 2^31, 2^32, 2^63, 2^64 - 1, the file size...),
flips bytes of payloads, bitmaps and anywhere, and cuts, deletes, repeats or appends whole
structures; snapshots also get their META JSON rewritten (other JSON types, huge numbers,
``1e999``, deep nesting, invalid UTF-8, repeated processes).

Every case is run in a forked child (:func:`run_isolated`) that opens the dump with its
reader, lists extents, iterates every batch, re-reads sampled pages with ``read_pages`` and
runs ``analyze([path], jobs=1)``. The property:

* only :class:`ksm_analyze.KsmAnalyzeError` escapes (and the documented usage error for a
  snapshot of another valid page size); its message is one line that starts with the file's
  path; a DumpFormatError carries an offset and says ``at offset 0x...`` (a flattened kdump's
  structure no record wrote has none: its message names the reassembled dump's offset);
* what iteration yields agrees with the extents and with ``read_pages`` (nothing lost);
* the case ends within ``KSM_FUZZ_CASE_SECONDS`` (5 s): the parent kills the child after it;
* memory stays bounded: the child runs under ``RLIMIT_AS`` = its size at the fork + 256 MiB
  + 16 x the file size, so any blow-up ends in ``MemoryError`` (or a signal) and fails.

CI runs a fixed, derandomized profile (``KSM_FUZZ_EXAMPLES`` cases per format, default
200); ``KSM_FUZZ_EXAMPLES=5000 KSM_FUZZ_SEED=random`` runs longer, randomized campaigns,
printing the seed. A failing input is saved under ``KSM_FUZZ_FAILURES`` (default
``$TMPDIR/ksm-fuzz-failures``); copy it to ``fuzz/crashes/<format>-<what>.bin`` and it runs
first, as an ``@example``, until the reader is fixed. See docs/fuzzing.md.

Every format in ``ksm_analyze.formats.READERS`` must be in :data:`FUZZED` and have a
``fuzz/fuzz_<format>.py`` harness (``test_every_reader_is_fuzzed``).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PS, ROOT
from hypothesis import HealthCheck, example, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from dumpwriter.elf import Seg, make_elf_core
from dumpwriter.kdump import make_kdump
from dumpwriter.lime import make_avml, make_lime
from dumpwriter.microvm import ch_state, make_sparse, manifest_bytes
from dumpwriter.qevm import libvirt_header, mapped_ram
from dumpwriter.qevm import simple as qevm_stream
from dumpwriter.raw import make_raw
from dumpwriter.vmrs import END, explicit, fill, fills, lz77_periodic, make_vmrs, page_token
from dumpwriter.vmware import make_state, memory_group
from dumpwriter.windows import make_windows
from ksm_analyze import DumpFormatError, KsmAnalyzeError, PageState, analyze
from ksm_analyze.errors import UnsupportedDumpError
from ksm_analyze.formats import READERS, DumpFormat, open_dump, open_inputs
from ksm_analyze.formats.snapshot import NT_META, RUN, RunFlags, SnapshotWriter
from ksm_analyze.pages import check_page_size

# On a failure hypothesis's pytest plugin imports its patch writer, whose libcst (when installed)
# warns at import; with the project's filterwarnings=error that becomes an INTERNALERROR that
# hides the failure. Import it now, warnings off.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore")
    import hypothesis.extra._patching  # noqa: F401

EXAMPLES = int(os.environ.get("KSM_FUZZ_EXAMPLES", "200"))
"""Generated cases per format and property (the CI profile)."""
SEED = os.environ.get("KSM_FUZZ_SEED", "")
"""Empty: derandomized (CI). An integer, or ``random``: a randomized run with that seed."""
CASE_SECONDS = float(os.environ.get("KSM_FUZZ_CASE_SECONDS", "5"))
"""Wall time one case may take (open, iterate, read_pages and analyze)."""
MEM_BASE = 256 << 20
MEM_PER_FILE_BYTE = 16
"""Address space a case may add to the forked child: MEM_BASE + MEM_PER_FILE_BYTE x size."""
BATCH_PAGES = 3
"""Small batches, so that batch boundaries fall inside records, chunks and extents."""
SAMPLED_PAGES = 16
"""Pages per reader re-read with ``read_pages`` and compared with what iteration gave."""
FAILURES = Path(
    os.environ.get("KSM_FUZZ_FAILURES", os.path.join(tempfile.gettempdir(), "ksm-fuzz-failures"))
)
CRASHES = ROOT / "fuzz" / "crashes"
"""Reproducers ``<format>-<what>.bin``: each is an explicit example of its format's property."""
U64 = (1 << 64) - 1


def mem_bound(file_size: int) -> int:
    """Bytes of address space a case may add, derived from the file's size."""
    return MEM_BASE + MEM_PER_FILE_BYTE * file_size


# -- seeds and their structure ------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """An integer field of a seed: ``size`` bytes at ``offset`` in byte order ``endian``."""

    name: str
    offset: int
    size: int
    endian: str  # "little" or "big"

    def get(self, data: bytes | bytearray) -> int:
        return int.from_bytes(data[self.offset : self.offset + self.size], self.endian)

    def put(self, data: bytearray, value: int) -> None:
        if self.offset + self.size <= len(data):
            mask = (1 << (8 * self.size)) - 1
            data[self.offset : self.offset + self.size] = (value & mask).to_bytes(
                self.size, self.endian
            )


@dataclass
class Seed:
    """A small valid dump and where its structures are."""

    name: str
    fmt: DumpFormat
    data: bytes
    fields: list[Field] = field(default_factory=list)
    bounds: set[int] = field(default_factory=set)
    """Offsets where a structure starts or ends: truncation and splice points."""
    regions: list[tuple[str, int, int]] = field(default_factory=list)
    """(name, offset, length) of payloads worth flipping bytes in: bitmaps, pages, notes."""

    def add(self, prefix: str, base: int, layout: list[tuple[str, int, int]], endian: str) -> None:
        """Fields ``(name, offset within the structure, size)`` of a structure at ``base``."""
        order = "little" if endian in ("<", "little") else "big"
        for name, off, size in layout:
            self.fields.append(Field(f"{prefix}.{name}", base + off, size, order))
        if layout:
            last = max(off + size for _, off, size in layout)
            self.bounds |= {base, base + last}

    def finish(self) -> Seed:
        self.bounds = {b for b in self.bounds if 0 < b < len(self.data)} | {len(self.data)}
        return self


def _layout(spec: str) -> list[tuple[str, int, int]]:
    """``"name:fmt ..."`` (struct codes, no alignment) to ``(name, offset, size)``."""
    out, pos = [], 0
    for item in spec.split():
        name, code = item.split(":")
        size = struct.calcsize("<" + code)
        if not name.startswith("_"):
            out.append((name, pos, size))
        pos += size
    return out


EHDR = {
    64: _layout("e_type:H e_machine:H e_version:I e_entry:Q e_phoff:Q e_shoff:Q e_flags:I "
                "e_ehsize:H e_phentsize:H e_phnum:H e_shentsize:H e_shnum:H e_shstrndx:H"),
    32: _layout("e_type:H e_machine:H e_version:I e_entry:I e_phoff:I e_shoff:I e_flags:I "
                "e_ehsize:H e_phentsize:H e_phnum:H e_shentsize:H e_shnum:H e_shstrndx:H"),
}
PHDR = {
    64: _layout("p_type:I p_flags:I p_offset:Q p_vaddr:Q p_paddr:Q p_filesz:Q p_memsz:Q "
                "p_align:Q"),
    32: _layout("p_type:I p_offset:I p_vaddr:I p_paddr:I p_filesz:I p_memsz:I p_flags:I "
                "p_align:I"),
}
SHDR = {
    64: _layout("sh_name:I sh_type:I sh_flags:Q sh_addr:Q sh_offset:Q sh_size:Q sh_link:I "
                "sh_info:I sh_addralign:Q sh_entsize:Q"),
    32: _layout("sh_name:I sh_type:I sh_flags:I sh_addr:I sh_offset:I sh_size:I sh_link:I "
                "sh_info:I sh_addralign:I sh_entsize:I"),
}
NHDR = _layout("n_namesz:I n_descsz:I n_type:I")
RUN_ENTRY = _layout("vaddr:Q npages:I flags:I")
KDUMP_HEADER = {
    64: _layout("signature:8s header_version:i _uts:390s _pad:6s tv_sec:q tv_usec:q status:I "
                "block_size:i sub_hdr_size:i bitmap_blocks:I max_mapnr:I total_ram_blocks:I "
                "device_blocks:I written_blocks:I current_cpu:I nr_cpus:i"),
    32: _layout("signature:8s header_version:i _uts:390s _pad:2s tv_sec:i tv_usec:i status:I "
                "block_size:i sub_hdr_size:i bitmap_blocks:I max_mapnr:I total_ram_blocks:I "
                "device_blocks:I written_blocks:I current_cpu:I nr_cpus:i"),
}
KDUMP_SUB = {
    64: _layout("phys_base:Q dump_level:i split:i start_pfn:Q end_pfn:Q offset_vmcoreinfo:Q "
                "size_vmcoreinfo:Q offset_note:Q size_note:Q offset_eraseinfo:Q "
                "size_eraseinfo:Q start_pfn_64:Q end_pfn_64:Q max_mapnr_64:Q"),
    32: _layout("phys_base:I dump_level:i split:i start_pfn:I end_pfn:I offset_vmcoreinfo:Q "
                "size_vmcoreinfo:I offset_note:Q size_note:I offset_eraseinfo:Q "
                "size_eraseinfo:I start_pfn_64:Q end_pfn_64:Q max_mapnr_64:Q"),
}
KDUMP_DESC = _layout("offset:q size:I flags:I page_flags:Q")
LIME_HEADER = _layout("magic:I version:I s_addr:Q e_addr:Q reserved:Q")
FLAT_RECORD = _layout("offset:q size:q")

RNG = np.random.default_rng(9)


def _page(kind: str, n: int = 1) -> bytes:
    """Pages of a kind: random (incompressible), low (compressible), text, zero."""
    if kind == "random":
        return RNG.integers(0, 256, n * PS, dtype=np.uint8).tobytes()
    if kind == "low":
        return RNG.integers(0, 4, n * PS, dtype=np.uint8).tobytes()
    if kind == "text":
        return (b"ksm-analyze fuzz seed page. " * (n * PS // 28 + 1))[: n * PS]
    return bytes(n * PS)


A, B, C, LOW, LOW2, TEXT, ZERO = (_page(k) for k in
                                  ("random", "random", "random", "low", "low", "text", "zero"))


def elf_structure(seed: Seed) -> Seed:
    """Fields of an ELF core (also a snapshot): header, program and section header 0, notes,
    NT_FILE and snapshot RUNS entries; bounds at each; regions of note descriptors and data."""
    data = seed.data
    bits = 64 if data[4] == 2 else 32
    e = "<" if data[5] == 1 else ">"
    seed.fields += [Field("EI_CLASS", 4, 1, "little"), Field("EI_DATA", 5, 1, "little"),
                    Field("EI_VERSION", 6, 1, "little")]
    seed.add("ehdr", 16, EHDR[bits], e)
    hdr = {f.name.removeprefix("ehdr."): f.get(data) for f in seed.fields
           if f.name.startswith("ehdr.")}
    phoff, phnum, shoff = hdr["e_phoff"], hdr["e_phnum"], hdr["e_shoff"]
    if shoff:
        seed.add("shdr[0]", shoff, SHDR[bits], e)
        if phnum == 0xFFFF:
            phnum = next(f for f in seed.fields if f.name == "shdr[0].sh_info").get(data)
    word = 8 if bits == 64 else 4
    order = "little" if e == "<" else "big"
    for i in range(phnum):
        base = phoff + i * (56 if bits == 64 else 32)
        seed.add(f"phdr[{i}]", base, PHDR[bits], e)
        vals = {n: int.from_bytes(data[base + o : base + o + s], order) for n, o, s in PHDR[bits]}
        off, size = vals["p_offset"], vals["p_filesz"]
        if vals["p_type"] == 1 and size:  # PT_LOAD
            seed.bounds |= {off, off + size}
            seed.regions.append((f"PT_LOAD[{i}] data", off, size))
        if vals["p_type"] != 4:  # PT_NOTE
            continue
        pos, end, k = off, off + size, 0
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from(e + "III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz].split(b"\0")[0]
            desc = pos + 12 + (-(-namesz // 4) * 4)
            seed.add(f"note[{i}.{k}]", pos, NHDR, e)
            seed.bounds |= {desc, desc + descsz}
            seed.regions.append((f"note[{i}.{k}] {name.decode()} desc", desc, descsz))
            if name == b"CORE" and n_type == 0x46494C45:  # NT_FILE
                count = int.from_bytes(data[desc : desc + word], order)
                nt = [("count", 0, word), ("page_size", word, word)]
                nt += [(f"map[{j}].{w}", (2 + 3 * j + m) * word, word)
                       for j in range(count) for m, w in enumerate(("start", "end", "ofs"))]
                seed.add(f"NT_FILE[{i}.{k}]", desc, nt, e)
            if name == b"KSM-ANALYZE" and n_type == 0x4B534D03:  # NT_RUNS
                for j in range(min(descsz // RUN.itemsize, 8)):
                    seed.add(f"run[{j}]", desc + j * RUN.itemsize, RUN_ENTRY, e)
            pos = desc + (-(-descsz // 4) * 4)
            k += 1
    return seed.finish()


def _raw_seeds(tmp: Path) -> list[Seed]:
    make_raw(tmp / "raw", [A, LOW, ZERO, A, TEXT])
    seed = Seed("raw-5-pages", DumpFormat.RAW, (tmp / "raw").read_bytes())
    seed.bounds |= {PS * k for k in range(6)}
    seed.regions.append(("pages", 0, 5 * PS))
    return [seed.finish()]


def _elf_seeds(tmp: Path) -> list[Seed]:
    guest = [Seg(0, A + LOW), Seg(0x10000, TEXT, 3 * PS), Seg(0x20000, ZERO + A)]
    nt_file = [(0x400000, 0x401000, 0, "/usr/bin/cat"), (0x600000, 0x602000, 3, "/dev/zero"),
               (0x800000, 0x801000, 0, "/memfd:x (deleted)")]
    process = [Seg(0x400000, TEXT, 2 * PS), Seg(0x600000, A + LOW), Seg(0x800000, ZERO),
               Seg(0x900000, B)]
    kernel = [Seg(0x1000, LOW, vaddr=0xFFFFFFFF81000000), Seg(0, A + LOW + C),
              Seg(0x100000, B, 2 * PS)]
    kernel32 = [s._replace(vaddr=0xC1000000 if s.vaddr else None) for s in kernel]
    paging = [Seg(0, A + LOW + C, vaddr=0xFFFF888000000000),
              Seg(0x1000, vaddr=0xFFFFC90000000000, shares=(0, PS, PS)),
              Seg(0xFEE00000, b"", PS, vaddr=0xFFFFFFFFFF5FC000)]
    variants: list[tuple[str, list[Seg], dict[str, Any]]] = [
        ("elf64-le-qemu", guest, {"vcpus": 2}),
        ("elf64-be-qemu", guest, {"endian": ">"}),
        ("elf32-le-qemu", guest, {"elfclass": 32}),
        ("elf32-be-kernel", kernel32, {"elfclass": 32, "endian": ">", "producer": "kernel"}),
        ("elf64-le-kernel", kernel, {"producer": "kernel"}),
        ("elf64-le-process-ntfile", process,
         {"producer": "process", "nt_file": nt_file, "unaligned": False}),
        ("elf32-be-process-ntfile", process,
         {"producer": "process", "nt_file": nt_file, "elfclass": 32, "endian": ">"}),
        ("elf64-be-process-nonotes", process, {"producer": "none", "endian": ">"}),
        ("elf64-le-vbox", guest, {"producer": "vbox"}),
        ("elf64-le-qemu-pn-xnum", guest, {"pn_xnum": True}),
        ("elf32-be-qemu-pn-xnum", guest, {"pn_xnum": True, "elfclass": 32, "endian": ">"}),
        ("elf64-le-qemu-paging", paging, {}),
    ]
    out = []
    for name, segs, kw in variants:
        make_elf_core(tmp / name, segs, **kw)
        out.append(elf_structure(Seed(name, DumpFormat.ELF, (tmp / name).read_bytes())))
    return out


def _kdump_structure(seed: Seed, lay: Any, bits: int, endian: str, ndesc: int) -> Seed:
    """Fields of a plain kdump, at logical offsets (the flattened seeds map them to the file)."""
    bs = lay.block_size
    seed.add("header", 0, KDUMP_HEADER[bits], endian)
    seed.fields.append(Field("utsname.machine[0:4]", 12 + 4 * 65, 4, "little"))
    seed.add("sub_header", bs, KDUMP_SUB[bits], endian)
    for k in range(ndesc):
        seed.add(f"desc[{k}]", lay.desc_start + 24 * k, KDUMP_DESC, endian)
    bitmap_len = lay.bitmap2 - lay.bitmap1
    seed.regions += [("bitmap 1", lay.bitmap1, bitmap_len), ("bitmap 2", lay.bitmap2, bitmap_len)]
    seed.bounds |= {bs, 2 * bs, lay.bitmap1, lay.bitmap2, lay.desc_start, lay.data_start}
    for pfn, (off, size, _flags) in sorted(lay.descriptors.items()):
        seed.regions.append((f"page data of PFN {pfn}", off, size))
        seed.bounds |= {off, off + size}
    return seed


def _flattened_structure(seed: Seed, logical: Seed, records: list[tuple[int, bytes]]) -> Seed:
    """Record headers as fields; the logical fields moved to where the last record puts them."""
    seed.fields += [Field("flat.type", 16, 8, "big"), Field("flat.version", 24, 8, "big")]
    seed.bounds |= {16, 32, 4096}
    pos, placed = 4096, []
    for i, (at, buf) in enumerate(records):
        seed.add(f"record[{i}]", pos, FLAT_RECORD, ">")
        placed.append((at, at + len(buf), pos + 16))
        seed.bounds |= {pos + 16, pos + 16 + len(buf)}
        pos += 16 + len(buf)
    seed.add("end_marker", pos, FLAT_RECORD, ">")

    def where(lo: int, hi: int) -> int | None:
        for start, end, file_at in reversed(placed):  # later records win
            if start <= lo and hi <= end:
                return file_at + lo - start
            if start < hi and lo < end:
                return None  # split over records
        return None

    for f in logical.fields:
        if (at := where(f.offset, f.offset + f.size)) is not None:
            seed.fields.append(Field(f.name, at, f.size, f.endian))
    for name, off, size in logical.regions:
        if size and (at := where(off, off + size)) is not None:
            seed.regions.append((name, at, size))
    return seed


def _kdump_seeds(tmp: Path) -> list[Seed]:
    pages = {0: A, 1: LOW, 2: ZERO, 3: TEXT, 5: LOW, 7: LOW2}
    variants: list[tuple[str, dict[str, Any]]] = [
        ("kdump-zlib", {}),
        ("kdump-lzo", {"compression": "lzo"}),
        ("kdump-snappy", {"compression": "snappy"}),
        ("kdump-zstd", {"compression": "zstd"}),
        ("kdump-raw-pages", {"compression": "none"}),
        ("kdump-zlib-be-v5", {"endian": ">", "header_version": 5}),
        ("kdump-zlib-32bit", {"layout": 32}),
        ("kdump-zlib-no-zero-desc-level31", {"zero_page_descriptor": False, "dump_level": 31}),
        ("kdump-zlib-split", {"split": (2, 8)}),
        ("kdump-zlib-8k-blocks", {"block_size": 2 * PS}),
        ("kdump-flat-zlib", {"flattened": True}),
        ("kdump-flat-zstd", {"flattened": True, "compression": "zstd", "seed": 1}),
        ("kdump-flat-snappy", {"flattened": True, "compression": "snappy", "seed": 2}),
        ("kdump-flat-lzo-be", {"flattened": True, "compression": "lzo", "endian": ">"}),
    ]
    out = []
    for name, kw in variants:
        bs = kw.get("block_size", PS)
        mine = {pfn: (p * (bs // PS)) for pfn, p in pages.items()}
        lay = make_kdump(tmp / name, mine, max_mapnr=24, excluded_pfns=(4, 6, 9), **kw)
        data = (tmp / name).read_bytes()
        bits, endian = kw.get("layout", 64), kw.get("endian", "<")
        logical = _kdump_structure(Seed(name, DumpFormat.KDUMP, data), lay, bits, endian,
                                   len(lay.descriptors))
        if kw.get("flattened"):
            seed = _flattened_structure(Seed(name, DumpFormat.KDUMP, data), logical, lay.records)
        else:
            seed = logical
        out.append(seed.finish())
    # An old diskdump (header_version 0: no sub header), from a plain one.
    name = "kdump-diskdump-v0"
    lay = make_kdump(tmp / name, pages, max_mapnr=24, header_version=0)
    data = bytearray((tmp / name).read_bytes())
    data[:8] = b"DISKDUMP"
    seed = _kdump_structure(Seed(name, DumpFormat.KDUMP, bytes(data)), lay, 64, "<",
                            len(lay.descriptors))
    out.append(seed.finish())
    return out


def _lime_structure(seed: Seed) -> Seed:
    """Record headers of a LiME/AVML file; for AVML records, each Snappy chunk header, the
    varint preamble of compressed chunks, and the size trailer."""
    data, pos, i = seed.data, 0, 0
    while pos + 32 <= len(data):
        magic, _v, s_addr, e_addr, _r = struct.unpack_from("<IIQQQ", data, pos)
        seed.add(f"record[{i}]", pos, LIME_HEADER, "<")
        body, size = pos + 32, e_addr - s_addr + 1
        if magic != 0x4C4D5641:  # raw LiME bytes
            seed.regions.append((f"record[{i}] data", body, size))
            pos = body + size
        else:
            at, total, k = body, 0, 0
            while total < size:
                kind, length = data[at], int.from_bytes(data[at + 1 : at + 4], "little")
                seed.fields += [Field(f"record[{i}].chunk[{k}].type", at, 1, "little"),
                                Field(f"record[{i}].chunk[{k}].length", at + 1, 3, "little")]
                seed.bounds |= {at, at + 4, at + 4 + length}
                if kind in (0, 1):
                    seed.fields.append(Field(f"record[{i}].chunk[{k}].crc", at + 4, 4, "little"))
                    seed.regions.append((f"record[{i}].chunk[{k}] body", at + 8, length - 4))
                if kind == 0:
                    seed.fields.append(
                        Field(f"record[{i}].chunk[{k}].preamble", at + 8, 1, "little"))
                    total += _varint(data, at + 8)
                elif kind == 1:
                    total += length - 4
                at += 4 + length
                k += 1
            seed.fields.append(Field(f"record[{i}].trailer", at, 8, "little"))
            pos = at + 8
        seed.bounds.add(pos)
        i += 1
    return seed.finish()


def _varint(data: bytes, pos: int) -> int:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        pos, shift = pos + 1, shift + 7


def _lime_seeds(tmp: Path) -> list[Seed]:
    make_lime(tmp / "lime3", [(0, A + LOW), (0x100000, TEXT), (0x200800, C[: PS // 2] + B)])
    make_lime(tmp / "lime1", [(0x1000, A + ZERO + A)])
    return [_lime_structure(Seed(n, DumpFormat.LIME, (tmp / f).read_bytes()))
            for n, f in (("lime-3-records-partial", "lime3"), ("lime-1-record", "lime1"))]


def _avml_seeds(tmp: Path) -> list[Seed]:
    make_avml(tmp / "avml2", [(0, A + LOW + ZERO + LOW), (0x100000, TEXT)])
    many = b"".join(_page("low") for _ in range(20))  # more than 64 KiB: several chunks
    make_avml(tmp / "avml-chunks", [(0x10000, many)])
    make_avml(tmp / "avml-a", [(0, LOW + TEXT)])
    make_avml(tmp / "avml-b", [(0x100000, A + ZERO)], compress=False)
    mixed = (tmp / "avml-a").read_bytes() + (tmp / "avml-b").read_bytes()
    return [
        _lime_structure(Seed("avml-2-records", DumpFormat.AVML, (tmp / "avml2").read_bytes())),
        _lime_structure(Seed("avml-chunks", DumpFormat.AVML, (tmp / "avml-chunks").read_bytes())),
        _lime_structure(Seed("avml-with-lime-record", DumpFormat.AVML, mixed)),
    ]


SNAP_BASE = 0x7F0000000000


def _vma(start: int, npages: int, vmflags: str, path: str = "") -> dict[str, Any]:
    return {"start": start, "end": start + npages * PS, "perms": "rw-p", "offset": 0,
            "path": path, "vmflags": vmflags}


def _runs(*rows: tuple[int, int, int]) -> np.ndarray:
    return np.array([(a, n, int(f)) for a, n, f in rows], dtype=RUN)


def _snapshot_seeds(tmp: Path) -> list[Seed]:
    R = RunFlags
    stored = R.PRESENT | R.STORED
    path = tmp / "snap2"
    with SnapshotWriter(path, page_size=PS, meta={"kernel": "6.12.0", "pfn_flags": "kpageflags"}
                        ) as w:
        w.begin_process({"pid": 101, "comm": "one", "cmdline": ["one", "-x"], "start_time": 1,
                         "vmas": [_vma(SNAP_BASE, 6, "rd wr mr mw me ac mg"),
                                  _vma(SNAP_BASE + 0x100000, 2, "rd wr mr mw me ac", "/lib/x")]})
        w.write_pages(SNAP_BASE, A + LOW + ZERO)
        w.write_pages(SNAP_BASE + 0x100000, A + TEXT)
        w.add_runs(_runs((SNAP_BASE, 3, stored), (SNAP_BASE + 3 * PS, 1, R.PRESENT | R.ZERO_PFN),
                         (SNAP_BASE + 4 * PS, 1, R.SWAPPED), (SNAP_BASE + 5 * PS, 1, 0),
                         (SNAP_BASE + 0x100000, 2, stored | R.FILE)))
        w.begin_process({"pid": 202, "comm": "two", "cmdline": ["two"], "start_time": 2,
                         "vmas": [_vma(SNAP_BASE, 4, "rd wr mr mw me ac hg mg")],
                         "ksm_stat": {"ksm_rmap_items": 0}})
        w.write_pages(SNAP_BASE, A + B + ZERO)
        w.add_runs(_runs((SNAP_BASE, 1, stored), (SNAP_BASE + PS, 2, stored | R.THP),
                         (SNAP_BASE + 3 * PS, 1, R.PRESENT | R.UNREADABLE)))
        w.commit()
    return [elf_structure(Seed("snapshot-2-processes", DumpFormat.SNAPSHOT, path.read_bytes()))]


# -- microVM snapshots (issue 20) -----------------------------------------------------------


def _firecracker_seeds(tmp: Path) -> list[Seed]:
    seed = Seed("firecracker-5-pages", DumpFormat.FIRECRACKER, A + LOW + ZERO + A + TEXT)
    seed.bounds |= {PS * k for k in range(6)}
    seed.regions.append(("pages", 0, 5 * PS))
    return [seed.finish()]


def _firecracker_diff_seeds(tmp: Path) -> list[Seed]:
    (seed,) = _firecracker_seeds(tmp)
    return [Seed("firecracker_diff-5-pages", DumpFormat.FIRECRACKER_DIFF, seed.data,
                 bounds=seed.bounds, regions=seed.regions)]


MICROVM_PAGES = 48
"""The fixed memory file beside a fuzzed companion: 48 pages, pages 0, 31 and 40 written."""


def _microvm_memory(path: Path) -> None:
    make_sparse(path, MICROVM_PAGES * PS, {0: A, 31 * PS: TEXT, 40 * PS: LOW})


def _json_numbers(seed: Seed) -> Seed:
    """Flip the digits of a JSON seed's numbers (the table's gpa and length)."""
    for m in re.finditer(rb"\d+", seed.data):
        seed.regions.append(("number", m.start(), m.end() - m.start()))
        seed.bounds |= {m.start(), m.end()}
    return seed.finish()


def _cloud_hypervisor_seeds(tmp: Path) -> list[Seed]:
    """state.json beside a fixed memory-ranges (the fuzzed file is state.json)."""
    return [_json_numbers(Seed("ch-2-ranges", DumpFormat.CLOUD_HYPERVISOR,
                               ch_state([(0, 32 * PS), (1 << 32, 16 * PS)]))),
            _json_numbers(Seed("ch-1-range", DumpFormat.CLOUD_HYPERVISOR,
                               ch_state([(0x100000, MICROVM_PAGES * PS)])))]


def _openvmm_seeds(tmp: Path) -> list[Seed]:
    """manifest.bin beside a fixed memory.bin (the fuzzed file is manifest.bin)."""
    out = []
    for name, size in (("openvmm-all", MICROVM_PAGES * PS), ("openvmm-part", 16 * PS)):
        data = manifest_bytes(size)
        seed = Seed(name, DumpFormat.OPENVMM, data)
        seed.fields.append(Field("version", 1, 1, "little"))
        at = data.index(b"\x20") + 1  # field 4, varint: memory_size_bytes
        seed.fields.append(Field("memory_size_bytes", at, 3, "little"))
        seed.bounds |= {at, at + 3}
        seed.regions.append(("manifest", 0, len(data)))
        out.append(seed.finish())
    return out


def _migration_seeds(tmp: Path) -> list[Seed]:
    """QEMU migration streams (tests/dumpwriter/qevm.py): a plain one with data, zero and
    fill pages in two blocks, one behind a libvirt header, and a mapped-ram one."""
    blocks = [("pc.ram", 6 * PS), ("pc.bios", PS)]
    pages = {("pc.ram", 0): A, ("pc.ram", PS): 0, ("pc.ram", 2 * PS): TEXT[:PS],
             ("pc.ram", 3 * PS): 0x5A, ("pc.bios", 0): LOW}
    marks: list[tuple[str, int]] = []
    plain = qevm_stream(pages, blocks, marks=marks)
    head = libvirt_header(b"<domain><name>d</name></domain>", pad=64)
    mapped = mapped_ram([("pc.ram", 4 * PS, {1: A})])
    out = []
    for name, data, base in (("qevm-plain", plain, 0), ("qevm-libvirt", head + plain, len(head)),
                             ("qevm-mapped-ram", mapped, 0)):
        seed = Seed(name, DumpFormat.MIGRATION, data)
        if base:
            seed.add("libvirt", 0, [("version", 16, 4), ("data_len", 20, 4), ("format", 28, 4)],
                     "<")
        if name == "qevm-mapped-ram":
            i = data.index(b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x10\x00")
            seed.add("mapped_ram", i, [("version", 0, 4), ("page_size", 4, 8),
                                       ("bitmap_offset", 12, 8), ("pages_offset", 20, 8)], ">")
            seed.regions.append(("bitmap", i + 28, 8))
            seed.bounds |= {i, i + 28}
        else:
            for k, (what, at) in enumerate(marks):
                seed.bounds.add(base + at)
                size = 8 if what in ("record", "mem_size") else 1
                seed.fields.append(Field(f"{what}[{k}]", base + at, size, "big"))
                if what.startswith("section"):
                    seed.fields.append(Field(f"{what}[{k}].id", base + at + 1, 4, "big"))
        seed.regions.append(("stream", base, len(data) - base))
        out.append(seed.finish())
    return out


def _vmrs_structure(seed: Seed) -> Seed:
    """Headers, the object table and its entries, the key entries and the token streams."""
    data = seed.data
    header = _layout("signature:I checksum:I sequence:H version:I _a:8s block_size:I")
    for at in (0, 0x1000):
        seed.add(f"header@{at:#x}", at, header, "<")
    count = struct.unpack_from("<I", data, 0x2004)[0]
    seed.add("object_table", 0x2000, _layout("signature:I count:I"), "<")
    for i in range(count):
        at = 0x2008 + 18 * i
        seed.add(f"object{i}", at, _layout("type:B _c:I file_offset:Q size:I flags:B"), "<")
        kind, _, offset, size, _ = struct.unpack_from("<BIQIB", data, at)
        if kind == 2:
            seed.add("key_table", offset, _layout("signature:H index:H _u:H _c:I"), "<")
            cursor = offset + 10
            while cursor + 0x15 <= offset + size:
                entry = struct.unpack_from("<I", data, cursor + 2)[0]
                seed.add(f"key@{cursor:#x}", cursor, _layout(
                    "type:B flags:B size:I parent:I _x:6s order:I namelen:B"), "<")
                namelen = data[cursor + 0x14]
                payload = cursor + 0x15 + namelen
                if entry >= 0x15 + namelen + 4:
                    seed.fields.append(Field(f"stored_length@{payload:#x}", payload, 4, "little"))
                    seed.regions.append(("ram", payload + 4, entry - 0x15 - namelen - 4))
                cursor += entry
        elif kind == 3:
            seed.regions.append(("object", offset, size))
    return seed.finish()


def _vmrs_seeds(tmp: Path) -> list[Seed]:
    periodic = b"0123456789abcdef" * (PS // 16)
    tokens = (fill(0) + fills(0x1122334455667788, 2) + page_token(lz77_periodic(periodic, 16))
              + explicit(2 * PS, lz77_periodic(periodic * 2, 16)) + fills(0, 250) + END)
    make_vmrs(tmp / "vmrs-2", {0: (tokens, False), 2: (tokens, True)})
    small = fills(0, 255) + page_token(A) + END
    make_vmrs(tmp / "vmrs-1", {5: (small, False)}, header_at=0x1000)
    return [_vmrs_structure(Seed(n, DumpFormat.VMRS, (tmp / f).read_bytes()))
            for n, f in (("vmrs-2-blocks", "vmrs-2"), ("vmrs-raw-page", "vmrs-1"))]


@dataclass(frozen=True)
class Companion:
    """A format read from two files: the fuzzed bytes are the file ``name``, written beside a
    fixed memory file ``memory`` that ``build`` writes (sparse: it has holes)."""

    name: str
    memory: str
    build: Callable[[Path], None]




# -- issue 20: VMware and Windows (vmwin) ---------------------------------------------------------

VMW_GROUP = _layout("position:Q size:Q")


def _vmware_structure(seed: Seed) -> Seed:
    """Header, group table, and every tag of a VMware state file (tag word, indices, value or
    block sizes); the Memory block is a region worth flipping."""
    data = seed.data
    _magic, _version, ngroups = struct.unpack_from("<III", data)
    seed.add("header", 0, _layout("magic:I version:I groups:I"), "<")
    for g in range(ngroups):
        at = 12 + 80 * g
        seed.add(f"group[{g}]", at + 64, VMW_GROUP, "<")
        (pos,) = struct.unpack_from("<Q", data, at + 64)
        k = 0
        while True:
            (word,) = struct.unpack_from("<H", data, pos)
            seed.fields.append(Field(f"group[{g}].tag[{k}]", pos, 2, "little"))
            seed.bounds.add(pos)
            if word == 0:
                break
            namelen, nindex, valsize = word >> 8, (word >> 6) & 3, word & 0x3F
            at = pos + 2 + namelen
            for i in range(nindex):
                seed.fields.append(Field(f"group[{g}].tag[{k}].index[{i}]", at + 4 * i, 4,
                                         "little"))
            at += 4 * nindex
            if valsize >= 62:
                seed.add(f"group[{g}].tag[{k}].block", at, _layout("nbytes:Q inmem:Q pad:H"),
                         "<")
                nbytes, _inmem, pad = struct.unpack_from("<QQH", data, at)
                body = at + 18 + pad
                seed.regions.append((f"group[{g}].tag[{k}] block", body, nbytes))
                pos = body + nbytes
            else:
                seed.fields.append(Field(f"group[{g}].tag[{k}].value", at, valsize, "little"))
                pos = at + valsize
            k += 1
    return seed.finish()


def _vmware_seeds(tmp: Path) -> list[Seed]:
    """State files holding their memory (a Memory block): the harness reads one file, so the
    .vmem beside a .vmss is tested in tests/test_vmware.py instead."""
    memory = A + LOW + ZERO + TEXT + B + A
    make_state(tmp / "flat.vmss", [("cpu", []), ("memory", memory_group([], memory=memory))])
    make_state(tmp / "regions.vmsn",
               [("memory", memory_group([(0, 0, 2), (0x100000, 2, 3), (0x20, 5, 1)],
                                        memory=memory)), ("Snapshot", [])])
    return [_vmware_structure(Seed(n, DumpFormat.VMWARE, (tmp / f).read_bytes()))
            for n, f in (("vmware-flat-memory-block", "flat.vmss"),
                         ("vmware-3-regions", "regions.vmsn"))]


WIN_HEADER = {
    64: [("machine", 0x30, 4), ("processors", 0x34, 4), ("bugcheck", 0x38, 4),
         ("runs", 0x88, 4), ("pages", 0x90, 8), ("dump_type", 0xF98, 4)],
    32: [("machine", 0x20, 4), ("processors", 0x24, 4), ("bugcheck", 0x28, 4),
         ("runs", 0x64, 4), ("pages", 0x68, 4), ("dump_type", 0xF88, 4)],
}
WIN_SUMMARY = _layout("signature:I valid:I options:I _r:20s header_size:Q pages:Q bitmap_size:Q")


def _windows_structure(seed: Seed, bits: int, nruns: int, bitmap: bool) -> Seed:
    """Header fields, the runs, and for a bitmap dump the _SUMMARY_DUMP and its bitmap."""
    seed.add("header", 0, WIN_HEADER[bits], "<")
    block, size = (0x88 + 0x10, 8) if bits == 64 else (0x64 + 8, 4)
    for i in range(nruns):
        seed.add(f"run[{i}]", block + 2 * size * i, [("base", 0, size), ("count", size, size)],
                 "<")
    head = 0x2000 if bits == 64 else 0x1000
    first = head
    if bitmap:
        seed.add("summary", head, WIN_SUMMARY, "<")
        first, _pages, nbits = struct.unpack_from("<QQQ", seed.data, head + 0x20)
        seed.regions.append(("bitmap", head + 0x38, (nbits + 7) // 8))
    seed.bounds |= {head, first}
    seed.regions.append(("pages", first, len(seed.data) - first))
    return seed.finish()


def _windows_seeds(tmp: Path) -> list[Seed]:
    out = []
    for bits in (64, 32):
        make_windows(tmp / f"full{bits}", [(0, 2), (0x10, 3)], A + LOW + ZERO + TEXT + B,
                     bits=bits)
        out.append(_windows_structure(Seed(f"windows-full-{bits}", DumpFormat.WINDOWS,
                                           (tmp / f"full{bits}").read_bytes()), bits, 2, False))
        make_windows(tmp / f"bitmap{bits}", [(0, 40), (64, 8)], A + LOW + ZERO + TEXT,
                     bits=bits, dump_type=5, bitmap=[1, 2, 33, 65], bitmap_pages=72)
        out.append(_windows_structure(Seed(f"windows-bitmap-{bits}", DumpFormat.WINDOWS,
                                           (tmp / f"bitmap{bits}").read_bytes()), bits, 2, True))
    return out




@dataclass(frozen=True)
class Fuzzed:
    """How one format is fuzzed: its seeds (built into a directory) and its harness."""

    seeds: Callable[[Path], list[Seed]]
    harness: str
    companion: Companion | None = None


FUZZED: dict[DumpFormat, Fuzzed] = {
    DumpFormat.RAW: Fuzzed(_raw_seeds, "fuzz/fuzz_raw.py"),
    DumpFormat.ELF: Fuzzed(_elf_seeds, "fuzz/fuzz_elf.py"),
    DumpFormat.KDUMP: Fuzzed(_kdump_seeds, "fuzz/fuzz_kdump.py"),
    DumpFormat.LIME: Fuzzed(_lime_seeds, "fuzz/fuzz_lime.py"),
    DumpFormat.AVML: Fuzzed(_avml_seeds, "fuzz/fuzz_avml.py"),
    DumpFormat.SNAPSHOT: Fuzzed(_snapshot_seeds, "fuzz/fuzz_snapshot.py"),
    # microVM snapshots (issue 20)
    DumpFormat.FIRECRACKER: Fuzzed(_firecracker_seeds, "fuzz/fuzz_firecracker.py"),
    DumpFormat.FIRECRACKER_DIFF: Fuzzed(_firecracker_diff_seeds,
                                        "fuzz/fuzz_firecracker_diff.py"),
    DumpFormat.CLOUD_HYPERVISOR: Fuzzed(
        _cloud_hypervisor_seeds, "fuzz/fuzz_cloud_hypervisor.py",
        Companion("state.json", "memory-ranges", _microvm_memory)),
    DumpFormat.OPENVMM: Fuzzed(_openvmm_seeds, "fuzz/fuzz_openvmm.py",
                               Companion("manifest.bin", "memory.bin", _microvm_memory)),
    DumpFormat.VMRS: Fuzzed(_vmrs_seeds, "fuzz/fuzz_vmrs.py"),
    # issue 20 (vmwin)
    DumpFormat.VMWARE: Fuzzed(_vmware_seeds, "fuzz/fuzz_vmware.py"),
    DumpFormat.WINDOWS: Fuzzed(_windows_seeds, "fuzz/fuzz_windows.py"),


    DumpFormat.MIGRATION: Fuzzed(_migration_seeds, "fuzz/fuzz_migration.py"),
}
"""Every reader, fuzzed: a format added to READERS must be added here and get a harness."""

_WORK = Path(tempfile.mkdtemp(prefix="ksm-fuzz-"))
atexit.register(shutil.rmtree, _WORK, True)


def case_file(fmt: DumpFormat, data: bytes, name: str, where: Path | None = None) -> Path:
    """Write a case's bytes where ``fmt``'s reader finds them and return the path to open:
    the file itself, or for a two-file format the memory file, with the bytes as its
    companion beside it (in a directory ``name``)."""
    where = where or _WORK
    companion = FUZZED[fmt].companion
    if companion is None:
        path = where / name
        path.write_bytes(data)
        return path
    directory = where / name
    directory.mkdir(parents=True, exist_ok=True)
    memory = directory / companion.memory
    if not memory.exists():
        companion.build(memory)
    (directory / companion.name).write_bytes(data)
    return memory


def wrapped_seeds(where: Path | None = None) -> list[tuple[str, bytes]]:
    """Compressed-wrapper seeds (``fuzz/fuzz_wrapped.py``): the raw, ELF, LiME and Windows
    seeds gzip'ed and zstd'ed (zstd without a checksum, so byte mutations inside reach the
    inner headers as often as the codec's own structure); a bare QEMU stream gzip'ed, and a
    libvirt save image of the gzip format (its header raw, the stream compressed after it)."""
    import gzip

    import zstandard

    out = []
    for fmt in (DumpFormat.RAW, DumpFormat.ELF, DumpFormat.LIME, DumpFormat.WINDOWS):
        for seed in build_seeds(fmt, where)[:2]:
            out.append((f"{seed.name}.gz", gzip.compress(seed.data, mtime=0)))
            out.append((f"{seed.name}.zst", zstandard.ZstdCompressor(level=1).compress(seed.data)))
    plain = next(s for s in build_seeds(DumpFormat.MIGRATION, where) if s.name == "qevm-plain")
    out.append(("qevm-plain.gz", gzip.compress(plain.data, mtime=0)))
    head = libvirt_header(b"<domain><name>d</name></domain>", fmt=1, pad=64)
    out.append(("qevm-libvirt-gzip", head + gzip.compress(plain.data, mtime=0)))
    return out


def test_every_reader_reads_a_wrapped_seed_or_refuses_in_one_line(tmp_path: Path) -> None:
    """Each reader in READERS, given a gzip of its first seed (and the format by name, so
    detection is not what is tested): one that declares it reads a decompressed source
    (``unwrapped_only`` None) gives the pages and counts of the plain seed; any other is
    refused with one line that names the reason and the command to decompress it."""
    import gzip

    for fmt, cls in READERS.items():
        seed = build_seeds(fmt, tmp_path / "seeds")[0]
        plain = case_file(fmt, seed.data, f"{seed.name}.plain", tmp_path)
        wrapped = tmp_path / f"{seed.name}.gz"
        wrapped.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
        if cls.unwrapped_only is None:
            got = []
            for path in (plain, wrapped):
                with open_dump(path, fmt) as r:
                    pages = {a: bytes(p) for b in r.iter_batches(2)
                             for a, p in zip(b.addrs.tolist(), b.pages, strict=True)}
                    got.append((r.page_counts(), pages, r.source is not None))
            assert got[0][:2] == got[1][:2] and got[0][1], fmt
            assert (got[0][2], got[1][2]) == (False, True), fmt
            continue
        with pytest.raises(UnsupportedDumpError) as e:
            open_dump(wrapped, fmt)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(wrapped)), msg
        assert f"({cls.unwrapped_only}); decompress it first: gzip -dc" in msg, msg
    # the readers that say so: the formats stored raw, and the two made to read a source
    assert {f for f, c in READERS.items() if c.unwrapped_only is None} == {
        DumpFormat.RAW, DumpFormat.ELF, DumpFormat.LIME, DumpFormat.MIGRATION,
        DumpFormat.WINDOWS}


def build_seeds(fmt: DumpFormat, directory: Path | None = None) -> list[Seed]:
    """The seeds of ``fmt``, written under ``directory`` (a scratch directory by default)."""
    where = (directory or _WORK / "seeds") / fmt.value
    where.mkdir(parents=True, exist_ok=True)
    return FUZZED[fmt].seeds(where)


SEEDS = {fmt: build_seeds(fmt) for fmt in FUZZED}


# -- mutations ----------------------------------------------------------------------------------


class Case:
    """A mutated dump: what was done (for the report) and the bytes."""

    def __init__(self, label: str, data: bytes) -> None:
        self.label, self.data = label, data

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.data).hexdigest()[:12]
        return f"Case({self.label!r}, {len(self.data)} bytes, sha256 {digest}...)"


def _edges(f: Field, orig: int, size: int) -> list[int]:
    """Values near the edges for a field: powers of two, signed/unsigned limits, the file
    size, page multiples, and small moves of the original value."""
    top = (1 << (8 * f.size)) - 1
    near = {0, 1, 2, 3, 4, 7, 8, 0x10, 0x20, 0x40, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0xFFFF,
            0x10000, PS - 1, PS, PS + 1, 2 * PS, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
            1 << 32, 1 << 40, 1 << 60, (1 << 63) - 1, 1 << 63, U64, U64 - PS + 1,
            size, size - 1, size + 1, size - 32, orig + 1, orig - 1, orig * 2, orig // 2,
            orig + PS, orig - PS, orig + size, orig | (1 << 63), -orig, top, top - 1,
            1 << (8 * f.size - 1), (1 << (8 * f.size - 1)) - 1}
    return sorted({v & top for v in near})


POINT_KINDS = ("field", "field", "field", "field", "flip-region", "flip-any")
SHAPE_KINDS = ("none", "none", "truncate", "truncate", "delete", "duplicate", "append")


@st.composite
def mutated(draw: st.DrawFn, seeds: list[Seed]) -> Case:
    """A seed with up to 4 point mutations (fields, byte flips) and at most one change of
    shape (truncate, delete, repeat, append); at least one of either."""
    seed = draw(st.sampled_from(seeds), label="seed")
    buf = bytearray(seed.data)
    size = len(buf)
    steps: list[str] = []
    for _ in range(draw(st.integers(0, 4), label="point mutations")):
        kind = draw(st.sampled_from(POINT_KINDS))
        if kind == "field" and seed.fields:
            f = draw(st.sampled_from(seed.fields))
            top = (1 << (8 * f.size)) - 1
            value = draw(st.one_of(st.sampled_from(_edges(f, f.get(buf), size)),
                                   st.integers(0, top)))
            f.put(buf, value)
            steps.append(f"{f.name}={value:#x}")
        elif kind == "flip-region" and seed.regions:
            name, off, length = draw(st.sampled_from(seed.regions))
            if length <= 0:
                continue
            at = off + draw(st.integers(0, length - 1))
            value = draw(st.integers(0, 255))
            if at < size:
                buf[at] = value
                steps.append(f"{name}[{at - off:#x}]={value:#04x}")
        else:
            at, value = draw(st.integers(0, size - 1)), draw(st.integers(0, 255))
            buf[at] = value
            steps.append(f"byte[{at:#x}]={value:#04x}")
    bounds = sorted(seed.bounds)
    shape = draw(st.sampled_from(SHAPE_KINDS))
    if shape == "none" and not steps:
        shape = "truncate"
    if shape == "truncate":
        cut = draw(st.sampled_from(bounds)) + draw(st.sampled_from((0, 0, -1, 1, -8)))
        cut = max(1, min(cut, size))
        buf = buf[:cut]
        steps.append(f"truncate@{cut:#x}")
    elif shape in ("delete", "duplicate"):
        lo = draw(st.sampled_from([0, *bounds]))
        hi = draw(st.sampled_from([b for b in bounds if b > lo] or [size]))
        if shape == "delete" and hi - lo < size:
            del buf[lo:hi]
            steps.append(f"delete[{lo:#x}:{hi:#x}]")
        elif shape == "duplicate":
            times = draw(st.sampled_from((1, 2, 64)))
            buf[hi:hi] = buf[lo:hi] * times
            steps.append(f"repeat[{lo:#x}:{hi:#x}]x{times}")
    elif shape == "append":
        tail = draw(st.sampled_from((b"\0" * 32, b"\xff" * 33, seed.data[:32], seed.data[-4096:])))
        buf += tail
        steps.append(f"append {len(tail)} bytes")
    return Case(f"{seed.name}: {'; '.join(steps) or 'unchanged'}", bytes(buf))


# -- snapshot META JSON -------------------------------------------------------------------------

_HOLE = "\x00hole\x00"
JSON_TOKENS = [
    b"null", b"true", b"false", b"0", b"-1", b"1.5", b"-0.0", b'""', b'"x"', b"[]", b"{}",
    b"[[]]", b'{"a": {}}', b"18446744073709551616", b"-9223372036854775809",
    b"9223372036854775808", b"1" + b"0" * 400, b"1e999", b"-1e999", b"1E400", b"NaN",
    b"Infinity", b"-Infinity", b"4096.0", b"4.096e3", b"1e-999", b'"\xff\xfe"', b'"\\ud800"',
    b'"\\u0000"', b'"a\\nb"', b'"' + b"x" * 70000 + b'"',
    b"[" * 100 + b"]" * 100, b"[" * 5000 + b"]" * 5000, b"[" * 100000 + b"]" * 100000,
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
]


def _paths(node: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [here]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*here, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*here, i))
    return out


def _with(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of ``node`` with the value at ``path`` replaced (deleted for ``...``)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        copy = dict(node)
        if rest or value is not ...:
            copy[head] = _with(node[head], rest, value)
        else:
            del copy[head]
        return copy
    copy = list(node)
    if rest or value is not ...:
        copy[head] = _with(node[head], rest, value)
    else:
        del copy[head]
    return copy


def snapshot_meta(data: bytes) -> tuple[int, int, int]:
    """(file offset of the notes PT_NOTE, its size, offset of the META descriptor)."""
    phoff, = struct.unpack_from("<Q", data, 32)
    _t, _f, notes_at, _v, _p, notes_size, _m, _a = struct.unpack_from("<IIQQQQQQ", data, phoff + 56)
    namesz, _descsz, n_type = struct.unpack_from("<III", data, notes_at)
    assert n_type == NT_META
    return notes_at, notes_size, notes_at + 12 + (-(-namesz // 4) * 4)


def with_meta(data: bytes, meta: bytes) -> bytes:
    """The snapshot ``data`` (as SnapshotWriter lays it out) with META's text replaced."""
    notes_at, notes_size, meta_at = snapshot_meta(data)
    namesz, descsz, n_type = struct.unpack_from("<III", data, notes_at)
    runs_note = data[meta_at + (-(-descsz // 4) * 4) : notes_at + notes_size]
    note = (struct.pack("<III", namesz, len(meta), n_type) + data[notes_at + 12 : meta_at]
            + meta + b"\0" * (-len(meta) % 4))
    notes = note + runs_note
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phnum = struct.unpack_from("<H", data, 56)[0]
    phdrs = bytearray(data[phoff : phoff + 56 * phnum])
    struct.pack_into("<Q", phdrs, 56 + 32, len(notes))  # the notes PT_NOTE's p_filesz
    head = bytearray(data[:notes_at])
    struct.pack_into("<Q", head, 32, notes_at + len(notes))  # e_phoff
    return bytes(head) + notes + bytes(phdrs)


@st.composite
def mutated_meta(draw: st.DrawFn, seed: Seed) -> Case:
    """The snapshot seed with its META JSON rewritten: 1-3 values replaced by other JSON
    (types, huge and non-finite numbers, deep nesting, invalid UTF-8), keys deleted, lists
    repeated; or its text damaged (invalid UTF-8, cut, BOM, trailing bytes)."""
    _, _, meta_at = snapshot_meta(seed.data)
    descsz = struct.unpack_from("<I", seed.data, snapshot_meta(seed.data)[0] + 4)[0]
    meta = json.loads(seed.data[meta_at : meta_at + descsz])
    steps: list[str] = []
    raw: list[bytes] = []
    for _ in range(draw(st.integers(1, 3), label="edits")):
        where = draw(st.sampled_from(_paths(meta)))
        how = draw(st.sampled_from(("token", "token", "token", "delete", "repeat")))
        if how == "delete" and where:
            meta = _with(meta, where, ...)
            steps.append(f"del {list(where)}")
            continue
        node = meta
        for k in where:
            node = node[k]
        if how == "repeat" and isinstance(node, list) and node:
            times = draw(st.sampled_from((2, 100, 3000)))
            meta = _with(meta, where, node * times)
            steps.append(f"{list(where)} x{times}")
            continue
        token = draw(st.sampled_from(JSON_TOKENS))
        meta = _with(meta, where, f"{_HOLE}{len(raw)}")
        raw.append(token)
        steps.append(f"{list(where)}={token[:24]!r}{'...' if len(token) > 24 else ''}")
    text = json.dumps(meta).encode()
    for i, token in enumerate(raw):
        text = text.replace(json.dumps(f"{_HOLE}{i}").encode(), token)
    damage = draw(st.sampled_from(("none", "none", "none", "utf8", "cut", "bom", "trailing")))
    if damage == "utf8":
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + b"\xc3\x28" + text[at + 1 :]
        steps.append(f"invalid UTF-8 at {at}")
    elif damage == "cut":
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at]
        steps.append(f"cut at {at}")
    elif damage == "bom":
        text = b"\xef\xbb\xbf" + text
        steps.append("BOM")
    elif damage == "trailing":
        text += b" \0garbage"
        steps.append("trailing bytes")
    return Case(f"{seed.name} META: {'; '.join(steps)}", with_meta(seed.data, text))


# -- running one case ---------------------------------------------------------------------------


class Inconsistent(Exception):
    """What iteration yields disagrees with the extents or with read_pages."""


def exercise(path: str, fmt: DumpFormat, *, also_analyze: bool = True) -> None:
    """What the fuzzers do with a file: open it with ``fmt``'s reader, list extents, read
    every batch, re-read sampled pages; then analyze it as ``scan`` would (format detected).

    The atheris harnesses (``fuzz/``) call this too, without ``analyze`` unless asked."""
    readers = open_inputs(path, fmt)
    try:
        for r in readers:
            counts = r.page_counts()
            r.info()
            seen, locs, pages = 0, [], []
            for b in r.iter_batches(BATCH_PAGES):
                n = len(b.addrs)
                if b.pages.shape != (n, r.page_size) or (b.zero is not None
                                                          and len(b.zero) != n):
                    raise Inconsistent(f"batch of {n} addresses has pages {b.pages.shape}")
                seen += n
                readable = range(n) if b.zero is None else np.flatnonzero(~b.zero).tolist()
                for k in sorted({readable[0], readable[-1]}) if (
                        len(readable) and len(locs) < SAMPLED_PAGES) else ():
                    locs.append(int(b.addrs[k]))
                    pages.append(np.array(b.pages[k]))
            if seen != counts[PageState.DATA]:
                raise Inconsistent(f"iter_batches gave {seen} pages; extents say "
                                   f"{counts[PageState.DATA]} DATA pages")
            if locs:
                again = r.read_pages(np.array(locs, dtype=np.uint64))
                if not np.array_equal(again, np.stack(pages)):
                    raise Inconsistent("read_pages returned other bytes than iter_batches")
    finally:
        for r in readers:
            r.close()
    if also_analyze:
        analyze([path], jobs=1)


def outcome(fn: Callable[[], None]) -> tuple[Any, ...]:
    """Run ``fn``: ``("ok", secs)``; ``("error", type, message, offset, located, secs)`` for
    a KsmAnalyzeError (``located``: a DumpFormatError, about bytes at some place in the file);
    ``("crash", summary, traceback, secs)`` for any other exception."""
    started = time.monotonic()
    try:
        fn()
    except KsmAnalyzeError as e:
        offset, located = getattr(e, "offset", None), isinstance(e, DumpFormatError)
        return ("error", type(e).__name__, str(e), offset, located, time.monotonic() - started)
    except BaseException as e:  # noqa: BLE001 (anything else is what fuzzing looks for)
        summary = f"{type(e).__name__}: {e}"
        tb = "".join(traceback.format_exception(e))
        return ("crash", summary[:2000], tb[-6000:], time.monotonic() - started)
    return ("ok", time.monotonic() - started)


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def run_isolated(fn: Callable[[], None], *, mem: int, seconds: float) -> tuple[Any, ...]:
    """Run ``fn`` in a forked child under RLIMIT_AS (its size now + ``mem``) and a deadline.

    Returns what :func:`outcome` returns, ``("signal", name)`` when the child died by a
    signal, or ``("hang", seconds)`` when it was killed at the deadline.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(rfd)
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + mem, hard))
            try:
                out = outcome(fn)
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            blob = pickle.dumps(out)
            while blob:
                blob = blob[os.write(wfd, blob) :]
        except BaseException:  # noqa: BLE001 (the parent reports the missing result)
            code = 70
        finally:
            os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return ("hang", seconds)
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ("signal", signal.Signals(os.WTERMSIG(status)).name)
    if not chunks:
        return ("crash", f"the child exited with status {os.WEXITSTATUS(status)} and no result",
                "", 0.0)
    result: tuple[Any, ...] = pickle.loads(b"".join(chunks))
    return result


_OTHER_PAGE_SIZE = re.compile(r"holds (\d+)-byte pages; analyze it with --page-size (\d+)$")


def problems(result: tuple[Any, ...], path: str) -> list[str]:
    """What is wrong with a case's outcome (nothing for success or a proper error)."""
    kind = result[0]
    if kind == "ok":
        return []
    if kind == "hang":
        return [f"did not finish within {result[1]} s (killed)"]
    if kind == "signal":
        return [f"the process died by {result[1]} (a crash, or the memory bound hit in C code)"]
    if kind == "crash":
        summary, tb = result[1], result[2]
        m = _OTHER_PAGE_SIZE.search(summary)
        if summary.startswith("ValueError: " + path) and m and m[1] == m[2] and _valid_ps(m[1]):
            return []  # documented: a snapshot of another page size asks for --page-size
        return [f"{summary}\n{tb}"]
    _, name, message, offset, located, _secs = result
    out = []
    if "\n" in message or "\r" in message:
        out.append(f"{name} message is not one line: {message!r}")
    if not message.startswith(path):
        out.append(f"{name} message does not start with the file's path: {message!r}")
    if located and offset is None and "of the reassembled dump" not in message:
        # A problem with the file's bytes has a place; a flattened kdump's may be a logical
        # offset only (no record wrote it), which the message then names.
        out.append(f"{name} gives no offset (DumpFormatError(offset=...)): {message!r}")
    if offset is not None and not message.startswith(f"{path} at offset {offset:#x}: "):
        out.append(f"{name} has offset {offset:#x} but its message does not say "
                   f"'at offset {offset:#x}': {message!r}")
    return out


def _valid_ps(text: str) -> bool:
    try:
        check_page_size(int(text))
    except ValueError:
        return False
    return True


def check_case(fmt: DumpFormat, case: Case) -> None:
    """The property: run the case isolated and fail with a report (and the saved input)."""
    path = case_file(fmt, case.data, f"case-{fmt.value}.dump")
    try:
        result = run_isolated(lambda: exercise(str(path), fmt),
                              mem=mem_bound(len(case.data)), seconds=CASE_SECONDS)
        found = problems(result, str(path))
    finally:
        if FUZZED[fmt].companion is None:
            path.unlink()
    if found:
        FAILURES.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(case.data).hexdigest()[:12]
        saved = FAILURES / f"{fmt.value}-{digest}.bin"
        saved.write_bytes(case.data)
        raise AssertionError(f"{case.label}\n(input saved as {saved})\n" + "\n".join(found))


# -- the properties ---------------------------------------------------------------------------


def warm_up() -> None:
    """Run every format's first seed once, so that lazy imports (pandas, codecs) happen
    before a case runs under its memory bound. Errors are left to the tests to report."""
    for fmt in FUZZED:
        path = case_file(fmt, SEEDS[fmt][0].data, f"warm-{fmt.value}")
        with contextlib.suppress(Exception):
            exercise(str(path), fmt)


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    warm_up()


_SEED_VALUE = random.randrange(1 << 32) if SEED == "random" else int(SEED or 0)
if SEED:
    print(f"KSM_FUZZ_SEED={_SEED_VALUE}")


def _profile(test: Callable[..., None]) -> Callable[..., None]:
    test = settings(max_examples=EXAMPLES, deadline=None, derandomize=not SEED, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)(test)
    if SEED:
        test = hypothesis_seed(_SEED_VALUE)(test)
    return test


def reproducers(fmt: DumpFormat) -> list[Path]:
    """The saved crash inputs of a format: ``fuzz/crashes/<format>-*.bin``."""
    return sorted(CRASHES.glob(f"{fmt.value}-*.bin"))


def _reader_property(fmt: DumpFormat) -> Callable[..., None]:
    def test(case: Case) -> None:
        check_case(fmt, case)

    test.__name__ = test.__qualname__ = f"test_mutated_{fmt.value}_dumps_fail_cleanly"
    test.__doc__ = f"Structurally mutated {fmt.value} dumps: only clean errors, bounded."
    test = given(case=mutated(SEEDS[fmt]))(test)
    for crash in reproducers(fmt):
        test = example(case=Case(f"reproducer {crash.name}", crash.read_bytes()))(test)
    return _profile(test)


test_mutated_raw_dumps_fail_cleanly = _reader_property(DumpFormat.RAW)
test_mutated_elf_dumps_fail_cleanly = _reader_property(DumpFormat.ELF)
test_mutated_kdump_dumps_fail_cleanly = _reader_property(DumpFormat.KDUMP)
test_mutated_lime_dumps_fail_cleanly = _reader_property(DumpFormat.LIME)
test_mutated_avml_dumps_fail_cleanly = _reader_property(DumpFormat.AVML)
test_mutated_migration_streams_fail_cleanly = _reader_property(DumpFormat.MIGRATION)
test_mutated_snapshot_dumps_fail_cleanly = _reader_property(DumpFormat.SNAPSHOT)
test_mutated_firecracker_dumps_fail_cleanly = _reader_property(DumpFormat.FIRECRACKER)
test_mutated_firecracker_diff_dumps_fail_cleanly = _reader_property(DumpFormat.FIRECRACKER_DIFF)
test_mutated_cloud_hypervisor_dumps_fail_cleanly = _reader_property(DumpFormat.CLOUD_HYPERVISOR)
test_mutated_openvmm_dumps_fail_cleanly = _reader_property(DumpFormat.OPENVMM)
test_mutated_vmrs_dumps_fail_cleanly = _reader_property(DumpFormat.VMRS)
test_mutated_vmware_dumps_fail_cleanly = _reader_property(DumpFormat.VMWARE)  # issue 20 (vmwin)
test_mutated_windows_dumps_fail_cleanly = _reader_property(DumpFormat.WINDOWS)


@given(case=mutated_meta(SEEDS[DumpFormat.SNAPSHOT][0]))
def test_snapshot_meta_json_fails_cleanly(case: Case) -> None:
    check_case(DumpFormat.SNAPSHOT, case)


for _crash in reproducers(DumpFormat.SNAPSHOT):
    if _crash.name.startswith("snapshot-meta-"):
        test_snapshot_meta_json_fails_cleanly = example(
            case=Case(f"reproducer {_crash.name}", _crash.read_bytes())
        )(test_snapshot_meta_json_fails_cleanly)
test_snapshot_meta_json_fails_cleanly = _profile(test_snapshot_meta_json_fails_cleanly)


@pytest.mark.parametrize("fmt", list(FUZZED), ids=lambda f: f.value)
def test_truncation_at_every_header_boundary(fmt: DumpFormat) -> None:
    """Every seed cut at every structure boundary, and one byte before it."""
    for seed in SEEDS[fmt]:
        cuts = sorted({c + d for c in seed.bounds for d in (-1, 0)} & set(range(1, len(seed.data))))
        for cut in cuts:
            check_case(fmt, Case(f"{seed.name}: truncate@{cut:#x}", seed.data[:cut]))


@pytest.mark.parametrize("fmt", list(FUZZED), ids=lambda f: f.value)
def test_seeds_are_valid_dumps(fmt: DumpFormat) -> None:
    """The mutations start from dumps the reader takes whole (else they test nothing)."""
    for seed in SEEDS[fmt]:
        path = case_file(fmt, seed.data, f"seed-{seed.name}")
        readers = open_inputs(path, fmt)
        try:
            assert sum(r.page_counts()[PageState.DATA] for r in readers) > 0, seed.name
        finally:
            for r in readers:
                r.close()
        assert seed.fields or fmt in NO_FIELDS, seed.name


NO_FIELDS = {DumpFormat.RAW, DumpFormat.FIRECRACKER, DumpFormat.FIRECRACKER_DIFF,
             DumpFormat.CLOUD_HYPERVISOR}
"""Formats without integer header fields: flat memory, or JSON (whose numbers are regions)."""


def test_every_reader_is_fuzzed() -> None:
    """A format added to READERS without seeds here and a harness in fuzz/ fails this."""
    assert set(FUZZED) == set(READERS)
    for fmt, fuzzed in FUZZED.items():
        assert fuzzed.harness == f"fuzz/fuzz_{fmt.value}.py"
        assert (ROOT / fuzzed.harness).is_file(), f"{fuzzed.harness} is missing"
    for crash in CRASHES.glob("*.bin"):
        assert crash.name.split("-")[0] in {f.value for f in FUZZED}, crash.name
        assert crash.stat().st_size <= 64 << 10, f"{crash.name}: keep reproducers small"


def test_isolation_catches_hangs_blowups_and_crashes() -> None:
    """The harness itself: a hang is killed, a blow-up hits the bound, a signal is seen."""
    assert run_isolated(lambda: time.sleep(60), mem=1 << 20, seconds=0.5)[0] == "hang"
    # More than the whole address space the child may reach: a free chunk the parent's malloc
    # kept (always smaller than its address space) cannot serve it, whatever ran before.
    blowup = run_isolated(lambda: bytearray(_vm_size() + mem_bound(4096) + (64 << 20)),
                          mem=mem_bound(4096), seconds=CASE_SECONDS)
    assert blowup[0] == "crash" and blowup[1].startswith("MemoryError"), blowup[:2]
    assert run_isolated(lambda: os.kill(os.getpid(), signal.SIGKILL), mem=1 << 20,
                        seconds=CASE_SECONDS) == ("signal", "SIGKILL")
    ok = ("error", "DumpFormatError", "/x at offset 0x10: bad", 0x10, True, 0.0)
    assert problems(ok, "/x") == []
    assert problems(("error", "InputError", "/x: empty file", None, False, 0.0), "/x") == []
    assert problems(("error", "DumpFormatError", "/x: bad", 0x10, True, 0.0), "/x")
    assert problems(("error", "DumpFormatError", "/x: bad", None, True, 0.0), "/x")
    assert problems(("error", "InputError", "/x: bad\nworse", None, False, 0.0), "/x")
    assert problems(("error", "InputError", "/y: bad", None, False, 0.0), "/x")




# -- fingerprint files and cache entries --------------------------------------------------------
#
# The other travelling input: a fingerprint file (``scan FILE.ksmfp.parquet``) and a --cache
# entry, both written by fingerprint_files.save. The seed is the fingerprint file of
# sample_dumps/vm-b.raw (5.7 KB), whose answer is known. A case flips, overwrites or cuts its
# bytes. The property, on top of the readers' (only a clean one-line KsmAnalyzeError naming
# the file, bounded time and memory): the answer of a mutated file that loads is the
# original's. A flipped byte either errors or leaves the answer unchanged; never a silent
# change (issue 18, class 1).

FP_EXAMPLES = int(os.environ.get("KSM_FUZZ_FP_EXAMPLES", str(max(1, EXAMPLES // 6))))
"""Cases per target (each runs a whole scan: about 0.2 s): 33 in CI."""


class SilentChange(AssertionError):
    """A mutated fingerprint file or cache entry loaded and gave another answer."""


@dataclass(frozen=True)
class FingerprintSeed:
    """The dump, its fingerprint file, the cache folder holding its entry, the answers."""

    dump: Path
    file: Path
    cache: Path
    entry: Path
    answer: tuple[int, ...]


def answer(path: str | os.PathLike[str], cache: str | None = None) -> tuple[int, ...]:
    """What ``scan PATH`` (with ``--cache``) predicts: the KSM counters, as integers."""
    a = analyze([os.fspath(path)], jobs=1, cache=cache)
    return tuple(int(v) for v in vars(a.counters).values())


_FP_SEED: list[FingerprintSeed] = []


def fingerprint_seed() -> FingerprintSeed:
    """Made once: vm-b.raw copied into the scratch folder, fingerprinted by the CLI, and
    scanned once through a cache (which writes the entry the cache cases mutate)."""
    if not _FP_SEED:
        where = _WORK / "fingerprints"
        (where / "fp").mkdir(parents=True, exist_ok=True)
        dump = where / "vm-b.raw"
        shutil.copyfile(ROOT / "sample_dumps" / "vm-b.raw", dump)
        subprocess.run([sys.executable, "-m", "ksm_analyze", "fingerprint", "-q", str(dump),
                        "-o", str(where / "fp")], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
        file = where / "fp" / "vm-b.raw.ksmfp.parquet"
        cache = where / "cache"
        expected = answer(dump)
        if answer(file) != expected or answer(dump, str(cache)) != expected:
            raise AssertionError("the fingerprint file or the cache entry of vm-b.raw gives "
                                 "another answer than the dump itself")
        (entry,) = cache.glob("*.ksmfp.parquet")
        _FP_SEED.append(FingerprintSeed(dump, file, cache, entry, expected))
    return _FP_SEED[0]


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> Case:
    """One to four flipped bytes (the common case), an overwritten run, or a cut."""
    kind = draw(st.sampled_from(["flip", "flip", "flip", "overwrite", "truncate"]))
    out = bytearray(data)
    if kind == "flip":
        where = []
        for _ in range(draw(st.integers(1, 4))):
            i, x = draw(st.integers(0, len(out) - 1)), draw(st.integers(1, 255))
            out[i] ^= x
            where.append(f"{i:#x}^{x:#04x}")
        return Case(f"flip {' '.join(where)}", bytes(out))
    if kind == "overwrite":
        i = draw(st.integers(0, len(out) - 1))
        value = draw(st.binary(min_size=1, max_size=64))
        out[i : i + len(value)] = value
        return Case(f"overwrite {len(value)} bytes at {i:#x}", bytes(out[: len(data)]))
    n = draw(st.integers(0, len(out) - 1))
    return Case(f"truncate to {n} bytes", bytes(out[:n]))


def exercise_fingerprint_file(path: str, expected: tuple[int, ...]) -> None:
    """Read a fingerprint file the ways ``scan``, ``info`` and ``plan`` do (metadata, load,
    analyze) and fail with SilentChange if it loads with another answer than ``expected``."""
    from ksm_analyze.fleet import fingerprint_files

    fingerprint_files.metadata(path)
    fingerprint_files.load(path)
    got = answer(path)
    if got != expected:
        raise SilentChange(f"{path}: loaded, with another answer {got} than {expected}")


def exercise_cache_entry(seed: FingerprintSeed, expected: tuple[int, ...]) -> None:
    """Scan the dump with --cache over the (mutated) entry: the answer must stay the dump's
    (a damaged entry is rewritten, an intact one used), whatever the entry holds."""
    got = answer(seed.dump, str(seed.cache))
    if got != expected:
        raise SilentChange(f"{seed.entry}: the cache entry changed the answer of {seed.dump} "
                           f"to {got} from {expected}")


def fingerprint_problems(result: tuple[Any, ...], path: str) -> list[str]:
    """:func:`problems`, for a file with no byte offset to blame (a Parquet file is checked
    as a whole): a clean, one-line KsmAnalyzeError naming the file, or success."""
    if result[0] == "error":
        result = (*result[:3], None, False, result[5])
    return problems(result, path)


def check_fingerprint_case(target: str, case: Case) -> None:
    """The property for ``target`` (``fpfile`` or ``cache``): run the case isolated."""
    seed = fingerprint_seed()
    if target == "fpfile":
        path = _WORK / "fingerprints" / "case.ksmfp.parquet"
        path.write_bytes(case.data)
        fn: Callable[[], None] = lambda: exercise_fingerprint_file(str(path), seed.answer)
    else:
        path = seed.entry
        path.write_bytes(case.data)
        fn = lambda: exercise_cache_entry(seed, seed.answer)
    result = run_isolated(fn, mem=mem_bound(len(case.data) + seed.dump.stat().st_size),
                          seconds=CASE_SECONDS)
    # A cache entry's errors name the dump or the entry; a fingerprint file's name the file.
    found = fingerprint_problems(result, str(seed.dump if target == "cache" else path))
    if target == "cache" and result[0] == "error" and str(result[2]).startswith(str(path)):
        found = fingerprint_problems(result, str(path))
    if found:
        FAILURES.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(case.data).hexdigest()[:12]
        saved = FAILURES / f"{target}-{digest}.bin"
        saved.write_bytes(case.data)
        raise AssertionError(f"{case.label}\n(input saved as {saved})\n" + "\n".join(found))


def _fingerprint_property(target: str) -> Callable[..., None]:
    seed = fingerprint_seed()
    data = (seed.file if target == "fpfile" else seed.entry).read_bytes()

    def test(case: Case) -> None:
        check_fingerprint_case(target, case)

    test.__name__ = test.__qualname__ = f"test_mutated_{target}_fails_cleanly_or_same_answer"
    test.__doc__ = f"Mutated {target}: a clean error or the original answer, bounded."
    test = given(case=mutated_bytes(data))(test)
    for crash in sorted(CRASHES.glob(f"{target}-*.bin")):
        test = example(case=Case(f"reproducer {crash.name}", crash.read_bytes()))(test)
    test = settings(max_examples=FP_EXAMPLES, deadline=None, derandomize=not SEED,
                    database=None, suppress_health_check=list(HealthCheck), print_blob=True)(test)
    return hypothesis_seed(_SEED_VALUE)(test) if SEED else test


test_mutated_fpfile_fails_cleanly_or_same_answer = _fingerprint_property("fpfile")
test_mutated_cache_fails_cleanly_or_same_answer = _fingerprint_property("cache")
