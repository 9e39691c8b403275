"""libvirt domain XML (``virsh dumpxml NAME``): memory backing and NUMA tuning.

https://libvirt.org/formatdomain.html#memory-backing: ``<nosharepages/>`` "instructs
hypervisor to disable shared pages (memory merge, KSM) for this domain" (QEMU
``-machine mem-merge=off``); ``<hugepages/>`` backs guest RAM by hugetlbfs; ``<source
type="file|anonymous|memfd"/>`` and ``<access mode="shared|private"/>`` choose the backend
and whether it is mapped shared. https://libvirt.org/formatdomain.html#numa-node-tuning:
``<numatune><memory nodeset=.../>``.
"""

from __future__ import annotations

from typing import Any

from .base import KSM_VMA_RULE, QEMU_MEM_MERGE, Reason, VmConfig, bad_config, node_list

__all__ = ["read_libvirt"]

_DOC = "libvirt formatdomain (memoryBacking)"


def read_libvirt(path: str, text: str) -> VmConfig:
    """The facts of one ``<domain>`` (parsed with defusedxml: no entities, no DTD)."""
    from xml.etree.ElementTree import ParseError

    import defusedxml
    from defusedxml.ElementTree import fromstring

    try:
        root: Any = fromstring(text, forbid_dtd=True)
    except defusedxml.DefusedXmlException as e:
        raise bad_config(path, f"XML refused ({type(e).__name__}: DTDs and entities are "
                         "not read)") from None
    except ParseError as e:
        raise bad_config(path, f"malformed XML ({e})") from None
    if root.tag != "domain":
        raise bad_config(path, f"XML whose root is <{root.tag}>, not a libvirt <domain>")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise bad_config(path, "a libvirt <domain> without a <name>")
    reasons: list[Reason] = []
    notes: list[str] = []
    backing = root.find("memoryBacking")
    if backing is not None:
        if backing.find("nosharepages") is not None:
            reasons.append(Reason(
                "not_mergeable", "<memoryBacking><nosharepages/>",
                f'{_DOC}: "instructs hypervisor to disable shared pages (memory merge, KSM) '
                f'for this domain"; {QEMU_MEM_MERGE}'))
        huge = backing.find("hugepages")
        if huge is not None:
            sizes = [f"{p.get('size', '?')} {p.get('unit', 'KiB')}"
                     for p in huge.findall("page")]
            reasons.append(Reason(
                "hugetlb", "<memoryBacking><hugepages>" + (f" ({', '.join(sizes)})"
                                                         if sizes else ""),
                f"{_DOC}: guest RAM on hugetlbfs pages; {KSM_VMA_RULE}"))
        source = backing.find("source")
        kind = source.get("type", "anonymous") if source is not None else "anonymous"
        access = backing.find("access")
        mode = access.get("mode", "private") if access is not None else "private"
        if mode == "shared":
            reasons.append(Reason(
                "shared", f'<memoryBacking><source type="{kind}"/><access mode="shared"/>',
                f"{_DOC}: guest RAM mapped shared (MAP_SHARED {kind} memory, as vhost-user "
                f"and virtiofs need), not the private anonymous memory KSM merges; "
                f"{KSM_VMA_RULE}"))
        elif kind in ("file", "memfd"):
            notes.append(f'<source type="{kind}"/> mapped private: only the pages the guest '
                         "wrote (private copies) can merge, not page-cache pages")
    cells = root.findall("cpu/numa/cell")
    shared_cells = [c.get("id", "?") for c in cells if c.get("memAccess") == "shared"]
    if shared_cells and len(shared_cells) == len(cells) and not any(
            r.rule == "shared" for r in reasons):
        reasons.append(Reason(
            "shared", '<cpu><numa><cell memAccess="shared"> (every cell)',
            f"libvirt formatdomain (NUMA topology): each cell's memory mapped shared; "
            f"{KSM_VMA_RULE}"))
    elif shared_cells:
        notes.append(f"NUMA cells {', '.join(shared_cells)} of {len(cells)} are "
                     'memAccess="shared": their memory is never scanned (not modelled '
                     "per cell: the VM counts as scanned)")
    nodes: tuple[int, ...] = ()
    memory = root.find("numatune/memory")
    if memory is not None and memory.get("nodeset"):
        try:
            nodes = node_list(memory.get("nodeset"))
        except ValueError:
            raise bad_config(path, f"<numatune><memory nodeset={memory.get('nodeset')!r}>"
                             " is not a node list") from None
        notes.append(f"<numatune><memory mode=\"{memory.get('mode', 'strict')}\" "
                     f"nodeset=\"{memory.get('nodeset')}\">: host NUMA nodes "
                     f"{', '.join(map(str, nodes))}")
    return VmConfig(name, path, "libvirt", tuple(reasons), numa_nodes=nodes,
                    notes=tuple(notes))
