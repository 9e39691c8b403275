"""Cloud Hypervisor's VM configuration, as JSON: the ``VmConfig`` of its REST API
(``PUT /vm.create``) or ``ch-remote info`` (the same under ``config``).

https://github.com/cloud-hypervisor/cloud-hypervisor/blob/main/docs/memory.md
(``MemoryConfig``): ``mergeable`` "Specifies if the pages from the guest RAM must be marked
as mergeable. In case this option is true or on, the pages will be marked with madvise(2)
to let the host kernel know which pages are eligible for being merged by the KSM daemon"
(default off); ``shared`` "Specifies if the memory must be mmap(2) with MAP_SHARED flag";
``hugepages`` "Specifies if the memory must be created and mmap(2) with MAP_HUGETLB";
memory ``zones`` (``MemoryZoneConfig``) carry ``shared``, ``hugepages`` and
``host_numa_node`` each. The configuration names no VM: its name is the file's stem.
"""

from __future__ import annotations

from typing import Any

from .base import KSM_VMA_RULE, Reason, VmConfig, bad_config, stem

__all__ = ["is_cloud_hypervisor", "read_cloud_hypervisor"]

_DOC = "Cloud Hypervisor docs/memory.md"


def _config(data: Any) -> Any:
    """The ``VmConfig`` object: the document, or its ``config`` (``ch-remote info``)."""
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        return data["config"]
    return data


def is_cloud_hypervisor(data: Any) -> bool:
    """A JSON object with a ``memory`` object beside Cloud Hypervisor's ``cpus`` or
    ``payload``, or a ``memory`` object with ``size`` and ``mergeable``."""
    config = _config(data)
    memory = config.get("memory") if isinstance(config, dict) else None
    return isinstance(memory, dict) and (
        "cpus" in config or "payload" in config or "mergeable" in memory)


def _on(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("on", "true"))


def read_cloud_hypervisor(path: str, data: Any) -> VmConfig:
    """The facts of one VM's ``memory`` section."""
    memory = _config(data)["memory"]
    zones = memory.get("zones") or []
    if not isinstance(zones, list) or not all(isinstance(z, dict) for z in zones):
        raise bad_config(path, "memory.zones is not a list of objects")
    reasons: list[Reason] = []
    notes: list[str] = []
    if not _on(memory.get("mergeable", False)):
        reasons.append(Reason(
            "not_mergeable", f"memory.mergeable: {memory.get('mergeable', 'absent (off)')}",
            f"{_DOC}: only with mergeable on are the guest RAM pages madvised "
            "MADV_MERGEABLE for KSM (default off); KSM scans them otherwise only if the "
            "launcher set prctl(PR_SET_MEMORY_MERGE) (--scope anon)"))

    def everywhere(key: str) -> tuple[bool, list[str]]:
        """Whether ``key`` is on for all guest memory, and the zones where it is on."""
        on = [str(z.get("id", i)) for i, z in enumerate(zones) if _on(z.get(key))]
        return _on(memory.get(key)) or (bool(zones) and len(on) == len(zones)), on

    for key, rule, what in (("shared", "shared", "mmap(2) MAP_SHARED"),
                            ("hugepages", "hugetlb", "hugetlbfs (MAP_HUGETLB)")):
        whole, on = everywhere(key)
        if whole:
            where = f"memory.{key}: true" if _on(memory.get(key)) else \
                f"memory.zones[*].{key}: true"
            reasons.append(Reason(rule, where, f"{_DOC}: guest RAM {what}; {KSM_VMA_RULE}"))
        elif on:
            notes.append(f"memory zones {', '.join(on)} of {len(zones)} have {key} on: "
                         "their memory is never scanned (not modelled per zone)")
    nodes = sorted({int(z["host_numa_node"]) for z in zones
                    if isinstance(z.get("host_numa_node"), int)})
    if nodes:
        notes.append(f"memory zones on host NUMA nodes {', '.join(map(str, nodes))}")
    return VmConfig(stem(path), path, "cloud-hypervisor", tuple(reasons),
                    numa_nodes=tuple(nodes), notes=tuple(notes))
