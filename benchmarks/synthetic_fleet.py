"""Synthetic fleets for the fleet benchmarks: fingerprint files, and core tables made directly.

A fleet (:func:`draw`) is a list of guests, each of a size drawn from the sizes clouds sell
(1 to 64 GiB, most of 2 to 8 GiB), in families that share an OS image (a few popular
images, many rare ones: family sizes fall off as 1/rank). An image is a global layer every
guest holds (firmware, the packages all images have) and the family's own files, each a run
of pages: the hot quarter of the files is in every guest of the family, each other file in
a guest with probability 0.6 (page cache: which files a guest has read). The rest of a
guest is its own: zero pages (5 to 40% of it, free memory), a few pages it holds twice
(0.2%), and unique data.

The same fleet is written at any ``scale``: every page count divided by it (at least one
page a file), so 1,000 guests of 10 GiB fit a laptop as fingerprint files at 1/1024;
:func:`core_table` builds the core table of a fleet without any file (at scale 1: the
placement's real input size). Content numbers become 128-bit content hashes through
splitmix64 (:func:`mix`), never 0; number 0 is the zero page.

Used by bench_fleet.py (:func:`write_fingerprint_file`) and bench_fleet_scale.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

PS = 4096
SIZES_GIB = (1, 2, 4, 8, 16, 32, 64)
SIZE_WEIGHTS = (0.10, 0.20, 0.25, 0.20, 0.13, 0.08, 0.04)
"""Guest sizes and how often each is drawn (mean 10.3 GiB)."""
GLOBAL_MIB = 32
"""The layer of the image every guest holds, whatever its family."""
IMAGE_MIB = 128
"""Each family's own files (kernel, libraries, page cache of its binaries)."""
FILES = 48
"""Files of a family's image; sizes drawn so they add up to IMAGE_MIB."""
HOT, WARM = 0.25, 0.6
"""The first quarter of the files is in every guest; each other one with probability 0.6."""
TWICE = 0.002
"""Share of a guest's pages it holds twice (two pages of one content)."""
UNIQUE_BASE = 1 << 40
"""Content numbers of unique pages start here (the image's are below)."""


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a content's 64-bit hash halves from its number (never 0 for x > 0)."""
    z = x * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) | np.uint64(1)


@dataclass
class Fleet:
    """Guests at full scale (pages of 4 KiB)."""

    size_gib: np.ndarray
    family: np.ndarray
    zero_share: np.ndarray
    file_pages: np.ndarray
    """Per family, per file: its pages (families x FILES)."""
    holds: np.ndarray
    """Per guest, per file of its family: whether it holds that file (guests x FILES)."""

    @property
    def n(self) -> int:
        return len(self.size_gib)

    def pages(self, scale: int) -> np.ndarray:
        """Each guest's pages at ``scale``."""
        pages: np.ndarray = (self.size_gib.astype(np.int64) << 18) // scale
        return pages


def draw(guests: int, seed: int = 1, families: int | None = None) -> Fleet:
    """A fleet of ``guests`` guests (default: one family per 20 guests)."""
    rng = np.random.default_rng(seed)
    families = families or max(1, guests // 20)
    weight = 1.0 / np.arange(1, families + 1)
    family = rng.choice(families, size=guests, p=weight / weight.sum())
    size = rng.choice(np.array(SIZES_GIB), size=guests, p=np.array(SIZE_WEIGHTS))
    share = rng.dirichlet(np.ones(FILES), size=families)
    file_pages = np.maximum(1, np.round(share * (IMAGE_MIB << 8))).astype(np.int64)
    holds = rng.random((guests, FILES)) < WARM
    holds[:, : int(FILES * HOT)] = True
    return Fleet(size, family, rng.uniform(0.05, 0.40, guests), file_pages, holds)


def _image_layout(fleet: Fleet, scale: int) -> tuple[int, np.ndarray, np.ndarray]:
    """At ``scale``: the global layer's pages, each family file's pages, and the content
    number of each file's first page (families x FILES; the global layer is numbers
    1..global)."""
    glob = max(1, (GLOBAL_MIB << 8) // scale)
    pages = np.maximum(1, fleet.file_pages // scale)
    first = (1 + glob + np.concatenate([[0], np.cumsum(pages.ravel())[:-1]])).reshape(
        pages.shape)
    return glob, pages, first


def guest_numbers(fleet: Fleet, g: int, scale: int, rng: np.random.Generator
                  ) -> np.ndarray:
    """The content number of each page of guest ``g`` at ``scale`` (0: a zero page), in a
    random order; its unique numbers start at ``UNIQUE_BASE + g << 32``."""
    glob, pages, first = _image_layout(fleet, scale)
    f = fleet.family[g]
    held = np.flatnonzero(fleet.holds[g])
    image = np.concatenate([np.arange(1, glob + 1, dtype=np.uint64)] + [
        np.arange(first[f, k], first[f, k] + pages[f, k], dtype=np.uint64) for k in held])
    total = max(int(fleet.pages(scale)[g]), len(image) + 1)
    rest = total - len(image)
    zero = int(rest * fleet.zero_share[g])
    twice = int(total * TWICE)
    twice = min(twice, (rest - zero) // 2)
    own = rest - zero - 2 * twice
    base = np.uint64(UNIQUE_BASE + (g << 32))
    unique = base + np.arange(own + twice, dtype=np.uint64)
    numbers = np.concatenate([image, np.zeros(zero, np.uint64), unique,
                              unique[own:]])  # the last `twice` numbers twice
    out: np.ndarray = numbers[rng.permutation(len(numbers))]
    return out


def write_fingerprint_file(folder: Path, name: str, numbers: np.ndarray) -> Path:
    """One guest's fingerprint file: a raw dump of ``len(numbers)`` pages whose page k holds
    content number ``numbers[k]`` (0: a zero page); content hashes are :func:`mix` of it."""
    from ksm_analyze.fleet import fingerprint_files as fpfile
    from ksm_analyze.formats import DumpFormat
    from ksm_analyze.hashing.stage1 import Fingerprints
    from ksm_analyze.pages import Extent, PageState

    rows = len(numbers)
    content = np.zeros((rows, 2), np.uint64)
    nz = numbers != 0
    content[nz, 0] = mix(numbers[nz])
    content[nz, 1] = mix(numbers[nz] ^ np.uint64(0x5555555555555555))
    prefix = np.where(nz, content[:, 0] >> np.uint64(1) | np.uint64(1), np.uint64(0))
    fp = Fingerprints(
        path=name, format=DumpFormat.RAW, address_space="physical", page_size=PS,
        prefix_bytes=128, extents=[Extent(0, rows, PageState.DATA, 0)], info={},
        warnings=[], addrs=np.arange(rows, dtype=np.uint64) * np.uint64(PS),
        prefix=prefix, state_pages={**dict.fromkeys(PageState, 0), PageState.DATA: rows})
    path = folder / f"{name}{fpfile.SUFFIX}"
    fpfile.save(path, [fp], source={"path": name, "size": rows * PS, "mtime_ns": 0},
                options={"prefix_bytes": 128}, contents=[content])
    return path


def write_fleet(fleet: Fleet, folder: Path, scale: int, seed: int = 2) -> list[Path]:
    """Every guest of ``fleet`` at ``scale`` as a fingerprint file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return [write_fingerprint_file(folder, f"guest-{g:05d}", guest_numbers(fleet, g, scale, rng))
            for g in range(fleet.n)]


def core_table(fleet: Fleet, scale: int = 1) -> object:
    """The core table ``scan`` would build from ``write_fleet(fleet, scale)``, made directly
    (no files): a row per (image page, guest holding it) where two or more guests hold it,
    a row of 2 pages per content a guest holds twice; the rest counted as unique or zero."""
    from ksm_analyze.columns import Columns
    from ksm_analyze.content_table import INPUT_COLUMNS, ContentTable

    glob, pages, first = _image_layout(fleet, scale)
    n = fleet.n
    total = np.empty(n, np.int64)
    zero = np.empty(n, np.int64)
    unique = np.zeros(n, np.int64)
    twice_n = np.empty(n, np.int64)
    image_pages = glob + (fleet.holds * pages[fleet.family]).sum(axis=1)
    for g in range(n):  # as guest_numbers counts them
        total[g] = max(int(fleet.pages(scale)[g]), int(image_pages[g]) + 1)
        rest = total[g] - image_pages[g]
        zero[g] = int(rest * fleet.zero_share[g])
        twice_n[g] = min(int(total[g] * TWICE), (rest - zero[g]) // 2)
        unique[g] = rest - zero[g] - 2 * twice_n[g]
    content, owner, count = [], [], []
    everyone = np.arange(n, dtype=np.int32)
    if n > 1:
        content.append(np.repeat(np.arange(1, glob + 1, dtype=np.int64), n))
        owner.append(np.tile(everyone, glob))
    else:
        unique += glob
    for f in range(pages.shape[0]):
        members = np.flatnonzero(fleet.family == f).astype(np.int32)
        for k in range(pages.shape[1]):
            o = members[fleet.holds[members, k]]
            if len(o) == 1:
                unique[o[0]] += pages[f, k]
            elif len(o):
                content.append(np.repeat(np.arange(first[f, k], first[f, k] + pages[f, k],
                                                   dtype=np.int64), len(o)))
                owner.append(np.tile(o, int(pages[f, k])))
    start = int(first.max() + pages.max()) + 1
    content.append(start + np.arange(int(twice_n.sum()), dtype=np.int64))
    owner.append(np.repeat(everyone, twice_n))
    content_a = np.concatenate(content)
    owner_a = np.concatenate(owner)
    count = np.ones(len(content_a), np.int64)
    count[len(content_a) - int(twice_n.sum()):] = 2
    cols = {c: np.zeros(n, np.int64) for c in INPUT_COLUMNS}
    cols["input"] = np.array([f"guest-{g:05d}" for g in range(n)], object)
    cols["format"] = np.array(["raw"] * n, object)
    cols["address_space"] = np.array(["physical"] * n, object)
    cols["pages"] = total
    cols["zero_pages"], cols["unique_pages"] = zero, unique
    return ContentTable(Columns(cols), content_a, owner_a, count, PS)
