"""What the kernel tells about live processes and KSM: ``/proc`` and ``/sys/kernel/mm/ksm``.

Only reads; nothing here touches a target's memory. Layouts follow
``Documentation/filesystems/proc.rst`` (smaps, ksm_stat) and
``Documentation/admin-guide/mm/pagemap.rst`` (pagemap, kpageflags, PAGEMAP_SCAN); notes in
``shared/reference/dump-formats.md`` section 6.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KsmAnalyzeError

HOST_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
"""The running kernel's page size: pagemap has one entry per page of this size (an
analysis's page size is ``KsmSettings.page_size``, by default ``pages.PAGE_SIZE``)."""

__all__ = [
    "KSM_SYSFS", "KPageFlags", "ProcessError", "Vma", "ksm_stat", "ksm_sysfs",
    "machine_facts", "pagemap_scan", "process_facts", "qemu_pids", "read_smaps",
    "rmap_item_bytes",
]

KSM_SYSFS = Path("/sys/kernel/mm/ksm")

# pagemap entry bits
PM_PRESENT, PM_SWAPPED, PM_FILE = 1 << 63, 1 << 62, 1 << 61
PM_PFN_MASK = (1 << 55) - 1
# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF_KSM, KPF_THP, KPF_ZERO_PAGE = 1 << 21, 1 << 22, 1 << 24


class ProcessError(KsmAnalyzeError):
    """A process cannot be captured: gone, not ours to read, or it exited meanwhile."""

    def __init__(self, pid: int, detail: str) -> None:
        self.pid = pid
        self.detail = detail
        super().__init__(f"process {pid}: {detail}")


PF_EXITING, PF_KTHREAD = 0x4, 0x00200000
"""Task flags (``/proc/PID/stat`` field 9): exiting (its memory is going before it is a
zombie), and a kernel thread (no user memory)."""


def proc_error(pid: int, path: str, e: OSError) -> ProcessError:
    """An OSError from ``/proc/PID/...`` as the one-line reason a user can act on."""
    if isinstance(e, FileNotFoundError) or e.errno == errno.ESRCH or not Path(f"/proc/{pid}").exists():
        return ProcessError(pid, _no_memory(pid))
    if isinstance(e, PermissionError):
        return ProcessError(
            pid,
            f"permission denied reading {path}: ptrace access rules apply; capture as root "
            "or as the process's user (see /proc/sys/kernel/yama/ptrace_scope)",
        )
    return ProcessError(pid, f"cannot read {path}: {e.strerror}")


def _no_memory(pid: int) -> str:
    """Why ``pid`` has no address space to open (ESRCH): a zombie, a kernel thread, or gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        state, task_flags = fields[0], int(fields[6])
    except (OSError, IndexError, ValueError):
        return "no such process (it does not exist or has exited)"
    if task_flags & PF_KTHREAD:
        return "is a kernel thread: it has no user memory to capture"
    if state in ("Z", "X"):
        return "has exited (a zombie): no memory to capture"
    return "no such process (it does not exist or has exited)"


@dataclass(frozen=True)
class Vma:
    """One line of ``/proc/PID/smaps`` with the fields capture needs."""

    start: int
    end: int
    perms: str
    offset: int
    path: str
    vmflags: str
    rss_kb: int
    swap_kb: int

    @property
    def npages(self) -> int:
        """Pages of the running kernel's page size in the VMA."""
        return (self.end - self.start) // HOST_PAGE_SIZE if self.end > self.start else 0

    def as_meta(self) -> dict[str, object]:
        """The snapshot's META entry for this VMA."""
        return {"start": self.start, "end": self.end, "perms": self.perms,
                "offset": self.offset, "path": self.path, "vmflags": self.vmflags}


_VMA_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ \d+ ?\s*(.*)$"
)


def read_smaps(pid: int) -> list[Vma]:
    """Every VMA of ``pid`` with its VmFlags, Rss and Swap."""
    path = f"/proc/{pid}/smaps"
    try:
        text = Path(path).read_text(errors="surrogateescape")
    except OSError as e:
        raise proc_error(pid, path, e) from None
    vmas: list[Vma] = []
    head: re.Match[str] | None = None
    fields: dict[str, str] = {}

    def flush() -> None:
        if head:
            vmas.append(Vma(int(head[1], 16), int(head[2], 16), head[3], int(head[4], 16),
                            head[5], fields.get("VmFlags", ""),
                            int(fields.get("Rss", "0 kB").split()[0]),
                            int(fields.get("Swap", "0 kB").split()[0])))

    for line in text.splitlines():
        m = _VMA_LINE.match(line)
        if m:
            flush()
            head, fields = m, {}
        else:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    flush()
    return vmas


def process_facts(pid: int) -> dict[str, Any]:
    """``pid``'s command name, command line, start time (to notice a reused PID) and whether
    it has exited (a zombie, or exiting)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as e:
        raise proc_error(pid, f"/proc/{pid}", e) from None
    fields = stat.rsplit(")", 1)[1].split()
    return {
        "pid": pid,
        "comm": comm,
        "cmdline": [os.fsdecode(a) for a in cmdline if a],
        "start_time": int(fields[19]),
        # A zombie's memory is gone already; an exiting process's is going (it drops its
        # memory before it is a zombie: a gone address space then means exit, not exec).
        "exited": fields[0] in ("Z", "X") or bool(int(fields[6]) & PF_EXITING),
    }


def ksm_stat(pid: int) -> dict[str, int | bool] | None:
    """``/proc/PID/ksm_stat`` as ints, and its yes/no fields (``ksm_merge_any``,
    ``ksm_mergeable``, Linux 6.9+) as booleans (None where the kernel has no such file)."""
    out: dict[str, int | bool] = {}
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        key, value = key.rstrip(":"), value.strip()
        if value in ("yes", "no"):
            out[key] = value == "yes"
            continue
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


SLAB_OBJECT_SIZE = Path("/sys/kernel/slab/ksm_rmap_item/object_size")
SLABINFO = Path("/proc/slabinfo")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def rmap_item_bytes() -> int | None:
    """``sizeof(struct ksm_rmap_item)`` on the running kernel: the slab's ``object_size``
    (SLUB sysfs), else the ``objsize`` column of ``/proc/slabinfo`` (root), else None
    (not known here: never a guess)."""
    with contextlib.suppress(OSError, ValueError):
        return int(SLAB_OBJECT_SIZE.read_text().strip())
    with contextlib.suppress(OSError):
        for line in SLABINFO.read_text().splitlines():
            fields = line.split()
            # name active_objs num_objs objsize objperslab pagesperslab : ...
            if len(fields) > 3 and fields[0] == "ksm_rmap_item" and fields[3].isdigit():
                return int(fields[3])
    return None


def machine_facts() -> dict[str, Any]:
    """What a model of ksmd needs of this host: ``kernel`` release, ``boot_id`` (None if
    unreadable), ``ksm`` (:func:`ksm_sysfs`), ``rmap_item_bytes`` and the ``tuners``
    running (:func:`running_tuners`)."""
    try:
        boot_id: str | None = BOOT_ID.read_text().strip()
    except OSError:
        boot_id = None
    return {"kernel": os.uname().release, "boot_id": boot_id, "ksm": ksm_sysfs(),
            "rmap_item_bytes": rmap_item_bytes(), "tuners": running_tuners()}


def running_tuners() -> list[str]:
    """The KSM tuners running here (``ksmtuned``, KubeVirt's ``virt-handler``: they rewrite
    ``pages_to_scan``), by name, each once."""
    from ..ksmd.cost import TUNERS

    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                comm = (entry / "comm").read_text().strip()
                if comm in TUNERS:
                    found.add(comm)
    return sorted(found)


def qemu_pids() -> list[int]:
    """Every running QEMU system emulator (``comm`` or the executable's name starting
    ``qemu-system``), in PID order; zombies and exiting ones left out."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        exe = ""
        with contextlib.suppress(OSError):
            exe = os.path.basename(os.readlink(entry / "exe")).removesuffix(" (deleted)")
        if comm.startswith("qemu-system") or exe.startswith("qemu-system"):
            with contextlib.suppress(KsmAnalyzeError):
                if not process_facts(int(entry.name))["exited"]:
                    found.append(int(entry.name))
    return sorted(found)


def ksm_sysfs() -> dict[str, int | str] | None:
    """Every readable file in ``/sys/kernel/mm/ksm`` (None without KSM)."""
    if not KSM_SYSFS.is_dir():
        return None
    out: dict[str, int | str] = {}
    for f in sorted(KSM_SYSFS.iterdir()):
        with contextlib.suppress(OSError):
            text = f.read_text().strip()
            try:
                out[f.name] = int(text)
            except ValueError:
                out[f.name] = text
    return out


class KPageFlags:
    """``/proc/kpageflags`` (root only): flags of physical pages, by PFN."""

    def __init__(self) -> None:
        self.fd = -1
        with contextlib.suppress(OSError):
            self.fd = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)

    @property
    def available(self) -> bool:
        return self.fd >= 0

    def lookup(self, pfns: np.ndarray) -> np.ndarray:
        """uint64 flags for each PFN; nearby PFNs are read in one go."""
        out = np.zeros(len(pfns), np.uint64)
        if not len(pfns):
            return out
        unique = np.unique(pfns)
        cuts = np.flatnonzero(np.diff(unique) > 512) + 1
        values = np.zeros(len(unique), np.uint64)
        for group in np.split(np.arange(len(unique)), cuts):
            lo, hi = int(unique[group[0]]), int(unique[group[-1]])
            raw = os.pread(self.fd, (hi - lo + 1) * 8, lo * 8)
            span = np.frombuffer(raw, "<u8")
            idx = unique[group].astype(np.int64) - lo
            ok = idx < len(span)
            values[group[ok]] = span[idx[ok]]
        return values[np.searchsorted(unique, pfns)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# PAGEMAP_SCAN (Linux 6.7+, include/uapi/linux/fs.h): page facts without root.
class _PmScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_PmScanArg) << 16) | (ord("f") << 8) | 16


def pagemap_scan(
    pagemap_fd: int, start: int, end: int, categories: int
) -> list[tuple[int, int, int]] | None:
    """Ranges in [start, end) with any of ``categories`` (PAGE_IS_*), as ``(start, end,
    categories)``; None where the kernel has no PAGEMAP_SCAN."""
    vec = (_PageRegion * 512)()
    found: list[tuple[int, int, int]] = []
    while start < end:
        arg = _PmScanArg(size=ctypes.sizeof(_PmScanArg), start=start, end=end,
                         vec=ctypes.addressof(vec), vec_len=len(vec),
                         category_anyof_mask=categories, return_mask=categories)
        try:
            n = fcntl.ioctl(pagemap_fd, PAGEMAP_SCAN, arg)
        except OSError as e:
            if e.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise
        found += [(vec[i].start, vec[i].end, vec[i].categories) for i in range(n)]
        if arg.walk_end <= start:
            break
        start = arg.walk_end
    return found
