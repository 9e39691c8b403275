#!/usr/bin/env python3
"""Throughput, memory and start-up of ``ksm-analyze scan`` against ``cat`` and ``xxhsum``.

For each size in ``--sizes`` and each page mix in ``--mixes`` the script writes a raw dump
with a known mix of pages (runs of 16 pages of one kind: zero pages, copies of 4,096
random contents, unique random pages), warms the page cache, and measures:

* ``cat FILE > /dev/null`` and ``xxhsum -H3 FILE`` (if installed), best of ``--repeat``;
* ``ksm-analyze scan FILE --json --jobs 1`` and ``--jobs 2``, best of ``--repeat`` each, every
  run a fresh process (start-up included), with the stage split the JSON reports;
* peak private memory of one more, untimed scan per ``--jobs`` value: ``Pss_Anon`` from
  ``/proc/PID/smaps_rollup`` summed over the process and its forked workers every 20 ms,
  and ``(peak - C) / pages`` against the budget of 24 B/page + C (``--mem-constant-mib``);
* the scan's KSM counters against a hand model of the mix (the script fails if they differ);
* with ``--cold`` (root): ``cat`` and ``scan --jobs 2`` once each after
  ``sync; echo 3 > /proc/sys/vm/drop_caches``.

Then the start-up time (median of 5 plain ``ksm-analyze scan`` runs of the two files in
``sample_dumps/``), and with ``--real DIR`` the same timings for every dump in DIR (see
``benchmarks/make_guest_dumps.py`` to make real QEMU dumps). The Markdown block goes between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` of BENCHMARKS.md (or ``--output``) and is
printed. Command lines::

    python benchmarks/bench_scan.py                        # 8 and 16 GiB, all mixes
    sudo python benchmarks/bench_scan.py --cold            # also cold page cache runs
    python benchmarks/bench_scan.py --keep --reuse         # keep dumps, reuse them next time
    python benchmarks/bench_scan.py --real /var/tmp/guest-dumps  # plus real dumps
    python benchmarks/bench_scan.py --sizes --real /var/tmp/guest-dumps  # only those
    python benchmarks/bench_scan.py --sizes 0.5 1 --repeat 1 --output /tmp/bench-test.md

Generated dumps go to ``--dir`` (default benchmarks/data, gitignored): one at a time, each
deleted after its measurements unless ``--keep`` (keeping all of the default run needs
48 GiB of disk). Writing 16 GiB takes about a minute; ``--reuse`` uses a dump left by an
earlier ``--keep`` run of the same mix, size and seed (a ``.json`` file beside it holds the
counts it was generated with).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PS = 4096
RUN = 16  # pages per run of one kind: zero pages come in runs in real memory too
DISTINCT_DUPLICATES = 4096  # contents the duplicated pages are drawn from
MAX_PAGE_SHARING = 256  # the kernel's default, which scan assumes
GENERATOR_VERSION = 2  # bump when generate() writes different bytes for the same arguments
ROOT = Path(__file__).resolve().parent.parent
SAMPLES = [ROOT / "sample_dumps" / "vm-a.elf", ROOT / "sample_dumps" / "vm-b.raw"]
JOBS = (1, 2)
STARTUP_RUNS, STARTUP_TARGET = 5, 0.5
SAMPLE_EVERY = 0.02  # seconds between memory samples
BUDGET_BYTES_PER_PAGE = 24
NOT_DUMPS = {".log", ".stderr", ".txt", ".json", ".md", ".part"}  # skipped by --real


@dataclass(frozen=True)
class Mix:
    """Fractions of runs of zero, duplicated and unique pages."""

    zero: float
    dup: float
    unique: float
    about: str


MIXES = {
    "today": Mix(0.25, 0.25, 0.50, "25% zero, 25% copies, 50% unique"),
    "idle": Mix(0.75, 1 / 12, 1 / 6,
                "75% zero (idle guest), 8.33% copies, 16.67% unique (the rest split 1:2 like "
                "today's)"),
    "few-candidates": Mix(0.20, 0.05, 0.75, "5% copies (candidates), 20% zero, 75% unique"),
}


@dataclass(frozen=True)
class Target:
    """Scan throughput of at least ``ratio`` times cat's at one size, mix and --jobs."""

    size: float
    mix: str
    jobs: int
    ratio: float


TARGETS = [Target(16, "today", 2, 0.8), Target(16, "today", 1, 0.6), Target(8, "today", 2, 0.6)]


# --- the dump and its hand model -------------------------------------------------------------

def generate(path: Path, size_gib: float, mix: Mix, seed: int = 1) -> dict[str, Any]:
    """Write the dump (via a ``.part`` file, fsynced); return what it holds: ``zero`` and
    ``unique`` pages, and how many ``copies`` of each duplicated content."""
    rng = np.random.default_rng(seed)
    npages = int(size_gib * 2**30) // PS // RUN * RUN
    kinds = rng.choice(3, size=npages // RUN, p=[mix.zero, mix.dup, mix.unique])
    pool = np.frombuffer(rng.bytes(DISTINCT_DUPLICATES * PS), np.uint8).reshape(-1, PS)
    copies = np.zeros(DISTINCT_DUPLICATES, np.int64)
    part = path.with_name(path.name + ".part")
    with contextlib.ExitStack() as undo:
        undo.callback(part.unlink, missing_ok=True)  # a no-op once renamed
        _write(part, rng, kinds, pool, copies)
        part.replace(path)
    counts = np.bincount(kinds, minlength=3) * RUN
    return {"zero": int(counts[0]), "copies": copies.tolist(), "unique": int(counts[2])}


def _write(part: Path, rng: np.random.Generator, kinds: np.ndarray, pool: np.ndarray,
           copies: np.ndarray) -> None:
    """Write the pages of ``kinds`` (a kind per run), counting the copies drawn from pool."""
    chunk_runs = 4096
    with open(part, "wb") as f:
        for start in range(0, len(kinds), chunk_runs):
            k = np.repeat(kinds[start : start + chunk_runs], RUN)
            block = np.zeros((len(k), PS), np.uint8)
            uniq = np.flatnonzero(k == 2)
            block[uniq] = np.frombuffer(rng.bytes(len(uniq) * PS), np.uint8).reshape(-1, PS)
            dup = np.flatnonzero(k == 1)
            pick = rng.integers(0, DISTINCT_DUPLICATES, len(dup))
            block[dup] = pool[pick]
            np.add.at(copies, pick, 1)
            f.write(block.tobytes())
        f.flush()
        os.fsync(f.fileno())  # no write-back during the timed runs


def hand_model(zero: int, copies: list[int], unique: int) -> dict[str, int]:
    """KSM counters for ``zero`` zero pages, contents seen ``copies`` times and ``unique``
    unique pages (max_page_sharing 256, use_zero_pages off; ksm_analyze/ksm.py docstring):
    a content seen c times makes c // 256 KSM pages, one more if c % 256 >= 2, and a
    leftover single page stays unshared."""
    used = np.array([c for c in copies if c > 0], np.int64)
    groups = np.append(used, zero) if zero else used
    q, r = np.divmod(groups, MAX_PAGE_SHARING)
    shared = int((q + (r >= 2)).sum())
    unshared = int((r == 1).sum()) + unique
    rmap = int(groups.sum()) + unique  # every page gets an rmap_item
    return {
        "pages": rmap,
        "zero_pages": zero,
        "duplicated_pages": int(used.sum()),
        "unique_pages": unique,
        "pages_shared": shared,
        "pages_sharing": rmap - shared - unshared,
        "pages_unshared": unshared,
    }


def scan_counters(result: dict[str, Any]) -> dict[str, int]:
    """The counters of a ``scan --json`` output that :func:`hand_model` predicts."""
    host = result["host"]
    return {
        "pages": result["per_input"][0]["pages"],
        "zero_pages": result["per_input"][0]["zero_pages"],
        **{k: host[k]["with_zero_pages"]
           for k in ("pages_shared", "pages_sharing", "pages_unshared")},
    }


def differences(m: Measured, expect: dict[str, int]) -> list[str]:
    """Where the scans' counters (each --jobs value) differ from the hand model."""
    return [f"`--jobs {jobs}` {k} {v:,} vs {expect[k]:,}"
            for jobs, run in m.scans.items()
            for k, v in scan_counters(run.result).items() if v != expect[k]]


def prepare(directory: Path, size_gib: float, name: str, seed: int,
            reuse: bool) -> tuple[Path, dict[str, int], bool]:
    """The dump of this size, mix and seed, its expected counts (:func:`hand_model`), and
    whether this run wrote it (False: reused from an earlier run, per its ``.json`` record)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"mix-{name}-{size_gib:g}gib-seed{seed}.raw"
    record = path.with_suffix(".json")
    mix = MIXES[name]
    key = {"version": GENERATOR_VERSION, "mix": [mix.zero, mix.dup, mix.unique],
           "size_gib": size_gib, "seed": seed}
    if reuse and path.exists() and record.exists():
        saved = json.loads(record.read_text())
        expect = hand_model(**saved["holds"]) if saved.get("key") == key else None
        if expect and path.stat().st_size == expect["pages"] * PS:
            log(f"reusing {path}")
            return path, expect, False
    log(f"generating {path} ...")
    t = time.perf_counter()
    holds = generate(path, size_gib, mix, seed)
    record.write_text(json.dumps({"key": key, "holds": holds}) + "\n")
    log(f"  {time.perf_counter() - t:.0f} s")
    return path, hand_model(**holds), True


# --- running and timing commands -----------------------------------------------------------

def log(msg: str) -> None:
    """Progress on stderr (stdout gets the Markdown block)."""
    print(msg, file=sys.stderr, flush=True)


def scan_command() -> list[str]:
    """How to start ``ksm-analyze``: the console script beside this Python (not a pyenv shim,
    which adds a bash and a pyenv process to every start), else ``python -m ksm_analyze``."""
    script = Path(sys.executable).with_name("ksm-analyze")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ksm_analyze"]


def shown_command() -> str:
    """:func:`scan_command` as the tables show it."""
    return "ksm-analyze" if len(scan_command()) == 1 else "python -m ksm_analyze"


def timed(cmd: list[str] | str) -> float:
    """Wall seconds of a command (a string runs in the shell), its output discarded."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, shell=isinstance(cmd, str), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, cwd=ROOT, check=False)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    return elapsed


def cat_cmd(path: Path) -> str:
    """``cat FILE > /dev/null``."""
    return f"cat {shlex.quote(str(path))} > /dev/null"


def xxhsum_cmd(path: Path) -> list[str]:
    """``xxhsum -H3 FILE`` (XXH3, 64 bits)."""
    return ["xxhsum", "-H3", str(path)]


def best_of(n: int, fn: Callable[[], float]) -> float:
    """The smallest of n calls of fn."""
    return min(fn() for _ in range(n))


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (the scan forks hashing workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo += [int(c) for c in task.read_text().split()]
    return out


def _pss_anon(pid: int) -> int:
    """Proportional anonymous memory of pid in bytes (0 once it is gone): a page shared
    copy-on-write by n processes counts 1/n, so summing over the tree counts it once."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class ScanRun:
    """One ``scan --json`` process: wall seconds, peak Pss_Anon of its tree (0 when not
    sampled) and the parsed output."""

    seconds: float
    peak: int
    result: dict[str, Any]

    @property
    def stages(self) -> tuple[float, float, float]:
        """Stage 1, stage 2, and the rest (start-up, imports, KSM model, output) in seconds."""
        s = self.result["stages"]
        s1, s2 = float(s["stage1_seconds"]), float(s["stage2_seconds"])
        return s1, s2, self.seconds - s1 - s2


def run_scan(path: Path, jobs: int, sample: bool = False) -> ScanRun:
    """Run ``ksm-analyze scan PATH --json --jobs JOBS`` in a fresh process.

    Sampling reads smaps_rollup, which walks the page tables under the mmap lock and slows
    the scan's page faults, so timed runs do not sample (``sample=False``).
    """
    cmd = [*scan_command(), "scan", str(path), "--json", "--jobs", str(jobs)]
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        chunks: list[bytes] = []
        assert proc.stdout is not None
        out = proc.stdout
        reader = threading.Thread(target=lambda: chunks.append(out.read()), daemon=True)
        reader.start()
        peak = 0
        while sample and proc.poll() is None:
            peak = max(peak, sum(_pss_anon(p) for p in _tree(proc.pid)))
            time.sleep(SAMPLE_EVERY)
        proc.wait()
        elapsed = time.perf_counter() - t
        reader.join()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n"
                             f"{err.read().decode(errors='replace')[-3000:]}")
    return ScanRun(elapsed, peak, json.loads(b"".join(chunks)))


def drop_caches() -> None:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def filesystem(path: Path) -> str:
    """The type of the file system holding path (the longest matching mount point)."""
    best, kind = "", "?"
    real = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


# --- measuring -------------------------------------------------------------------------------

@dataclass
class Measured:
    """Everything measured on one file (times in seconds, memory in bytes)."""

    path: Path
    size: int
    cat: float
    xxhsum: float | None
    scans: dict[int, ScanRun]  # fastest run per --jobs value
    peaks: dict[int, int]  # peak Pss_Anon per --jobs value (sampled runs)
    cold_cat: float | None = None
    cold_scan: float | None = None

    @property
    def gib(self) -> float:
        """Size in GiB."""
        return self.size / 2**30

    def ratio(self, jobs: int) -> float:
        """Scan throughput over cat's."""
        return self.cat / self.scans[jobs].seconds


def measure(path: Path, repeat: int, memory: bool, cold: bool) -> Measured:
    """Time cat, xxhsum and scan --jobs 1/2 on a warm page cache (best of ``repeat``), sample
    the scans' memory in untimed runs if ``memory``, then time cat and scan --jobs 2 once
    each on a cold page cache if ``cold``."""
    timed(cat_cmd(path))  # warm the page cache
    cat = best_of(repeat, lambda: timed(cat_cmd(path)))
    has_xxhsum = shutil.which("xxhsum") is not None
    xxh = best_of(repeat, lambda: timed(xxhsum_cmd(path))) if has_xxhsum else None
    scans = {}
    for jobs in JOBS:
        runs = [run_scan(path, jobs) for _ in range(repeat)]
        scans[jobs] = min(runs, key=lambda r: r.seconds)
    peaks = {jobs: run_scan(path, jobs, sample=True).peak for jobs in JOBS} if memory else {}
    m = Measured(path, path.stat().st_size, cat, xxh, scans, peaks)
    if cold:
        drop_caches()
        m.cold_cat = timed(cat_cmd(path))
        drop_caches()
        m.cold_scan = run_scan(path, 2).seconds
    return m


def startup() -> list[float]:
    """Wall seconds of STARTUP_RUNS plain (text output) scans of the two sample dumps, after
    one untimed run."""
    cmd = [*scan_command(), "scan", *map(str, SAMPLES)]
    timed(cmd)
    return [timed(cmd) for _ in range(STARTUP_RUNS)]


def real_dumps(directory: Path) -> list[Path]:
    """The dump files in directory: every regular file but logs, records and hidden files."""
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix not in NOT_DUMPS)


# --- the Markdown block --------------------------------------------------------------------

def speed(gib: float, seconds: float, cat: float | None = None) -> str:
    """``2.10 GiB/s (3.81 s)``, with ``, 0.24x cat`` when cat's time is given."""
    text = f"{gib / seconds:.2f} GiB/s ({seconds:.2f} s"
    return text + (f", {cat / seconds:.2f}x cat)" if cat else ")")


def met(ok: bool) -> str:
    """``met`` or ``NOT met``."""
    return "met" if ok else "NOT met"


def size_table(measured: dict[str, Measured], expects: dict[str, dict[str, int]],
               args: argparse.Namespace) -> str:
    """One table for one size: a column per mix, a row per measure."""
    names = list(measured)
    const = args.mem_constant_mib * 2**20

    def row(label: str, cell: Callable[[str], str]) -> str:
        return f"| {label} | " + " | ".join(cell(n) for n in names) + " |"

    def stages(jobs: int) -> Callable[[str], str]:
        return lambda n: "{:.2f} / {:.2f} / {:.2f} s".format(*measured[n].scans[jobs].stages)

    def memory(jobs: int) -> Callable[[str], str]:
        def cell(n: str) -> str:
            peak, pages = measured[n].peaks[jobs], expects[n]["pages"]
            per = (peak - const) / pages
            return (f"{peak / 2**20:.0f} MiB, {peak / pages:.0f} B/page; (peak - C)/page "
                    f"{per:.1f} B: {met(per <= BUDGET_BYTES_PER_PAGE)}")
        return cell

    def pages(n: str) -> str:
        e = expects[n]
        return f"{e['zero_pages']:,} / {e['duplicated_pages']:,} / {e['unique_pages']:,}"

    def cold_cell(n: str) -> str:
        m = measured[n]
        assert m.cold_cat is not None and m.cold_scan is not None
        return (f"cat {speed(m.gib, m.cold_cat)}; scan {speed(m.gib, m.cold_scan)}, "
                f"{m.cold_cat / m.cold_scan:.2f}x cold cat")

    def counters(n: str) -> str:
        bad = differences(measured[n], expects[n])
        return "equal" if not bad else "**DIFFER** (got vs expected): " + "; ".join(bad)

    lines = ["| measure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             row("pages: zero / duplicated / unique", pages),
             row("`cat FILE > /dev/null`", lambda n: speed(measured[n].gib, measured[n].cat))]
    if measured[names[0]].xxhsum is None:
        lines.append(row("`xxhsum -H3 FILE`", lambda n: "not installed"))
    else:
        lines.append(row("`xxhsum -H3 FILE`", lambda n: speed(
            measured[n].gib, measured[n].xxhsum or 0, measured[n].cat)))
    for jobs in JOBS:
        lines += [
            row(f"`scan FILE --json --jobs {jobs}`", lambda n, j=jobs: speed(
                measured[n].gib, measured[n].scans[j].seconds, measured[n].cat)),
            row(f"stage 1 / stage 2 / rest, `--jobs {jobs}`", stages(jobs)),
        ]
    if measured[names[0]].peaks:
        lines += [row(f"peak Pss_Anon, `--jobs {jobs}`", memory(jobs)) for jobs in JOBS]
    if measured[names[0]].cold_cat is not None:
        lines.append(row("cold page cache: `cat`; `scan --jobs 2`", cold_cell))
    lines.append(row("counters vs. hand model", counters))
    return "\n".join(lines)


def targets_table(results: dict[float, dict[str, Measured]], starts: list[float]) -> str:
    """Each throughput target and the start-up target: measured value and met / NOT met."""
    lines = ["| target | measured | |", "|---|---|---|"]
    for t in TARGETS:
        label = (f"scan `--jobs {t.jobs}` >= {t.ratio}x cat, {t.size:g} GiB, {t.mix} mix")
        m = results.get(t.size, {}).get(t.mix)
        if m is None:
            lines.append(f"| {label} | not measured in this run | |")
        else:
            r = m.ratio(t.jobs)
            lines.append(f"| {label} | {r:.2f}x | {met(r >= t.ratio)} |")
    median = statistics.median(starts)
    samples = " ".join(str(p.relative_to(ROOT)) for p in SAMPLES)
    lines.append(f"| start-up: `{shown_command()} scan {samples}` <= {STARTUP_TARGET} s "
                 f"| median {median:.2f} s of {len(starts)} "
                 f"({', '.join(f'{s:.2f}' for s in starts)}) | {met(median <= STARTUP_TARGET)} |")
    return "\n".join(lines)


def real_table(measured: list[Measured]) -> str:
    """One row per real dump: cat, xxhsum and scan --jobs 1/2 (GiB/s of the file's size)."""
    lines = ["| file | format | size | pages | `cat` | `xxhsum -H3` | `scan --jobs 1` | "
             + "`scan --jobs 2` |", "|---|---|--:|--:|---|---|---|---|"]
    for m in measured:
        info = m.scans[2].result["per_input"][0]
        xxh = "not installed" if m.xxhsum is None else speed(m.gib, m.xxhsum, m.cat)
        lines.append(
            f"| {m.path.name} | {info['format']} | {m.gib:.2f} GiB | {info['pages']:,} "
            f"| {speed(m.gib, m.cat)} | {xxh} | {speed(m.gib, m.scans[1].seconds, m.cat)} "
            f"| {speed(m.gib, m.scans[2].seconds, m.cat)} |")
    return "\n".join(lines)


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_results(path: Path, measured: str) -> None:
    """Put ``measured`` between the markers of ``path``, keeping the notes around them."""
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = "# Benchmarks\n\nMeasured by `benchmarks/bench_scan.py`.\n\n", "\n"
    path.write_text(f"{head}{START}\n{measured}{END}{tail}")


def machine() -> str:
    """Cores, CPU model, RAM, kernel and Python version of this machine."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def command_line() -> str:
    """This script's command line as typed (paths relative to the repository when inside)."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def parse_args() -> argparse.Namespace:
    """The command line options."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="*", default=[8.0, 16.0], metavar="GIB",
                    help="dump sizes in GiB (default 8 16; none: only start-up and --real)")
    ap.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES),
                    help="page mixes (default all)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the generated dumps (default 1)")
    ap.add_argument("--dir", type=Path, default=ROOT / "benchmarks" / "data",
                    help="where the generated dumps go (default benchmarks/data)")
    ap.add_argument("--keep", action="store_true", help="keep the generated dumps")
    ap.add_argument("--reuse", action="store_true",
                    help="use a dump kept by an earlier run of the same mix, size and seed")
    ap.add_argument("--cold", action="store_true",
                    help="also time cat and scan --jobs 2 after dropping the page cache (root)")
    ap.add_argument("--real", type=Path, metavar="DIR",
                    help="also time every dump file in DIR (QEMU ELF, kdump, raw)")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the sampled memory runs")
    # C = 25 MiB of interpreter and libraries (Pss_Anon of `scan --json` of the 4 MB
    # samples) + 71 MiB of working buffers: stage 2's part of 2^18 candidates (about 80
    # bytes each, 21 MiB), representatives (64 MiB for 16,384 groups; 16 MiB for the 4,096
    # of these mixes), a gathered batch head (1 MiB), address_map's 2^18 rows at a time.
    ap.add_argument("--mem-constant-mib", type=float, default=96.0, metavar="C",
                    help="the constant C of the memory budget 24 B/page + C (default 96)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md",
                    help="file whose bench markers get the results (default BENCHMARKS.md)")
    return ap.parse_args()


def main() -> None:
    """Measure, write the block between the markers, print it; exit 1 if counters differ."""
    args = parse_args()
    cold = args.cold and os.geteuid() == 0
    results: dict[float, dict[str, Measured]] = {}
    expects: dict[float, dict[str, dict[str, int]]] = {}
    failures = []
    for size in args.sizes:
        results[size], expects[size] = {}, {}
        for name in args.mixes:
            path, expect, generated = prepare(args.dir, size, name, args.seed, args.reuse)
            try:
                log(f"measuring {size:g} GiB {name} ...")
                m = measure(path, args.repeat, args.memory, cold)
            finally:
                if generated and not args.keep:
                    path.unlink()
                    path.with_suffix(".json").unlink()
            results[size][name], expects[size][name] = m, expect
            if differences(m, expect):
                failures.append(f"{size:g} GiB {name}: " + "; ".join(differences(m, expect)))
    log("start-up ...")
    starts = startup()
    real = []
    if args.real:
        for path in real_dumps(args.real):
            log(f"measuring {path} ...")
            real.append(measure(path, args.repeat, memory=False, cold=False))

    mixes = "; ".join(f"**{n}**: {MIXES[n].about}" for n in args.mixes)
    method = (
        f"Warm page cache, best of {args.repeat}; each scan a fresh `{shown_command()} scan FILE "
        f"--json --jobs J` process, start-up included; ratios are scan throughput "
        f"over `cat`'s. Stages: stage 1 (read every page, find zero pages, hash prefixes) / "
        f"stage 2 (compare candidates) / the rest (interpreter start-up, imports, KSM model, "
        f"output), of the fastest run. `--jobs` defaults to every CPU, "
        f"{len(os.sched_getaffinity(0))} here. ")
    if args.memory:
        method += (
            f"Memory: one more untimed scan per `--jobs` value, `Pss_Anon` of the process and "
            f"its workers summed every {SAMPLE_EVERY * 1000:.0f} ms; budget "
            f"{BUDGET_BYTES_PER_PAGE} B/page + C, with C = {args.mem_constant_mib:g} MiB here "
            f"(`--mem-constant-mib`). ")
    method += (
        "Counters (`pages_shared`, `pages_sharing`, `pages_unshared` with zero pages, zero "
        "pages) checked against a hand model of the generated mix for both `--jobs` values.")
    if not args.cold:
        cold_note = "Cold page cache: not measured (`--cold` not given)."
    elif not cold:
        cold_note = "Cold page cache: **skipped**, not root (dropping the page cache needs root)."
    else:
        fs = filesystem(args.dir)
        cold_note = ("Cold page cache: `sync; echo 3 > /proc/sys/vm/drop_caches` before one `cat` "
                     f"and before one `scan --jobs 2`; dumps on {fs}"
                     + (" (tmpfs: dropping caches does not evict it, so this is not cold)."
                        if fs == "tmpfs" else "."))
    header = (
        f"- Machine: {machine()}\n- Date: {time.strftime('%Y-%m-%d')}\n"
        f"- Command: `{command_line()}`\n"
        f"- Generated dumps: raw, {DISTINCT_DUPLICATES:,} contents for the copies, runs of {RUN} "
        f"pages of one kind, seed {args.seed}. Mixes: {mixes}.\n- {method}\n- {cold_note}\n"
    )
    parts = [header]
    for size in args.sizes:
        npages = next(iter(expects[size].values()))["pages"]
        parts.append(f"#### {size:g} GiB ({npages:,} pages)\n\n"
                     f"{size_table(results[size], expects[size], args)}\n")
    parts.append(f"#### Targets\n\n{targets_table(results, starts)}\n")
    if args.real:
        parts.append(f"#### Real dumps in `{args.real}`\n\n"
                     + (real_table(real) if real else "No dump files found.") + "\n\n"
                     "GiB/s of each file's size, best of the same runs; a kdump file is "
                     "compressed, so its scan inflates far more than `cat` reads.\n")
    block = "\n".join(parts)
    write_results(args.output, block)
    print(block)
    if failures:
        raise SystemExit("scan counters differ from the hand model: " + ", ".join(failures))


if __name__ == "__main__":
    main()
