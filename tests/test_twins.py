"""Warnings where a number can mislead: the same guest given twice or in two formats, and
the address ranges one format holds and another does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PS, ROOT, SAMPLES, runner

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.formats import open_dump
from ksm_analyze.pages import PageState

ELF = ROOT / "sample_dumps" / "vm-a.elf"
ELF_DATA = 0x460, 0x3460000, 512  # file offset, guest address, pages of its one PT_LOAD ('info')
ROM_PAGES = 64  # what a pmemsave image holds and the ELF dump leaves out: 256 KiB


def _nonzero_pages_of_the_elf() -> int:
    """Counted from the file's bytes, not by the code under test."""
    offset, _, pages = ELF_DATA
    data = np.frombuffer(ELF.read_bytes()[offset:offset + pages * PS], np.uint8)
    return int(data.reshape(pages, PS).any(axis=1).sum())


@pytest.fixture(scope="module")
def pmemsave(tmp_path_factory) -> tuple[Path, int]:
    """The guest of sample_dumps/vm-a.elf as a raw (pmemsave-like) image, DERIVED from that
    real dump: its pages read with the reader's API, after 64 pages of a stand-in ROM (random
    bytes) that the ELF dump does not hold. Returns the image and its base address."""
    _, addr, pages = ELF_DATA
    with open_dump(ELF) as reader:
        (extent,) = [e for e in reader.extents if e.state == PageState.DATA]
        assert (extent.addr, extent.npages) == (addr, pages)
        guest = reader.read_pages(np.uint64(addr) + np.arange(pages, dtype=np.uint64)
                                  * np.uint64(PS))
    rom = np.random.default_rng(5).integers(1, 256, (ROM_PAGES, PS), dtype=np.uint8)
    path = tmp_path_factory.mktemp("pmemsave") / "vm-a-pmemsave.raw"
    np.concatenate([rom, guest]).tofile(path)
    return path, addr - ROM_PAGES * PS


def _json(command: str, *args: str) -> dict:
    r = runner.invoke(app, [command, *args, "--json", "-q"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _twin_warning(small: str, big: str, nonzero: int) -> str:
    return (f"{small} and {big} are nearly the same input: 100% of the {nonzero} non-zero "
            f"pages ({nonzero * 4} KiB) of {small} are also in {big}.")


def test_the_same_guest_given_twice_is_named_in_scan_and_plan(tmp_path):
    copy = shutil.copy(ELF, tmp_path / "vm-a-again.elf")
    inputs = [str(ELF), str(copy)]
    want = _twin_warning("vm-a.elf", "vm-a-again.elf", _nonzero_pages_of_the_elf())
    text = runner.invoke(app, ["scan", *inputs, "-q"]).stdout
    assert [line for line in text.splitlines() if line.startswith("Warning: " + want)]
    assert any(w.startswith(want) for w in _json("scan", *inputs)["warnings"])
    # Before the projection, whose figure it makes too hopeful.
    plan = ["plan", *inputs, "--host-memory", "64MiB", "--project", "10"]
    assert any(w.startswith(want) for w in _json(*plan)["warnings"])
    text = runner.invoke(app, [*plan, "-q"]).stdout
    assert "Warning: " + want in text
    assert text.index("inputs like these fit") < text.index("Warning: " + want)


def test_one_guest_in_two_formats_says_which_ranges_one_holds(pmemsave):
    raw, base = pmemsave
    warnings = analyze([ELF, raw], base_address=(0, base), jobs=1).warnings
    nonzero = _nonzero_pages_of_the_elf()
    assert warnings[0].startswith(_twin_warning("vm-a.elf", "vm-a-pmemsave.raw", nonzero))
    end = ELF_DATA[1] - 1
    assert warnings[1].startswith(
        f"vm-a-pmemsave.raw holds 64 pages (256 KiB) that vm-a.elf does not: "
        f"{base:#x}-{end:#x} (256 KiB). One format covers address ranges the other leaves out")
    assert len(warnings) == 2  # the ELF holds nothing the image does not


def test_distinct_guests_are_not_flagged():
    # The two samples share about half their non-zero pages (pairwise: 52 of 93, 51 of 93).
    assert analyze(SAMPLES, jobs=1).warnings == []


@pytest.mark.parametrize(("shared", "flagged"), [(90, True), (89, False)])
def test_the_threshold_is_90_percent_of_the_smaller_input(tmp_path, shared, flagged):
    # A: 100 distinct non-zero pages; B: 400, `shared` of them and the rest its own.
    rng = np.random.default_rng(shared)
    a = rng.integers(0, 256, (100, PS), dtype=np.uint8)
    b = np.concatenate([a[:shared], rng.integers(0, 256, (400 - shared, PS), dtype=np.uint8)])
    a.tofile(tmp_path / "a.raw")
    b.tofile(tmp_path / "b.raw")
    warnings = analyze([tmp_path / "a.raw", tmp_path / "b.raw"], jobs=1).warnings
    assert bool(warnings) is flagged
    if flagged:  # same address ranges at the start: b holds 300 more pages after a's 100
        assert warnings[0].startswith("a.raw and b.raw are nearly the same input: 90% of the "
                                      "100 non-zero pages (400 KiB) of a.raw are also in b.raw")
        assert warnings[1].startswith("b.raw holds 300 pages (1.17 MiB) that a.raw does not: "
                                      "0x64000-0x18ffff (1.17 MiB)")
