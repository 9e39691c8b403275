"""Samples of one input over time: which inputs are samples of one guest, how its pages
changed, and the :class:`~ksm_analyze.ksmd.timeline.Timeline` the ksmd model replays.

A live fingerprint (``ksm-analyze fingerprint PID --every ...``) records in its input's info
an ``identity`` (``boot_id:pid:start_time``: one process on one boot) and when it was taken
(``sampled_at``, Unix seconds). Inputs with one identity are samples of one input: the
latest is the input (a host holds it once), the others say how its memory changes.

Pages are compared by address and content hash (xxh3-128 of the whole page, which every
fingerprint file carries): the time model works from hashes, not bytes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .eligibility import ScanMask
from .hashing.stage1 import Fingerprints
from .ksmd.timeline import Timeline

__all__ = [
    "STABILITY_COLUMNS",
    "Churn",
    "Samples",
    "as_sample",
    "churn",
    "duplicate_kinds",
    "group_samples",
    "input_name",
    "no_partner",
    "recorded_rmap_item_bytes",
    "stability",
    "steady_view",
    "still_timeline",
    "timeline",
    "too_fast",
]

STABILITY_COLUMNS = (
    "input", "samples", "observed_seconds", "pages_unchanged", "pages_changed",
    "pages_appeared", "pages_gone", "change_rate_per_second", "stable_duplicate_pages",
    "coinciding_duplicate_pages",
)
"""The stability table, one row per input observed over time (docs/glossary.md)."""


@dataclass(frozen=True)
class Samples:
    """How the fingerprints given group into inputs.

    Attributes:
        latest: for each input, the index (in the fingerprints given) of its latest sample.
        series: for each input, the indexes of all its samples, oldest first (one for an
            input seen once).
    """

    latest: list[int]
    series: list[list[int]]

    @property
    def over_time(self) -> bool:
        """Whether any input has more than one sample."""
        return any(len(s) > 1 for s in self.series)


def identity_of(fp: Fingerprints) -> str | None:
    """The guest a sample is of (None: a dump with no recorded identity)."""
    identity = fp.info.get("identity")
    return identity if isinstance(identity, str) and identity else None


_SAMPLE_SUFFIX = re.compile(r"\.s\d{3,}$")


def input_name(fp: Fingerprints) -> Fingerprints:
    """A live sample named as its input: ``qemu-1234.s002`` is ``qemu-1234``."""
    if identity_of(fp) is None or not _SAMPLE_SUFFIX.search(fp.path):
        return fp
    return replace(fp, path=_SAMPLE_SUFFIX.sub("", fp.path))


def as_sample(fp: Fingerprints, name: str, at: float) -> Fingerprints:
    """``fp`` as a sample of input ``name`` taken at ``at`` (``--samples NAME=GLOB``)."""
    return replace(fp, path=name, info={**fp.info, "identity": f"samples:{name}",
                                        "sampled_at": at})


def sampled_at(fp: Fingerprints) -> float | None:
    value = fp.info.get("sampled_at")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def group_samples(prints: Sequence[Fingerprints]) -> Samples:
    """Group samples of one guest (same ``identity``), oldest first; inputs without an
    identity are inputs of their own. The order of inputs is that of their first sample.

    Raises:
        ValueError: two samples of one guest taken at the same moment, or one without a
            time (they cannot be put in order).
    """
    groups: dict[str, list[int]] = {}
    order: list[str | int] = []
    for i, fp in enumerate(prints):
        identity = identity_of(fp)
        if identity is None:
            order.append(i)
            continue
        if identity not in groups:
            groups[identity] = []
            order.append(identity)
        groups[identity].append(i)
    series: list[list[int]] = []
    for key in order:
        if isinstance(key, int):
            series.append([key])
            continue
        members = groups[key]
        times = [sampled_at(prints[i]) for i in members]
        if len(members) > 1 and (None in times or len(set(times)) != len(times)):
            names = ", ".join(prints[i].path for i in members)
            raise ValueError(f"samples of one process ({names}) need distinct sample times")
        series.append(sorted(members, key=lambda i: sampled_at(prints[i]) or 0.0))
    return Samples([s[-1] for s in series], series)


@dataclass(frozen=True)
class _Pages:
    """One input's eligible pages across its samples: the union of their addresses, and
    per sample each page's content id (-1: absent from that sample)."""

    addrs: np.ndarray
    ids: np.ndarray
    """(pages, samples) int64."""
    times: np.ndarray
    """Seconds of each sample from the first."""


def _content_keys(fp: Fingerprints, eligible: np.ndarray) -> np.ndarray:
    """(rows, 2) uint64 content hash of the eligible rows (zero pages are (0, 0))."""
    if fp.content is None:
        raise ValueError(f"{fp.path}: the time model needs content hashes (fingerprint files "
                         "carry them; write samples with `ksm-analyze fingerprint`)")
    keys: np.ndarray = fp.content[eligible]
    return keys


def _all_pages(prints: Sequence[Fingerprints], masks: Sequence[ScanMask], samples: Samples
               ) -> list[_Pages]:
    """Each input's pages across its samples, with content ids shared by the whole host
    (equal ids: equal content hashes; the all-zero page is id 0 when any page is zero)."""
    keys = [_content_keys(prints[i], masks[i].scanned) for s in samples.series for i in s]
    both = np.concatenate([np.zeros((1, 2), np.uint64), *keys])  # (0, 0) first: id 0
    pair = np.dtype([("lo", "<u8"), ("hi", "<u8")])
    _, inverse = np.unique(np.ascontiguousarray(both, "<u8").view(pair).reshape(-1),
                           return_inverse=True)
    ids = iter(np.split(inverse.reshape(-1)[1:].astype(np.int64),
                        np.cumsum([len(k) for k in keys])[:-1]))
    out = []
    for members in samples.series:
        fps = [prints[i] for i in members]
        rows = [fp.addrs[masks[i].scanned] for fp, i in zip(fps, members, strict=True)]
        addrs = np.unique(np.concatenate(rows))
        table = np.full((len(addrs), len(members)), -1, np.int64)
        for k, r in enumerate(rows):
            table[np.searchsorted(addrs, r), k] = next(ids)
        start = sampled_at(fps[0]) or 0.0
        times = np.array([(sampled_at(fp) or start) - start for fp in fps], np.float64)
        out.append(_Pages(addrs, table, times))
    return out


def _change_rate(pages: _Pages) -> np.ndarray:
    """Writes per second of each page, from the intervals it was present at both ends of.

    Changes are taken as a Poisson process: a page seen changed in ``k`` of ``m`` equal
    intervals of ``d`` seconds has ``rate = -ln(1 - k/m) / d`` (the maximum-likelihood
    estimate); changed in every interval, ``inf`` (faster than the samples tell).
    """
    ids, times = pages.ids, pages.times
    rate = np.zeros(len(ids), np.float64)
    if ids.shape[1] < 2:
        return rate
    both = (ids[:, 1:] >= 0) & (ids[:, :-1] >= 0)
    changed = both & (ids[:, 1:] != ids[:, :-1])
    m, k = both.sum(axis=1), changed.sum(axis=1)
    gaps = np.diff(times)
    seconds = (both * gaps).sum(axis=1)
    d = np.divide(seconds, m, out=np.zeros(len(m)), where=m > 0)
    some = (k > 0) & (d > 0)
    every = some & (k == m)
    partly = some & ~every
    rate[every] = np.inf
    rate[partly] = -np.log1p(-k[partly] / m[partly]) / d[partly]
    return rate


def stability(prints: Sequence[Fingerprints], masks: Sequence[ScanMask],
              samples: Samples) -> list[dict[str, Any]]:
    """Per input observed over time (two samples or more): its pages unchanged, changed,
    appeared and gone between its first and last sample, its change rate (pages changed
    per second), and its duplicate pages at the last sample that are stable (the page and
    a partner unchanged throughout) or only coincide (identical now, but changing).

    One dict per row, keys :data:`STABILITY_COLUMNS`; pages are eligible pages (``--scope``).
    """
    rows = []
    per_input = list(zip(samples.series, _all_pages(prints, masks, samples), strict=True))
    last_ids = [p.ids[:, -1] for _, p in per_input]
    rates = [_change_rate(p) for _, p in per_input]
    now_ids = [i[i >= 0] for i in last_ids]
    dups, stables = duplicate_kinds(
        np.concatenate(now_ids), np.concatenate([r[i >= 0] == 0 for i, r in
                                                 zip(last_ids, rates, strict=True)]))
    cuts = np.cumsum([len(i) for i in now_ids])[:-1]
    for (members, pages), last, dup, stable in zip(per_input, last_ids, np.split(dups, cuts),
                                                   np.split(stables, cuts), strict=True):
        if len(members) < 2:
            continue
        row = _series_row(pages, last)
        row.update({
            "input": prints[members[-1]].path,
            "samples": len(members),
            "stable_duplicate_pages": int(np.count_nonzero(stable)),
            "coinciding_duplicate_pages": int(np.count_nonzero(dup & ~stable)),
        })
        rows.append({c: row[c] for c in STABILITY_COLUMNS})
    return rows


def _series_row(pages: _Pages, last: np.ndarray) -> dict[str, Any]:
    """The columns of an input's stability row that are its own samples' alone (not the
    duplicate pages: :func:`duplicate_kinds`)."""
    first = pages.ids[:, 0]
    present_both = (first >= 0) & (last >= 0)
    unchanged = present_both & np.all(pages.ids == first[:, None], axis=1)
    span = float(pages.times[-1])
    changed = int(np.count_nonzero(present_both & ~unchanged))
    now = last >= 0
    return {
        "observed_seconds": span,
        "pages_unchanged": int(np.count_nonzero(unchanged)),
        "pages_changed": changed,
        "pages_appeared": int(np.count_nonzero((first < 0) & now)),
        "pages_gone": int(np.count_nonzero((first >= 0) & ~now)),
        "change_rate_per_second": changed / span if span > 0 else 0.0,
    }


def duplicate_kinds(ids: np.ndarray, still: np.ndarray, *, more: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Of pages at the inputs' last samples holding content ``ids`` (>= 0), those that are
    duplicates (their content held twice or more) and those of them stable (unchanged
    throughout, ``still``, and their content held by two such pages); ``more``: pages
    elsewhere, all still, per content id (the stability table's last two columns)."""
    size = int(ids.max()) + 1 if len(ids) else 1
    copies = np.bincount(ids, minlength=size)
    stable_copies = np.bincount(ids[still], minlength=size)
    if more is not None:
        copies[: len(more)] += more
        stable_copies[: len(more)] += more
    dup = copies[ids] >= 2
    return dup, dup & still & (stable_copies[ids] >= 2)


def timeline(prints: Sequence[Fingerprints], masks: Sequence[ScanMask], samples: Samples,
             *, ksm_was_running: bool) -> Timeline:
    """The ksmd model's input for the inputs on one host: each input's eligible pages at
    its last sample, in address order, with their change rates; ``aged`` marks pages whose
    content changed during the observation while KSM ran (``ksm_was_running``)."""
    owner, content, rate, aged = [], [], [], []
    span = 0.0
    for k, pages in enumerate(_all_pages(prints, masks, samples)):
        now = pages.ids[:, -1] >= 0
        first = pages.ids[now, 0]
        owner.append(np.full(int(now.sum()), k, np.int32))
        content.append(pages.ids[now, -1])
        rate.append(_change_rate(pages)[now])
        aged.append((first >= 0) & (first != pages.ids[now, -1]) & ksm_was_running)
        span = max(span, float(pages.times[-1]))
    all_content = np.concatenate(content)
    return Timeline(
        inputs=[prints[s[-1]].path for s in samples.series],
        owner=np.concatenate(owner),
        content=all_content,
        zero_id=0 if np.any(all_content == 0) else -1,
        change_rate=np.concatenate(rate),
        aged=np.concatenate(aged),
        observed_seconds=span,
        first_scan_only=sum(masks[s[-1]].excluded.get("thp_zero", 0) for s in samples.series),
    )


def still_timeline(prints: Sequence[Fingerprints], masks: Sequence[ScanMask],
                   labels: Sequence[np.ndarray]) -> Timeline:
    """The ksmd model's input for inputs seen once, as if their memory stood still: each
    eligible page's content from stage 2's byte-confirmed ``labels``
    (:class:`~ksm_analyze.hashing.stage2.ContentClasses`), in address order, then the zero
    pages the format marks without storing them; none changing."""
    # int32 ids, 4 bytes a page: labels (int32) + 1, so the zero page (ZERO, -1) is 0 and a
    # unique page (UNIQUE, -2) keeps a negative id, "no other page holds it".
    content, sizes = [], []
    for fp, mask, lab in zip(prints, masks, labels, strict=True):
        if len(fp.addrs) > 1 and not bool(np.all(fp.addrs[1:] > fp.addrs[:-1])):
            order = np.argsort(fp.addrs, kind="stable")  # rows are often in order already
            ids = lab[order][mask.scanned[order]] + np.int32(1)
        else:
            ids = (lab if mask.scanned.all() else lab[mask.scanned]) + np.int32(1)
        content.append(ids)
        if mask.zero_state_pages:  # zero pages the format marks without rows
            content.append(np.zeros(mask.zero_state_pages, np.int32))
        sizes.append(len(ids) + mask.zero_state_pages)
    all_content = (content[0] if len(content) == 1 else np.concatenate(content)) if content \
        else np.zeros(0, np.int32)
    n = len(all_content)
    still = np.broadcast_to(np.float64(0.0), (n,))  # no memory: every page alike
    return Timeline(
        inputs=[fp.path for fp in prints],
        owner=np.broadcast_to(np.int32(0), (n,)) if len(sizes) == 1
        else np.repeat(np.arange(len(sizes), dtype=np.int32), sizes),
        content=all_content,
        zero_id=0 if np.any(all_content == 0) else -1,
        change_rate=still,
        aged=np.broadcast_to(np.False_, (n,)),
        first_scan_only=sum(m.excluded.get("thp_zero", 0) for m in masks),
    )


def recorded_rmap_item_bytes(prints: Sequence[Fingerprints]) -> tuple[int | None, str | None]:
    """``sizeof(struct ksm_rmap_item)`` as the inputs recorded it (a live fingerprint reads
    it from ``/sys/kernel/slab``), and a warning when they disagree (then the largest)."""
    seen = set()
    for fp in prints:
        machine = fp.info.get("machine")
        value = machine.get("rmap_item_bytes") if isinstance(machine, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096:
            seen.add(value)
    if not seen:
        return None, None
    if len(seen) > 1:
        return max(seen), (f"the inputs were taken on kernels whose rmap_item differs in size "
                           f"({', '.join(map(str, sorted(seen)))} bytes): the largest is used; "
                           "give --rmap-item-bytes to choose")
    return seen.pop(), None


@dataclass(frozen=True)
class Churn:
    """How the pages of each input's latest sample changed over its samples, per
    fingerprint row of that sample (rows KSM does not scan: rate 0, not aged).

    Attributes:
        rate: float64 writes per second per row (see :func:`_change_rate`).
        aged: bool per row: its content changed during the observation while KSM ran.
    """

    rate: list[np.ndarray]
    aged: list[np.ndarray]


def churn(prints: Sequence[Fingerprints], masks: Sequence[ScanMask], samples: Samples,
          *, ksm_was_running: bool) -> Churn:
    """:class:`Churn` of the latest sample of each input in ``samples``."""
    rates, aged = [], []
    for members, pages in zip(samples.series, _all_pages(prints, masks, samples), strict=True):
        fp, mask = prints[members[-1]], masks[members[-1]]
        rate, old = np.zeros(len(fp.addrs)), np.zeros(len(fp.addrs), bool)
        rows = np.flatnonzero(mask.scanned)
        at = np.searchsorted(pages.addrs, fp.addrs[rows])
        rate[rows] = _change_rate(pages)[at]
        first, last = pages.ids[at, 0], pages.ids[at, -1]
        old[rows] = (first >= 0) & (first != last) & ksm_was_running
        rates.append(rate)
        aged.append(old)
    return Churn(rates, aged)


def too_fast(rate: np.ndarray, hold_seconds: float) -> np.ndarray:
    """Pages that change more often than once in ``hold_seconds``: never merged."""
    out: np.ndarray = rate * hold_seconds > 1
    return out


def no_partner(ids: np.ndarray, steady: np.ndarray, candidate: np.ndarray, *,
               more: np.ndarray | None = None) -> np.ndarray:
    """The late duplicates left unmerged: ``candidate`` pages (they took their content
    while KSM ran, and hold still) whose content (``ids``, >= 0; negative: held by no other
    page) fewer than two ``steady`` pages hold, counting ``more`` steady pages elsewhere per
    content id."""
    size = int(ids.max()) + 1 if len(ids) else 1
    held = np.bincount(ids[steady & (ids >= 0)], minlength=size)
    if more is not None:
        held[: len(more)] += more
    out: np.ndarray = candidate & (ids >= 0) & (held[np.maximum(ids, 0)] < 2)
    return out


def steady_view(prints: Sequence[Fingerprints], masks: Sequence[ScanMask],
                labels: Sequence[np.ndarray], churn: Churn, *, hold_seconds: float,
                smart_scan: bool) -> tuple[list[Fingerprints], list[np.ndarray], int]:
    """The latest samples as KSM keeps them in steady state: a page that changes more often
    than once in ``hold_seconds`` (the time KSM needs to merge a page: two full scans) is
    never merged, its checksum not holding between two visits, so it counts as a unique page;
    with ``smart_scan``, neither is a *late duplicate*: a page that took its content while
    KSM ran (its age high, its skip phase unknown) whose content no stable page pair holds
    (no KSM page to join: two such pages are processed on different scans and never meet
    in the unstable tree, measured 0 of 200 pairs in 2,000 full scans).

    Returns:
        The fingerprints (a changing all-zero page is no zero page) and stage 2 labels to
        count with, and the number of late duplicates left unmerged.
    """
    from .hashing.stage2 import UNIQUE, ZERO

    moving = [too_fast(r, hold_seconds) for r in churn.rate]
    late = 0
    if smart_scan:
        # One id space: the classes, then the all-zero page; a unique page has none (-1).
        zero = max((int(x.max()) for x in labels if len(x)), default=0) + 1
        ids = [np.where(lab == ZERO, zero, np.where(lab >= 0, lab, -1)) for lab in labels]
        cuts = np.cumsum([len(lab) for lab in labels])[:-1]
        lost = np.split(no_partner(
            np.concatenate(ids),
            np.concatenate([mk.scanned & ~m & ~a for mk, m, a in
                            zip(masks, moving, churn.aged, strict=True)]),
            np.concatenate([a & ~m for m, a in zip(moving, churn.aged, strict=True)])), cuts)
        for k, no in enumerate(lost):
            late += int(np.count_nonzero(no))
            moving[k] = moving[k] | no
    out_prints, out_labels = [], []
    for fp, lab, m in zip(prints, labels, moving, strict=True):
        if not m.any():
            out_prints.append(fp)
            out_labels.append(lab)
            continue
        new = lab.copy()
        new[m] = UNIQUE
        prefix = fp.prefix.copy()
        prefix[m & (prefix == 0)] = 1  # no longer an all-zero page that stays one
        out_prints.append(replace(fp, prefix=prefix))
        out_labels.append(new)
    return out_prints, out_labels, late
