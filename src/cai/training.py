"""The schedule of the training loops we own (preference model, DPO, PPO): which rows every
optimiser step takes, from a seeded shuffle per epoch, and the optimiser with its learning-rate
schedule.

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
