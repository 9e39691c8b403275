"""Which pages KSM would scan: the kernel's eligibility rules, applied to extents.

KSM scans present, private anonymous pages of VM_MERGEABLE VMAs that are not shared, hugetlb
or special (``mm/ksm.c``: ``vma_ksm_compatible()``, and ``folio_walk_start`` accepting only
anonymous folios), and never a PTE mapping the shared zero page. A dump records these facts
to different depths (:class:`~ksm_analyze.pages.MapFlags`): guest dumps none, process cores
file-backed or not, live-process snapshots all of them. Each rule applies where the fact is
known; the first rule that matches names the exclusion.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .pages import Choice, Extent, MapFlags, PageState

if TYPE_CHECKING:
    from .hashing.stage1 import Fingerprints

__all__ = ["NO_BYTES_RULES", "RULES", "ScanMask", "Scope", "excluded_by", "opted_out",
           "scan_mask", "split_maps_zero_subpages"]


class Scope(Choice):
    """What KSM is assumed to scan."""

    MERGEABLE = "mergeable"
    """VMAs marked mergeable (``mg``: MADV_MERGEABLE), what KSM does today."""
    ANON = "anon"
    """Every compatible VMA, as if the process called ``prctl(PR_SET_MEMORY_MERGE, 1)``."""
    ALL = "all"
    """Every page whose bytes are known: an upper bound, not something KSM can do."""


RULES: dict[str, str] = {
    "not_present": "not in memory: never touched (a hole)",
    "swapped": "swapped out",
    "not_saved": "no bytes saved: MMIO, unreadable ([vvar], device) or cut from the dump",
    "excluded": "left out by the dump's filter (kdump dump level)",
    "shared": "shared mapping: MAP_SHARED, shmem, memfd, SysV",
    "special": "VM_IO/VM_PFNMAP/VM_MIXEDMAP/VM_DONTEXPAND mapping",
    "hugetlb": "hugetlbfs page",
    "zero_pfn": "maps the kernel's zero page (read, never written)",
    "file_backed": "page-cache page of a mapped file",
    "thp_zero": "all-zero subpage of a huge page: KSM's split maps it to the zero page",
    "not_mergeable": "VMA not marked mergeable (scope mergeable)",
    "vm_config": "the VM's configuration keeps KSM off its memory (--vm-config: the "
                 "vm_configs record says why)",
}
"""Every exclusion rule, in the order they are tried, with what it means."""
NO_BYTES_RULES = ("not_present", "swapped", "not_saved", "excluded")
"""Rules for pages whose bytes the dump does not hold (counted per state already); the
others make up ``ineligible_pages``."""


def excluded_by(extent: Extent, scope: Scope) -> str | None:
    """The rule (a key of :data:`RULES`) that keeps KSM off ``extent``, or None if none does."""
    state, flags = extent.state, extent.flags
    if state == PageState.HOLE:
        return "not_present"
    if state == PageState.EXCLUDED:
        return "excluded"
    if state == PageState.NOT_SAVED:
        return "swapped" if flags & MapFlags.SWAPPED else "not_saved"
    if scope is Scope.ALL or not flags:  # no flag: no rule below applies (Flag & is slow:
        return None  # a migration stream has an extent per run of zero or data pages)
    if flags & MapFlags.SHARED:
        return "shared"
    if flags & MapFlags.SPECIAL:
        return "special"
    if flags & MapFlags.HUGETLB:
        return "hugetlb"
    if flags & MapFlags.ZERO_PFN:  # before FILE: pagemap flags the huge zero page as file
        return "zero_pfn"
    if flags & MapFlags.FILE:
        return "file_backed"
    if scope is Scope.MERGEABLE and flags & MapFlags.VMFLAGS and not flags & MapFlags.MERGEABLE:
        return "not_mergeable"
    return None


def split_maps_zero_subpages(kernel_release: str | None) -> bool:
    """Whether splitting a THP maps its all-zero subpages to the shared zero page.

    Linux 6.12 added this ("mm: remap unused subpages to shared zeropage when splitting
    isolated thp"). KSM splits a THP to merge any of its subpages, so from then on the
    zero-filled subpages of THPs are freed by the split instead of merged by KSM: they get
    no rmap_item and count in no KSM counter. Measured on 6.18 with QEMU guests' THP-backed
    RAM (VALIDATION.md).
    """
    if not kernel_release:
        return False
    numbers = re.match(r"(\d+)\.(\d+)", kernel_release)
    return numbers is not None and (int(numbers[1]), int(numbers[2])) >= (6, 12)


@dataclass(frozen=True)
class ScanMask:
    """Which pages of one input KSM scans under a scope, and why it leaves the others.

    Attributes:
        scanned: bool per fingerprint row: eligible, and not an all-zero THP subpage that
            KSM's split frees (rule ``thp_zero``).
        zero_state_pages: pages the format marks all zero (no rows) that KSM scans.
        excluded: pages kept from the scan per rule, every key of :data:`RULES`.
    """

    scanned: np.ndarray
    zero_state_pages: int
    excluded: dict[str, int]

    @property
    def ineligible_pages(self) -> int:
        """Pages whose bytes are known but KSM would not scan."""
        return sum(n for rule, n in self.excluded.items() if rule not in NO_BYTES_RULES)


def scan_mask(fp: Fingerprints, scope: Scope) -> ScanMask:
    """Apply the rules to one input's extents and stored pages (stage 1 is enough)."""
    excluded = dict.fromkeys(RULES, 0)
    zero_state = 0
    for e in fp.extents:
        rule = excluded_by(e, scope)
        if rule:
            excluded[rule] += e.npages
        elif e.state == PageState.ZERO:
            zero_state += e.npages
    eligible = _rows_where(fp, lambda e: excluded_by(e, scope) is None)
    thp_zero = np.zeros(len(fp.addrs), bool)
    if scope is not Scope.ALL and split_maps_zero_subpages(fp.info.get("kernel")):
        thp_zero = eligible & fp.zero & _rows_where(fp, lambda e: bool(e.flags & MapFlags.THP))
    excluded["thp_zero"] = int(np.count_nonzero(thp_zero))
    return ScanMask(eligible & ~thp_zero, zero_state, excluded)


def _rows_where(fp: Fingerprints, test: Callable[[Extent], bool]) -> np.ndarray:
    """Bool per stored page: does ``test`` hold for the DATA extent holding it."""
    data = [e for e in fp.extents if e.state == PageState.DATA]
    ok = np.array([test(e) for e in data], dtype=bool)
    if ok.all() or not ok.any():
        return np.full(len(fp.addrs), bool(ok.all()))
    starts = np.array([e.addr for e in data], dtype=np.uint64)
    return ok[np.searchsorted(starts, fp.addrs, side="right") - 1]


def opted_out(mask: ScanMask) -> ScanMask:
    """``mask`` of an input KSM does not scan at all (rule ``vm_config``: its configuration
    keeps KSM off it): every page the other rules left to KSM, the all-zero THP subpages
    included, counts under ``vm_config``; the other rules' counts stay (tried first)."""
    left = int(np.count_nonzero(mask.scanned)) + mask.zero_state_pages + mask.excluded["thp_zero"]
    excluded = {**mask.excluded, "thp_zero": 0, "vm_config": left}
    return ScanMask(np.zeros_like(mask.scanned), 0, excluded)
