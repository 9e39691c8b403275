"""The prefix length: what stage 1's partial hash costs and saves at each length, measured.

The first KSM hashed each page's first 128 bytes and its reviewers asked whether 128 was
right. :func:`tune` answers for given inputs: for each prefix length it runs the very
stage 1 (:func:`~ksm_analyze.hashing.stage1.fingerprint`) and stage 2
(:func:`~ksm_analyze.hashing.stage2.classify`) that ``scan`` runs, and reports their
counters (:class:`~ksm_analyze.hashing.stage2.StageStats`: candidates, false candidates,
full hashes, full compares) beside their wall time per GiB of stored pages, best of
``runs`` runs on a warm page cache. A shorter prefix hashes fewer bytes but lets more
pages through as candidates whose bytes stage 2 must read and compare; a longer one reads
more of every page in stage 1. The recommendation is the shortest prefix whose total is
within :data:`TIE_FRACTION` of the fastest (:func:`recommend`).

Beside it, the cost of not comparing at all (the seed's "SHA1 only?"): the birthday bound
on any two distinct pages among n sharing a b-bit hash, ``n(n-1)/2 / 2^b``, for these
inputs and for a fleet, against stage 2's measured time with and without the byte
comparison (``--no-verify`` trusts a 64-bit full-page hash; fingerprint files of dumps
not readable here, a 128-bit content hash).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from .._signals import watching
from ..columns import Columns, json_safe
from ..errors import InputError
from ..formats import looks_like_fingerprint_file, open_inputs
from ..formats.base import DumpReader
from ..hashing.stage1 import Fingerprints, fingerprint
from ..hashing.stage2 import StageStats, classify
from ..options import DEFAULT_OPTIONS, ScanOptions
from ..pages import PAGE_SIZE, PageState

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DEFAULT_PREFIXES", "FLEET_BYTES", "TIE_FRACTION", "TUNE_TABLES", "Tune",
           "birthday_bound", "parse_prefixes", "recommend", "refuse_fingerprint_files", "tune"]

DEFAULT_PREFIXES = (16, 32, 64, 128, 256, 512, 1024, 4096)
"""Prefix lengths swept by default, in bytes (4096: the whole 4 KiB page)."""
TIE_FRACTION = 0.05
"""Totals within this fraction of the fastest count as a tie, won by the shorter prefix:
timings of one machine vary by a few percent from run to run."""
FLEET_BYTES = 1 << 50
"""The fleet of the collision bound: 1 PiB of pages."""
HASH_BITS = (64, 128)
"""The full-page hashes trusted without comparing: xxh3-64 (``--no-verify``) and xxh3-128
(fingerprint files of dumps not readable here)."""
TUNE_TABLES = ("prefixes", "collisions", "comparing")
"""The tables of a :class:`Tune`, in order."""
_GIB = float(1 << 30)
_COUNTERS = ("pages_hashed", "prefix_candidates", "false_candidates", "full_hashes",
             "full_compares", "hash_collisions", "merges")


@dataclass(frozen=True)
class Tune:
    """What :func:`tune` measured. Each table is a DataFrame when read (``columns`` holds
    them as :class:`~ksm_analyze.columns.Columns`).

    Attributes:
        prefixes: one row per prefix length (``prefix_bytes``): ``bytes_hashed`` (the
            prefix bytes of every non-zero stored page), stage 2's counters as ``scan``'s
            ``stages`` table names them, each stage's best wall time (``stage1_seconds``,
            ``stage2_seconds``) and per GiB of stored pages (``*_seconds_per_gib``, and
            ``total_seconds_per_gib``), and ``recommended``.
        collisions: the birthday bound for the 64- and 128-bit full-page hashes, for these
            inputs' non-zero pages and for a fleet of :data:`FLEET_BYTES`: ``pages``,
            ``hash_bits``, ``pairs`` (n(n-1)/2), ``expected_collisions`` (pairs / 2^bits)
            and ``probability_bound`` (the same, at most 1).
        comparing: stage 2 at the recommended prefix comparing bytes (``verify``) and
            trusting the 64-bit full-page hash (``no-verify``): seconds, per GiB, full
            hashes, compares and merges.
    """

    columns: dict[str, Columns]
    inputs: list[str]
    recommended_prefix_bytes: int
    reason: str
    """Why that prefix length: the rule and the figures it was chosen by."""
    stored_bytes: int
    """Bytes of stored pages in all inputs: the GiB of the ``*_seconds_per_gib`` columns."""
    runs: int
    page_size: int
    verify: bool
    """Stage 2 of the sweep compared bytes (else it trusted the 64-bit full hashes)."""
    method: str
    """How the times were taken."""
    warnings: list[str] = field(default_factory=list)

    @property
    def prefixes(self) -> pd.DataFrame:
        return self.columns["prefixes"].frame()

    @property
    def collisions(self) -> pd.DataFrame:
        return self.columns["collisions"].frame()

    @property
    def comparing(self) -> pd.DataFrame:
        return self.columns["comparing"].frame()

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table by name (for ``--csv``)."""
        return {name: self.columns[name].frame() for name in TUNE_TABLES}

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain values, for strict JSON."""
        data: dict[str, Any] = json_safe({
            "inputs": self.inputs, "page_size": self.page_size, "stored_bytes": self.stored_bytes,
            "runs": self.runs, "verify": self.verify, "method": self.method,
            "recommended_prefix_bytes": self.recommended_prefix_bytes, "reason": self.reason,
            **{name: self.columns[name].records() for name in TUNE_TABLES},
            "warnings": self.warnings,
        })
        return data


def parse_prefixes(text: str, page_size: int = PAGE_SIZE) -> tuple[int, ...]:
    """``--prefixes`` as prefix lengths in bytes, each 1 to ``page_size``, none twice.

    Raises:
        ValueError: one line naming the bad value.
    """
    items = [t.strip() for t in text.split(",")]
    values = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"--prefixes {text!r}: {item!r} is not a number of bytes "
                             "(give e.g. 16,32,64,128)") from None
        if not 1 <= value <= page_size:
            raise ValueError(f"--prefixes {text!r}: {value} is outside 1 to the page size "
                             f"({page_size} bytes)")
        if value in values:
            raise ValueError(f"--prefixes {text!r}: {value} is given twice")
        values.append(value)
    return tuple(values)


def _check_prefixes(prefixes: Sequence[int], page_size: int) -> tuple[int, ...]:
    if not prefixes:
        raise ValueError("--prefixes: give at least one prefix length")
    return parse_prefixes(",".join(str(p) for p in prefixes), page_size)


def birthday_bound(pages: int, bits: int) -> tuple[int, float]:
    """The pairs among ``pages`` distinct pages, n(n-1)/2, and the expected number of them
    whose ``bits``-bit hashes are equal if the hash is uniform: pairs / 2^bits, also the
    bound on the probability of any collision (the union bound over the pairs)."""
    pairs = pages * (pages - 1) // 2
    return pairs, pairs / (1 << bits)  # int / int: exact to a float's precision


def recommend(prefixes: Sequence[int], totals: Sequence[float | None],
              tie: float = TIE_FRACTION) -> int:
    """The prefix length to use: the shortest whose total seconds per GiB is within ``tie``
    of the fastest (None totals, of inputs with no stored page: the shortest prefix)."""
    known = [(t, p) for p, t in zip(prefixes, totals, strict=True) if t is not None]
    if not known:
        return min(prefixes)
    fastest = min(t for t, _ in known)
    return min(p for t, p in known if t <= fastest * (1 + tie))


def refuse_fingerprint_files(paths: Sequence[str | os.PathLike[str]]) -> None:
    """Raise for the first fingerprint file among ``paths``: it holds no page bytes to hash
    again.

    Raises:
        InputError: ``FILE: a fingerprint file holds no page bytes, ...``.
    """
    for path in paths:
        if looks_like_fingerprint_file(path):
            raise InputError("a fingerprint file holds no page bytes, and tune hashes every "
                             "page again at each prefix length: give the dump it was made "
                             "from", path=path)


def _open(paths: Sequence[str], options: ScanOptions, page_size: int,
          stack: contextlib.ExitStack) -> list[DumpReader]:
    """Every input's readers (a snapshot of N processes gives N), closed with ``stack``;
    a fingerprint file is refused (:func:`refuse_fingerprint_files`)."""
    refuse_fingerprint_files(paths)
    readers: list[DumpReader] = []
    for path, base in zip(paths, options.bases_for(paths), strict=True):
        readers += [stack.enter_context(r) for r in open_inputs(
            path, options.format, page_size=page_size, base_address=base)]
    return readers


def _stages(readers: Sequence[DumpReader], options: ScanOptions
            ) -> tuple[list[Fingerprints], StageStats, float, float]:
    """Stage 1 and 2 as ``scan`` runs them: the stats and each stage's wall time."""
    started = time.perf_counter()
    prints = [fingerprint(r, options) for r in readers]
    hashed = time.perf_counter()
    stats = classify(prints, readers, options).stats
    return prints, stats, hashed - started, time.perf_counter() - hashed


def tune(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    options: ScanOptions = DEFAULT_OPTIONS,
    *,
    prefixes: Sequence[int] = DEFAULT_PREFIXES,
    page_size: int = PAGE_SIZE,
    runs: int = 3,
    progress: Callable[[str, int, int], None] | None = None,
    **settings: Any,
) -> Tune:
    """Sweep the prefix length of stage 1 over ``paths`` (all on one host, as ``scan``).

    Args:
        paths: dumps (a fingerprint file is refused: it holds no page bytes).
        options: how to read the inputs and whether stage 2 compares bytes (``verify``);
            its ``prefix_bytes`` is what is swept.
        prefixes: the prefix lengths, bytes, each 1 to ``page_size``.
        page_size: the analysis page size.
        runs: each stage is timed this many times per prefix length; the fastest counts.
        progress: called as ``progress(task, done, total)`` after each prefix length.
        **settings: any field of :class:`ScanOptions` by name.

    Returns:
        A :class:`Tune`.

    Raises:
        KsmAnalyzeError: an input cannot be read, or is a fingerprint file.
        ValueError: a bad prefix length, ``runs`` below 1, or an option out of range.
    """
    unknown = set(settings) - {f.name for f in fields(ScanOptions)}
    if unknown:
        raise TypeError(f"tune() got unknown options: {', '.join(sorted(unknown))}")
    options = replace(options, **settings)
    prefixes = _check_prefixes(list(prefixes), page_size)
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, not {runs}")
    names = [os.fspath(paths)] if isinstance(paths, str | os.PathLike) else \
        [os.fspath(p) for p in paths]
    if not names:
        raise ValueError("no input given")
    best: dict[int, list[float]] = {p: [float("inf"), float("inf")] for p in prefixes}
    stats: dict[int, StageStats] = {}
    with contextlib.ExitStack() as stack:
        readers = _open(names, options, page_size, stack)
        stack.enter_context(watching(r.path for r in readers))
        stored = sum(r.page_counts()[PageState.DATA] for r in readers) * page_size
        # One untimed pass of stage 1 reads every page once: the runs after it read from
        # the page cache (where the dumps fit in memory), whatever order they come in.
        for r in readers:
            fingerprint(r, replace(options, prefix_bytes=prefixes[0]))
        steps = runs * len(prefixes) + 2
        for run in range(runs):
            for k, p in enumerate(prefixes):
                _, s, t1, t2 = _stages(readers, replace(options, prefix_bytes=p))
                if p in stats and s != stats[p]:
                    raise AssertionError(f"stage 2's counters changed between runs at {p} "
                                         f"bytes: {stats[p]} then {s}")
                stats[p] = s
                best[p] = [min(best[p][0], t1), min(best[p][1], t2)]
                if progress is not None:
                    progress("prefix lengths", run * len(prefixes) + k + 1, steps)
        per_gib = [(best[p][0] * _GIB / stored, best[p][1] * _GIB / stored) if stored else None
                   for p in prefixes]
        totals = [None if g is None else g[0] + g[1] for g in per_gib]
        chosen = recommend(prefixes, totals)
        # Stage 2 at the chosen length with and without comparing bytes: what trusting a
        # full-page hash would save.
        # The two alternate run by run, so a busy moment of the machine falls on both.
        quickest = {True: float("inf"), False: float("inf")}
        last: dict[bool, StageStats] = {}
        prints = [fingerprint(r, replace(options, prefix_bytes=chosen)) for r in readers]
        for _ in range(runs):
            for verify in (True, False):
                started = time.perf_counter()
                last[verify] = classify(prints, readers, replace(
                    options, prefix_bytes=chosen, verify=verify)).stats
                quickest[verify] = min(quickest[verify], time.perf_counter() - started)
        compared = {v: (last[v], quickest[v]) for v in (True, False)}
        if progress is not None:
            progress("prefix lengths", steps, steps)
        del prints
    rows = []
    for p, g, total in zip(prefixes, per_gib, totals, strict=True):
        s = stats[p]
        rows.append({"prefix_bytes": p, "bytes_hashed": s.pages_hashed * p,
                     **{c: getattr(s, c) for c in _COUNTERS},
                     "stage1_seconds": best[p][0], "stage2_seconds": best[p][1],
                     "stage1_seconds_per_gib": None if g is None else g[0],
                     "stage2_seconds_per_gib": None if g is None else g[1],
                     "total_seconds_per_gib": total, "recommended": p == chosen})
    prefix_table = Columns.from_records(rows, list(rows[0]))
    reason = _reason(prefixes, totals, chosen)
    pages = stats[prefixes[0]].pages_hashed
    fleet_pages = FLEET_BYTES // page_size
    collision_rows = []
    for population, n in (("these inputs", pages), ("1 PiB fleet", fleet_pages)):
        for bits in HASH_BITS:
            pairs, expected = birthday_bound(n, bits)
            collision_rows.append({"population": population, "pages": n, "hash_bits": bits,
                                   "pairs": pairs, "expected_collisions": expected,
                                   "probability_bound": min(1.0, expected)})
    comparing_rows = []
    for verify in (True, False):
        s, seconds = compared[verify]
        comparing_rows.append({
            "stage2": "verify" if verify else "no-verify", "prefix_bytes": chosen,
            "stage2_seconds": seconds,
            "stage2_seconds_per_gib": seconds * _GIB / stored if stored else None,
            "full_hashes": s.full_hashes, "full_compares": s.full_compares,
            "merges": s.merges, "hash_bits": s.hash_bits})
    method = (f"wall time, best of {runs} run{'s' if runs > 1 else ''} of each stage at each "
              "prefix length, after one untimed pass that reads every page (the dumps then "
              "come from the page cache where they fit in memory); per GiB of stored pages "
              f"({stored:,} bytes); jobs: {options.workers}")
    return Tune(
        columns={"prefixes": prefix_table,
                 "collisions": Columns.from_records(collision_rows, list(collision_rows[0])),
                 "comparing": Columns.from_records(comparing_rows, list(comparing_rows[0]))},
        inputs=names, recommended_prefix_bytes=chosen, reason=reason, stored_bytes=stored,
        runs=runs, page_size=page_size, verify=options.verify, method=method,
        warnings=[w for r in readers for w in r.warnings],
    )


def _reason(prefixes: Sequence[int], totals: Sequence[float | None], chosen: int) -> str:
    """The rule, and the figures the prefix length was chosen by."""
    known = {p: t for p, t in zip(prefixes, totals, strict=True) if t is not None}
    if not known:
        return f"{chosen} bytes: no stored page to time; the shortest prefix given"
    fastest = min(known, key=lambda p: (known[p], p))
    rule = (f"the shortest prefix whose stage 1 + stage 2 time is within "
            f"{TIE_FRACTION:.0%} of the fastest")
    if fastest == chosen:
        return f"{chosen} bytes: {known[chosen]:.3g} s/GiB, the fastest ({rule})"
    return (f"{chosen} bytes: {known[chosen]:.3g} s/GiB, within {TIE_FRACTION:.0%} of the "
            f"fastest, {known[fastest]:.3g} s/GiB at {fastest} bytes ({rule})")
