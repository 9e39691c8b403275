"""OpenStack Nova: one server group (policy ``affinity``) per planned host, and the
``ram_allocation_ratio`` the plan needs.

Each group is the JSON body of ``POST /os-server-groups`` at compute API microversion 2.64
(``{"server_group": {"name": ..., "policy": "affinity"}}``). The ratio is what the fullest
planned host asks of Nova: the memory its guests are given (each input's described size,
what a flavor's RAM is) over the host's memory less the reserve (Nova's
``reserved_host_memory_mb``), rounded up to hundredths. Nova admits a server while the
guests' memory stays within ``(host memory - reserved) x ram_allocation_ratio``: with these
two settings, every planned host's guests are admitted; KSM is what makes them fit.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import TYPE_CHECKING, Any

from ...units import human_bytes
from .common import fullest_need, host_groups, measured_lines, vm_names

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["MICROVERSION", "export", "ram_allocation_ratio", "server_group", "server_name"]

MICROVERSION = "2.64"
_MIB = 1 << 20


def server_group(name: str) -> dict[str, Any]:
    """The body of ``POST /os-server-groups`` (microversion 2.64) for an affinity group."""
    return {"server_group": {"name": name, "policy": "affinity"}}


def server_name(name: str) -> str:
    """``name`` within Nova's rules for a name: printable, no space at either end, 1 to 255
    characters (anything else becomes ``-``)."""
    name = re.sub(r"[^\x20-\x7e]", "-", name).strip()[:255].strip()
    return name or "vm"


def ram_allocation_ratio(plan: Plan) -> tuple[int, int, int]:
    """(hundredths, guests' bytes, capacity bytes): the ratio the fullest planned host
    needs, in hundredths rounded up, and the two numbers it is the quotient of."""
    need = fullest_need(plan)
    return -(-100 * need // plan.capacity), need, plan.capacity


def _ratio_text(hundredths: int) -> str:
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def export(plan: Plan) -> dict[str, str]:
    """File name -> text: ``server-group-host-N.json`` per host, ``nova.conf`` and
    ``README.txt``."""
    groups = host_groups(plan)
    names = vm_names([i for g in groups for i in g.inputs], server_name)
    files: dict[str, str] = {}
    hundredths, need, capacity = ram_allocation_ratio(plan)
    kept = max(hundredths, 100)
    reserved_mb = -(-(plan.host_memory - plan.capacity) // _MIB)
    measured, warnings = measured_lines(plan, percent=False, setting="ram_allocation_ratio")
    files["nova.conf"] = "\n".join([
        "# ksm-analyze plan: the compute nodes' memory overcommit for this plan.",
        (f"# The fullest planned host gives its guests {human_bytes(need)} on "
        f"{human_bytes(capacity)} ({human_bytes(plan.host_memory)} less the reserve):"),
        f"# a ratio of {_ratio_text(hundredths)}"
        + (" (under 1: no overcommit needed; 1.00 kept)." if hundredths < 100 else "."),
        *(f"# {line}" for line in measured + warnings),
        "[DEFAULT]",
        f"ram_allocation_ratio = {_ratio_text(kept)}",
        f"reserved_host_memory_mb = {reserved_mb}",
        "",
    ])
    lines = [
        "OpenStack Nova: keep each planned host's servers together (ksm-analyze plan)",
        "",
        "One server group per planned host, policy affinity: server-group-host-N.json is the",
        f"body of POST /os-server-groups at compute API microversion {MICROVERSION}.",
        "Servers are named by their input's file stem (printable, at most 255 characters):",
        "  input -> server (server group)",
    ]
    for g in groups:
        group = f"ksm-analyze-{g.name}"
        files[f"server-group-{g.name}.json"] = json.dumps(server_group(group), indent=2) + "\n"
        lines += [f"  {i} -> {names[i]} ({group})" for i in g.inputs]
    lines += ["", "Create the groups (the CLI, or the API with the JSON files):"]
    for g in groups:
        lines.append(f"  openstack --os-compute-api-version {MICROVERSION} server group create "
                     f"--policy affinity ksm-analyze-{g.name}")
    lines += [
        "  # or: curl -X POST \"$COMPUTE/os-server-groups\" -H \"X-Auth-Token: $TOKEN\" \\",
        (f"  #   -H 'OpenStack-API-Version: compute {MICROVERSION}' "
        "-H 'Content-Type: application/json' \\"),
        "  #   -d @server-group-host-0.json",
        "",
        "Create each server in its group (Nova adds a server to a group only when it is",
        "created: re-create existing servers, e.g. from a snapshot):",
    ]
    for g in groups:
        uuid = f"$(openstack server group show ksm-analyze-{g.name} -f value -c id)"
        lines += [f"  openstack server create --hint group={uuid} --flavor FLAVOR --image IMAGE "
                  f"{shlex.quote(names[i])}" for i in g.inputs]
    lines += [
        "",
        "Memory overcommit: put nova.conf's two settings in [DEFAULT] of each compute node's",
        "nova.conf and restart nova-compute:",
        (f"  ram_allocation_ratio = {_ratio_text(kept)}   (what the fullest planned host needs: "
        f"{human_bytes(need)} of guests"),
        f"    on {human_bytes(capacity)}, rounded up to hundredths"
        + (", and never under 1.00)" if hundredths < 100 else ")"),
        f"  reserved_host_memory_mb = {reserved_mb}   (the plan's --reserve)",
        *measured,
        *warnings,
        "The ratio holds only where KSM runs and merges what the plan predicts: check with",
        "ksm-analyze ksm-status on a compute node once the servers are up.",
        "",
    ]
    files["README.txt"] = "\n".join(lines)
    return files
