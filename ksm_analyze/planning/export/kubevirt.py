"""KubeVirt: one merge patch per ``VirtualMachine`` that keeps each planned host's VMs on
one node.

Each VM of planned host N gets the label ``ksm-analyze.io/host-group: host-N`` on its
template (KubeVirt copies the template's labels to the VM's virt-launcher pod) and a
required ``podAffinity`` on that label with ``topologyKey: kubernetes.io/hostname``: the
VMs of a group run on one node (the scheduler lets the first one anywhere, since it matches
its own term). With several groups, a preferred ``podAntiAffinity`` keeps other groups off
that node where it can. Written as YAML (a subset with every string double-quoted, so no
value is read as anything but a string).
"""

from __future__ import annotations

import json
import re
import shlex
from typing import TYPE_CHECKING, Any

from ...units import human_bytes
from .common import dns_label, fullest_need, host_groups, measured_lines, vm_names

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["LABEL", "TOPOLOGY_KEY", "export", "patch"]

LABEL = "ksm-analyze.io/host-group"
TOPOLOGY_KEY = "kubernetes.io/hostname"


def patch(group: str, *, others: bool) -> dict[str, Any]:
    """The merge patch of a ``VirtualMachine`` of ``group``; ``others``: there are other
    groups to keep off its node (a preferred anti-affinity)."""
    affinity: dict[str, Any] = {"podAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchExpressions": [
                {"key": LABEL, "operator": "In", "values": [group]}]},
            "topologyKey": TOPOLOGY_KEY}]}}
    if others:
        affinity["podAntiAffinity"] = {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {
                "labelSelector": {"matchExpressions": [
                    {"key": LABEL, "operator": "Exists"},
                    {"key": LABEL, "operator": "NotIn", "values": [group]}]},
                "topologyKey": TOPOLOGY_KEY}}]}
    return {"spec": {"template": {"metadata": {"labels": {LABEL: group}},
                                  "spec": {"affinity": affinity}}}}


def export(plan: Plan) -> dict[str, str]:
    """File name -> text: ``<vm>.yaml`` per VM and ``README.txt``."""
    groups = host_groups(plan)
    names = vm_names([i for g in groups for i in g.inputs], dns_label)
    files: dict[str, str] = {}
    lines = [
        "KubeVirt: keep each planned host's VMs on one node (ksm-analyze plan, sharing-aware)",
        "",
        f"Each VM of planned host N gets the label {LABEL}=host-N on spec.template.metadata",
        "and, on spec.template.spec.affinity, a required podAffinity to that label with",
        f"topologyKey {TOPOLOGY_KEY}" + (": its group's VMs share a node; a preferred"
                                          " podAntiAffinity keeps the other groups off it."
                                          if len(groups) > 1 else ": its VMs share a node."),
        (f"Nodes of {human_bytes(plan.host_memory)}, {human_bytes(plan.capacity)} for VMs "
        "(the plan's --host-memory and --reserve)."),
        "",
        "VMs are named by their input's file stem as a DNS-1123 label (lower case, a-z 0-9 -):",
        "  input -> VirtualMachine (group)",
    ]
    for g in groups:
        for i in g.inputs:
            lines.append(f"  {i} -> {names[i]} ({g.name})")
            files[f"{names[i]}.yaml"] = to_yaml(patch(g.name, others=len(groups) > 1))
    lines += [
        "",
        "Apply (a merge patch: VirtualMachine is a custom resource; add -n NAMESPACE):",
    ]
    for g in groups:
        for i in g.inputs:
            vm = shlex.quote(names[i])
            lines.append(f"  kubectl patch virtualmachine {vm} --type merge "
                         f"--patch-file {shlex.quote(names[i] + '.yaml')}")
    lines += [
        "",
        "The template change reaches a running VM when its VirtualMachineInstance is made",
        "again: restart each VM (virtctl restart NAME), or live-migrate it where the",
        "cluster's VM rollout strategy is LiveUpdate. A merge patch replaces the lists it",
        "sets (podAffinity, podAntiAffinity terms) and keeps the rest (nodeAffinity, other",
        "labels). Check the result:",
        f"  kubectl get vmi -L {LABEL} -o wide",
        "",
    ]
    measured, warnings = measured_lines(plan, percent=True, setting="memoryOvercommit")
    need = fullest_need(plan)
    lines += [
        ("Memory overcommit (the KubeVirt CR's spec.configuration.developerConfiguration."
         "memoryOvercommit,"),
        (f"percent: 100 x the ratio): the fullest planned node gives its VMs "
         f"{human_bytes(need)} on {human_bytes(plan.capacity)}:"),
        f"  {-(-100 * need // plan.capacity)}% (rounded up).",
        *measured, *warnings, "",
    ]
    files["README.txt"] = "\n".join(lines)
    return files


def to_yaml(value: Any) -> str:
    """Block-style YAML of dicts, lists, strings, integers and booleans; strings are
    written double-quoted (JSON escapes are YAML's), keys plain where they are words."""
    return "\n".join(_lines(value, 0)) + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key) else json.dumps(key)


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, dict | list) and v:
                out += [f"{pad}{_key(k)}:", *_lines(v, indent + 2)]
            else:
                out.append(f"{pad}{_key(k)}: {_empty(v) if isinstance(v, dict | list) else _scalar(v)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list) and item:
                inner = _lines(item, indent + 2)
                out += [f"{pad}- {inner[0][indent + 2:]}", *inner[1:]]
            else:
                out.append(f"{pad}- {_empty(item) if isinstance(item, dict | list) else _scalar(item)}")
    else:
        out.append(pad + _scalar(value))
    return out


def _empty(value: dict[Any, Any] | list[Any]) -> str:
    return "{}" if isinstance(value, dict) else "[]"
