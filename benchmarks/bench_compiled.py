#!/usr/bin/env python3
"""What the compiled kernels buy: ``scan`` of one dump with them and with the numpy code.

    python benchmarks/bench_compiled.py FILE [--repeat 3]

Times, back to back on a warm page cache, ``cat FILE > /dev/null`` and fresh ``scan FILE
--json`` processes with ``--jobs 2`` and ``--jobs 1``, once as installed (the compiled
kernels, ``ksm_analyze/hashing/_compiled.c``) and once with ``KSM_ANALYZE_NO_KERNELS=1``
(the numpy code a machine without a C compiler gets).
Best of ``--repeat`` each; the counters of both paths must be equal (the script fails if
not). Prints a Markdown table. Make a dump with ``bench_scan.py --keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_scan import ROOT, best_of, cat_cmd, machine, scan_counters, timed

PATHS = {"compiled kernels": {}, "numpy": {"KSM_ANALYZE_NO_KERNELS": "1"}}
"""Each path by the environment that chooses it (hashing/compiled.py decides)."""


def scan(path: Path, jobs: int, env: dict[str, str]) -> tuple[float, dict[str, int]]:
    """Wall seconds of one ``scan PATH --json --jobs JOBS`` process, and its counters."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ksm_analyze", "scan", str(path), "--json",
                           "--jobs", str(jobs)], capture_output=True, cwd=ROOT, check=False,
                          env={k: v for k, v in os.environ.items()
                               if k != "KSM_ANALYZE_NO_KERNELS"} | env)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.decode(errors="replace")[-3000:])
    return elapsed, scan_counters(json.loads(proc.stdout))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings (default 3)")
    args = ap.parse_args()
    timed(cat_cmd(args.file))  # warm
    cat = best_of(args.repeat, lambda: timed(cat_cmd(args.file)))
    rows, counters = [], []
    for name, env in PATHS.items():
        for jobs in (2, 1):
            runs = [scan(args.file, jobs, env) for _ in range(args.repeat)]
            best = min(s for s, _ in runs)
            counters += [c for _, c in runs]
            rows.append(f"| {name} | {jobs} | {best:.2f} s | {cat / best:.2f}x |")
    if any(c != counters[0] for c in counters):
        raise SystemExit(f"counters differ between runs: {counters}")
    size = args.file.stat().st_size / 2**30
    print(f"- {machine()}\n- Command: `python benchmarks/bench_compiled.py {args.file}`\n"
          f"- {args.file.name}: {size:.1f} GiB; `cat`: {cat:.2f} s (best of {args.repeat}); "
          "counters of every run equal\n")
    print("| path | --jobs | scan (best) | of cat's speed |\n|---|--:|--:|--:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
