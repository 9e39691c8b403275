"""Proxmox VE: keep each planned host's VMs on one node with the HA manager.

Proxmox VE 9 replaced HA groups with HA rules: a ``resource-affinity`` rule with
``affinity positive`` keeps its resources (``vm:VMID``) on one node, wherever that is
(``/etc/pve/ha/rules.cfg``, ``ha-manager rules add resource-affinity``). Proxmox VE 8 has
only HA groups (``/etc/pve/ha/groups.cfg``): a restricted group of one node per planned
host, each VM's HA resource in its host's group. Both files are Proxmox's section config:
``TYPE: ID`` then the properties, one a line, indented by a tab, a blank line between.

HA resources are VMIDs: an input whose file stem is a VMID (``101.raw``) gives it; for the
others the commands in README.txt look the VMID up by the VM's name at apply time, and the
.cfg files (which need the VMIDs) are not written.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING

from .common import host_groups, vm_name, vm_names

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["export", "groups_cfg", "pve_name", "rules_cfg", "vmid"]

def pve_name(name: str) -> str:
    """``name`` as a Proxmox VE VM name (a DNS name: labels of letters, digits and ``-``
    joined by dots); any other run of characters becomes ``-``; nothing left -> ``vm``."""
    labels = [re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-")
              for part in name.split(".")]
    return ".".join(label for label in labels if label)[:63].strip(".-") or "vm"


def vmid(input_name: str) -> int | None:
    """The VMID an input's file stem is (100 to 999999999), or None."""
    stem = vm_name(input_name)
    if re.fullmatch(r"[1-9][0-9]{2,8}", stem):
        return int(stem)
    return None


def rules_cfg(groups: dict[str, list[int]]) -> str:
    """``/etc/pve/ha/rules.cfg`` sections (Proxmox VE 9): a positive resource-affinity
    rule per group of two VMs or more."""
    out = []
    for name, ids in groups.items():
        if len(ids) > 1:
            out.append(f"resource-affinity: ksm-analyze-{name}\n"
                       f"\tresources {','.join(f'vm:{i}' for i in ids)}\n"
                       "\taffinity positive\n")
    return "\n".join(out)


def groups_cfg(groups: dict[str, list[int]]) -> str:
    """``/etc/pve/ha/groups.cfg`` sections (Proxmox VE 8): a restricted HA group of one node
    per planned host (the node named as the planned host: rename it to a real node)."""
    return "\n".join(f"group: ksm-analyze-{name}\n\tnodes {name}\n\trestricted 1\n"
                     "\tnofailback 0\n" for name in groups)


def export(plan: Plan) -> dict[str, str]:
    """File name -> text: ``README.txt``, and with every VMID known ``rules.cfg`` and
    ``groups.cfg``."""
    groups = host_groups(plan)
    inputs = [i for g in groups for i in g.inputs]
    names = vm_names(inputs, pve_name)
    ids = {i: vmid(i) for i in inputs}
    known = all(v is not None for v in ids.values())

    def ref(i: str) -> str:
        return f"vm:{ids[i]}" if known else f"vm:$(vmid {shlex.quote(names[i])})"

    lines = [
        "Proxmox VE: keep each planned host's VMs on one node (ksm-analyze plan)",
        "",
        "VMs are named by their input's file stem (a DNS name, as Proxmox VE names VMs);",
        "HA resources are VMIDs: " + ("each stem is one." if known else
                                      "not every stem is one, so the commands below look "
                                      "each up by name."),
        "  input -> VM name, HA resource (planned host)",
    ]
    lines += [f"  {i} -> {names[i]}, {ref(i)} ({g.name})" for g in groups for i in g.inputs]
    if not known:
        lines += [
            "",
            "Define this first (a VM's VMID by its name, from the cluster's resources):",
            ("  vmid() { pvesh get /cluster/resources --type vm --output-format json | perl "
            "-MJSON::PP -e 'my $n = shift; print map { \"$_->{vmid}\\n\" } grep "
            "{ ($_->{name} // \"\") eq $n } @{decode_json(join \"\", <STDIN>)}' \"$1\"; }"),
        ]
    lines += ["", "Proxmox VE 9 (HA rules): make each VM an HA resource, then one positive",
              "resource-affinity rule per planned host of two VMs or more:"]
    lines += [f"  ha-manager add {ref(i)}" for i in inputs]
    for g in groups:
        if len(g.inputs) > 1:
            lines.append(f"  ha-manager rules add resource-affinity ksm-analyze-{g.name} "
                         f"--affinity positive --resources {','.join(ref(i) for i in g.inputs)}")
    singles = [g.name for g in groups if len(g.inputs) == 1]
    if singles:
        lines.append(f"  (no rule for {', '.join(singles)}: one VM needs none)")
    lines += ["  ha-manager rules config   # shows /etc/pve/ha/rules.cfg", "",
              "Proxmox VE 8 (HA groups): one restricted group of one node per planned host;",
              "replace host-N by the node that is to run it:"]
    for g in groups:
        lines.append(f"  ha-manager groupadd ksm-analyze-{g.name} --nodes {g.name} "
                     "--restricted 1 --nofailback 0")
    lines += [f"  ha-manager add {ref(i)} --group ksm-analyze-{g.name}   "
              f"# or: ha-manager set {ref(i)} --group ksm-analyze-{g.name}"
              for g in groups for i in g.inputs]
    files: dict[str, str] = {}
    if known:
        by_group = {g.name: [ids[i] or 0 for i in g.inputs] for g in groups}
        files["rules.cfg"] = rules_cfg(by_group)
        files["groups.cfg"] = groups_cfg(by_group)
        lines += ["", "rules.cfg and groups.cfg are what these commands write into",
                  "/etc/pve/ha/ (for reading: let ha-manager write the files)."]
    else:
        lines += ["", "rules.cfg and groups.cfg are not written: they need every VMID (name",
                  "the dumps by VMID, e.g. 101.raw, to have them)."]
    files["README.txt"] = "\n".join([*lines, ""])
    return files
