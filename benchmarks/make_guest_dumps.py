#!/usr/bin/env python3
"""Boot one real QEMU/TCG Linux guest, pause it, and write its memory dumps for bench_scan.py.

    python benchmarks/make_guest_dumps.py DIR [--mem-mib 2048] [--fill SEED:MIB[:COPIES] ...]
                                              [--kdump] [--no-raw]
    python benchmarks/bench_scan.py --real DIR

Writes into DIR (created):

* ``guest-<MEM>m.elf``: ``dump-guest-memory`` (an ELF core of all guest RAM);
* ``guest-<MEM>m.raw``: ``pmemsave 0 <MEM MiB>``, a flat image of guest RAM. Only for
  ``--mem-mib`` below 3584: QEMU's pc machine keeps RAM contiguous from physical address 0
  only up to there (above, RAM beyond 3 GiB is mapped above 4 GiB), so larger guests get
  no raw dump;
* ``guest-<MEM>m.kdump`` with ``--kdump``: ``dump-guest-memory -z`` (flattened kdump, zlib);
* ``guest-<MEM>m.log``: the guest's serial console (``bench_scan.py --real`` skips
  ``.log``, ``.txt``, ``.json`` and ``.stderr`` files).

The guest is the one the tests boot (``tests/qemu_guest.py``: a Debian cloud kernel with a
busybox initramfs; kernel and initramfs are cached in ``~/.cache/ksm-analyze/guest`` after
the first use, which needs ``apt-get``). Its ``/init`` writes each ``--fill SEED:MIB[:COPIES]``
into a tmpfs file: MIB MiB of pages, each distinct page repeated COPIES times, identical
across fills of the same SEED. The default fills an eighth of RAM with pages in 8 copies
and another eighth with unique pages; the rest of RAM is what the kernel left, mostly zero
pages (an idle guest). Filling runs in the emulated guest (about 15 MiB/s here), so
large fills take a while; the boot timeout grows with them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from qemu_guest import Guest, ensure_guest_assets, qemu_available

CONTIGUOUS_MIB = 3584  # QEMU pc: guest RAM below this size sits at GPA 0 in one piece
FILL_SECONDS_PER_MIB = 1.0  # generous: the boot timeout allows this much per MiB filled


def default_fills(mem_mib: int) -> list[str]:
    """An eighth of RAM in 8 copies (seed 1), an eighth unique (seed 2)."""
    eighth = max(1, mem_mib // 8)
    return [f"1:{eighth}:8", f"2:{eighth}"]


def make_guest_dumps(directory: Path, mem_mib: int, fills: list[str], kdump: bool,
                     raw: bool) -> dict[str, float]:
    """Boot the guest with the fills, pause it, write the dumps; return seconds per step."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"guest-{mem_mib}m"
    filled = sum(int(f.split(":")[1]) for f in fills)
    timings: dict[str, float] = {}
    t = time.monotonic()
    assets = ensure_guest_assets()
    timings["assets"] = time.monotonic() - t
    with Guest(assets, mem_mib=mem_mib, workdir=directory,
               cmdline_extra=" ".join(f"ksmfill={f}" for f in fills),
               timeout=120 + FILL_SECONDS_PER_MIB * filled) as guest:
        timings["boot and fill"] = guest.boot_seconds
        guest.pause()
        t = time.monotonic()
        guest.dump_elf(stem.with_suffix(".elf"))
        timings["elf"] = time.monotonic() - t
        if raw:
            t = time.monotonic()
            guest.pmemsave(0, mem_mib << 20, stem.with_suffix(".raw"))
            stem.with_suffix(".raw").chmod(0o600)
            timings["raw"] = time.monotonic() - t
        if kdump:
            t = time.monotonic()
            guest.dump_kdump_zlib(stem.with_suffix(".kdump"))
            timings["kdump"] = time.monotonic() - t
    (directory / "serial.log").replace(stem.with_suffix(".log"))
    (directory / "qemu.stderr").unlink(missing_ok=True)
    return timings


def main() -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--mem-mib", type=int, default=2048, help="guest RAM (default 2048)")
    ap.add_argument("--fill", action="append", metavar="SEED:MIB[:COPIES]",
                    help="a tmpfs file the guest writes before the dump (repeatable; default "
                         "an eighth of RAM in 8 copies and an eighth unique)")
    ap.add_argument("--kdump", action="store_true", help="also write a kdump (zlib) dump")
    ap.add_argument("--no-raw", dest="raw", action="store_false", help="no pmemsave raw dump")
    args = ap.parse_args()
    if not qemu_available():
        raise SystemExit("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    raw = args.raw and args.mem_mib < CONTIGUOUS_MIB
    if args.raw and not raw:
        print(f"no raw dump: above {CONTIGUOUS_MIB} MiB guest RAM is not contiguous",
              file=sys.stderr)
    fills = args.fill if args.fill is not None else default_fills(args.mem_mib)
    t = time.monotonic()
    timings = make_guest_dumps(args.directory, args.mem_mib, fills, args.kdump, raw)
    for path in sorted(args.directory.glob(f"guest-{args.mem_mib}m.*")):
        print(f"{path}  {path.stat().st_size:>14,d} bytes")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
          + f", total {time.monotonic() - t:.1f}")


if __name__ == "__main__":
    main()
