"""Inputs per host: how much memory K guests "like these samples" need, and how many fit.

Measured, then modelled. For every k up to the number of samples, the k-th guest's marginal
footprint (the memory it adds after KSM to a host already holding k - 1 of the samples) is
measured exactly over many random orders of the samples. Beyond the samples it is a model:
the mean marginal footprints of guests 2..n are fitted with ``a + b / k`` (what a guest
adds levels off at ``a`` as ever more of its content is already on the host), and the sum
of that curve extends the measured memory. With fewer than four samples there is too little
to fit: each further guest adds what the last one added. The band: each further guest adds
between the 10th and the 90th percentile of what the sampled guests added after the first
(over every order), or the fitted curve where that lies outside.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .placement import HostModel

__all__ = ["PROJECTION_COLUMNS", "Projection"]

PROJECTION_COLUMNS = ("input_count", "measured", "memory_after_bytes", "memory_after_low_bytes",
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
        self.a, self.b = float(self.last.mean()), 0.0  # too few samples: the last marginal
        if n >= 4:
            guest = np.arange(2, n + 1, dtype=np.float64)
            marginal = np.diff(self.steps.mean(axis=0))
            (a, b), *_ = np.linalg.lstsq(np.stack([np.ones(n - 1), 1 / guest], 1), marginal,
                                         rcond=None)
            if a > 0:  # a curve that levels off at a positive footprint; else keep the last
                self.a, self.b = float(a), float(b)
        # The band: what a further guest adds lies where the sampled guests' marginal
        # footprints lay (every guest but the first of an order, which pays for all that is
        # shared), 10th to 90th percentile.
        later = np.diff(self.steps, axis=1) if n > 1 else self.last[:, None]
        self.rates = float(np.percentile(later, 10)), float(np.percentile(later, 90))

    def memory(self, k: int) -> tuple[float, float, float]:
        """Host memory after KSM for ``k`` guests: (expected, low, high)."""
        if k < 1:
            raise ValueError(f"--project counts must be at least 1, not {k}")
        if k <= self.samples:
            col = self.steps[:, k - 1]
            return float(col.mean()), float(np.percentile(col, 10)), \
                float(np.percentile(col, 90))
        n = self.samples
        base = float(self.steps[:, -1].mean())
        extra = self.a * (k - n) + self.b * (_harmonic(k) - _harmonic(n))
        low, high = (rate * (k - n) for rate in self.rates)
        return base + extra, base + min(low, extra), base + max(high, extra)

    def table(self, counts: Sequence[int]) -> pd.DataFrame:
        """One row per count, sorted: ``input_count`` (inputs like the samples on one host),
        ``measured`` (False beyond the sample count: a model), ``memory_after_bytes`` (mean over the orders, or the model), the band
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


def _harmonic(k: int) -> float:
    """1 + 1/2 + ... + 1/k (exact to 1e-12 for any k; k may be huge while bisecting)."""
    if k < 1000:
        return float(np.sum(1.0 / np.arange(1, k + 1)))
    return float(np.log(k) + 0.5772156649015329 + 1 / (2 * k) - 1 / (12 * k * k))
