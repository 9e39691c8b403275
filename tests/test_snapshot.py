"""The snapshot format: round trips of synthetic snapshots, and bad or hostile files.

Real snapshots of real processes are in test_capture.py; these build small ones with the
writer to reach every edge and every error.
"""

from __future__ import annotations

import json
import os

import numpy as np
from conftest import PS, runner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.formats import DumpFormat, detect_format, open_inputs
from ksm_analyze.formats.snapshot import RUN, RunFlags, SnapshotWriter
from ksm_analyze.pages import MapFlags, PageState

R = RunFlags
BASE = 0x7F0000000000


def runs(*rows: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros(len(rows), RUN)
    for i, (vaddr, npages, flags) in enumerate(rows):
        out[i] = (vaddr, npages, flags)
    return out


def page(byte: int) -> bytes:
    return bytes([byte]) * PS


def vma(start: int, npages: int, vmflags: str, path: str = "") -> dict[str, object]:
    return {"start": start, "end": start + npages * PS, "perms": "rw-p", "offset": 0,
            "path": path, "vmflags": vmflags}


def write_two_processes(path, *, kernel="6.18.0", mangle=None):
    """Process 1: a mergeable VMA (2 x A, 1 zero page, a zero-page PTE, 2 untouched) and a
    plain VMA (2 x A). Process 2: a mergeable VMA (1 x A, a THP run holding one zero page)."""
    meta = {"kernel": kernel, "pfn_flags": "kpageflags"}
    with SnapshotWriter(path, page_size=PS, meta=meta) as w:
        w.begin_process({"pid": 101, "comm": "one", "cmdline": ["one"], "start_time": 1,
                         "vmas": [vma(BASE, 6, "rd wr mr mw me ac mg"),
                                  vma(BASE + 0x100000, 2, "rd wr mr mw me ac")]})
        w.write_pages(BASE, page(0xA) * 2 + bytes(PS))
        w.write_pages(BASE + 0x100000, page(0xA) * 2)
        stored = R.PRESENT | R.STORED
        w.add_runs(runs((BASE, 3, stored), (BASE + 3 * PS, 1, R.PRESENT | R.ZERO_PFN),
                        (BASE + 4 * PS, 2, 0), (BASE + 0x100000, 2, stored)))
        w.begin_process({"pid": 202, "comm": "two", "cmdline": ["two"], "start_time": 2,
                         "vmas": [vma(BASE, 3, "rd wr mr mw me ac hg mg")]})
        w.write_pages(BASE, page(0xA) + page(0xB) + bytes(PS))
        w.add_runs(runs((BASE, 1, stored), (BASE + PS, 2, stored | R.THP)))
        if mangle:
            mangle(w)
        w.commit()
    return path


def test_snapshot_round_trip(tmp_path):
    path = write_two_processes(tmp_path / "two.snap")
    assert detect_format(path) is DumpFormat.SNAPSHOT
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    readers = open_inputs(path)
    try:
        assert [r.name for r in readers] == [f"{path}:101", f"{path}:202"]
        one = {e.addr: (e.state, e.npages, e.flags) for e in readers[0].extents}
        mg = MapFlags.VMFLAGS | MapFlags.MERGEABLE | MapFlags.ANON
        assert one == {
            BASE: (PageState.DATA, 3, mg),
            BASE + 3 * PS: (PageState.ZERO, 1, mg | MapFlags.ZERO_PFN),
            BASE + 4 * PS: (PageState.HOLE, 2, mg),
            BASE + 0x100000: (PageState.DATA, 2, MapFlags.VMFLAGS | MapFlags.ANON),
        }
        got = {int(a): p.tobytes() for b in readers[1].iter_batches()
               for a, p in zip(b.addrs, b.pages, strict=True)}
        assert got == {BASE: page(0xA), BASE + PS: page(0xB), BASE + 2 * PS: bytes(PS)}
    finally:
        for r in readers:
            r.close()


def test_snapshot_scopes_count_by_hand(tmp_path):
    path = write_two_processes(tmp_path / "two.snap")
    m = analyze(path)  # mergeable: A x2 + zero (one), A x1 + B (two); THP zero page freed
    assert m.counters.ksm_rmap_items == 3 + 2
    assert (m.counters.pages_shared, m.counters.pages_sharing) == (1, 2)  # A: 3 copies
    ex = m.exclusions
    assert ex.loc[f"{path}:101", "zero_pfn"] == 1
    assert ex.loc[f"{path}:101", "not_mergeable"] == 2
    assert ex.loc[f"{path}:101", "not_present"] == 2
    assert ex.loc[f"{path}:202", "thp_zero"] == 1
    stat = m.per_input.set_index("input")
    assert stat.loc[f"{path}:101", "ksm_merging_pages"] == 2
    assert stat.loc[f"{path}:202", "ksm_merging_pages"] == 1
    assert stat.loc[f"{path}:202", "ksm_rmap_items"] == 2
    a = analyze(path, scope="anon")  # the plain VMA's two A pages join: 5 copies of A
    assert (a.counters.pages_shared, a.counters.pages_sharing) == (1, 4)
    everything = analyze(path, scope="all")  # + the zero-page PTE and the THP zero page
    assert everything.per_input["zero_pages"].sum() == 3


def test_thp_zero_rule_needs_linux_6_12(tmp_path):
    old = write_two_processes(tmp_path / "old.snap", kernel="6.6.30")
    assert analyze(old).exclusions["thp_zero"].sum() == 0
    assert analyze(old).counters.ksm_rmap_items == 6


def _cli_error(path) -> str:
    r = runner.invoke(app, ["scan", str(path)])
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1
    return r.output


def test_truncated_snapshot_is_one_line(tmp_path):
    path = write_two_processes(tmp_path / "t.snap")
    data = path.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 0x80):
        short = tmp_path / f"cut{cut}.snap"
        short.write_bytes(data[:cut])
        out = _cli_error(short)
        assert out.startswith(f"Error: {short}")


def test_corrupt_metadata_is_one_line(tmp_path):
    path = write_two_processes(tmp_path / "m.snap")
    data = bytearray(path.read_bytes())
    at = data.find(b'{"kernel"')
    data[at] = ord("[")
    path.write_bytes(bytes(data))
    assert "bad snapshot metadata" in _cli_error(path)


def test_hostile_run_table_claims(tmp_path):
    def huge_runs(w):
        w.meta["processes"][1]["runs"] = [0, 1 << 40]

    path = write_two_processes(tmp_path / "h.snap", mangle=huge_runs)
    assert "outside the RUNS note" in _cli_error(path)

    def run_outside(w):
        w.add_runs(runs((0x1000, 0xFFFFFFFF, R.PRESENT)))

    path = write_two_processes(tmp_path / "o.snap", mangle=run_outside)
    assert "lies outside every VMA" in _cli_error(path)

    def unstored(w):
        w.meta["processes"][1]["vmas"].append(vma(BASE + 0x200000, 4, "mg"))
        w.add_runs(runs((BASE + 0x200000, 4, R.PRESENT | R.STORED)))

    path = write_two_processes(tmp_path / "u.snap", mangle=unstored)
    assert "is not inside one PT_LOAD segment" in _cli_error(path)


def test_missing_notes_and_page_size(tmp_path):
    def no_processes(w):
        del w.meta["processes"]

    path = write_two_processes(tmp_path / "n.snap", mangle=no_processes)
    assert "bad snapshot metadata: KeyError" in _cli_error(path)
    path = write_two_processes(tmp_path / "p.snap")
    r = runner.invoke(app, ["scan", str(path), "--page-size", "8192"])
    assert r.exit_code == 2
    assert r.output == f"Error: {path} holds 4096-byte pages; analyze it with --page-size 4096\n"


def test_meta_is_plain_json_other_tools_can_read(tmp_path):
    path = write_two_processes(tmp_path / "j.snap")
    data = path.read_bytes()
    start = data.find(b'{"kernel"')
    meta, _ = json.JSONDecoder().raw_decode(data[start:].decode("utf-8", "replace"))
    assert [p["pid"] for p in meta["processes"]] == [101, 202]


def test_capture_into_a_missing_directory_is_one_line(tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "x.snap"
    r = runner.invoke(app, ["capture", str(os.getpid()), "-o", str(out)])
    assert r.exit_code == 1
    assert r.output == (
        f"Error: {out}: cannot write the snapshot here: No such file or directory\n"
    )


def test_ksm_status_prints_prediction_beside_the_kernel(tmp_path):
    path = write_two_processes(tmp_path / "s.snap")
    r = runner.invoke(app, ["ksm-status", str(path)])
    if not os.path.isdir("/sys/kernel/mm/ksm"):
        assert r.exit_code == 1
        return
    assert r.exit_code == 0, r.output
    assert "predicted" in r.output and "difference" in r.output
    # The PIDs 101/202 of the synthetic snapshot are not the captured processes any more.
    assert "No captured process is still running" in r.output
    r = runner.invoke(app, ["ksm-status", "--json"])
    assert r.exit_code == 0
    assert "pages_sharing" in json.loads(r.output)["host"]
