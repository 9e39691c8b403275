"""The vocabulary shared by readers, fingerprinting and the KSM model.

A reader describes a dump as :class:`Extent` runs of pages, each in one :class:`PageState`,
and hands out the stored bytes as :class:`PageBatch` blocks of whole pages.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Self

import numpy as np

__all__ = ["PAGE_SIZE", "Choice", "Extent", "MapFlags", "PageBatch", "PageState",
           "check_page_size"]

PAGE_SIZE = 4096
"""The default analysis page: x86-64's base page, the unit KSM merges."""


def check_page_size(page_size: int) -> None:
    """Refuse a page size that is not a power of two of at least 512 (ValueError)."""
    if page_size < 512 or page_size & (page_size - 1):
        raise ValueError(f"page size must be a power of two of at least 512, not {page_size}")


class Choice(enum.Enum):
    """An option with named values (a format, a scope): :meth:`parse` reads what users type."""

    @classmethod
    def parse(cls, name: str | Self) -> Self:
        """Normalise a user-given name; ValueError lists the valid ones."""
        if isinstance(name, cls):
            return name
        try:
            return cls(str(name).lower())
        except ValueError:
            what = cls.__name__.removeprefix("Dump").lower()  # DumpFormat -> format
            valid = ", ".join(str(c.value) for c in cls)
            raise ValueError(f"unknown {what} {name!r}; choose one of: {valid}") from None


class PageState(enum.IntEnum):
    """What a dump says about one page."""

    DATA = 0
    """Bytes are stored; fingerprinting decides from them whether the page is all zero."""
    ZERO = 1
    """The format says the page is all zero (kdump zero descriptor, AVML omitted chunk)."""
    HOLE = 2
    """Stored nowhere and reads as zero: never touched (a sparse hole in a process core)."""
    EXCLUDED = 3
    """Left out of the dump (kdump dump level): content unknown, never counted as zero."""
    NOT_SAVED = 4
    """Address range with no bytes saved: MMIO, ``p_filesz < p_memsz``, unreadable regions."""


class MapFlags(enum.IntFlag):
    """How the host maps an extent's pages: what KSM's eligibility rules look at.

    Guest dumps know none of this (0). Process cores know ANON or FILE (from ``NT_FILE``);
    live-process snapshots know everything, and set VMFLAGS to say the VMA flags are facts.
    """

    ANON = 1 << 0
    """Private anonymous page (an anonymous folio)."""
    FILE = 1 << 1
    """Page-cache page or shared memory (pagemap bit 61, or an ``NT_FILE`` mapping)."""
    VMFLAGS = 1 << 2
    """The VMA's flags (smaps ``VmFlags``) were recorded: MERGEABLE..HUGETLB are facts."""
    MERGEABLE = 1 << 3
    """VM_MERGEABLE (``mg``): ``MADV_MERGEABLE`` or ``PR_SET_MEMORY_MERGE``."""
    SHARED = 1 << 4
    """VM_SHARED or VM_MAYSHARE (``sh``, ``ms``)."""
    SPECIAL = 1 << 5
    """VM_IO, VM_PFNMAP, VM_DONTEXPAND or VM_MIXEDMAP (``io``, ``pf``, ``de``, ``mm``)."""
    HUGETLB = 1 << 6
    """hugetlbfs (``ht``)."""
    ZERO_PFN = 1 << 7
    """Mapped to the kernel's shared zero page: never scanned by KSM."""
    SWAPPED = 1 << 8
    """Swapped out (pagemap bit 62): not in memory, not scanned."""
    THP = 1 << 9
    """Part of a transparent huge page (kpageflags bit 22)."""


class Extent(NamedTuple):
    """A run of consecutive pages that share one state.

    ``file_offset`` is the file offset of the first page when the pages are stored raw and
    back to back (so they can be read through a memory map), and -1 otherwise: compressed
    pages and pages that are not stored at all.
    """

    addr: int
    """Address of the first page: physical for guest dumps, virtual for process cores."""
    npages: int
    state: PageState
    file_offset: int = -1
    label: str = ""
    """Free text for ``info`` and reports: a segment name or a mapped file's path."""
    flags: MapFlags = MapFlags(0)
    """How the host maps these pages, as far as the dump tells (0 for guest dumps)."""

    @property
    def anon(self) -> bool | None:
        """True for private anonymous memory, False for file-backed or shared, None if unknown."""
        if self.flags & MapFlags.FILE:
            return False
        return True if self.flags & MapFlags.ANON else None

    def end_addr(self, page_size: int) -> int:
        """One past the last byte covered by the extent."""
        return self.addr + self.npages * page_size


class PageBatch(NamedTuple):
    """A block of stored pages handed from a reader to fingerprinting."""

    addrs: np.ndarray
    """uint64 address of each page: what ``read_pages`` takes to find a page again."""
    pages: np.ndarray
    """``(n, page_size)`` uint8; may be a read-only view of the file."""
    zero: np.ndarray | None = None
    """bool per page the format itself records as all zero (a kdump zero descriptor); the
    bytes of those rows are not filled in and must not be read. None: no such page."""
