"""The KSM knobs a replay of ksmd depends on, as ``/sys/kernel/mm/ksm`` names them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from ..ksm import RMAP_ITEM_BYTES, KsmSettings
from ..pages import check_page_size

__all__ = ["ADVISOR_MODES", "Knobs"]

ADVISOR_MODES = ("none", "scan-time")
_KERNEL = KsmSettings()
"""The defaults the one-moment model declares (max_page_sharing, pages_to_scan...)."""


@dataclass(frozen=True)
class Knobs:
    """ksmd's settings, with the kernel's defaults (``Documentation/admin-guide/mm/ksm.rst``).

    ``rmap_item_bytes`` is ``sizeof(struct ksm_rmap_item)`` on the machine the data came
    from (``/sys/kernel/slab/ksm_rmap_item/object_size``), not a knob but a fact the
    counters depend on.
    """

    pages_to_scan: int = _KERNEL.pages_to_scan
    sleep_millisecs: int = _KERNEL.sleep_millisecs
    max_page_sharing: int = _KERNEL.max_page_sharing
    use_zero_pages: bool = _KERNEL.use_zero_pages
    smart_scan: bool = True
    advisor_mode: str = "none"
    advisor_max_cpu: int = 70
    advisor_min_pages_to_scan: int = 500
    advisor_max_pages_to_scan: int = 30000
    advisor_target_scan_time: int = 200
    rmap_item_bytes: int = RMAP_ITEM_BYTES
    page_size: int = _KERNEL.page_size

    def __post_init__(self) -> None:
        check_page_size(self.page_size)
        for name in ("pages_to_scan", "max_page_sharing", "advisor_max_cpu",
                     "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
                     "advisor_target_scan_time", "rmap_item_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_page_sharing < 2:
            raise ValueError(f"max_page_sharing must be at least 2, not {self.max_page_sharing}")
        if self.sleep_millisecs < 0:
            raise ValueError(f"sleep_millisecs cannot be negative, not {self.sleep_millisecs}")
        if self.advisor_mode not in ADVISOR_MODES:
            raise ValueError(f"advisor_mode must be one of {', '.join(ADVISOR_MODES)}, "
                             f"not {self.advisor_mode!r}")

    @classmethod
    def from_sysfs(cls, sysfs: Mapping[str, int | str], *,
                   rmap_item_bytes: int | None = None) -> Knobs:
        """The knobs a ``/sys/kernel/mm/ksm`` reading holds (as ``live.procfs.ksm_sysfs``
        returns it); a knob the kernel lacks keeps its default. ``advisor_mode`` is read
        from the bracketed choice (``[none] scan-time``)."""
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name not in sysfs:
                continue
            raw = sysfs[f.name]
            if f.name == "advisor_mode":
                text = str(raw)
                values[f.name] = text[text.find("[") + 1 : text.find("]")] if "[" in text else text
            elif f.type == "bool":
                values[f.name] = bool(int(raw))
            else:
                values[f.name] = int(raw)
        knobs = cls(**values)  # type: ignore[arg-type]
        return replace(knobs, rmap_item_bytes=rmap_item_bytes) if rmap_item_bytes else knobs
