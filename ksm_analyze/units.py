"""Human-readable units and names: sizes as text, inputs by short names (a leaf module)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePath

__all__ = ["counted", "human_bytes", "parse_duration", "parse_size", "short_names", "size_text"]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant digits, and whole numbers from
    1000 up (1023.4 MiB -> '1023 MiB', never '1.02e+03 MiB')."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1023.5 or unit == "PiB":  # what would round to 1024 is 1 of the next
            return f"{value:.0f} {unit}" if unit == "B" or abs(value) >= 999.5 \
                else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def counted(n: int, noun: str, plural: str = "") -> str:
    """1, 'input' -> '1 input'; 2 -> '2 inputs'; 1234 -> '1,234 inputs'. ``plural`` for a
    noun that does not take an s ('process', 'processes')."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def size_text(n: int) -> str:
    """A size for a message a person reads: ``human_bytes``, with the exact count after it
    where the human form rounds (1048576 -> '1 MiB'; 1000001 -> '977 KiB (1,000,001 bytes)');
    under 1 KiB, the bytes (200 -> '200 bytes')."""
    if abs(n) < 1024:
        return f"{int(n)} bytes"
    text = human_bytes(n)
    number, unit = text.split(" ")
    scale = 1024 ** ("B", "KiB", "MiB", "GiB", "TiB", "PiB").index(unit)
    if float(number) * scale == n:
        return text
    return f"{text} ({int(n):,} bytes)"


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


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str, *, what: str = "size") -> int:
    """``"256GiB"``, ``"256G"``, ``"1.5 TiB"`` or ``"4096"`` -> bytes (binary units).

    Raises:
        ValueError: naming ``what`` and the text, if it is not a size.
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not found:
        raise ValueError(f"{what} {text!r} is not a size (use e.g. 256GiB, 512M or bytes)")
    return int(float(found[1]) * _UNITS[found[2].lower()])


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, what: str) -> float:
    """Seconds in ``text``: a number and a unit, ``500ms``, ``2s``, ``1.5m``, ``1h``.

    Raises:
        ValueError: one line naming ``what`` (the option) and the forms it takes.
    """
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"{what} {text!r} is not a duration (a number and ms, s, m or h: "
                         "500ms, 2s, 1m, 1h)")
    return float(m[1]) * _UNIT_SECONDS[m[2]]
