"""Fingerprint files: what stage 1 learned of a dump, kept as Parquet, and the ``--cache``.

One file per dump (a snapshot of several processes is one file of several inputs). Its
columns are, per stored page, ``addr`` and ``prefix`` (stage 1's 16 bytes) and, when the file
is meant to travel (``ksm-analyze fingerprint``), ``content_lo``/``content_hi``: xxh3-128 of
the whole page, 0 for a zero page. Everything else stage 1 knows is file metadata (JSON under
``META_KEY``): the source dump's path, size and mtime, the format, page size, prefix bytes,
ranges, warnings and format facts of each input, and the tool version. No page bytes, and
no command line of a snapshot's processes (``SECRET_FACTS``: arguments hold passwords) unless
asked for (``keep_cmdline``).

Why content hashes for every non-zero page rather than for candidates only: which pages are
candidates depends on the whole fleet, not on one dump, and a file read on another machine
has no dump to go back to. They cost one more pass over each non-zero page's bytes
(BENCHMARKS.md, "Fleet scale"), so cache files, which live beside a readable dump, leave them
out.

A file read back is checked like a dump: a damaged or hostile file is one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import atomic_write
from .._version import __version__
from ..errors import DumpFormatError, InputError
from ..formats import DumpFormat
from ..formats.base import open_readonly
from ..hashing.stage1 import Fingerprints
from ..pages import Extent, MapFlags, PageState, check_page_size
from ..units import size_text

__all__ = ["META_KEY", "SUFFIX", "Cache", "is_fingerprint_file", "load",
           "options_of", "save", "source_of", "unchanged"]

META_KEY = b"ksm-analyze.fingerprints"
SUFFIX = ".ksmfp.parquet"
VERSION = 1
"""Bumped whenever the meaning of a column or a metadata field changes."""
SECRET_FACTS = ("cmdline",)
"""Format facts (``DumpReader.info()``) left out of a fingerprint file unless asked for: a
process's command line (``--password=...``). Its ``comm``, the executable's name, stays."""
_MAGIC = b"PAR1"
_MAX_META = 64 << 20
"""Metadata larger than this is damage (a real one is a few bytes per range)."""
_ROWS_PER_BYTE = 16
"""More pages than this per byte of file is a hostile header: the best compression seen, a
dump of zero pages only, is 0.6 pages a byte. Reading a file so costs at most 512 bytes of
memory per byte of file, plus 32 MiB."""


def source_of(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """``(absolute path, size, mtime_ns)`` of a dump: what says a fingerprint is still its."""
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def unchanged(source: tuple[str, int, int] | None) -> bool:
    """Whether the dump a fingerprint came from is here, readable and unchanged."""
    if source is None:
        return False
    try:
        return source_of(source[0]) == tuple(source) and os.access(source[0], os.R_OK)
    except OSError:
        return False


def save(path: str | os.PathLike[str], prints: Sequence[Fingerprints], *,
         source: tuple[str, int, int], options: dict[str, Any],
         contents: Sequence[np.ndarray] | None = None, keep_cmdline: bool = False) -> None:
    """Write the fingerprints of one dump's inputs to ``path`` (atomically, mode 0600);
    ``SECRET_FACTS`` are left out unless ``keep_cmdline``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {
        "addr": np.concatenate([fp.addrs for fp in prints]),
        "prefix": np.concatenate([fp.prefix for fp in prints]),
    }
    if contents is not None:
        both = np.concatenate(contents)
        columns["content_lo"], columns["content_hi"] = both[:, 0], both[:, 1]
    meta = {
        "version": VERSION,
        "tool": f"ksm-analyze {__version__}",
        "source": {"path": source[0], "size": source[1], "mtime_ns": source[2]},
        "options": options,
        "inputs": [_input_meta(fp, keep_cmdline) for fp in prints],
    }
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=1 << 20)
    atomic_write(path, sink.getvalue().to_pybytes())


def _input_meta(fp: Fingerprints, keep_cmdline: bool) -> dict[str, Any]:
    return {
        "name": fp.path,
        "format": fp.format.value,
        "address_space": fp.address_space,
        "page_size": fp.page_size,
        "prefix_bytes": fp.prefix_bytes,
        "rows": len(fp.addrs),
        "extents": [[e.addr, e.npages, int(e.state), e.file_offset, e.label, int(e.flags)]
                    for e in fp.extents],
        "info": fp.info if keep_cmdline else {k: v for k, v in fp.info.items()
                                              if k not in SECRET_FACTS},
        "warnings": fp.warnings,
    }


def is_fingerprint_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Parquet file written by :func:`save` (never raises)."""
    try:
        fd, size = open_readonly(path)
    except InputError:
        return False
    try:
        head = os.pread(fd, 4, 0)
        tail = os.pread(fd, 4, max(size - 4, 0))
    except OSError:
        return False
    finally:
        os.close(fd)
    if head != _MAGIC or tail != _MAGIC:
        return False
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return META_KEY in (pq.read_schema(path).metadata or {})
    except (OSError, ValueError, pa.ArrowException):  # a damaged footer: load() says what
        return False


def options_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The hashing options a fingerprint file was written with (after :func:`load`)."""
    options: dict[str, Any] = metadata(path)["options"]
    return options


def metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A fingerprint file's metadata (after :func:`load`): ``version``, ``tool`` (the
    ksm-analyze that wrote it), ``source`` (``path``, ``size``, ``mtime_ns``), ``options``
    (the hashing options) and ``inputs``."""
    import pyarrow.parquet as pq

    meta: dict[str, Any] = json.loads(pq.read_schema(path).metadata[META_KEY])
    return meta


def load(path: str | os.PathLike[str]) -> list[Fingerprints]:
    """The inputs of a fingerprint file, with ``source`` and (if stored) ``content`` set.

    Raises:
        DumpFormatError: the file is damaged or not what :func:`save` writes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.fspath(path)

    def bad(detail: str) -> DumpFormatError:
        return DumpFormatError(f"fingerprint file: {detail}", path=path, offset=0)

    try:
        pf = pq.ParquetFile(path)
        raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
        if raw is None or len(raw) > _MAX_META:
            raise bad("no ksm-analyze metadata (or more than 64 MiB of it)")
        meta = json.loads(raw)
        names = set(pf.schema_arrow.names)
        wanted = ["addr", "prefix", *(["content_lo", "content_hi"]
                                      if "content_lo" in names else [])]
        if not {"addr", "prefix"} <= names:
            raise bad("the addr and prefix columns are missing")
        rows, limit = pf.metadata.num_rows, _ROWS_PER_BYTE * os.path.getsize(path) + (1 << 20)
        if rows > limit:
            raise bad(f"it claims {rows:,} pages, more than a file of "
                      f"{size_text(os.path.getsize(path))} can hold ({limit:,})")
        table = pf.read(columns=wanted)
    except DumpFormatError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        raise bad(f"cannot read it as Parquet ({str(e).splitlines()[0][:200]})") from None
    try:
        return _inputs(table, meta, path)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise bad(f"bad metadata ({type(e).__name__}: {str(e)[:200]})") from None


def _inputs(table: Any, meta: dict[str, Any], path: str) -> list[Fingerprints]:
    if meta["version"] != VERSION:
        raise ValueError(f"version {meta['version']}, this tool reads {VERSION}")
    src = meta["source"]
    source = (str(src["path"]), int(src["size"]), int(src["mtime_ns"]))

    def column(name: str) -> np.ndarray:
        values: np.ndarray = table.column(name).to_numpy()
        if values.dtype != np.uint64:
            raise ValueError(f"column {name} is {values.dtype}, not uint64")
        return values

    addrs, prefix = column("addr"), column("prefix")
    content = (np.stack([column("content_lo"), column("content_hi")], axis=1)
               if "content_lo" in table.column_names else None)
    out, start = [], 0
    for m in meta["inputs"]:
        check_page_size(int(m["page_size"]))
        if not 0 < int(m["prefix_bytes"]) <= int(m["page_size"]) or int(m["rows"]) < 0:
            raise ValueError(f"input {m['name']!r}: prefix_bytes or rows out of range")
        stop = start + int(m["rows"])
        extents = [Extent(int(a), int(n), PageState(int(s)), int(fo), str(label),
                          MapFlags(int(flags)))
                   for a, n, s, fo, label, flags in m["extents"]]
        stored = sum(e.npages for e in extents if e.state == PageState.DATA)
        if stop > len(addrs) or stored != stop - start:
            raise ValueError(f"input {m['name']!r}: {stop - start} rows for {stored} stored "
                             f"pages, {len(addrs)} rows in the file")
        _check_addresses(addrs[start:stop], extents, int(m["page_size"]), str(m["name"]))
        state_pages = dict.fromkeys(PageState, 0)
        for e in extents:
            state_pages[e.state] += e.npages
        out.append(Fingerprints(
            path=str(m["name"]), format=DumpFormat.parse(m["format"]),
            address_space=str(m["address_space"]), page_size=int(m["page_size"]),
            prefix_bytes=int(m["prefix_bytes"]), extents=extents, info=dict(m["info"]),
            warnings=[str(w) for w in m["warnings"]], addrs=addrs[start:stop],
            prefix=prefix[start:stop], state_pages=state_pages,
            content=None if content is None else content[start:stop], source=source))
        start = stop
    if start != len(addrs):
        raise ValueError(f"{len(addrs) - start} rows belong to no input")
    return out


def _check_addresses(addrs: np.ndarray, extents: list[Extent], page_size: int,
                     name: str) -> None:
    """Every address must start a distinct page of a stored range: stage 2 reads them."""
    data = [e for e in extents if e.state == PageState.DATA]
    starts = np.array([e.addr for e in data], np.uint64)
    ends = starts + np.array([e.npages for e in data], np.uint64) * np.uint64(page_size)
    which = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
    inside = (which >= 0) & (addrs < ends[np.maximum(which, 0)]) if len(data) else (
        np.zeros(len(addrs), bool))
    aligned = (addrs - starts[np.maximum(which, 0)]) % np.uint64(page_size) == 0 if len(
        data) else inside
    if not (inside & aligned).all() or len(np.unique(addrs)) != len(addrs):
        raise ValueError(f"input {name!r}: an address that is not one stored page")


class Cache:
    """Fingerprints of dumps kept in a folder, keyed by what changes them: the dump's path,
    size and mtime, and the options that change its hashes."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.hits: list[str] = []
        self.stored: list[str] = []

    def file_for(self, path: str | os.PathLike[str], key: dict[str, Any]) -> Path:
        """Where the fingerprints of ``path`` under the options ``key`` live."""
        what = json.dumps([*source_of(path), key, VERSION], sort_keys=True, default=str)
        return self.folder / (hashlib.sha256(what.encode()).hexdigest()[:32] + SUFFIX)

    def get(self, path: str | os.PathLike[str], key: dict[str, Any]) -> list[Fingerprints] | None:
        """The cached fingerprints of ``path``, or None (also for a damaged entry)."""
        entry = self.file_for(path, key)
        if not entry.exists():
            return None
        try:
            prints = load(entry)
        except DumpFormatError:
            return None  # rewritten below
        self.hits.append(os.fspath(path))
        return prints

    def put(self, path: str | os.PathLike[str], key: dict[str, Any],
            prints: Sequence[Fingerprints]) -> None:
        """Keep the fingerprints of ``path`` (the folder is made private if new)."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        save(self.file_for(path, key), prints, source=source_of(path), options=key)
        self.stored.append(os.fspath(path))
