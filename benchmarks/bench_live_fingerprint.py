"""Cost of ``ksm-analyze fingerprint PID`` on a process of N GiB, beside a plain read of it.

    sudo python benchmarks/bench_live_fingerprint.py --size-gib 1 4 [--runs 3] [--no-write]

A child process maps N GiB (MADV_MERGEABLE) and fills it with a mix: 1/4 random pages, 1/4
copies of 64 pages, 1/8 zero pages written, the rest (3/8) never touched. Then, best of
``--runs`` each, in child processes:

* ``fingerprint``: ``python -m ksm_analyze fingerprint PID -o DIR -q`` (DIR in /dev/shm), the
  whole command, start-up and Parquet file included;
* ``plain read``: the same pagemap walk and reads of ``/proc/PID/mem`` (capture's page
  source, :func:`ksm_analyze.live.capture.read_process`) into a sink that drops the bytes:
  what any tool that reads the present pages pays, without hashing or writing.

For each: wall seconds, user+sys CPU seconds (``wait4`` of the child), throughput over the
bytes read, and the peak ``Pss_Anon`` of the child (``/proc/PID/smaps_rollup`` polled every
10 ms; the private memory the fingerprinting itself holds). Results go between the markers
in BENCHMARKS.md (``--no-write``: printed only).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_scan import machine  # this script's directory is on sys.path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench-live-fingerprint:start -->", "<!-- bench-live-fingerprint:end -->"
TARGET = """
import mmap, signal, sys
import numpy as np
n = int(sys.argv[1]) // 4096
m = mmap.mmap(-1, n * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_MERGEABLE)
p = np.frombuffer(m, np.uint8).reshape(n, 4096)
rng = np.random.default_rng(1)
q = n // 8
for lo in range(0, 2 * q, 4096):  # random pages, a block at a time
    hi = min(lo + 4096, 2 * q)
    p[lo:hi] = rng.integers(0, 256, (hi - lo, 4096), dtype=np.uint8)
copies = rng.integers(0, 256, (64, 4096), dtype=np.uint8)
for lo in range(2 * q, 4 * q, 64):
    hi = min(lo + 64, 4 * q)
    p[lo:hi] = copies[: hi - lo]
p[4 * q : 5 * q] = 0  # written zero pages; pages from 5 * q on are never touched
print("ready", flush=True)
signal.pause()
"""
PLAIN = """
import contextlib, sys
from ksm_analyze.live.capture import Meter, PfnFacts, open_targets, read_process
from ksm_analyze.live.procfs import KPageFlags, process_facts, read_smaps
class Drop:
    def begin_process(self, info): pass
    def write_pages(self, vaddr, data): pass
    def add_runs(self, runs): pass
pid = int(sys.argv[1])
with contextlib.ExitStack() as stack:
    (proc,) = open_targets(stack, [pid])
    info, vmas = process_facts(pid), read_smaps(pid)
    kpf = KPageFlags()
    counts = read_process(Drop(), proc, info, vmas, PfnFacts(kpf), Meter(None, 0))
    print(counts["stored_pages"])
"""


def _pss_anon(pid: int) -> int:
    """Pss_Anon of ``pid`` in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _run(cmd: list[str]) -> tuple[float, float, int, str]:
    """Wall seconds, user+sys CPU seconds, peak Pss_Anon (bytes) and stdout of a child."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    peak = [0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _pss_anon(child.pid))
            stop.wait(0.01)

    watcher = threading.Thread(target=poll)
    watcher.start()
    assert child.stdout is not None
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - t
    child.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    watcher.join()
    if child.returncode:
        raise SystemExit(f"{cmd} failed ({child.returncode})")
    return elapsed, usage.ru_utime + usage.ru_stime, peak[0], out


def _measure(size_gib: float, runs: int) -> tuple[list[str], int, int]:
    """Table rows for a target of ``size_gib``, its stored pages and fingerprint file bytes."""
    size = int(size_gib * (1 << 30))
    with subprocess.Popen([sys.executable, "-c", TARGET, str(size)], stdout=subprocess.PIPE,
                          text=True) as target:
        try:
            assert target.stdout is not None and target.stdout.readline().startswith("ready")
            pid = str(target.pid)
            with tempfile.TemporaryDirectory(dir="/dev/shm") as out:
                fp = min(_run([sys.executable, "-m", "ksm_analyze", "fingerprint", pid, "-o",
                               out, "-q"]) for _ in range(runs))
                fp_bytes = sum(f.stat().st_size for f in Path(out).iterdir())
            plain = min(_run([sys.executable, "-c", PLAIN, pid]) for _ in range(runs))
        finally:
            target.terminate()
    stored = int(plain[3])
    gib = stored * 4096 / (1 << 30)
    rows = []
    for what, (wall, cpu, peak, _) in (("fingerprint", fp), ("plain read", plain)):
        rows.append(f"| {what} | {size_gib:g} GiB | {gib:.2f} GiB | {wall:.2f} s "
                    f"| {gib / wall:.2f} GiB/s | {cpu:.2f} s | {cpu / gib:.2f} s "
                    f"| {peak / 2**20:.0f} MiB |")
    return rows, stored, fp_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-gib", type=float, nargs="+", default=[1.0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    rows, files = [], []
    for size in args.size_gib:
        more, stored, fp_bytes = _measure(size, args.runs)
        rows += more
        files.append(f"{fp_bytes / 2**20:.1f} MiB for {stored:,} stored pages")
    text = "\n".join([
        START,
        (f"`{' '.join(['sudo python benchmarks/bench_live_fingerprint.py', *sys.argv[1:]])}` "
         f"on {machine()}; fingerprint files: {', '.join(files)}:"),
        "",
        (f"| run (best of {args.runs}) | process | present, read | wall | throughput | CPU user+sys "
         "| CPU per GiB read | peak Pss_Anon |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        END,
    ])
    print(text)
    if args.no_write:
        return
    doc = ROOT / "BENCHMARKS.md"
    old = doc.read_text()
    if START in old:
        head, _, rest = old.partition(START)
        _, _, tail = rest.partition(END)
        doc.write_text(head + text + tail)
    else:
        doc.write_text(old.rstrip("\n") + "\n\n## Live fingerprint\n\n" + text + "\n")


if __name__ == "__main__":
    main()
