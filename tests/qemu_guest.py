"""Boot small real QEMU/TCG Linux guests and take memory dumps of them.

Used by the tests (real ELF / kdump / raw dumps, /proc/PID captures of the QEMU process) and
by ``sample_dumps/regenerate.py``. It needs no pytest at import time.

The guest is a Debian cloud kernel with a busybox initramfs whose ``/init`` mounts
proc/sys/devtmpfs, optionally fills a tmpfs file with deterministic pages, prints
``KSM-GUEST-READY`` on ttyS0 and sleeps forever.  Kernel command line parameter::

    ksmfill=SEED:MIB[:COPIES]

writes MIB MiB into ``/fill/data.N`` (N counts the parameters, which may repeat).  Page *i*
holds the line ``ksmfill seed=SEED page=i//COPIES`` padded with a pattern that depends only on
SEED.  So guests with the same SEED hold identical fill pages, different seeds share none, and
COPIES (default 1) repeats each distinct page inside one guest.

    ksmchurn=MIB:same|random

rewrites MIB MiB of ``/fill/churn.KIND`` in place without pause, in the background: ``same``
writes every page with the line ``ksmchurn round=K`` repeated (K counts the rounds), so the
pages are identical to each other at almost every instant but never stable; ``random``
writes fresh random bytes.

Assets are cached in ``$KSM_ANALYZE_CACHE`` or ``~/.cache/ksm-analyze/guest``; once cached no
command (and no network) is needed.  Missing system packages are installed by
``.ci/install-system-deps.sh``, which :func:`ensure_guest_assets` runs when needed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Self

__all__ = [
    "READY_MARKER",
    "Guest",
    "GuestAssets",
    "GuestError",
    "ensure_guest_assets",
    "qemu_available",
]

READY_MARKER = "KSM-GUEST-READY"
QEMU = "qemu-system-x86_64"
_REPO = Path(__file__).resolve().parent.parent
_INSTALL_SCRIPT = _REPO / ".ci" / "install-system-deps.sh"
_PROMPT = b"(qemu) "

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /fill /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=90% tmpfs /fill
n=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    ksmfill=*)
      spec=${arg#ksmfill=}
      seed=${spec%%:*}; rest=${spec#*:}; mib=${rest%%:*}; copies=${rest#*:}
      [ "$copies" = "$rest" ] && copies=1
      awk -v s="$seed" -v n=$((mib * 256)) -v c="$copies" 'BEGIN {
        pad = ""; x = "|" s "|0123456789abcdefghijklmnopqrstuvwxyz"
        while (length(pad) < 4096) pad = pad x
        for (i = 0; i < n; i++) {
          h = sprintf("ksmfill seed=%s page=%d\n", s, int(i / c))
          printf "%s%s", h, substr(pad, 1, 4096 - length(h))
        }
      }' > /fill/data.$n
      echo "ksmfill: seed=$seed mib=$mib copies=$copies $(wc -c < /fill/data.$n) bytes"
      n=$((n + 1))
      ;;
    ksmchurn=*)
      spec=${arg#ksmchurn=}; mib=${spec%%:*}; kind=${spec#*:}
      if [ "$kind" = random ]; then
        ( while :; do
            dd if=/dev/urandom of=/fill/churn.random bs=4096 count=$((mib * 256)) conv=notrunc 2>/dev/null
          done ) &
      else
        ( k=0; while :; do
            awk -v k=$k -v n=$((mib * 256)) 'BEGIN {
              h = sprintf("ksmchurn round=%d\n", k); pad = h
              while (length(pad) < 4096) pad = pad h
              for (i = 0; i < n; i++) printf "%s", substr(pad, 1, 4096)
            }' | dd of=/fill/churn.same bs=4096 conv=notrunc 2>/dev/null
            k=$((k + 1))
          done ) &
      fi
      echo "ksmchurn: mib=$mib kind=$kind"
      ;;
  esac
done
echo KSM-GUEST-READY
while :; do sleep 3600; done
"""


class GuestError(RuntimeError):
    """QEMU failed to start, the guest did not boot, or a monitor command failed."""


class GuestAssets(NamedTuple):
    """A bootable kernel image and initramfs."""

    kernel: Path
    initrd: Path


def qemu_available() -> bool:
    """Return True when qemu-system-x86_64 is on PATH."""
    return shutil.which(QEMU) is not None


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _install_system_deps() -> None:
    if not (shutil.which(QEMU) and Path("/bin/busybox").exists()):
        _run(["bash", str(_INSTALL_SCRIPT)])


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """Build a cpio "newc" archive from (name, mode, data) entries (see initramfs docs)."""
    out = bytearray()

    def add(ino: int, name: str, mode: int, data: bytes) -> None:
        nameb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0)
        out.extend(b"070701" + "".join(f"{f:08X}" for f in fields).encode() + nameb)
        out.extend(b"\0" * (-len(out) % 4) + data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        add(ino, name, mode, data)
    add(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def _atomic_write(dest: Path, data: bytes) -> None:
    """Write via a per-process temporary name, so concurrent builders never see half a file."""
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    part.write_bytes(data)
    part.replace(dest)


def _cloud_kernel_package() -> str | None:
    """The package linux-image-cloud-amd64 depends on (linux-image-6.1.0-56-cloud-amd64)."""
    proc = subprocess.run(
        ["apt-cache", "depends", "linux-image-cloud-amd64"],
        capture_output=True,
        text=True,
        check=False,
    )
    names = [w for w in proc.stdout.split() if w.startswith("linux-image-") and w[12:13].isdigit()]
    return names[0] if names else None


def _download_kernel(dest: Path) -> None:
    package = _cloud_kernel_package()
    if package is None:  # no or stale package lists
        _run(["apt-get", "update", "-qq"])
        package = _cloud_kernel_package()
    if package is None:
        raise GuestError("apt-cache depends linux-image-cloud-amd64 names no kernel package")
    with tempfile.TemporaryDirectory(prefix="ksm-kernel-") as tmp:
        try:
            _run(["apt-get", "download", "-q", package], cwd=Path(tmp))
        except GuestError:  # stale lists name a version the mirror no longer has
            _run(["apt-get", "update", "-qq"])
            package = _cloud_kernel_package() or package
            _run(["apt-get", "download", "-q", package], cwd=Path(tmp))
        deb = next(Path(tmp).glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")])
        vmlinuz = next((Path(tmp) / "x" / "boot").glob("vmlinuz-*"))
        (dest.parent / "kernel-package.txt").write_text(f"{package} {deb.name}\n")
        _atomic_write(dest, vmlinuz.read_bytes())


def ensure_guest_assets(cache_dir: Path | None = None) -> GuestAssets:
    """Return a cached kernel + initramfs, building them on first use.

    Args:
        cache_dir: Where to keep them; default ``$KSM_ANALYZE_CACHE`` or
            ``~/.cache/ksm-analyze/guest``.

    Returns:
        The paths of the kernel (``vmlinuz``) and the initramfs (``initrd-HASH.gz``).

    Raises:
        GuestError: A package could not be installed, downloaded or unpacked.
    """
    if cache_dir is None:
        env = os.environ.get("KSM_ANALYZE_CACHE")
        cache_dir = Path(env) if env else Path.home() / ".cache" / "ksm-analyze" / "guest"
    cache_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()[:12]  # rebuild when /init changes
    kernel, initrd = cache_dir / "vmlinuz", cache_dir / f"initrd-{tag}.gz"
    if kernel.exists() and initrd.exists():
        return GuestAssets(kernel, initrd)
    _install_system_deps()
    if not kernel.exists():
        _download_kernel(kernel)
    if not initrd.exists():
        archive = _cpio_newc(
            [
                ("bin", 0o40755, b""),
                ("bin/busybox", 0o100755, Path("/bin/busybox").read_bytes()),
                ("init", 0o100755, INIT_SCRIPT.encode()),
            ]
        )
        _atomic_write(initrd, gzip.compress(archive, mtime=0))
    return GuestAssets(kernel, initrd)


def _hmp_quote(path: Path | str) -> str:
    """Quote a file name for an HMP argument (monitor/hmp.c get_str handles \\\\ and \\")."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Guest:
    """A running QEMU TCG guest with an HMP monitor on a unix socket (a context manager)."""

    def __init__(
        self,
        assets: GuestAssets,
        mem_mib: int = 256,
        cmdline_extra: str = "",
        workdir: Path | None = None,
        *,
        timeout: float = 120.0,
        extra_args: tuple[str, ...] = ("-nic", "none"),
    ) -> None:
        """Boot the guest and wait until /init prints the readiness marker.

        Args:
            assets: Kernel and initramfs from :func:`ensure_guest_assets`.
            mem_mib: Guest RAM (``-m``). The Debian 6.1 cloud kernel needs 72 MiB
                (68 MiB runs out of memory during boot).
            cmdline_extra: Appended to the kernel command line (e.g. ``ksmfill=1:16``).
            workdir: Where ``serial.log`` and ``qemu.stderr`` go; if None, a temporary
                directory that :meth:`close` removes.
            timeout: Seconds to wait for the readiness marker.
            extra_args: More QEMU arguments.

        Raises:
            GuestError: QEMU exited or the marker did not appear in time.
        """
        # A unix socket path must stay under 108 bytes, so it never lives in workdir.
        self._sockdir = Path(tempfile.mkdtemp(prefix="ksmq-"))
        self.workdir = Path(workdir) if workdir else self._sockdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = self.workdir / "serial.log"
        self.monitor_path = self._sockdir / "monitor.sock"
        self.mem_mib = mem_mib
        append = f"console=ttyS0 quiet panic=-1 {cmdline_extra}".strip()
        self.argv = [
            *f"{QEMU} -accel tcg -m {mem_mib} -smp 1 -display none -no-reboot".split(),
            *("-kernel", str(assets.kernel), "-initrd", str(assets.initrd), "-append", append),
            *("-serial", f"file:{self.serial_log}"),
            *("-monitor", f"unix:{self.monitor_path},server=on,wait=off"),
            *extra_args,
        ]
        self._sock: socket.socket | None = None
        self._stderr = open(self.workdir / "qemu.stderr", "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr
        )
        self.boot_seconds = 0.0
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """The QEMU process id (for /proc/PID captures)."""
        return self._proc.pid

    def _log_tail(self, n: int = 30) -> str:
        text = ""
        for f in (self.serial_log, self.workdir / "qemu.stderr"):
            if f.exists():
                text += "\n".join(f.read_text(errors="replace").splitlines()[-n:]) + "\n"
        return text

    def _wait_ready(self, timeout: float) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.serial_log.exists() and READY_MARKER in self.serial_log.read_text(
                errors="replace"
            ):
                self.boot_seconds = time.monotonic() - start
                return
            if self._proc.poll() is not None:
                tail = self._log_tail()
                if not tail.strip():  # e.g. -m 64: dies in the decompressor, before any console
                    tail = f"(no output: the kernel died early; -m {self.mem_mib} < 72 MiB?)"
                raise GuestError(
                    f"QEMU exited with {self._proc.returncode} before {READY_MARKER}; "
                    f"log tail:\n{tail}"
                )
            time.sleep(0.2)
        raise GuestError(f"no {READY_MARKER} after {timeout:.0f} s; log tail:\n{self._log_tail()}")

    def _read_prompt(self, timeout: float) -> bytes:
        assert self._sock is not None
        self._sock.settimeout(timeout)
        buf = b""
        while not buf.endswith(_PROMPT):
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise GuestError(f"monitor: no prompt after {timeout} s: {buf[-500:]!r}") from None
            if not chunk:
                raise GuestError(f"monitor closed: {buf[-500:]!r}")
            buf += chunk
        return buf

    def hmp(self, command: str, timeout: float = 600.0) -> str:
        """Run one HMP command and return its output (without the echo and prompt)."""
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.connect(str(self.monitor_path))
            self._read_prompt(30)  # banner
        self._sock.sendall(command.encode() + b"\n")
        raw = self._read_prompt(timeout)[: -len(_PROMPT)]
        # The readline echo ends at the first CR LF; strip terminal escapes from the rest.
        text = raw.split(b"\r\n", 1)[1] if b"\r\n" in raw else b""
        return text.decode(errors="replace").replace("\r\n", "\n").replace("\x1b[K", "")

    def pause(self) -> None:
        """Stop the vCPUs (HMP ``stop``)."""
        self.hmp("stop")

    def _dump(self, path: Path, flags: str = "", span: str = "") -> Path:
        path = Path(path).resolve()
        path.unlink(missing_ok=True)
        cmd = " ".join(x for x in ("dump-guest-memory", flags, _hmp_quote(path), span) if x)
        # Without -d the HMP command is synchronous and prints nothing on success.
        out = self.hmp(cmd).strip()
        if out or not path.exists():
            raise GuestError(f"{cmd}: {out or 'no file written'}")
        path.chmod(0o600)  # guest memory is private; QEMU itself creates dumps 0400
        status = self.hmp("info dump")
        if "completed" not in status:
            raise GuestError(f"{cmd}: 'info dump' says {status.strip()!r}")
        return path

    def dump_elf(self, path: Path, begin: int | None = None, length: int | None = None) -> Path:
        """Write an ELF core of all guest RAM, or of GPA [begin, begin+length)."""
        if (begin is None) != (length is None):
            raise ValueError("give both begin and length, or neither")
        return self._dump(path, span="" if begin is None else f"{begin:#x} {length:#x}")

    def dump_kdump_zlib(self, path: Path) -> Path:
        """Write a flattened kdump-compressed (zlib) dump (``dump-guest-memory -z``)."""
        return self._dump(path, flags="-z")

    def pmemsave(self, addr: int, size: int, path: Path) -> Path:
        """Save guest physical [addr, addr+size) to a flat file (HMP ``pmemsave``)."""
        path = Path(path).resolve()
        out = self.hmp(f"pmemsave {addr:#x} {size:#x} {_hmp_quote(path)}").strip()
        if out or not path.exists() or path.stat().st_size != size:
            raise GuestError(f"pmemsave {addr:#x} {size:#x} {path}: {out or 'short file'}")
        return path

    def close(self) -> None:
        """Quit QEMU (HMP ``quit``), killing it if it does not exit within 10 s."""
        if self._proc.poll() is None:
            try:
                if self._sock is None:
                    self.hmp("info status", timeout=10)
                assert self._sock is not None
                self._sock.sendall(b"quit\n")
                self._proc.wait(timeout=10)
            except (OSError, GuestError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._stderr.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
