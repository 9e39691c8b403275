"""What a VM's configuration says about KSM: :class:`VmConfig` and its :class:`Reason` s.

Facts only: each reader (one module per format) returns them; the pipeline turns a VM that
KSM will not scan into the ``vm_config`` exclusion rule (:mod:`ksm_analyze.eligibility`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

__all__ = ["MAX_CONFIG_BYTES", "RULE_SCOPES", "Reason", "VmConfig", "bad_config"]

MAX_CONFIG_BYTES = 1 << 20
"""The largest configuration file read (1 MiB): a domain XML or a VM spec is a few KiB."""

RULE_SCOPES: dict[str, tuple[str, ...]] = {
    "not_mergeable": ("mergeable",),
    "shared": ("mergeable", "anon"),
    "hugetlb": ("mergeable", "anon"),
}
"""Under which ``--scope`` each kind of reason keeps KSM off the VM: memory not marked
mergeable is scanned under ``anon`` (as if the launcher set ``PR_SET_MEMORY_MERGE``);
shared and hugetlbfs memory never (``mm/ksm.c``: ``vma_ksm_compatible()`` refuses
``VM_SHARED``, ``VM_MAYSHARE`` and ``VM_HUGETLB``); ``all`` is an upper bound that counts
every page."""

# The documented rules the readers cite, written once.
KSM_VMA_RULE = ("mm/ksm.c vma_ksm_compatible(): KSM never scans VM_SHARED/VM_MAYSHARE or "
                "VM_HUGETLB mappings, only private anonymous memory")
QEMU_MEM_MERGE = ("QEMU -machine mem-merge=off: guest RAM is not madvised MADV_MERGEABLE, so "
                  "KSM does not scan it")


@dataclass(frozen=True)
class Reason:
    """One fact of a configuration that keeps KSM off the VM's memory.

    Attributes:
        rule: ``not_mergeable`` (never madvised MADV_MERGEABLE), ``shared`` (a shared
            mapping: file, memfd or shmem) or ``hugetlb`` (hugetlbfs pages).
        setting: what the file says, as it says it (``<nosharepages/>``, ``allow-ksm: 0``).
        documented: the documented rule behind it, with where it is written.
    """

    rule: str
    setting: str
    documented: str

    def text(self) -> str:
        """``setting: documented``, one line."""
        return f"{self.setting}: {self.documented}"


@dataclass(frozen=True)
class VmConfig:
    """One VM as its configuration file describes it.

    Attributes:
        name: the VM's name (``<name>``, ``name:``, ``metadata.name``; for formats that
            name no VM, the file's stem).
        path: the configuration file.
        format: ``libvirt``, ``proxmox``, ``cloud-hypervisor``, ``firecracker``, ``kubevirt``.
        reasons: every fact that keeps KSM off its memory (empty: KSM scans it).
        aliases: further names an input's file stem may match (Proxmox: the VMID).
        numa_nodes: host NUMA nodes its memory is bound to (empty: not bound).
        notes: facts that do not decide the verdict but bear on it.
    """

    name: str
    path: str
    format: str
    reasons: tuple[Reason, ...] = ()
    aliases: tuple[str, ...] = ()
    numa_nodes: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def names(self) -> tuple[str, ...]:
        """Every name an input's file stem may match."""
        return (self.name, *(a for a in self.aliases if a != self.name))

    def excluding(self, scope: str) -> list[Reason]:
        """The reasons that keep KSM off this VM under ``scope`` (a ``--scope`` name)."""
        return [r for r in self.reasons if scope in RULE_SCOPES[r.rule]]

    def eligible(self, scope: str) -> bool:
        """Whether KSM scans this VM's memory under ``scope``."""
        return not self.excluding(scope)

    def record(self, scope: str) -> dict[str, Any]:
        """Plain values: ``name``, ``config``, ``format``, ``eligible``, ``reasons`` (the
        ones that apply under ``scope``), ``other_reasons`` (those that do not),
        ``numa_nodes``, ``notes``."""
        applying = self.excluding(scope)
        return {"name": self.name, "config": self.path, "format": self.format,
                "eligible": not applying, "reasons": [r.text() for r in applying],
                "other_reasons": [r.text() for r in self.reasons if r not in applying],
                "numa_nodes": list(self.numa_nodes), "notes": list(self.notes)}


def bad_config(path: str | os.PathLike[str], detail: str) -> InputError:
    """The one-line error of a configuration file that cannot be read."""
    return InputError(f"not a VM configuration ksm-analyze reads: {detail}", path=path)


def stem(path: str | os.PathLike[str]) -> str:
    """A file's name without its last suffix (``100.conf`` -> ``100``)."""
    name = os.path.basename(os.fspath(path))
    return name.rsplit(".", 1)[0] if "." in name.strip(".") else name


def node_list(text: str) -> tuple[int, ...]:
    """A cpuset-style list of NUMA nodes (``0-1,3``; ``^2`` exclusions dropped) as
    numbers; ValueError if it is not one."""
    nodes: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part or part.startswith("^"):
            continue
        lo, sep, hi = part.partition("-")
        first, last = int(lo), int(hi) if sep else int(lo)
        if not 0 <= first <= last < 4096:
            raise ValueError(part)
        nodes.update(range(first, last + 1))
    return tuple(sorted(nodes))
