"""Time ``ksm-analyze capture`` of one process holding N GiB, and write BENCHMARKS.md's table.

    sudo python benchmarks/bench_capture.py --size-gib 2 [--dir /dev/shm]

A child process maps N GiB (MADV_MERGEABLE) and fills it; ``capture`` snapshots it into
``--dir``, best of 3, and ``cat`` of the snapshot is timed for comparison. Peak memory of the
capture is its ``ru_maxrss``. Results go between the capture markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_scan import machine  # this script's directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench-capture:start -->", "<!-- bench-capture:end -->"
TARGET = """
import mmap, os, signal, sys
import numpy as np
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_MERGEABLE)
a = np.frombuffer(m, np.uint64)
a[:] = np.arange(len(a), dtype=np.uint64) % (1 << 20)  # 512 distinct pages, repeated
print("ready", flush=True)
signal.pause()
"""


def _timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a child command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t
    return elapsed, max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--dir", default="/dev/shm", help="where the snapshot goes")
    args = ap.parse_args()
    size = int(args.size_gib * (1 << 30))
    with subprocess.Popen([sys.executable, "-c", TARGET, str(size)], stdout=subprocess.PIPE,
                          text=True) as target:
        assert target.stdout is not None and target.stdout.readline().startswith("ready")
        snap = Path(args.dir) / "bench-capture.snap"
        try:
            runs = [_timed(["ksm-analyze", "capture", str(target.pid), "-o", str(snap), "-q"])
                    for _ in range(3)]
            cat = min(_timed(["cat", str(snap)])[0] for _ in range(3))
            snap_bytes = snap.stat().st_size
        finally:
            target.terminate()
            snap.unlink(missing_ok=True)
    best = min(t for t, _ in runs)
    peak_mib = max(r for _, r in runs) / 1024
    gib = snap_bytes / (1 << 30)
    text = "\n".join([
        START,
        (f"`sudo python benchmarks/bench_capture.py --size-gib {args.size_gib:g} --dir "
        f"{args.dir}` on {machine()}:"),
        "",
        ("| process memory | snapshot | capture (best of 3) | capture throughput "
        "| `cat` of the snapshot | capture peak RSS |"),
        "|---:|---:|---:|---:|---:|---:|",
        (f"| {args.size_gib:g} GiB | {gib:.2f} GiB | {best:.2f} s | {gib / best:.2f} GiB/s "
        f"| {gib / cat:.1f} GiB/s | {peak_mib:.0f} MiB |"),
        END,
    ])
    doc = ROOT / "BENCHMARKS.md"
    old = doc.read_text()
    if START in old:
        head, _, rest = old.partition(START)
        _, _, tail = rest.partition(END)
        doc.write_text(head + text + tail)
    else:
        doc.write_text(old.rstrip("\n") + "\n\n## capture\n\n" + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
