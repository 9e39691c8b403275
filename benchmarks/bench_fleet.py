#!/usr/bin/env python3
"""Fleet scale: combining 100 million fingerprints in bounded memory, and Dask against one
process.

1. Writes ``--files`` synthetic fingerprint files of ``--rows`` pages each (default 100 x 1M =
   100 million pages; generated here, never committed): 25% zero pages, 50% copies drawn from
   a pool of ``--pool`` contents, 25% unique. Then runs ``ksm_analyze.fleet.combine.combine()`` in a
   fresh process, sampling its private memory (``Pss_Anon`` of ``smaps_rollup``) every 50 ms,
   and checks the counters against a hand model of the draws.
2. With ``--memory-limit SIZE``: times ``scan FILES --json`` in memory and out of core under
   that limit, each a fresh process, with its peak Pss_Anon, and checks the counters agree.
3. With ``--dumps FILE...``: times ``scan FILES --json`` with ``--jobs 2`` and with
   ``--scheduler local:2`` (a LocalCluster of two worker processes), each a fresh process, with
   the peak Pss of the process and all its children, and checks the counters agree.

    python benchmarks/bench_fleet.py                       # 100 million fingerprints
    python benchmarks/bench_fleet.py --files 4 --rows 100000 --dumps a.raw b.raw
    python benchmarks/bench_fleet.py --files 20 --rows 1000000 --memory-limit 1GiB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_fleet
from bench_scan import hand_model, machine
from synthetic_fleet import write_fingerprint_file

ROOT = Path(__file__).resolve().parent.parent
PS, _mix = synthetic_fleet.PS, synthetic_fleet.mix  # for scripts that import them from here


def generate(folder: Path, files: int, rows: int, pool: int, seed: int = 7) -> dict[str, int]:
    """Write the files; return the hand model's counters for what was drawn."""
    rng = np.random.default_rng(seed)
    drawn = np.zeros(pool, np.int64)
    zero = unique = 0
    next_unique = np.uint64(1 << 62)  # numbers apart from the pool's
    for f in range(files):
        kind = rng.choice(3, size=rows, p=[0.25, 0.5, 0.25])  # zero, copy, unique
        number = np.zeros(rows, np.uint64)
        copies = np.flatnonzero(kind == 1)
        picks = rng.integers(0, pool, len(copies))
        np.add.at(drawn, picks, 1)
        number[copies] = picks.astype(np.uint64) + np.uint64(1)
        fresh = np.flatnonzero(kind == 2)
        number[fresh] = next_unique + np.arange(len(fresh), dtype=np.uint64)
        next_unique += np.uint64(len(fresh))
        zero += rows - len(copies) - len(fresh)
        unique += len(fresh)
        write_fingerprint_file(folder, f"guest-{f:04d}", number)
    # A pool content drawn once is a unique page too.
    return hand_model(zero, drawn[drawn > 1].tolist(), unique + int((drawn == 1).sum()))


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _pss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_sampled(cmd: list[str]) -> tuple[float, int, bytes]:
    """Wall time, peak Pss_Anon summed over the process tree, and stdout."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(_pss_anon(p) for p in _tree(proc.pid)))
        time.sleep(0.05)
    elapsed = time.perf_counter() - t
    reader.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return elapsed, peak, b"".join(chunks)


COMBINE = """
import glob, json, sys, time, tracemalloc
from ksm_analyze.fleet.combine import combine
from ksm_analyze.ksm import KsmSettings
tracemalloc.start()  # numpy reports its arrays to it: the peak of each step
t = time.perf_counter()
table = combine(sorted(glob.glob(sys.argv[1] + "/*.ksmfp.parquet")), partitions=int(sys.argv[2]),
                workdir=sys.argv[3])
combined, (held, peak) = time.perf_counter() - t, tracemalloc.get_traced_memory()
tracemalloc.reset_peak()
c = table.counters(KsmSettings())
print(json.dumps({"seconds": time.perf_counter() - t, "combine_seconds": combined,
                  "pages_shared": c.pages_shared, "pages_sharing": c.pages_sharing,
                  "pages_unshared": c.pages_unshared, "rows": len(table.content),
                  "combine_peak": peak, "table": held,
                  "counters_peak": tracemalloc.get_traced_memory()[1]}))
"""


def _scan_out_of_core(folder: Path, limit: str) -> list[str]:
    """``scan --json`` of the files in memory and under ``--memory-limit limit``, each a
    fresh process: time, peak Pss_Anon, and whether the counters agree."""
    files = sorted(map(str, folder.glob("*.ksmfp.parquet")))
    out, hosts = ["| scan of the files | time | peak Pss_Anon |", "|---|---:|---:|"], []
    for label, extra in (("in memory", []), (f"--memory-limit {limit}",
                                             ["--memory-limit", limit])):
        elapsed, peak, text = run_sampled([sys.executable, "-m", "ksm_analyze", "scan",
                                           *files, "--json", "-q", "-j", "1", *extra])
        host = json.loads(text)["host"]
        hosts.append({k: {s: v for s, v in by.items() if s != "steady_state"}
                      for k, by in host.items()})
        out.append(f"| {label} | {elapsed:.1f} s | {peak / 2**20:,.0f} MiB |")
    return [*out, "", f"Counters of the two runs: {'equal' if hosts[0] == hosts[1] else 'DIFFER'}.",
            ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--rows", type=int, default=1_000_000, help="pages per file")
    ap.add_argument("--pool", type=int, default=5_000_000, help="contents the copies share")
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: tmp)")
    ap.add_argument("--dumps", nargs="*", default=[], help="dumps for scan vs Dask")
    ap.add_argument("--memory-limit", default=None,
                    help="also time scan of the files in memory and with this --memory-limit")
    args = ap.parse_args()

    lines = [f"- Machine: {machine()}", f"- Date: {time.strftime('%Y-%m-%d')}",
             f"- Command: `python benchmarks/bench_fleet.py {' '.join(sys.argv[1:])}`", ""]
    folder = Path(tempfile.mkdtemp(prefix="fleet-", dir=args.dir))
    try:
        t = time.perf_counter()
        expect = generate(folder, args.files, args.rows, args.pool)
        made = time.perf_counter() - t
        size = sum(f.stat().st_size for f in folder.iterdir())
        spill = folder / "spill"
        spill.mkdir()
        elapsed, peak, out = run_sampled([sys.executable, "-c", COMBINE, str(folder),
                                          str(args.partitions), str(spill)])
        got = json.loads(out)
        keys = ("pages_shared", "pages_sharing", "pages_unshared")
        ok = all(got[k] == expect[k] for k in keys)
        total = args.files * args.rows
        lines += [
            "| combine | result |", "|---|---|",
            (f"| fingerprints | {total:,} pages in {args.files} files of {args.rows:,} "
             f"({size / 2**30:.2f} GiB of Parquet, written in {made:.0f} s) |"),
            f"| partitions | {args.partitions} |",
            (f"| time (process start to counters) | {elapsed:.1f} s "
             f"({got['combine_seconds']:.1f} s in combine) |"),
            (f"| peak private memory (Pss_Anon) | {peak / 2**30:.2f} GiB "
             f"({peak / total:.1f} bytes a page); target < 4 GiB: "
             f"{'met' if peak < 4 << 30 else 'NOT met'} |"),
            (f"| the result: the core table | {got['rows']:,} sparse rows, "
             f"{got['table'] / 2**30:.2f} GiB |"),
            (f"| peak of `combine` (tracemalloc: arrays and objects) | "
             f"{got['combine_peak'] / 2**30:.2f} GiB: the result and one partition |"),
            (f"| peak of `counters()` on the result (tracemalloc) | "
             f"{got['counters_peak'] / 2**30:.2f} GiB |"),
            f"| counters vs. the hand model | {'equal' if ok else f'DIFFER: {got} {expect}'} |",
            "",
        ]
        if args.memory_limit:
            lines += _scan_out_of_core(folder, args.memory_limit)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.dumps:
        gib = sum(os.path.getsize(d) for d in args.dumps) / 2**30
        for d in args.dumps:
            subprocess.run(["cat", d], stdout=subprocess.DEVNULL, check=True)  # warm
        results = {}
        for label, extra in (("one process, --jobs 2", ["-j", "2"]),
                             ("Dask LocalCluster, 2 workers", ["--scheduler", "local:2"])):
            cmd = [sys.executable, "-m", "ksm_analyze", "scan", *args.dumps, "--json", "-q",
                   *extra]
            elapsed, peak, out = run_sampled(cmd)
            results[label] = (elapsed, peak, json.loads(out)["host"])
        same = len({json.dumps(r[2], sort_keys=True) for r in results.values()}) == 1
        lines += [(f"| scan of {len(args.dumps)} dumps, {gib:.1f} GiB | wall time | "
                   "peak Pss (process and workers) |"), "|---|---:|---:|"]
        lines += [f"| {k} | {v[0]:.1f} s | {v[1] / 2**20:.0f} MiB |" for k, v in results.items()]
        lines += ["", f"Counters of the two runs: {'equal' if same else 'DIFFER'}.", ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
