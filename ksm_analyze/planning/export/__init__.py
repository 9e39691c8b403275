"""``plan --export ECOSYSTEM DIR``: a plan's sharing-aware placement in a scheduler's terms.

One module per ecosystem (:mod:`.kubevirt`, :mod:`.openstack`, :mod:`.proxmox`), each a
function from a :class:`~ksm_analyze.planning.plan.Plan` to files (name -> text) with a
README.txt that says how to apply them; :func:`write_export` writes them atomically, mode
0600, into a folder it makes 0700.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..._files import DIR_MODE, atomic_write
from .common import ExportError

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["ECOSYSTEMS", "ExportError", "check_ecosystem", "export_files", "write_export"]

ECOSYSTEMS = ("kubevirt", "openstack", "proxmox")
"""What ``--export`` takes."""


def check_ecosystem(ecosystem: str) -> str:
    """``ecosystem`` if it is one of :data:`ECOSYSTEMS`.

    Raises:
        ValueError: it is not (``--export`` is then a usage error).
    """
    if ecosystem not in ECOSYSTEMS:
        raise ValueError(f"--export {ecosystem!r}: give one of {', '.join(ECOSYSTEMS)} "
                         "then a folder")
    return ecosystem


def _exporter(ecosystem: str) -> Callable[[Plan], dict[str, str]]:
    check_ecosystem(ecosystem)
    if ecosystem == "kubevirt":
        from .kubevirt import export
    elif ecosystem == "openstack":
        from .openstack import export
    else:
        from .proxmox import export
    return export


def export_files(plan: Plan, ecosystem: str) -> dict[str, str]:
    """The files of ``plan``'s export to ``ecosystem``: file name -> text.

    Raises:
        ValueError: an unknown ecosystem.
        ExportError: two inputs would be the same VM there (named by file stem).
    """
    return _exporter(ecosystem)(plan)


def write_export(plan: Plan, ecosystem: str, directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``plan``'s export to ``ecosystem`` into ``directory`` (made 0700 if absent),
    each file atomically, mode 0600; the paths written, README.txt first."""
    files = export_files(plan, ecosystem)
    folder = Path(directory)
    folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    written = []
    for name in sorted(files, key=lambda n: (n != "README.txt", n)):
        atomic_write(folder / name, files[name])
        written.append(folder / name)
    return written
