"""VMs per host: how much memory K guests "like these samples" need, and how many fit.

Measured, then modelled. For every k up to the number of samples, the k-th guest's marginal
footprint (the memory it adds after KSM to a host already holding k - 1 of the samples) is
measured exactly over many random orders of the samples. Beyond the samples it is a model:
the marginal footprint of further guests is taken as that of the last sampled guest, whose
spread over the orders gives the band (10th to 90th percentile). Content the samples share
costs once; what each guest adds on top is what the last guest added.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .placement import HostModel

__all__ = ["PROJECTION_COLUMNS", "Projection"]

PROJECTION_COLUMNS = ("vms", "measured", "memory_after_bytes", "memory_after_low_bytes",
                      "memory_after_high_bytes", "memory_before_bytes")
"""Columns of :func:`project`'s table."""


class Projection:
    """The measured marginal footprints of the samples, and the model beyond them.

    Args:
        model: the samples (every input of the table).
        orders: random orders of the samples to measure the marginal footprints over.
        seed: the orders' random seed (the result is repeatable).
    """

    def __init__(self, model: HostModel, *, orders: int = 200, seed: int = 0) -> None:
        n = self.samples = model.n
        if n == 0:
            raise ValueError("no samples to project from")
        rng = np.random.default_rng(seed)
        self.steps = np.empty((orders, n), np.int64)  # memory after KSM, first k+1 guests
        for r in range(orders):
            host = model.empty()
            for k, i in enumerate(rng.permutation(n)):
                model.add(host, int(i))
                self.steps[r, k] = model.bytes(host)
        self.last = self.steps[:, -1] - (self.steps[:, -2] if n > 1 else 0)
        self.mean_before = model.before(range(n)) / n

    def memory(self, k: int) -> tuple[float, float, float]:
        """Host memory after KSM for ``k`` guests: (expected, low, high)."""
        if k < 1:
            raise ValueError(f"--project guest counts must be at least 1, not {k}")
        if k <= self.samples:
            col = self.steps[:, k - 1]
            return float(col.mean()), float(np.percentile(col, 10)), \
                float(np.percentile(col, 90))
        base, extra = float(self.steps[:, -1].mean()), k - self.samples
        return (base + extra * float(self.last.mean()),
                base + extra * float(np.percentile(self.last, 10)),
                base + extra * float(np.percentile(self.last, 90)))

    def table(self, counts: Sequence[int]) -> pd.DataFrame:
        """One row per count, sorted: ``vms``, ``measured`` (False beyond the sample count:
        a model), ``memory_after_bytes`` (mean over the orders, or the model), the band
        ``memory_after_low_bytes``/``memory_after_high_bytes`` (10th/90th percentile), and
        ``memory_before_bytes`` (without KSM: the mean guest's pages times the count)."""
        rows = [(k, k <= self.samples, *(round(v) for v in self.memory(k)),
                 round(self.mean_before * k)) for k in sorted(set(counts))]
        return pd.DataFrame(rows, columns=list(PROJECTION_COLUMNS))

    def fits(self, capacity: int) -> tuple[int, int, int]:
        """Guests that fit in ``capacity`` bytes: (expected, cautious by the high band,
        hopeful by the low band)."""
        return tuple(self._fits(capacity, which) for which in (0, 2, 1))  # type: ignore[return-value]

    def _fits(self, capacity: int, which: int) -> int:
        lo, hi = 0, 1
        while self.memory(hi)[which] <= capacity and hi < 1 << 40:  # memory grows with k
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.memory(mid)[which] <= capacity else (lo, mid)
        return lo
