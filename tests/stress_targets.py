"""Target processes that change under ``capture``, and a handle to drive them from tests.

    python tests/stress_targets.py MODE [--pages N] [--tag T] [--undumpable]

Every mode maps a *stable* region of N pages, page k holding the little-endian u64
``tag << 32 | k`` 512 times, which it never touches again, then prints
``ready PID STABLE_ADDR EXTRA`` and:

* ``hold``: EXTRA is a 256-page *victim* region of 0xC5 bytes; stdin commands ``unmap``
  (munmap it), ``remap`` (a fresh, untouched mapping in its place) and ``exit`` (_exit(0)), each
  answered ``ok`` (``exit`` answers nothing);
* ``fork``: forks children for ever, each writing a page of its own copy and exiting within
  1.5 s (EXTRA is 0);
* ``churn``: EXTRA is a 256-page address range that, for ever, gets a fresh private mapping,
  is filled with 0xC5, is dropped with ``MADV_DONTNEED`` and filled again, then is replaced
  by a ``PROT_NONE`` mapping (its pages freed); the range stays reserved, so it only ever holds
  0x00 and 0xC5 bytes;
* ``exec``: EXTRA is the generation (the tag); on ``go MS`` it sleeps MS milliseconds and
  execs itself as the next generation, whose stable region holds the next tag.

Standard library only: it also runs as user ``nobody``, who cannot read site-packages here.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import random
import select
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Self

PS = 4096
VICTIM_PAGES = CHURN_PAGES = 256
CHURN_BYTE = 0xC5
_PROT_NONE, _PROT_RW = 0, 3
_MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x02, 0x10, 0x20, 0x4000
_MADV_DONTNEED = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _mmap(addr: int, npages: int, prot: int, fixed: bool) -> int:
    flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE | (_MAP_FIXED if fixed else 0)
    got = _libc.mmap(addr or None, npages * PS, prot, flags, -1, 0)
    if got in (None, ctypes.c_void_p(-1).value) or (fixed and got != addr):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return int(got)


def _fill(addr: int, npages: int) -> None:
    ctypes.memset(addr, CHURN_BYTE, npages * PS)


def stable_region(npages: int, tag: int) -> mmap.mmap:
    region = mmap.mmap(-1, npages * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for k in range(npages):
        region[k * PS : (k + 1) * PS] = struct.pack("<Q", tag << 32 | k) * (PS // 8)
    return region


def _address(region: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(region))


def _say(*words: object) -> None:
    os.write(1, (" ".join(map(str, words)) + "\n").encode())


def _hold(stable_addr: int) -> None:
    victim = _mmap(0, VICTIM_PAGES, _PROT_RW, fixed=False)
    _fill(victim, VICTIM_PAGES)
    _say("ready", os.getpid(), stable_addr, victim)
    for line in sys.stdin:
        command = line.strip()
        if command == "exit":
            os._exit(0)
        if command == "unmap":
            _libc.munmap(victim, VICTIM_PAGES * PS)
        elif command == "remap":
            _mmap(victim, VICTIM_PAGES, _PROT_RW, fixed=True)
        _say("ok")


def _fork(stable_addr: int) -> None:
    scratch = mmap.mmap(-1, 16 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    _say("ready", os.getpid(), stable_addr, 0)
    children = 0
    while True:
        while children:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            children -= 1
        if children < 4:
            if os.fork() == 0:
                scratch[random.randrange(16) * PS] = 1  # copy-on-write: the child's own page
                time.sleep(random.uniform(0.001, 1.5))
                os._exit(0)
            children += 1
        time.sleep(0.002)


def _churn(stable_addr: int) -> None:
    churn = _mmap(0, CHURN_PAGES, _PROT_NONE, fixed=False)  # reserved: nothing else goes here
    _say("ready", os.getpid(), stable_addr, churn)
    while True:
        _mmap(churn, CHURN_PAGES, _PROT_RW, fixed=True)
        _fill(churn, CHURN_PAGES)
        _libc.madvise(churn, CHURN_PAGES * PS, _MADV_DONTNEED)  # as a balloon driver does
        _fill(churn, CHURN_PAGES)
        _mmap(churn, CHURN_PAGES, _PROT_NONE, fixed=True)


def _exec(stable_addr: int, tag: int) -> None:
    _say("ready", os.getpid(), stable_addr, tag)
    words = sys.stdin.buffer.readline().split()  # one line per generation: nothing read ahead
    if words[:1] != [b"go"]:
        os._exit(0)
    time.sleep(int(words[1]) / 1000)
    os.execv(sys.executable, [sys.executable, __file__, "exec", "--pages",
                              str(len(_regions[0]) // PS), "--tag", str(tag + 1)])


_regions: list[mmap.mmap] = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["hold", "fork", "churn", "exec"])
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--tag", type=int, default=1)
    ap.add_argument("--undumpable", action="store_true")
    args = ap.parse_args()
    if args.undumpable:
        _libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: not ptrace-readable, even by its user
    _regions.append(stable_region(args.pages, args.tag))
    addr = _address(_regions[0])
    if args.mode == "exec":
        _exec(addr, args.tag)
    else:
        {"hold": _hold, "fork": _fork, "churn": _churn}[args.mode](addr)


class Target:
    """A running stress target: its PID, stable region and extra value, and a pipe to it."""

    def __init__(self, mode: str, *args: str, pages: int = 1024, tag: int = 1,
                 prefix: Sequence[str] = ()) -> None:
        self.pages, self.tag = pages, tag
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, __file__, mode, "--pages", str(pages), "--tag", str(tag),
             *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buf = b""
        self.ready()

    def ready(self) -> None:
        """Wait for the (next) ``ready`` line."""
        words = self.line().split()
        assert words[0] == "ready", words
        self.pid, self.stable, self.extra = (int(w) for w in words[1:4])

    def line(self, timeout: float = 30.0) -> str:
        """The next line the target prints; a target silent for ``timeout`` s fails the test."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"the target said nothing for {timeout} s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError("the target exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()
