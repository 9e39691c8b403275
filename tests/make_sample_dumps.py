#!/usr/bin/env python3
"""Regenerate the small real QEMU dumps in sample_dumps/ (README.md, "Sample dumps").

Boots two 128 MiB QEMU/TCG guests (Debian cloud kernel + busybox initramfs, ``nokaslr``):

* vm-a: ``ksmfill=common:1 ksmfill=a:1:4`` (1 MiB shared with vm-b, 1 MiB of 64 distinct pages
  x 4 copies);
* vm-b: ``ksmfill=common:1 ksmfill=b:1`` (1 MiB shared with vm-a, 1 MiB of unique pages).

Whole-RAM dumps of this kernel are 17+ MB even as kdump-zlib, so the samples hold one guest
physical window of WINDOW bytes, chosen in vm-a (from a temporary full ``pmemsave``) to hold the
most fill pages with some zero pages.  Written: ``vm-a.elf`` (``dump-guest-memory FILE BEGIN
LENGTH``), ``vm-b.raw`` (``pmemsave BEGIN LENGTH FILE``) and ``tests/sample_dumps.json`` (window,
command lines, kernel package, sha256, and page counts per file counted straight from the bytes
with hashlib, which ``tests/test_samples.py`` holds the analyzer to).

Usage: ``python tests/make_sample_dumps.py [--window BYTES] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "sample_dumps"
MANIFEST = HERE / "sample_dumps.json"
sys.path.insert(0, str(HERE))

from qemu_guest import Guest, ensure_guest_assets

PAGE = 4096
MEM_MIB = 128
WINDOW = 0x200000  # 2 MiB: both files together stay near 4 MB
ALIGN = 0x10000
GUESTS = {
    "vm-a": "nokaslr ksmfill=common:1 ksmfill=a:1:4",
    "vm-b": "nokaslr ksmfill=common:1 ksmfill=b:1",
}
_FILL = re.compile(rb"ksmfill seed=(\w+) page=\d+\n")


def page_classes(data: bytes) -> list[str]:
    """Classify each 4 KiB page: ``zero``, ``fill:SEED`` or ``other``."""
    out = []
    for off in range(0, len(data), PAGE):
        page = data[off : off + PAGE]
        m = _FILL.match(page)
        out.append("zero" if not any(page) else f"fill:{m.group(1).decode()}" if m else "other")
    return out


def choose_window(ram: bytes, size: int) -> int:
    """Return the ALIGN-aligned GPA of the size-byte window holding the most fill pages,
    counting up to 64 zero pages as fill too so the sample shows zero pages as well."""
    classes = page_classes(ram)
    fill = [c.startswith("fill:") for c in classes]
    zero = [c == "zero" for c in classes]
    per = size // PAGE
    best, best_n = 0, -1
    for start in range(0, len(ram) - size + 1, ALIGN):
        first = start // PAGE
        n = sum(fill[first : first + per]) + min(64, sum(zero[first : first + per]))
        if n > best_n:
            best, best_n = start, n
    return best


def stats(*windows: bytes) -> dict[str, object]:
    """Page counts over one or more windows, straight from the bytes with hashlib.

    ``copies_of_nonzero_contents`` lists, largest first, how many pages hold each non-zero
    content seen at least twice: the input the KSM model turns into counters.
    """
    data = b"".join(windows)
    pages = [data[o : o + PAGE] for o in range(0, len(data), PAGE)]
    counts = Counter(hashlib.sha256(p).digest() for p in pages if any(p))
    return {
        "pages": len(pages),
        "zero_pages": sum(1 for p in pages if not any(p)),
        "classes": dict(sorted(Counter(page_classes(data)).items())),
        "distinct_nonzero": len(counts),
        "copies_of_nonzero_contents": sorted((n for n in counts.values() if n > 1),
                                             reverse=True),
    }


def _portable_argv(argv: list[str], tmp: str) -> list[str]:
    """The QEMU argv with cache and temporary paths replaced by placeholders."""
    return [
        a.replace(str(Path(a).parent) + "/", "$CACHE/")
        if a.endswith(("vmlinuz", ".gz"))
        else re.sub(r"(file:|unix:)/[^,]*/", r"\1$TMP/", a.replace(tmp, "$TMP"))
        for a in argv
    ]


def main() -> None:
    """Boot vm-a and vm-b, write the window dumps and manifest.json."""
    parser = argparse.ArgumentParser(description="Regenerate sample_dumps/.")
    parser.add_argument("--window", type=lambda s: int(s, 0), default=WINDOW)
    parser.add_argument("--out", type=Path, default=SAMPLES)
    args = parser.parse_args()
    out: Path = args.out
    assets = ensure_guest_assets()
    pkg = assets.kernel.parent / "kernel-package.txt"
    manifest: dict[str, object] = {
        "kernel_package": pkg.read_text().split()[0] if pkg.exists() else "unknown",
        "qemu_mem_mib": MEM_MIB,
        "files": {},
    }
    files: dict[str, dict[str, object]] = {}
    windows: dict[str, bytes] = {}
    base = -1
    with tempfile.TemporaryDirectory(prefix="ksm-samples-") as tmp:
        for name, cmdline in GUESTS.items():
            with Guest(
                assets, mem_mib=MEM_MIB, cmdline_extra=cmdline, workdir=Path(tmp) / name
            ) as guest:
                guest.pause()
                if base < 0:
                    full = guest.pmemsave(0, MEM_MIB << 20, Path(tmp) / "full.raw")
                    base = choose_window(full.read_bytes(), args.window)
                    full.unlink()
                    manifest.update(
                        window_gpa=f"{base:#x}",
                        window_length=f"{args.window:#x}",
                        qemu_argv=_portable_argv(guest.argv, tmp),
                    )
                span = f"{base:#x} {args.window:#x}"
                if name == "vm-a":
                    outputs = {f"{name}.elf": f"dump-guest-memory {{file}} {span}"}
                    guest.dump_elf(out / f"{name}.elf", base, args.window)
                else:
                    outputs = {f"{name}.raw": f"pmemsave {span} {{file}}"}
                    guest.pmemsave(base, args.window, out / f"{name}.raw")
                window = guest.pmemsave(base, args.window, Path(tmp) / "w.raw").read_bytes()
                windows[name] = window
            for fname, monitor in outputs.items():
                (out / fname).chmod(0o644)  # sample files are public; QEMU creates them 0400
                data = (out / fname).read_bytes()
                files[fname] = {
                    "guest": name,
                    "kernel_cmdline_extra": cmdline,
                    "monitor_command": monitor.format(file=fname),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "window_pages": stats(window),
                }
    manifest["files"] = files
    manifest["vm-a+vm-b"] = stats(*windows.values())
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(int(f["bytes"]) for f in files.values())  # type: ignore[call-overload]
    print(json.dumps(manifest, indent=2))
    print(f"window {base:#x}+{args.window:#x}; {total:,d} bytes of dumps in {out}")


if __name__ == "__main__":
    main()
