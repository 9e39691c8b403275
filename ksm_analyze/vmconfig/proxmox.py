"""Proxmox VE ``qm config VMID`` output (the ``key: value`` lines of
``/etc/pve/qemu-server/VMID.conf``).

https://pve.proxmox.com/wiki/Manual:_qm.conf: ``allow-ksm: <boolean> (default = 1)`` "Allow
memory pages of this guest to be merged via KSM" (0: QEMU ``mem-merge=off``);
``hugepages: <1024 | 2 | any>`` "Enables hugepages memory"; ``numa: <boolean>`` and
``numa[n]: ...hostnodes=...,policy=...`` bind the guest's memory to host nodes.
"""

from __future__ import annotations

import re

from .base import KSM_VMA_RULE, QEMU_MEM_MERGE, Reason, VmConfig, bad_config, node_list, stem

__all__ = ["looks_like_qm_config", "read_proxmox"]

_LINE = re.compile(r"([a-z][a-z0-9_-]*):\s?(.*)")
_DOC = "Proxmox VE qm.conf"


def _lines(text: str) -> list[str]:
    """The configuration's lines up to its first section (``[snapshot]``, ``[special:...]``),
    comments and blank lines dropped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            break
        if line and not line.startswith("#"):
            out.append(line)
    return out


def looks_like_qm_config(text: str) -> bool:
    """Every line is ``key: value`` with Proxmox's lower-case keys, and a key Proxmox
    writes for every VM is there (``memory``, ``name``, ``cores``, ``ostype``...)."""
    lines = _lines(text)
    keys = {m[1] for m in map(_LINE.fullmatch, lines) if m}
    return bool(lines) and all(_LINE.fullmatch(line) for line in lines) and bool(
        keys & {"memory", "cores", "sockets", "ostype", "boot", "scsihw", "smbios1",
                "vmgenid", "allow-ksm", "hugepages", "numa"})


def read_proxmox(path: str, text: str) -> VmConfig:
    """The facts of one VM's configuration; its name is ``name:``, else the VMID (the
    file's stem, as ``qm config VMID > VMID.conf`` writes it)."""
    values: dict[str, str] = {}
    for line in _lines(text):
        m = _LINE.fullmatch(line)
        if m is None:
            raise bad_config(path, f"line {line[:60]!r} is not 'key: value'")
        values[m[1]] = m[2].strip()
    vmid = stem(path)
    name = values.get("name") or vmid
    reasons: list[Reason] = []
    if values.get("allow-ksm", "1").strip() in ("0", "no", "off", "false"):
        reasons.append(Reason(
            "not_mergeable", f"allow-ksm: {values['allow-ksm']}",
            f'{_DOC}: "allow-ksm: Allow memory pages of this guest to be merged via KSM" '
            f"(default 1); {QEMU_MEM_MERGE}"))
    if values.get("hugepages"):
        size = values["hugepages"]
        reasons.append(Reason(
            "hugetlb", f"hugepages: {size}",
            f"{_DOC}: hugepages: <1024 | 2 | any> backs guest memory by hugetlbfs pages "
            f"({'1 GiB' if size == '1024' else '2 MiB' if size == '2' else 'any size'}); "
            f"{KSM_VMA_RULE}"))
    nodes: set[int] = set()
    notes = []
    for key, value in sorted(values.items()):
        if not re.fullmatch(r"numa\d+", key):
            continue
        options = dict(part.partition("=")[::2] for part in value.split(","))
        if options.get("hostnodes"):
            try:
                nodes.update(node_list(options["hostnodes"]))
            except ValueError:
                raise bad_config(path, f"{key}: hostnodes={options['hostnodes']!r} is not "
                                 "a node list") from None
            notes.append(f"{key}: hostnodes={options['hostnodes']}, "
                         f"policy={options.get('policy', 'preferred')}")
    if values.get("numa") in ("1",) and not nodes:
        notes.append("numa: 1 (guest NUMA topology, no host node binding)")
    return VmConfig(name, path, "proxmox", tuple(reasons), aliases=(vmid,),
                    numa_nodes=tuple(sorted(nodes)), notes=tuple(notes))
