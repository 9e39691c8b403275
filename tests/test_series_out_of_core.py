"""Samples over time out of core (fleet/aggregate.py): fingerprint series from many hosts
aggregate as other fingerprint files do, and count what ``analyze()`` counts in memory:
the steady view (pages that change faster than KSM merges, late duplicates) and the
stability table, whose rules need the whole host (docs/architecture.md, "Fleet scale")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PS, runner
from test_out_of_core import NOT_COMPUTED, _mix, _rows
from test_series import _sample

from ksm_analyze import analyze, pipeline
from ksm_analyze.cli import app
from ksm_analyze.fleet import fingerprint_files
from ksm_analyze.formats import DumpFormat
from ksm_analyze.hashing.stage1 import Fingerprints
from ksm_analyze.pages import Extent, PageState

RAN = {"kernel": "6.18.1", "ksm": {"run": 1, "smart_scan": 1}}
IDLE = {"kernel": "6.18.1", "ksm": {"run": 0, "smart_scan": 1}}


def _files(folder, files, machine):
    """Fingerprint files, one per item of ``files``: each a list of inputs (name, pages as
    letters, identity, time); an identity's inputs are samples of one guest."""
    folder.mkdir()
    paths = []
    for n, inputs in enumerate(files):
        prints = []
        for name, pages, identity, at in inputs:
            fp = _sample(pages, identity=identity, at=at, name=name)
            fp.info["machine"] = machine
            prints.append(fp)
        path = folder / f"f{n:02d}.ksmfp.parquet"
        fingerprint_files.save(
            path, prints, source={"path": f"/nowhere/{n}", "size": 0, "mtime_ns": n},
            options={"format": "snapshot", "page_size": 4096, "base_address": 0,
                     "prefix_bytes": 128},
            contents=[fp.content for fp in prints])
        paths.append(path)
    return paths


# Two series and inputs seen once, their samples interleaved across the files; the third
# file holds a sample of A and input c seen once (so A's samples are read together with c,
# and analyze() orders the inputs a, b, c, d by their first sample). "0" is a zero page.
# A's pages 7-8 take "y" once each (late duplicates when KSM ran: no steady pair holds "y")
# and page 5 turns zero: the host's steady zero pages are b's and c's alone (D's changes).
HOST = [
    [("a.s000", "pqcdgg00ab", "A", 0.0)],
    [("b", "ggcc0", None, None)],
    [("a.s001", "ggcd0gxyab", "A", 5.0), ("c", "xg0c", None, None)],
    [("d.s000", "ggrc00abq", "D", 1.0)],
    [("d.s001", "ggxc1sabq", "D", 4.0)],
    [("a.s002", "ggcdg0zyyb", "A", 7.0)],
]


def _host(gap: float, c: str) -> list:
    return [[(n, c if n == "c" else p, i, None if t is None else t * gap)
             for n, p, i, t in f] for f in HOST]


def _forced(monkeypatch, partitions):
    monkeypatch.setattr(pipeline, "out_of_core_partitions",
                        lambda paths, limit, jobs: (partitions, 64, 1 << 30, jobs))


def _same(got, want):
    """Every table computed out of core equals the in-memory one; host: but steady_state."""
    assert any(w.startswith("out of core") for w in got.warnings)
    host, want_host = got.columns["host"].data, want.columns["host"].data
    assert "if_memory_stood_still" in host
    assert {k: list(v) for k, v in host.items()} == \
        {k: list(v) for k, v in want_host.items() if k != "steady_state"}
    for name in ("stability", "per_input", "savings", "histogram", "exclusions", "pairwise"):
        assert json.dumps(_rows(got.columns[name]), default=str) == \
            json.dumps(_rows(want.columns[name]), default=str), name
    assert got.counters == want.counters


@pytest.mark.parametrize("partitions", [1, 4])
@pytest.mark.parametrize(("machine", "gap", "c"), [
    (RAN, 1.0, "xg0c"),     # late duplicates; A's new zero page joins b's and c's
    (RAN, 1.0, "xgqc"),     # one steady zero page on the host: A's is a late one too
    (IDLE, 1.0, "xg0c"),    # KSM did not run: nothing is late
    (RAN, 0.002, "xg0c"),   # every page that changed changes faster than KSM merges
])
def test_series_out_of_core_count_what_ksm_keeps_as_in_memory(tmp_path, monkeypatch,
                                                               partitions, machine, gap, c):
    files = _files(tmp_path / "fp", _host(gap, c), machine)
    want = analyze(files, jobs=1)
    assert want.per_input["input"].tolist() == ["a", "b", "c", "d"]
    _forced(monkeypatch, partitions)
    _same(analyze(files, jobs=1), want)


def _fleet(folder, guests: int, samples: int, rows: int) -> list[str]:
    """``guests`` guests (two families) sampled ``samples`` times, a second apart, each
    sample a fingerprint file of ``rows`` pages, KSM recorded running, 100 s apart: the
    first half of a guest's pages is its family's image, then 64 pages rewritten at every
    sample, 64 that take a content of the family's at the last sample (none of the image),
    and its own; every 8th page zero. Files in sample order: a series' samples lie apart."""
    folder.mkdir()
    out = []
    for k in range(samples):
        for g in range(guests):
            number = np.uint64((1 << 40) + g * rows) + np.arange(rows, dtype=np.uint64)
            half = rows // 2
            number[:half] = np.uint64((g % 2) * rows + 1) + np.arange(half, dtype=np.uint64)
            number[half:half + 64] += np.uint64((k + 1) << 32)
            if k == samples - 1:
                number[half + 64:half + 128] = np.uint64((1 << 41) + g % 2)
            number[::8] = 0
            nz = number != 0
            content = np.zeros((rows, 2), np.uint64)
            content[nz, 0] = _mix(number[nz])
            content[nz, 1] = _mix(number[nz] ^ np.uint64(0x5555555555555555))
            fp = Fingerprints(
                path=f"guest-{g:02d}.s{k:03d}", format=DumpFormat.SNAPSHOT,
                address_space="physical", page_size=PS, prefix_bytes=128,
                extents=[Extent(0, rows, PageState.DATA, 0)],
                info={"identity": f"boot:{g}:1", "sampled_at": 1000.0 + 100 * k,
                      "machine": RAN}, warnings=[],
                addrs=np.arange(rows, dtype=np.uint64) * np.uint64(PS),
                prefix=np.where(nz, content[:, 0] >> np.uint64(1) | np.uint64(1),
                                np.uint64(0)),
                state_pages={**dict.fromkeys(PageState, 0), PageState.DATA: rows})
            path = folder / f"guest-{g:02d}.s{k:03d}{fingerprint_files.SUFFIX}"
            fingerprint_files.save(path, [fp], source={"path": f"live:boot:{g}:1", "size": 0,
                                                       "mtime_ns": k},
                                   options={"prefix_bytes": 128}, contents=[content])
            out.append(str(path))
    return out


def test_many_series_under_a_small_memory_limit_scan_as_in_memory(tmp_path):
    """8 guests sampled 3 times, 2,048 pages a sample: in memory about 4.8 MiB; under
    --memory-limit 4MiB they are aggregated out of core, a series (6,144 pages) at a time,
    and scan --json gives the in-memory tables but those of the ksmd time model."""
    files = _fleet(tmp_path / "fp", 8, 3, 2048)

    def scan(*extra: str) -> dict:
        out = runner.invoke(app, ["scan", *files, "--json", "-q", "-j", "1", *extra])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)

    got, want = scan("--memory-limit", "4MiB"), scan()
    assert "aggregated in 8 parts" in got["warnings"][0]
    assert [r["input"] for r in want["per_input"]] == [f"guest-{g:02d}" for g in range(8)]
    late = want["convergence"]["late_duplicate_pages"]
    # Each guest's 64 pages that took a content at the last sample, but the 8 zero ones, are
    # late duplicates: no steady page holds their content.
    assert late == 8 * 56
    # top_contents: out of core, of the contents as KSM keeps them (in memory: as the
    # latest samples stand); stages: the timings differ.
    for s in (got, want):
        assert s["stages"].pop("stage1_seconds") >= 0 and s["stages"].pop("stage2_seconds") >= 0
    assert want["stages"]["inputs_from_fingerprint_files"] == 24  # files, as in memory
    for name in want:
        if name in NOT_COMPUTED or name in ("warnings", "host", "top_contents"):
            continue
        assert got[name] == want[name], name
    assert got["host"] == {k: {s: v for s, v in by.items() if s != "steady_state"}
                           for k, by in want["host"].items()}


def test_the_couplings_of_a_series_to_its_host_hold_out_of_core(tmp_path, monkeypatch):
    """The hosts of tests/test_over_time.py that show a series' steady view depending on
    the other inputs (a late duplicate's partners, the stability table's copies, the hold
    time of two full scans of the whole host), out of core in 4 parts: as in memory."""
    from test_over_time import _seen_once, _write

    series = ("pqcd", "ggcd", "ggcd")
    many = "".join(chr(0x100 + i) for i in range(400))
    hosts = [[*_write(tmp_path / "b", series, machine={"ksm": {"run": 1, "smart_scan": 1}}),
              _seen_once(tmp_path, "ggc", "other")],
             [*_write(tmp_path / "d", series, gap=0.1), _seen_once(tmp_path, many, "big")]]
    wants = [analyze(files, jobs=1) for files in hosts]
    # As tests/test_over_time.py has it: "g" joins the other input's steady pair; beside 400
    # other pages, pages 0-1 change faster than KSM merges.
    assert wants[0].host.at["pages_sharing", "with_zero_pages"] == 4
    assert wants[1].host.at["pages_sharing", "with_zero_pages"] == 0
    _forced(monkeypatch, 4)
    for files, want in zip(hosts, wants, strict=True):
        _same(analyze(files, jobs=1), want)
