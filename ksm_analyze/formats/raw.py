"""Raw memory images: QEMU ``pmemsave``, VMware ``.vmem``, Firecracker memory files.

The whole file is one flat region starting at ``base_address``; there is no header, so this
format is never detected by magic: it is the explicit fallback.
"""

from __future__ import annotations

from typing import Any

from ..pages import Extent, PageState
from .base import DumpFormat, DumpReader


class RawReader(DumpReader):
    """A flat image: file offset ``o`` holds address ``base_address + o``."""

    format = DumpFormat.RAW
    unwrapped_only = None

    @classmethod
    def probe(cls, head: bytes) -> bool:
        """Raw has no magic: it is never detected, only chosen as the fallback."""
        return False

    def _load_extents(self) -> list[Extent]:
        npages, tail = divmod(self.file_size, self.page_size)
        if tail:
            self.warnings.append(
                f"{self.path}: the last {tail} bytes are not a whole {self.page_size}-byte page "
                "and are ignored"
            )
        if not 0 <= self.base_address <= (1 << 64) - npages * self.page_size:
            raise ValueError(
                f"base address {self.base_address:#x} puts {self.path} outside the 64-bit "
                "address space"
            )
        return [Extent(self.base_address, npages, PageState.DATA, 0, "raw image")]

    def info(self) -> dict[str, Any]:
        """The base address the image was read at (and, for a lone ``.vmem``, what that means)."""
        out: dict[str, Any] = {"base_address": self.base_address}
        if self.path.lower().endswith(".vmem"):
            out["vmware"] = ("no .vmss/.vmsn beside it: read as a flat image, guest-physical "
                             "addresses unknown")
        return out
