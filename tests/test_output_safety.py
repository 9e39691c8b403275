"""What reaches the terminal and the disk from files: control characters escaped, no secrets
in fingerprint files, no half-written report, messages that name what failed (issue 18:
classes 16, 17, 18 and the smaller items)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import PS, runner

from ksm_analyze.cli import app
from ksm_analyze.errors import InputError, printable

EVIL = "\x1b]0;pwned\x07\nforged line\x9b2J\x7f"
"""An OSC sequence setting the terminal title, a newline forging a line, a C1 CSI, DEL."""


def clean(text: str) -> bool:
    """Whether ``text`` is safe on a terminal: no control character but the newlines that end
    lines the tool wrote, and no line that a file's bytes forged."""
    lines = text.split("\n")
    return (all(ch >= " " and not "\x7f" <= ch <= "\x9f" for line in lines for ch in line)
            and not any(line.startswith("forged line") for line in lines))


def small_dump(folder: Path, name: str = f"vm{EVIL}.raw") -> Path:
    """Eight pages: four copies of one content, two zero pages, two distinct."""
    path = folder / name
    path.write_bytes(b"\xaa" * PS * 4 + bytes(2 * PS) + b"\x01" * PS + b"\x02" * PS)
    return path


def test_printable_escapes_control_characters_only():
    assert printable("a\x1b]0;x\x07b") == "a\\x1b]0;x\\x07b"
    assert printable("one\ntwo\r\tthree") == "one\\ntwo\\r\\tthree"
    assert printable("\x7f\x9b\x85") == "\\x7f\\x9b\\x85"
    assert printable("caf\u00e9 \u2014 \u4e2d") == "caf\u00e9 \u2014 \u4e2d"  # printable text kept
    assert printable("\u202eevil\u2028") == "\\u202eevil\\u2028"  # bidi override, line separator
    assert printable("bad\udcffbyte") == "bad\\xffbyte"  # an undecodable byte of a file name
    assert printable(printable(EVIL)) == printable(EVIL)


def test_error_messages_escape_what_came_from_a_file():
    error = InputError(f"bad {EVIL}", path=f"/x/{EVIL}")
    assert clean(str(error)) and "\n" not in str(error)
    assert error.path == f"/x/{EVIL}"  # the attribute stays exact


def test_a_dump_named_with_control_characters_prints_escaped(tmp_path):
    dump = small_dump(tmp_path)
    for args in (["scan", str(dump)], ["info", str(dump)],
                 ["plan", str(dump), "--host-memory", "1GiB"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert clean(r.stdout) and clean(r.stderr), r.stdout
        assert "\\x1b]0;pwned\\x07\\nforged line" in r.stdout
    empty = tmp_path / f"e{EVIL}.raw"
    empty.write_bytes(b"")
    r = runner.invoke(app, ["scan", str(empty)])
    assert r.exit_code == 1 and clean(r.stderr) and r.stderr.count("\n") == 1, r.stderr


def _forged_fingerprint_file(tmp_path: Path) -> Path:
    """A fingerprint file whose metadata holds control characters everywhere text goes."""
    import pyarrow.parquet as pq

    from ksm_analyze.fleet import fingerprint_files as fpfile

    dump = small_dump(tmp_path, "vm.raw")
    r = runner.invoke(app, ["fingerprint", "-q", str(dump), "-o", str(tmp_path / "fp")])
    assert r.exit_code == 0, r.output
    (path,) = (tmp_path / "fp").iterdir()
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[fpfile.META_KEY])
    meta["tool"] = f"ksm-analyze {EVIL}"
    meta["source"]["path"] = f"/elsewhere/{EVIL}"
    one = meta["inputs"][0]
    one["name"] = f"guest{EVIL}"
    one["warnings"] = [f"w{EVIL}"]
    one["info"]["note"] = f"i{EVIL}"
    for extent in one["extents"]:
        extent[4] = f"label{EVIL}"
    forged = tmp_path / f"forged{EVIL}.ksmfp.parquet"
    raw = json.dumps(meta).encode()  # signed again, as a forger would: the digest is
    columns = {n: table.column(n).to_numpy() for n in table.column_names}  # against damage
    pq.write_table(table.replace_schema_metadata(
        {fpfile.META_KEY: raw, fpfile.DIGEST_KEY: fpfile.digest(raw, columns).encode()}), forged)
    return forged


def test_fingerprint_metadata_prints_escaped(tmp_path):
    forged = _forged_fingerprint_file(tmp_path)
    for args in (["scan", str(forged)], ["info", str(forged)],
                 ["plan", str(forged), "--host-memory", "1GiB"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        assert clean(r.stdout) and clean(r.stderr), r.stdout
        assert "pwned" in r.stdout  # it was printed, escaped
    info = runner.invoke(app, ["info", str(forged)]).stdout
    assert "wpwned" not in info and "w\\x1b]0;pwned\\x07\\nforged line" in info


def test_the_html_report_escapes_control_characters(tmp_path):
    forged = _forged_fingerprint_file(tmp_path)
    r = runner.invoke(app, ["report", "-q", str(forged), "-o", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    assert clean(r.stdout), r.stdout
    page = (tmp_path / "report" / "index.html").read_text()
    assert "\x1b" not in page and "\x07" not in page and "\\x1b]0;pwned" in page


# -- class 18: secrets out of fingerprint files ----------------------------------------------


def _snapshot_with_a_password(path: Path) -> Path:
    from test_snapshot import BASE, R, page, runs, vma

    from ksm_analyze.formats.snapshot import SnapshotWriter

    with SnapshotWriter(path, page_size=PS, meta={"kernel": "6.18.0"}) as w:
        w.begin_process({"pid": 7, "comm": "db", "start_time": 1,
                         "cmdline": ["/usr/sbin/db", "--password=hunter2"],
                         "vmas": [vma(BASE, 3, "rd wr mr mw me ac mg")]})
        w.write_pages(BASE, page(0xA) * 2 + page(0xB))
        w.add_runs(runs((BASE, 3, R.PRESENT | R.STORED)))
        w.commit()
    return path


def test_fingerprint_files_leave_out_command_lines(tmp_path):
    snap = _snapshot_with_a_password(tmp_path / "db.snap")
    assert b"hunter2" in snap.read_bytes()  # the snapshot holds it (docs/security.md)
    r = runner.invoke(app, ["fingerprint", "-q", str(snap), "-o", str(tmp_path / "fp")])
    assert r.exit_code == 0, r.output
    (made,) = (tmp_path / "fp").iterdir()
    assert b"hunter2" not in made.read_bytes()
    r = runner.invoke(app, ["scan", str(snap), "--cache", str(tmp_path / "cache"), "--json"])
    assert r.exit_code == 0, r.output
    entries = list((tmp_path / "cache").rglob("*.parquet"))
    assert entries and not any(b"hunter2" in e.read_bytes() for e in entries)
    r = runner.invoke(app, ["fingerprint", "-q", "--keep-cmdline", str(snap),
                            "-o", str(tmp_path / "kept")])
    assert r.exit_code == 0, r.output
    (kept,) = (tmp_path / "kept").iterdir()
    assert b"--password=hunter2" in kept.read_bytes()


# -- class 17: write errors name what is written --------------------------------------------


def test_plan_write_errors_name_the_csv_and_png_files(tmp_path):
    dump = small_dump(tmp_path, "vm.raw")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    r = runner.invoke(app, ["plan", str(dump), "--host-memory", "1GiB",
                            "--csv", str(not_a_folder)])
    assert r.exit_code == 1 and "cannot write CSV files" in r.stderr, r.stderr
    r = runner.invoke(app, ["plan", str(dump), "--host-memory", "1GiB",
                            "--png", str(tmp_path / "no" / "such" / "x")])
    assert r.exit_code == 1 and "cannot write PNG files" in r.stderr, r.stderr


# -- smaller: a report is written whole or not at all ----------------------------------------


def _full_disk_after(monkeypatch, n: int) -> None:
    from ksm_analyze.render import report

    real, calls = report.atomic_write, []

    def atomic_write(path, data, **kwargs):
        calls.append(path)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data, **kwargs)

    monkeypatch.setattr(report, "atomic_write", atomic_write)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def test_a_full_disk_leaves_no_partial_report(tmp_path, monkeypatch):
    dump = small_dump(tmp_path, "vm.raw")
    _full_disk_after(monkeypatch, 5)
    new = tmp_path / "new"
    r = runner.invoke(app, ["report", "-q", str(dump), "-o", str(new)])
    assert r.exit_code == 1 and "No space left on device" in r.stderr, r.output
    assert r.stderr.count("\n") == 1 and "cannot write the report" in r.stderr
    assert not new.exists() or _tree(new) == {}
    old = tmp_path / "old"
    old.mkdir()
    for name in ("index.html", "savings.csv", "distribution.png", "notes.txt"):
        (old / name).write_text(f"previous {name}")
    before = _tree(old)
    r = runner.invoke(app, ["report", "-q", str(dump), "-o", str(old)])
    assert r.exit_code == 1, r.output
    assert _tree(old) == before


def test_a_report_replaces_a_previous_one_whole(tmp_path):
    dump = small_dump(tmp_path, "vm.raw")
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("previous")
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["report", "-q", str(dump), "-o", str(out)])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert "notes.txt" in names and not any(n.startswith(".") for n in names), names
    assert (out / "index.html").read_text().startswith("<!DOCTYPE html>")


# -- smaller: an empty --domains file ---------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "input,domain\n"], ids=["empty", "blank", "header"])
def test_an_empty_domains_file_is_one_line(tmp_path, text):
    dump = small_dump(tmp_path, "vm.raw")
    table = tmp_path / "domains.csv"
    table.write_text(text)
    r = runner.invoke(app, ["scan", str(dump), "--domains", str(table)])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and "no domains" in r.stderr and str(table) in r.stderr


def test_a_fingerprint_that_fails_leaves_no_folder_it_made(tmp_path):
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    r = runner.invoke(app, ["fingerprint", str(empty), "-o", str(tmp_path / "fp")])
    assert r.exit_code == 1 and r.stderr == f"Error: {empty}: empty file\n"
    assert not (tmp_path / "fp").exists()
    (tmp_path / "mine").mkdir()  # a folder that was there stays
    assert runner.invoke(app, ["fingerprint", str(empty), "-o", str(tmp_path / "mine")]
                         ).exit_code == 1
    assert (tmp_path / "mine").is_dir()
