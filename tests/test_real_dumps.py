"""Real dumps of one paused QEMU/TCG guest: every reader must see the same RAM.

One 256 MiB guest (Debian cloud kernel + busybox initramfs) is booted, paused, and dumped as
ELF (``dump-guest-memory``), flattened kdump (``dump-guest-memory -z``), one ``pmemsave`` of
all RAM, and one ``pmemsave`` per ELF segment. The same pages must come out of each.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess

import numpy as np
import pytest
import xxhash

from ksm_analyze import DumpFormat, analyze, open_dump
from ksm_analyze.pages import PageState
from qemu_guest import Guest, ensure_guest_assets, qemu_available

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 is not installed"),
]
MEM = 256 << 20


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    with Guest(ensure_guest_assets(), mem_mib=MEM >> 20, cmdline_extra="ksmfill=1:8:4",
               workdir=d) as guest:
        guest.pause()
        elf = guest.dump_elf(d / "guest.elf")
        kdump = guest.dump_kdump_zlib(d / "guest.kdump")
        raw = guest.pmemsave(0, MEM, d / "guest.raw")
        with open_dump(elf) as r:
            segments = [(e.addr, e.npages * r.page_size) for e in r.data_extents()]
        pieces = [guest.pmemsave(a, n, d / f"piece-{a:x}.raw") for a, n in segments]
    return {"elf": elf, "kdump": kdump, "raw": raw, "pieces": pieces, "segments": segments}


def page_map(path, fmt=None) -> dict[int, tuple[bool, int]]:
    """address -> (all zero, xxh3-128 of the bytes), for every page the dump holds."""
    out = {}
    with open_dump(path, fmt) as r:
        for e in r.extents:
            if e.state == PageState.ZERO:
                for i in range(e.npages):
                    out[e.addr + i * r.page_size] = (True, 0)
        for batch in r.iter_batches():
            flagged = [False] * len(batch.addrs) if batch.zero is None else batch.zero.tolist()
            for addr, page, known_zero in zip(batch.addrs.tolist(), batch.pages, flagged,
                                              strict=True):
                zero = known_zero or not page.any()  # a zero page the format flags is not read
                out[addr] = (zero, 0 if zero else xxhash.xxh3_128_intdigest(page.tobytes()))
    return out


def test_formats_are_detected(real):
    for key, fmt in (("elf", DumpFormat.ELF), ("kdump", DumpFormat.KDUMP),
                     ("raw", DumpFormat.RAW)):
        with open_dump(real[key]) as r:
            assert r.format is fmt


def test_elf_and_kdump_hold_the_same_pages(real):
    elf, kdump = page_map(real["elf"]), page_map(real["kdump"])
    assert len(elf) > 60000
    assert elf == kdump


def test_pmemsave_holds_the_same_ram(real):
    elf, raw = page_map(real["elf"]), page_map(real["raw"])
    common = [a for a in elf if a < MEM]
    assert len(common) > 60000
    assert all(raw[a] == elf[a] for a in common)


def test_scan_reports_the_same_counts_and_counters(real):
    elf = analyze(real["elf"])
    kdump = analyze(real["kdump"])
    bases = [a for a, _ in real["segments"]]
    pieces = analyze(real["pieces"], format="raw", base_address=bases)
    cols = ["nonzero_pages", "zero_pages"]
    assert elf.per_input[cols].sum().tolist() == kdump.per_input[cols].sum().tolist()
    assert elf.per_input[cols].sum().tolist() == pieces.per_input[cols].sum().tolist()
    for other in (kdump, pieces):
        assert elf.host.equals(other.host)
        assert elf.histogram.equals(other.histogram)
    # The guest wrote 8 MiB of fill, each page 4 times: at least 512 contents x 4 copies.
    assert elf.counters.pages_sharing >= 512 * 3
    assert elf.per_input["zero_pages"].iloc[0] > 0


@pytest.mark.skipif(shutil.which("makedumpfile") is None, reason="makedumpfile is not installed")
def test_plain_kdump_reassembled_by_makedumpfile_reads_the_same(real, tmp_path):
    # makedumpfile -R turns QEMU's flattened output into the plain kdump-compressed form.
    plain = tmp_path / "guest.plain.kdump"
    with open(real["kdump"], "rb") as flattened:
        subprocess.run(["makedumpfile", "-R", str(plain)], stdin=flattened, check=True,
                       capture_output=True)
    with open_dump(plain) as r:
        assert r.format is DumpFormat.KDUMP
        assert r.info()["flattened"] is False
    assert page_map(plain) == page_map(real["kdump"])
    assert analyze(plain).host.equals(analyze(real["kdump"]).host)


def test_kdump_zero_pages_are_counted_without_reading(real):
    with open_dump(real["kdump"]) as r:
        flagged = sum(int(b.zero.sum()) for b in r.iter_batches() if b.zero is not None)
        assert r.info()["zero_pages"] == flagged
    elf = analyze(real["elf"])
    assert flagged == int(elf.per_input["zero_pages"].iloc[0])
    assert flagged > 1000
    assert np.isfinite(elf.counters.general_profit)


def test_a_gzip_of_the_elf_predicts_the_same(real, tmp_path):
    # KubeVirt's memory dumps arrive as .gz: the same guest, wrapped, gives the same answer.
    wrapped = tmp_path / "guest.elf.gz"
    with open(real["elf"], "rb") as src, gzip.open(wrapped, "wb", compresslevel=1) as out:
        shutil.copyfileobj(src, out, 1 << 22)
    elf, gz = analyze(real["elf"]), analyze(wrapped)
    cols = ["nonzero_pages", "zero_pages"]
    assert elf.per_input[cols].sum().tolist() == gz.per_input[cols].sum().tolist()
    assert elf.host.equals(gz.host) and elf.histogram.equals(gz.histogram)
    assert elf.counters == gz.counters
