"""What every export shares: the sharing-aware placement's hosts, and the inputs' VM names."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING

from ...errors import KsmAnalyzeError, printable
from ...units import human_bytes
from ..overcommit import supported

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["ExportError", "HostGroup", "dns_label", "fullest_need", "host_groups",
           "measured_lines", "vm_name", "vm_names"]

_COMPRESSED = {".gz", ".zst", ".xz", ".bz2", ".lz4", ".lzo", ".sz", ".snappy"}


class ExportError(KsmAnalyzeError):
    """The plan cannot be written in an ecosystem's terms (two inputs would be one VM)."""


@dataclass(frozen=True)
class HostGroup:
    """One host of the sharing-aware placement: its number in the plan (``host``), its
    name in the exports (``host-N``), and its inputs' names as the plan prints them."""

    host: int
    inputs: tuple[str, ...]
    memory_before_bytes: int
    memory_after_bytes: int

    @property
    def name(self) -> str:
        return f"host-{self.host}"


def host_groups(plan: Plan) -> list[HostGroup]:
    """The hosts of ``plan``'s sharing-aware placement, in the plan's order."""
    rows = plan.hosts[plan.hosts["method"] == "sharing"]
    return [HostGroup(int(r["host"]), tuple(r["inputs"]), int(r["memory_before_bytes"]),
                      int(r["memory_after_bytes"])) for _, r in rows.iterrows()]


def vm_name(input_name: str) -> str:
    """The VM an input is a dump of: its file name without folders, a compression suffix
    and the format's suffix (``a/vm-a.raw.gz`` -> ``vm-a``; ``vm-b.raw`` -> ``vm-b``)."""
    name = PurePath(input_name.split("#")[0]).name
    stem, dot, suffix = name.rpartition(".")
    if dot and stem and f".{suffix.lower()}" in _COMPRESSED:
        name = stem
    stem, dot, _ = name.rpartition(".")
    return stem if dot and stem else name


def dns_label(name: str, *, limit: int = 63) -> str:
    """``name`` as an RFC 1123 label (Kubernetes' DNS-1123 label): lower-case letters,
    digits and ``-``, starting and ending alphanumeric, at most ``limit`` characters.
    Any other run of characters becomes one ``-``; nothing left -> ``vm``."""
    label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:limit].rstrip("-")
    return label or "vm"


def vm_names(inputs: list[str], sanitize: Callable[[str], str]) -> dict[str, str]:
    """Each input's VM name in an ecosystem's rules (``sanitize`` of :func:`vm_name`).

    Raises:
        ExportError: two inputs would be the same VM there.
    """
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in inputs:
        vm = sanitize(vm_name(name))
        if vm in seen:
            raise ExportError(f"{seen[vm]} and {name} would both be the VM {vm!r} in the "
                              "export (named by file stem): rename one of the files")
        seen[vm] = name
        out[name] = vm
    return out


def fullest_need(plan: Plan) -> int:
    """The guests' memory (each input's described size, what a flavor or a VM spec gives
    it) of the fullest planned host, in bytes: what the hosts' overcommit must admit."""
    sizes = dict(zip(plan.analysis.names, (int(b) for b in plan.analysis.per_input["bytes"]),
                     strict=True))
    return max(sum(sizes[i] for i in g.inputs) for g in host_groups(plan))


def measured_lines(plan: Plan, *, percent: bool, setting: str) -> tuple[list[str], list[str]]:
    """(lines, warnings): the overcommit ratio the plan's hosts were measured to run at,
    with its band (:func:`~ksm_analyze.planning.overcommit.supported`), whose low end,
    rounded down, is the most to set as ``setting``; and a warning when the fullest planned
    host needs more than that low end. ``percent``: as ``100 x`` the ratio (KubeVirt)."""
    try:
        s = supported(plan)
    except ValueError:  # a plan without an overcommit table
        return [], []

    def show(ratio: float, way: Callable[[float], int] = round) -> str:
        """The ratio in hundredths (or percent), rounded ``way`` (down: the most to set;
        up: what a host needs)."""
        hundredths = way(ratio * 100)
        return f"{hundredths}%" if percent else f"{hundredths // 100}.{hundredths % 100:02d}"

    host = human_bytes(s.host_memory)
    if math.isinf(s.ratio):
        return [(f"Measured: guests like {printable(s.family)} cost no host memory after KSM: "
                 "memory sets no overcommit limit.")], []
    if s.ratio <= 0:
        return [(f"Measured: no guest like {printable(s.family)} fits in the {human_bytes(s.capacity)} "
                 f"a host of {host} leaves for guests: no overcommit to set.")], []
    need = fullest_need(plan) / plan.capacity
    lines = [
        (f"Measured (the plan's overcommit table): hosts of {host} run at {show(s.point)}, "
         f"band {show(s.ratio)} - {show(s.high)}"),
        f"  ({printable(s.family)}, the family that shares least): set {setting} to at most",
        f"  {show(s.ratio, math.floor)}, the band's low end.",
    ]
    warnings = [] if need <= s.ratio else [
        (f"Warning: the fullest planned host needs {show(need, math.ceil)}, more than the "
         f"measured low end {show(s.ratio, math.floor)}:"),
        "  the ratio admits any guests up to it, not only the ones planned together; keep",
        "  every VM in its planned group, or set at most the measured low end.",
    ]
    return lines, warnings
