#!/usr/bin/env python3
"""``scan`` of a QEMU migration stream beside ``cat`` of it and ``scan`` of an ELF of the same
guest (issue 20, "Saved-state inputs" in BENCHMARKS.md).

Writes, for a guest of ``--gib`` GiB of RAM (i440fx: 3 GiB below 4 GiB when RAM >= 3.5 GiB,
the rest from 4 GiB), the same pages twice:

* a migration stream as a paused guest's ``migrate "exec:cat > F"`` writes it
  (tests/dumpwriter/qevm.py: QEVM header, configuration, the RAM block list, PART sections of
  PAGE|CONTINUE (4,104 bytes) and ZERO|CONTINUE (9 bytes) records, a device section, EOF),
* an ELF core with one PT_LOAD per guest-physical RAM range, as ``dump-guest-memory`` does,

from the "today" mix of benchmarks/bench_scan.py: runs of 16 pages of one kind, 25% zero,
25% copies of 4,096 random contents, 50% unique random pages (seed 1). Then it warms the
page cache and times ``cat FILE > /dev/null``, ``ksm-analyze info`` of the stream (the index
walk) and ``ksm-analyze scan FILE --json`` of both, best of ``--repeat``, every scan a fresh
process, and checks that both scans give the same counters::

    python benchmarks/bench_migration.py --dir /work/bench --gib 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dumpwriter.qevm import (
    CONTINUE,
    END,
    EOS,
    PAGE,
    PART,
    START,
    ZERO,
    Stream,
)

PS = 4096
GiB = 1 << 30
RUN = 16
CHUNK_PAGES = 16384  # 64 MiB of guest RAM per PART section


def kinds(npages: int, seed: int) -> np.ndarray:
    """0 zero, 1 copy, 2 unique per page, in runs of RUN pages."""
    rng = np.random.default_rng(seed)
    runs = rng.choice(3, size=-(-npages // RUN), p=[0.25, 0.25, 0.5])
    return np.repeat(runs, RUN)[:npages].astype(np.int8)


def pages_of(kind: np.ndarray, first: int, rng: np.random.Generator,
             copies: np.ndarray) -> np.ndarray:
    n = len(kind)
    out = np.zeros((n, PS), np.uint8)
    cp = np.flatnonzero(kind == 1)
    out[cp] = copies[(first + cp) % len(copies)]
    un = np.flatnonzero(kind == 2)
    out[un] = rng.integers(0, 256, (len(un), PS), np.uint8)
    out[un, :8] = np.frombuffer(((first + un).astype("<u8")).tobytes(), np.uint8).reshape(-1, 8)
    return out


def write(dirpath: Path, gib: int, seed: int = 1) -> tuple[Path, Path, dict[str, int]]:
    size = gib * GiB
    below = 3 * GiB if size >= 0xE0000000 else size
    npages = size // PS
    kind = kinds(npages, seed)
    rng = np.random.default_rng(seed + 1)
    copies = rng.integers(0, 256, (4096, PS), np.uint8)
    stream_path, elf_path = dirpath / f"guest-{gib}g.qevm", dirpath / f"guest-{gib}g.elf"
    ranges = [(0, below)] + ([(4 * GiB, size - below)] if size > below else [])
    # ELF: header, PT_NOTE (empty), one PT_LOAD per range, the pages right after.
    phnum = 1 + len(ranges)
    data_at = 64 + 56 * phnum
    ehdr = (b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 64, 0, 0))
    phdrs = struct.pack("<IIQQQQQQ", 4, 4, data_at, 0, 0, 0, 0, 0)
    off = data_at
    for addr, length in ranges:
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off, addr, addr, length, length, 0)
        off += length
    s = Stream("pc-i440fx-7.2")
    s.section(START, 2)
    s.mem_size([("pc.ram", size)])
    s.flag(EOS)
    s.footer(2)
    with open(stream_path, "wb") as st, open(elf_path, "wb") as el:
        el.write(ehdr + phdrs)
        st.write(s.buf)
        last = None
        for first in range(0, npages, CHUNK_PAGES):
            k = kind[first : first + CHUNK_PAGES]
            pages = pages_of(k, first, rng, copies)
            el.write(pages.tobytes())
            part = Stream.__new__(Stream)
            part.buf, part.marks, part.footers, part.start, part.last = bytearray(), [], True, 0, last
            part.section(PART, 2)
            # Records: be64 (offset | flags), then the page (PAGE) or one fill byte (ZERO);
            # the first record of a part names the block, as QEMU does after a section header.
            recs = bytearray()
            for i, kk in enumerate(k.tolist()):
                offset = (first + i) * PS
                flags = ZERO if kk == 0 else PAGE
                if i == 0:
                    recs += struct.pack(">Q", offset | flags) + b"\x06pc.ram"
                else:
                    recs += struct.pack(">Q", offset | flags | CONTINUE)
                recs += b"\0" if kk == 0 else pages[i].tobytes()
            st.write(part.buf + recs + struct.pack(">Q", EOS) + b"\x7e" + struct.pack(">I", 2))
        tail = Stream.__new__(Stream)
        tail.buf, tail.marks, tail.footers, tail.start, tail.last = bytearray(), [], True, 0, None
        tail.section(END, 2)
        tail.flag(EOS)
        tail.footer(2)
        tail.device(3, "timer", bytes(40))
        st.write(tail.end())
    counts = {"zero": int((kind == 0).sum()), "copies": int((kind == 1).sum()),
              "unique": int((kind == 2).sum())}
    return stream_path, elf_path, counts


def best(cmd: list[str], repeat: int) -> tuple[float, float]:
    """Best wall time and best CPU time (user + system of the process and its children)."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return min(walls), min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("benchmarks/data"))
    ap.add_argument("--gib", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reuse", action="store_true", help="use the files of an earlier run")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    stream = args.dir / f"guest-{args.gib}g.qevm"
    elf = args.dir / f"guest-{args.gib}g.elf"
    if not (args.reuse and stream.exists() and elf.exists()):
        t = time.perf_counter()
        stream, elf, counts = write(args.dir, args.gib)
        print(f"wrote {stream} and {elf} in {time.perf_counter() - t:.0f} s: {counts}")
    py = [sys.executable, "-m", "ksm_analyze"]
    for f in (stream, elf):
        best(["cat", str(f)], 1)  # warm the page cache
    rows = []
    results = {}
    for f in (stream, elf):
        size = f.stat().st_size
        cat = best(["sh", "-c", f"cat {f} > /dev/null"], args.repeat)
        scan = best([*py, "scan", str(f), "--json"], args.repeat)
        out = subprocess.run([*py, "scan", str(f), "--json"], check=True, capture_output=True)
        results[f.suffix] = json.loads(out.stdout)
        rows.append((f.name, size, cat, scan))
    index = best([*py, "info", str(stream)], args.repeat)
    start = best([*py, "--version"], args.repeat)
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    for name, size, cat, scan in rows:
        print(f"{name}: {size / GiB:.2f} GiB; cat {cat[0]:.2f} s; scan --json {scan[0]:.2f} s "
              f"wall, {scan[1]:.2f} s CPU ({args.gib / scan[0]:.2f} GiB of guest/s)")
    print(f"info (index walk) of the stream: {index[0]:.2f} s wall, {index[1]:.2f} s CPU; "
          f"ksm-analyze --version: {start[0]:.2f} s wall, {start[1]:.2f} s CPU")
    a, b = (results[k]["host"] for k in (".qevm", ".elf"))
    same = all(a[k] == b[k] for k in ("pages_shared", "pages_sharing", "pages_unshared"))
    print("counters: " + ("equal" if same else f"DIFFER: {a} vs {b}"))
    os.sync()
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
