"""The compiled kernels (ksm_analyze/hashing/_compiled.c) against the references they replace: the
xxhash library for hashes, numpy for zero pages and byte comparison."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

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
    # CI installs with a C compiler. Without one the numpy code runs, the tests marked
    # `compiled` skip, and this one fails to say so; KSM_ANALYZE_NO_KERNELS asks for the
    # numpy code on purpose, and then this one skips too.
    if os.environ.get(kernels.SWITCH, "0") not in ("", "0"):
        pytest.skip(f"{kernels.numpy_reason}: the numpy code on purpose")
    assert kernels.native is not None, (
        f"compiled kernels not built (no C compiler at install time?): {kernels.numpy_reason}")


def _pages(n: int, seed: int = 0, size: int = PS) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size), dtype=np.uint8)


@pytest.mark.compiled
@pytest.mark.parametrize("nbytes", [1, 3, 4, 8, 9, 16, 17, 64, 127, 128, 129, 240, 241, 1000,
                                    PS])
def test_prefix_hashes_are_xxh3_of_the_first_bytes(nbytes):
    pages = _pages(6)
    pages[2] = 0
    expect = [0 if not p.any() else xxhash.xxh3_64_intdigest(p[:nbytes].tobytes()) or 1
              for p in pages]
    assert kernels.prefix_hashes(pages, nbytes).tolist() == expect


@pytest.mark.compiled
@pytest.mark.parametrize("pos", [0, 1, 63, 64, 65, 2047, PS - 1])
def test_one_nonzero_byte_anywhere_makes_a_page_nonzero(pos):
    pages = np.zeros((3, PS), np.uint8)
    pages[1, pos] = 0x80
    hashes = kernels.prefix_hashes(pages, 128)
    assert hashes[0] == hashes[2] == 0
    assert hashes[1] != 0


@pytest.mark.compiled
@pytest.mark.parametrize("page_size", [64, 512, 65536])
def test_other_page_sizes(page_size):
    pages = _pages(3, size=page_size)
    pages[0] = 0
    pages[2, :] = 0
    pages[2, -1] = 1  # zero except its last byte
    out = kernels.prefix_hashes(pages, min(128, page_size))
    assert out[0] == 0
    assert out[2] == (xxhash.xxh3_64_intdigest(pages[2, :min(128, page_size)].tobytes()) or 1)


@pytest.mark.compiled
def test_skipped_pages_are_zero_and_not_read():
    pages = _pages(4)
    skip = np.array([False, True, False, True])
    out = kernels.prefix_hashes(pages, 128, skip)
    assert out[1] == out[3] == 0
    assert out[0] == xxhash.xxh3_64_intdigest(pages[0, :128].tobytes())


@pytest.mark.compiled
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


@pytest.mark.compiled
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


@pytest.mark.compiled
@pytest.mark.parametrize("bad", [-1, 4, 1 << 40])
def test_indices_outside_the_buffers_are_refused(bad):
    pages, reps = _pages(4), _pages(2)
    with pytest.raises(ValueError, match=r"rows\[1\] = .* is outside 0\.\.3"):
        kernels.equal_rows(pages, np.array([0, bad]), reps, np.array([0, 0]))
    with pytest.raises(ValueError, match=r"keys\[0\] = .* is outside 0\.\.1"):
        kernels.equal_rows(pages, np.array([0]), reps, np.array([bad]))
    with pytest.raises(ValueError, match="outside"):
        kernels.page_hashes(pages, np.array([bad]))


@pytest.mark.compiled
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
    with pytest.raises(ValueError, match="out: not a writable"):  # read-only output
        native.page_hashes(pages, PS, np.array([0]), b"\0" * 8)
    with pytest.raises(TypeError):  # not a buffer at all
        native.page_hashes(pages, PS, np.array([0]), None)


def _unaligned(dtype: type, values: list[int]) -> np.ndarray:
    """An array of ``values`` starting one byte past an 8-byte boundary (numpy allows it)."""
    raw = bytearray(8 * len(values) + 1)
    a = np.frombuffer(raw, dtype, offset=1)
    a[:] = values
    assert a.ctypes.data % 8 == 1 and not a.flags.aligned
    return a


@pytest.mark.compiled
def test_unaligned_or_mistyped_buffers_are_refused():
    # Every int64 / uint64 buffer the kernels read or write must be aligned: an unaligned one
    # was read (check_rows) and written (prefix_hashes) with misaligned loads and stores
    # (undefined behaviour, UBSan's report in issue 18), though the docstring promises a
    # ValueError for a caller's mistake.
    native = kernels.native
    assert native is not None
    pages = _pages(2)
    rows, out = np.array([0, 1]), np.empty(2, np.uint64)
    with pytest.raises(ValueError, match="out: not aligned to 8 bytes"):
        native.prefix_hashes(pages, PS, 128, None, _unaligned(np.uint64, [0, 0]))
    with pytest.raises(ValueError, match="rows: not aligned to 8 bytes"):
        native.page_hashes(pages, PS, _unaligned(np.int64, [0, 1]), out)
    with pytest.raises(ValueError, match="out: not aligned to 8 bytes"):
        native.page_hashes(pages, PS, rows, _unaligned(np.uint64, [0, 0]))
    with pytest.raises(ValueError, match="rows: not aligned"):
        native.equal_rows(pages, PS, _unaligned(np.int64, [0, 1]), pages, rows,
                          np.empty(2, np.bool_))
    with pytest.raises(ValueError, match="keys: not aligned"):
        native.equal_rows(pages, PS, rows, pages, _unaligned(np.int64, [0, 1]),
                          np.empty(2, np.bool_))
    # Of the wrong type: bytes of the right length are no int64 array, int32 rows are not
    # int64, a uint8 out is not uint64, a uint8 skip is not bool, a big-endian int64 is not
    # the native one; and a non-contiguous out is refused rather than written with wrong
    # strides.
    with pytest.raises(ValueError, match="rows: an array of 8-byte items"):
        native.page_hashes(pages, PS, bytes(16), out)
    with pytest.raises(ValueError, match="rows: an array of 8-byte items"):
        native.page_hashes(pages, PS, np.array([0, 1, 0, 0], np.int32), out)
    with pytest.raises(ValueError, match="rows: an array of 8-byte items"):
        native.page_hashes(pages, PS, np.array([0, 1], ">i8"), out)
    with pytest.raises(ValueError, match="out: an array of 8-byte items"):
        native.prefix_hashes(pages, PS, 128, None, np.empty(16, np.uint8))
    with pytest.raises(ValueError, match="skip: an array of 1-byte items"):
        native.prefix_hashes(pages, PS, 128, np.zeros(2, np.uint8), out)
    with pytest.raises(ValueError, match="out: not a writable C-contiguous"):
        native.prefix_hashes(pages, PS, 128, None, np.empty(4, np.uint64)[::2])
    # The wrappers always pass aligned arrays of the right types, whatever they are given.
    assert list(kernels.page_hashes(pages, _unaligned(np.int64, [1, 0]))) == \
        [xxhash.xxh3_64_intdigest(pages[1].tobytes()), xxhash.xxh3_64_intdigest(pages[0].tobytes())]


@pytest.mark.compiled
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


@pytest.mark.parametrize("value", ["1", "yes"])
def test_the_switch_turns_the_kernels_off_and_says_so(value):
    # KSM_ANALYZE_NO_KERNELS (like msgpack's MSGPACK_PUREPYTHON): the numpy code on purpose,
    # the extension not even imported, and --version gives that as the reason.
    env = {**os.environ, "KSM_ANALYZE_NO_KERNELS": value}
    version = subprocess.run([sys.executable, "-m", "ksm_analyze", "--version"], cwd=ROOT,
                             env=env, capture_output=True, text=True, check=True).stdout
    assert version.splitlines()[1] == (f"compiled kernels: no (numpy code: "
                                       f"KSM_ANALYZE_NO_KERNELS={value})")
    code = ("import sys, ksm_analyze; a = ksm_analyze.analyze(sys.argv[1:], jobs=2); "
            "from ksm_analyze.hashing import compiled as kernels; "
            "print(kernels.native, 'ksm_analyze.hashing._compiled' in sys.modules, "
            "a.counters.pages_sharing)")
    out = subprocess.run([sys.executable, "-c", code, *SAMPLES], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    # pages_sharing as the compiled path counts it (README's sample output: 920)
    assert out.split() == ["None", "False", "920"]


@pytest.mark.compiled
def test_the_switch_at_0_leaves_the_kernels_on():
    env = {**os.environ, "KSM_ANALYZE_NO_KERNELS": "0"}
    version = subprocess.run([sys.executable, "-m", "ksm_analyze", "--version"], cwd=ROOT,
                             env=env, capture_output=True, text=True, check=True).stdout
    assert version.splitlines()[1] == "compiled kernels: yes"


def _fresh_clone(dest):
    """The committed files only, as a fresh clone has them (not this checkout's built
    extension or build folders)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def test_installs_and_runs_without_a_c_compiler(tmp_path):
    # `pip install .` on a machine without a compiler: the extension is optional, the wheel
    # builds without it, and the package runs its numpy code with the same prediction.
    # In a tree built before: an editable install's extension in place, and a `pip install .`
    # one in build/lib.*/, which setuptools would call up to date and package. Where the
    # kernels are built here, the planted ones are real, and would load if packaged.
    source = _fresh_clone(tmp_path / "source")
    stale = (Path(kernels.native.__file__).read_bytes() if kernels.native is not None
             else b"stale")
    name = "_compiled" + sysconfig.get_config_var("EXT_SUFFIX")
    build_lib = f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    for folder in (source / "ksm_analyze" / "hashing",
                   source / "build" / build_lib / "ksm_analyze" / "hashing"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(stale)
    env = {**os.environ, "CC": "/bin/false", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "wheel"), str(source)], env=env, check=True, timeout=300,
                   capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("ksm_analyze-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        # No extension, and no C sources: the sdist needs those, an installed package not.
        assert not [n for n in names if n.endswith((".so", ".c", ".h"))], names
        assert "ksm_analyze/hashing/_vendor/xxhash/LICENSE" in names  # xxHash's terms travel along
        z.extractall(tmp_path / "site")
    # -S: no site hooks, so this checkout's editable install (and its extension) is not
    # found; the dependencies come from site-packages on the path.
    path = [str(tmp_path / "site"), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    env = {k: v for k, v in os.environ.items() if k != "KSM_ANALYZE_NO_KERNELS"}
    env["PYTHONPATH"] = os.pathsep.join(path)
    code = "from ksm_analyze.cli import main; main()"
    version = subprocess.run([sys.executable, "-S", "-c", code, "--version"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             check=True).stdout
    assert version.splitlines()[1] == ("compiled kernels: no (numpy code: no C compiler "
                                       "when it was installed)")
    out = subprocess.run([sys.executable, "-S", "-c", code, "scan", *SAMPLES, "--json"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         check=True)
    compiled = runner.invoke(app, ["scan", *SAMPLES, "--json"])
    assert compiled.exit_code == 0
    without, with_kernels = json.loads(out.stdout), json.loads(compiled.stdout)
    for run in (without, with_kernels):
        run["stages"].pop("stage1_seconds"), run["stages"].pop("stage2_seconds")
    assert without == with_kernels


def test_the_sdist_carries_the_c_sources_and_no_shared_object(tmp_path):
    # The sdist is what a machine with a compiler builds the kernels from: the C file, the
    # vendored header, its licence and version record; never a shared object of this tree.
    source = _fresh_clone(tmp_path / "source")
    (source / "ksm_analyze" / "hashing" / ("_compiled" + sysconfig.get_config_var("EXT_SUFFIX"))) \
        .write_bytes(b"stale")
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))")
    built = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=source,
                           capture_output=True, text=True, check=True, timeout=120)
    with tarfile.open(tmp_path / "dist" / built.stdout.split()[-1]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"setup.py", "ksm_analyze/hashing/_compiled.c", "ksm_analyze/hashing/_vendor/xxhash/xxhash.h",
            "ksm_analyze/hashing/_vendor/xxhash/LICENSE",
            "ksm_analyze/hashing/_vendor/xxhash/README.md"} <= names
    assert not [n for n in names if n.endswith(".so")]


def test_the_vendored_xxhash_header_is_the_version_recorded_beside_it():
    folder = ROOT / "ksm_analyze" / "hashing" / "_vendor" / "xxhash"
    header = (folder / "xxhash.h").read_bytes()
    record = (folder / "README.md").read_text()
    macros = dict(re.findall(rb"#define XXH_VERSION_(MAJOR|MINOR|RELEASE) +(\d+)", header))
    version = b".".join(macros[k] for k in (b"MAJOR", b"MINOR", b"RELEASE")).decode()
    assert re.search(r"^- Version: (\S+) ", record, re.MULTILINE).group(1) == version
    assert re.search(r"^- sha256 of `xxhash.h`: (\w+)$", record, re.MULTILINE).group(1) == \
        hashlib.sha256(header).hexdigest()  # an update that forgot its record fails here
    assert "Yann Collet" in record and "BSD 2-Clause" in record


@pytest.mark.compiled
@pytest.mark.parametrize("gap", [8, 1, 4096 + 3])
def test_kernels_read_rows_at_a_pitch_as_their_contiguous_copy(gap):
    # A migration stream's pages lie in place each behind an 8-byte record header: rows of
    # a page at a pitch of page + 8 (any pitch of at least a page).
    n = 5
    raw = np.random.default_rng(gap).integers(0, 256, n * (PS + gap), np.uint8)
    view = np.ndarray((n, PS), np.uint8, buffer=raw, offset=gap, strides=(PS + gap, 1))
    view[2] = 0  # an all-zero page
    view[3] = view[0]  # a copy of page 0
    view_copy = np.ascontiguousarray(view)
    assert not view.flags.c_contiguous and kernels.usable(view)
    assert kernels.prefix_hashes(view, 128).tolist() == [
        0 if not p.any() else xxhash.xxh3_64_intdigest(p[:128].tobytes()) or 1 for p in view_copy]
    rows = np.array([4, 0, 2, 1])
    assert kernels.page_hashes(view, rows).tolist() == [
        xxhash.xxh3_64_intdigest(view_copy[r].tobytes()) for r in rows.tolist()]
    assert kernels.equal_rows(view, rows, view_copy, rows).all()
    # page 4 vs 0: no; page 0 vs 3 (its copy): yes; page 2 vs 2: yes; page 1 vs 4: no
    got = kernels.equal_rows(view, rows, view_copy, np.array([0, 3, 2, 4]))
    assert got.tolist() == [False, True, True, False]


@pytest.mark.compiled
def test_overlapping_rows_are_refused():
    raw = np.zeros(3 * PS, np.uint8)
    overlapping = np.ndarray((3, PS), np.uint8, buffer=raw, strides=(PS // 2, 1))
    assert not kernels.usable(overlapping)
    with pytest.raises(ValueError, match="not C-contiguous, nor rows"):
        kernels.native.prefix_hashes(overlapping, PS, 128, None, np.empty(3, np.uint64))
    with pytest.raises(ValueError, match="not C-contiguous, nor rows"):  # rows of 2 KiB
        kernels.native.page_hashes(np.ndarray((2, PS // 2), np.uint8, buffer=raw,
                                              strides=(PS, 1)), PS, np.array([0]),
                                   np.empty(1, np.uint64))
