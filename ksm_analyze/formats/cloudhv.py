"""Cloud Hypervisor snapshots (``ch-remote --api-socket S snapshot file:///DIR``).

The snapshot directory holds ``config.json``, ``state.json`` and ``memory-ranges``
(cloud-hypervisor ``vmm/src/vm.rs`` and ``vmm/src/memory_manager.rs``). ``state.json`` is the
VM's ``Snapshot`` as JSON (``vm-migration/src/lib.rs``: ``{"snapshots": {id: Snapshot},
"snapshot_data": {"state": "<JSON text>"}}``); its ``memory-manager`` entry's state is a
``MemoryManagerSnapshotData`` whose ``memory_ranges.data`` is the ``MemoryRangeTable``: a list
of ``{gpa, length}`` (``vm-migration/src/protocol.rs``). ``memory-ranges`` is those ranges'
bytes back to back, in the table's order.

Since 2026 ``memory-ranges`` is written sparse (``vmm/src/sparse.rs``, ``write_region_sparse``)
for file-backed guest RAM: a hole is a hole of the guest's backing file, a page never written,
and restore (``fill_saved_regions``) skips it, leaving the page unpopulated: a page not
present (HOLE), which KSM never sees. Shared file-backed regions are left out of the table
(``MemoryRangePolicy::SkipPersisted``): they are not KSM-eligible anyway.

The user passes ``DIR/memory-ranges``; it is recognised by that name with ``state.json``
beside it.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from ..errors import TruncatedDumpError
from ..pages import Extent, PageState
from ..units import size_text
from .base import DumpFormat, DumpReader, strict_json
from .sparse import sparse_extents

__all__ = ["CloudHypervisorReader", "read_companion"]

MEMORY_FILE = "memory-ranges"
STATE_FILE = "state.json"
MEMORY_MANAGER = "memory-manager"
MAX_STATE_BYTES = 64 << 20
"""A larger state.json is not Cloud Hypervisor's (device states are kilobytes to megabytes)."""


def named_beside(path: str | os.PathLike[str], name: str, companion: str) -> bool:
    """Whether ``path`` is a file called ``name`` with the file ``companion`` beside it: how
    the two-file formats without magic are recognised. Never raises."""
    path = os.fspath(path)
    return os.path.basename(path) == name and os.path.isfile(
        os.path.join(os.path.dirname(path) or ".", companion))


def read_companion(reader: DumpReader, name: str, limit: int) -> tuple[str, bytes]:
    """The file ``name`` beside the reader's file, at most ``limit`` bytes, or a
    DumpFormatError naming it."""
    path = os.path.join(os.path.dirname(reader.path) or ".", name)
    try:
        # O_NONBLOCK: a FIFO named like the companion must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise reader._error(f"cannot read {path}, which must be beside it: {e.strerror}",
                            0) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise reader._error(f"{path} beside it is not a regular file", 0)
        if st.st_size > limit:
            raise reader._error(f"{path} is larger than {size_text(limit)}: not this format's",
                                0)
        data = os.pread(fd, st.st_size + 1, 0)  # one more: a file that grew is seen
    except OSError as e:
        raise reader._error(f"cannot read {path}: {e.strerror}", 0) from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise reader._error(f"{path} is larger than {size_text(limit)}: not this format's", 0)
    return path, data


class CloudHypervisorReader(DumpReader):
    """``memory-ranges`` of a Cloud Hypervisor snapshot, placed by ``state.json``."""

    format = DumpFormat.CLOUD_HYPERVISOR
    # Holes carry meaning (never populated), which a compressed copy loses.
    unwrapped_only = "its holes are read as holes"

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """No magic: recognised by its name and companion (:meth:`probe_path`)."""
        return False

    @classmethod
    def probe_path(cls, path: str | os.PathLike[str]) -> bool:
        """A file named ``memory-ranges`` with ``state.json`` beside it."""
        return named_beside(path, MEMORY_FILE, STATE_FILE)

    def _state_error(self, detail: str) -> Exception:
        return self._error(f"{self.state_path}: {detail}", 0)

    def _ranges(self) -> list[tuple[int, int]]:
        self.state_path, raw = read_companion(self, STATE_FILE, MAX_STATE_BYTES)
        try:
            vm = strict_json(raw)
            mm = vm["snapshots"][MEMORY_MANAGER]["snapshot_data"]["state"]
            state = strict_json(mm) if isinstance(mm, str) else mm
            table = state["memory_ranges"]["data"]
        except (ValueError, RecursionError) as e:
            raise self._state_error(f"not valid JSON: {str(e)[:80]}") from None
        except (KeyError, TypeError, IndexError):
            raise self._state_error(
                "no memory-manager memory_ranges table (snapshots.memory-manager.snapshot_data"
                ".state.memory_ranges.data)") from None
        if not isinstance(table, list):
            raise self._state_error("memory_ranges.data is not a list")
        if problem := self._over_limit(len(table), "memory ranges", 16):
            raise self._state_error(problem)
        self.boot_ram = state.get("boot_ram") if isinstance(state, dict) else None
        self.current_ram = state.get("current_ram") if isinstance(state, dict) else None
        ranges = []
        for i, r in enumerate(table):
            gpa = r.get("gpa") if isinstance(r, dict) else None
            length = r.get("length") if isinstance(r, dict) else None
            if not (type(gpa) is int and type(length) is int and 0 <= gpa < 1 << 64
                    and 0 <= length < 1 << 64):
                raise self._state_error(f"memory range {i} is not {{gpa, length}} with "
                                        "64-bit unsigned integers")
            if gpa % self.page_size or length % self.page_size:
                raise self._state_error(
                    f"memory range {i} (gpa {gpa:#x}, length {length:#x}) is not made of whole "
                    f"{self.page_size}-byte pages")
            ranges.append((gpa, length))
        return ranges

    def _load_extents(self) -> list[Extent]:
        self.ranges = self._ranges()
        total = sum(n for _, n in self.ranges)
        if total > self.file_size:
            raise TruncatedDumpError(
                f"{self.state_path} lists {size_text(total)} of memory ranges but the file "
                f"holds {size_text(self.file_size)}", path=self.path, offset=self.file_size)
        if total < self.file_size:
            self.warnings.append(
                f"{self.path}: the last {size_text(self.file_size - total)} are in no memory "
                f"range of {self.state_path} and are ignored")
        extents: list[Extent] = []
        offset, budget = 0, [0]
        for i, (gpa, length) in enumerate(self.ranges):
            if gpa + length > 1 << 64:
                raise self._state_error(f"memory range {i} ends past the 64-bit address space")
            extents += sparse_extents(self, offset, length, gpa, PageState.HOLE,
                                      f"memory range {i}", budget)
            offset += length
        return extents

    def info(self) -> dict[str, Any]:
        """The state file, the ranges (gpa, bytes) and the RAM sizes it records."""
        counts = self.page_counts()
        return {
            "state_file": self.state_path,
            "ranges": [[gpa, n] for gpa, n in self.ranges],
            "boot_ram": self.boot_ram if type(self.boot_ram) is int else None,
            "current_ram": self.current_ram if type(self.current_ram) is int else None,
            "stored_pages": counts[PageState.DATA],
            "hole_pages": counts[PageState.HOLE],
        }
