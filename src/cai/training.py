"""The schedule of the training loops we own (preference model, DPO, PPO): which rows every
optimiser step takes, from a seeded shuffle per epoch, how a step's rows are cut into micro-batches
(in length order, optionally by a token budget), and the optimiser with its learning-rate schedule.

The loops themselves live in their stage files (`stages/pm.py`, `stages/dpo.py`, `stages/ppo.py`),
each short enough to read top to bottom, built from small parts: batches.py (rows to token
batches), distributed.py (`accelerate` and the processes' shares), checkpoints.py (checkpoints,
metrics log, saved model), losses.py (the losses) and this file. Step k takes the same rows however
often a run was stopped and resumed, which is what lets a resumed run repeat an uninterrupted one.

    cai run configs/quickstart.yaml --from pm
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch


def batch_order(n: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Every optimiser step's row indices for the whole run, from a seeded shuffle per epoch, so
    step k has the same rows however often the run was stopped and resumed."""
    if n == 0:
        return []
    total = max(1, math.ceil(n * epochs / batch_size))
    order: list[int] = []
    epoch = 0
    while len(order) < total * batch_size:
        perm = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(perm)
        order += perm
        epoch += 1
    return [order[i * batch_size: (i + 1) * batch_size] for i in range(total)]


def steps_for(n: int, batch_size: int, epochs: float, max_steps: int, seed: int) -> list[list[int]]:
    """`batch_order`, cut to `max_steps` when that is positive."""
    steps = batch_order(n, batch_size, epochs, seed)
    return steps[:max_steps] if max_steps > 0 else steps


def micro_batches(rows: Sequence[int], lengths: Sequence[int], batch_size: int, processes: int = 1,
                  max_tokens: int = 0, seqs_per_row: int = 2) -> list[list[int]]:
    """One optimiser step's `rows` cut into micro-batches in length order, longest first, so each
    micro-batch pads to a similar length: at most `batch_size` rows each and, when `max_tokens` is
    positive, at most `max_tokens` token positions computed per forward pass (`seqs_per_row`
    sequences per row, each padded to the micro-batch's longest, `lengths[i]` being row i's longest
    sequence). A micro-batch is cut to a multiple of `processes` rows (each process takes an equal
    share) and never below one row per process, however long its rows. The step's rows are the same
    set as before; only their grouping changes, so a loss normalised per row over the step (weight
    len(micro) / len(rows) per micro-batch mean) gives the same gradient up to summation order."""
    if batch_size < processes or batch_size % processes or len(rows) % processes:
        raise ValueError(f"micro_batches: batch_size ({batch_size}) and the step's rows ({len(rows)}) must be "
                         f"multiples of the {processes} processes")
    # Ties keep the step's order, so the cut depends on the rows and lengths only.
    order = sorted(range(len(rows)), key=lambda j: -lengths[rows[j]])
    out: list[list[int]] = []
    k = 0
    while k < len(order):
        width = max(1, lengths[rows[order[k]]])  # the longest left: it sets this micro-batch's padding
        n = batch_size
        if max_tokens > 0:
            n = min(n, max(processes, max_tokens // (seqs_per_row * width) // processes * processes))
        out.append([rows[j] for j in order[k: k + n]])
        k += n
    return out


def optimizer_and_schedule(params: Any, lr: float, total_steps: int, warmup_ratio: float,
                           weight_decay: float = 0.0) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with linear warm-up then cosine decay to 10% of `lr`."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)
    warm = max(0, round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        frac = (step - warm) / max(1, total_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
