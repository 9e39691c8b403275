"""Fingerprint files prove their integrity (issue 18, classes 1, 7, 12 and part of 15).

A file named ``*.ksmfp.parquet`` or starting with ``PAR1`` is read as a fingerprint file or
refused, never read as a raw image; every column and the metadata are covered by a SHA-256
digest and Parquet page checksums; the metadata is parsed with bounds like a dump's header.
Anything wrong is one line naming the file and exit 1, never a traceback, and a flipped
byte either errors or leaves the answer unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLES, runner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.errors import DumpFormatError, KsmAnalyzeError
from ksm_analyze.fleet import fingerprint_files as fpfile

VM_B = next(Path(p) for p in SAMPLES if p.endswith("vm-b.raw"))
PREDICTION = ("per_input", "host", "savings", "histogram", "exclusions", "convergence",
              "pairwise", "address_map", "top_contents")
"""Every table of a scan but ``stages`` (timings, and where stage 1 ran)."""


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    """The fingerprint file of a copy of vm-b.raw that is then deleted: the answer rests on
    the file alone (its content hashes), as on a machine without the dump."""
    folder = tmp_path_factory.mktemp("seed")
    dump = Path(shutil.copy(VM_B, folder / "x.raw"))
    out = runner.invoke(app, ["fingerprint", str(dump), "-o", str(folder / "fp"), "-q"])
    assert out.exit_code == 0, out.output
    dump.unlink()
    return folder / "fp" / ("x.raw" + fpfile.SUFFIX)


def _one_line_exit_1(*args: str | Path, names: Path) -> str:
    out = runner.invoke(app, [*map(str, args)])
    assert out.exit_code == 1, out.output
    assert out.exception is None or isinstance(out.exception, SystemExit), repr(out.exception)
    assert out.output.count("\n") == 1 and str(names) in out.output, out.output
    assert "Traceback" not in out.output
    return out.output


# -- class 1: a damaged fingerprint file is never read as a raw image ------------------------


@pytest.mark.parametrize("name", ["cut" + fpfile.SUFFIX, "cut.bin"])
def test_a_fingerprint_file_cut_at_4_kib_is_not_a_raw_image(tmp_path, seed, name):
    """Before: exit 0 and a 'raw 4 KiB' input. Named like one or starting with PAR1, it is
    a fingerprint file cut short: one line, exit 1."""
    cut = tmp_path / name
    cut.write_bytes(seed.read_bytes()[:4096])
    line = _one_line_exit_1("scan", cut, "-q", names=cut)
    assert "truncated" in line and "raw" not in line.split(":", 1)[1]
    for command in (["plan", cut, "--host-memory", "64GiB", "-q"], ["info", cut]):
        _one_line_exit_1(*command, names=cut)
    line = _one_line_exit_1("info", cut, "--format", "raw", names=cut)
    assert "not a memory dump" in line


def test_a_file_named_like_a_fingerprint_file_is_never_a_dump(tmp_path):
    """A raw image renamed *.ksmfp.parquet is refused, with or without --format raw."""
    fake = Path(shutil.copy(VM_B, tmp_path / ("vm-b" + fpfile.SUFFIX)))
    _one_line_exit_1("scan", fake, "-q", names=fake)
    _one_line_exit_1("scan", fake, "--format", "raw", "-q", names=fake)
    _one_line_exit_1("info", fake, "--format", "raw", names=fake)


def test_a_parquet_file_that_is_not_a_fingerprint_file(tmp_path):
    other = tmp_path / "data.parquet"
    pq.write_table(pa.table({"addr": pa.array([0], pa.uint64())}), other)
    line = _one_line_exit_1("scan", other, "-q", names=other)
    assert "not a fingerprint file" in line


def _answer(path: Path) -> dict:
    result = analyze([path], jobs=1).to_dict()
    return {name: result[name] for name in PREDICTION}


def _same_prints(a: list, b: list) -> bool:
    """Whether two loads gave the same inputs, every field (arrays element by element; of
    the source, all but ``file``, which is where each was loaded from)."""
    def fields(fp):
        for f in dataclasses.fields(fp):
            value = getattr(fp, f.name)
            yield ({k: v for k, v in value.items() if k != "file"}
                   if f.name == "source" and isinstance(value, dict) else value)
    return len(a) == len(b) and all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
        for fa, fb in zip(a, b, strict=True) for x, y in zip(fields(fa), fields(fb), strict=True))


def test_every_flipped_byte_errors_or_leaves_the_answer(tmp_path, seed):
    """Before: 7 of 1,916 flips gave another answer with exit 0. Every byte of the footer
    (schema, metadata, digest) and every 4th byte of the pages, XOR 0x01 or 0xff: an
    error of one line naming the file, or the same inputs loaded (so the same answer: the
    dump is gone, the scan rests on them alone), and the same scan for every 10th of those."""
    data = seed.read_bytes()
    footer = int.from_bytes(data[-8:-4], "little") + 8
    offsets = sorted(set(range(0, len(data) - footer, 4)) | set(range(len(data) - footer,
                                                                       len(data))))
    prints, expected = fpfile.load(seed), _answer(seed)
    path = tmp_path / ("f" + fpfile.SUFFIX)
    errors = same = 0
    for at in offsets:
        for mask in (0x01 if at % 2 else 0xFF,):
            flipped = bytearray(data)
            flipped[at] ^= mask
            path.write_bytes(flipped)
            try:
                loaded = fpfile.load(path)
            except KsmAnalyzeError as e:
                assert str(e).startswith(str(path)) and "\n" not in str(e), (at, str(e))
                errors += 1
                continue
            assert _same_prints(loaded, prints), f"byte {at} ^ {mask:#x} changed the inputs"
            if same % 10 == 0:
                assert _answer(path) == expected, f"byte {at} ^ {mask:#x} changed the answer"
            same += 1
    assert errors and same and errors + same == len(offsets)


def test_a_damaged_page_fails_its_checksum(tmp_path, seed):
    """Page checksums are written and checked as the file is read: a flip inside the first
    column's data page is caught by Parquet's CRC before the digest is even computed."""
    meta = pq.ParquetFile(seed).metadata.row_group(0).column(0)
    at = meta.data_page_offset + meta.total_compressed_size // 2
    flipped = bytearray(seed.read_bytes())
    flipped[at] ^= 0xFF
    path = tmp_path / ("f" + fpfile.SUFFIX)
    path.write_bytes(flipped)
    with pytest.raises(DumpFormatError, match=r"(?i)crc|checksum"):
        fpfile.load(path)


def test_columns_changed_with_the_metadata_kept_fail_the_digest(tmp_path, seed):
    """A file rewritten whole by another tool (valid Parquet, valid checksums) whose prefix
    column is no longer what was fingerprinted (one bit of one hash): only the digest can
    tell."""
    table = pq.read_table(seed)
    prefix = table.column("prefix").to_numpy().copy()
    prefix[0] ^= 1
    path = tmp_path / ("f" + fpfile.SUFFIX)
    pq.write_table(table.set_column(1, "prefix", pa.array(prefix)), path)
    with pytest.raises(DumpFormatError, match="do not match its digest"):
        fpfile.load(path)


# -- files of the previous version -------------------------------------------------------------


def test_a_file_without_a_digest_is_refused_with_what_to_do(tmp_path, seed):
    """What ksm-analyze before this change wrote: version 1, no digest, no page checksums."""
    table = pq.read_table(seed)
    meta = json.loads(table.schema.metadata[fpfile.META_KEY])
    meta["version"] = 1
    path = tmp_path / ("old" + fpfile.SUFFIX)
    pq.write_table(table.replace_schema_metadata({fpfile.META_KEY: json.dumps(meta)}), path)
    line = _one_line_exit_1("scan", path, "-q", names=path)
    assert "no integrity digest" in line and "fingerprint its dump again" in line


# -- classes 7, 12, 15: metadata parsed with bounds ---------------------------------------------


def _resigned(seed: Path, path: Path, change) -> Path:
    """``seed`` with its metadata changed by ``change`` (on the decoded JSON, or a function
    of its text) and a digest that matches: what a hostile writer can make."""
    table = pq.read_table(seed)
    raw = table.schema.metadata[fpfile.META_KEY]
    if callable(change):
        raw = change(raw.decode()).encode()
    else:
        meta = json.loads(raw)
        for where, value in change.items():
            *parents, last = where.split(".")
            node = meta
            for key in parents:
                node = node[int(key) if isinstance(node, list) else key]
            node[int(last) if isinstance(node, list) else last] = value
        raw = json.dumps(meta).encode()
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    pq.write_table(table.replace_schema_metadata(
        {fpfile.META_KEY: raw, fpfile.DIGEST_KEY: fpfile.digest(raw, columns).encode()}), path)
    return path


def test_a_resigned_unchanged_file_loads(tmp_path, seed):
    """The rewriting the hostile cases use keeps a valid file valid: their errors come
    from the change, not from the rewriting. A label outside the BMP (a surrogate pair in
    JSON) is text, and loads."""
    path = _resigned(seed, tmp_path / ("f" + fpfile.SUFFIX), {})
    assert _answer(path) == _answer(seed)
    path = _resigned(seed, path, {"inputs.0.extents": [[0, 512, 0, 0, "\U0001f600", 0]]})
    assert fpfile.load(path)[0].extents[0].label == "\U0001f600"


def _with_addrs(seed: Path, path: Path, change) -> Path:
    """``seed`` with its ``addr`` column changed by ``change`` and a digest that matches."""
    table = pq.read_table(seed)
    addr = change(table.column("addr").to_numpy().copy())
    table = table.set_column(table.schema.get_field_index("addr"), "addr",
                             pa.array(addr, pa.uint64()))
    raw = table.schema.metadata[fpfile.META_KEY]
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    pq.write_table(table.replace_schema_metadata(
        {fpfile.META_KEY: raw, fpfile.DIGEST_KEY: fpfile.digest(raw, columns).encode()}), path)
    return path


def test_addresses_may_come_in_any_order_but_each_once(tmp_path, seed):
    # load checks addresses saved in order without sorting them; any other order is
    # checked by sorting, and a repeated address is refused either way.
    def swapped(a):
        a[[0, 1]] = a[[1, 0]]
        return a

    def repeated(a):
        a[1] = a[0]
        return a

    def repeated_out_of_order(a):
        a[[0, 1, 2]] = a[[2, 2, 0]]
        return a

    path = _with_addrs(seed, tmp_path / ("a" + fpfile.SUFFIX), swapped)
    addrs = fpfile.load(path)[0].addrs
    assert addrs[0] > addrs[1] and len(np.unique(addrs)) == len(addrs)
    for change in (repeated, repeated_out_of_order):
        path = _with_addrs(seed, tmp_path / ("b" + fpfile.SUFFIX), change)
        with pytest.raises(DumpFormatError, match="an address that is not one stored page"):
            fpfile.load(path)


def _addr_extent(value):
    return {"inputs.0.extents": [[value, 512, 0, 0, "raw image", 0]]}


HOSTILE = {
    # class 7: one extent of 2^50 pages in a 5.7 KB file was a "4.1e+03 PiB" guest
    "2^50 pages": {"inputs.0.extents": [[0, 512, 0, 0, "raw image", 0],
                                        [512 * 4096, 1 << 50, 1, -1, "", 0]]},
    "zero inputs": {"inputs": []},
    # class 12: each a traceback before
    "deep nesting": lambda text: text.replace('"info": {', '"info": {"x": ' + "[" * 100_000
                                              + "]" * 100_000 + ", ", 1),
    "negative address": _addr_extent(-4096),
    "address 2^64": _addr_extent(1 << 64),
    "1e400 in an extent": lambda text: text.replace("[[0, 512,", "[[1e400, 512,", 1),
    "float address": lambda text: text.replace("[[0, 512,", "[[0.0, 512,", 1),
    "NaN": lambda text: text.replace('"rows": 512', '"rows": NaN', 1),
    "prefix_bytes 1e400": lambda text: text.replace('"prefix_bytes": 128',
                                                    '"prefix_bytes": 1e400'),
    "prefix_bytes 2^70": {"inputs.0.prefix_bytes": 1 << 70},
    "source size 1e400": lambda text: text.replace('"size": ', '"size": 1e400, "x": ', 1),
    "source size 2^70": {"source.size": 1 << 70},
    "negative source size": {"source.size": -1},
    "page size 2^70": {"inputs.0.page_size": 1 << 70},
    "rows true": {"inputs.0.rows": True},
    "name not a string": {"inputs.0.name": 5},
    "warnings a string": {"inputs.0.warnings": "abc"},
    "kernel not a string": {"inputs.0.info": {"kernel": 6}},
    "info a list": {"inputs.0.info": []},
    "huge number in info": {"inputs.0.info": {"x": 1 << 80}},
    "overlapping extents": {"inputs.0.extents": [[0, 512, 0, 0, "", 0], [4096, 1, 1, -1, "", 0]]},
    "unaligned extent": _addr_extent(1),
    "bad state": {"inputs.0.extents": [[0, 512, 9, 0, "", 0]]},
    "bad flags": {"inputs.0.extents": [[0, 512, 0, 0, "", 1 << 40]]},
    "short extent": {"inputs.0.extents": [[0, 512, 0]]},
    "missing source": lambda text: text.replace('"source"', '"elsewhere"', 1),
    "metadata a list": lambda text: "[" + text + "]",
    "version 3": {"version": 3},
    "base_address -1": {"options.base_address": -1},
    "lone surrogate": {"inputs.0.warnings": ["\ud800"]},
    "lone surrogate in a label": {"inputs.0.extents": [[0, 512, 0, 0, "\udc00", 0]]},
}


@pytest.mark.parametrize("change", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_metadata_with_a_valid_digest_is_one_line(tmp_path, seed, change):
    path = _resigned(seed, tmp_path / ("f" + fpfile.SUFFIX), change)
    line = _one_line_exit_1("scan", path, "-q", names=path)
    assert "fingerprint file" in line
    with pytest.raises(DumpFormatError):
        fpfile.load(path)
    with pytest.raises(DumpFormatError):
        fpfile.metadata(path)


@pytest.mark.parametrize("command", [["plan", "--host-memory", "64GiB"], ["info"], ["report", "-o", "REPORT"]])
def test_zero_inputs_is_one_line_for_every_command(tmp_path, seed, command):
    """``plan`` of a zero-input file was a KeyError traceback (class 15)."""
    path = _resigned(seed, tmp_path / ("f" + fpfile.SUFFIX), {"inputs": []})
    args = [str(tmp_path / "r") if a == "REPORT" else a for a in command]
    line = _one_line_exit_1(args[0], path, *args[1:], names=path)
    assert "no inputs" in line


def test_a_poisoned_cache_entry_is_rewritten_not_a_crash(tmp_path, seed):
    """Class 12 through --cache: an entry with 1e400 in an extent (and a matching digest)
    was an OverflowError on every run. Now it is a miss: the dump is read again, the answer
    is the dump's, and the entry is rewritten into one that loads."""
    dump = Path(shutil.copy(VM_B, tmp_path / "x.raw"))
    cache = tmp_path / "cache"
    out = runner.invoke(app, ["scan", str(dump), "--cache", str(cache), "--json", "-q"])
    assert out.exit_code == 0, out.output
    (entry,) = cache.iterdir()
    _resigned(entry, entry, lambda text: text.replace("[[0, 512,", "[[1e400, 512,", 1))
    with pytest.raises(DumpFormatError):
        fpfile.load(entry)
    again = runner.invoke(app, ["scan", str(dump), "--cache", str(cache), "--json", "-q"])
    assert again.exit_code == 0, again.output
    first, second = json.loads(out.stdout), json.loads(again.stdout)
    assert {k: first[k] for k in PREDICTION} == {k: second[k] for k in PREDICTION}
    assert len(fpfile.load(entry)[0].addrs) == 512  # vm-b.raw: 2 MiB of 4 KiB pages


@pytest.mark.parametrize("order", ["in order", "out of order"])
def test_a_repeated_address_is_refused(tmp_path, seed, order):
    """Addresses are checked distinct by one comparison when they increase (as stage 1
    writes them), by a sort when not: a repeat is found either way."""
    table = pq.read_table(seed)
    addr = table.column("addr").to_numpy().copy()
    addr[1] = addr[0]  # in order: 0, 0, 8192...
    if order == "out of order":
        addr[[0, 2]] = addr[[2, 0]]  # 8192, 0, 0...
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    columns["addr"] = addr
    raw = table.schema.metadata[fpfile.META_KEY]
    path = tmp_path / ("f" + fpfile.SUFFIX)
    pq.write_table(pa.table(columns).replace_schema_metadata(
        {fpfile.META_KEY: raw, fpfile.DIGEST_KEY: fpfile.digest(raw, columns).encode()}), path)
    with pytest.raises(DumpFormatError, match="an address that is not one stored page"):
        fpfile.load(path)
