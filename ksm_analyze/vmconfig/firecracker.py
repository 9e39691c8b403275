"""Firecracker's configuration file (``firecracker --config-file``: ``boot-source``,
``drives``, ``machine-config``...).

https://github.com/firecracker-microvm/firecracker/blob/main/docs/hugepages.md:
``machine-config.huge_pages`` ``"2M"`` backs guest memory by 2 MiB hugetlbfs pages
(``"None"``, the default: anonymous memory). Firecracker has no option to mark guest memory
mergeable: it never madvises it MADV_MERGEABLE, so KSM scans it only if whoever launches
Firecracker set ``prctl(PR_SET_MEMORY_MERGE, 1)`` first (inherited across fork and exec;
``--scope anon`` predicts that). The configuration names no VM: its name is the file's stem.
"""

from __future__ import annotations

from typing import Any

from .base import KSM_VMA_RULE, Reason, VmConfig, bad_config, stem

__all__ = ["is_firecracker", "read_firecracker"]

_DOC = "Firecracker docs/hugepages.md"


def is_firecracker(data: Any) -> bool:
    """A JSON object with Firecracker's ``machine-config``."""
    return isinstance(data, dict) and "machine-config" in data


def read_firecracker(path: str, data: dict[str, Any]) -> VmConfig:
    """The facts of one microVM's configuration."""
    machine = data["machine-config"]
    if not isinstance(machine, dict):
        raise bad_config(path, "machine-config is not an object")
    reasons = [Reason(
        "not_mergeable", "Firecracker (no mergeable option)",
        "Firecracker never madvises guest memory MADV_MERGEABLE: KSM scans it only if the "
        "launcher set prctl(PR_SET_MEMORY_MERGE, 1) before starting it (--scope anon)")]
    huge = machine.get("huge_pages")
    if huge not in (None, "None"):
        reasons.append(Reason("hugetlb", f"machine-config.huge_pages: {huge}",
                              f"{_DOC}: guest memory on {huge} hugetlbfs pages; "
                              f"{KSM_VMA_RULE}"))
    notes = []
    drives = data.get("drives") or []
    if isinstance(drives, list) and any(isinstance(d, dict) and d.get("socket")
                                        for d in drives):
        notes.append("a vhost-user drive (drives[].socket): Firecracker then backs guest "
                     "memory by a shared memfd, which KSM never scans either")
    return VmConfig(stem(path), path, "firecracker", tuple(reasons), notes=tuple(notes))
