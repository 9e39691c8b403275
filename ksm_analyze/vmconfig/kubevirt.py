"""KubeVirt ``VirtualMachine`` (or ``VirtualMachineInstance``) YAML.

https://kubevirt.io/user-guide/compute/virtual_hardware/#hugepages:
``spec.template.spec.domain.memory.hugepages.pageSize`` (``2Mi``, ``1Gi``) backs the guest
by hugetlbfs pages. https://kubevirt.io/user-guide/storage/disks_and_volumes/ (virtiofs
filesystems): a ``devices.filesystems[].virtiofs`` device is served by virtiofsd over
vhost-user, which needs guest RAM mapped shared (libvirt kbase virtiofs:
``<source type="memfd"/><access mode="shared"/>``). KubeVirt has no per-VM KSM switch:
KSM is a node setting (``KubeVirt.spec.configuration.ksmConfiguration``), and virt-launcher
leaves QEMU's mem-merge on.
"""

from __future__ import annotations

from typing import Any

from .base import KSM_VMA_RULE, Reason, VmConfig, bad_config

__all__ = ["is_kubevirt", "read_kubevirt"]

KINDS = ("VirtualMachine", "VirtualMachineInstance")


def is_kubevirt(data: Any) -> bool:
    """A YAML mapping of kind ``VirtualMachine`` or ``VirtualMachineInstance``."""
    return isinstance(data, dict) and data.get("kind") in KINDS


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def read_kubevirt(path: str, data: dict[str, Any]) -> VmConfig:
    """The facts of one VM's spec; its name is ``metadata.name``."""
    name = _get(data, "metadata", "name")
    if not isinstance(name, str) or not name:
        raise bad_config(path, f"a {data['kind']} without metadata.name")
    spec = _get(data, "spec", "template", "spec") if data["kind"] == "VirtualMachine" \
        else data.get("spec")
    domain = _get(spec, "domain")
    if not isinstance(domain, dict):
        raise bad_config(path, f"a {data['kind']} without spec"
                         f"{'.template.spec' if data['kind'] == 'VirtualMachine' else ''}"
                         ".domain")
    reasons: list[Reason] = []
    notes: list[str] = []
    size = _get(domain, "memory", "hugepages", "pageSize")
    if size:
        reasons.append(Reason(
            "hugetlb", f"spec.template.spec.domain.memory.hugepages.pageSize: {size}",
            f"KubeVirt user guide (hugepages): guest memory on {size} hugetlbfs pages; "
            f"{KSM_VMA_RULE}"))
    filesystems = _get(domain, "devices", "filesystems") or []
    virtiofs = [str(f.get("name", "?")) for f in filesystems
                if isinstance(f, dict) and "virtiofs" in f] if isinstance(filesystems, list) \
        else []
    if virtiofs:
        reasons.append(Reason(
            "shared", f"devices.filesystems virtiofs ({', '.join(virtiofs)})",
            "virtiofs is a vhost-user device: guest RAM is mapped shared (memfd, libvirt "
            f"kbase virtiofs); {KSM_VMA_RULE}"))
    if _get(domain, "cpu", "numa", "guestMappingPassthrough") is not None:
        notes.append("cpu.numa.guestMappingPassthrough: the guest's NUMA cells follow the "
                     "host nodes of its dedicated CPUs")
    return VmConfig(name, path, "kubevirt", tuple(reasons), notes=tuple(notes))
