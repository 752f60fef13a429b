"""Intervals shared by every measurement: a binomial rate's Wilson interval and a seeded bootstrap
interval of a mean.

    from cai.evals.stats import wilson
    wilson(31, 50)  # (0.4815..., 0.7414...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist


def wilson(k: float, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """The Wilson score interval of a rate of `k` successes in `n` trials (`k` may be fractional,
    as when a tie counts one half); None when `n` is 0. Unlike the normal approximation it stays
    inside [0, 1] and is usable at 0 or n successes."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} is outside [0, n={n}]")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values: Sequence[float], n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float] | None:
    """A seeded percentile-bootstrap interval of the mean of `values`; None when there are none."""
    import numpy as np

    if not values:
        return None
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
