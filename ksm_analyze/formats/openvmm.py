"""OpenVMM snapshots (``save-snapshot DIR`` in the OpenVMM console).

The directory holds ``manifest.bin``, ``state.bin`` and ``memory.bin`` (openvmm
``Guide/src/dev_guide/snapshot_format.md``). ``memory.bin`` is a hard link to the VM's
file-backed guest RAM (``--memory size=...,file=...``): raw RAM, sparse where the guest never
wrote (a hole is a page never populated: HOLE). ``manifest.bin`` is a ``SnapshotManifest``
(``openvmm/openvmm_helpers/src/snapshot.rs``) in protobuf wire format (the ``mesh`` crate):
field 1 ``version`` (u32, 1), 2 ``created_at`` (Timestamp message), 3 ``openvmm_version``
(string), 4 ``memory_size_bytes`` (u64), 5 ``vp_count`` (u32), 6 ``page_size`` (u32),
7 ``architecture`` (string). Read here by hand: a varint or length-delimited field at a time,
unknown fields skipped, every size capped.

Addresses are offsets in ``memory.bin`` (plus ``--base-address``): how OpenVMM lays guest RAM
ranges into the backing file is not recorded in the manifest. The user passes
``DIR/memory.bin``; it is recognised by that name with ``manifest.bin`` beside it.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import TruncatedDumpError, UnsupportedDumpError
from ..pages import Extent, PageState
from ..units import size_text
from .base import DumpFormat, DumpReader
from .cloudhv import named_beside, read_companion
from .sparse import sparse_extents

__all__ = ["OpenVmmReader", "parse_manifest"]

MEMORY_FILE = "memory.bin"
MANIFEST_FILE = "manifest.bin"
MAX_MANIFEST_BYTES = 1 << 20
MANIFEST_VERSION = 1
_VARINT_FIELDS = {1: "version", 4: "memory_size_bytes", 5: "vp_count", 6: "page_size"}
_STRING_FIELDS = {3: "openvmm_version", 7: "architecture"}
MAX_STRING = 256


class _ManifestError(ValueError):
    """A manifest that is not protobuf or not a SnapshotManifest (message, offset)."""

    def __init__(self, detail: str, offset: int) -> None:
        super().__init__(detail, offset)
        self.detail, self.offset = detail, offset

    def __str__(self) -> str:
        return self.detail


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    start = pos
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _ManifestError("bad or unterminated varint", start)


def parse_manifest(data: bytes) -> dict[str, Any]:
    """The SnapshotManifest fields of protobuf ``data`` (_ManifestError when malformed)."""
    out: dict[str, Any] = {}
    pos = 0
    while pos < len(data):
        at = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _ManifestError("field number 0", at)
        if wire == 0:
            value, pos = _varint(data, pos)
            if number in _VARINT_FIELDS:
                limit = 64 if number == 4 else 32
                if value >> limit:
                    raise _ManifestError(f"{_VARINT_FIELDS[number]} {value} does not fit "
                                        f"{limit} bits", at)
                out[_VARINT_FIELDS[number]] = value
        elif wire == 2:
            n, pos = _varint(data, pos)
            if pos + n > len(data):
                raise _ManifestError(f"field {number} of {n} bytes runs past the end", at)
            if number in _STRING_FIELDS:
                text = data[pos : pos + n][:MAX_STRING].decode("utf-8", "replace")
                out[_STRING_FIELDS[number]] = text.encode("unicode_escape").decode("ascii")
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise _ManifestError(f"wire type {wire} of field {number} is not protobuf's", at)
        if pos > len(data):
            raise _ManifestError(f"field {number} runs past the end", at)
    return out


class OpenVmmReader(DumpReader):
    """``memory.bin`` of an OpenVMM snapshot, sized by ``manifest.bin``."""

    format = DumpFormat.OPENVMM
    # Holes carry meaning (never populated), which a compressed copy loses.
    unwrapped_only = "its holes are read as holes"

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """No magic: recognised by its name and companion (:meth:`probe_path`)."""
        return False

    @classmethod
    def probe_path(cls, path: str | os.PathLike[str]) -> bool:
        """A file named ``memory.bin`` with ``manifest.bin`` beside it."""
        return named_beside(path, MEMORY_FILE, MANIFEST_FILE)

    def _load_extents(self) -> list[Extent]:
        self.manifest_path, raw = read_companion(self, MANIFEST_FILE, MAX_MANIFEST_BYTES)
        try:
            self.manifest = parse_manifest(raw)
        except _ManifestError as e:
            raise self._error(f"{self.manifest_path} at byte {e.offset}: {e}", 0) from None
        version = self.manifest.get("version", 0)
        if version != MANIFEST_VERSION:
            raise UnsupportedDumpError(
                f"{self.manifest_path}: snapshot manifest version {version}, this reader knows "
                f"version {MANIFEST_VERSION}", path=self.path, offset=0)
        size = self.manifest.get("memory_size_bytes", 0)
        ps = self.page_size
        if size % ps:
            raise self._error(f"{self.manifest_path}: memory_size_bytes {size} is not a whole "
                              f"number of {ps}-byte pages", 0)
        if size > self.file_size:
            raise TruncatedDumpError(
                f"{self.manifest_path} says {size_text(size)} of guest RAM but the file holds "
                f"{size_text(self.file_size)}", path=self.path, offset=self.file_size)
        if size < self.file_size:
            self.warnings.append(f"{self.path}: the last {size_text(self.file_size - size)} "
                                 f"are past the {size_text(size)} of guest RAM and are ignored")
        if not 0 <= self.base_address <= (1 << 64) - size:
            raise ValueError(f"base address {self.base_address:#x} puts {self.path} outside "
                             "the 64-bit address space")
        return sparse_extents(self, 0, size, self.base_address, PageState.HOLE,
                              "OpenVMM guest RAM", [0])

    def info(self) -> dict[str, Any]:
        """The manifest's facts and what the addresses are."""
        counts = self.page_counts()
        return {
            "manifest_file": self.manifest_path,
            **{k: self.manifest.get(k) for k in (
                "version", "openvmm_version", "architecture", "memory_size_bytes", "vp_count",
                "page_size")},
            "addresses": "offsets in memory.bin (plus --base-address), not guest-physical",
            "stored_pages": counts[PageState.DATA],
            "hole_pages": counts[PageState.HOLE],
        }
