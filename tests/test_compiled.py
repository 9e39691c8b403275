"""The compiled kernels (ksm_analyze/hashing/_compiled.c) against the references they replace: the
xxhash library for hashes, numpy for zero pages and byte comparison."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest
import xxhash
from conftest import PS, ROOT, SAMPLES, runner
from hypothesis import given, settings
from hypothesis import strategies as st

from ksm_analyze import analyze
from ksm_analyze.cli import app
from ksm_analyze.hashing import compiled as kernels


def test_built():
    # CI installs with a C compiler; without one the numpy code runs, and these tests fail.
    assert kernels.native is not None, "ksm_analyze.hashing._compiled was not built (no C compiler?)"


def _pages(n: int, seed: int = 0, size: int = PS) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size), dtype=np.uint8)


@pytest.mark.parametrize("nbytes", [1, 3, 4, 8, 9, 16, 17, 64, 127, 128, 129, 240, 241, 1000,
                                    PS])
def test_prefix_hashes_are_xxh3_of_the_first_bytes(nbytes):
    pages = _pages(6)
    pages[2] = 0
    expect = [0 if not p.any() else xxhash.xxh3_64_intdigest(p[:nbytes].tobytes()) or 1
              for p in pages]
    assert kernels.prefix_hashes(pages, nbytes).tolist() == expect


@pytest.mark.parametrize("pos", [0, 1, 63, 64, 65, 2047, PS - 1])
def test_one_nonzero_byte_anywhere_makes_a_page_nonzero(pos):
    pages = np.zeros((3, PS), np.uint8)
    pages[1, pos] = 0x80
    hashes = kernels.prefix_hashes(pages, 128)
    assert hashes[0] == hashes[2] == 0
    assert hashes[1] != 0


@pytest.mark.parametrize("page_size", [64, 512, 65536])
def test_other_page_sizes(page_size):
    pages = _pages(3, size=page_size)
    pages[0] = 0
    pages[2, :] = 0
    pages[2, -1] = 1  # zero except its last byte
    out = kernels.prefix_hashes(pages, min(128, page_size))
    assert out[0] == 0
    assert out[2] == (xxhash.xxh3_64_intdigest(pages[2, :min(128, page_size)].tobytes()) or 1)


def test_skipped_pages_are_zero_and_not_read():
    pages = _pages(4)
    skip = np.array([False, True, False, True])
    out = kernels.prefix_hashes(pages, 128, skip)
    assert out[1] == out[3] == 0
    assert out[0] == xxhash.xxh3_64_intdigest(pages[0, :128].tobytes())


def test_pages_at_an_odd_offset_of_a_map(tmp_path):
    # An ELF segment may start at any file offset: a view one byte into a map.
    data = _pages(4).tobytes()
    path = tmp_path / "odd"
    path.write_bytes(b"\x01" + data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = np.frombuffer(mm, np.uint8, len(data), 1).reshape(4, PS)
        hashes = kernels.prefix_hashes(view, 128)
        assert hashes.tolist() == [xxhash.xxh3_64_intdigest(data[i * PS: i * PS + 128])
                                   for i in range(4)]
        reps = np.ascontiguousarray(view[[2, 0]])
        assert kernels.equal_rows(view, np.array([0, 1, 2, 3]), reps,
                                  np.array([1, 1, 0, 0])).tolist() == [True, False, True, False]
        assert kernels.page_hashes(view, np.array([3])).tolist() == [
            xxhash.xxh3_64_intdigest(data[3 * PS:])]
        del view, reps


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_equal_rows_and_page_hashes_match_numpy(data):
    n = data.draw(st.integers(1, 12))
    pool = _pages(3, seed=data.draw(st.integers(0, 100)))
    picks = np.array(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    pages = pool[picks].copy()
    for _ in range(data.draw(st.integers(0, 3))):  # flip single bits anywhere
        pages[data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, PS - 1))] ^= 1
    rows = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=20)))
    keys = np.array(data.draw(st.lists(st.integers(0, 2), min_size=len(rows),
                                       max_size=len(rows))))
    expect = (pages[rows] == pool[keys]).all(axis=1)
    assert kernels.equal_rows(pages, rows, pool, keys).tolist() == expect.tolist()
    assert kernels.page_hashes(pages, rows).tolist() == [
        xxhash.xxh3_64_intdigest(pages[r].tobytes()) for r in rows]


@pytest.mark.parametrize("bad", [-1, 4, 1 << 40])
def test_indices_outside_the_buffers_are_refused(bad):
    pages, reps = _pages(4), _pages(2)
    with pytest.raises(ValueError, match=r"rows\[1\] = .* is outside 0\.\.3"):
        kernels.equal_rows(pages, np.array([0, bad]), reps, np.array([0, 0]))
    with pytest.raises(ValueError, match=r"keys\[0\] = .* is outside 0\.\.1"):
        kernels.equal_rows(pages, np.array([0]), reps, np.array([bad]))
    with pytest.raises(ValueError, match="outside"):
        kernels.page_hashes(pages, np.array([bad]))


def test_mismatched_buffers_are_refused():
    native = kernels.native
    assert native is not None
    pages = _pages(2)
    with pytest.raises(ValueError, match="whole number"):
        native.prefix_hashes(pages.ravel()[:-1], PS, 128, None, np.empty(2, np.uint64))
    with pytest.raises(ValueError, match="one entry a page"):
        native.prefix_hashes(pages, PS, 128, None, np.empty(3, np.uint64))
    with pytest.raises(ValueError, match="nbytes"):
        native.prefix_hashes(pages, PS, PS + 1, None, np.empty(2, np.uint64))
    with pytest.raises(ValueError, match="same length"):
        native.equal_rows(pages, PS, np.array([0, 1]), pages, np.array([0]),
                          np.empty(2, np.bool_))
    with pytest.raises(ValueError, match="not C-contiguous"):  # never read with wrong strides
        native.prefix_hashes(pages[:, ::2], PS // 2, 16, None, np.empty(2, np.uint64))
    with pytest.raises(TypeError):  # read-only output
        native.page_hashes(pages, PS, np.array([0]), b"\0" * 8)


def test_stage_2_compares_in_place_through_the_kernel(tmp_path, monkeypatch):
    # A raw dump's candidates go through equal_rows (no gather copy), and the classes match
    # the numpy path's.
    calls = []
    equal_rows = kernels.equal_rows

    def spy(pages, rows, reps, keys):
        calls.append(len(rows))
        return equal_rows(pages, rows, reps, keys)

    monkeypatch.setattr(kernels, "equal_rows", spy)
    compiled = analyze(SAMPLES)
    assert sum(calls) > 0
    monkeypatch.setattr(kernels, "native", None)
    reference = analyze(SAMPLES)
    assert compiled.counters == reference.counters
    assert compiled.host.equals(reference.host)
    for row in ("prefix_candidates", "false_candidates", "full_compares", "full_hashes"):
        assert compiled.stages.loc[row].equals(reference.stages.loc[row]), row


def test_installs_and_runs_without_a_c_compiler(tmp_path):
    # `pip install .` on a machine without a compiler: the extension is optional, the wheel
    # builds without it, and the package runs its numpy code with the same prediction.
    # From the committed files only, as a fresh clone has them: not this checkout's built
    # extension or build folders.
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    env = {**os.environ, "CC": "/bin/false", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "wheel"), str(source)], env=env, check=True, timeout=300,
                   capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("ksm_analyze-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert not [n for n in z.namelist() if n.endswith(".so")]
        z.extractall(tmp_path / "site")
    code = ("import json, sys; import ksm_analyze.hashing.compiled as k; assert k.native is None, k; "
            "from ksm_analyze.cli import main; main()")
    # -S: no site hooks, so this checkout's editable install (and its extension) is not
    # found; the dependencies come from site-packages on the path.
    path = [str(tmp_path / "site"), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    out = subprocess.run([sys.executable, "-S", "-c", code, "scan", *SAMPLES, "--json"],
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True)
    compiled = runner.invoke(app, ["scan", *SAMPLES, "--json"])
    assert compiled.exit_code == 0
    without, with_kernels = json.loads(out.stdout), json.loads(compiled.stdout)
    for run in (without, with_kernels):
        run["stages"].pop("stage1_seconds"), run["stages"].pop("stage2_seconds")
    assert without == with_kernels
