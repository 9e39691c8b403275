"""Firecracker snapshot memory files (``PUT /snapshot/create``, ``mem_file_path``).

Firecracker writes guest memory as its regions back to back, with no header
(firecracker ``src/vmm/src/vstate/memory.rs``: ``dump`` writes every plugged memory slot and
seeks over unplugged ones; ``dump_dirty`` writes the dirty pages of a *diff* snapshot at their
place and seeks over the rest). The file's name is the user's choice and it has no magic, so
the format is always named: ``--format firecracker`` for a full snapshot, ``--format
firecracker_diff`` for a diff one.

Holes: in a full snapshot a hole is memory not plugged (virtio-mem) or never populated: a page
not present (HOLE). In a diff snapshot a hole is a page *unchanged since the previous snapshot*:
its content is in another file, so it is EXCLUDED (content unknown, never counted as zero),
never HOLE (which would say the page is not there at all) or NOT_SAVED (which is for ranges
that are not RAM, such as MMIO). Layering is Firecracker's own: ``rebase-snap --base-file BASE
--diff-file DIFF`` (``src/rebase-snap/src/main.rs``) copies the diff's data runs
(``SEEK_DATA``/``SEEK_HOLE``) onto the base at the same offsets; the warning says so.

Addresses are offsets in the memory file (plus ``--base-address``), not guest-physical: the
region table (``GuestMemoryState``) is in the state file, which is bitcode since Firecracker
1.15 (commit 37480d9ca, 2026-01: a bit-packed, column-ordered encoding) and bincode 2 before,
with the regions nested in ``VmState`` after architecture-specific KVM structures: it cannot be
read without the whole type tree of each version. Page contents, hence the prediction, do not
depend on the addresses.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..pages import Extent, PageState
from .base import DumpFormat, DumpReader
from .sparse import sparse_extents

__all__ = ["FirecrackerDiffReader", "FirecrackerReader"]


class FirecrackerReader(DumpReader):
    """A Firecracker full-snapshot memory file: flat, holes are pages not present."""

    format = DumpFormat.FIRECRACKER
    # Holes carry meaning (never populated), which a compressed copy loses.
    unwrapped_only = "its holes are read as holes"
    hole_state: ClassVar[PageState] = PageState.HOLE
    snapshot_type: ClassVar[str] = "full"

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """No magic: the format is chosen with ``--format``."""
        return False

    def _load_extents(self) -> list[Extent]:
        ps = self.page_size
        npages, tail = divmod(self.file_size, ps)
        if tail:
            self.warnings.append(
                f"{self.path}: the last {tail} bytes are not a whole {ps}-byte page and are "
                "ignored")
        if not 0 <= self.base_address <= (1 << 64) - npages * ps:
            raise ValueError(f"base address {self.base_address:#x} puts {self.path} outside "
                             "the 64-bit address space")
        return sparse_extents(self, 0, npages * ps, self.base_address, self.hole_state,
                              f"Firecracker {self.snapshot_type} snapshot memory", [0])

    def info(self) -> dict[str, Any]:
        """Snapshot type, what holes mean, and what the addresses are."""
        counts = self.page_counts()
        return {
            "snapshot_type": self.snapshot_type,
            "addresses": "offsets in the memory file (plus --base-address), not "
                         "guest-physical: the state file's region table is not read",
            "base_address": self.base_address,
            "stored_pages": counts[PageState.DATA],
            "hole_pages": counts[self.hole_state],
        }


class FirecrackerDiffReader(FirecrackerReader):
    """A Firecracker diff-snapshot memory file: holes are pages unchanged since the previous
    snapshot, whose content this file does not hold (EXCLUDED)."""

    format = DumpFormat.FIRECRACKER_DIFF
    unwrapped_only = "its holes mean unchanged, not zero"
    hole_state = PageState.EXCLUDED
    snapshot_type = "diff"

    def _load_extents(self) -> list[Extent]:
        extents = super()._load_extents()
        unchanged = sum(e.npages for e in extents if e.state == PageState.EXCLUDED)
        if unchanged:
            self.warnings.append(
                f"{self.path}: {unchanged:,} pages of this diff snapshot are holes (unchanged "
                "since the previous snapshot): their content is not in this file, so they are "
                "reported as excluded and not predicted; to predict the whole guest, merge it "
                "onto a copy of its base memory file with Firecracker's 'rebase-snap "
                "--base-file BASE --diff-file DIFF' and scan BASE")
        return extents
