"""Eligibility from configuration: which VMs KSM will not scan, read from their configs.

One module per format: :mod:`.libvirt` (``virsh dumpxml``), :mod:`.proxmox` (``qm
config``), :mod:`.cloudhv` (Cloud Hypervisor JSON), :mod:`.firecracker` (Firecracker JSON),
:mod:`.kubevirt` (``VirtualMachine`` YAML). The format is detected by content. Files are
parsed safely: at most :data:`~.base.MAX_CONFIG_BYTES`, XML without DTDs or entities
(defusedxml), YAML by ``yaml.safe_load``; a bad file is one :class:`InputError` line.

A configuration is matched to an input by name: the VM's name (or an alias) equals the
input's file name without one or more suffixes (``vm-a.elf`` -> ``vm-a``,
``vm-a.ksmfp.parquet`` -> ``vm-a``). Inputs without a configuration are assumed eligible.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ..errors import InputError, printable
from .base import MAX_CONFIG_BYTES, RULE_SCOPES, Reason, VmConfig, bad_config

__all__ = ["MAX_CONFIG_BYTES", "RULE_SCOPES", "Reason", "VmConfig", "config_files",
           "input_stems", "match", "notice", "read_config", "read_configs"]


def config_files(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """``paths`` with each folder replaced by the files in it (sorted; hidden files and
    subfolders left out)."""
    out: list[str] = []
    for p in (os.fspath(x) for x in paths):
        if os.path.isdir(p):
            try:
                names = sorted(os.listdir(p))
            except OSError as e:
                raise InputError(f"cannot list the VM configurations: {e.strerror}",
                                 path=p) from None
            found = [os.path.join(p, n) for n in names
                     if not n.startswith(".") and os.path.isfile(os.path.join(p, n))]
            if not found:
                raise InputError("no VM configuration files in this folder", path=p)
            out += found
        else:
            out.append(p)
    return out


def _text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise InputError(f"cannot read the VM configuration: {e.strerror or e}",
                         path=path) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise bad_config(path, f"larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise bad_config(path, f"not UTF-8 text (byte {e.start})") from None


def read_config(path: str | os.PathLike[str]) -> VmConfig:
    """The VM a configuration file describes, its format detected by content.

    Raises:
        InputError: the file cannot be read, or is no configuration of a known format
            (one line naming the file and the problem).
    """
    from .cloudhv import is_cloud_hypervisor, read_cloud_hypervisor
    from .firecracker import is_firecracker, read_firecracker
    from .kubevirt import is_kubevirt, read_kubevirt
    from .libvirt import read_libvirt
    from .proxmox import looks_like_qm_config, read_proxmox

    path = os.fspath(path)
    text = _text(path)
    head = text.lstrip()
    if head.startswith("<"):
        return read_libvirt(path, text)
    if head.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise bad_config(path, f"malformed JSON ({printable(e)})") from None
        if is_firecracker(data):
            return read_firecracker(path, data)
        if is_cloud_hypervisor(data):
            return read_cloud_hypervisor(path, data)
        raise bad_config(path, "JSON that is neither a Firecracker configuration "
                         "(machine-config) nor a Cloud Hypervisor one (memory)")
    if looks_like_qm_config(text):
        return read_proxmox(path, text)
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (yaml.YAMLError, RecursionError) as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise bad_config(path, f"malformed YAML{line}") from None
    vms = [d for d in docs if is_kubevirt(d)]
    if len(vms) == 1:
        return read_kubevirt(path, vms[0])
    if len(vms) > 1:
        raise bad_config(path, f"{len(vms)} KubeVirt VMs in one file: give one a file")
    raise bad_config(path, "neither libvirt domain XML, Proxmox qm config, Cloud "
                     "Hypervisor or Firecracker JSON, nor a KubeVirt VirtualMachine")


def read_configs(paths: Sequence[str | os.PathLike[str]]) -> list[VmConfig]:
    """Every configuration of ``paths`` (folders: every file in them), in order.

    Raises:
        InputError: a file that cannot be read (:func:`read_config`).
        ValueError: two files describe VMs of one name.
    """
    configs = [read_config(p) for p in config_files(paths)]
    seen: dict[str, str] = {}
    for c in configs:
        for name in c.names:
            if name in seen and seen[name] != c.path:
                raise ValueError(f"--vm-config: {seen[name]} and {c.path} both describe a "
                                 f"VM named {name!r}: give one")
            seen[name] = c.path
    return configs


def input_stems(path: str | os.PathLike[str]) -> list[str]:
    """The names an input may be known by: its file name without one suffix, two...
    (``vm-a.s000.ksmfp.parquet`` -> ``vm-a.s000.ksmfp``, ``vm-a.s000``, ``vm-a``), and the
    whole name."""
    name = os.path.basename(os.fspath(path))
    stems = [name]
    while "." in name.strip("."):
        name = name.rsplit(".", 1)[0]
        stems.append(name)
    return stems


def match(configs: Sequence[VmConfig], inputs: Sequence[str | os.PathLike[str]]
          ) -> list[VmConfig | None]:
    """Each input's configuration (None: none given, the input is assumed eligible).

    Raises:
        ValueError: a configuration names no input, or an input has two.
    """
    found: list[VmConfig | None] = []
    used: set[int] = set()
    for path in inputs:
        stems = set(input_stems(path))
        mine = [i for i, c in enumerate(configs) if stems & set(c.names)]
        if len(mine) > 1:
            raise ValueError(f"--vm-config: {os.fspath(path)} matches two VM configurations, "
                             f"{configs[mine[0]].path} and {configs[mine[1]].path}: give one")
        found.append(configs[mine[0]] if mine else None)
        used.update(mine)
    for i, c in enumerate(configs):
        if i not in used:
            names = " or ".join(repr(n) for n in c.names)
            raise ValueError(f"--vm-config {c.path}: its VM {names} matches no input (an "
                             "input matches by its file name without suffixes, e.g. "
                             f"{c.name}.elf)")
    return found


def notice(path: str | os.PathLike[str], config: VmConfig, scope: str) -> str:
    """The line saying KSM will not touch ``path`` and why (``config`` excludes it)."""
    why = "; ".join(r.text() for r in config.excluding(scope))
    return (f"{os.fspath(path)}: KSM will not scan it ({config.format} {config.path}, VM "
            f"{config.name!r}): {why}")
