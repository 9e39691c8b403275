#!/usr/bin/env python3
"""Combining fingerprint files on a Dask cluster against one process.

Runs, each in a fresh process, ``combine()`` (one process) and ``combine_on_cluster()`` with
``--scheduler`` (default ``local:2``: a LocalCluster of two worker processes, children of
the client), over every ``*.ksmfp.parquet`` of a folder; samples private memory
(``Pss_Anon`` of ``smaps_rollup``) every 50 ms, of the client process alone and of its
children (the workers) summed, measures the CPU time of the whole tree (steadier than wall
time on a shared machine), and checks both give the same table.

    python /work/scratch/gen1000.py /tmp/f1000 1000 64 100     # or any fingerprint files
    python benchmarks/bench_cluster.py /tmp/f1000 --partitions 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fleet import ROOT, _pss_anon, _tree

RUN = """
import glob, hashlib, json, sys, time
from ksm_analyze.fleet.cluster import combine_on_cluster
from ksm_analyze.fleet.combine import combine
from ksm_analyze.ksm import KsmSettings

def main():
    files = sorted(glob.glob(sys.argv[1] + "/*.ksmfp.parquet"))
    t = time.perf_counter()
    if sys.argv[3] == "-":
        table = combine(files, partitions=int(sys.argv[2]))
    else:
        table = combine_on_cluster(files, scheduler=sys.argv[3], partitions=int(sys.argv[2]))
    seconds = time.perf_counter() - t
    c = table.counters(KsmSettings())
    digest = hashlib.sha256()
    for a in (table.content, table.owner, table.pages):
        digest.update(a.tobytes())
    digest.update(json.dumps(table.input_columns.rows(), default=str).encode())
    print(json.dumps({"seconds": seconds, "files": len(files), "rows": len(table.content),
                      "pages_shared": c.pages_shared, "pages_sharing": c.pages_sharing,
                      "table_sha256": digest.hexdigest()}))

if __name__ == "__main__":
    main()
"""


def run(cmd: list[str]) -> tuple[float, float, int, int, bytes]:
    """Wall time, CPU time of the process and its children (each waited for by its parent),
    peak Pss_Anon of the process, peak of its children summed, and stdout."""
    t, used = time.perf_counter(), _cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    client = workers = 0
    while proc.poll() is None:
        client = max(client, _pss_anon(proc.pid))
        workers = max(workers, sum(_pss_anon(p) for p in _tree(proc.pid)[1:]))
        time.sleep(0.05)
    elapsed = time.perf_counter() - t
    reader.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return elapsed, _cpu() - used, client, workers, b"".join(chunks)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--scheduler", default="local:2")
    args = ap.parse_args()
    mib = 1 << 20
    results = {}
    for name, where in (("one process: combine()", "-"),
                        (f"--scheduler {args.scheduler}: combine_on_cluster()", args.scheduler)):
        wall, cpu, client, workers, out = run([sys.executable, "-c", RUN, str(args.folder),
                                          str(args.partitions), where])
        got = json.loads(out)
        results[name] = got
        print(f"{name}: {wall:.1f} s in all ({got['seconds']:.1f} s combining; CPU {cpu:.1f} s), "
              "peak Pss_Anon "
              f"client {client / mib:.0f} MiB, workers {workers / mib:.0f} MiB; "
              f"{got['files']} files, {got['rows']} rows, pages_sharing {got['pages_sharing']}")
    one, other = results.values()
    if one != {**other, "seconds": one["seconds"]}:
        raise SystemExit(f"the tables differ: {one} {other}")
    print("same table")


if __name__ == "__main__":
    main()
