"""Where stage 1's results come from: a dump read here, a fingerprint file, the cache, or a
Dask cluster.

:func:`open_sources` turns the paths given into inputs: an open reader where the dump can be
read here (stage 2 reads candidate pages through it) and, where stage 1 is already done
(a fingerprint file, a ``--cache`` hit), its fingerprints. :func:`fingerprint_sources` runs
stage 1 for the rest: in this process, or as one Dask task per dump on the workers of
``--scheduler``, where readers travel by path and a dead worker's task is run again.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .._signals import watching
from ..errors import InputError, KsmAnalyzeError
from ..formats import DumpFormat, open_inputs
from ..formats.base import DumpReader
from ..hashing.stage1 import Fingerprints, fingerprint
from ..hashing.stage2 import content_hashes
from ..options import ProgressCallback, ScanOptions
from . import fingerprint_files

__all__ = ["Source", "fingerprint_file_names", "fingerprint_sources", "guest_check",
           "open_sources", "write_fingerprint_files"]

TASK_RETRIES = 2
"""Times Dask runs a dump's task again after the worker running it died."""


@dataclass
class Source:
    """One input: its reader (None: the dump is not readable here) and, once stage 1 has
    run or was found done, its fingerprints."""

    path: str
    """The path given (a dump or a fingerprint file)."""
    reader: DumpReader | None
    prints: Fingerprints | None = None
    origin: str = "read"
    """``read`` (stage 1 here or on a worker), ``cache``, ``file``, or ``worker``: a dump only
    the Dask workers can read (its fingerprints then carry content hashes)."""
    key: dict[str, Any] = field(default_factory=dict)
    """The hashing options, as the cache keys them."""
    more: list[Fingerprints] = field(default_factory=list)
    """A ``worker`` dump's further inputs (the processes of a snapshot after the first)."""
    cache_note: str | None = None
    """This run's warning about the input's cache entry (not used, or not written)."""


def _hash_key(options: ScanOptions, page_size: int, base: int, fmt: DumpFormat | None
              ) -> dict[str, Any]:
    """What changes a dump's fingerprints besides the dump itself."""
    return {"format": fmt.value if fmt else None, "page_size": page_size, "base_address": base,
            "prefix_bytes": options.hashed_bytes(page_size)}


def open_sources(paths: Sequence[str | os.PathLike[str]], options: ScanOptions, page_size: int,
                 bases: Sequence[int], stack: contextlib.ExitStack) -> list[Source]:
    """Open every input; readers are closed with ``stack``.

    Raises:
        ValueError: one guest given twice, however (see :class:`_Guests`).
    """
    cache = fingerprint_files.Cache(options.cache) if options.cache else None
    sources: list[Source] = []
    guests = _Guests()
    for path, base in zip(paths, bases, strict=True):
        path = os.fspath(path)
        if fingerprint_files.is_fingerprint_file(path):
            mine = _from_file(path, options, page_size, stack)
            guests.add(path, mine[0].prints.source if mine and mine[0].prints else None)
            sources += mine
            continue
        guests.add(path, None)
        if options.scheduler and not readable_here(path):
            key = _hash_key(options, page_size, base, options.format)
            sources.append(Source(path, None, None, "worker", key))
            continue
        readers = [stack.enter_context(r) for r in open_inputs(
            path, options.format, page_size=page_size, base_address=base)]
        for pages in sorted({r.path for r in readers} - {path}):  # a .vmss and its .vmem
            guests.add(pages, None, via=path)
        key = _hash_key(options, page_size, base, readers[0].format)
        cached = cache.get(path, key, partial(_layout_differs, readers)) if cache else None
        for k, r in enumerate(readers):
            sources.append(Source(path, r, replace(cached[k], path=r.name) if cached else None,
                               "cache" if cached else "read", key))
        if cache and path in cache.problems:
            sources[-len(readers)].cache_note = cache.problems[path]
    return sources


def guest_check() -> Callable[[str, dict[str, Any] | None], None]:
    """A check that refuses one guest given twice, as :func:`open_sources` does: call it
    with each input's path and, for a fingerprint file, the dump it records."""
    guests = _Guests()

    def check(path: str, recorded: dict[str, Any] | None) -> None:
        guests.add(path, recorded)

    return check


class _Guests:
    """The inputs seen so far, to refuse one guest given twice, however it arrives: one file
    twice (also through a link or a hard link), a dump and a fingerprint file written from
    it, or two fingerprint files of one dump. The identity of an input is the file it was
    read from (:func:`~.fingerprint_files.source_of`: device and inode, path, size, mtime)
    and, for a fingerprint file, the dump it records. A copy is another guest."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]] = []
        self.given: list[str] = []
        """For each entry of ``seen``, the input as given (a VMware state file, for the
        .vmem it reads its pages from: :meth:`add` ``via``)."""
        self.numbers: list[int] = []
        self.index: dict[tuple[Any, ...], list[int]] = {}
        """The entries of ``seen`` by each key :func:`~.fingerprint_files.same_dump` can
        match on (:func:`_keys`): only those are compared with a new input, so taking n
        inputs costs O(n), not O(n^2) comparisons."""

    def add(self, path: str, recorded: dict[str, Any] | None, *, via: str | None = None
            ) -> None:
        """Take input ``path`` (``recorded``: the dump a fingerprint file says it came from;
        ``via``: the input given, when ``path`` is the other file it reads its pages from).

        Raises:
            ValueError: naming both inputs, if it is one already seen.
        """
        try:
            itself: dict[str, Any] | None = fingerprint_files.source_of(path)
        except OSError:
            itself = None  # opening it says what is wrong
        guest = recorded if recorded is not None else itself
        k = (self.numbers[-1] if self.numbers else 0) + (via is None)
        keys = _keys(itself) | _keys(guest)
        for e in sorted({e for key in keys for e in self.index.get(key, ())}):
            j, other_given, (other, other_itself, other_guest) = (
                self.numbers[e], self.given[e], self.seen[e])
            if j == k:
                continue
            if (itself and other_itself and fingerprint_files.same_dump(itself, other_itself)
                    and (via or other_given != other)):
                raise ValueError(f"{other_given} and {via or path} are one guest (inputs {j} "
                                 f"and {k}: both read their pages from {path}): " + _ONCE)
            if itself and other_itself and fingerprint_files.same_dump(itself, other_itself):
                alias = "" if other == path else f", the first time as {other}"
                raise ValueError(f"{path} is given twice (inputs {j} and {k}{alias}): " + _ONCE)
            if guest and other_guest and fingerprint_files.same_dump(guest, other_guest):
                how = [f"{p} is a fingerprint file of {g['path']}"
                       for p, g, i in ((other, other_guest, other_itself), (path, guest, itself))
                       if g is not i]
                raise ValueError(f"{path} and {other} are one guest (inputs {j} and {k}: "
                                 f"{' and '.join(how)}): " + _ONCE)
        for key in keys:
            self.index.setdefault(key, []).append(len(self.seen))
        self.seen.append((path, itself, guest))
        self.given.append(via or path)
        self.numbers.append(k)


def _keys(record: dict[str, Any] | None) -> set[tuple[Any, ...]]:
    """What two records :func:`~.fingerprint_files.same_dump` calls one must share: their
    path (a live sample, or records without device and inode), or their device and inode."""
    if not record:
        return set()
    keys: set[tuple[Any, ...]] = {("path", record.get("path"))}
    if record.get("dev") is not None:
        keys.add(("inode", record["dev"], record.get("ino")))
    return keys


_ONCE = "each input is one guest or process; to model two identical guests, give a copy"


def _layout_differs(readers: Sequence[DumpReader], prints: Sequence[Fingerprints]
                    ) -> str | None:
    """Why a cache entry's fingerprints cannot be those of ``readers`` (None: they can):
    inputs, formats and stored ranges must be what the dump's readers see now."""
    if len(prints) != len(readers):
        return f"holds {len(prints)} inputs, not {len(readers)}"
    for fp, r in zip(prints, readers, strict=True):
        if (fp.format, fp.address_space, fp.page_size) != (r.format, r.address_space,
                                                            r.page_size):
            return (f"holds a {fp.format.value} input of {fp.page_size}-byte pages, not "
                    f"{r.format.value} of {r.page_size}")
        if fp.extents != r.extents:
            return "holds other page ranges than the dump has"
    return None


def readable_here(path: str) -> bool:
    """Whether this machine can read ``path`` (else, with ``--scheduler``, only workers do)."""
    return os.path.isfile(path) and os.access(path, os.R_OK)


def _from_file(path: str, options: ScanOptions, page_size: int,
               stack: contextlib.ExitStack) -> list[Source]:
    """The inputs of a fingerprint file, each with its dump's reader where that dump is here
    and unchanged."""
    prints = fingerprint_files.load(path)
    if prints and prints[0].page_size != page_size:
        raise ValueError(f"{path} holds {prints[0].page_size}-byte pages; analyze it with "
                         f"--page-size {prints[0].page_size}")
    if prints and prints[0].prefix_bytes != options.hashed_bytes(page_size):
        raise ValueError(f"{path} was fingerprinted with --prefix-bytes "
                         f"{prints[0].prefix_bytes}; give the same")
    readers: list[DumpReader | None] = [None] * len(prints)
    source = prints[0].source if prints else None
    if source is not None and fingerprint_files.unchanged(source):
        base = int(fingerprint_files.options_of(path).get("base_address", 0))
        with contextlib.suppress(KsmAnalyzeError, OSError):
            opened = open_inputs(source["path"], prints[0].format, page_size=page_size,
                                 base_address=base)
            if [r.format for r in opened] == [fp.format for fp in prints]:
                readers = [stack.enter_context(r) for r in opened]
            else:
                for r in opened:
                    r.close()
    return [Source(path, r, fp, "file") for r, fp in zip(readers, prints, strict=True)]


def fingerprint_sources(sources: Sequence[Source], options: ScanOptions,
                        reading: Callable[[str], ProgressCallback],
                        tasks: ProgressCallback | None = None, *,
                        with_content: bool = False
                        ) -> tuple[list[Fingerprints], list[DumpReader | None]]:
    """Stage 1 for every source that needs it, then the cache filled; returns every input's
    fingerprints, and its reader for stage 2 (None: not readable here), in order.
    ``with_content`` adds xxh3-128 of every non-zero page."""
    todo = [s for s in sources if s.prints is None]
    if todo and options.scheduler:
        _on_cluster(todo, options, tasks, with_content)
    for s in todo:
        if s.prints is None:
            assert s.reader is not None
            s.prints = fingerprint(s.reader, options,
                                   progress=reading(os.path.basename(s.reader.name)))
            if with_content:
                s.prints = add_content_hashes(s.prints, s.reader)
    if options.cache:
        cache = fingerprint_files.Cache(options.cache)
        for path in dict.fromkeys(s.path for s in todo if s.origin == "read"):
            mine = [s for s in sources if s.path == path]
            written = cache.put(path, mine[0].key, [s.prints for s in mine
                                                    if s.prints is not None])
            not_used = mine[0].cache_note
            if not written:
                mine[0].cache_note = (f"{not_used}; {cache.problems[path]}" if not_used
                                      else cache.problems[path])
            elif not_used:
                mine[0].cache_note = f"{not_used}, and the entry rewritten"
    for s in sources:  # after put: the note is about this run, not kept in the entry
        if s.cache_note and s.prints is not None:
            s.prints.warnings.append(s.cache_note)
    prints: list[Fingerprints] = []
    readers: list[DumpReader | None] = []
    for s in sources:
        assert s.prints is not None
        prints += [s.prints, *s.more]
        readers += [s.reader] * (1 + len(s.more))
    return prints, readers


# -- Dask --------------------------------------------------------------------------------------


SCHEDULER_TIMEOUT = 10.0
"""Seconds to wait for the Dask scheduler to answer (``KSM_ANALYZE_SCHEDULER_TIMEOUT``
changes it): the handshake, and each check that it is still there while tasks run."""
RESULT_TIMEOUT = 6
"""A finished task's fingerprints must arrive within this many times the scheduler timeout,
and a scheduler may be without workers (an adaptive cluster starting them) no longer."""


def scheduler_timeout() -> float:
    """:data:`SCHEDULER_TIMEOUT`, or the seconds ``KSM_ANALYZE_SCHEDULER_TIMEOUT`` gives."""
    given = os.environ.get("KSM_ANALYZE_SCHEDULER_TIMEOUT")
    if given is None:
        return SCHEDULER_TIMEOUT
    try:
        seconds = float(given)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 1e6:  # and not NaN
        raise ValueError(f"KSM_ANALYZE_SCHEDULER_TIMEOUT={given!r}: give the seconds to wait "
                         "for the Dask scheduler, more than 0")
    return seconds


def _no_answer(address: str, timeout: float) -> InputError:
    return InputError(f"no Dask scheduler answered there within {timeout:g} s", path=address)


def _handshake(address: str, timeout: float) -> None:
    """Say hello to ``address`` as a Dask client would, within ``timeout``: Dask's own
    connect waits for the answer without end, and reads whatever a non-Dask service sends
    as a frame length (an HTTP answer: exabytes). Run on a loop of its own, in a thread of
    its own, so a caller's running loop (a notebook) is no obstacle."""
    import asyncio

    from distributed.comm import connect

    async def hello() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
        await comm.close()

    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(hello())
        except BaseException as e:  # noqa: BLE001 - every way it fails is "no answer"
            failed.append(e)

    thread = threading.Thread(target=run, name="ksm-analyze-dask-hello", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if thread.is_alive() or failed:
        raise _no_answer(address, timeout) from None


def _client(address: str, options: ScanOptions) -> Any:
    """A client of the scheduler at ``address``, or of a new local cluster (``local[:N]``,
    at most one worker per CPU)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("--scheduler needs Dask: pip install 'ksm-analyze[dask]'",
                         path=address) from None
    if (workers := options.local_workers()) is not None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster)
    timeout = scheduler_timeout()
    _handshake(address, timeout)
    try:
        return Client(address, timeout=timeout)
    except Exception:  # noqa: BLE001 - gone or changed since the handshake: whatever it sent
        raise _no_answer(address, timeout) from None


def _workers(client: Any, address: str, timeout: float) -> int:
    """The scheduler's workers now; raise unless it answers within ``timeout``."""
    try:
        info = client.sync(client.scheduler.identity, n_workers=0, callback_timeout=timeout)
        return int(info["n_workers"])
    except Exception:  # noqa: BLE001 - a timeout, a closed connection, an answer not Dask's
        raise InputError(f"the Dask scheduler stopped answering (nothing for {timeout:g} s)",
                         path=address) from None


def add_content_hashes(fp: Fingerprints, reader: DumpReader) -> Fingerprints:
    """``fp`` with the content hash of every non-zero page, read from ``reader``."""
    content = np.zeros((len(fp.addrs), 2), np.uint64)
    rows = np.flatnonzero(fp.prefix)
    content[rows] = content_hashes(reader, fp.addrs[rows])
    return replace(fp, content=content)


def _fingerprint_task(path: str, options: ScanOptions, page_size: int, base: int,
                      with_content: bool) -> list[Fingerprints] | KsmAnalyzeError:
    """Stage 1 of one dump, on a worker: the reader is opened there, by path. What is wrong
    with the dump comes back as a value, not raised: Dask runs a task that raised again,
    and a second run of a dump truncated under the first would hash what is left."""
    try:
        readers = open_inputs(path, options.format, page_size=page_size, base_address=base)
        try:
            with watching(r.path for r in readers):  # truncated meanwhile: one line, no SIGBUS
                prints = [fingerprint(r, replace(options, jobs=1)) for r in readers]
                if with_content:
                    prints = [add_content_hashes(fp, r)
                              for fp, r in zip(prints, readers, strict=True)]
            return prints
        finally:
            for r in readers:
                r.close()
    except KsmAnalyzeError as e:
        from distributed import get_worker

        return _on_worker(e, get_worker().address)


def _on_worker(error: KsmAnalyzeError, worker: str) -> KsmAnalyzeError:
    """``error`` with the worker that met it named at its end."""
    error.args = (f"{error.args[0]} (on Dask worker {worker})", *error.args[1:])
    error.__context__ = None  # a codec's own exception may not pickle back to the client
    return error


@contextlib.contextmanager
def dask_client(address: str, options: ScanOptions | None = None) -> Iterator[Any]:
    """A client of the scheduler at ``address`` (``tcp://HOST:PORT``, or ``local[:N]`` for a
    new local cluster: :func:`_client`), closed with its local cluster at the end.

    Raises:
        InputError: Dask is not installed, or no scheduler answers there.
        ValueError: ``address`` is not a form ``--scheduler`` takes.
    """
    client = _client(address, options or ScanOptions(scheduler=address))
    try:
        scheduler_timeout()  # a bad KSM_ANALYZE_SCHEDULER_TIMEOUT says so before any task
        yield client
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None:
            cluster.close()


def finished(client: Any, futures: Sequence[Any], address: str) -> Iterator[tuple[Any, Any]]:
    """Each of ``futures`` with its result, in the order they finish, as long as the
    scheduler at ``address`` keeps answering (checked every :func:`scheduler_timeout`
    seconds without a task done) and has workers (it may go :data:`RESULT_TIMEOUT` times
    that without any).

    Raises:
        InputError: the scheduler stopped answering, had no worker for too long, or the
            connection to the cluster broke.
    """
    timeout = scheduler_timeout()
    ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(ready.put)
    idle = time.monotonic()  # since when the cluster had no worker
    for _ in range(len(futures)):
        while True:  # a task may run long; the scheduler must keep answering meanwhile
            try:
                future = ready.get(timeout=timeout)
                break
            except queue.Empty:
                if _workers(client, address, timeout):
                    idle = time.monotonic()
                elif time.monotonic() - idle > RESULT_TIMEOUT * timeout:
                    raise InputError("the Dask scheduler has no worker to run the tasks "
                                     f"(none for {RESULT_TIMEOUT * timeout:g} s)",
                                     path=address) from None
        try:
            result = future.result(timeout=RESULT_TIMEOUT * timeout)
        except (OSError, TimeoutError) as e:  # the connection to the cluster broke
            raise InputError(f"the Dask cluster stopped answering ({type(e).__name__})",
                             path=address) from None
        yield future, result


def _on_cluster(todo: Sequence[Source], options: ScanOptions,
                tasks: ProgressCallback | None, with_content: bool) -> None:
    """Stage 1 of ``todo`` as one task per dump on the cluster; fills ``prints``."""
    address = options.scheduler or ""
    by_dump: dict[str, list[Source]] = {}
    for s in todo:
        by_dump.setdefault(s.path, []).append(s)
    with dask_client(address, options) as client:  # first: says how to install Dask
        futures: dict[Any, list[Source]] = {}
        for path, mine in by_dump.items():
            key = mine[0].key
            # A dump only the workers can read comes with content hashes for stage 2.
            future = client.submit(_fingerprint_task, os.path.abspath(path), options,
                                   key["page_size"], key["base_address"],
                                   with_content or mine[0].reader is None,
                                   key=f"fingerprint-{len(futures)}",
                                   retries=TASK_RETRIES, pure=False)
            futures[future] = mine
        if tasks is not None:
            tasks(0, len(futures))
        for done, (future, prints) in enumerate(finished(client, list(futures), address), 1):
            if isinstance(prints, KsmAnalyzeError):
                raise prints
            mine = futures[future]
            if mine[0].reader is None:  # read by the workers only: named as given here
                named = [replace(fp, path=fp.path.replace(os.path.abspath(mine[0].path),
                                                          mine[0].path, 1)) for fp in prints]
                mine[0].prints, mine[0].more = named[0], named[1:]
            elif [fp.format for fp in prints] != [s.reader.format for s in mine if s.reader]:
                raise InputError("the worker read other inputs from it than this machine "
                                 "does: is it the same file there?", path=mine[0].path)
            else:
                for s, fp in zip(mine, prints, strict=True):
                    assert s.reader is not None
                    s.prints = replace(fp, path=s.reader.name)  # named as given here
            if tasks is not None:
                tasks(done, len(futures))


def write_fingerprint_files(paths: Sequence[str | os.PathLike[str]], folder: str | os.PathLike[str],
                            options: ScanOptions, page_size: int,
                            reading: Callable[[str], ProgressCallback],
                            tasks: ProgressCallback | None = None,
                            keep_cmdline: bool = False) -> list[Path]:
    """Fingerprint each dump, content hashes included, into ``folder`` (one file a dump,
    named after it: :func:`fingerprint_file_names`); returns the files written. A snapshot's
    command lines are left out unless ``keep_cmdline``.

    Raises:
        ValueError: a file there was written for another dump, or is not a fingerprint file
            (never replaced), or a name would be an input's.
    """
    out = Path(folder)
    with contextlib.ExitStack() as stack:
        sources = open_sources(paths, replace(options, cache=None), page_size,
                               options.bases_for(paths), stack)
        if any(s.origin == "file" for s in sources):
            raise ValueError("fingerprint reads dumps, not fingerprint files")
        targets = [out / name for name in fingerprint_file_names(paths)]
        dumps = [fingerprint_files.source_of(path) if readable_here(os.fspath(path)) else {
            "path": os.path.abspath(path), "size": 0} for path in paths]  # workers only
        for target, dump in zip(targets, dumps, strict=True):
            if any(os.path.realpath(target) == os.path.realpath(p) for p in paths):
                raise ValueError(f"{target} would overwrite an input")
            _replaceable(target, dump)  # before the long work
        with watching(s.reader.path for s in sources if s.reader):  # changed? before writing
            fingerprint_sources(sources, replace(options, cache=None), reading, tasks,
                                with_content=True)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        written = []
        for path, target, dump in zip(paths, targets, dumps, strict=True):
            mine = [s for s in sources if s.path == os.fspath(path)]
            mine_prints = [fp for s in mine if s.prints is not None for fp in (s.prints, *s.more)]
            _replaceable(target, dump)  # again: another run may have written it since
            fingerprint_files.save(target, mine_prints, source=dump, options=mine[0].key,
                        contents=[fp.content for fp in mine_prints if fp.content is not None],
                        keep_cmdline=keep_cmdline)
            written.append(target)
    return written


def fingerprint_file_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The fingerprint file of each dump: its short name (:func:`~ksm_analyze.units.
    short_names`, folders joined by ``_``) and the suffix; where two would be equal (``d1/x``
    and ``d1_x``; also ignoring case, for the file systems that do), each of them gets 8 hex
    digits of the SHA-256 of its dump's resolved path."""
    import hashlib

    from ..units import short_names

    names = [n.replace(os.sep, "_") for n in short_names([os.fspath(p) for p in paths])]
    clash = Counter(n.casefold() for n in names)
    for i, (p, n) in enumerate(zip(paths, names, strict=True)):
        if clash[n.casefold()] > 1:
            digest = hashlib.sha256(os.fsencode(os.path.realpath(p))).hexdigest()[:8]
            names[i] = f"{n}-{digest}"
    if len({n.casefold() for n in names}) != len(names):  # the same resolved path twice
        raise ValueError("two dumps would have one fingerprint file: give each once")
    return [n + fingerprint_files.SUFFIX for n in names]


def _replaceable(target: Path, dump: dict[str, Any]) -> None:
    """ValueError unless ``target`` is absent or a fingerprint file of ``dump`` (rewritten)."""
    if not os.path.lexists(target):
        return
    try:
        recorded = fingerprint_files.metadata(target)["source"] if (
            fingerprint_files.is_fingerprint_file(target)) else None
        mine = recorded is not None and fingerprint_files.same_dump(dump, recorded)
    except (OSError, ValueError, KeyError, TypeError, KsmAnalyzeError):  # damaged, foreign
        recorded, mine = None, False
    if mine:
        return
    was = (f"holds the fingerprints of another dump ({recorded['path']})"
           if isinstance(recorded, dict) and isinstance(recorded.get("path"), str)
           else "exists and is not a fingerprint file")
    raise ValueError(f"{target} {was}: not replaced (remove it, or write to another folder)")
