"""--compress (issue 22, part 1): the pages KSM leaves, compressed and priced as zram and
zswap store them. Expected figures come from the codecs called here, page by page, on bytes
this file reads itself, and from the kernel rules written out again below (zsmalloc's size
classes, zram's same-filled and huge pages, zswap's rejected pages)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lz4.block
import numpy as np
import pytest
import zstandard
from typer.testing import CliRunner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.whatif.compression import zsmalloc_sizes

ROOT = Path(__file__).resolve().parent.parent
PS = 4096
runner = CliRunner()


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


# -- the kernel's rules, written out again (mm/zsmalloc.c zs_create_pool, zs_malloc) ---------

def _zs_object_bytes(length: int, chain: int = 8) -> int:
    """zsmalloc's bytes for an object of ``length``: the class serving length + 8, after the
    classes are merged from the largest down."""
    sizes = [*range(32, PS, 16), PS]  # ZS_MIN_ALLOC_SIZE, ZS_SIZE_CLASS_DELTA
    serving = {}
    above = None
    for size in reversed(sizes):
        if size & (size - 1) == 0:
            pages = 1
        else:
            wastes = [(i * PS % size, i) for i in range(1, chain + 1)]
            pages = min(wastes)[1]  # least waste, fewest pages on a tie
        shape = (pages, pages * PS // size)
        if above is not None and above[1] == shape:
            serving[size] = above[0]
        else:
            above = (size, shape)
            serving[size] = size
    want = length + 8
    fits = [s for s in sizes if s >= want]
    return serving[fits[0] if fits else PS]


def _huge_class_size(chain: int = 8) -> int:
    for size in reversed([*range(32, PS, 16), PS]):
        if size & (size - 1):
            pages = min((i * PS % size, i) for i in range(1, chain + 1))[1]
            if pages != 1 and pages * PS // size != 1:
                return size - 7
    raise AssertionError


def test_zsmalloc_classes_are_the_kernels():
    alloc, huge = zsmalloc_sizes(PS)
    # huge_class_size: 3264 - 7 with 4-page zspages (before 6.3), 3632 - 7 with the default
    # CONFIG_ZSMALLOC_CHAIN_SIZE of 8 ("zsmalloc: set default zspage chain size to 8").
    assert huge == 3625 == _huge_class_size(8)
    assert zsmalloc_sizes(PS, 4)[1] == 3257 == _huge_class_size(4)
    # By hand: 1 + 8 bytes fit the smallest class, 32; 100 + 8 = 108 -> the 112 class (7
    # pages hold 256 of them exactly; 128 above is a power of two, 1 page: not merged).
    assert alloc[1] == 32 and alloc[24] == 32 and alloc[25] == 48 and alloc[100] == 112
    assert alloc[PS] == PS and alloc[huge] == PS
    for length in (1, 57, 100, 1000, 2047, 3000, 3500, huge - 1, huge, PS - 1):
        assert alloc[length] == _zs_object_bytes(length), length


# -- expected figures from the codecs called directly ----------------------------------------

def _pages(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i:i + PS] for i in range(0, len(data) - PS + 1, PS)]


def _length(page: bytes, codec: str) -> int:
    if codec == "lz4":
        return len(lz4.block.compress(page, mode="default", store_size=False))
    return len(zstandard.ZstdCompressor(level=3).compress(page))


def _expected(pages: list[bytes], codec: str) -> dict[str, int]:
    """The kernel's figures for what KSM leaves of ``pages``: each non-zero content once."""
    distinct = {p for p in pages if any(p)}
    huge = _huge_class_size()
    out = {"distinct_pages": len(distinct), "codec_bytes": 0, "zram_bytes": 0,
           "zswap_bytes": 0, "same_filled_pages": 0, "zram_huge_pages": 0,
           "zswap_rejected_pages": 0}
    for p in distinct:
        n = _length(p, codec)
        words = {p[i:i + 8] for i in range(0, PS, 8)}
        out["codec_bytes"] += n
        if len(words) == 1:  # page_same_filled: a flag, no storage
            out["same_filled_pages"] += 1
        elif n >= huge:  # stored whole (ZRAM_HUGE)
            out["zram_huge_pages"] += 1
            out["zram_bytes"] += PS
        else:
            out["zram_bytes"] += _zs_object_bytes(n)
        if n >= PS:  # zswap: not stored compressed, a page of memory
            out["zswap_rejected_pages"] += 1
            out["zswap_bytes"] += PS
        else:
            out["zswap_bytes"] += _zs_object_bytes(n)
    return out


def _rows(paths, *options: str) -> list[dict]:
    r = runner.invoke(app, ["scan", *map(str, paths), "--json", "-q", *options])
    assert r.exit_code == 0, r.output
    return _strict(r.stdout)["compression"]


def _check(row: dict, want: dict[str, int], pages: int) -> None:
    for key, value in want.items():
        assert row[key] == value, key
    assert row["pages"] == pages and row["bytes"] == pages * PS
    assert row["compressed_pages"] == want["distinct_pages"]
    assert row["zram_ratio"] == pytest.approx(want["distinct_pages"] * PS / want["zram_bytes"])
    assert row["zram_combined_ratio"] == pytest.approx(pages * PS / want["zram_bytes"])


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_a_real_guest_is_priced_as_the_codec_alone_says(codec):
    dump = ROOT / "sample_dumps" / "vm-b.raw"
    rows = _rows([dump], "--compress", codec)
    assert [r["input"] for r in rows] == [str(dump), "host"]
    pages = _pages(dump)
    want = _expected(pages, codec)
    assert want["distinct_pages"] > 50  # the sample guest's pages, not a trivial case
    for row in rows:  # one input: its row and the host's are the same pages
        _check(row, want, len(pages))
    name = "lz4" if codec == "lz4" else "zstd"
    assert rows[0]["codec"].startswith(f"{name} (")
    assert ("level 3" if codec == "zstd" else "acceleration 1") in rows[0]["codec"]


def _crafted(tmp_path: Path) -> tuple[Path, Path]:
    """Two dumps: zero pages, same-filled pages (a byte, an 8-byte word), random pages
    (zram: huge; zswap: rejected), text pages, and pages shared within and across them."""
    rng = np.random.default_rng(7)
    text = b"".join(b"line %06d of a log nobody reads\n" % i for i in range(2000))
    def page(i: int) -> bytes:
        return (text[i * 97:] + text)[:PS]
    random = [rng.integers(0, 256, PS, dtype=np.uint8).tobytes() for _ in range(5)]
    a = [bytes(PS), b"\x41" * PS, (b"\x01\x02\x03\x04\x05\x06\x07\x08") * (PS // 8),
         random[0], random[1], random[1], page(0), page(1), page(1), page(2), bytes(PS)]
    b = [random[1], random[2], page(2), page(3), b"\x41" * PS, random[3], bytes(PS),
         (b"\xff" * 4088) + b"\x00" * 8]  # almost same-filled: not same-filled
    paths = []
    for name, pages in (("a.raw", a), ("b.raw", b)):
        path = tmp_path / name
        path.write_bytes(b"".join(pages))
        paths.append(path)
    return paths[0], paths[1]


def test_crafted_pages_counted_as_the_kernel_does(tmp_path):
    a, b = _crafted(tmp_path)
    rows = _rows([a, b], "--compress", "lz4")
    pa, pb = _pages(a), _pages(b)
    want_a, want_b, want_host = _expected(pa, "lz4"), _expected(pb, "lz4"), \
        _expected(pa + pb, "lz4")
    # By hand: a holds 2 same-filled contents, 2 random (huge, rejected), 3 text contents;
    # b 2 random of its own + 1 shared with a, 2 text, 1 same-filled shared with a, and the
    # almost-same-filled page. The host: 2 same-filled, 4 random, 4 text, 1 almost.
    assert (want_a["same_filled_pages"], want_a["zram_huge_pages"],
            want_a["zswap_rejected_pages"], want_a["distinct_pages"]) == (2, 2, 2, 7)
    assert (want_b["same_filled_pages"], want_b["zram_huge_pages"],
            want_b["distinct_pages"]) == (1, 3, 7)
    assert (want_host["same_filled_pages"], want_host["zram_huge_pages"],
            want_host["distinct_pages"]) == (2, 4, 11)
    _check(rows[0], want_a, len(pa))
    _check(rows[1], want_b, len(pb))
    _check(rows[2], want_host, len(pa) + len(pb))
    assert rows[2]["dedup_ratio"] == pytest.approx((len(pa) + len(pb)) / 11)


def test_the_api_and_the_text_say_the_same(tmp_path):
    a, b = _crafted(tmp_path)
    result = analyze([a, b], compress="zstd", jobs=1)
    host = result.compression.set_index("input").loc["host"]
    want = _expected(_pages(a) + _pages(b), "zstd")
    assert int(host["zram_bytes"]) == want["zram_bytes"]
    assert result.compressed is not None and result.compressed.codec.name == "zstd"
    # Any group of inputs priced from the kept sums: b alone is b's row.
    priced = result.compressed.price(result.contents, [1])
    assert int(priced[1]) == int(result.compression["zram_bytes"][1])
    r = runner.invoke(app, ["scan", str(a), str(b), "-q", "--compress", "zstd"])
    assert r.exit_code == 0, r.output
    assert "Compression of what KSM leaves: zstd (zstandard" in r.stdout
    assert "4 it stores" in r.stdout and "4 pages zswap rejects" in r.stdout
    plain = runner.invoke(app, ["scan", str(a), str(b), "-q"])
    assert "Compression" not in plain.stdout  # opt-in
    assert _strict(runner.invoke(app, ["scan", str(a), "--json", "-q"]).stdout)[
        "compression"] == []


def test_nothing_stored_is_a_null_ratio_in_strict_json(tmp_path):
    dump = tmp_path / "same.raw"
    dump.write_bytes(b"\x41" * PS + b"\x42" * PS + bytes(PS))
    row = _rows([dump], "--compress", "lz4")[-1]
    assert row["zram_bytes"] == 0 and row["same_filled_pages"] == 2
    assert row["zram_ratio"] is None and row["zram_combined_ratio"] is None
    assert row["zswap_bytes"] > 0  # zswap compresses same-filled pages that are not zero


def test_a_sample_names_its_size_and_an_interval(tmp_path):
    dump = ROOT / "sample_dumps" / "vm-b.raw"
    full = _rows([dump], "--compress", "lz4")[-1]
    # A sample as large as the pages left is every page: the exact figures.
    whole = _rows([dump], "--compress", "lz4", "--compress-sample", "100000")[-1]
    assert whole == full
    part = _rows([dump], "--compress", "lz4", "--compress-sample", "40")[-1]
    assert part["compressed_pages"] == 40 < full["distinct_pages"]
    assert part["distinct_pages"] == full["distinct_pages"]
    assert part["zram_ratio_low"] <= part["zram_ratio"] <= part["zram_ratio_high"]
    again = _rows([dump], "--compress", "lz4", "--compress-sample", "40")[-1]
    assert again == part  # a seeded draw: the same inputs, the same sample
    assert not math.isclose(part["zram_ratio_low"], part["zram_ratio_high"])


@pytest.mark.parametrize("options, message", [
    (["--compress", "gzip"], "unknown --compress 'gzip'"),
    (["--compress", "lz4", "--compress-sample", "-1"], "--compress-sample cannot be negative"),
    (["--compress-sample", "10"], "give --compress lz4 or --compress zstd too"),
])
def test_bad_option_values_exit_2(options, message):
    r = runner.invoke(app, ["scan", str(ROOT / "sample_dumps" / "vm-b.raw"), *options])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output


def test_a_fingerprint_file_without_its_dump_is_one_line_exit_1(tmp_path):
    dump = tmp_path / "g.raw"
    dump.write_bytes((ROOT / "sample_dumps" / "vm-b.raw").read_bytes())
    r = runner.invoke(app, ["fingerprint", str(dump), "-o", str(tmp_path / "fp"), "-q"])
    assert r.exit_code == 0, r.output
    dump.unlink()  # its bytes are nowhere now
    [fp] = (tmp_path / "fp").iterdir()
    r = runner.invoke(app, ["scan", str(fp), "-q", "--compress", "lz4"])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "--compress needs the pages' bytes" in lines[0]
    assert runner.invoke(app, ["scan", str(fp), "-q"]).exit_code == 0  # without: fine


def test_report_and_savings_get_the_zram_step(tmp_path):
    a, b = _crafted(tmp_path)
    r = runner.invoke(app, ["report", str(a), str(b), "-q", "--compress", "lz4",
                            "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "index.html").read_text()
    assert '<h2 id="compression">' in page and "python-lz4" in page
    want = _expected(_pages(a) + _pages(b), "lz4")["zram_bytes"]
    savings = (tmp_path / "rep" / "savings.csv").read_text().splitlines()
    [row] = [line for line in savings if line.startswith("compressed_zram,")]
    assert f",{want}," in row
    plain = runner.invoke(app, ["scan", str(a), "--json", "-q"])
    assert "compressed_zram" not in _strict(plain.stdout)["savings"]


def test_plan_counts_hosts_with_zram_too(tmp_path):
    samples = sorted(map(str, (ROOT / "sample_dumps").iterdir()))
    scan = _rows(samples, "--compress", "lz4")
    r = runner.invoke(app, ["plan", *samples, "--host-memory", "400KiB", "--compress", "lz4",
                            "--json", "-q", "--png", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    plan = _strict(r.stdout)
    # Uncompressed, each guest needs a host of its own (272 and 368 KiB after KSM); with
    # zram both fit one, whose footprint is scan's host row.
    [zram] = [s for s in plan["summary"] if s["method"] == "sharing_zram"]
    [sharing] = [s for s in plan["summary"] if s["method"] == "sharing"]
    assert (sharing["hosts"], zram["hosts"]) == (2, 1)
    [host] = plan["compressed_hosts"]
    assert host["zram_bytes"] == scan[-1]["zram_bytes"] == zram["memory_after_bytes"]
    assert sorted(host["inputs"]) == ["vm-a.elf", "vm-b.raw"]
    sampled = runner.invoke(app, ["plan", *samples, "--host-memory", "400KiB", "-q",
                                  "--compress", "lz4", "--compress-sample", "10"])
    assert sampled.exit_code == 2 and "drop --compress-sample" in sampled.output


def test_a_merging_policy_is_refused_not_priced_wrong():
    samples = sorted(map(str, (ROOT / "sample_dumps").iterdir()))
    r = runner.invoke(app, ["scan", *samples, "-q", "--compress", "lz4",
                            "--domain", "a=*vm-a*", "--domain", "b=*vm-b*"])
    assert r.exit_code == 2
    assert "not with samples over time, --domain, --numa-nodes or --merge zero-only" in r.output
