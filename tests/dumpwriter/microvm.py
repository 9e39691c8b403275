"""Write microVM snapshot files from their published layouts (no microVM runs here).

* Firecracker (``src/vmm/src/vstate/memory.rs``: ``dump`` / ``dump_dirty``): the memory file
  is the regions back to back; a diff snapshot sets the file's length and writes only dirty
  pages at their place, leaving holes.
* Cloud Hypervisor (``vmm/src/memory_manager.rs`` ``Transportable::send`` and ``vmm/src/vm.rs``
  ``send``): ``memory-ranges`` pre-sized with ``set_len`` and the ranges written at their
  dense offsets (holes where the source had holes), ``state.json`` the VM ``Snapshot``
  (``vm-migration/src/lib.rs``) whose ``memory-manager`` entry holds a
  ``MemoryManagerSnapshotData`` as a JSON string.
* OpenVMM (``openvmm/openvmm_helpers/src/snapshot.rs`` ``SnapshotManifest``): ``manifest.bin``
  in protobuf wire format, ``memory.bin`` the file-backed RAM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["make_cloud_hypervisor", "make_openvmm", "make_sparse", "manifest_bytes"]


def make_sparse(path: str | os.PathLike[str], size: int, writes: dict[int, bytes]) -> Path:
    """A file of ``size`` bytes with ``writes`` (offset -> bytes) and holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in sorted(writes.items()):
            f.seek(off)
            f.write(data)
    return Path(path)


def ch_state(ranges: list[tuple[int, int]], **extra: Any) -> bytes:
    """state.json: the VM Snapshot with a memory-manager MemoryRangeTable of ``ranges``."""
    mm = {"memory_ranges": {"data": [{"gpa": g, "length": n} for g, n in ranges]},
          "guest_ram_mappings": [], "start_of_device_area": 0,
          "boot_ram": sum(n for _, n in ranges), "current_ram": sum(n for _, n in ranges),
          "arch_mem_regions": [], "hotplug_slots": [], "next_memory_slot": 0,
          "selected_slot": 0, "next_hotplug_slot": 0, **extra}
    vm = {"snapshots": {"memory-manager": {"snapshots": {},
                                           "snapshot_data": {"state": json.dumps(mm)}},
                        "cpu-manager": {"snapshots": {}, "snapshot_data": {"state": "{}"}}},
          "snapshot_data": {"state": "{}"}}
    return json.dumps(vm).encode()


def make_cloud_hypervisor(directory: str | os.PathLike[str], ranges: list[tuple[int, int]],
                          writes: dict[int, bytes], state: bytes | None = None) -> Path:
    """A snapshot directory; returns its ``memory-ranges``. ``writes`` are offsets in the
    memory-ranges file (holes elsewhere)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / "state.json").write_bytes(ch_state(ranges) if state is None else state)
    return make_sparse(d / "memory-ranges", sum(n for _, n in ranges), writes)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def manifest_bytes(memory_size: int, *, version: int = 1, page_size: int = 4096,
                   vp_count: int = 2, arch: str = "x86_64") -> bytes:
    """A SnapshotManifest in protobuf wire format (fields 1-7, as mesh encodes them)."""
    def field(number: int, wire: int, payload: bytes) -> bytes:
        return _varint(number << 3 | wire) + payload

    def string(number: int, text: bytes) -> bytes:
        return field(number, 2, _varint(len(text)) + text)

    timestamp = field(1, 0, _varint(1_780_000_000)) + field(2, 0, _varint(5))
    return (field(1, 0, _varint(version)) + string(2, timestamp) + string(3, b"0.1.0")
            + field(4, 0, _varint(memory_size)) + field(5, 0, _varint(vp_count))
            + field(6, 0, _varint(page_size)) + string(7, arch.encode()))


def make_openvmm(directory: str | os.PathLike[str], memory_size: int, writes: dict[int, bytes],
                 manifest: bytes | None = None) -> Path:
    """A snapshot directory; returns its ``memory.bin``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.bin").write_bytes(manifest_bytes(memory_size) if manifest is None
                                     else manifest)
    (d / "state.bin").write_bytes(b"")
    return make_sparse(d / "memory.bin", memory_size, writes)
