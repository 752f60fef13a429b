"""Intervals shared by every measurement: a binomial rate's Wilson interval.

    from cai.evals.stats import wilson
    wilson(31, 50)  # (0.4815..., 0.7414...)
"""

from __future__ import annotations

import math
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
