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

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import DIR_MODE, atomic_write
from .._version import __version__
from ..errors import DumpFormatError, InputError
from ..formats import DumpFormat
from ..formats.base import open_readonly
from ..hashing.stage1 import Fingerprints
from ..pages import Extent, MapFlags, PageState, check_page_size
from ..units import size_text

__all__ = ["META_KEY", "SUFFIX", "Cache", "is_fingerprint_file", "load",
           "options_of", "same_dump", "save", "source_of", "unchanged"]

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


def source_of(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What says a fingerprint is still its dump's: the absolute path, size, mtime, and
    the ctime, device and inode, which a copy that restores size and mtime (``cp -p``,
    ``rsync -t``, ``touch -d``) cannot restore. Also the dump's identity: two inputs with the
    same (see :func:`same_dump`) are one guest."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "dev": st.st_dev, "ino": st.st_ino}


_SOURCE_KEYS = ("path", "size", "mtime_ns", "ctime_ns", "dev", "ino")


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
    recorded, the same path and size."""
    if a.get("dev") is not None and b.get("dev") is not None:
        return (a["dev"], a["ino"]) == (b["dev"], b["ino"]) and (
            a["path"] == b["path"] or (a["size"], a["mtime_ns"]) == (b["size"], b["mtime_ns"]))
    return bool(a["path"] == b["path"] and a["size"] == b["size"])


def save(path: str | os.PathLike[str], prints: Sequence[Fingerprints], *,
         source: dict[str, Any], options: dict[str, Any],
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
        "source": {k: source.get(k) for k in _SOURCE_KEYS},
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
    ksm-analyze that wrote it), ``source`` (:func:`source_of`), ``options``
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
    source = {"path": str(src["path"]), **{k: None if src.get(k) is None else int(src[k])
                                            for k in _SOURCE_KEYS[1:]}, "file": path}

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
