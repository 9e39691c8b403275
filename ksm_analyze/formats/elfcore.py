"""ELF cores: QEMU ``dump-guest-memory``, VirtualBox ``dumpvmcore``, kernel vmcores, process cores.

Every ``PT_LOAD`` becomes extents: the stored part (``p_filesz``) is DATA read raw through the
memory map, the rest up to ``p_memsz`` is NOT_SAVED.  The producer, told apart by its notes
(``../shared/reference/dump-formats.md`` sections 1, 4, 5 and 10), decides the address space:

* ``QEMU`` note: QEMU ``dump-guest-memory``; ``VBCORE``/``VBOXCORE``: VirtualBox;
  ``VMCOREINFO`` alone: a kernel vmcore (``/proc/vmcore``, ``makedumpfile -E``).  Guest
  physical addresses (``p_paddr``).
* ``NT_FILE`` or ``NT_PRPSINFO``: a Linux process core (kernel coredump or gdb ``gcore``).
  Virtual addresses (``p_vaddr``); sparse-file holes become HOLE pages, and ``NT_FILE`` tells
  file-backed and shared mappings (``MapFlags.FILE``) from private anonymous memory.
* Xen ``xl dump-core`` (``.note.Xen``, sections and no ``PT_LOAD``) is refused.

Segments are named ``PT_LOAD[i]`` by their index ``i`` in the program header table, the row
``readelf -l`` shows them in.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import os
import struct
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np

from ..errors import TruncatedDumpError, UnsupportedDumpError
from ..pages import Extent, MapFlags, PageState
from ..units import size_text
from .base import ADDRESS_LIMIT, DumpFormat, DumpReader

__all__ = ["ElfCoreReader"]

T = TypeVar("T")

# ELF constants (System V gABI, "ELF Header" and "Program Header" chapters; <elf.h>).
ELFMAG = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
"""e_phnum escape: the real count is in section header 0's sh_info (gABI "Extended numbering")."""
SHN_XINDEX = 0xFFFF
NT_PRSTATUS, NT_PRPSINFO = 1, 3
NT_FILE = 0x46494C45
"""Mapped files of a process core, owner "CORE" (linux/include/uapi/linux/elf.h)."""

MAX_PHNUM = 1 << 20
"""More program headers than any real dump has: a process core has one per VMA (Linux allows
65,530 by default, vm.max_map_count), a -p dump of a huge guest ~1e5. Each costs ~1 KiB of
Python objects and ~30 us from here to the analysis, so 2^20 bounds a hostile table."""
NOTE_BYTES = 128
"""At most 65,536 notes plus one per this many bytes of file: real notes average 300 bytes
or more (NT_PRSTATUS alone is 356), and each costs ~200 bytes of objects here."""
_SHARED_ANON_PREFIXES = ("/dev/zero", "/memfd:", "/SYSV")
"""NT_FILE paths of shmem-backed shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS, memfd,
SysV shm): not private anonymous, so never KSM-mergeable."""
_MAX_WARNED_SEGMENTS = 8

# Elf{32,64}_Ehdr after e_ident: e_type, e_machine, e_version, e_entry, e_phoff, e_shoff,
# e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
_EHDR_FIELDS = {ELFCLASS32: "HHIIIIIHHHHHH", ELFCLASS64: "HHIQQQIHHHHHH"}
# Elf{32,64}_Shdr: sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info,
# sh_addralign, sh_entsize.
_SHDR_FIELDS = {ELFCLASS32: "IIIIIIIIII", ELFCLASS64: "IIQQQQIIQQ"}
# Elf{32,64}_Phdr field order differs between the classes (p_flags moves).
_PHDR_FIELDS = {
    ELFCLASS32: [
        ("p_type", "u4"), ("p_offset", "u4"), ("p_vaddr", "u4"), ("p_paddr", "u4"),
        ("p_filesz", "u4"), ("p_memsz", "u4"), ("p_flags", "u4"), ("p_align", "u4"),
    ],
    ELFCLASS64: [
        ("p_type", "u4"), ("p_flags", "u4"), ("p_offset", "u8"), ("p_vaddr", "u8"),
        ("p_paddr", "u8"), ("p_filesz", "u8"), ("p_memsz", "u8"), ("p_align", "u8"),
    ],
}  # fmt: skip
_PHENTSIZE = {ELFCLASS32: 32, ELFCLASS64: 56}
_SHENTSIZE = {ELFCLASS32: 40, ELFCLASS64: 64}
_XEN_SECTIONS = (".note.Xen", ".xen_pages", ".xen_p2m", ".xen_pfn", ".xen_prstatus")


class Segment(NamedTuple):
    """One PT_LOAD program header, with its index in the program header table."""

    ndx: int
    """Index in the program header table."""
    p_offset: int
    p_vaddr: int
    p_paddr: int
    p_filesz: int
    p_memsz: int
    addr: int
    """p_paddr for guest dumps, p_vaddr for process cores."""


class Note(NamedTuple):
    """One ELF note: owner name, type, and where its descriptor lies in the file."""

    name: str
    n_type: int
    desc_offset: int
    descsz: int


class MappedFile(NamedTuple):
    """One NT_FILE entry: the mapping [start, end) shows ``path`` from byte ``offset``."""

    start: int
    end: int
    offset: int
    path: str


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _text(raw: bytes) -> str:
    """Bytes from a dump as text any output can take: invalid UTF-8 becomes ``\\xNN``."""
    return raw.decode("utf-8", "backslashreplace")


class ElfCoreReader(DumpReader):
    """An ELF core file (``e_type == ET_CORE``), 32- or 64-bit, either byte order."""

    format = DumpFormat.ELF
    unwrapped_only: ClassVar[str | None] = None

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """ELF magic. The reader checks the rest, so a damaged ``e_type`` or class is an error
        naming it rather than a fall back to raw."""
        return head[:4] == ELFMAG

    # -- headers ----------------------------------------------------------------------------

    def _parse_ehdr(self) -> None:
        ident = self._read(0, 16, "ELF identification (e_ident)")
        if ident[:4] != ELFMAG:
            raise self._error(f"bad ELF magic {ident[:4].hex(' ')} (expected 7f 45 4c 46)", 0)
        self.elfclass = ident[4]
        if self.elfclass not in (ELFCLASS32, ELFCLASS64):
            raise self._error(
                f"bad ELF class (EI_CLASS) {self.elfclass:#x}: expected 1 (ELFCLASS32) "
                "or 2 (ELFCLASS64)",
                4,
            )
        if ident[5] not in (ELFDATA2LSB, ELFDATA2MSB):
            raise self._error(
                f"bad ELF byte order (EI_DATA) {ident[5]:#x}: expected 1 (little endian) "
                "or 2 (big endian)",
                5,
            )
        self.endian = "<" if ident[5] == ELFDATA2LSB else ">"
        self.bits = 32 if self.elfclass == ELFCLASS32 else 64
        ehdr = struct.Struct(self.endian + _EHDR_FIELDS[self.elfclass])
        (
            e_type, self.e_machine, _, _, self.e_phoff, self.e_shoff, _, _,
            self.e_phentsize, self.e_phnum, self.e_shentsize, self.e_shnum, self.e_shstrndx,
        ) = self._unpack(ehdr, 16, f"ELF{self.bits} header")  # fmt: skip
        # e_ehsize is not checked: QEMU 7.2 (dump/dump.c) writes sizeof(pointer), 8. Nor is
        # EI_VERSION: VirtualBox writes 0 (volatility3 layers/elf.py).
        if e_type != ET_CORE:
            raise self._error(f"ELF e_type {e_type:#x} is not ET_CORE (4): not a core dump", 16)

    def _section_header(self, i: int) -> tuple[int, ...]:
        """Section header ``i`` (bounds-checked against the file, like every header read)."""
        if self.e_shoff == 0:
            raise self._error(
                f"section header {i} is needed but e_shoff is 0", 0x20 if self.bits == 32 else 0x28
            )
        if self.e_shentsize != _SHENTSIZE[self.elfclass]:
            raise self._error(
                f"e_shentsize {self.e_shentsize:#x} does not match ELF{self.bits} "
                f"({_SHENTSIZE[self.elfclass]:#x})",
                0x2E if self.bits == 32 else 0x3A,
            )
        shdr = struct.Struct(self.endian + _SHDR_FIELDS[self.elfclass])
        return self._unpack(shdr, self.e_shoff + i * shdr.size, f"section header {i}")

    def _phnum(self) -> int:
        phnum: int = self.e_phnum
        if phnum == PN_XNUM:
            phnum = int(self._section_header(0)[7])  # sh_info
            self.pn_xnum = True
        if phnum > MAX_PHNUM:
            raise self._error(
                f"the ELF header claims {phnum:#x} program headers, more than the "
                f"{MAX_PHNUM:#x} any real dump has",
                0x2C if self.bits == 32 else 0x38,
            )
        if phnum and self.e_phentsize != _PHENTSIZE[self.elfclass]:
            raise self._error(
                f"e_phentsize {self.e_phentsize:#x} does not match ELF{self.bits} "
                f"({_PHENTSIZE[self.elfclass]:#x})",
                0x2A if self.bits == 32 else 0x36,
            )
        end = self.e_phoff + phnum * self.e_phentsize
        if end > self.file_size:
            raise TruncatedDumpError(
                f"program header table ({phnum:#x} entries of {self.e_phentsize} bytes) ends "
                f"at {end:#x}, past the end of the file ({self.file_size:#x})",
                path=self.path,
                offset=self.e_phoff,
            )
        return phnum

    def _section_names(self) -> list[str]:
        """Names of all sections (only asked for when there is no PT_LOAD, to spot Xen)."""
        if self.e_shoff == 0:
            return []
        shnum, strndx = self.e_shnum, self.e_shstrndx
        if shnum == 0 or strndx == SHN_XINDEX:
            sh0 = self._section_header(0)
            shnum = shnum or sh0[5]  # sh_size
            strndx = sh0[6] if strndx == SHN_XINDEX else strndx  # sh_link
        if self.e_shoff + shnum * self.e_shentsize > self.file_size:
            raise TruncatedDumpError(
                f"section header table ({shnum:#x} entries of {self.e_shentsize} bytes) runs "
                f"past the end of the file ({self.file_size:#x})",
                path=self.path,
                offset=self.e_shoff,
            )
        # Xen writes a handful of sections; the first few thousand are plenty to name it.
        headers = [self._section_header(i) for i in range(min(shnum, 4096))]
        if not 0 < strndx < len(headers):
            return []
        strtab = self._read(
            headers[strndx][4], min(headers[strndx][5], 1 << 16), "section name table"
        )
        return [strtab[h[0] :].split(b"\0")[0].decode("latin-1") for h in headers]

    def _notes(self, index: int, offset: int, size: int) -> None:
        """The notes of PT_NOTE ``index``; core notes are 4-byte aligned (also VirtualBox's,
        whose names are chosen so 4- and 8-byte alignment agree: DBGFCoreWrite.cpp)."""
        if size and offset + size > self.file_size:
            raise TruncatedDumpError(
                f"PT_NOTE[{index}] claims {size:#x} bytes at file offset {offset:#x}, past "
                f"the end of the file ({self.file_size:#x})",
                path=self.path,
                offset=offset,
            )
        nhdr = struct.Struct(self.endian + "III")  # n_namesz, n_descsz, n_type
        notes, pos, end = self.notes, offset, offset + size
        while pos + nhdr.size <= end:
            if problem := self._over_limit(len(notes) + 1, "ELF notes", NOTE_BYTES):
                raise self._error(problem, pos)
            namesz, descsz, n_type = self._unpack(nhdr, pos, "ELF note header")
            desc = pos + nhdr.size + _align4(namesz)
            if desc + descsz > end:
                raise self._error(
                    f"note with a {namesz:#x}-byte name and a {descsz:#x}-byte descriptor runs "
                    f"past the end of PT_NOTE[{index}] ({end:#x})",
                    pos,
                )
            name = self._read(pos + nhdr.size, min(namesz, 64, end - pos - nhdr.size),
                              "ELF note name")
            notes.append(Note(name.split(b"\0")[0].decode("latin-1"), n_type, desc, descsz))
            pos = desc + _align4(descsz)

    def _nt_file(self, note: Note) -> list[MappedFile]:
        """Decode NT_FILE: long count, page_size; {start, end, file_ofs}[count]; paths."""
        word = "I" if self.bits == 32 else "Q"
        wsize = self.bits // 8
        desc = self._read(note.desc_offset, note.descsz, "NT_FILE note")
        if len(desc) < 2 * wsize:
            raise self._error(f"NT_FILE note of {len(desc)} bytes is too short", note.desc_offset)
        count, page_size = struct.unpack_from(self.endian + 2 * word, desc)
        table_end = (2 + 3 * count) * wsize
        if table_end > len(desc):
            raise self._error(
                f"NT_FILE claims {count:#x} mappings, more than its {len(desc):#x} bytes hold",
                note.desc_offset,
            )
        triples = struct.unpack_from(f"{self.endian}{3 * count}{word}", desc, 2 * wsize)
        paths = desc[table_end:].split(b"\0", count)  # not one object per NUL of a flood
        if len(paths) < count:
            raise self._error(
                f"NT_FILE lists {count} mappings but only {len(paths)} paths",
                note.desc_offset,
            )
        start, end, ofs = triples[0::3], triples[1::3], triples[2::3]
        return [
            MappedFile(start[i], end[i], ofs[i] * page_size, _text(paths[i]))
            for i in range(count)
        ]

    # -- classification ---------------------------------------------------------------------

    def _classify(self, notes: list[Note], loads: list[Segment]) -> str:
        names = {n.name for n in notes}
        core_types = {n.n_type for n in notes if n.name == "CORE"}
        if "Xen" in names:
            self._refuse_xen("a Xen note in PT_NOTE")
        if names & {"VBCORE", "VBOXCORE"}:
            return "vbox"
        if "QEMU" in names:
            return "qemu"
        if core_types & {NT_FILE, NT_PRPSINFO}:
            return "process"
        if "VMCOREINFO" in names:
            return "kernel"
        # No producer note: a process core has p_paddr 0 everywhere and real p_vaddr.
        if loads and all(s.p_paddr == 0 for s in loads) and any(s.p_vaddr for s in loads):
            self._warn(
                "no producer note; p_paddr is 0 everywhere, so reading it as a process core "
                "at virtual addresses (p_vaddr)"
            )
            return "process"
        self._warn(
            "no QEMU, VBCORE, NT_FILE or VMCOREINFO note: producer unknown; reading p_paddr "
            "as physical addresses"
        )
        return "unknown"

    def _refuse_xen(self, evidence: str) -> None:
        raise UnsupportedDumpError(
            f"this is a Xen dump-core (xl dump-core; found {evidence}), which ksm-analyze "
            "cannot read yet",
            path=self.path,
            offset=0,
        )

    def _warn(self, message: str) -> None:
        self.warnings.append(f"{self.path}: {message}")

    # -- extents ----------------------------------------------------------------------------

    def _headers(self) -> list[Segment]:
        """Read the ELF header, every note (into ``self.notes``) and the PT_LOAD headers."""
        self.pn_xnum = False
        self._parse_ehdr()
        phnum = self._phnum()
        dtype = np.dtype([(n, self.endian + t) for n, t in _PHDR_FIELDS[self.elfclass]])
        table = np.frombuffer(
            self._read(self.e_phoff, phnum * dtype.itemsize, "program header table"), dtype
        )
        self.phnum = phnum
        self.notes: list[Note] = []
        for i in np.flatnonzero(table["p_type"] == PT_NOTE).tolist():
            self._notes(i, int(table[i]["p_offset"]), int(table[i]["p_filesz"]))
        load_idx = np.flatnonzero(table["p_type"] == PT_LOAD)
        rows = table[load_idx]
        cols = [rows[f].tolist() for f in ("p_offset", "p_vaddr", "p_paddr", "p_filesz")]
        memsz = rows["p_memsz"].tolist()
        return [
            Segment(i, o, v, p, f, m, p)
            for i, o, v, p, f, m in zip(load_idx.tolist(), *cols, memsz, strict=True)
        ]

    def _load_extents(self) -> list[Extent]:
        raw = self._headers()
        if not raw:
            names = set(self._section_names()) & set(_XEN_SECTIONS)
            if names:
                self._refuse_xen(f"section {min(names)} and no PT_LOAD")
            raise self._error("no PT_LOAD program headers: the core holds no memory", 0)

        self.producer = self._classify(self.notes, raw)
        process = self.producer == "process"
        # An instance attribute shadowing the base's ClassVar default, as the base intends.
        self.address_space = "virtual" if process else "physical"
        self.segments = [s._replace(addr=s.p_vaddr) for s in raw] if process else raw
        self._check_segments(self.segments)
        # In non-paging mode QEMU sets p_vaddr = p_paddr (7.2) or 0 (older releases).
        self.paging = self.producer == "qemu" and any(
            s.p_vaddr not in (0, s.p_paddr) for s in self.segments
        )
        self.mapped_files: list[MappedFile] = []
        for n in self.notes:
            if n.name == "CORE" and n.n_type == NT_FILE:
                self.mapped_files += self._nt_file(n)

        loads = self.segments
        if self.producer == "kernel":
            loads = self._drop_repeated_views(loads)
        stored = self._stored_extents(loads)
        extents = stored + self._unsaved_extents(loads, stored)
        if process:
            # Sorted and disjoint first, so each split below walks holes and mappings once.
            extents = self._split_holes(self._validated(extents))
            if any(n.name == "CORE" and n.n_type == NT_FILE for n in self.notes):
                extents = self._split_mappings(extents)
        return extents

    def _check_segments(self, loads: list[Segment]) -> None:
        ps, limit = self.page_size, 1 << self.bits
        virtual = self.address_space == "virtual"
        odd = []
        for s in loads:
            where = self.e_phoff + s.ndx * self.e_phentsize
            if s.p_filesz > s.p_memsz:
                raise self._error(
                    f"PT_LOAD[{s.ndx}] p_filesz {s.p_filesz:#x} is larger than p_memsz "
                    f"{s.p_memsz:#x}",
                    where,
                )
            if s.p_filesz and s.p_offset + s.p_filesz > self.file_size:
                raise TruncatedDumpError(
                    f"PT_LOAD[{s.ndx}] claims {s.p_filesz:#x} bytes at file offset "
                    f"{s.p_offset:#x}, past the end of the file ({self.file_size:#x})",
                    path=self.path,
                    offset=where,
                )
            if s.addr + s.p_memsz > limit:
                raise self._error(
                    f"PT_LOAD[{s.ndx}] of {s.p_memsz:#x} bytes at address {s.addr:#x} runs "
                    f"past the end of the {self.bits}-bit address space",
                    where,
                )
            # Virtual addresses may lie in the top half ([vsyscall]): there only the size counts.
            if (s.p_memsz if virtual else s.addr + s.p_memsz) > ADDRESS_LIMIT:
                raise self._error(
                    f"PT_LOAD[{s.ndx}] of {s.p_memsz:#x} bytes at address {s.addr:#x} reaches "
                    f"past 2^56 bytes (64 PiB), more memory than any machine addresses",
                    where,
                )
            if s.p_memsz and (s.p_filesz % ps or s.p_memsz % ps or s.addr % ps):
                odd.append(s.ndx)
        if odd:
            shown = ", ".join(f"PT_LOAD[{i}]" for i in odd[:_MAX_WARNED_SEGMENTS])
            more = (
                f" and {len(odd) - _MAX_WARNED_SEGMENTS} more"
                if len(odd) > _MAX_WARNED_SEGMENTS
                else ""
            )
            self._warn(
                f"{shown}{more}: address or size not a whole number of {ps}-byte pages; "
                "partial pages are ignored"
            )

    def _drop_repeated_views(self, loads: list[Segment]) -> list[Segment]:
        """Drop kernel-vmcore segments whose physical range another segment already covers.

        The kernel puts a PT_LOAD for its own text (p_vaddr ``_text``) in front of the RAM
        ones, and that physical memory is in a RAM segment too (kernel/crash_core.c
        ``crash_prepare_elf64_headers``); counting it twice would be wrong.
        """
        kept: list[Segment] = []
        cover: Segment | None = None
        for s in sorted(loads, key=lambda s: (s.addr, -s.p_memsz, s.ndx)):
            end = s.addr + s.p_memsz
            if cover is not None and s.p_memsz and end <= cover.addr + cover.p_memsz:
                self._warn(
                    f"PT_LOAD[{s.ndx}] (virtual {s.p_vaddr:#x}) repeats physical memory "
                    f"[{s.addr:#x}, {end:#x}) of PT_LOAD[{cover.ndx}]; counted once"
                )
                continue
            kept.append(s)
            if cover is None or end > cover.addr + cover.p_memsz:
                cover = s
        return kept

    def _label(self, s: Segment, addr: int) -> str:
        """The name of segment ``s``'s extent at ``addr``, whose program header is noted."""
        self._origins[addr] = self.e_phoff + s.ndx * self.e_phentsize
        return f"PT_LOAD[{s.ndx}]"

    def _stored_extents(self, loads: list[Segment]) -> list[Extent]:
        """DATA extents for the stored pages, each file page once.

        ``dump-guest-memory -p`` writes every RAM page once but gives one PT_LOAD per virtual
        range, so segments share file bytes (dump-formats.md section 1). Segments are taken
        in file order (the longest first on ties) and keep only the pages no earlier one
        stored: the first occurrence of each file page wins and later duplicates are dropped.
        """
        ps = self.page_size
        out: list[Extent] = []
        covered = 0  # file bytes below this are described already
        dropped = 0
        for s in sorted(loads, key=lambda s: (s.p_offset, -s.p_filesz, s.ndx)):
            n = s.p_filesz // ps
            if not n:
                continue
            first = 0
            if covered > s.p_offset:
                first = min(n, -(-(covered - s.p_offset) // ps))
                dropped += first
            if first < n:
                addr, off = s.addr + first * ps, s.p_offset + first * ps
                out.append(Extent(addr, n - first, PageState.DATA, off, self._label(s, addr)))
            covered = max(covered, s.p_offset + n * ps)
        if dropped:
            self._warn(
                f"{dropped} pages of PT_LOAD segments repeat file bytes an earlier segment "
                "stores (dump-guest-memory -p maps a page at several virtual addresses); "
                "each is counted once"
            )
        if self.paging:
            described = sum(e.npages for e in out) * ps
            first_data = min((s.p_offset for s in loads if s.p_filesz), default=self.file_size)
            unmapped = self.file_size - first_data - described
            if unmapped >= ps:
                self._warn(
                    f"paging dump (dump-guest-memory -p): the file stores {size_text(unmapped)} in "
                    "no PT_LOAD (memory the guest had not mapped), not analysed; "
                    "dump without -p to analyse all guest RAM"
                )
        return out

    def _unsaved_extents(self, loads: list[Segment], stored: list[Extent]) -> list[Extent]:
        """NOT_SAVED extents for ``p_filesz < p_memsz`` (MMIO, filtered or unreadable VMAs).

        In a paging dump one MMIO page may be mapped at several virtual addresses, so there
        each address is kept once, and never where a page is stored.
        """
        ps = self.page_size
        out = []
        for s in loads:
            first, end = s.p_filesz // ps, s.p_memsz // ps
            if end > first:
                addr, n = s.addr + first * ps, end - first
                out.append(Extent(addr, n, PageState.NOT_SAVED, -1, self._label(s, addr)))
        if not self.paging:
            return out
        taken = _merge([(e.addr, e.end_addr(ps)) for e in stored])
        kept: list[Extent] = []
        done = 0  # addresses below this are NOT_SAVED already
        for e in sorted(out, key=lambda e: (e.addr, -e.npages)):
            for lo, hi in _subtract(max(e.addr, done), e.end_addr(ps), taken):
                if hi - lo >= ps:
                    kept.append(e._replace(addr=lo, npages=(hi - lo) // ps))
            done = max(done, e.end_addr(ps))
        return kept

    def _split_holes(self, extents: list[Extent]) -> list[Extent]:
        """Split process-core DATA at sparse-file holes: pages wholly inside one are HOLE.

        The kernel ``lseek``s over pages that were never touched (fs/coredump.c
        ``dump_skip``); ``SEEK_HOLE`` finds them. Guest dumps are left alone: there a hole
        is a zero page the guest has, and zero detection finds it.
        """
        holes = self._file_holes()
        if not holes:
            return extents
        ps = self.page_size
        ends = [h[1] for h in holes]
        out = []
        for e in extents:
            if e.state != PageState.DATA:
                out.append(e)
                continue
            lo, hi = e.file_offset, e.file_offset + e.npages * ps
            cuts = []
            for h_start, h_end in _tail(holes, bisect.bisect_right(ends, lo)):
                if h_start >= hi:
                    break
                k0 = max(0, -(-(h_start - lo) // ps))
                k1 = min(e.npages, (h_end - lo) // ps)
                if k1 > k0:
                    cuts.append((k0, k1, {"state": PageState.HOLE, "file_offset": -1}))
            out += _split(e, cuts, ps)
        return out

    def _file_holes(self) -> list[tuple[int, int]]:
        holes: list[tuple[int, int]] = []
        off = 0
        try:
            while off < self.file_size:
                start = os.lseek(self._fd, off, os.SEEK_HOLE)
                if start >= self.file_size:
                    break
                try:
                    off = os.lseek(self._fd, start, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:  # ENXIO: no data after start
                        raise
                    off = self.file_size
                holes.append((start, off))
        except OSError as e:
            self._warn(f"cannot look for sparse-file holes ({e.strerror}); none assumed")
            return []
        return holes

    def _split_mappings(self, extents: list[Extent]) -> list[Extent]:
        """Label process-core pages by NT_FILE: a mapped file (or shmem for shared anonymous
        memory) gives ``MapFlags.FILE`` and its path; pages no entry covers are private anon."""
        ps = self.page_size
        maps = sorted(self.mapped_files)
        for prev, cur in itertools.pairwise(maps):
            if cur.start < prev.end:  # VMAs never overlap: a damaged note
                raise self._error(
                    f"NT_FILE maps {cur.path} at [{cur.start:#x}, {cur.end:#x}), overlapping "
                    f"{prev.path} at [{prev.start:#x}, {prev.end:#x})",
                    next(n.desc_offset for n in self.notes if n.n_type == NT_FILE),
                )
        ends = [m.end for m in maps]
        out = []
        for e in extents:
            lo, hi = e.addr, e.end_addr(ps)
            cuts = []
            for m in _tail(maps, bisect.bisect_right(ends, lo)):
                if m.start >= hi:
                    break
                k0 = max(0, -(-(m.start - lo) // ps))
                k1 = min(e.npages, -(-(m.end - lo) // ps))
                if k1 > k0:
                    flags = MapFlags.FILE
                    if m.path.startswith(_SHARED_ANON_PREFIXES):
                        flags |= MapFlags.SHARED
                    cuts.append((k0, k1, {"flags": flags, "label": m.path}))
            out += _split(e, cuts, ps, {"flags": MapFlags.ANON, "label": "anon"})
        return out

    # -- reporting --------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Producer, class, byte order, vCPUs or threads, and every PT_LOAD."""
        counts = Counter(n.name for n in self.notes)
        prstatus = sum(n.name == "CORE" and n.n_type == NT_PRSTATUS for n in self.notes)
        out: dict[str, Any] = {
            "producer": self.producer,
            "class": self.bits,
            "byte_order": "little" if self.endian == "<" else "big",
            "e_machine": self.e_machine,
            "address_space": self.address_space,
            "program_headers": self.phnum,
            "pn_xnum": self.pn_xnum,
            "notes": dict(counts),
        }
        if self.producer == "qemu":
            out["vcpus"] = counts["QEMU"]
            out["paging"] = self.paging
        elif self.producer == "vbox":
            out["vcpus"] = counts["VBCPU"] + counts["VBOXCPU"]
        elif self.producer == "process":
            out["threads"] = prstatus
            out["mapped_files"] = len(self.mapped_files)
        else:
            out["vcpus"] = prstatus
        fields = ("p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz")
        out["segments"] = [
            {"index": s.ndx, **{f: getattr(s, f) for f in fields}} for s in self.segments
        ]
        return out


def _split(
    e: Extent,
    cuts: list[tuple[int, int, dict[str, Any]]],
    ps: int,
    rest: dict[str, Any] | None = None,
) -> list[Extent]:
    """Cut ``e`` at sorted, disjoint page ranges ``(k0, k1, changes)``; the gaps get ``rest``."""
    out = []
    pos = 0

    def piece(k0: int, k1: int, changes: dict[str, Any]) -> None:
        if k1 > k0:
            off = e.file_offset + k0 * ps if e.file_offset >= 0 else -1
            fields = {"addr": e.addr + k0 * ps, "npages": k1 - k0, "file_offset": off}
            out.append(e._replace(**{**fields, **changes}))

    for k0, k1, changes in cuts:
        k0 = max(k0, pos)
        piece(pos, k0, rest or {})
        piece(k0, k1, changes)
        pos = max(pos, k1)
    piece(pos, e.npages, rest or {})
    return out


def _tail(items: list[T], start: int) -> Iterator[T]:
    """``items[start:]`` without copying it: a copy (or an islice) per extent is quadratic."""
    return map(items.__getitem__, range(start, len(items)))


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _subtract(lo: int, hi: int, merged: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [lo, hi) outside the sorted, disjoint ``merged`` intervals."""
    out = []
    i = max(0, bisect.bisect_right(merged, (lo, lo)) - 1)
    for m_lo, m_hi in _tail(merged, i):
        if m_lo >= hi:
            break
        if m_hi <= lo:
            continue
        if m_lo > lo:
            out.append((lo, m_lo))
        lo = max(lo, m_hi)
    if lo < hi:
        out.append((lo, hi))
    return out
