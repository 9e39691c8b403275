"""A small process whose memory churns, and a live fingerprint series of it: the input of
the tests of what ``scan`` and ``report`` say over time. No root needed (a process may read
its own child's memory).

The target holds 40 contents x 15 pages (stable duplicates), 300 stable unique pages, 100
written zero pages, 400 pages a thread rewrites without pause with one content that changes
every round (identical at almost every instant, never stable) and 100 it rewrites with
random bytes: 1,500 mergeable pages.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

TARGET = r"""
import mmap, os, threading, time
m = mmap.mmap(-1, 1500 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_MERGEABLE)
for i in range(600):
    m[i * 4096:(i + 1) * 4096] = bytes([i % 40 + 1]) * 4096     # 40 contents x 15
for i in range(600, 900):
    m[i * 4096:(i + 1) * 4096] = os.urandom(4096)                # stable unique
for i in range(900, 1000):
    m[i * 4096:i * 4096 + 1] = b"\0"                             # written zero pages
def churn():
    k = 0
    while True:
        k += 1
        same = k.to_bytes(8, "little") * 512
        for i in range(1000, 1400):
            m[i * 4096:(i + 1) * 4096] = same                    # identical, never stable
        for i in range(1400, 1500):
            m[i * 4096:(i + 1) * 4096] = os.urandom(4096)
threading.Thread(target=churn, daemon=True).start()
print("ready", flush=True)
time.sleep(600)
"""
STABLE_DUPLICATE_PAGES = 600 + 100  # the 40 contents x 15 and the written zero pages
CHURNING_PAGES = 500


@contextlib.contextmanager
def churning() -> Iterator[int]:
    """The target's PID while it runs; killed after."""
    proc = subprocess.Popen([sys.executable, "-c", TARGET], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def series(out: Path, count: int = 3, every: str = "0.3s") -> list[str]:
    """Fingerprint a churning target ``count`` times into ``out``: the files, oldest first."""
    with churning() as pid:
        subprocess.run([sys.executable, "-m", "ksm_analyze", "fingerprint", str(pid), "-o",
                        str(out), "--every", every, "--count", str(count), "-q"], check=True)
    files = sorted(str(p) for p in out.glob("*.ksmfp.parquet"))
    assert len(files) == count, files
    return files
