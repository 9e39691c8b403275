"""The compiled inner loops (``_compiled.c``), where they were built, behind typed wrappers.

Stage 1 and stage 2 work on pages in place with them: stage 1 hashes each page's prefix
straight from the memory map, stage 2 compares a candidate with its representative with one
``memcmp``, with no gather copy in between (a copy of each page doubled the memory traffic,
the bound of both stages). ``native`` is None where the extension was not built (no C
compiler when the package was installed) or ``KSM_ANALYZE_NO_KERNELS`` is set (to anything
but ``0``: the numpy code on purpose, as msgpack's ``MSGPACK_PUREPYTHON``); callers then run
their numpy code, which gives the same results, and ``numpy_reason`` says why. This module
alone decides: every caller asks ``native`` (or :func:`usable`, :func:`reads_in_place`).
Tests run both.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..formats.base import DumpReader

__all__ = ["SWITCH", "equal_rows", "lz77_pages", "native", "numpy_reason", "page_hashes",
           "prefix_hashes", "qevm_ram_records", "reads_in_place", "usable"]

SWITCH = "KSM_ANALYZE_NO_KERNELS"
"""The environment variable that turns the compiled kernels off (any value but ``0``)."""


def _load() -> tuple[ModuleType | None, str | None]:
    if os.environ.get(SWITCH, "0") not in ("", "0"):
        return None, f"{SWITCH}={os.environ[SWITCH]}"  # not even imported
    try:
        return importlib.import_module(f"{__package__}._compiled"), None
    except ModuleNotFoundError:
        return None, "no C compiler when it was installed"
    except ImportError as e:  # built, but this interpreter cannot load it
        return None, f"the built extension does not load ({e})"


native: ModuleType | None
numpy_reason: str | None
native, numpy_reason = _load()
"""``native``: the extension module, or None (then every caller takes its numpy path);
``numpy_reason``: why it is None (for ``--version``), else None."""


def usable(*pages: np.ndarray) -> bool:
    """The kernels are built and can read these page arrays in place: each row contiguous,
    the rows one after another or a constant pitch of at least a row apart (a migration
    stream's pages, each behind its 8-byte record header)."""
    return native is not None and all(_rows(p) for p in pages)


def _rows(p: np.ndarray) -> bool:
    return bool(p.flags.c_contiguous) or (
        p.ndim == 2 and p.itemsize == 1 and p.strides[1] == 1
        and (p.shape[0] <= 1 or p.strides[0] >= p.shape[1]))


def reads_in_place(readers: Iterable[DumpReader | None]) -> bool:
    """The kernels are built and every one of ``readers`` stores its pages raw, so work on
    them reads pages in place, without the GIL: threads rather than forked processes."""
    return native is not None and all(r is not None and r.in_place for r in readers)


def prefix_hashes(pages: np.ndarray, nbytes: int, skip: np.ndarray | None = None) -> np.ndarray:
    """Per page of ``pages`` ``(n, page_size)``: 0 if all zero (or ``skip``), else xxh3-64 of
    its first ``nbytes`` bytes (1 for a hash of 0)."""
    assert native is not None
    out = np.empty(len(pages), np.uint64)
    flags = None if skip is None else np.ascontiguousarray(skip, dtype=np.bool_)
    native.prefix_hashes(pages, pages.shape[1], nbytes, flags, out)
    return out


def equal_rows(pages: np.ndarray, rows: np.ndarray, reps: np.ndarray,
               keys: np.ndarray) -> np.ndarray:
    """bool per entry: page ``rows[i]`` of ``pages`` equals page ``keys[i]`` of ``reps``."""
    assert native is not None
    out = np.empty(len(rows), np.bool_)
    native.equal_rows(pages, pages.shape[1], _int64(rows), np.ascontiguousarray(reps),
                      _int64(keys), out)
    return out


def page_hashes(pages: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """xxh3-64 of the whole page ``rows[i]`` of ``pages``, for each entry."""
    assert native is not None
    out = np.empty(len(rows), np.uint64)
    native.page_hashes(pages, pages.shape[1], _int64(rows), out)
    return out


def qevm_ram_records(buf: object, pos: int, page_size: int, length: int,
                     where: np.ndarray, base: int = 0) -> tuple[int, int]:
    """Index the PAGE|CONTINUE and ZERO|CONTINUE records of a QEMU migration stream from
    ``pos`` into ``where`` (formats/migration.py's page index of one RAM block of ``length``
    bytes); returns (offset in ``buf`` of the first record not taken, records taken). A page's
    entry is ``base`` plus its offset in ``buf`` (``buf`` a window of a decompressed stream
    that starts at ``base``). The reader's numpy walk does the same where the kernels are not
    built."""
    assert native is not None
    got: tuple[int, int] = native.qevm_ram_records(buf, pos, page_size, length, where, base)
    return got


def lz77_pages(src: object, jobs: np.ndarray, out: np.ndarray) -> tuple[int, str] | None:
    """Decode plain LZ77 streams ([MS-XCA] 2.4) of ``src`` into ``out``, one per row of
    ``jobs`` ``(k, 4)``: src_offset, src_length, out_offset, out_length; in one call, without
    the GIL (formats/vmrs.py: a RamBlock's compressed pages). None if every one decoded to
    exactly its length, else (row, message) of the first that did not, with the message
    formats/lz77.py's ``decompress`` raises for it. formats/vmrs.py decodes page by page with
    that Python decoder where the kernels are not built."""
    assert native is not None
    got: tuple[int, str] | None = native.lz77_pages(src, _int64(jobs), out)
    return got


def _int64(a: np.ndarray) -> np.ndarray:
    """``a`` as the kernels take an index array: int64, C-contiguous and aligned (a copy only
    when it is not already; the kernels refuse anything else with a ValueError)."""
    return np.require(a, np.int64, ["C_CONTIGUOUS", "ALIGNED"])
