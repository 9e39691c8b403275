"""Fuzzing the readers of what operators hand us beside dumps: VM configurations
(``--vm-config``: libvirt XML, ``qm config``, Cloud Hypervisor and Firecracker JSON,
KubeVirt YAML) and placement files (``plan --placement``, CSV or JSON).

Each seed is a valid file from tests/test_vmconfig.py or one ``plan`` writes; hypothesis
flips, cuts, repeats and inserts bytes. Every mutant must either read as a configuration
or placement, or fail with one :class:`InputError` line naming the file: never another
exception, a hang, or a traceback. The profile is test_fuzz.py's (``KSM_FUZZ_EXAMPLES``,
``KSM_FUZZ_SEED``).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz import _profile
from test_vmconfig import (
    CH_INFO,
    FIRECRACKER,
    KUBEVIRT,
    LIBVIRT_HUGEPAGES_NUMA,
    LIBVIRT_NOSHAREPAGES,
    QM_CONFIG,
)

from ksm_analyze.errors import InputError
from ksm_analyze.planning.marginal import read_placement
from ksm_analyze.vmconfig import VmConfig, read_config

PLACEMENT_CSV = "method,host,input,memory_before_bytes\nsharing,0,vm-a.elf,2097152\n" \
                "sharing,0,vm-b.raw,2097152\nfirst_fit,0,vm-a.elf,2097152\n"
PLACEMENT_JSON = json.dumps({"assignments": [
    {"method": "sharing", "host": 0, "input": "vm-a.elf"},
    {"method": "sharing", "host": 1, "input": "vm-b.raw"}]})

CONFIGS = {
    "libvirt.xml": LIBVIRT_NOSHAREPAGES.encode(),
    "numa.xml": LIBVIRT_HUGEPAGES_NUMA.encode(),
    "101.conf": QM_CONFIG.encode(),
    "ch.json": json.dumps(CH_INFO).encode(),
    "fc.json": json.dumps(FIRECRACKER).encode(),
    "vm.yaml": KUBEVIRT.encode(),
}


@st.composite
def _mutant(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few byte-level edits: flips, cuts, repeats, insertions."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "repeat", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "repeat":
            piece = data[at:at + draw(st.integers(1, 64))]
            data[at:at] = piece * draw(st.integers(1, 50))
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from([
                b"<", b">", b"&x;", b"<!DOCTYPE d [<!ENTITY x 'y'>]>", b"\x00", b"\xff\xfe",
                b"{", b"}", b"[", b"]", b'"', b":", b"\n", b"- ", b"!!python/object:os.system ",
                b"*a", b"&a ", b"\t", b"1e999", b"-1", b"99999999999999999999"]))
        else:
            del data[at:]
    return bytes(data)


def _one_line_naming(error: InputError, path: str) -> None:
    text = str(error)
    assert "\n" not in text and path in text, text


def _fuzz(path, seed: bytes, read, is_read) -> None:
    """Mutants of ``seed`` written to ``path``: ``read(path)`` gives what ``is_read`` accepts,
    or one InputError line naming the file."""
    @_profile
    @given(data=_mutant(seed))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            got = read(path)
        except InputError as e:
            _one_line_naming(e, str(path))
        else:
            assert is_read(got), got

    check()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mutated_vm_configs_read_or_fail_in_one_line(name, tmp_path):
    _fuzz(tmp_path / name, CONFIGS[name], read_config, lambda c: isinstance(c, VmConfig))


@pytest.mark.parametrize("name, seed", [("assignments.csv", PLACEMENT_CSV),
                                        ("plan.json", PLACEMENT_JSON)])
def test_mutated_placements_read_or_fail_in_one_line(name, seed, tmp_path):
    _fuzz(tmp_path / name, seed.encode(), read_placement,
          lambda where: all(isinstance(k, str) and isinstance(v, int) for k, v in where.items()))


def test_the_seeds_read(tmp_path):
    """The mutants start from files that read (else the fuzzing would test only errors)."""
    for name, data in CONFIGS.items():
        (tmp_path / name).write_bytes(data)
        assert isinstance(read_config(tmp_path / name), VmConfig)
    (tmp_path / "a.csv").write_text(PLACEMENT_CSV)
    assert read_placement(tmp_path / "a.csv") == {"vm-a.elf": 0, "vm-b.raw": 0}
    (tmp_path / "a.json").write_text(PLACEMENT_JSON)
    assert read_placement(tmp_path / "a.json") == {"vm-a.elf": 0, "vm-b.raw": 1}
