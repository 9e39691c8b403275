"""How an analysis reads and fingerprints its inputs: every option, its default and its check.

This is the one place these options are declared. The CLI takes its defaults from here, the
library receives them as a :class:`ScanOptions`, and a bad value is refused here, once, with
one message. The KSM knobs live beside the model, in :class:`ksm_analyze.ksm.KsmSettings`.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._parallel import default_jobs
from .eligibility import Scope
from .formats import DumpFormat
from .units import counted

__all__ = ["DEFAULT_OPTIONS", "ProgressCallback", "ProgressReporter", "ScanOptions"]

ProgressCallback = Callable[[int, int], None]
"""``callback(done_bytes, total_bytes)``: one task's work done so far out of its total."""
ProgressReporter = Callable[[str, int, int], None]
"""``reporter(task, done_bytes, total_bytes)``: progress of named tasks (an input's name,
``"all inputs"``, ``"comparing"``). The library only calls it; the CLI draws bars."""

_ADDRESS_LIMIT = 1 << 64
MERGE_POLICIES = ("all", "zero-only")
COMPRESS_CODECS = ("lz4", "zstd")
"""``--compress``: the kernel codecs (zram, zswap) with maintained Python bindings."""
MIN_MEMORY_LIMIT = 1 << 20
"""The smallest ``--memory-limit``: below it, nothing of a fleet fits."""
"""``--merge``: KSM's rule, or the what-if where only zero pages merge."""


def _supported_scheduler(address: str) -> bool:
    """Whether ``--scheduler`` is a form that works: ``local``, ``local:N`` (N at least 1), or
    ``tcp://HOST:PORT`` (a host name, IPv4 address or [IPv6] address, a port 1 to 65535).
    Dask's other transports need what this tool does not set up: ``tls://`` certificates,
    ``ucx://`` its library, ``inproc://`` a scheduler in this very process."""
    if re.fullmatch(r"local(:[1-9][0-9]*)?", address):
        return True
    tcp = re.fullmatch(r"tcp://([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})", address)
    return tcp is not None and 1 <= int(tcp[2]) <= 65535


@dataclass(frozen=True)
class ScanOptions:
    """How inputs are read and fingerprinted, and what the analysis reports of them.

    Errors name each option as the command line spells it (``--top``), which is also its
    field name with dashes.

    Attributes:
        format: read every input as this format (a :class:`DumpFormat` or its name);
            None detects each input from its magic.
        base_address: address of the first byte of raw images: one for all inputs, or a
            tuple with one per input (``pmemsave`` pieces of one guest, say).
        prefix_bytes: bytes of each page hashed in stage 1 (0, or more than a page: the
            whole page; :meth:`hashed_bytes`).
        verify: compare candidate pages byte for byte before counting two as one (off:
            trust the 64-bit prefix and full-page hashes).
        jobs: parallel jobs for hashing and comparing (threads where the compiled kernels read
            pages in place, worker processes where pages are decoded); None = every CPU.
        scope: which process memory KSM scans (:class:`~ksm_analyze.eligibility.Scope` or
            its name). Guest dumps carry no mapping facts: every page counts whatever it is.
        top: rows of the most duplicated contents table.
        pairs_top: rows of the pairwise table per input A: the pairs ``(A, B)`` with the
            most pages of A in B (0: every pair that shares).
        show_content: put the first bytes of each top content in that table (off: memory
            dumps hold secrets).
        domains: a merging policy: ``(name, pattern)`` pairs; an input whose path or file
            name matches ``pattern`` (``fnmatch``: ``*``, ``?``, ``[...]``) belongs to domain
            ``name``, and pages never merge across domains. Every input must match one.
        merge: ``all`` (KSM's rule) or ``zero-only`` (a what-if: only zero pages merge).
        samples: ``(name, pattern)`` pairs: the inputs whose path or file name match
            ``pattern`` are samples of one input ``name`` over time, in the order of their
            files' modification times (live fingerprints and captures are grouped without
            it, by the process they recorded).
        cache: a folder of fingerprint files: a dump fingerprinted before with the same
            path, size, mtime and hashing options is not read again in stage 1. Each entry
            is checked against that key (else it is not used, rewritten, and a warning
            says so); the folder must be the user's and writable by nobody else.
        scheduler: run stage 1 on a Dask cluster: ``tcp://HOST:PORT`` of its scheduler, or
            ``local`` / ``local:N`` for a local cluster of N workers, at most one per CPU
            (``pip install 'ksm-analyze[dask]'``). The scheduler must answer within
            ``KSM_ANALYZE_SCHEDULER_TIMEOUT`` seconds (10).
        memory_limit: bytes the aggregation of fingerprint files may use (None: half of
            the machine's memory). Inputs whose fingerprints would not fit are aggregated
            out of core, a partition of the content hashes at a time, spilled to a
            temporary folder (docs/architecture.md, "Fleet scale").
        numa_nodes: the host has this many NUMA nodes and KSM runs with
            ``merge_across_nodes=0``: one stable and unstable tree per node, so pages on
            different nodes never merge (None: ``merge_across_nodes=1``, or one node). Each
            input is pinned to one node (``numa_pins``, else balanced by memory:
            :func:`ksm_analyze.whatif.numa.node_of`). A merging policy, composing with
            ``domains``: pages merge only when both their domain and their node match.
        numa_pins: ``(node, pattern)`` pairs: the inputs whose path or file name match
            ``pattern`` (as ``domains``) run on NUMA node ``node`` (0 to ``numa_nodes``-1).
        near_duplicates: report at most this many groups of near-duplicate contents
            (contents equal but for a few bytes; :mod:`ksm_analyze.whatif.near_duplicates`);
            0, the default, skips the what-if, which reads every distinct content again.
        compress: a what-if beside dedup: compress the pages KSM leaves with this codec
            (``lz4`` or ``zstd``, as zram and zswap call them) and price them as zram and
            zswap store them (the ``compression`` table); None: not computed.
        compress_sample: with ``compress``, compress a uniform random sample of this many
            remaining pages per input and for the host, and give a 95% interval of the
            ratio (0: every page).
        vm_configs: VM configuration files (or folders of them: every file in each):
            libvirt domain XML, Proxmox ``qm config``, Cloud Hypervisor or Firecracker JSON,
            KubeVirt ``VirtualMachine`` YAML (:mod:`ksm_analyze.vmconfig`). Each is matched
            to the input whose file name, without suffixes, is its VM's name; an input
            whose VM opted out of KSM (``<nosharepages/>``, ``allow-ksm: 0``, hugepages,
            shared memory...) is not scanned at all (exclusion rule ``vm_config``).
            Inputs without one are assumed eligible.
    """

    format: DumpFormat | None = None
    base_address: int | tuple[int, ...] = 0
    prefix_bytes: int = 128
    verify: bool = True
    jobs: int | None = None
    scope: Scope = Scope.MERGEABLE
    top: int = 20
    pairs_top: int = 50
    show_content: bool = False
    domains: tuple[tuple[str, str], ...] = ()
    merge: str = "all"
    samples: tuple[tuple[str, str], ...] = ()
    cache: str | None = None
    scheduler: str | None = None
    memory_limit: int | None = None
    numa_nodes: int | None = None
    numa_pins: tuple[tuple[int, str], ...] = ()
    near_duplicates: int = 0
    compress: str | None = None
    compress_sample: int = 0
    vm_configs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Normalise what users may give as names or lists, then check every range once.
        if self.format is not None:
            object.__setattr__(self, "format", DumpFormat.parse(self.format))
        object.__setattr__(self, "scope", Scope.parse(self.scope))
        if not isinstance(self.base_address, int):
            object.__setattr__(self, "base_address", tuple(self.base_address))
        addresses = [self.base_address] if isinstance(self.base_address, int) else \
            self.base_address
        for address in addresses:
            if not 0 <= address < _ADDRESS_LIMIT:
                raise ValueError(f"--base-address {address:#x} is outside 0 to 2^64-1")
        if self.prefix_bytes < 0:
            raise ValueError(f"--prefix-bytes cannot be negative, not {self.prefix_bytes}")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, not {self.jobs}")
        if self.top < 0:
            raise ValueError(f"--top cannot be negative, not {self.top}")
        if self.pairs_top < 0:
            raise ValueError(f"--pairs-top cannot be negative, not {self.pairs_top}")
        if self.near_duplicates < 0:
            raise ValueError(f"--near-duplicates cannot be negative, not {self.near_duplicates}")
        if self.memory_limit is not None and self.memory_limit < MIN_MEMORY_LIMIT:
            raise ValueError(f"--memory-limit must be at least 1 MiB, not "
                             f"{self.memory_limit:,} bytes")
        object.__setattr__(self, "domains", tuple((str(n), str(p)) for n, p in self.domains))
        if self.scheduler is not None and not _supported_scheduler(self.scheduler):
            raise ValueError(f"--scheduler {self.scheduler!r}: give tcp://HOST:PORT of a Dask "
                             "scheduler, local or local:N (N workers, at least 1)")
        object.__setattr__(self, "numa_pins", tuple((n, str(p)) for n, p in self.numa_pins))
        object.__setattr__(self, "vm_configs", (os.fspath(self.vm_configs),)
                           if isinstance(self.vm_configs, str | os.PathLike)
                           else tuple(map(os.fspath, self.vm_configs)))
        if self.numa_nodes is not None and self.numa_nodes < 1:
            raise ValueError(f"--numa-nodes must be at least 1, not {self.numa_nodes}")
        if self.numa_pins and self.numa_nodes is None:
            raise ValueError("--numa-node needs --numa-nodes N (the nodes of the host)")
        for node, pattern in self.numa_pins:
            if not (isinstance(node, int) and 0 <= node < (self.numa_nodes or 0)):
                raise ValueError(f"--numa-node {node}={pattern}: the node must be 0 to "
                                 f"{(self.numa_nodes or 1) - 1} (--numa-nodes "
                                 f"{self.numa_nodes})")
        if self.compress is not None and self.compress not in COMPRESS_CODECS:
            raise ValueError(f"unknown --compress {self.compress!r}; choose one of: "
                             + ", ".join(COMPRESS_CODECS))
        if self.compress_sample < 0:
            raise ValueError(f"--compress-sample cannot be negative, not "
                             f"{self.compress_sample}")
        if self.compress_sample and self.compress is None:
            raise ValueError("--compress-sample samples what --compress compresses: give "
                             "--compress lz4 or --compress zstd too")
        if self.merge not in MERGE_POLICIES:
            raise ValueError(f"unknown --merge {self.merge!r}; choose one of: "
                             + ", ".join(MERGE_POLICIES))

    def local_workers(self) -> int | None:
        """The workers of ``scheduler`` ``local[:N]`` (None: not a local cluster): N, or 2,
        but never more than the CPUs this process may run on."""
        if self.scheduler is None or not self.scheduler.startswith("local"):
            return None
        return min(int(self.scheduler.partition(":")[2] or 2), default_jobs())

    def hashed_bytes(self, page_size: int) -> int:
        """Bytes of each page stage 1 hashes for ``prefix_bytes``: the whole page for 0 or
        for anything longer than a page. The one rule fingerprinting, the cache key and the
        fingerprint-file reader share (so 0, the page size and more all mean one length)."""
        return page_size if self.prefix_bytes == 0 else min(self.prefix_bytes, page_size)

    @property
    def policy(self) -> bool:
        """Whether a merging policy restricts KSM (domains, NUMA nodes merged apart, or zero
        pages only)."""
        return bool(self.domains) or self.merge != "all" or self.numa_nodes is not None

    def domain_of(self, names: Sequence[str]) -> tuple[list[int], list[str]]:
        """Each input's domain number, and the domains' names, from ``domains``.

        Raises:
            ValueError: an input matches no domain, or two.
        """
        labels = list(dict.fromkeys(name for name, _ in self.domains))
        numbers = []
        for path in names:
            found = {name for name, pattern in self.domains
                     if fnmatch.fnmatchcase(path, pattern)
                     or fnmatch.fnmatchcase(os.path.basename(path), pattern)}
            if len(found) != 1:
                what = "no --domain" if not found else f"several domains ({', '.join(sorted(found))})"
                raise ValueError(f"{path} matches {what}: give each input exactly one")
            numbers.append(labels.index(found.pop()))
        return numbers, labels

    def samples_of(self, path: str) -> str | None:
        """The input ``path`` is a sample of (``samples``), or None."""
        found = {name for name, pattern in self.samples
                 if fnmatch.fnmatchcase(path, pattern)
                 or fnmatch.fnmatchcase(os.path.basename(path), pattern)}
        if len(found) > 1:
            raise ValueError(f"{path} matches several --samples ({', '.join(sorted(found))})")
        return found.pop() if found else None

    def bases_for(self, inputs: Sequence[object]) -> list[int]:
        """One base address per input; ValueError if the count fits neither rule."""
        bases = [self.base_address] if isinstance(self.base_address, int) else \
            list(self.base_address)
        if len(bases) == 1:
            return bases * len(inputs)
        if len(bases) != len(inputs):
            raise ValueError(
                f"{counted(len(bases), 'base address', 'base addresses')} for "
                f"{counted(len(inputs), 'input')}: give one, or one per input"
            )
        return bases

    @property
    def workers(self) -> int:
        """``jobs``, or every CPU this process may run on when it is None or more than that
        (more threads or processes than CPUs only queue, each with its memory)."""
        cpus = default_jobs()
        return cpus if self.jobs is None else min(self.jobs, cpus)

    def jobs_warning(self) -> str | None:
        """The line saying ``jobs`` was capped to the CPUs, or None when it was not."""
        if self.jobs is None or self.jobs <= self.workers:
            return None
        return (f"--jobs {self.jobs:,} is more than the {counted(self.workers, 'CPU')} this "
                f"process may run on: using {self.workers:,}")


DEFAULT_OPTIONS = ScanOptions()
