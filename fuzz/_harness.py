"""The atheris harness shared by ``fuzz_<format>.py``: one reader, bytes in, clean errors out.

Each input is written to a memfd and opened through ``/proc/self/fd/N`` with the format's
reader forced (for a two-file format, ``test_fuzz.FUZZED[fmt].companion``: written as the
companion file beside a fixed memory file in a scratch directory), then run through ``tests/test_fuzz.py``'s :func:`exercise` (open, list extents,
iterate every batch, ``read_pages`` of sampled pages; ``analyze`` too with
``KSM_FUZZ_ANALYZE=1``) and judged by its :func:`problems`: the same property as the
hypothesis tests. The input may add ``256 MiB + 16 x its size`` of address space
(``RLIMIT_AS``, set around each run); libFuzzer's ``-timeout`` catches hangs.

A failure raises, so libFuzzer stops and writes the input (``crash-<sha1>``), unless
``KSM_FUZZ_KEEP_GOING=1``: then each distinct failure (its first line and the innermost
ksm_analyze frame) is saved once to ``$KSM_FUZZ_OUT/<format>-<hash>.bin`` with a line in
``$KSM_FUZZ_OUT/failures.txt``, and fuzzing goes on. ``fuzz/run.sh`` runs that way.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import sys
import time
import warnings
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

# Instrument every module of the package: it must be the first import of ksm_analyze.
with atheris.instrument_imports(include=["ksm_analyze"]):
    import ksm_analyze
    import ksm_analyze.pipeline
    import ksm_analyze.formats  # noqa: F401

import test_fuzz  # the seeds, exercise() and the property, shared with the hypothesis tests

from ksm_analyze.formats import DumpFormat

KEEP_GOING = os.environ.get("KSM_FUZZ_KEEP_GOING") == "1"
ANALYZE = os.environ.get("KSM_FUZZ_ANALYZE") == "1"
OUT = Path(os.environ.get("KSM_FUZZ_OUT", ROOT / "fuzz" / "out"))


class Failure(Exception):
    """A case broke the property (the message says how)."""


def _signature(text: str) -> str:
    """A failure's identity: its first line (numbers masked) and innermost ksm_analyze frame."""
    first = re.sub(r"0x[0-9a-f]+|\d+", "N", text.splitlines()[0])[:200]
    frames = re.findall(r'File "[^"]*/(ksm_analyze/[^"]+)", line (\d+)', text)
    where = ":".join(frames[-1]) if frames else "-"
    return f"{first} @ {where}"


def main(fmt_name: str) -> None:
    # "wrapped": compressed files (fuzz_wrapped.py), the format inside detected.
    fmt = None if fmt_name == "wrapped" else DumpFormat(fmt_name)
    fd = os.memfd_create(f"ksm-fuzz-{fmt_name}", 0)
    path = f"/proc/self/fd/{fd}"
    companion = None if fmt is None else test_fuzz.FUZZED[fmt].companion
    if companion is not None:  # a two-file format: the input is the companion, on disk
        import tempfile
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # tmpfs: sparse, no journal
        where = Path(tempfile.mkdtemp(prefix=f"ksm-fuzz-{fmt_name}-", dir=shm))
        import atexit
        import shutil
        atexit.register(shutil.rmtree, where, True)  # not run when libFuzzer _exits: 200 KiB
        path = str(test_fuzz.case_file(fmt, b"", "case", where))
        os.close(fd)
        fd = os.open(Path(path).parent / companion.name, os.O_RDWR | os.O_CLOEXEC)
    seen: set[str] = set()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    test_fuzz.warm_up()  # lazy imports before the first input runs under RLIMIT_AS
    warnings.simplefilter("error")  # as pytest runs the tests (filterwarnings = error)

    def one(data: bytes) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        resource.setrlimit(resource.RLIMIT_AS,
                           (test_fuzz._vm_size() + test_fuzz.mem_bound(len(data)), hard))
        try:
            result = test_fuzz.outcome(
                lambda: test_fuzz.exercise(path, fmt, also_analyze=ANALYZE))
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        found = test_fuzz.problems(result, path)
        if result[0] != "hang" and result[-1] > test_fuzz.CASE_SECONDS:
            found.append(f"slow: {result[-1]:.1f} s, more than {test_fuzz.CASE_SECONDS} s")
        if not found:
            return
        text = "\n".join(found)
        if not KEEP_GOING:
            raise Failure(text)
        _keep(fmt_name, data, text, _signature(text), seen)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


def _keep(target: str, data: bytes, text: str, sig: str, seen: set[str]) -> None:
    """Save a failing input once per distinct failure (its signature), with a log line."""
    if sig in seen:
        return
    seen.add(sig)
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"{target}-{hashlib.sha1(sig.encode()).hexdigest()[:10]}.bin"
    (OUT / name).write_bytes(data)
    with open(OUT / "failures.txt", "a") as log:
        log.write(f"{time.strftime('%F %T')} {name} {len(data)} bytes: {sig}\n")
    print(f"\n== new failure {name}: {sig}\n{text}\n", file=sys.stderr, flush=True)


def main_fingerprints(target: str) -> None:
    """The harness of ``fuzz_fpfile.py`` / ``fuzz_cache.py``: each input is a fingerprint
    file (or a cache entry, written over vm-b.raw's) judged by test_fuzz's
    :func:`check_fingerprint_case` (isolated in a forked child: a clean one-line error or the
    original answer). Failures are saved as for the readers."""
    test_fuzz.fingerprint_seed()
    seen: set[str] = set()
    warnings.simplefilter("error")

    def one(data: bytes) -> None:
        try:
            test_fuzz.check_fingerprint_case(target, test_fuzz.Case("atheris", data))
        except AssertionError as e:
            text = str(e)
            if not KEEP_GOING:
                raise Failure(text) from None
            _keep(target, data, text, _signature("\n".join(text.splitlines()[2:]) or text), seen)

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
