"""``plan --export``: each export parsed back by a parser that is not ours (the Kubernetes
Python client's models, Nova's own JSON schema, configparser, PyYAML) or, for Proxmox's
section config, one written here from Proxmox's documented format; the host groups read
back are the plan's.

proxmoxer is an API client: it sends requests to a running Proxmox VE and has no schema to
check a file or a command against offline, so it validates nothing here.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shlex
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import PS, SAMPLES, runner
from hypothesis import given, settings
from hypothesis import strategies as st

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.planning.export import ExportError, export_files, write_export
from ksm_analyze.planning.export.common import dns_label, vm_name, vm_names
from ksm_analyze.planning.export.proxmox import pve_name
from ksm_analyze.planning.plan import plan

SHARED, PRIVATE = 200, 20
GUEST = (SHARED + PRIVATE) * PS  # each input's size: 220 pages
HOST, RESERVE = 2 << 20, 480 << 10  # 1.53 MiB for guests: a pair fits after KSM, 3 inputs not
# The pairs, by construction: 101/102 share 200 pages, 201/202 another 200, nothing across.
PAIRS = [{"101", "102"}, {"201", "202"}]


@pytest.fixture(scope="module")
def pair_paths(tmp_path_factory):
    rng = np.random.default_rng(23)
    d = tmp_path_factory.mktemp("vmids")
    paths = []
    for group in PAIRS:
        common = rng.integers(0, 256, (SHARED, PS), dtype=np.uint8)
        for vmid in sorted(group):
            path = d / f"{vmid}.raw"
            np.concatenate([common, rng.integers(0, 256, (PRIVATE, PS), dtype=np.uint8)]
                           ).tofile(path)
            paths.append(str(path))
    return [paths[0], paths[2], paths[1], paths[3]]  # interleaved: first-fit mixes them


@pytest.fixture(scope="module")
def pair_plan(pair_paths):
    return plan(analyze(pair_paths, jobs=1), HOST, reserve=RESERVE)


@pytest.fixture(scope="module")
def sample_plan():
    return plan(analyze(SAMPLES, jobs=1), 1 << 30)


def _plan_groups(result, name=vm_name):
    """The sharing-aware placement as sets of VM names (from the assignments table)."""
    rows = result.assignments[result.assignments["method"] == "sharing"]
    return sorted(({name(r.input) for r in g.itertuples()} for _, g in rows.groupby("host")),
                  key=sorted)


def test_the_pair_plan_is_the_pairs(pair_plan):
    # The groups every export below must give back, first from the construction.
    assert _plan_groups(pair_plan) == PAIRS


# KubeVirt -------------------------------------------------------------------------------

DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # Kubernetes' validation
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def _deserialize(api, value, kind):
    """``value`` read by the Kubernetes client as a response body of ``kind``."""
    return api.deserialize(json.dumps(value), kind, "application/json")


def _kubevirt_groups(folder: Path) -> list[set[str]]:
    from kubernetes.client import ApiClient, V1Affinity, V1ObjectMeta

    api = ApiClient()
    groups: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.yaml")):
        vm = path.stem
        assert DNS_1123_LABEL.fullmatch(vm) and len(vm) <= 63
        doc = yaml.safe_load(path.read_text())
        assert set(doc) == {"spec"} and set(doc["spec"]) == {"template"}
        template = doc["spec"]["template"]
        meta = _deserialize(api, template["metadata"], "V1ObjectMeta")
        affinity = _deserialize(api, template["spec"]["affinity"], "V1Affinity")
        assert isinstance(meta, V1ObjectMeta) and isinstance(affinity, V1Affinity)
        # The client drops keys it does not know: equal after the round trip = all known.
        assert api.sanitize_for_serialization(meta) == template["metadata"]
        assert api.sanitize_for_serialization(affinity) == template["spec"]["affinity"]
        group = meta.labels["ksm-analyze.io/host-group"]
        assert LABEL_VALUE.fullmatch(group) and len(group) <= 63
        (term,) = affinity.pod_affinity.required_during_scheduling_ignored_during_execution
        assert term.topology_key == "kubernetes.io/hostname"
        (expr,) = term.label_selector.match_expressions
        assert (expr.key, expr.operator, expr.values) == ("ksm-analyze.io/host-group", "In",
                                                          [group])
        groups.setdefault(group, set()).add(vm)
        readme = (folder / "README.txt").read_text()
        assert (f"kubectl patch virtualmachine {vm} --type merge --patch-file {vm}.yaml"
                in readme)
    return sorted(groups.values(), key=sorted)


def test_kubevirt_patches_are_kubernetes_affinities_of_the_plans_groups(pair_plan, tmp_path):
    write_export(pair_plan, "kubevirt", tmp_path)
    assert _kubevirt_groups(tmp_path) == PAIRS == _plan_groups(pair_plan)
    # Two groups: each VM keeps VMs of the other group off its node where it can.
    doc = yaml.safe_load((tmp_path / "101.yaml").read_text())
    own = doc["spec"]["template"]["metadata"]["labels"]["ksm-analyze.io/host-group"]
    (pref,) = doc["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert pref["podAffinityTerm"]["labelSelector"]["matchExpressions"] == [
        {"key": "ksm-analyze.io/host-group", "operator": "Exists"},
        {"key": "ksm-analyze.io/host-group", "operator": "NotIn", "values": [own]}]


def test_kubevirt_export_of_the_samples(sample_plan, tmp_path):
    write_export(sample_plan, "kubevirt", tmp_path)
    assert _kubevirt_groups(tmp_path) == [{"vm-a", "vm-b"}]
    doc = yaml.safe_load((tmp_path / "vm-a.yaml").read_text())
    assert "podAntiAffinity" not in doc["spec"]["template"]["spec"]["affinity"]  # one group


# OpenStack ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nova_schemas():
    """Nova's own ``server_groups`` schemas (``pip install nova``), imported from its files
    with the two modules they import that pull in Nova's database and oslo stubbed:
    ``nova.i18n`` (``_`` returns its text) and ``nova.objects.tag`` (MAX_TAG_LENGTH, which
    server groups do not use). The schema dicts and the name regex are Nova's; the format
    checker for ``"format": "name"`` applies Nova's regex as nova/api/validation/validators.py
    does."""
    spec = importlib.util.find_spec("nova")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nova is not installed (pip install --no-deps nova)")
    root = Path(next(iter(spec.submodule_search_locations)))
    stubs = {"nova": types.ModuleType("nova"), "nova.api": types.ModuleType("nova.api"),
             "nova.api.validation": types.ModuleType("nova.api.validation"),
             "nova.i18n": types.ModuleType("nova.i18n"),
             "nova.objects": types.ModuleType("nova.objects"),
             "nova.objects.tag": types.ModuleType("nova.objects.tag")}
    stubs["nova.i18n"]._ = str  # type: ignore[attr-defined]
    stubs["nova.objects.tag"].MAX_TAG_LENGTH = 60  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as mp:
        for name, module in stubs.items():
            mp.setitem(sys.modules, name, module)

        def load(name: str, path: Path) -> types.ModuleType:
            mod_spec = importlib.util.spec_from_file_location(name, path)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mp.setitem(sys.modules, name, module)
            mod_spec.loader.exec_module(module)
            return module

        types_ = load("nova.api.validation.parameter_types",
                      root / "api/validation/parameter_types.py")
        stubs["nova.api.validation"].parameter_types = types_  # type: ignore[attr-defined]
        groups = load("nova.api.openstack.compute.schemas.server_groups",
                      root / "api/openstack/compute/schemas/server_groups.py")
        yield groups, re.compile(types_.valid_name_regex.regex)


def _nova_validator(nova_schemas):
    import jsonschema

    groups, name_regex = nova_schemas
    checker = jsonschema.FormatChecker()
    checker.checks("name")(lambda v: isinstance(v, str) and bool(name_regex.search(v)))
    return jsonschema.Draft202012Validator(groups.create_v264, format_checker=checker)


def test_openstack_server_groups_pass_novas_schema(pair_plan, nova_schemas, tmp_path):
    validator = _nova_validator(nova_schemas)
    # The schema is strict: the pre-2.64 body, an unknown policy and a blank name all fail.
    for bad in ({"server_group": {"name": "g", "policies": ["affinity"]}},
                {"server_group": {"name": "g", "policy": "together"}},
                {"server_group": {"name": " g", "policy": "affinity"}}):
        assert list(validator.iter_errors(bad)), bad
    write_export(pair_plan, "openstack", tmp_path)
    readme = (tmp_path / "README.txt").read_text()
    members: dict[str, set[str]] = {}
    for path in sorted(tmp_path.glob("server-group-*.json")):
        body = json.loads(path.read_text())
        validator.validate(body)
        name = body["server_group"]["name"]
        assert body["server_group"]["policy"] == "affinity"
        for line in readme.splitlines():
            found = re.fullmatch(r"\s*openstack server create --hint group=\$\(openstack "
                                 r"server group show (\S+) -f value -c id\) .* (\S+)", line)
            if found and found[1] == name:
                members.setdefault(name, set()).add(found[2])
    assert sorted(members.values(), key=sorted) == PAIRS == _plan_groups(pair_plan)


def test_openstack_ram_allocation_ratio(pair_plan, tmp_path):
    write_export(pair_plan, "openstack", tmp_path)
    conf = configparser.ConfigParser()
    conf.read_string((tmp_path / "nova.conf").read_text())
    # By hand: a host's guests are two inputs of 220 pages, 1,802,240 bytes, on 2 MiB less
    # 480 KiB = 1,605,632 bytes: 1.1224..., rounded up to hundredths (not to the nearest).
    assert conf["DEFAULT"]["ram_allocation_ratio"] == "1.13"
    assert conf["DEFAULT"].getint("reserved_host_memory_mb") == 1  # 480 KiB, rounded up


def test_openstack_ratio_is_never_under_one(sample_plan):
    conf = configparser.ConfigParser()
    conf.read_string(export_files(sample_plan, "openstack")["nova.conf"])
    assert conf["DEFAULT"]["ram_allocation_ratio"] == "1.00"  # 4 MiB of guests on 1 GiB
    assert conf["DEFAULT"].getint("reserved_host_memory_mb") == 0


def test_the_exports_state_the_measured_ratio_and_warn_when_the_plan_needs_more(pair_plan):
    # By hand: guests of every family mixed at random ("all inputs", the family that shares
    # least): two of them are a pair in 1/3 of the orders (240 pages + 440 rmap_items:
    # 1,011,200 bytes), else two that share nothing (2 x 915,200 = 1,830,400 bytes, more
    # than the 1,605,632 for guests): the cautious count (90th percentile) is 1 guest of
    # 901,120 bytes, a ratio of 0.5612: at most 0.56 (56%). The plan's fullest host needs
    # 1,802,240 / 1,605,632 = 1.1224 (1.13, 113%, rounded up): more, so a warning.
    files = export_files(pair_plan, "openstack")
    conf = files["nova.conf"]
    assert "# Measured (the plan's overcommit table): hosts of 2 MiB run at " in conf
    assert "#   0.56, the band's low end." in conf
    assert "# Warning: the fullest planned host needs 1.13, more than the measured low end " \
           "0.56:" in conf
    configparser.ConfigParser().read_string(conf)  # the comments keep it a valid file
    readme = files["README.txt"].splitlines()
    assert "  0.56, the band's low end." in readme
    assert "Warning: the fullest planned host needs 1.13, more than the measured low end " \
           "0.56:" in readme
    assert any(line.startswith("Measured") and "band 0.56 - " in line for line in readme)
    kube = export_files(pair_plan, "kubevirt")["README.txt"].splitlines()
    assert "  56%, the band's low end." in kube and "  113% (rounded up)." in kube
    assert "Warning: the fullest planned host needs 113%, more than the measured low end " \
           "56%:" in kube
    assert any("set memoryOvercommit to at most" in line for line in kube)


def test_no_warning_where_the_plan_needs_less_than_measured(sample_plan):
    # 4 MiB of guests on a host of 1 GiB: 0.0039 needed, far under anything measured.
    for ecosystem in ("openstack", "kubevirt"):
        readme = export_files(sample_plan, ecosystem)["README.txt"]
        assert "the band's low end." in readme and "Warning" not in readme


# Proxmox --------------------------------------------------------------------------------

def parse_section_config(text: str) -> list[tuple[str, str, dict[str, str]]]:
    """Proxmox VE's section config as its documentation gives it: a section starts at
    ``TYPE: ID`` at the start of a line; its properties follow, one a line, each indented
    and ``KEY VALUE``; a blank line ends it; ``#`` starts a comment line."""
    sections: list[tuple[str, str, dict[str, str]]] = []
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            current = None
            continue
        if line[0] in " \t":
            assert current is not None, f"a property outside a section: {line!r}"
            key, _, value = line.strip().partition(" ")
            assert re.fullmatch(r"[a-z][a-z0-9_-]*", key) and value and key not in current
            current[key] = value
            continue
        found = re.fullmatch(r"([a-z][a-z0-9-]*):\s+(\S+)\s*", line)
        assert found, f"not a section header: {line!r}"
        current = {}
        sections.append((found[1], found[2], current))
    return sections


def test_section_config_parser_refuses_what_proxmox_would():
    assert parse_section_config("group: g\n\tnodes n1\n") == [("group", "g", {"nodes": "n1"})]
    for bad in ("nodes n1\n", "group g\n", "group: g\n\tnodes\n", "group: g\n\tnodes a\n\tnodes b\n"):
        with pytest.raises(AssertionError):
            parse_section_config(bad)


PVE_ID = re.compile(r"[a-z][a-z0-9_-]*", re.IGNORECASE)  # pve-configid


def test_proxmox_rules_and_groups_are_the_plans_groups(pair_plan, tmp_path):
    write_export(pair_plan, "proxmox", tmp_path)
    rules = parse_section_config((tmp_path / "rules.cfg").read_text())
    assert {t for t, _, _ in rules} == {"resource-affinity"}
    assert all(PVE_ID.fullmatch(rule) and props["affinity"] == "positive"
               for _, rule, props in rules)
    got = sorted(({r.removeprefix("vm:") for r in props["resources"].split(",")}
                  for _, _, props in rules), key=sorted)
    assert got == PAIRS == _plan_groups(pair_plan)
    groups = parse_section_config((tmp_path / "groups.cfg").read_text())
    assert [(t, props) for t, _, props in groups] == [
        ("group", {"nodes": f"host-{k}", "restricted": "1", "nofailback": "0"}) for k in (0, 1)]
    # The README's commands say the same as the files.
    readme = (tmp_path / "README.txt").read_text()
    commands = [shlex.split(line) for line in readme.splitlines()
                if line.strip().startswith("ha-manager rules add")]
    assert sorted((c[4], c[c.index("--resources") + 1]) for c in commands) == sorted(
        (rule, props["resources"]) for _, rule, props in rules)
    assert all(c[c.index("--affinity") + 1] == "positive" for c in commands)


def test_proxmox_without_vmids_looks_them_up_by_name(sample_plan):
    files = export_files(sample_plan, "proxmox")
    assert set(files) == {"README.txt"}  # no .cfg without every VMID
    readme = files["README.txt"]
    assert ("ha-manager rules add resource-affinity ksm-analyze-host-0 --affinity positive "
            "--resources vm:$(vmid vm-a),vm:$(vmid vm-b)") in readme
    assert "vmid() { pvesh get /cluster/resources" in readme


# Names ----------------------------------------------------------------------------------

def test_names_follow_each_ecosystems_rules():
    assert vm_name("a/Web_Server.1.raw.gz") == "Web_Server.1"
    assert vm_name("vm-b.raw") == "vm-b" and vm_name("noext") == "noext"
    assert dns_label("Web_Server.1") == "web-server-1"
    assert dns_label("--__--") == "vm" and len(dns_label("x" * 100)) == 63
    assert pve_name("Web_Server.1") == "web-server.1"
    with pytest.raises(ExportError, match=r"a/vm\.raw and b/vm\.elf would both be the VM 'vm'"):
        vm_names(["a/vm.raw", "b/vm.elf"], dns_label)


# The command line -----------------------------------------------------------------------

def test_plan_export_writes_a_private_folder(pair_paths, tmp_path):
    out = tmp_path / "new" / "kubevirt"
    r = runner.invoke(app, ["plan", *pair_paths, "--host-memory", "2MiB", "--reserve",
                            "480KiB", "--export", "kubevirt", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    names = sorted(p.name for p in out.iterdir())
    assert names == ["101.yaml", "102.yaml", "201.yaml", "202.yaml", "README.txt"]
    assert all(stat.S_IMODE((out / n).stat().st_mode) == 0o600 for n in names)
    assert _kubevirt_groups(out) == PAIRS


def test_a_bad_export_value_exits_2_before_the_analysis(tmp_path):
    r = runner.invoke(app, ["plan", str(tmp_path / "missing.raw"), "--host-memory", "1GiB",
                            "--export", "vmware", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert r.stderr == ("Error: --export 'vmware': give one of kubevirt, openstack, proxmox "
                        "then a folder\n")
    assert not (tmp_path / "out").exists()


def test_an_export_never_overwrites_an_input(pair_paths, tmp_path):
    data = Path(pair_paths[0]).read_bytes()
    inputs = [tmp_path / "nova.conf", tmp_path / "other.raw"]  # nova.conf: VM "nova"
    for p in inputs:
        p.write_bytes(data)
    r = runner.invoke(app, ["plan", *map(str, inputs), "--host-memory", "1GiB", "-q",
                            "--export", "openstack", str(tmp_path)])
    assert r.exit_code == 2
    assert "this input would be overwritten by the output nova.conf" in r.stderr
    assert inputs[0].read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nova.conf", "other.raw"]


def test_two_inputs_of_one_vm_name_are_one_line_and_exit_1(pair_paths, tmp_path):
    data = Path(pair_paths[0]).read_bytes()
    inputs = [tmp_path / "a" / "vm.raw", tmp_path / "b" / "VM.img"]  # both the VM "vm"
    for p in inputs:
        p.parent.mkdir()
        p.write_bytes(data)
    r = runner.invoke(app, ["plan", *map(str, inputs), "--host-memory", "1GiB", "-q",
                            "--export", "kubevirt", str(tmp_path / "out")])
    assert r.exit_code == 1
    assert r.stderr == ("Error: vm.raw and VM.img would both be the VM 'vm' in the export "
                        "(named by file stem): rename one of the files\n")
    assert not (tmp_path / "out").exists()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_file_stem_gives_a_valid_name_in_each_ecosystem(stem):
    from ksm_analyze.planning.export.openstack import server_name

    assert DNS_1123_LABEL.fullmatch(dns_label(stem)) and len(dns_label(stem)) <= 63
    pve = pve_name(stem)  # Proxmox VE's dns-name format
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*",
                        pve) and len(pve) <= 63
    nova = server_name(stem)  # printable, no space at either end, 1 to 255 characters
    assert 1 <= len(nova) <= 255 and nova == nova.strip() and nova.isprintable()
