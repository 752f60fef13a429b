"""Elo ratings from soft pairwise judgements: a Bradley-Terry fit with bootstrap intervals over prompts.

The paper (Bai et al. 2022) reports crowd Elo scores for harmlessness and helpfulness. Here a judge
compares the answers of two models to the same prompt and gives a soft outcome
p = P(answer of model a is better than answer of model b) in [0, 1]. Model i has a rating R_i in
Elo points (the anchor model is fixed at 0) and

    P(a beats b) = σ(Δ) = 1 / (1 + 10^(-(R_a - R_b) / 400)),   Δ = (R_a - R_b) / ELO,  ELO = 400 / ln 10.

`fit` maximises the weighted Bernoulli log-likelihood of the soft outcomes,

    Σ_i  p_i log σ(Δ_i) + (1 - p_i) log σ(-Δ_i)  -  (λ/2) ‖θ‖²,

over θ = the non-anchor ratings on the logit scale (R / ELO) by damped Newton's method (numpy only).
The ridge λ = `RIDGE` = 1e-6 per squared logit is a Gaussian prior with a standard deviation of
1000 logits: it moves a rating by about λθ / (Fisher information) logits, under 0.01 Elo even for a
model rated from a single comparison and around 1e-5 Elo with hundreds, but it keeps separable data
finite (a model that always wins with p = 1 gets a rating a few thousand Elo points above its
opponents instead of infinity; that number, and its interval, reflect the ridge and the amount of
data, not a measured strength: read it as "wins every comparison").

Length control (`length_control=True`) adds β·x to Δ with the covariate
x = log(len_a + 1) - log(len_b + 1): antisymmetric (swapping a and b flips its sign), scale-free for lengths
well above 1 (the log of the length ratio: characters or words give nearly the same β) and finite
for an empty answer (the +1). β is fitted jointly with the ratings, which are then the ratings at equal length, and
`length_coef` = β·ELO is the Elo advantage of an answer e ≈ 2.7 times as long as its opponent's.

Intervals come from a seeded bootstrap over groups (prompts): each of `n_boot` replicates draws the
groups with replacement (multinomial counts from `numpy.random.default_rng(seed)`), refits, and the
percentile interval at `level` is reported. The refits are vectorised: per-replicate weights of the
rows are the group counts, and one batched Newton iteration updates every replicate at once.

    from cai.evals.ratings import fit
    comparisons = [
        {"group": "prompt-1", "a": "rl-cai", "b": "sl-cai", "p": 0.8, "len_a": 512, "len_b": 300},
        {"group": "prompt-1", "a": "sl-cai", "b": "helpful-rlhf", "p": 0.6, "len_a": 300, "len_b": 420},
        ...
    ]
    result = fit(comparisons, ["helpful-rlhf", "sl-cai", "rl-cai"], anchor="helpful-rlhf", n_boot=1000)
    result["models"]["rl-cai"]  # {"elo": 183.2, "low": 120.5, "high": 247.9, "n": 400}
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ELO = 400 / math.log(10)  # Elo points per unit of logit; P(a beats b) = 1/(1+10^(-(Ra-Rb)/400))
RIDGE = 1e-6  # the ridge penalty λ on the logit-scale parameters (ratings and β); see the module docstring
MAX_ITER = 200  # Newton iterations at most (separable data needs about 30, ordinary data under 10)
TOL = 1e-10  # convergence: the largest parameter step, in logits
_CHUNK_ELEMENTS = 4_000_000  # bootstrap replicates are fitted in chunks of about this many row-parameter cells


def win_probability(delta_elo: float) -> float:
    """P(a beats b) when R_a - R_b = `delta_elo` Elo points: 1 / (1 + 10^(-delta_elo/400))."""
    x = delta_elo / ELO
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def fit(
    comparisons: Sequence[Mapping[str, Any]],
    models: Sequence[str],
    anchor: str,
    *,
    length_control: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Bradley-Terry Elo ratings of `models` from soft comparisons, with the anchor at 0 and
    bootstrap percentile intervals over groups.

    comparisons: each {"group": the prompt's id (any hashable; the bootstrap resamples groups),
    "a": model, "b": model, "p": P(a's answer beats b's) in [0, 1], "len_a", "len_b": answer lengths
    (finite, >= 0; needed only with `length_control`)}. Failed judgements must be filtered out by the
    caller: nothing is imputed.

    Returns {"anchor", "length_control", "n_comparisons", "n_groups", "n_boot", "seed", "level",
    "models": {name: {"elo", "low", "high", "n"}}, "win_prob": {a: {b: P(a beats b)}},
    "length_coef"}. Ratings and intervals are in Elo points; `n` counts the comparisons involving the
    model. A model with no comparisons, or not connected to the anchor through comparisons, gets
    None for elo, low and high (and None win probabilities); comparisons among such models are left
    out of the fit. If the anchor itself has no comparisons every rating is None. The anchor's own
    rating and interval are exactly 0. In a bootstrap replicate where a model is cut off from the
    anchor (its groups were not drawn) it has no rating, and its interval is taken over the other
    replicates (None if there are none). `win_prob` comes from the point ratings (with length control:
    at equal length). `length_coef` is β in Elo points per unit of x = log(len_a+1) - log(len_b+1)
    (None without length control). Same inputs and seed give identical floats.

    Raises ValueError (naming the comparison's index and field) for a missing field, p not a finite
    number in [0, 1], an unknown model, a == b, a bad length; and for empty input, duplicate models,
    an anchor not in `models`, n_boot < 0 or level outside (0, 1).
    """
    models = list(models)
    if len(set(models)) != len(models):
        raise ValueError(f"fit: models has duplicates: {models}")
    if anchor not in models:
        raise ValueError(f"fit: anchor {anchor!r} is not in models {models}")
    if not comparisons:
        raise ValueError("fit: comparisons is empty")
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 0:
        raise ValueError(f"fit: n_boot must be an integer >= 0, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"fit: level must be in (0, 1), got {level!r}")

    index = {m: i for i, m in enumerate(models)}
    a_idx, b_idx, p_arr, x_arr, g_idx = _validate(comparisons, index, length_control)
    n_models = len(models)
    counts_n = np.bincount(a_idx, minlength=n_models) + np.bincount(b_idx, minlength=n_models)
    n_groups = int(g_idx.max()) + 1

    connected = _connected(a_idx, b_idx, n_models, index[anchor])
    result: dict[str, Any] = {
        "anchor": anchor,
        "length_control": bool(length_control),
        "n_comparisons": len(comparisons),
        "n_groups": n_groups,
        "n_boot": int(n_boot),
        "seed": seed,
        "level": level,
    }

    elo: list[float | None] = [None] * n_models
    low: list[float | None] = [None] * n_models
    high: list[float | None] = [None] * n_models
    length_coef: float | None = None
    if connected[index[anchor]] and connected.sum() > 1:
        problem = _Problem(a_idx, b_idx, p_arr, x_arr, g_idx, n_groups, connected, index[anchor], length_control)
        theta = problem.solve(problem.weights(np.ones((1, n_groups))), None)[0]
        for j, m in enumerate(problem.free):
            elo[m] = float(theta[j] * ELO)
        elo[index[anchor]] = 0.0
        if length_control:
            length_coef = float(theta[-1] * ELO)
        if n_boot > 0:
            boot = problem.bootstrap(theta, n_boot, np.random.default_rng(seed))  # (n_boot, n_free), NaN = cut off
            q = np.array([(1 - level) / 2, (1 + level) / 2]) * 100
            for j, m in enumerate(problem.free):
                col = boot[:, j]
                col = col[np.isfinite(col)]
                if len(col):
                    lo, hi = np.percentile(col * ELO, q)
                    low[m], high[m] = float(lo), float(hi)
            low[index[anchor]] = high[index[anchor]] = 0.0

    result["models"] = {
        m: {"elo": elo[i], "low": low[i], "high": high[i], "n": int(counts_n[i])} for i, m in enumerate(models)
    }
    result["win_prob"] = {
        ma: {
            mb: (win_probability(elo[i] - elo[j]) if elo[i] is not None and elo[j] is not None else None)
            for j, mb in enumerate(models)
            if j != i
        }
        for i, ma in enumerate(models)
    }
    result["length_coef"] = length_coef
    return result


def _validate(
    comparisons: Sequence[Mapping[str, Any]], index: Mapping[str, int], length_control: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays (a, b, p, x, group) of the comparisons, or ValueError naming the first bad field."""
    fields = ("group", "a", "b", "p") + (("len_a", "len_b") if length_control else ())
    a_idx, b_idx, ps, xs, gs = [], [], [], [], []
    groups: dict[Any, int] = {}
    for i, c in enumerate(comparisons):
        where = f"fit: comparisons[{i}]"
        if not isinstance(c, Mapping):
            raise ValueError(f"{where} is not a mapping: {c!r}")
        for f in fields:
            if f not in c:
                raise ValueError(f"{where}: field {f!r} is missing")
        for f in ("a", "b"):
            if c[f] not in index:
                raise ValueError(f"{where}: field {f!r} = {c[f]!r} is not one of the models {list(index)}")
        if c["a"] == c["b"]:
            raise ValueError(f"{where}: field 'b' = {c['b']!r} is the same model as field 'a'")
        p = c["p"]
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or not 0 <= p <= 1:
            raise ValueError(f"{where}: field 'p' = {p!r} is not a finite number in [0, 1]")
        x = 0.0
        if length_control:
            lens = []
            for f in ("len_a", "len_b"):
                v = c[f]
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"{where}: field {f!r} = {v!r} is not a finite length >= 0")
                lens.append(float(v))
            x = math.log1p(lens[0]) - math.log1p(lens[1])
        try:
            g = groups.setdefault(c["group"], len(groups))
        except TypeError:
            raise ValueError(f"{where}: field 'group' = {c['group']!r} is not hashable") from None
        a_idx.append(index[c["a"]])
        b_idx.append(index[c["b"]])
        ps.append(float(p))
        xs.append(x)
        gs.append(g)
    return (
        np.array(a_idx, dtype=np.int64),
        np.array(b_idx, dtype=np.int64),
        np.array(ps, dtype=np.float64),
        np.array(xs, dtype=np.float64),
        np.array(gs, dtype=np.int64),
    )


def _connected(a_idx: np.ndarray, b_idx: np.ndarray, n_models: int, start: int) -> np.ndarray:
    """Which models are reachable from `start` through comparisons (a bool array)."""
    neighbours: list[set[int]] = [set() for _ in range(n_models)]
    for a, b in zip(a_idx.tolist(), b_idx.tolist()):
        neighbours[a].add(b)
        neighbours[b].add(a)
    seen = np.zeros(n_models, dtype=bool)
    if not neighbours[start]:
        return seen
    seen[start] = True
    stack = [start]
    while stack:
        for n in neighbours[stack.pop()]:
            if not seen[n]:
                seen[n] = True
                stack.append(n)
    return seen


class _Problem:
    """The design of one fit: rows of the design matrix, and how group counts weight them.

    Without length control the rows are the model pairs (oriented low index first): a replicate's
    sufficient statistics are, per pair, the total weight W and the weighted sum Y of p, which are
    linear in the group counts (counts @ per-group totals). With length control every comparison is
    its own row (x differs) and its weight is its group's count. Parameters θ: one logit rating per
    connected non-anchor model (`free`), then β with length control.
    """

    def __init__(
        self,
        a_idx: np.ndarray,
        b_idx: np.ndarray,
        p: np.ndarray,
        x: np.ndarray,
        g_idx: np.ndarray,
        n_groups: int,
        connected: np.ndarray,
        anchor: int,
        length_control: bool,
    ) -> None:
        keep = connected[a_idx]  # both ends are connected or neither is
        a_idx, b_idx, p, x, g_idx = a_idx[keep], b_idx[keep], p[keep], x[keep], g_idx[keep]
        self.free = [m for m in np.flatnonzero(connected).tolist() if m != anchor]
        column = {m: j for j, m in enumerate(self.free)}
        n_par = len(self.free) + (1 if length_control else 0)
        self.length_control = length_control
        self.n_groups = n_groups
        if length_control:
            ra, rb, self.group = a_idx, b_idx, g_idx
            self.p = p
            xcol = x
        else:
            lo, hi = np.minimum(a_idx, b_idx), np.maximum(a_idx, b_idx)
            p_lo = np.where(a_idx == lo, p, 1.0 - p)  # P(lower-index model wins)
            n_models = len(connected)
            pair_code = lo * n_models + hi
            codes, row = np.unique(pair_code, return_inverse=True)
            ra, rb = codes // n_models, codes % n_models
            n_rows = len(codes)
            self.w_by_group = np.zeros((n_groups, n_rows))
            self.y_by_group = np.zeros((n_groups, n_rows))
            np.add.at(self.w_by_group, (g_idx, row), 1.0)
            np.add.at(self.y_by_group, (g_idx, row), p_lo)
            xcol = None
        n_rows = len(ra)
        design = np.zeros((n_rows, n_par))
        for r, (ma, mb) in enumerate(zip(ra.tolist(), rb.tolist())):
            if ma != anchor:
                design[r, column[ma]] += 1.0
            if mb != anchor:
                design[r, column[mb]] -= 1.0
        if xcol is not None:
            design[:, -1] = xcol
        self.design = design
        self.pair_a, self.pair_b = ra, rb
        self.anchor = anchor
        self.n_models = len(connected)

    def weights(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row weights W and weighted outcomes Y, each (replicates, rows), for group counts (replicates, groups)."""
        if self.length_control:
            w = counts[:, self.group]
            return w, w * self.p
        return counts @ self.w_by_group, counts @ self.y_by_group

    def solve(self, wy: tuple[np.ndarray, np.ndarray], start: np.ndarray | None) -> np.ndarray:
        """The penalised maximum-likelihood θ of every replicate at once (damped Newton), (replicates, params)."""
        w, y = wy
        X = self.design
        n_rep, n_par = w.shape[0], X.shape[1]
        theta = np.zeros((n_rep, n_par)) if start is None else np.repeat(start[None, :], n_rep, axis=0)
        eye = RIDGE * np.eye(n_par)
        outer = (X[:, :, None] * X[:, None, :]).reshape(len(X), n_par * n_par)  # row r: x_r x_rᵀ, flattened

        def objective(t: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
            """The penalised log-likelihood of replicates `rows` at parameters `t`."""
            eta = t @ X.T
            ll = (y[rows] * eta - w[rows] * np.logaddexp(0.0, eta)).sum(axis=1)
            return ll - 0.5 * RIDGE * (t * t).sum(axis=1)

        current = objective(theta)
        for _ in range(MAX_ITER):
            eta = theta @ X.T
            mu = _sigmoid(eta)
            grad = (y - w * mu) @ X - RIDGE * theta
            s = w * mu * (1.0 - mu)
            hess = (s @ outer).reshape(n_rep, n_par, n_par) + eye  # Σ_r s_r x_r x_rᵀ per replicate, one GEMM
            step = np.linalg.solve(hess, grad[:, :, None])[:, :, 0]
            # Backtracking: halve the step of each replicate whose objective would fall.
            t = np.ones(n_rep)
            candidate = theta + step
            new = objective(candidate)
            for _ in range(60):
                worse = new < current - 1e-12 * (1.0 + np.abs(current))
                if not worse.any():
                    break
                t[worse] *= 0.5
                candidate[worse] = theta[worse] + t[worse, None] * step[worse]
                new[worse] = objective(candidate[worse], worse)
            moved = np.abs(candidate - theta).max() if n_par else 0.0
            theta, current = candidate, new
            if moved < TOL:
                break
        return theta

    def bootstrap(self, theta: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
        """θ of `n_boot` group-resampled replicates (rows), NaN for a model cut off from the anchor."""
        n_rows, n_par = self.design.shape
        chunk = max(1, min(n_boot, _CHUNK_ELEMENTS // max(1, n_rows * max(n_par, 1), self.n_groups)))
        uniform = np.full(self.n_groups, 1.0 / self.n_groups)
        out = np.empty((n_boot, len(self.free)))
        for start in range(0, n_boot, chunk):
            size = min(chunk, n_boot - start)
            counts = rng.multinomial(self.n_groups, uniform, size=size).astype(np.float64)
            w, y = self.weights(counts)
            fitted = self.solve((w, y), theta)[:, : len(self.free)]
            fitted[~self._reached(w)] = np.nan
            out[start : start + size] = fitted
        return out

    def _reached(self, w: np.ndarray) -> np.ndarray:
        """(replicates, free models): whether each model is connected to the anchor by rows of weight > 0."""
        active = w > 0
        ra, rb = self.pair_a, self.pair_b
        onehot_a = np.zeros((len(ra), self.n_models))
        onehot_b = np.zeros((len(rb), self.n_models))
        onehot_a[np.arange(len(ra)), ra] = 1.0
        onehot_b[np.arange(len(rb)), rb] = 1.0
        reach = np.zeros((w.shape[0], self.n_models), dtype=bool)
        reach[:, self.anchor] = True
        while True:  # one sweep per edge of the longest shortest path from the anchor
            via_a = (active & reach[:, ra]).astype(np.float64) @ onehot_b
            via_b = (active & reach[:, rb]).astype(np.float64) @ onehot_a
            new = reach | (via_a > 0) | (via_b > 0)
            if (new == reach).all():
                return reach[:, self.free]
            reach = new


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))
