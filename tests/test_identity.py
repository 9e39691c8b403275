"""One identity for a guest across dumps and fingerprint files (issue 18, classes 2, 3, 5):
the same guest twice is refused however it arrives, fingerprint files never collide or
replace another dump's, and a dump rewritten in place (size and mtime restored) is never
answered from stale fingerprints as if verified."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PS, SAMPLES, runner

from ksm_analyze.cli import app
from ksm_analyze.fleet import fingerprint_files as fpfile

RAW = Path(SAMPLES[1])  # vm-b.raw: 512 pages of 4 KiB, address = file offset


def _one_line(r, code: int) -> str:
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def _fingerprint(out: Path, *dumps) -> list[Path]:
    r = runner.invoke(app, ["fingerprint", *map(str, dumps), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return sorted(out.glob("*" + fpfile.SUFFIX))


def _scan(*args) -> dict:
    r = runner.invoke(app, ["scan", *map(str, args), "--json", "-q"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture
def dump(tmp_path) -> Path:
    return Path(shutil.copy(RAW, tmp_path / "x.raw"))


# -- class 2: the same guest twice ----------------------------------------------------------


def test_fingerprint_refuses_a_dump_given_twice(tmp_path, dump):
    line = _one_line(runner.invoke(app, ["fingerprint", str(dump), str(dump),
                                         "-o", str(tmp_path / "fp")]), 2)
    assert line.startswith(f"Error: {dump} is given twice (inputs 1 and 2)")
    link = tmp_path / "hard.raw"
    os.link(dump, link)
    line = _one_line(runner.invoke(app, ["fingerprint", str(dump), str(link),
                                         "-o", str(tmp_path / "fp")]), 2)
    assert f"{link} is given twice (inputs 1 and 2, the first time as {dump})" in line
    assert not list((tmp_path / "fp").glob("*"))


def test_a_dump_and_its_own_fingerprint_file_are_one_guest(tmp_path, dump):
    (f,) = _fingerprint(tmp_path / "fp", dump)
    for args in ([dump, f], [f, dump]):
        line = _one_line(runner.invoke(app, ["scan", *map(str, args)]), 2)
        assert (f"are one guest (inputs 1 and 2: {f} is a fingerprint file of {dump}): "
                "each input is one guest or process") in line
        assert str(args[0]) in line and str(args[1]) in line
    # Renamed since (same inode, size and mtime): still the same guest.
    moved = tmp_path / "y.raw"
    os.rename(dump, moved)
    assert "are one guest" in _one_line(runner.invoke(app, ["scan", str(moved), str(f)]), 2)


def test_two_fingerprint_files_of_one_dump_are_one_guest(tmp_path, dump):
    (a,) = _fingerprint(tmp_path / "fp1", dump)
    (b,) = _fingerprint(tmp_path / "fp2", dump)
    line = _one_line(runner.invoke(app, ["scan", str(a), str(b)]), 2)
    assert line.startswith(f"Error: {b} and {a} are one guest (inputs 1 and 2: {a} is a "
                           f"fingerprint file of {dump} and {b} is a fingerprint file of {dump})")
    line = _one_line(runner.invoke(app, ["plan", str(a), str(a), "--host-memory", "1MiB"]), 2)
    assert line.startswith(f"Error: {a} is given twice (inputs 1 and 2)")


def test_a_copy_and_the_fingerprint_file_of_the_original_are_two_guests(tmp_path, dump):
    (f,) = _fingerprint(tmp_path / "fp", dump)
    copy = shutil.copy(dump, tmp_path / "copy.raw")
    got = _scan(copy, f)
    # Two identical guests: every non-zero page of one merges with the other's.
    pages = np.fromfile(RAW, np.uint8).reshape(-1, PS)
    nonzero = pages.any(axis=1)
    assert got["stages"]["merges"] >= int(np.count_nonzero(nonzero))


def test_guests_compare_each_input_only_with_those_it_could_be(monkeypatch):
    # 400 fingerprint files of other dumps: before, the 400th input was compared with all 399
    # before it (79,800 comparisons); now only with inputs sharing a path or an inode.
    from ksm_analyze.fleet.sources import _Guests

    calls = []
    same = fpfile.same_dump
    monkeypatch.setattr(fpfile, "same_dump", lambda a, b: calls.append(1) or same(a, b))
    guests = _Guests()
    for i in range(400):
        guests.add(f"/nowhere/g{i}.ksmfp.parquet", {"path": f"/d/g{i}", "size": 4096,
                                                    "mtime_ns": i, "dev": 7, "ino": 1000 + i})
    assert len(calls) == 0
    # Still one guest: recorded without device and inode (an older file), same path and size.
    with pytest.raises(ValueError, match=r"inputs 4 and 401: "):
        guests.add("/nowhere/old.ksmfp.parquet", {"path": "/d/g3", "size": 4096,
                                                  "mtime_ns": 3, "dev": None, "ino": None})
    # And a hard link under another path: same device and inode, size and mtime.
    with pytest.raises(ValueError, match=r"inputs 8 and 401: "):
        guests.add("/nowhere/link.ksmfp.parquet", {"path": "/e/link", "size": 4096,
                                                   "mtime_ns": 7, "dev": 7, "ino": 1007})
    assert len(calls) <= 4


# -- class 3: fingerprint file names ---------------------------------------------------------


def test_fingerprint_names_never_collide_in_one_run(tmp_path, monkeypatch):
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    dumps = [tmp_path / "d1_x.raw", tmp_path / "d1" / "x.raw", tmp_path / "d2" / "x.raw"]
    for d in dumps:
        shutil.copy(RAW, d)
    monkeypatch.chdir(tmp_path)  # the names of the issue: d1_x.raw d1/x.raw d2/x.raw
    files = _fingerprint(tmp_path / "out", *(d.relative_to(tmp_path) for d in dumps))
    assert len(files) == 3
    sources = sorted(fpfile.metadata(f)["source"]["path"] for f in files)
    assert sources == sorted(str(d) for d in dumps)


def test_fingerprint_never_replaces_another_dumps_file(tmp_path):
    for host in ("host1", "host2"):
        (tmp_path / host).mkdir()
        shutil.copy(RAW, tmp_path / host / "x.raw")
    out = tmp_path / "out"
    (f,) = _fingerprint(out, tmp_path / "host1" / "x.raw")
    before = f.read_bytes()
    line = _one_line(runner.invoke(app, ["fingerprint", str(tmp_path / "host2" / "x.raw"),
                                         "-o", str(out), "-q"]), 2)
    assert line == (f"Error: {f} holds the fingerprints of another dump "
                    f"({tmp_path / 'host1' / 'x.raw'}): not replaced (remove it, or write to "
                    "another folder)")
    assert f.read_bytes() == before
    # The same dump again: its own file is rewritten.
    assert _fingerprint(out, tmp_path / "host1" / "x.raw") == [f]
    # Something else under that name is never replaced either.
    f.write_bytes(b"not mine")
    line = _one_line(runner.invoke(app, ["fingerprint", str(tmp_path / "host1" / "x.raw"),
                                         "-o", str(out), "-q"]), 2)
    assert "exists and is not a fingerprint file: not replaced" in line
    assert f.read_bytes() == b"not mine"


# -- class 5: a dump rewritten in place, size and mtime restored ----------------------------


def _two_unique_pages() -> tuple[int, int]:
    """Two non-zero pages of vm-b.raw whose first 128 bytes (the prefix hashed) occur in no
    other page: neither is a candidate of stage 2."""
    pages = np.fromfile(RAW, np.uint8).reshape(-1, PS)
    heads = [bytes(p[:128]) for p in pages]
    unique = [i for i, h in enumerate(heads) if pages[i].any() and heads.count(h) == 1]
    return unique[0], unique[1]


def _rewrite_in_place(path: Path) -> None:
    """Page i becomes a copy of page j; size kept, mtime (and atime) put back, as
    ``cp -p``, ``rsync -t`` or ``touch -d`` would."""
    st = os.stat(path)
    i, j = _two_unique_pages()
    data = bytearray(path.read_bytes())
    data[i * PS:(i + 1) * PS] = data[j * PS:(j + 1) * PS]
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_a_rewritten_dump_is_not_read_through_its_old_fingerprint_file(tmp_path, dump):
    (f,) = _fingerprint(tmp_path / "fp", dump)
    old = _scan(f)
    assert old["stages"]["verified"] is True
    _rewrite_in_place(dump)
    got = _scan(f)
    # The file's own answer, by its content hashes, said unverified: not old prefixes
    # mixed with new bytes, called verified.
    assert got["stages"]["verified"] is False and got["stages"]["hash_bits"] == 128
    assert got["stages"]["merges"] == old["stages"]["merges"]
    assert got["savings"] == old["savings"]


def test_a_rewritten_dump_is_not_answered_from_the_cache(tmp_path, dump):
    before = _scan(dump, "--cache", tmp_path / "cache")
    _rewrite_in_place(dump)
    fresh = _scan(dump)
    assert fresh["stages"]["merges"] == before["stages"]["merges"] + 1  # page i = page j
    got = _scan(dump, "--cache", tmp_path / "cache")
    assert got["stages"]["inputs_from_cache"] == 0
    assert got["stages"]["merges"] == fresh["stages"]["merges"]
    assert got["savings"] == fresh["savings"]


def test_stage2_checks_the_pages_it_reads_against_stored_fingerprints(
        tmp_path, dump, monkeypatch, kernel_path):
    # Were ctime and inode restored too (root can), the fingerprints would pass for the
    # dump's: stage 2 still finds the page that changed.
    (f,) = _fingerprint(tmp_path / "fp", dump)
    _rewrite_in_place(dump)
    monkeypatch.setattr(fpfile, "unchanged", lambda source: True)
    i, _ = _two_unique_pages()
    line = _one_line(runner.invoke(app, ["scan", str(f), "-q"]), 1)
    assert line == (f"Error: {f}: does not match its dump {dump} (page at address "
                    f"{i * PS:#x}): the dump changed since it was fingerprinted, or this "
                    "file is damaged")
