"""Capacity planning on real QEMU guests: two workloads, two guests each, one kernel.

Four 96 MiB guests boot the same kernel and initramfs; two fill 8 MiB with the "web"
workload's pages, two with the "db" workload's, all four 2 MiB of common pages. Their RAM
(``pmemsave``) is planned onto hosts that hold two guests: the sharing-aware plan must put
guests of one workload together, and every host must be what ``scan`` says.
"""

from __future__ import annotations

import pytest
from conftest import scan_memory

from ksm_analyze import analyze
from ksm_analyze.planning.plan import plan
from qemu_guest import Guest, ensure_guest_assets, qemu_available

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
]
MEM = 96 << 20


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    assets = ensure_guest_assets()
    paths = []
    for name, workload in (("web1", "web"), ("db1", "db"), ("web2", "web"), ("db2", "db")):
        with Guest(assets, mem_mib=MEM >> 20, workdir=d / name,
                   cmdline_extra=f"ksmfill=common:2 ksmfill={workload}:8") as guest:
            guest.pause()
            paths.append(str(guest.pmemsave(0, MEM, d / f"{name}.raw")))
    return paths


def test_real_guests_of_one_workload_share_a_host(guests):
    result = analyze(guests)
    # A host just big enough for the larger same-workload pair.
    web, db = [guests[0], guests[2]], [guests[1], guests[3]]
    capacity = max(scan_memory(web), scan_memory(db))
    planned = plan(result, capacity, project=[2, 4, 8])
    hosts = planned.hosts[planned.hosts["method"] == "sharing"]
    assert sorted(hosts["inputs"]) == [["db1.raw", "db2.raw"], ["web1.raw", "web2.raw"]]
    for r in planned.hosts.itertuples():
        inputs = [p for p in guests for n in r.inputs if p.endswith("/" + n)]
        assert r.memory_after_bytes == scan_memory(inputs)
        assert r.memory_after_bytes <= capacity
    summary = planned.summary.set_index("method")["hosts"]
    # First-fit, blind to sharing, sees guests too big to pair: one host each.
    assert summary["sharing"] == 2 < summary["first_fit"]
    assert summary["lower_bound"] <= summary["sharing"]
    proj = planned.projection.set_index("input_count")
    assert proj.loc[4, "memory_after_bytes"] == scan_memory(guests)  # all four, any order
    assert proj.loc[8, "memory_after_bytes"] < proj.loc[8, "memory_before_bytes"]
    # A random pair is of one workload a third of the time: on average two do not fit.
    assert planned.fits is not None
    expected, cautious, hopeful = planned.fits
    assert 1 <= cautious <= expected <= hopeful
