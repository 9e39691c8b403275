"""Which pages KSM scans: the scopes and the exclusion rules, on hand-built inputs.

Expected values come from KSM's rules (shared/reference/ksm-semantics.md, section 1.8, and
the THP split rule of section 0), worked out by hand for each page below:

* ``ksm_compatible()`` rejects a whole VMA that is VM_SHARED/VM_MAYSHARE, VM_SPECIAL
  (VM_IO, VM_PFNMAP, ...) or VM_HUGETLB, before any page of it is looked at;
* the scan accepts only a present anonymous folio: never a page-cache page, a never-faulted
  or swapped-out page, or a PTE mapping the shared zero page;
* KSM scans only VM_MERGEABLE VMAs (``--scope mergeable``); ``prctl(PR_SET_MEMORY_MERGE)``
  makes every compatible VMA mergeable (``--scope anon``); ``--scope all`` is the upper
  bound, every page whose bytes the dump holds;
* since Linux 6.12 splitting a THP (which KSM does to merge a subpage) remaps its zero-filled
  subpages to the shared zero page: they are freed, not merged;
* a guest dump records no mapping facts: every page counts, whatever the scope.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLES, runner

from ksm_analyze.cli import app
from ksm_analyze.eligibility import (
    NO_BYTES_RULES,
    RULES,
    Scope,
    excluded_by,
    scan_mask,
    split_maps_zero_subpages,
)
from ksm_analyze.formats import DumpFormat
from ksm_analyze.hashing.stage1 import Fingerprints
from ksm_analyze.options import ScanOptions
from ksm_analyze.pages import Extent, MapFlags, PageState

PS = 4096
F = MapFlags
VMA = F.VMFLAGS  # a live-process snapshot: the VMA's flags are facts
MERGEABLE_ANON = VMA | F.ANON | F.MERGEABLE


# -- Scope ---------------------------------------------------------------------------------------


def test_scope_names_parse_in_any_case():
    assert Scope.parse("mergeable") is Scope.MERGEABLE
    assert Scope.parse("ANON") is Scope.ANON
    assert Scope.parse("All") is Scope.ALL
    assert Scope.parse(Scope.ANON) is Scope.ANON
    assert ScanOptions(scope="anon").scope is Scope.ANON
    assert ScanOptions().scope is Scope.MERGEABLE  # what KSM does without prctl


def test_an_unknown_scope_names_the_valid_ones():
    with pytest.raises(ValueError) as e:
        Scope.parse("private")
    assert str(e.value) == "unknown scope 'private'; choose one of: mergeable, anon, all"
    with pytest.raises(ValueError, match="unknown scope 'everything'"):
        ScanOptions(scope="everything")


def test_an_unknown_scope_on_the_command_line_is_one_line_and_exit_2():
    r = runner.invoke(app, ["scan", SAMPLES[0], "--scope", "private", "-q"])
    assert r.exit_code == 2
    assert r.stderr.strip() == ("Error: unknown scope 'private'; choose one of: mergeable, "
                                "anon, all")


# -- One rule per page ------------------------------------------------------------------------


def _extent(flags: MapFlags, state: PageState = PageState.DATA, npages: int = 1) -> Extent:
    return Extent(0x1000, npages, state, flags=flags)


@pytest.mark.parametrize(("state", "flags", "rule"), [
    # VMA-level rejections come first: the page is never looked at.
    (PageState.DATA, VMA | F.FILE | F.SHARED | F.MERGEABLE, "shared"),  # shmem / MAP_SHARED
    (PageState.DATA, VMA | F.ANON | F.SHARED | F.MERGEABLE, "shared"),
    (PageState.DATA, MERGEABLE_ANON | F.SPECIAL, "special"),
    (PageState.DATA, VMA | F.HUGETLB | F.MERGEABLE, "hugetlb"),
    # Page-level: only a present anonymous folio is scanned.
    (PageState.DATA, MERGEABLE_ANON | F.ZERO_PFN, "zero_pfn"),
    (PageState.DATA, VMA | F.FILE | F.ZERO_PFN | F.MERGEABLE, "zero_pfn"),  # huge zero page
    (PageState.DATA, VMA | F.FILE | F.MERGEABLE, "file_backed"),  # private file mapping
    (PageState.DATA, F.FILE, "file_backed"),  # a process core's NT_FILE mapping
    (PageState.HOLE, MERGEABLE_ANON, "not_present"),  # never faulted in
    (PageState.NOT_SAVED, MERGEABLE_ANON | F.SWAPPED, "swapped"),
    (PageState.NOT_SAVED, MERGEABLE_ANON, "not_saved"),
    (PageState.EXCLUDED, F(0), "excluded"),
    # Scanned:
    (PageState.DATA, MERGEABLE_ANON, None),
    (PageState.ZERO, MERGEABLE_ANON, None),  # a written zero page is an anonymous folio
    (PageState.DATA, MERGEABLE_ANON | F.THP, None),  # THP subpages are scanned
    (PageState.DATA, F(0), None),  # a guest dump: no mapping facts
    (PageState.DATA, F.ANON, None),  # a process core: mergeability not recorded
])
def test_each_page_is_kept_by_the_rule_ksm_applies_first(state, flags, rule):
    assert excluded_by(_extent(flags, state), Scope.MERGEABLE) == rule
    assert excluded_by(_extent(flags, state), Scope.ANON) == rule


def test_a_vma_not_marked_mergeable_is_scanned_only_under_prctl():
    private_anon = _extent(VMA | F.ANON)
    assert excluded_by(private_anon, Scope.MERGEABLE) == "not_mergeable"
    assert excluded_by(private_anon, Scope.ANON) is None
    assert excluded_by(private_anon, Scope.ALL) is None
    # Still not mergeable even under prctl: a shared VMA is not compatible.
    assert excluded_by(_extent(VMA | F.ANON | F.SHARED), Scope.ANON) == "shared"


def test_scope_all_keeps_only_the_pages_with_no_bytes():
    for flags in (VMA | F.SHARED, VMA | F.SPECIAL, VMA | F.HUGETLB, VMA | F.FILE,
                  VMA | F.ANON | F.ZERO_PFN, VMA | F.ANON):
        assert excluded_by(_extent(flags), Scope.ALL) is None, flags
    assert excluded_by(_extent(F(0), PageState.HOLE), Scope.ALL) == "not_present"
    assert excluded_by(_extent(F.SWAPPED, PageState.NOT_SAVED), Scope.ALL) == "swapped"
    assert excluded_by(_extent(F(0), PageState.EXCLUDED), Scope.ALL) == "excluded"


def test_every_rule_is_described_and_the_no_bytes_rules_are_rules():
    assert set(NO_BYTES_RULES) <= set(RULES)
    assert all(RULES.values())


# -- scan_mask on a hand-built process snapshot ----------------------------------------------

# (flags, state, pages, zero pages among the stored ones): one VMA per line, 16 pages apart.
_VMAS = [
    (MERGEABLE_ANON, PageState.DATA, 3, 1),            # A: scanned (one written zero page)
    (VMA | F.ANON, PageState.DATA, 2, 0),              # B: not marked mergeable
    (VMA | F.FILE | F.MERGEABLE, PageState.DATA, 2, 0),  # C: private file mapping
    (VMA | F.FILE | F.SHARED | F.MERGEABLE, PageState.DATA, 1, 0),  # D: shmem
    (MERGEABLE_ANON | F.SPECIAL, PageState.DATA, 1, 0),  # E: VM_PFNMAP
    (VMA | F.HUGETLB | F.MERGEABLE, PageState.DATA, 2, 0),  # F: hugetlbfs
    (MERGEABLE_ANON | F.ZERO_PFN, PageState.DATA, 1, 1),  # G: maps the zero page
    (MERGEABLE_ANON, PageState.HOLE, 2, 0),            # H: never touched
    (MERGEABLE_ANON | F.SWAPPED, PageState.NOT_SAVED, 1, 0),  # I: swapped out
    (MERGEABLE_ANON, PageState.NOT_SAVED, 1, 0),       # J: unreadable
    (MERGEABLE_ANON, PageState.EXCLUDED, 1, 0),        # K: filtered out
    (MERGEABLE_ANON, PageState.ZERO, 2, 0),            # L: zero pages the format marks
    (MERGEABLE_ANON | F.THP, PageState.DATA, 4, 2),    # M: a THP's subpages, two all zero
]
_LETTERS = "ABCDEFGHIJKLM"


def _prints(vmas, *, kernel: str | None = None, seed: int = 0,
            fmt: DumpFormat = DumpFormat.SNAPSHOT) -> tuple[Fingerprints, list[str]]:
    """Fingerprints of ``vmas``, rows shuffled (stage 1 gives them in no order), and the
    letter of the VMA of each row."""
    extents, addrs, prefix, owner = [], [], [], []
    for k, (flags, state, npages, zeros) in enumerate(vmas):
        start = 0x10000 + k * 16 * PS
        extents.append(Extent(start, npages, state, flags=flags))
        if state == PageState.DATA:
            addrs += [start + i * PS for i in range(npages)]
            prefix += [0] * zeros + [1000 + len(prefix) + i for i in range(npages - zeros)]
            owner += [_LETTERS[k]] * npages
    order = np.random.default_rng(seed).permutation(len(addrs))
    states = {s: sum(n for _, st, n, _ in vmas if st == s) for s in PageState}
    fp = Fingerprints(
        path="proc.snap", format=fmt, address_space="virtual", page_size=PS,
        prefix_bytes=128, extents=extents, info={"kernel": kernel} if kernel else {},
        warnings=[], addrs=np.array(addrs, np.uint64)[order],
        prefix=np.array(prefix, np.uint64)[order], state_pages=states)
    return fp, [owner[i] for i in order]


def _scanned_by_vma(fp: Fingerprints, owner: list[str], scope: Scope) -> dict[str, int]:
    mask = scan_mask(fp, scope)
    assert mask.scanned.dtype == bool and len(mask.scanned) == len(fp.addrs)
    counts: dict[str, int] = {}
    for letter, scanned in zip(owner, mask.scanned, strict=True):
        counts[letter] = counts.get(letter, 0) + int(scanned)
    return {k: n for k, n in counts.items() if n}


_NO_BYTES = {"not_present": 2, "swapped": 1, "not_saved": 1, "excluded": 1}
_INCOMPATIBLE = {"shared": 1, "special": 1, "hugetlb": 2, "zero_pfn": 1, "file_backed": 2}


@pytest.mark.parametrize("seed", [0, 1])
def test_scope_mergeable_scans_the_mergeable_anonymous_pages(seed):
    fp, owner = _prints(_VMAS, seed=seed)
    assert _scanned_by_vma(fp, owner, Scope.MERGEABLE) == {"A": 3, "M": 4}
    mask = scan_mask(fp, Scope.MERGEABLE)
    assert mask.zero_state_pages == 2  # L
    assert mask.excluded == {**dict.fromkeys(RULES, 0), **_NO_BYTES, **_INCOMPATIBLE,
                             "not_mergeable": 2}
    assert mask.ineligible_pages == 1 + 1 + 2 + 1 + 2 + 2  # not the pages with no bytes


def test_scope_anon_adds_the_vmas_not_marked_mergeable():
    fp, owner = _prints(_VMAS)
    assert _scanned_by_vma(fp, owner, Scope.ANON) == {"A": 3, "B": 2, "M": 4}
    mask = scan_mask(fp, Scope.ANON)
    assert mask.zero_state_pages == 2
    assert mask.excluded == {**dict.fromkeys(RULES, 0), **_NO_BYTES, **_INCOMPATIBLE}
    assert mask.ineligible_pages == 7


def test_scope_all_scans_every_stored_page():
    fp, owner = _prints(_VMAS)
    assert _scanned_by_vma(fp, owner, Scope.ALL) == {
        "A": 3, "B": 2, "C": 2, "D": 1, "E": 1, "F": 2, "G": 1, "M": 4}
    mask = scan_mask(fp, Scope.ALL)
    assert mask.zero_state_pages == 2
    assert mask.excluded == {**dict.fromkeys(RULES, 0), **_NO_BYTES}
    assert mask.ineligible_pages == 0


# -- THP zero subpages ------------------------------------------------------------------------


@pytest.mark.parametrize(("release", "splits"), [
    ("6.12.0", True), ("6.18.0-rc1", True), ("7.0.1", True), ("6.11.9", False),
    ("5.15.0-91-generic", False), ("4.19.0", False), (None, False), ("", False),
    ("unknown", False),
])
def test_the_split_frees_zero_subpages_from_linux_6_12(release, splits):
    assert split_maps_zero_subpages(release) is splits


def test_zero_subpages_of_a_thp_are_freed_by_the_split_on_new_kernels():
    # M holds 4 THP subpages, 2 all zero; A holds a written zero page that is not in a THP.
    new, owner = _prints(_VMAS, kernel="6.18.0")
    mask = scan_mask(new, Scope.MERGEABLE)
    assert mask.excluded["thp_zero"] == 2
    assert _scanned_by_vma(new, owner, Scope.MERGEABLE) == {"A": 3, "M": 2}
    zero_rows = new.prefix == 0
    in_m = np.array([o == "M" for o in owner])
    assert not mask.scanned[zero_rows & in_m].any()
    assert mask.scanned[zero_rows & (np.array(owner) == "A")].all()  # KSM merges it
    assert mask.ineligible_pages == 1 + 1 + 2 + 1 + 2 + 2 + 2
    # Before 6.12, and under the upper bound, they are scanned (and merged) like any page.
    old, owner = _prints(_VMAS, kernel="6.11.0")
    assert scan_mask(old, Scope.MERGEABLE).excluded["thp_zero"] == 0
    assert _scanned_by_vma(old, owner, Scope.MERGEABLE) == {"A": 3, "M": 4}
    assert scan_mask(new, Scope.ALL).excluded["thp_zero"] == 0


# -- Dumps that record fewer facts -----------------------------------------------------------


def test_a_guest_dump_counts_every_stored_page_whatever_the_scope():
    vmas = [(F(0), PageState.DATA, 3, 1), (F(0), PageState.ZERO, 2, 0),
            (F(0), PageState.NOT_SAVED, 1, 0), (F(0), PageState.DATA, 1, 0)]
    fp, _ = _prints(vmas, fmt=DumpFormat.ELF)
    for scope in Scope:
        mask = scan_mask(fp, scope)
        assert mask.scanned.all(), scope
        assert mask.zero_state_pages == 2
        assert mask.excluded == {**dict.fromkeys(RULES, 0), "not_saved": 1}
        assert mask.ineligible_pages == 0


def test_a_process_core_knows_file_or_anon_only():
    # No VMFLAGS: mergeability unknown, so anonymous pages count under mergeable too (the
    # analysis warns); file-backed pages are never KSM's.
    vmas = [(F.ANON, PageState.DATA, 3, 0), (F.FILE, PageState.DATA, 2, 0),
            (F.ANON, PageState.HOLE, 4, 0)]
    fp, owner = _prints(vmas, fmt=DumpFormat.ELF)
    for scope in (Scope.MERGEABLE, Scope.ANON):
        assert _scanned_by_vma(fp, owner, scope) == {"A": 3}
        assert scan_mask(fp, scope).excluded == {**dict.fromkeys(RULES, 0), "file_backed": 2,
                                                 "not_present": 4}
    assert _scanned_by_vma(fp, owner, Scope.ALL) == {"A": 3, "B": 2}
