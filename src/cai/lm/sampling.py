"""Next-token sampling, written once: the transformers back-end's decode loop and PPO's rollouts
both pick their tokens here, so generation and the policy being optimised cannot drift apart.

Each sampled row draws a single uniform number and picks its token by inverse CDF, so with one
generator per row a row's token depends only on its own seed, never on which rows share its batch.
Nucleus sampling (`top_p < 1`) searches the nucleus among the `top_k` most likely tokens (a partial
sort: a full sort of a 49k vocabulary per row is slow on a CPU) and sorts a row in full only when
those hold less than `top_p` of the mass. Rows with `top_p >= 1` sample from the whole distribution
without sorting it.

    python -c "import torch; from cai.lm.sampling import sample_next; \
      print(sample_next(torch.randn(2, 10), 1.0, 0.9, torch.Generator().manual_seed(0)))"
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _per_row(value: float | Sequence[float], rows: int, what: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * rows
    values = [float(v) for v in value]
    if len(values) != rows:
        raise ValueError(f"sample_next: {len(values)} {what} values for {rows} rows")
    return values


def sample_next(logits: torch.Tensor, temperature: float | Sequence[float], top_p: float | Sequence[float],
                gens: torch.Generator | Sequence[torch.Generator], top_k: int = 1024) -> torch.Tensor:
    """One token id per row of `logits` (B, V): greedy where the row's temperature is 0, else sampled
    from softmax(logits / temperature) restricted to the row's `top_p` nucleus.

    `temperature` and `top_p` are one value for every row or one per row. `gens` is one generator
    per row (a row's draw then depends on its own generator only) or a single generator that draws
    for the sampled rows in order."""
    b = logits.shape[0]
    temps = _per_row(temperature, b, "temperature")
    tops = _per_row(top_p, b, "top_p")
    logits = logits.float()
    out = logits.argmax(-1)
    rows = [i for i in range(b) if temps[i] > 0]
    if not rows:
        return out
    if isinstance(gens, torch.Generator):
        u = torch.rand(len(rows), generator=gens, dtype=torch.float64)
    else:
        if len(gens) != b:
            raise ValueError(f"sample_next: {len(gens)} generators for {b} rows")
        u = torch.cat([torch.rand(1, generator=gens[i], dtype=torch.float64) for i in rows])
    u = u.to(logits.device)
    sel = torch.tensor(rows, device=logits.device)
    t = torch.tensor([temps[i] for i in rows], device=logits.device)
    probs = F.softmax(logits[sel] / t[:, None], dim=-1)
    picked = torch.empty(len(rows), dtype=out.dtype, device=logits.device)

    whole = [k for k, i in enumerate(rows) if tops[i] >= 1.0]
    if whole:  # the whole distribution: inverse CDF in vocabulary order, no sort needed
        w = torch.tensor(whole, device=logits.device)
        cdf = probs[w].double().cumsum(-1)
        pick = torch.searchsorted(cdf, (u[w] * cdf[:, -1])[:, None]).clamp(max=cdf.shape[-1] - 1)
        picked[w] = pick.squeeze(-1)
    nucleus = [k for k, i in enumerate(rows) if tops[i] < 1.0]
    if nucleus:
        n = torch.tensor(nucleus, device=logits.device)
        p = probs[n]
        top_p_n = torch.tensor([tops[rows[k]] for k in nucleus], device=logits.device, dtype=torch.float64)
        k = min(top_k, p.shape[-1])
        vals, idx = p.topk(k, dim=-1)
        short = (vals.sum(-1).double() < top_p_n).nonzero().flatten()
        if len(short):  # a flat distribution: the nucleus reaches past the top k, so sort those rows in full
            full_v, full_i = p[short].sort(-1, descending=True)
            vals = F.pad(vals, (0, p.shape[-1] - k))
            idx = F.pad(idx, (0, p.shape[-1] - k))
            vals[short], idx[short] = full_v, full_i
        vals = vals.double()
        vals = vals.masked_fill(vals.cumsum(-1) - vals > top_p_n[:, None], 0.0)
        cdf = vals.cumsum(-1)
        pick = torch.searchsorted(cdf, (u[n] * cdf[:, -1])[:, None]).clamp(max=cdf.shape[-1] - 1)
        picked[n] = idx.gather(-1, pick).squeeze(-1)
    out[sel] = picked
    return out
