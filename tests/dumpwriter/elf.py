"""Build ELF core dumps with ``struct``: QEMU, VirtualBox, kernel vmcore and process cores.

``make_elf_core`` lays a file out as QEMU's ``dump/dump.c`` does (ELF header, program
headers, notes, then the memory, not page-aligned) or, with ``unaligned=False``, as the
kernel's ``fs/binfmt_elf.c`` does (memory starts page-aligned).  ``make_xen_core`` writes the
section-only layout of ``xl dump-core`` (xen ``docs/misc/dump-core-format.txt``).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

__all__ = ["ElfLayout", "Seg", "make_elf_core", "make_xen_core", "note_bytes"]

PAGE = 4096
ET_CORE, PT_LOAD, PT_NOTE = 4, 1, 4
NT_PRSTATUS, NT_PRPSINFO, NT_FILE = 1, 3, 0x46494C45
EM_X86_64 = 62
PRODUCERS = ("qemu", "vbox", "process", "kernel", "none")


class Seg(NamedTuple):
    """One PT_LOAD: ``data`` is stored (p_filesz), ``memsz`` defaults to ``len(data)``."""

    addr: int
    """p_paddr for guest dumps, p_vaddr for process cores."""
    data: bytes = b""
    memsz: int | None = None
    vaddr: int | None = None
    """Guest dumps only: p_vaddr (a -p dump's virtual address); defaults to ``addr``."""
    shares: tuple[int, int, int] | None = None
    """(segment, byte offset, length): store nothing, point at those bytes of an earlier
    segment instead, as ``dump-guest-memory -p`` does for a page mapped twice."""


class ElfLayout(NamedTuple):
    """Where the writer put things, for tests that corrupt a field afterwards."""

    phoff: int
    phentsize: int
    phnum: int
    shoff: int
    note_offset: int
    note_size: int
    p_offsets: list[int]
    """p_offset of each segment given (PT_LOAD ``i`` is program header ``i + 1``)."""
    size: int


def note_bytes(name: str, n_type: int, desc: bytes, endian: str = "<", align: int = 4) -> bytes:
    """One ELF note: n_namesz (with the NUL), n_descsz, n_type, then padded name and desc."""
    raw = name.encode() + b"\0"

    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % align)

    return struct.pack(endian + "III", len(raw), len(desc), n_type) + pad(raw) + pad(desc)


def _nt_file(entries: Sequence[tuple[int, int, int, str]], word: str, endian: str) -> bytes:
    """NT_FILE: long count, page_size; {start, end, file_ofs (pages)}[count]; paths."""
    head = struct.pack(endian + 2 * word, len(entries), PAGE)
    table = b"".join(struct.pack(endian + 3 * word, s, e, o) for s, e, o, _ in entries)
    return head + table + b"".join(p.encode() + b"\0" for *_, p in entries)


def _producer_notes(
    producer: str, vcpus: int, elfclass: int, endian: str, nt_file: Sequence | None
) -> bytes:
    prstatus = b"\0" * (336 if elfclass == 64 else 144)
    word = "Q" if elfclass == 64 else "I"
    if producer == "qemu":
        # dump/dump.c: a CORE NT_PRSTATUS per vCPU, then a QEMU note (QEMUCPUState) per vCPU.
        return b"".join(note_bytes("CORE", NT_PRSTATUS, prstatus, endian) for _ in range(vcpus)) + (
            b"".join(note_bytes("QEMU", 0, b"\0" * 0x1B8, endian) for _ in range(vcpus))
        )
    if producer == "vbox":
        # DBGFCoreWrite.cpp: DBGFCOREDESCRIPTOR (magic 0xc01ac0de) then a VBCPU per vCPU,
        # 8-byte aligned.
        desc = struct.pack(endian + "6I", 0xC01AC0DE, 1, 24, 0x07000000, 1, vcpus)
        cpu = b"\0" * 0x400
        return note_bytes("VBCORE", 0xB00, desc, endian, 8) + b"".join(
            note_bytes("VBCPU", 0xB01, cpu, endian, 8) for _ in range(vcpus)
        )
    if producer == "process":
        notes = note_bytes("CORE", NT_PRSTATUS, prstatus, endian)
        notes += note_bytes("CORE", NT_PRPSINFO, b"\0" * 136, endian)
        if nt_file is not None:
            notes += note_bytes("CORE", NT_FILE, _nt_file(nt_file, word, endian), endian)
        return notes
    if producer == "kernel":
        info = b"OSRELEASE=6.1.0\nPAGESIZE=4096\n"
        return b"".join(note_bytes("CORE", NT_PRSTATUS, prstatus, endian) for _ in range(vcpus)) + (
            note_bytes("VMCOREINFO", 0, info, endian)
        )
    if producer == "none":
        return b""
    raise ValueError(f"producer must be one of {PRODUCERS}, not {producer!r}")


def make_elf_core(
    path: str | os.PathLike[str],
    segments: Iterable[Seg | tuple],
    *,
    elfclass: int = 64,
    endian: str = "<",
    producer: str = "qemu",
    nt_file: Sequence[tuple[int, int, int, str]] | None = None,
    notes: Iterable[tuple[str, int, bytes]] = (),
    unaligned: bool = True,
    pn_xnum: bool = False,
    vcpus: int = 1,
    sparse: bool = False,
) -> ElfLayout:
    """Write an ELF core holding ``segments``.

    Args:
        path: output file.
        segments: :class:`Seg` or ``(address, bytes[, memsz])`` tuples, one PT_LOAD each.
        elfclass: 32 or 64.
        endian: ``"<"`` or ``">"``.
        producer: which notes to write: ``qemu``, ``vbox``, ``process``, ``kernel`` or ``none``.
        nt_file: process cores: ``(start, end, file_ofs_pages, path)`` mappings for NT_FILE.
        notes: extra ``(name, type, desc)`` notes.
        unaligned: store memory right after the notes (QEMU); else page-aligned (kernel).
        pn_xnum: write e_phnum = PN_XNUM and the real count in section header 0.
        vcpus: CPU notes to write.
        sparse: skip writing all-zero pages (leaves holes; needs ``unaligned=False``).

    Returns:
        The layout, for tests that corrupt a field afterwards.
    """
    segs = [s if isinstance(s, Seg) else Seg(*s) for s in segments]
    if sparse and unaligned:
        raise ValueError("sparse needs unaligned=False: holes are whole file blocks")
    is64 = elfclass == 64
    ehsize, phentsize, shentsize = (64, 56, 64) if is64 else (52, 32, 40)
    phnum = len(segs) + 1
    phoff = ehsize
    shoff = phoff + phnum * phentsize if pn_xnum else 0
    note_offset = (shoff + shentsize) if pn_xnum else phoff + phnum * phentsize
    note = _producer_notes(producer, vcpus, elfclass, endian, nt_file)
    note += b"".join(note_bytes(n, t, d, endian) for n, t, d in notes)
    pos = note_offset + len(note)

    p_offsets: list[int] = []
    for s in segs:
        if s.shares is not None:
            idx, off, _ = s.shares
            p_offsets.append(p_offsets[idx] + off)
            continue
        if not unaligned:
            pos = -(-pos // PAGE) * PAGE
        p_offsets.append(pos if s.data else 0)
        pos += len(s.data)
    size = pos

    # Elf_Ehdr: e_ident, e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags,
    # e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx.
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if endian == "<" else 2, 1]) + b"\0" * 9
    ehdr_fmt = endian + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
    e_phnum = 0xFFFF if pn_xnum else phnum
    ehdr = ident + struct.pack(
        ehdr_fmt, ET_CORE, EM_X86_64, 1, 0, phoff, shoff, 0, ehsize, phentsize, e_phnum,
        shentsize, 1 if pn_xnum else 0, 0,
    )  # fmt: skip

    def phdr(p_type: int, off: int, vaddr: int, paddr: int, filesz: int, memsz: int) -> bytes:
        if is64:
            return struct.pack(endian + "IIQQQQQQ", p_type, 4, off, vaddr, paddr, filesz, memsz, 0)
        return struct.pack(endian + "IIIIIIII", p_type, off, vaddr, paddr, filesz, memsz, 4, 0)

    phdrs = [phdr(PT_NOTE, note_offset, 0, 0, len(note), 0)]
    for s, off in zip(segs, p_offsets, strict=True):
        filesz = s.shares[2] if s.shares is not None else len(s.data)
        memsz = filesz if s.memsz is None else s.memsz
        if producer == "process":
            vaddr, paddr = s.addr, 0
        else:
            vaddr, paddr = (s.addr if s.vaddr is None else s.vaddr), s.addr
        phdrs.append(phdr(PT_LOAD, off, vaddr, paddr, filesz, memsz))

    with open(path, "wb") as f:
        f.write(ehdr)
        f.write(b"".join(phdrs))
        if pn_xnum:  # section header 0: sh_info holds the real e_phnum (gABI extended numbering)
            sh_fmt = endian + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
            f.write(struct.pack(sh_fmt, 0, 0, 0, 0, 0, 0, 0, phnum, 0, 0))
        f.write(note)
        for s, off in zip(segs, p_offsets, strict=True):
            if s.shares is not None or not s.data:
                continue
            f.seek(off)
            if not sparse:
                f.write(s.data)
                continue
            for i in range(0, len(s.data), PAGE):
                chunk = s.data[i : i + PAGE]
                if chunk.count(0) == len(chunk):
                    f.seek(len(chunk), os.SEEK_CUR)  # never written: a hole, as dump_skip leaves
                else:
                    f.write(chunk)
        f.truncate(size)
    return ElfLayout(phoff, phentsize, phnum, shoff, note_offset, len(note), p_offsets, size)


def make_xen_core(path: str | os.PathLike[str], pages: Sequence[bytes] = (b"\0" * PAGE,)) -> None:
    """Write a minimal HVM ``xl dump-core``: ELF64, sections only, no program headers."""
    names = [b"", b".shstrtab", b".note.Xen", b".xen_prstatus", b".xen_pages", b".xen_pfn"]
    strtab = b"\0".join(names) + b"\0"
    name_off = [strtab.index(n + b"\0") if n else 0 for n in names]
    # .note.Xen: header note (xch_magic 0xF00FEBEE = HVM, nr_vcpus, nr_pages, page_size).
    header = struct.pack("<QQQQ", 0xF00FEBEE, 1, len(pages), PAGE)
    note = note_bytes("Xen", 0x2000001, header)
    body = [
        strtab,
        note,
        b"\0" * 64,
        b"".join(pages),
        struct.pack(f"<{len(pages)}Q", *range(len(pages))),
    ]
    shoff = 64
    data_off = shoff + 64 * len(names)
    shdrs = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    offsets = []
    pos = data_off
    for b in body:
        offsets.append(pos)
        pos += len(b)
    types = [3, 7, 1, 1, 1]  # SHT_STRTAB, SHT_NOTE, SHT_PROGBITS...
    for i, b in enumerate(body):
        shdrs.append(
            struct.pack(
                "<IIQQQQIIQQ", name_off[i + 1], types[i], 0, 0, offsets[i], len(b), 0, 0, 8, 0
            )
        )
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", ET_CORE, EM_X86_64, 1, 0, 0, shoff, 0, 64, 56, 0, 64, len(names), 1
    )
    with open(path, "wb") as f:
        f.write(ehdr + b"".join(shdrs) + b"".join(body))
