#!/usr/bin/env python3
"""Fleet scale end to end: ``scan``, ``plan`` and ``report`` of synthetic fleets of
fingerprint files, in one process and on a local Dask cluster, and placement at full size.

1. For each ``--guests`` count: a fleet drawn by ``synthetic_fleet.draw`` (guests of 1 to 64
   GiB, families sharing an OS image, per-guest unique data and zero pages), written as
   fingerprint files at 1/``--scale`` of its size (every page count divided by it, so the
   files fit this machine). Then ``scan``, ``plan --json`` (hosts of ``--host-gib`` / scale)
   and, for fleets up to ``--report-max`` guests, ``report``, each a fresh process, timed,
   with the peak Pss_Anon of the process and all its children (sampled every 50 ms): in
   memory, out of core under a ``--memory-limit`` of a quarter of the in-memory estimate,
   and the same on ``--scheduler local:2`` (the aggregation on two Dask workers).
   Exactness: ``--sample-hosts`` hosts of the sharing-aware plan, each ``scan``-ned alone:
   its memory after KSM must be the plan's.
2. ``--place-guests``: the core table of that many guests at full size, generated without
   files (``synthetic_fleet.core_table``: what ``scan`` would build; equal to it on every
   fleet written at a scale, checked there), planned on hosts of ``--host-gib``, each step
   timed. Exactness: the sampled hosts' memory equals that of the core table generated for
   their guests alone.

The table goes between the bench-fleet-scale markers of BENCHMARKS.md; ``--extra`` options
are given to every command.

    python benchmarks/bench_fleet_scale.py --guests 100 1000 5000 --place-guests 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_fleet as sf
from bench_fleet import run_sampled
from bench_scan import machine

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench-fleet-scale:start -->", "<!-- bench-fleet-scale:end -->"
MODES = {"in memory": [], "out of core": ["--memory-limit", "{limit}"],
         "out of core, local:2": ["--scheduler", "local:2", "--memory-limit", "{limit}"]}
"""How each fleet is run: fingerprint files that fit are analysed in memory on the client
(also with --scheduler), so the Dask workers aggregate only out of core, under a limit."""
LIMIT_SHARE = 4
"""The out-of-core runs' --memory-limit: the in-memory estimate (100 bytes a page) over this,
and at least 64 MiB."""

PLACE = """
import json, sys, time, types
sys.path.insert(0, sys.argv[1])
import numpy as np
import synthetic_fleet as sf
from ksm_analyze import KsmSettings
from ksm_analyze.ksm import memory_after
from ksm_analyze.planning import plan as planmod

n, host, samples = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
steps = {}
def timed(name, fn):
    def run(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            steps[name] = steps.get(name, 0.0) + time.perf_counter() - t
    return run
for name in ("HostModel", "place", "first_fit", "lower_bound", "_host_frame"):
    setattr(planmod, name, timed(name, getattr(planmod, name)))
fleet = sf.draw(n, seed=1)
t = time.perf_counter()
table = sf.core_table(fleet)
generated = time.perf_counter() - t
settings = KsmSettings()
analysis = types.SimpleNamespace(contents=table, ksm=settings, names=table.names, warnings=[],
                                 per_input={"bytes": table.column("pages") * sf.PS})
t = time.perf_counter()
result = planmod.plan(analysis, host)
planned = time.perf_counter() - t
hosts = result.hosts[result.hosts["method"] == "sharing"]
pick = np.unique(np.linspace(0, len(hosts) - 1, samples).round().astype(int))
exact = []
for k in pick:
    row = hosts.iloc[int(k)]
    mine = [int(name.split("-")[1]) for name in row["inputs"]]
    alone = sf.core_table(sf.Fleet(fleet.size_gib[mine], fleet.family[mine],
                                   fleet.zero_share[mine], fleet.file_pages, fleet.holds[mine]))
    c = alone.counters(settings)
    want = memory_after(c.pages_shared + c.pages_unshared, c.ksm_rmap_items, sf.PS,
                        settings.rmap_bytes)
    exact.append(int(row["memory_after_bytes"]) == int(want))
summary = result.summary.set_index("method")["hosts"].to_dict()
print(json.dumps({"rows": len(table.content), "generate_s": generated, "plan_s": planned,
                  "steps": steps, "hosts": {k: int(v) for k, v in summary.items()},
                  "tib": float(fleet.size_gib.sum()) / 1024, "exact": exact}))
"""


def ksm(*args: str) -> list[str]:
    return [sys.executable, "-m", "ksm_analyze", *args]


def exact_hosts(plan: dict, folder: Path, samples: int, extra: list[str]) -> list[bool]:
    """Whether each of ``samples`` hosts of the sharing-aware plan needs what ``scan`` of
    its inputs alone says."""
    hosts = [h for h in plan["hosts"] if h["method"] == "sharing"]
    pick = np.unique(np.linspace(0, len(hosts) - 1, samples).round().astype(int))
    out = []
    for k in pick:
        host = hosts[int(k)]
        files = [str(folder / f"{name}.ksmfp.parquet") for name in host["inputs"]]
        r = subprocess.run(ksm("scan", *files, "--json", "-q", *extra), capture_output=True,
                           check=True, cwd=ROOT)
        got = json.loads(r.stdout)["savings"]["memory_after"]["with_zero_pages_bytes"]
        out.append(int(got) == int(host["memory_after_bytes"]))
    return out


def fleet_rows(args: argparse.Namespace, n: int, extra: list[str]) -> tuple[list[str], str]:
    """The table rows of a fleet of ``n`` guests, and a line on its plan's exactness."""
    fleet = sf.draw(n, seed=1)
    folder = Path(tempfile.mkdtemp(prefix=f"fleet-scale-{n}-", dir=args.dir))
    try:
        t = time.perf_counter()
        files = [str(p) for p in sf.write_fleet(fleet, folder / "fp", args.scale)]
        written = time.perf_counter() - t
        pages = int(fleet.pages(args.scale).sum())
        parquet = sum(os.path.getsize(f) for f in files)
        host = f"{(args.host_gib << 30) // args.scale >> 10}KiB"
        stages: dict[str, dict[str, tuple[float, int]]] = {}
        out_of_core: dict[str, bool] = {}
        plan_out = None
        limit = max(64 << 20, pages * 100 // LIMIT_SHARE)
        for m, (mode, template) in enumerate(MODES.items()):
            flags = [f.format(limit=limit) for f in template]
            runs = {"scan": ksm("scan", *files, "-q", *flags, *extra),
                    "plan": ksm("plan", *files, "--host-memory", host, "--json", "-q", *flags,
                                *extra)}
            if n <= args.report_max:
                runs["report"] = ksm("report", *files, "-o", str(folder / f"report-{m}"),
                                     "-q", *flags, *extra)
            for stage, cmd in runs.items():
                elapsed, peak, out = run_sampled(cmd)
                stages.setdefault(stage, {})[mode] = (elapsed, peak)
                if stage == "scan" and flags:  # the scan says when it went out of core
                    out_of_core[mode] = b"out of core:" in out
                if stage == "plan" and plan_out is None:
                    plan_out = json.loads(out)
                print(f"{n} guests, {stage}, {mode}: {elapsed:.1f} s, {peak / 2**20:.0f} MiB",
                      file=sys.stderr, flush=True)
        assert plan_out is not None
        exact = exact_hosts(plan_out, folder / "fp", args.sample_hosts, extra)
        hosts = {s["method"]: s["hosts"] for s in plan_out["summary"]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    what = (f"{n:,} guests ({float(fleet.size_gib.sum()) / 1024:.1f} TiB; {pages:,} pages, "
            f"{parquet / 2**20:.0f} MiB of Parquet, written in {written:.0f} s; "
            + (f"out of core under --memory-limit {limit / 2**20:,.0f} MiB)"
               if all(out_of_core.values()) else
               f"fits in --memory-limit {limit / 2**20:,.0f} MiB: in memory in every column)"))
    rows = [f"| {what if k == 0 else ''} | {stage} | "
            + " | ".join(f"{v[0]:.1f} s | {v[1] / 2**20:,.0f} MiB" for v in by_mode.values())
            + " |" for k, (stage, by_mode) in enumerate(stages.items())]
    line = (f"- {n:,} guests: plan on hosts of {args.host_gib} GiB / {args.scale}: sharing-aware "
            f"{hosts.get('sharing')} hosts, first-fit {hosts.get('first_fit')}, lower bound "
            f"{hosts.get('lower_bound')}; {sum(exact)} of {len(exact)} sampled hosts equal "
            f"`scan` of their inputs{'' if all(exact) else ' (NOT ALL: a bug)'}.")
    return rows, line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, nargs="*", default=[100, 1000, 5000])
    ap.add_argument("--scale", type=int, default=1024, help="page counts divided by this")
    ap.add_argument("--host-gib", type=int, default=256, help="host memory at full size")
    ap.add_argument("--report-max", type=int, default=1000, help="report for fleets up to this")
    ap.add_argument("--sample-hosts", type=int, default=3, help="hosts checked against scan")
    ap.add_argument("--place-guests", type=int, default=2000,
                    help="placement at full size of this many guests (0: none)")
    ap.add_argument("--extra", default="", help="more options for every command")
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: tmp)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    extra = shlex.split(args.extra)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

    modes = " | ".join(f"{m}: time | {m}: peak Pss_Anon" for m in MODES)
    lines = [START,
             f"- Machine: {machine()}", f"- Date: {time.strftime('%Y-%m-%d')}",
             f"- Command: `python benchmarks/bench_fleet_scale.py {shlex.join(sys.argv[1:])}`",
             "", f"| fleet (1/{args.scale} of its size) | stage | {modes} |",
             "|---|---|" + "---:|" * 2 * len(MODES)]
    notes = []
    for n in args.guests:
        rows, note = fleet_rows(args, n, extra)
        lines += rows
        notes.append(note)
    lines += ["", *notes]
    if args.place_guests:
        elapsed, peak, out = run_sampled([sys.executable, "-c", PLACE, str(Path(__file__).parent),
                                          str(args.place_guests), str(args.host_gib << 30),
                                          str(args.sample_hosts)])
        got = json.loads(out)
        s = got["steps"]
        lines += [
            "",
            (f"Placement at full size: {args.place_guests:,} guests ({got['tib']:.1f} TiB), "
             f"their core table generated ({got['rows']:,} sparse rows, in "
             f"{got['generate_s']:.0f} s), `plan` on hosts of {args.host_gib} GiB: "
             f"{got['plan_s']:.1f} s in all (model {s['HostModel']:.1f} s, sharing-aware "
             f"{s['place']:.1f} s, first-fit {s['first_fit']:.1f} s, lower bound "
             f"{s['lower_bound']:.1f} s, host tables {s['_host_frame']:.1f} s); peak "
             f"Pss_Anon {peak / 2**30:.2f} GiB, {elapsed:.0f} s with the generation. Hosts: "
             f"sharing-aware {got['hosts']['sharing']}, first-fit {got['hosts']['first_fit']}, "
             f"lower bound {got['hosts']['lower_bound']}; {sum(got['exact'])} of "
             f"{len(got['exact'])} sampled hosts equal the core table of their guests alone."),
        ]
    lines += ["", END]
    text = "\n".join(lines)
    old = args.output.read_text() if args.output.exists() else ""
    if START in old:
        head, _, rest = old.partition(START)
        args.output.write_text(head + text + rest.partition(END)[2])
    else:
        args.output.write_text(old.rstrip("\n") + "\n\n## Fleet scale, end to end\n\n" + text
                               + "\n")
    print(text)


if __name__ == "__main__":
    main()
