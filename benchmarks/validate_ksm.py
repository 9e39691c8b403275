"""Predicted against real KSM: rewrite the measured tables in VALIDATION.md.

    sudo python benchmarks/validate_ksm.py [--runs N]

Runs tests/validation_runs.py's scenarios (two workload processes with use_zero_pages 0
and 1; two paused QEMU/TCG guests) N times each, and writes every run's predicted and actual
counters, with the guests' guest-view prediction, between the markers in VALIDATION.md.
Needs root (KSM knobs, kpageflags) and QEMU; restores every KSM knob.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_scan import machine

import validation_runs

COUNTERS = ("pages_shared", "pages_sharing", "general_profit", "ksm_zero_pages")
FIELDS = ("ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit")
START, END = "<!-- validation:start -->", "<!-- validation:end -->"


def _pct(actual: int, predicted: int) -> str:
    if predicted == 0:
        return "0.00%" if actual == 0 else "n/a"
    return f"{100.0 * (actual - predicted) / predicted:+.2f}%"


def _run_rows(name: str, run: validation_runs.Run) -> list[str]:
    rows = []
    host = run.status.host
    for c in COUNTERS:
        a, p = int(host.at[c, "actual"]), int(host.at[c, "predicted"])
        rows.append(f"| {name} | host `{c}` | {p:,} | {a:,} | {_pct(a, p)} |")
    for _, r in run.status.processes.iterrows():
        for f in FIELDS:
            a, p = int(r[f"{f}_actual"]), int(r[f"{f}_predicted"])
            rows.append(f"| {name} | pid {r['pid']} `{f}` | {p:,} | {a:,} | {_pct(a, p)} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=2, help="runs of each scenario")
    args = ap.parse_args()
    rows, guest_rows = [], []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            for z in (0, 1):
                run = validation_runs.workloads(Path(d), use_zero_pages=z)
                rows += _run_rows(f"workloads, use_zero_pages={z}, run {i + 1}", run)
        with tempfile.TemporaryDirectory() as d:
            run = validation_runs.qemu_guests(Path(d))
            rows += _run_rows(f"2 QEMU guests, run {i + 1}", run)
            guest = run.guest_view.counters if run.guest_view else None
            analysis = run.status.analysis
            assert guest is not None and analysis is not None
            host = run.status.host
            zero_guest = int(run.guest_view.per_input["zero_pages"].sum())
            guest_rows.append(
                f"| run {i + 1} | {guest.pages_shared:,} | {guest.pages_sharing:,} | "
                f"{zero_guest:,} | {int(host.at['pages_shared', 'predicted']):,} | "
                f"{int(host.at['pages_sharing', 'predicted']):,} | "
                f"{int(analysis.exclusions['thp_zero'].sum()):,} | "
                f"{int(host.at['pages_sharing', 'actual']):,} |"
            )
    text = "\n".join([
        START,
        (f"Measured {date.today().isoformat()} on {machine()}, "
        f"with `sudo python benchmarks/validate_ksm.py --runs {args.runs}`."),
        "",
        "| scenario | counter | predicted | actual (kernel) | difference |",
        "|---|---|---:|---:|---:|",
        *rows,
        "",
        "Guest view (the guests' `dump-guest-memory` ELF dumps, with zero pages) against",
        "host view (capture of the QEMU processes) and the kernel, same runs:",
        "",
        ("| run | guest view pages_shared | guest view pages_sharing | zero pages in the dumps "
        "| host view pages_shared | host view pages_sharing | THP zero subpages left out "
        "| kernel pages_sharing |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *guest_rows,
        END,
    ])
    doc = ROOT / "VALIDATION.md"
    old = doc.read_text()
    head, _, rest = old.partition(START)
    _, _, tail = rest.partition(END)
    doc.write_text(head + text + tail)
    print(text)


if __name__ == "__main__":
    main()
