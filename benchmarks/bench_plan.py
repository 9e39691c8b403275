#!/usr/bin/env python3
"""Time ``plan``: reading, classing and placing many guests that share a base image.

Two runs, written to BENCHMARKS.md ("Planning"):

1. The whole pipeline on generated raw dumps (default 200 guests of 32 MiB; a 1 GiB guest
   each would need 200 GiB of disk): reading and hashing (stage 1), classing (stage 2), and
   placing (sharing-aware and first-fit), each timed.
2. Placing alone at full scale: the core table of 200 guests of 1 GiB is generated directly
   (same mix, no dumps), so only the placement is timed.

Each guest: half its pages from a base image every guest shares, a tenth shared with the
other guests of its group of ten, a tenth zero, the rest its own.

    python benchmarks/bench_plan.py --guests 200 --mib 32
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_scan import machine
from ksm_analyze import ContentTable, KsmSettings, analyze
from ksm_analyze.content_table import INPUT_COLUMNS
from ksm_analyze.planning.placement import HostModel, first_fit, place

PS = 4096
GROUP = 10


def mix(pages: int) -> tuple[int, int, int, int]:
    """Pages of base image, group, zero and private content per guest."""
    base, group, zero = pages // 2, pages // 10, pages // 10
    return base, group, zero, pages - base - group - zero


def write_guests(d: Path, guests: int, mib: int) -> list[str]:
    rng = np.random.default_rng(1)
    base, group, zero, own = mix(mib << 20 >> 12)
    image = rng.integers(0, 256, (base, PS), dtype=np.uint8)
    groups = {}
    paths = []
    for g in range(guests):
        if g // GROUP not in groups:
            groups[g // GROUP] = rng.integers(0, 256, (group, PS), dtype=np.uint8)
        pages = np.concatenate([image, groups[g // GROUP], np.zeros((zero, PS), np.uint8),
                                rng.integers(0, 256, (own, PS), dtype=np.uint8)])
        path = d / f"guest{g:03}.raw"
        pages[rng.permutation(len(pages))].tofile(path)
        paths.append(str(path))
    return paths


def synthetic_table(guests: int, mib: int) -> ContentTable:
    """The core table of ``guests`` guests of ``mib`` MiB, built without dumps."""
    base, group, zero, own = mix(mib << 20 >> 12)
    content, owner = [], []
    for g in range(guests):
        content += [np.arange(base), base + (g // GROUP) * group + np.arange(group)]
        owner.append(np.full(base + group, g, np.int32))
    content_a, owner_a = np.concatenate(content), np.concatenate(owner)
    order = np.lexsort((owner_a, content_a))
    inputs = pd.DataFrame({c: 0 for c in INPUT_COLUMNS}, index=range(guests))
    inputs["input"] = [f"guest{g:03}" for g in range(guests)]
    inputs["zero_pages"], inputs["unique_pages"] = zero, own
    return ContentTable(inputs, content_a[order].astype(np.int64), owner_a[order],
                        np.ones(len(order), np.int64), PS)


def time_placing(table: ContentTable, capacity: int) -> dict[str, float]:
    started = time.perf_counter()
    model = HostModel(table, KsmSettings())
    modelled = time.perf_counter()
    sharing = place(model, capacity)
    placed = time.perf_counter()
    ffd = first_fit(model, capacity)
    done = time.perf_counter()
    return {"model_s": modelled - started, "sharing_s": placed - modelled,
            "first_fit_s": done - placed, "sharing_hosts": len(sharing.hosts),
            "first_fit_hosts": len(ffd.hosts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=200)
    ap.add_argument("--mib", type=int, default=32, help="MiB per generated dump")
    ap.add_argument("--full-mib", type=int, default=1024, help="MiB per guest, placing only")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the dumps")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-plan-"))
    try:
        paths = write_guests(d, args.guests, args.mib)
        started = time.perf_counter()
        result = analyze(paths)
        analysed = time.perf_counter() - started
        stages = result.stages["value"]
        guest_after = HostModel(result.contents, result.ksm).alone.max()
        pipeline = time_placing(result.contents, int(guest_after * GROUP * 0.6))
    finally:
        shutil.rmtree(d)
    full = synthetic_table(args.guests, args.full_mib)
    full_alone = HostModel(synthetic_table(1, args.full_mib), KsmSettings()).alone[0]
    at_scale = time_placing(full, int(full_alone * GROUP * 0.6))

    size = args.guests * args.mib
    lines = [
        "## Planning",
        "",
        (f"Machine: {machine()}. Command: `python benchmarks/bench_plan.py --guests "
        f"{args.guests} --mib {args.mib}`."),
        "",
        "| step | guests | seconds |",
        "|---|---:|---:|",
        (f"| read and hash (stage 1), {size / 1024:.1f} GiB of dumps | {args.guests} | "
        f"{float(stages['stage1_seconds']):.1f} |"),
        f"| class (stage 2) | {args.guests} | {float(stages['stage2_seconds']):.1f} |",
        f"| whole analysis (open, stages, tables) | {args.guests} | {analysed:.1f} |",
        (f"| place: model, sharing-aware, first-fit ({args.mib} MiB guests) | {args.guests} | "
        f"{pipeline['model_s']:.1f} + {pipeline['sharing_s']:.1f} + "
        f"{pipeline['first_fit_s']:.2f} |"),
        (f"| place only, {args.full_mib} MiB guests (core table generated) | {args.guests} | "
        f"{at_scale['model_s']:.1f} + {at_scale['sharing_s']:.1f} + "
        f"{at_scale['first_fit_s']:.2f} |"),
        "",
        (f"Hosts (room for about six guests each): sharing-aware {pipeline['sharing_hosts']} "
        f"against first-fit {pipeline['first_fit_hosts']} ({args.mib} MiB guests); "
        f"{at_scale['sharing_hosts']} against {at_scale['first_fit_hosts']} at "
        f"{args.full_mib} MiB. Each guest: half a shared base image, a tenth shared within its "
        "group of ten, a tenth zero, the rest its own."),
        "",
    ]
    text = args.output.read_text() if args.output.exists() else ""
    head = text.split("## Planning")[0].rstrip("\n")
    tail = text.split("## Planning", 1)[1].split("\n## ", 1) if "## Planning" in text else []
    rest = ("\n## " + tail[1]) if len(tail) > 1 else ""
    args.output.write_text(head + "\n\n" + "\n".join(lines) + rest)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
