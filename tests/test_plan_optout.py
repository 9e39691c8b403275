"""An input whose VM configuration opts out of KSM (``--vm-config``, rule ``vm_config``) still
takes host memory: ``plan`` counts its pages whole and unmerged, in every host, marginal,
overcommit ratio, ``plan --add`` and export.

Facts by hand: vm-a.elf is ``dump-guest-memory`` of a 0x200000-byte window of the guest
(tests/sample_dumps.json: 512 pages, every one stored, 419 of them zero), so an opted-out
copy of it costs its host 512 x 4096 = 2 MiB, whole. vm-a and vm-c below are two copies of
it, both with ``<nosharepages/>``: were they scanned they would merge into one; they are not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import scan_memory
from test_vmconfig import LIBVIRT_NOSHAREPAGES
from typer.testing import CliRunner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.planning.plan import plan

SAMPLES = Path(__file__).resolve().parent.parent / "sample_dumps"
STORED = 512 * 4096  # vm-a.elf's stored pages, zero pages included: 2 MiB
MIB = 1 << 20
runner = CliRunner()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """vm-a and vm-c (copies of vm-a.elf, both <nosharepages/>) beside vm-b (eligible)."""
    tmp = tmp_path_factory.mktemp("optout_plan")
    dumps, configs = {}, {}
    for vm in ("vm-a", "vm-c"):
        dumps[vm] = tmp / f"{vm}.elf"
        shutil.copy(SAMPLES / "vm-a.elf", dumps[vm])
        configs[vm] = tmp / f"{vm}.xml"
        configs[vm].write_text(LIBVIRT_NOSHAREPAGES.replace("<name>vm-a</name>",
                                                            f"<name>{vm}</name>"))
    dumps["vm-b"] = SAMPLES / "vm-b.raw"
    analysis = analyze([dumps["vm-a"], dumps["vm-c"], dumps["vm-b"]], jobs=1,
                       vm_configs=[configs["vm-a"], configs["vm-c"]])
    return dumps, configs, analysis


def _scan_with_configs(fleet, vms):
    """``scan`` of ``vms`` with the configurations of those among them that have one."""
    dumps, configs, _ = fleet
    opts = [a for vm in vms if vm in configs for a in ("--vm-config", str(configs[vm]))]
    return scan_memory([str(dumps[vm]) for vm in vms], "-j", "1", *opts)


def test_an_opted_out_vm_takes_its_whole_size_and_hosts_stay_exact(fleet):
    dumps, configs, analysis = fleet
    p = plan(analysis, 3 * MIB)
    sharing = p.hosts[p.hosts["method"] == "sharing"]
    # 2 MiB each: vm-a and vm-c never share a host of 3 MiB (before: both counted 0 bytes,
    # and every input packed onto one host).
    assert len(sharing) == 2
    assert sorted(sorted(h) for h in sharing["inputs"]) == [["vm-a.elf", "vm-b.raw"],
                                                            ["vm-c.elf"]]
    for r in p.hosts.itertuples():
        vms = [Path(n).stem for n in r.inputs]
        opted = sum(vm in configs for vm in vms)
        # The stated exactness: scan of the host's inputs, plus the opted-out ones whole.
        assert r.memory_after_bytes == _scan_with_configs(fleet, vms) + opted * STORED, r
        assert r.unmerged_bytes == opted * STORED
    vm_b_alone = scan_memory([str(dumps["vm-b"])], "-j", "1")
    pair = sharing[sharing["input_count"] == 2].iloc[0]
    assert pair["memory_after_bytes"] == STORED + vm_b_alone
    assert pair["memory_before_bytes"] == STORED + 512 * 4096  # vm-b: 512 scanned pages
    assert [(u["input"], u["unmerged_bytes"]) for u in p.unmerged_inputs] == [
        ("vm-a.elf", STORED), ("vm-c.elf", STORED)]
    assert all("nosharepages" in u["reasons"][0] for u in p.unmerged_inputs)


def test_marginal_and_overcommit_count_it_whole(fleet):
    *_, analysis = fleet
    p = plan(analysis, 3 * MIB)
    m = p.marginal[p.marginal["input"] != "vm-b.raw"]
    assert len(m) == 4  # two inputs, two methods
    assert (m["added_bytes"] == STORED).all() and (m["alone_bytes"] == STORED).all()
    assert (m["memory_before_bytes"] == STORED).all()
    # A family of one opted-out VM: one 2 MiB guest per 3 MiB host, ratio 2/3, no band.
    row = p.overcommit[p.overcommit["family"] == "vm-a.elf"].iloc[0]
    assert (row["vms_per_host"], row["vms_per_host_low"], row["vms_per_host_high"]) == (1, 1, 1)
    assert row["ratio"] == pytest.approx(2 / 3)
    from ksm_analyze.planning.overcommit import supported_ratio

    assert supported_ratio(p) == pytest.approx(2 / 3)  # it saves nothing: the lowest


def test_plan_add_of_an_opted_out_vm_adds_its_whole_size(fleet, tmp_path):
    dumps, configs, _ = fleet
    placement = tmp_path / "assignments.csv"
    placement.write_text("method,input,host\nsharing,vm-a.elf,0\nsharing,vm-b.raw,0\n")
    r = runner.invoke(app, ["plan", str(dumps["vm-a"]), str(dumps["vm-b"]), "--host-memory",
                            "5MiB", "--placement", str(placement), "--add", str(dumps["vm-c"]),
                            "--vm-config", str(configs["vm-a"]), "--vm-config",
                            str(configs["vm-c"]), "-q", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    (choice,) = out["choices"]
    vm_b_alone = scan_memory([str(dumps["vm-b"])], "-j", "1")
    # Host 0 holds 2 MiB + vm-b's 368 KiB; vm-c adds 2 MiB more and fits 5 MiB.
    assert (choice["host"], choice["new_host"], choice["added_bytes"]) == (0, False, STORED)
    assert choice["headroom_after_bytes"] == 5 * MIB - 2 * STORED - vm_b_alone


def test_plan_says_which_inputs_it_counted_unmerged_and_exports_them(fleet, tmp_path):
    dumps, configs, _ = fleet
    args = ["plan", *(str(dumps[v]) for v in ("vm-a", "vm-c", "vm-b")), "--host-memory",
            "3MiB", "-q", "--vm-config", str(configs["vm-a"]), "--vm-config",
            str(configs["vm-c"])]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "Counted whole, unmerged" in r.stdout
    assert "    vm-a.elf: 2 MiB (<memoryBacking><nosharepages/>)" in r.stdout.splitlines()
    r = runner.invoke(app, [*args, "--json"])
    unmerged = json.loads(r.stdout)["unmerged_inputs"]
    assert [(u["input"], u["unmerged_human"]) for u in unmerged] == [("vm-a.elf", "2 MiB"),
                                                                     ("vm-c.elf", "2 MiB")]
    r = runner.invoke(app, [*args, "--export", "openstack", str(tmp_path / "os")])
    assert r.exit_code == 0, r.output
    readme = (tmp_path / "os" / "README.txt").read_text()
    groups = {line.split("(")[-1].rstrip(")"): [] for line in readme.splitlines()
              if " -> " in line and line.startswith("  vm-")}
    for line in readme.splitlines():
        if " -> " in line and line.startswith("  vm-"):
            groups[line.split("(")[-1].rstrip(")")].append(line.split()[0])
    # The groups as planned: vm-a and vm-c apart, each costing a host 2 MiB.
    assert sorted(map(sorted, groups.values())) == [["vm-a.elf", "vm-b.raw"], ["vm-c.elf"]]


def test_plan_json_carries_the_vm_configurations_as_scan_does(fleet, tmp_path):
    dumps, configs, _ = fleet
    inputs = [str(dumps[v]) for v in ("vm-a", "vm-c", "vm-b")]
    given = ["--vm-config", str(configs["vm-a"]), "--vm-config", str(configs["vm-c"])]

    def json_of(*args):
        r = runner.invoke(app, [*args, "-q", "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    scanned = json_of("scan", *inputs, *given)["vm_configs"]
    assert [(r["name"], r["eligible"]) for r in scanned] == [("vm-a", False), ("vm-c", False),
                                                             (None, True)]
    assert json_of("plan", *inputs, *given, "--host-memory", "3MiB")["vm_configs"] == scanned
    assert "vm_configs" not in json_of("plan", *inputs, "--host-memory", "8MiB")
    placement = tmp_path / "assignments.csv"
    placement.write_text("method,input,host\nsharing,vm-a.elf,0\nsharing,vm-b.raw,0\n")
    added = json_of("plan", inputs[0], inputs[2], *given, "--host-memory", "5MiB",
                    "--placement", str(placement), "--add", inputs[1])
    by_input = sorted(scanned, key=lambda r: r["input"])  # the new input comes last here
    assert sorted(added["vm_configs"], key=lambda r: r["input"]) == by_input
