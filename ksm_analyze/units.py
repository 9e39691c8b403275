"""Human-readable units and names: sizes as text, inputs by short names (a leaf module)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import PurePath

__all__ = ["human_bytes", "short_names"]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant digits."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def short_names(paths: Sequence[str]) -> list[str]:
    """Each input's file name, with as many parent folders as it takes to tell apart inputs
    whose file names are equal (``a/vm.raw``, ``b/vm.raw``): tables and charts key by them."""
    parts = [PurePath(p).parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        clash = {n for n, k in Counter(names).items() if k > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: Counter[str] = Counter()
    for i, n in enumerate(names):  # the same path twice still gets two names
        seen[n] += 1
        names[i] = n if seen[n] == 1 else f"{n}#{seen[n]}"
    return names
