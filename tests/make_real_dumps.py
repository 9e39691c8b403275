#!/usr/bin/env python3
"""Boot one 256 MiB QEMU/TCG guest, pause it and write three real dumps of it.

Writes into DIR: ``guest.elf`` (``dump-guest-memory``), ``guest.kdump``
(``dump-guest-memory -z``, flattened kdump zlib) and ``guest.raw`` (``pmemsave 0`` of all
guest RAM, which is contiguous from GPA 0 for guests below the PCI hole).  Usage::

    python tests/make_real_dumps.py DIR [--ksmfill SEED:MIB[:COPIES]]

or from Python: ``make_real_dumps(directory)``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qemu_guest import Guest, ensure_guest_assets

MEM_MIB = 256


class RealDumps(NamedTuple):
    """Paths of the dumps of one paused guest, with timings in seconds."""

    elf: Path
    kdump: Path
    raw: Path
    mem_mib: int
    timings: dict[str, float]


def make_real_dumps(directory: Path, *, mem_mib: int = MEM_MIB, ksmfill: str = "1:16") -> RealDumps:
    """Boot a guest with ``ksmfill=KSMFILL``, pause it and write the three dumps into directory.

    Args:
        directory: Output directory (created); the serial log goes there too.
        mem_mib: Guest RAM in MiB (must stay below the 3 GiB PCI hole for ``guest.raw``).
        ksmfill: Value of the guest's ``ksmfill=`` parameter (empty for none).

    Returns:
        The dump paths and timings (``assets``, ``boot``, ``elf``, ``kdump``, ``raw``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.monotonic()
    assets = ensure_guest_assets()
    timings["assets"] = time.monotonic() - t
    extra = f"ksmfill={ksmfill}" if ksmfill else ""
    t = time.monotonic()
    with Guest(assets, mem_mib=mem_mib, cmdline_extra=extra, workdir=directory) as guest:
        timings["boot"] = time.monotonic() - t
        guest.pause()
        steps: list[tuple[str, Callable[[], Path]]] = [
            ("elf", lambda: guest.dump_elf(directory / "guest.elf")),
            ("kdump", lambda: guest.dump_kdump_zlib(directory / "guest.kdump")),
            ("raw", lambda: guest.pmemsave(0, mem_mib << 20, directory / "guest.raw")),
        ]
        for name, step in steps:
            t = time.monotonic()
            step()
            timings[name] = time.monotonic() - t
    return RealDumps(
        directory / "guest.elf",
        directory / "guest.kdump",
        directory / "guest.raw",
        mem_mib,
        timings,
    )


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--mem-mib", type=int, default=MEM_MIB)
    parser.add_argument("--ksmfill", default="1:16")
    args = parser.parse_args()
    t = time.monotonic()
    dumps = make_real_dumps(args.directory, mem_mib=args.mem_mib, ksmfill=args.ksmfill)
    for path in (dumps.elf, dumps.kdump, dumps.raw):
        print(f"{path}  {path.stat().st_size:>12,d} bytes")
    print(
        "seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in dumps.timings.items())
        + f", total {time.monotonic() - t:.1f}"
    )


if __name__ == "__main__":
    main()
