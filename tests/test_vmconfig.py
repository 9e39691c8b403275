"""--vm-config: eligibility read from VM configurations (ksm_analyze/vmconfig/).

Each configuration below is shaped after the project's own published form and example
(named at each); every opt-out is seen and explained. A dump whose VM opted out predicts
nothing for it: the host equals a scan of the other input alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.errors import KsmAnalyzeError
from ksm_analyze.vmconfig import MAX_CONFIG_BYTES, input_stems, match, read_config

SAMPLES = Path(__file__).resolve().parent.parent / "sample_dumps"
PAGES_OF_VM_A = (SAMPLES / "vm-a.elf").stat().st_size // 4096  # every page of it, at most

# `virsh dumpxml` of a KVM guest (the element order libvirt writes; formatdomain.html,
# "Memory Backing": <nosharepages/>).
LIBVIRT_NOSHAREPAGES = """<domain type='kvm' id='3'>
  <name>vm-a</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <memoryBacking>
    <nosharepages/>
  </memoryBacking>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
</domain>
"""
# formatdomain.html, "Memory Backing" (hugepages with a page size) and "NUMA Node Tuning".
LIBVIRT_HUGEPAGES_NUMA = """<domain type='kvm'>
  <name>db-1</name>
  <memory unit='KiB'>4194304</memory>
  <memoryBacking>
    <hugepages>
      <page size='2048' unit='KiB' nodeset='0'/>
    </hugepages>
  </memoryBacking>
  <numatune>
    <memory mode='strict' nodeset='0-1'/>
  </numatune>
</domain>
"""
# libvirt kbase "Sharing files with Virtiofs" (https://libvirt.org/kbase/virtiofs.html).
LIBVIRT_VIRTIOFS = """<domain type='kvm'>
  <name>fs-1</name>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <devices>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs' queue='1024'/>
      <source dir='/path'/>
      <target dir='mount_tag'/>
    </filesystem>
  </devices>
</domain>
"""
# `qm config 101` (keys of https://pve.proxmox.com/wiki/Manual:_qm.conf).
QM_CONFIG = """allow-ksm: 0
boot: order=scsi0;ide2;net0
cores: 2
hugepages: 2
memory: 4096
meta: creation-qemu=8.1.5,ctime=1714000000
name: web-1
net0: virtio=BC:24:11:2E:7A:01,bridge=vmbr0,firewall=1
numa: 1
numa0: cpus=0-1,hostnodes=1,memory=4096,policy=bind
ostype: l26
scsi0: local-lvm:vm-101-disk-0,iothread=1,size=32G
scsihw: virtio-scsi-single
smbios1: uuid=6b4f2f3a-0c1e-4f6a-9d55-7f0b2d0e6f11
sockets: 1
vmgenid: 0e2c5f9a-8f7b-4f4e-9c8e-2f6b7a1d3c55
"""
# `ch-remote info` (Cloud Hypervisor's VmInfo: config.memory is MemoryConfig,
# docs/memory.md and vmm/src/api/openapi/cloud-hypervisor.yaml).
CH_INFO = {"config": {"cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                      "memory": {"size": 2147483648, "mergeable": True, "shared": True,
                                 "hugepages": False, "hugepage_size": None,
                                 "hotplug_method": "Acpi", "prefault": False, "thp": True},
                      "payload": {"kernel": "/opt/vmlinux", "cmdline": "console=hvc0"}},
           "state": "Running", "memory_actual_size": 2147483648}
# firecracker --config-file (tests/framework/vm_config.json; docs/hugepages.md: huge_pages).
FIRECRACKER = {"boot-source": {"kernel_image_path": "vmlinux.bin",
                               "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"},
               "drives": [{"drive_id": "rootfs", "path_on_host": "bionic.rootfs.ext4",
                           "is_root_device": True, "is_read_only": False}],
               "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": False,
                                  "huge_pages": "2M"}}
# KubeVirt user guide, "Virtual hardware: Hugepages" (a VirtualMachine around it).
KUBEVIRT = """apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: vm-huge
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        memory:
          hugepages:
            pageSize: "2Mi"
        resources:
          requests:
            memory: 2Gi
        devices:
          disks:
          - name: containerdisk
            disk:
              bus: virtio
      volumes:
      - name: containerdisk
        containerDisk:
          image: quay.io/kubevirt/cirros-container-disk-demo
"""


def _write(tmp_path: Path, name: str, text: str | dict) -> Path:
    path = tmp_path / name
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return path


def _rules(config):
    return {r.rule for r in config.reasons}


def test_libvirt_nosharepages_is_not_mergeable(tmp_path):
    c = read_config(_write(tmp_path, "a.xml", LIBVIRT_NOSHAREPAGES))
    assert (c.name, c.format, _rules(c)) == ("vm-a", "libvirt", {"not_mergeable"})
    assert "memory merge, KSM" in c.reasons[0].text()
    assert not c.eligible("mergeable") and c.eligible("anon") and c.eligible("all")


def test_libvirt_hugepages_and_numatune(tmp_path):
    c = read_config(_write(tmp_path, "db.xml", LIBVIRT_HUGEPAGES_NUMA))
    assert _rules(c) == {"hugetlb"} and "VM_HUGETLB" in c.reasons[0].documented
    assert c.numa_nodes == (0, 1)
    assert not c.eligible("anon")  # PR_SET_MEMORY_MERGE does not make hugetlbfs scannable


def test_libvirt_shared_memfd_of_virtiofs(tmp_path):
    c = read_config(_write(tmp_path, "fs.xml", LIBVIRT_VIRTIOFS))
    assert _rules(c) == {"shared"} and 'access mode="shared"' in c.reasons[0].setting


def test_proxmox_qm_config(tmp_path):
    c = read_config(_write(tmp_path, "101.conf", QM_CONFIG))
    assert (c.name, c.format, c.names) == ("web-1", "proxmox", ("web-1", "101"))
    assert _rules(c) == {"not_mergeable", "hugetlb"}
    assert any("allow-ksm: 0" in r.setting for r in c.reasons)
    assert c.numa_nodes == (1,)


def test_cloud_hypervisor_shared_memory(tmp_path):
    c = read_config(_write(tmp_path, "ch-1.json", CH_INFO))
    assert (c.name, c.format, _rules(c)) == ("ch-1", "cloud-hypervisor", {"shared"})
    off = read_config(_write(tmp_path, "ch-2.json", {"cpus": {}, "memory": {"size": 1}}))
    assert _rules(off) == {"not_mergeable"}  # mergeable defaults to off


def test_firecracker_is_never_mergeable(tmp_path):
    c = read_config(_write(tmp_path, "fc-1.json", FIRECRACKER))
    assert (c.format, _rules(c)) == ("firecracker", {"not_mergeable", "hugetlb"})
    assert any("PR_SET_MEMORY_MERGE" in r.documented for r in c.reasons)


def test_kubevirt_hugepages(tmp_path):
    c = read_config(_write(tmp_path, "vm.yaml", KUBEVIRT))
    assert (c.name, c.format, _rules(c)) == ("vm-huge", "kubevirt", {"hugetlb"})
    assert "2Mi" in c.reasons[0].setting


def test_matching_by_stem():
    assert input_stems("x/vm-a.s000.ksmfp.parquet")[-1] == "vm-a"
    from ksm_analyze.vmconfig import VmConfig

    a, b = VmConfig("vm-a", "a.xml", "libvirt"), VmConfig("vm-b", "b.xml", "libvirt")
    assert match([a], ["d/vm-a.elf", "d/other.raw"]) == [a, None]
    with pytest.raises(ValueError, match="matches no input"):
        match([a, b], ["d/vm-a.elf"])
    with pytest.raises(ValueError, match="matches two"):
        match([a, VmConfig("x", "c.xml", "libvirt", aliases=("vm-a",))], ["vm-a.elf"])


@pytest.fixture(scope="module")
def opted_out(tmp_path_factory):
    """vm-a (copied) with a <nosharepages/> configuration, beside vm-b; and vm-b alone."""
    tmp = tmp_path_factory.mktemp("optout")
    dump = tmp / "vm-a.elf"
    shutil.copy(SAMPLES / "vm-a.elf", dump)
    config = _write(tmp, "vm-a.xml", LIBVIRT_NOSHAREPAGES)
    both = analyze([dump, SAMPLES / "vm-b.raw"], jobs=1, vm_configs=[config])
    alone = analyze([SAMPLES / "vm-b.raw"], jobs=1)
    plain = analyze([dump, SAMPLES / "vm-b.raw"], jobs=1)
    return dump, config, both, alone, plain


def test_a_vm_that_opted_out_predicts_nothing(opted_out):
    _, _, both, alone, plain = opted_out
    assert both.counters == alone.counters
    assert plain.counters != alone.counters  # vm-a does change the host when scanned
    row = both.per_input.iloc[0]
    assert row["nonzero_pages"] == row["zero_pages"] == 0
    excluded = both.exclusions.iloc[0]
    assert excluded["vm_config"] == plain.per_input.iloc[0][["nonzero_pages", "zero_pages"]].sum()
    assert 0 < excluded["vm_config"] <= PAGES_OF_VM_A
    assert both.exclusions.iloc[1]["vm_config"] == 0
    records = both.to_dict()["vm_configs"]
    assert [(r["name"], r["eligible"]) for r in records] == [("vm-a", False), (None, True)]
    assert "nosharepages" in records[0]["reasons"][0]


def test_plan_follows(opted_out):
    from ksm_analyze.planning.plan import plan

    _, _, both, alone, _ = opted_out
    host = plan(both, 1 << 30).hosts
    # KSM merges nothing of vm-a, but the host holds it whole: its 512 stored pages (the
    # 0x200000-byte window of tests/sample_dumps.json), zero pages included.
    assert host["memory_after_bytes"].sum() == plan(alone, 1 << 30).hosts[
        "memory_after_bytes"].sum() + 2 * 512 * 4096  # two rows: sharing and first-fit


def test_cli_lists_the_input_before_hashing_and_reports_it(opted_out, tmp_path):
    dump, config, *_ = opted_out
    r = CliRunner().invoke(app, ["scan", str(dump), str(SAMPLES / "vm-b.raw"), "-q",
                                 "--vm-config", str(config.parent / "vm-a.xml")])
    assert r.exit_code == 0, r.output
    first = r.stderr.splitlines()[0]
    assert first.startswith(f"Note: {dump}: KSM will not scan it") and "nosharepages" in first
    assert "VM configurations (--vm-config" in r.stdout
    r = CliRunner().invoke(app, ["scan", str(dump), "-q", "--json", "--scope", "anon",
                                 "--vm-config", str(config)])
    assert r.exit_code == 0 and not r.stderr  # scope anon: nosharepages does not apply
    assert json.loads(r.stdout)["vm_configs"][0]["eligible"] is True


@pytest.mark.parametrize(("text", "code", "said"), [
    (('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
      "<domain><name>&b;</name></domain>"), 1, "XML refused"),
    ("<domain><name>vm-a</name>", 1, "malformed XML"),
    ("<network><name>vm-a</name></network>", 1, "not a libvirt <domain>"),
    ("kind: VirtualMachine\nmetadata: {name: [unclosed\n", 1, "malformed YAML"),
    ("{\"machine-config\": 3}", 1, "machine-config is not an object"),
    ("hello world\n", 1, "neither libvirt"),
    ("<domain><name>nobody</name></domain>", 2, "matches no input"),
    (None, 1, "larger than 1 MiB"),
])
def test_bad_files_are_one_clear_line(tmp_path, text, code, said):
    path = tmp_path / "vm-a.cfg"
    if text is None:
        path.write_bytes(b"<" + b" " * MAX_CONFIG_BYTES)
    else:
        path.write_text(text)
    r = CliRunner().invoke(app, ["scan", str(SAMPLES / "vm-a.elf"), "-q",
                                 "--vm-config", str(path)])
    assert r.exit_code == code, r.output
    assert len(r.stderr.splitlines()) == 1 and said in r.stderr and "Traceback" not in r.output
    assert r.stderr.startswith("Error: ")


def test_a_folder_and_two_configs_for_one_input(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    _write(folder, "a.xml", LIBVIRT_NOSHAREPAGES)
    _write(folder, "b.conf", "memory: 2048\nname: vm-a\n")
    with pytest.raises(ValueError, match="both describe a VM named 'vm-a'"):
        analyze([SAMPLES / "vm-a.elf"], vm_configs=[folder])
    (folder / "b.conf").unlink()
    with pytest.raises(KsmAnalyzeError, match="no VM configuration files"):
        analyze([SAMPLES / "vm-a.elf"], vm_configs=[tmp_path / "configs" / "a.xml",
                                                     _empty(tmp_path)])


def _empty(tmp_path: Path) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty
