"""The core table: for every input, how many of its scanned pages hold each content.

Built once per analysis, after stage 2, from the fingerprints, the content classes and the
scan masks; every number of the analysis (the KSM counters, per-input and per-process
statistics, pairwise sharing, the histogram, the top contents) is computed from it. It holds
no page bytes and no per-page arrays, so it is small, cheap to restrict to any subset of
inputs (capacity planning does that many times), and serialisable as two data frames. It is
held as plain columns and arrays (pandas is imported only for :attr:`ContentTable.inputs`,
:meth:`~ContentTable.per_input` and :meth:`~ContentTable.frames`).

Only pages KSM would scan under the analysis' scope are counted. Contents come in three
kinds, stored three ways:

* the zero page: a column ``zero_pages`` of :attr:`ContentTable.inputs`;
* contents seen once among all scanned pages: a column ``unique_pages`` (they stay unique
  in every subset, so they need no identity);
* every other content: sparse rows ``(content, input, pages)``, sorted by content then
  input, one row per input holding that content (at most 20 bytes per duplicated scanned
  page, nothing per unique or zero page).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .columns import Columns
from .eligibility import ScanMask
from .hashing.stage1 import Fingerprints
from .hashing.stage2 import UNIQUE, ContentClasses
from .ksm import (
    KsmCounters,
    KsmSettings,
    content_chunks,
    merged_pages,
    predict,
    predict_processes,
)
from .pages import PAGE_SIZE, PageState

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["INPUT_COLUMNS", "ContentTable", "build_content_table"]

INPUT_COLUMNS = ("input", "format", "address_space", "pages", "hole_pages", "excluded_pages",
                 "not_saved_pages", "ineligible_pages", "zero_pages", "unique_pages", "domain")
"""Columns of :attr:`ContentTable.inputs`."""


@dataclass(frozen=True)
class ContentTable:
    """Inputs x contents: the pages of each content class each input holds, KSM's view.

    Attributes:
        inputs: one row per input, in analysis order, as a DataFrame (made from
            ``input_columns`` when first read). Columns: ``input`` (path), ``format``,
            ``address_space`` (``physical``/``virtual``), ``pages`` (every page the dump
            describes), ``hole_pages``, ``excluded_pages``, ``not_saved_pages`` (pages with
            no bytes), ``ineligible_pages`` (bytes known, KSM would not scan them),
            ``zero_pages`` (scanned all-zero pages), ``unique_pages`` (scanned pages whose
            content no other scanned page holds), ``domain`` (a number: pages merge only
            within one domain, zero pages included; all 0 without a policy).
        input_columns: ``inputs`` as plain columns (lists and arrays, no pandas).
        content: int64 content class of each sparse row (sorted; ids need not be dense).
        owner: int32 input (row of ``inputs``) of each sparse row.
        pages: int64 pages of that content in that input (at least 1).
        page_size: bytes per page.
    """

    input_columns: Columns
    content: np.ndarray
    owner: np.ndarray
    pages: np.ndarray
    page_size: int

    @property
    def inputs(self) -> pd.DataFrame:
        """One row per input (see the class' attributes), made from ``input_columns``."""
        return self.input_columns.frame()

    @property
    def names(self) -> list[str]:
        """The input paths, in order."""
        return [str(p) for p in self.input_columns["input"]]

    def column(self, name: str) -> np.ndarray:
        """A numeric column of ``input_columns`` (``zero_pages``, ``domain``...) as int64."""
        return np.asarray(self.input_columns[name], np.int64)

    def subset(self, inputs: Sequence[int | str]) -> ContentTable:
        """The table of a host holding only ``inputs`` (positions or paths), in that order.

        Costs one pass over the sparse rows; contents the subset holds once become
        ordinary rows of one page (the model counts them unshared).
        """
        names = self.names
        index = [names.index(i) if isinstance(i, str) else int(i) for i in inputs]
        if len(set(index)) != len(index):
            raise ValueError("an input appears twice in the subset")
        renumber = np.full(len(names), -1, np.int32)
        renumber[index] = np.arange(len(index), dtype=np.int32)
        keep = renumber[self.owner] >= 0
        owner = renumber[self.owner[keep]]
        content, pages = self.content[keep], self.pages[keep]
        order = np.lexsort((owner, content))  # new input order within each content
        return ContentTable(self.input_columns.take(index), content[order], owner[order],
                            pages[order], self.page_size)

    def copies(self) -> np.ndarray:
        """Scanned pages per duplicated content class (classes in content order)."""
        if not len(self.content):
            return np.empty(0, np.int64)
        return np.add.reduceat(self.pages, self._starts())

    def classes(self) -> np.ndarray:
        """The duplicated content classes, in the order of :meth:`copies`."""
        return self.content[self._starts()] if len(self.content) else self.content

    def counters(self, settings: KsmSettings, *, zero_pages: bool = True) -> KsmCounters:
        """The KSM counters of a host holding these inputs.

        Args:
            settings: the KSM knobs.
            zero_pages: count the scanned zero pages as present (False: as never touched).
        """
        zero = self.zero_by_domain() if zero_pages else 0
        return predict(self.copies(), zero, settings,
                       singletons=int(self.column("unique_pages").sum()))

    def zero_by_domain(self) -> np.ndarray:
        """Scanned zero pages per domain (they merge within a domain only), by domain number."""
        domains, which = np.unique(self.column("domain"), return_inverse=True)
        zero = np.zeros(len(domains), np.int64)
        np.add.at(zero, which, self.column("zero_pages"))
        return zero

    def with_policy(self, domains: Sequence[int] | None = None, *, zero_only: bool = False
                    ) -> ContentTable:
        """The table under a merging policy: pages of inputs in different ``domains`` never
        merge (the class of a content becomes one class per domain); with ``zero_only``,
        only zero pages merge (every other page counts as unique)."""
        changed: dict[str, np.ndarray] = {}
        content, owner, pages = self.content, self.owner, self.pages
        if domains is not None:
            domain = changed["domain"] = np.asarray(domains, np.int64)
            content = content * (int(domain.max()) + 1) + domain[owner]
            order = np.lexsort((owner, content))
            content, owner, pages = content[order], owner[order], pages[order]
        if zero_only:
            changed["unique_pages"] = self.column("unique_pages") + np.bincount(
                owner, weights=pages, minlength=len(self.input_columns)).astype(np.int64)
            content, owner, pages = content[:0], owner[:0], pages[:0]
        return ContentTable(self.input_columns.replace(**changed), content, owner, pages,
                            self.page_size)

    def nonzero_pages(self) -> np.ndarray:
        """Scanned non-zero pages per input, duplicated or not."""
        n = len(self.input_columns)
        held = self.column("unique_pages").copy()  # summed into: not the column itself
        for lo, hi in content_chunks(self.content):  # no float temporary of every row
            held += np.bincount(self.owner[lo:hi], weights=self.pages[lo:hi],
                                minlength=n).astype(np.int64)
        return held

    def per_input_columns(self, settings: KsmSettings) -> Columns:
        """Per input: scanned pages, distinct contents, self-sharing and ``ksm_stat``.

        Columns ``nonzero_pages``, ``distinct_contents``,
        ``self_sharing_pages`` (pages KSM saves merging within the input alone, zero pages
        apart), then :data:`ksm_analyze.ksm.KSM_STAT_FIELDS` (zero pages present).
        """
        n = len(self.input_columns)
        nonzero = self.nonzero_pages()
        self_saved, distinct = np.zeros(n, np.int64), self.column("unique_pages").copy()
        for lo, hi in content_chunks(self.content):
            owner, pages = self.owner[lo:hi], self.pages[lo:hi]
            ksm, unshared = merged_pages(pages, settings.max_page_sharing)
            self_saved += np.bincount(owner, weights=pages - ksm - unshared,
                                      minlength=n).astype(np.int64)
            distinct += np.bincount(owner, minlength=n)
        stat = predict_processes(self.content, self.owner, self.pages, nonzero,
                                 self.column("zero_pages"), settings,
                                 domain=self.column("domain"))
        return Columns({
            "nonzero_pages": nonzero,
            "distinct_contents": distinct,
            "self_sharing_pages": self_saved,
            **stat,
        })

    def per_input(self, settings: KsmSettings) -> pd.DataFrame:
        """:meth:`per_input_columns` as a DataFrame."""
        return self.per_input_columns(settings).frame()

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(inputs, rows)``: the table as two data frames, e.g. to store as Parquet."""
        import pandas as pd

        rows = pd.DataFrame({"content": self.content, "input": self.owner, "pages": self.pages})
        return self.inputs.copy(), rows

    @classmethod
    def from_frames(cls, inputs: pd.DataFrame, rows: pd.DataFrame, page_size: int
                    ) -> ContentTable:
        """Rebuild a table from :meth:`frames`."""
        content = rows["content"].to_numpy(np.int64)
        owner = rows["input"].to_numpy(np.int32)
        order = np.lexsort((owner, content))
        return cls(Columns.from_frame(inputs.reset_index(drop=True)), content[order],
                   owner[order], rows["pages"].to_numpy(np.int64)[order], page_size)

    def _starts(self) -> np.ndarray:
        """Index of the first sparse row of each content."""
        return np.flatnonzero(np.r_[True, self.content[1:] != self.content[:-1]])


def input_row(fp: Fingerprints, mask: ScanMask, unique_pages: int) -> dict[str, Any]:
    """One input's row of :attr:`ContentTable.inputs` (``domain`` 0: no policy yet)."""
    states = fp.state_pages
    return {
        "input": fp.path,
        "format": fp.format.value,
        "address_space": fp.address_space,
        "pages": sum(e.npages for e in fp.extents),
        "hole_pages": states.get(PageState.HOLE, 0),
        "excluded_pages": states.get(PageState.EXCLUDED, 0),
        "not_saved_pages": states.get(PageState.NOT_SAVED, 0),
        "ineligible_pages": mask.ineligible_pages,
        "zero_pages": int(np.count_nonzero(fp.zero[mask.scanned])) + mask.zero_state_pages,
        "unique_pages": unique_pages,
        "domain": 0,
    }


def build_content_table(
    fingerprints: Sequence[Fingerprints], classes: ContentClasses, masks: Sequence[ScanMask]
) -> ContentTable:
    """Count, per input, the scanned pages of each content: the analysis' one core table."""
    n = len(fingerprints)
    scanned = [labels[m.scanned] for labels, m in zip(classes.labels, masks, strict=True)]
    # One key per scanned page of a class, class * n + input: sorted keys order the sparse
    # rows by content, then input.
    keys = [s[s >= 0].astype(np.int64) * n + k for k, s in enumerate(scanned)]
    pairs, pages = np.unique(np.concatenate(keys or [np.empty(0, np.int64)]), return_counts=True)
    content, owner = pairs // max(n, 1), (pairs % max(n, 1)).astype(np.int32)
    # A class with one scanned page in all (its other copies unscanned, or a false
    # candidate) is a unique page: fold it into unique_pages.
    alone = np.bincount(content, weights=pages)[content] == 1 if len(content) else pages == 1
    folded = np.bincount(owner[alone], minlength=n)
    rows = [input_row(fp, mask, int(np.count_nonzero(labels == UNIQUE)) + int(folded[k]))
            for k, (fp, labels, mask) in enumerate(zip(fingerprints, scanned, masks,
                                                       strict=True))]
    inputs = Columns.from_records(rows, INPUT_COLUMNS)
    page_size = fingerprints[0].page_size if fingerprints else PAGE_SIZE
    return ContentTable(inputs, content[~alone], owner[~alone], pages[~alone].astype(np.int64),
                        page_size)
