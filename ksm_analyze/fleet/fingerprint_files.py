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

A file proves its integrity: ``save`` writes Parquet page checksums (CRC-32 of each page,
checked as it is read) and, under ``DIGEST_KEY``, the SHA-256 of the exact metadata bytes and
of every column's values in a fixed order, checked by ``load`` before anything is used. A
file read back is then checked like a dump's header: the metadata is parsed with bounds (its
size, its nesting depth, every number an integer in range, every string a string, page counts
tied to the file's rows, at least one input). A damaged or hostile file, or one cut short, is
one line naming it; a file named ``*.ksmfp.parquet`` or starting with ``PAR1`` is never read
as a dump. The digest catches damage, not forgery: whoever can write the file can write a
matching digest, so the bounds still hold for a file whose digest matches.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import DIR_MODE, atomic_file
from .._version import __version__
from ..errors import DumpFormatError, InputError, TruncatedDumpError
from ..formats import FINGERPRINT_SUFFIX, PARQUET_MAGIC, DumpFormat, looks_like_fingerprint_file
from ..formats.base import ADDRESS_LIMIT, open_readonly, strict_json
from ..hashing.stage1 import Fingerprints
from ..pages import Extent, MapFlags, PageState, check_page_size
from ..units import size_text

__all__ = ["DIGEST_KEY", "META_KEY", "SUFFIX", "Cache", "digest", "is_fingerprint_file", "load",
           "metadata", "options_of", "same_dump", "save", "source_of", "unchanged",
           "write_columns"]

META_KEY = b"ksm-analyze.fingerprints"
DIGEST_KEY = b"ksm-analyze.sha256"
"""Schema metadata: :func:`digest` of the file's metadata and columns, in hex."""
SUFFIX = FINGERPRINT_SUFFIX
VERSION = 2
"""Bumped whenever the meaning of a column or a metadata field changes (2: the digest)."""
SECRET_FACTS = ("cmdline",)
"""Format facts (``DumpReader.info()``) left out of a fingerprint file unless asked for: a
process's command line (``--password=...``). Its ``comm``, the executable's name, stays."""
COLUMNS = ("addr", "prefix", "content_lo", "content_hi")
"""Every column, in the order :func:`digest` hashes them; the last two are optional."""
_MAX_META = 64 << 20
"""Metadata larger than this is damage (a real one is a few bytes per range)."""
_MAX_DEPTH = 32
"""Deepest nesting of lists and objects the metadata may have (a real one has 5)."""
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of half a surrogate pair: a lone one is a string no output can write."""
_INT_MIN, _INT_END = -(1 << 63), 1 << 64
"""Any integer in the metadata lies in [-2^63, 2^64)."""
_MAX_PAGE = 1 << 30
"""The largest page size a file may declare (a 1 GiB huge page)."""
_FLAGS_END = max(MapFlags) << 1
"""Every MapFlags value is below this."""
_ROWS_PER_BYTE = 16
"""More pages than this per byte of file is a hostile header: the best compression seen, a
dump of zero pages only, is 0.6 pages a byte. Reading a file so costs at most 512 bytes of
memory per byte of file, plus 32 MiB."""


def source_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What says a fingerprint is still its dump's: the absolute path, size, mtime, and
    the ctime, device and inode, which a copy that restores size and mtime (``cp -p``,
    ``rsync -t``, ``touch -d``) cannot restore. Also the dump's identity: two inputs with the
    same (see :func:`same_dump`) are one guest."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "dev": st.st_dev, "ino": st.st_ino}


_SOURCE_KEYS = ("path", "size", "mtime_ns", "ctime_ns", "dev", "ino")
LIVE_PREFIX = "live:"
"""The ``path`` of a live process's source: ``live:<boot_id>:<pid>:<start_time>``, its
``mtime_ns`` the moment the sample was taken."""


def unchanged(source: dict[str, Any] | None) -> bool:
    """Whether the dump a fingerprint came from is here, readable and unchanged (every fact
    of :func:`source_of` recorded and equal: a file written before they all were is taken as
    changed)."""
    if source is None or any(source.get(k) is None for k in _SOURCE_KEYS):
        return False
    try:
        now = source_of(source["path"])
    except OSError:
        return False
    return all(now[k] == source[k] for k in _SOURCE_KEYS) and os.access(now["path"], os.R_OK)


def same_dump(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`source_of` records are of one file: the same device and inode
    (a link, a hard link, a renamed file) with the same path, or with the same size and
    mtime (on another machine, equal numbers by chance are not enough); without them
    recorded, the same path and size. Samples of a live process are one only when taken at
    the same moment."""
    if LIVE_PREFIX in (str(a.get("path"))[:5], str(b.get("path"))[:5]):
        # A sample of a live process: samples taken at other moments are other inputs
        # (samples of one input over time, ksm_analyze.series), not one input twice.
        return bool(a["path"] == b["path"] and a.get("mtime_ns") == b.get("mtime_ns"))
    if a.get("dev") is not None and b.get("dev") is not None:
        return (a["dev"], a["ino"]) == (b["dev"], b["ino"]) and (
            a["path"] == b["path"] or (a["size"], a["mtime_ns"]) == (b["size"], b["mtime_ns"]))
    return bool(a["path"] == b["path"] and a["size"] == b["size"])


def digest(meta: bytes, columns: dict[str, np.ndarray]) -> str:
    """SHA-256, in hex, of the metadata bytes and of each column of :data:`COLUMNS` present
    (its name, its length and its values as little-endian uint64), in that order."""
    h = hashlib.sha256(b"ksm-analyze fingerprint file\0")
    h.update(len(meta).to_bytes(8, "little") + meta)
    for name in COLUMNS:
        if name in columns:
            values = np.ascontiguousarray(columns[name], dtype="<u8")
            h.update(name.encode() + b"\0" + len(values).to_bytes(8, "little"))
            h.update(values.data)
    return h.hexdigest()


def save(path: str | os.PathLike[str], prints: Sequence[Fingerprints], *,
         source: dict[str, Any], options: dict[str, Any],
         contents: Sequence[np.ndarray] | None = None, keep_cmdline: bool = False) -> None:
    """Write the fingerprints of one dump's inputs to ``path`` (atomically, mode 0600), with
    Parquet page checksums and the :func:`digest` of what it holds; ``SECRET_FACTS`` are
    left out unless ``keep_cmdline``."""
    if not prints:
        raise ValueError("a fingerprint file holds at least one input")
    columns: dict[str, Any] = {
        "addr": np.concatenate([fp.addrs for fp in prints]),
        "prefix": np.concatenate([fp.prefix for fp in prints]),
    }
    if contents is not None:
        both = np.concatenate(contents)
        columns["content_lo"], columns["content_hi"] = both[:, 0], both[:, 1]
    write_columns(path, prints, columns, source=source, options=options,
                  keep_cmdline=keep_cmdline)


ROW_GROUP = 1 << 16
"""Rows per Parquet row group: what is held in memory at a time while a file is written
(with no dictionary encoding, which holds a whole column chunk until it ends: 100 MiB more
for a million rows of hashes, which do not repeat enough for it to pay)."""


def write_columns(path: str | os.PathLike[str], prints: Sequence[Fingerprints],
                  columns: dict[str, np.ndarray], *, source: dict[str, Any],
                  options: dict[str, Any], keep_cmdline: bool = False) -> None:
    """:func:`save` with the columns given whole (``addr``, ``prefix`` and optionally
    ``content_lo`` and ``content_hi``, the rows of ``prints`` one input after the other; they
    may be memory maps of files): streamed to a temporary file a row group at a time and
    renamed into place (mode 0600), so writing costs a row group of memory, not the file.
    The ``addrs`` and ``prefix`` of ``prints`` are not read, only their metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not prints:
        raise ValueError("a fingerprint file holds at least one input")
    columns = {name: np.ascontiguousarray(columns[name], dtype=np.uint64)
               for name in COLUMNS if name in columns}
    rows = len(columns["addr"])
    if any(len(v) != rows for v in columns.values()) or rows != sum(
            len(fp.addrs) for fp in prints):
        raise ValueError("the columns and the inputs hold different numbers of rows")
    meta = json.dumps({
        "version": VERSION,
        "tool": f"ksm-analyze {__version__}",
        "source": {k: source.get(k) for k in _SOURCE_KEYS},
        "options": options,
        "inputs": [_input_meta(fp, keep_cmdline) for fp in prints],
    }, allow_nan=False).encode()
    schema = pa.schema([(name, pa.uint64()) for name in columns]).with_metadata(
        {META_KEY: meta, DIGEST_KEY: digest(meta, columns).encode()})
    with atomic_file(path) as tmp, pq.ParquetWriter(
            tmp, schema, compression="zstd", write_page_checksum=True,
            use_dictionary=False) as writer:
        for lo in range(0, rows, ROW_GROUP):
            writer.write_table(pa.table({name: pa.array(v[lo : lo + ROW_GROUP])
                                         for name, v in columns.items()}, schema=schema),
                               row_group_size=ROW_GROUP)


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
    """Whether ``path`` is to be read as a fingerprint file (never raises): it is named
    ``*.ksmfp.parquet`` or starts with ``PAR1``. :func:`load` then checks it whole: a damaged
    one is an error, never a dump."""
    return looks_like_fingerprint_file(path)


def options_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The hashing options a fingerprint file was written with (after :func:`load`)."""
    options: dict[str, Any] = metadata(path)["options"]
    return options


def metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A fingerprint file's metadata (after :func:`load`): ``version``, ``tool`` (the
    ksm-analyze that wrote it), ``source`` (:func:`source_of`), ``options``
    (the hashing options) and ``inputs``, checked as :func:`load` checks them.

    Raises:
        DumpFormatError: the file is damaged or not what :func:`save` writes.
    """
    path = os.fspath(path)
    pf, raw, _ = _open(path)
    try:
        return checked_meta(raw, pf.metadata.num_rows)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise _bad(path, f"bad metadata ({type(e).__name__}: {str(e)[:200]})") from None


def _bad(path: str, detail: str, offset: int | None = None) -> DumpFormatError:
    return DumpFormatError(f"fingerprint file: {detail}", path=path, offset=offset)


def _open(path: str) -> tuple[Any, bytes, bytes]:
    """The Parquet file at ``path`` (whole: magic at both ends, page checksums checked as it
    is read), its metadata and its digest, or a DumpFormatError saying what is wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fd, size = open_readonly(path)
    try:
        head, tail = os.pread(fd, 4, 0), os.pread(fd, 4, max(size - 4, 0))
    except OSError as e:
        raise _bad(path, f"cannot read it ({e.strerror})") from None
    finally:
        os.close(fd)
    if head != PARQUET_MAGIC:
        raise _bad(path, f"not a Parquet file (first bytes {head.hex(' ')}, not "
                         f"{PARQUET_MAGIC.hex(' ')})", 0)
    if size < 12 or tail != PARQUET_MAGIC:
        raise TruncatedDumpError(
            f"fingerprint file: no Parquet footer at the end of its {size_text(size)}: cut "
            "short (an interrupted copy?) or damaged", path=path, offset=max(size - 4, 0))
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        kv = pf.schema_arrow.metadata or {}
    except (OSError, ValueError, pa.ArrowException) as e:
        raise _bad(path, f"cannot read it as Parquet ({str(e).splitlines()[0][:200]})"
                   ) from None
    raw, sha = kv.get(META_KEY), kv.get(DIGEST_KEY)
    if raw is None:
        raise _bad(path, "a Parquet file without ksm-analyze metadata: not a fingerprint file")
    if len(raw) > _MAX_META:
        raise _bad(path, f"{size_text(len(raw))} of metadata, more than the "
                         f"{size_text(_MAX_META)} a fingerprint file may hold")
    if sha is None:
        raise _bad(path, "it has no integrity digest: written by a ksm-analyze older than "
                         "this one (or altered); fingerprint its dump again")
    return pf, raw, sha


def load(path: str | os.PathLike[str]) -> list[Fingerprints]:
    """The inputs of a fingerprint file, with ``source`` and (if stored) ``content`` set.

    Raises:
        InputError: the file cannot be opened.
        DumpFormatError: the file is damaged (its digest or a page checksum does not match,
            it is cut short) or not what :func:`save` writes.
    """
    import pyarrow as pa

    path = os.fspath(path)

    def bad(detail: str) -> DumpFormatError:
        return _bad(path, detail)

    pf, raw, sha = _open(path)
    try:
        names = pf.schema_arrow.names
        if len(set(names)) != len(names):
            raise bad("a column name is repeated")
        wanted = [c for c in COLUMNS if c in names]
        if wanted not in (list(COLUMNS[:2]), list(COLUMNS)):
            raise bad(f"columns {', '.join(wanted) or 'none'}; a fingerprint file has addr "
                      "and prefix, and content_lo and content_hi or neither")
        rows, size = pf.metadata.num_rows, os.path.getsize(path)
        limit = _ROWS_PER_BYTE * size + (1 << 20)
        if not 0 <= rows <= limit:
            raise bad(f"it claims {rows:,} pages, more than a file of "
                      f"{size_text(size)} can hold ({limit:,})")
        # Threads only where there is work to share: for a file of a few row groups,
        # starting them costs more than decoding (a third of reading a small file).
        table = pf.read(columns=wanted, use_threads=pf.metadata.num_row_groups > 2)
    except DumpFormatError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        raise bad(f"cannot read it as Parquet ({str(e).splitlines()[0][:200]})") from None
    try:
        columns = {name: _column(table, name) for name in wanted}
    except (ValueError, pa.ArrowException) as e:
        raise bad(str(e).splitlines()[0][:200]) from None
    if len(columns["addr"]) != rows:
        raise bad(f"{len(columns['addr']):,} rows read, {rows:,} in its footer")
    if digest(raw, columns).encode() != sha:
        raise bad("its contents do not match its digest: the file is damaged or was altered; "
                  "copy or fingerprint it again")
    try:
        return _inputs(columns, checked_meta(raw, rows), path)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise bad(f"bad metadata ({type(e).__name__}: {str(e)[:200]})") from None


def _column(table: Any, name: str) -> np.ndarray:
    column = table.column(name)
    if column.null_count:
        raise ValueError(f"column {name} has {column.null_count:,} missing values")
    values: np.ndarray = column.to_numpy()
    if values.dtype != np.uint64:
        raise ValueError(f"column {name} is {values.dtype}, not uint64")
    return values


# -- the metadata, checked like a dump's header ---------------------------------------------


def _depth(raw: bytes) -> int:
    """The deepest nesting of lists and objects in the JSON text ``raw`` (strings skipped),
    counted without recursion."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    deepest, depth = 0, 0
    for start in range(0, len(skeleton), 1 << 20):
        chunk = skeleton[start:start + (1 << 20)]
        steps = ((chunk == ord("[")) | (chunk == ord("{"))).astype(np.int32) - (
            (chunk == ord("]")) | (chunk == ord("}")))
        if len(steps):
            levels = np.cumsum(steps) + depth
            deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def _typed(value: Any, kind: type, what: str, low: int = 0, end: int = _INT_END) -> Any:
    """``value`` if it is exactly a ``kind`` (an int in [low, end))."""
    if type(value) is not kind:
        raise TypeError(f"{what} is {type(value).__name__}, not {kind.__name__}")
    if isinstance(value, int) and not low <= value < end:
        raise ValueError(f"{what} {value} is not between {low} and {end - 1}")
    return value


def _check_json(value: Any, what: str) -> None:
    """Every number in ``value`` in range (floats are finite already), without recursion."""
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, dict):
            todo += v.values()
        elif isinstance(v, list):
            todo += v
        elif type(v) is int and not _INT_MIN <= v < _INT_END:
            raise ValueError(f"{what}: the number {v} is out of range")


def checked_meta(raw: bytes, rows: int) -> dict[str, Any]:
    """The metadata decoded, every field the readers use checked (type, range) against a file
    of ``rows`` rows: a ValueError, TypeError or KeyError says what is wrong."""
    if (depth := _depth(raw)) > _MAX_DEPTH:
        raise ValueError(f"nested {depth} deep, more than {_MAX_DEPTH}")
    meta: dict[str, Any] = _typed(
        strict_json(raw), dict, "the metadata")
    _check_json(meta, "the metadata")
    if _SURROGATE.search(raw):
        try:
            json.dumps(meta, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff), which is "
                             "not text") from None
    if _typed(meta["version"], int, "version") != VERSION:
        raise ValueError(f"version {meta['version']}, this ksm-analyze reads {VERSION}; "
                         "fingerprint the dump again with this one")
    _typed(meta["tool"], str, "tool")
    src = _typed(meta["source"], dict, "source")
    _typed(src["path"], str, "source path")
    _typed(src["size"], int, "source size", 0, 1 << 63)
    _typed(src["mtime_ns"], int, "source mtime_ns", -(1 << 63), 1 << 63)
    for key in ("ctime_ns", "dev", "ino"):  # recorded since identity (issue 18); may be absent
        if src.get(key) is not None:
            _typed(src[key], int, f"source {key}", -(1 << 63), 1 << 64)
    options = _typed(meta["options"], dict, "options")
    if options.get("format") is not None:
        DumpFormat.parse(_typed(options["format"], str, "options format"))
    _typed(options.get("base_address", 0), int, "options base_address")
    inputs = _typed(meta["inputs"], list, "inputs")
    if not inputs:
        raise ValueError("no inputs: a fingerprint file holds at least one")
    total = 0
    for i, m in enumerate(inputs):
        what = f"input {i}"
        _typed(m, dict, what)
        _typed(m["name"], str, f"{what} name")
        DumpFormat.parse(_typed(m["format"], str, f"{what} format"))
        if _typed(m["address_space"], str, f"{what} address_space") not in ("physical",
                                                                            "virtual"):
            raise ValueError(f"{what} address_space is neither physical nor virtual")
        page_size = _typed(m["page_size"], int, f"{what} page_size", 512, _MAX_PAGE + 1)
        check_page_size(page_size)
        _typed(m["prefix_bytes"], int, f"{what} prefix_bytes", 1, page_size + 1)
        if (page_size, m["prefix_bytes"]) != (inputs[0]["page_size"],
                                              inputs[0]["prefix_bytes"]):
            raise ValueError(f"{what} has another page size or prefix_bytes than input 0")
        total += _typed(m["rows"], int, f"{what} rows", 0, rows + 1)
        _check_extents(_typed(m["extents"], list, f"{what} extents"), m["rows"], page_size,
                       what)
        info = _typed(m["info"], dict, f"{what} info")
        if info.get("kernel") is not None:
            _typed(info["kernel"], str, f"{what} info kernel")
        for w in _typed(m["warnings"], list, f"{what} warnings"):
            _typed(w, str, f"{what} warning")
    if total != rows:
        raise ValueError(f"the inputs hold {total:,} rows, the file {rows:,}")
    return meta


def _check_extents(extents: list[Any], rows: int, page_size: int, what: str) -> None:
    """Extents in address order, not overlapping, within 2^64, together spanning at most
    ADDRESS_LIMIT bytes (what a dump reader allows), with exactly ``rows`` stored pages."""
    end, span, stored = 0, 0, 0
    for k, e in enumerate(extents):
        where = f"{what} extent {k}"
        if len(_typed(e, list, where)) != 6:
            raise ValueError(f"{where} is not [addr, pages, state, file_offset, label, flags]")
        addr = _typed(e[0], int, f"{where} address")
        npages = _typed(e[1], int, f"{where} pages", 1, ADDRESS_LIMIT // page_size + 1)
        state = PageState(_typed(e[2], int, f"{where} state", 0, len(PageState)))
        _typed(e[3], int, f"{where} file_offset", -1, 1 << 63)
        _typed(e[4], str, f"{where} label")
        _typed(e[5], int, f"{where} flags", 0, _FLAGS_END)
        if addr % page_size or addr < end:
            raise ValueError(f"{where} at {addr:#x} is not page-aligned or overlaps the one "
                             "before")
        end = addr + npages * page_size
        span += npages * page_size
        if end > _INT_END or span > ADDRESS_LIMIT:
            raise ValueError(f"{where} ends past 2^64, or the extents span more than 2^56 bytes")
        stored += npages if state == PageState.DATA else 0
    if stored != rows:
        raise ValueError(f"{what}: {rows:,} rows for {stored:,} stored pages")


def _inputs(columns: dict[str, np.ndarray], meta: dict[str, Any], path: str
            ) -> list[Fingerprints]:
    src = meta["source"]
    source = {"path": str(src["path"]), **{k: None if src.get(k) is None else int(src[k])
                                            for k in _SOURCE_KEYS[1:]}, "file": path}
    addrs, prefix = columns["addr"], columns["prefix"]
    content = (np.stack([columns["content_lo"], columns["content_hi"]], axis=1)
               if "content_lo" in columns else None)
    out, start = [], 0
    for m in meta["inputs"]:
        stop = start + m["rows"]
        extents = [Extent(a, n, PageState(s), fo, label, MapFlags(flags))
                   for a, n, s, fo, label, flags in m["extents"]]
        _check_addresses(addrs[start:stop], extents, m["page_size"], m["name"])
        state_pages = dict.fromkeys(PageState, 0)
        for e in extents:
            state_pages[e.state] += e.npages
        out.append(Fingerprints(
            path=m["name"], format=DumpFormat.parse(m["format"]),
            address_space=m["address_space"], page_size=m["page_size"],
            prefix_bytes=m["prefix_bytes"], extents=extents, info=m["info"],
            warnings=m["warnings"], addrs=addrs[start:stop],
            prefix=prefix[start:stop], state_pages=state_pages,
            content=None if content is None else content[start:stop], source=source))
        start = stop
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
    if not (inside & aligned).all() or not _distinct(addrs):
        raise ValueError(f"input {name!r}: an address that is not one stored page")


def _distinct(addrs: np.ndarray) -> bool:
    """Whether no address repeats: one comparison when they are in increasing order (as
    stage 1 writes them), a sort otherwise (``np.unique`` hashes: seconds a million)."""
    if bool(np.all(addrs[1:] > addrs[:-1])):
        return True
    ordered = np.sort(addrs)
    return not bool(np.any(ordered[1:] == ordered[:-1]))


class Cache:
    """Fingerprints of dumps kept in a folder, keyed by what changes them: the dump's source
    (:func:`source_of`: path, size, mtime, ctime, device and inode) and the options that change its hashes.

    An entry's file name is only where to look: :meth:`get` uses an entry only if it is a
    regular file of this user's that nobody else can write, opened without following a
    symbolic link, read by :func:`load`, and recorded for this very source and these
    options; anything else is a miss, said once in :attr:`problems`, and the entry is
    rewritten by :meth:`put`. The folder must be this user's and writable by nobody else
    (else :class:`InputError`: anyone who can write it can plant an answer); a new one is
    made 0700.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.hits: list[str] = []
        self.stored: list[str] = []
        self.problems: dict[str, str] = {}
        """Per dump path: why its entry was not used, or could not be written (one line)."""
        self._check_folder()

    def _check_folder(self) -> None:
        def refuse(detail: str) -> InputError:
            return InputError(f"--cache {detail}", path=self.folder)

        try:
            self.folder.mkdir(mode=DIR_MODE, parents=True)
        except FileExistsError:
            pass
        except OSError as e:
            raise refuse(f"folder cannot be made ({e.strerror})") from None
        try:
            st = os.stat(self.folder)
        except OSError as e:
            raise refuse(f"folder cannot be read ({e.strerror})") from None
        if not stat.S_ISDIR(st.st_mode):
            raise refuse("needs a folder; this is not one")
        if st.st_uid != os.geteuid():
            raise refuse(f"folder belongs to another user (uid {st.st_uid}), who could plant "
                         "entries in it: give a folder of your own")
        if st.st_mode & 0o022:
            raise refuse(f"folder can be written by others (mode {st.st_mode & 0o7777:04o}), "
                         "who could plant entries in it: chmod go-w it or give another folder")

    def file_for(self, path: str | os.PathLike[str], key: dict[str, Any]) -> Path:
        """Where the fingerprints of ``path`` under the options ``key`` live."""
        what = json.dumps([source_of(path), key, VERSION], sort_keys=True, default=str)
        return self.folder / (hashlib.sha256(what.encode()).hexdigest()[:32] + SUFFIX)

    def get(self, path: str | os.PathLike[str], key: dict[str, Any],
            check: Callable[[list[Fingerprints]], str | None] | None = None
            ) -> list[Fingerprints] | None:
        """The cached fingerprints of ``path``, or None: no entry, or one that is not this
        dump's under ``key`` (said in :attr:`problems`). ``check`` adds the caller's test of
        the fingerprints (what the dump's readers see): a reason to refuse them, or None."""
        entry = self.file_for(path, key)
        try:
            prints = self._read(entry, path, key)
            problem = check(prints) if prints is not None and check is not None else None
        except _Miss as e:
            problem = str(e)
        if problem is not None:
            self.problems[os.fspath(path)] = (
                f"cache entry {entry} {problem}: not used; {os.fspath(path)} was read again")
            return None
        if prints is not None:
            self.hits.append(os.fspath(path))
        return prints

    def _read(self, entry: Path, path: str | os.PathLike[str], key: dict[str, Any]
              ) -> list[Fingerprints] | None:
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _Miss("is a symbolic link" if e.errno == errno.ELOOP
                        else f"cannot be opened ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _Miss("is not a regular file")
            if st.st_uid != os.geteuid():
                raise _Miss(f"belongs to another user (uid {st.st_uid})")
            if st.st_mode & 0o022:
                raise _Miss(f"can be written by others (mode {st.st_mode & 0o7777:04o})")
            try:
                prints = load(entry)
                meta = metadata(entry)
            except DumpFormatError as e:
                raise _Miss(f"is damaged ({_line(e.detail)})") from None
            except Exception as e:  # noqa: BLE001 - any damage is a miss, never a crash
                raise _Miss(f"is damaged ({type(e).__name__}: {_line(str(e))})") from None
            now = os.lstat(entry)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise _Miss("was replaced while read")
        finally:
            os.close(fd)
        _matches(prints, meta, path, key)
        return prints

    def put(self, path: str | os.PathLike[str], key: dict[str, Any],
            prints: Sequence[Fingerprints]) -> bool:
        """Keep the fingerprints of ``path``; False (said in :attr:`problems`) if the entry
        cannot be written (a full or read-only file system): the cache is only a shortcut."""
        entry = self.file_for(path, key)
        try:
            save(entry, prints, source=source_of(path), options=key)
        except OSError as e:
            self.problems[os.fspath(path)] = (
                f"cache entry {entry} for {os.fspath(path)} cannot be written "
                f"({e.strerror or type(e).__name__}); the scan goes on without it")
            return False
        self.stored.append(os.fspath(path))
        return True


class _Miss(Exception):
    """Why a cache entry is not used (a phrase: ``is a symbolic link``)."""


def _line(text: str) -> str:
    """The first line of ``text``, at most 200 characters."""
    lines = text.splitlines()
    return (lines[0] if lines else "")[:200]


def _matches(prints: list[Fingerprints], meta: Any, path: str | os.PathLike[str],
             key: dict[str, Any]) -> None:
    """Raise _Miss unless ``prints`` were recorded for the dump at ``path`` as it is now,
    under the options ``key``: its name only says where to look."""
    if not prints:
        raise _Miss("holds no input")
    now = source_of(path)
    for fp in prints:
        src = fp.source if isinstance(fp.source, dict) else {}
        if any(src.get(k) != now[k] for k in _SOURCE_KEYS):
            was = src.get("path")
            raise _Miss(f"was written for {was!r:.200}" if was != now["path"] else
                        "was written for this dump before it changed")
    want = json.loads(json.dumps(key, default=str))
    options = meta.get("options") if isinstance(meta, dict) else None
    if not isinstance(options, dict) or options != want:
        given = options if isinstance(options, dict) else {}
        differ = [f"{k} {given.get(k)!r:.40}, not {v!r}" for k, v in want.items()
                  if given.get(k) != v] or ["options besides these"]
        raise _Miss(f"was written under other options ({', '.join(differ)})")
    for fp in prints:
        if fp.page_size != key.get("page_size") or fp.prefix_bytes != key.get("prefix_bytes"):
            raise _Miss(f"holds {fp.page_size}-byte pages hashed over {fp.prefix_bytes} "
                        f"bytes, not {key.get('page_size')} over {key.get('prefix_bytes')}")
