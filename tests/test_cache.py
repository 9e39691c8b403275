"""``--cache``: an entry is used only if it is the one for this dump and these options.

Each entry is checked against its key (the dump's recorded source, the hashing options, the
format, page size and layout the dump's reader sees); anything else (another dump's entry,
a symbolic link, a damaged or hostile file) is a miss: the dump is read again, the entry
rewritten, and one warning names the entry. The folder must be the user's own and writable
by nobody else; a path that cannot be a cache folder is one line and exit 1; an entry that
cannot be written (full or read-only file system) is a warning and the scan finishes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PS, SAMPLES, runner

from ksm_analyze.cli import app
from ksm_analyze.fleet import fingerprint_files as fpfile

PREDICTION = ("per_input", "host", "savings", "histogram", "exclusions", "convergence",
              "pairwise", "address_map", "top_contents")


def _scan(*args: object, code: int = 0) -> tuple[dict, str]:
    out = runner.invoke(app, ["scan", *map(str, args), "--json", "-q"])
    assert out.exit_code == code, out.output
    assert "Traceback" not in out.output
    return (json.loads(out.stdout) if code == 0 else {}), out.stderr


def _same(a: dict, b: dict) -> None:
    for name in PREDICTION:
        assert a[name] == b[name], name


@pytest.fixture
def dumps(tmp_path) -> tuple[Path, Path]:
    """``b.raw`` (vm-b) and ``other.raw``: the same layout, its non-zero pages all distinct,
    so the two predict different self-sharing."""
    raw = next(Path(p) for p in SAMPLES if p.endswith(".raw"))
    b = Path(shutil.copy(raw, tmp_path / "b.raw"))
    pages = np.frombuffer(raw.read_bytes(), np.uint8).reshape(-1, PS).copy()
    nonzero = pages.any(axis=1)
    pages[nonzero, :8] = np.arange(1, nonzero.sum() + 1, dtype="<u8").view(np.uint8).reshape(-1, 8)
    other = tmp_path / "other.raw"
    other.write_bytes(pages.tobytes())
    return b, other


def _entry(dump: Path, folder: Path, *options: str) -> Path:
    """The one cache entry a scan of ``dump`` alone writes into ``folder``."""
    _scan(dump, "--cache", folder, *options)
    (entry,) = folder.glob("*" + fpfile.SUFFIX)
    return entry


def _one_warning(got: dict, entry: Path) -> str:
    """The one warning of a scan that names ``entry``: it was not used, and was rewritten."""
    (line,) = [w for w in got["warnings"] if entry.name in w]
    assert "not used" in line and line.endswith("and the entry rewritten"), line
    return line


def _hit_next_time(dump: Path, folder: Path, want: dict) -> None:
    again, _ = _scan(dump, "--cache", folder)
    assert again["stages"]["inputs_from_cache"] == 1  # the entry was rewritten
    _same(again, want)


def test_another_dumps_entry_under_this_key_is_a_miss(tmp_path, dumps):
    b, other = dumps
    want, _ = _scan(b)
    assert _scan(other)[0]["per_input"] != want["per_input"]  # the plant would show
    entry = _entry(b, tmp_path / "cache")
    shutil.copy(_entry(other, tmp_path / "elsewhere"), entry)
    got, _ = _scan(b, "--cache", tmp_path / "cache")
    _same(got, want)
    assert got["stages"]["inputs_from_cache"] == 0
    _one_warning(got, entry)
    _hit_next_time(b, tmp_path / "cache", want)


@pytest.mark.parametrize("options", [("--prefix-bytes", "64"), ("--page-size", "8192")])
def test_an_entry_written_under_other_options_is_a_miss(tmp_path, dumps, options):
    b, _ = dumps
    want, _ = _scan(b)
    entry = _entry(b, tmp_path / "cache")
    shutil.copy(_entry(b, tmp_path / "elsewhere", *options), entry)
    got, _ = _scan(b, "--cache", tmp_path / "cache")  # was exit 2, blamed on the dump
    _same(got, want)
    assert got["stages"]["inputs_from_cache"] == 0
    _one_warning(got, entry)
    _hit_next_time(b, tmp_path / "cache", want)


def test_a_symbolic_link_entry_is_not_followed_but_replaced(tmp_path, dumps):
    b, other = dumps
    want, _ = _scan(b)
    entry = _entry(b, tmp_path / "cache")
    target = _entry(other, tmp_path / "elsewhere")
    kept = target.read_bytes()
    entry.unlink()
    entry.symlink_to(target)
    got, _ = _scan(b, "--cache", tmp_path / "cache")
    _same(got, want)
    assert got["stages"]["inputs_from_cache"] == 0
    _one_warning(got, entry)
    assert not entry.is_symlink() and target.read_bytes() == kept  # replaced, not written through
    _hit_next_time(b, tmp_path / "cache", want)


def _with_metadata(entry: Path, edit) -> None:
    table = pq.read_table(entry)
    meta = json.loads(table.schema.metadata[fpfile.META_KEY])
    raw = edit(meta)
    table = table.replace_schema_metadata({fpfile.META_KEY: raw})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    entry.write_bytes(sink.getvalue().to_pybytes())


def _set(meta: dict, where: str, value) -> str:
    *path, last = where.split(".")
    node = meta
    for part in path:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return json.dumps(meta)


DAMAGE = {
    "truncated": lambda e: e.write_bytes(e.read_bytes()[: e.stat().st_size // 2]),
    "half and footer": lambda e: e.write_bytes(e.read_bytes()[: e.stat().st_size // 2]
                                               + e.read_bytes()[-8:]),
    "garbage": lambda e: e.write_bytes(b"PAR1" + b"\xff" * 5000 + b"PAR1"),
    "empty": lambda e: e.write_bytes(b""),
    "bad JSON": lambda e: _with_metadata(e, lambda m: "{not json"),
    "deep JSON": lambda e: _with_metadata(e, lambda m: "[" * 100_000 + "]" * 100_000),
    "size 1e400": lambda e: _with_metadata(e, lambda m: _set(m, "source.size", 0).replace(
        '"size": 0', '"size": 1e400')),
    "prefix_bytes 1e400": lambda e: _with_metadata(e, lambda m: _set(
        m, "inputs.0.prefix_bytes", 0).replace('"prefix_bytes": 0', '"prefix_bytes": 1e400')),
    "extent at 2^70": lambda e: _with_metadata(e, lambda m: _set(
        m, "inputs.0.extents.0.0", 1 << 70)),
    "no inputs": lambda e: _with_metadata(e, lambda m: _set(m, "inputs", [])),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_or_hostile_entry_is_a_miss_with_one_warning(tmp_path, dumps, damage):
    b, _ = dumps
    want, _ = _scan(b)
    entry = _entry(b, tmp_path / "cache")
    DAMAGE[damage](entry)
    got, _ = _scan(b, "--cache", tmp_path / "cache")
    _same(got, want)
    assert got["stages"]["inputs_from_cache"] == 0
    _one_warning(got, entry)
    assert all("\n" not in w for w in got["warnings"])
    _hit_next_time(b, tmp_path / "cache", want)


def test_the_folder_is_created_private(tmp_path, dumps):
    b, _ = dumps
    _scan(b, "--cache", tmp_path / "new" / "cache")
    assert (tmp_path / "new" / "cache").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("how", ["mode 0777", "mode 0720", "someone else's"])
def test_a_folder_others_can_write_is_refused(tmp_path, dumps, how):
    b, _ = dumps
    folder = tmp_path / "cache"
    _entry(b, folder)
    if how == "someone else's":
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        os.chown(folder, 65534, 65534)
    else:
        folder.chmod(int(how.split()[1], 8))
    _, err = _scan(b, "--cache", folder, code=1)
    assert err.count("\n") == 1 and str(folder) in err, err


def test_an_entry_others_can_write_is_a_miss(tmp_path, dumps):
    b, _ = dumps
    want, _ = _scan(b)
    entry = _entry(b, tmp_path / "cache")
    entry.chmod(0o666)
    got, _ = _scan(b, "--cache", tmp_path / "cache")
    _same(got, want)
    assert got["stages"]["inputs_from_cache"] == 0
    _one_warning(got, entry)
    assert entry.stat().st_mode & 0o777 == 0o600
    _hit_next_time(b, tmp_path / "cache", want)


@pytest.mark.parametrize("where", ["a file", "the input dump", "under a file", "/proc file",
                                   "under /proc"])
def test_a_cache_path_that_cannot_be_a_folder_is_one_line(tmp_path, dumps, where):
    b, _ = dumps
    kept = b.read_bytes()
    (tmp_path / "f").write_text("x")
    path = {"a file": tmp_path / "f", "the input dump": b, "under a file": tmp_path / "f" / "c",
            "/proc file": Path("/proc/self/status"), "under /proc": Path("/proc/nope/cache")
            }[where]
    _, err = _scan(b, "--cache", path, code=1)
    assert err.count("\n") == 1 and "--cache" in err and str(path) in err, err
    assert b.read_bytes() == kept


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_cache_that_cannot_be_written_warns_and_the_scan_finishes(tmp_path, dumps,
                                                                     monkeypatch, code):
    # A full or read-only file system, simulated: writing any entry fails with that errno.
    b, _ = dumps
    want, _ = _scan(b)

    def cannot(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), os.fspath(path))

    monkeypatch.setattr(fpfile, "atomic_file", cannot)
    got, _ = _scan(b, "--cache", tmp_path / "cache")
    _same(got, want)
    (line,) = [w for w in got["warnings"] if "cache" in w]
    assert os.strerror(code) in line and str(tmp_path / "cache") in line, line
    assert list((tmp_path / "cache").iterdir()) == []
    # An entry not used and not rewritten either: one line says both.
    monkeypatch.undo()
    entry = _entry(b, tmp_path / "cache")
    entry.write_bytes(b"damage")
    monkeypatch.setattr(fpfile, "atomic_file", cannot)
    got, _ = _scan(b, "--cache", tmp_path / "cache")
    _same(got, want)
    (line,) = [w for w in got["warnings"] if "cache" in w]
    assert "not used" in line and os.strerror(code) in line and "rewritten" not in line, line
    assert entry.read_bytes() == b"damage"
