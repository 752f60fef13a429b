"""Stage `pm`: the preference model, a scalar head on a small LM trained on soft preference labels.

Input rows are the `preferences` stage's (records.py, "Preference rows"): AI harmlessness labels
with a soft `p_chosen` and human helpfulness labels with `p_chosen` = 1. The loss is the
Bradley-Terry cross-entropy against `p_chosen` (`losses.soft_bt_loss`), so a 0.7 label asks for
sigmoid(margin) = 0.7 instead of an ever larger margin. The score of a (prompt, response) pair is
the head applied to the hidden state of the sequence's last real token, the response's end-of-turn
token; it is read there by position, because this tokenizer's pad token is that same end-of-turn
token and padding-based pooling would miss it.

Rows with split "train" are trained on; rows with split "eval" are scored at the end for accuracy,
calibration (ECE) and loss, for AI and human labels separately (`<run>/pm/eval.json`). Checkpoints
go to `<run>/pm/checkpoints` and a stopped run resumes from the newest one with the same data order
and RNG state. The model is saved as a standard transformers sequence-classification model
(safetensors and tokenizer) in `<run>/pm/model`; `reward.RewardModel` loads it for the PPO stage.

A step's `batch_size * grad_accum` pairs are cut into micro-batches longest first
(`training.micro_batches`), so each pads to a similar length; `pm.micro_tokens` > 0 also caps
the token positions of one micro-batch. Each micro-batch's mean loss is weighted by its share of
the step's pairs, so the step's gradient is the per-pair mean whatever the cut.

Under `accelerate launch` (configs in `configs/accelerate/`) `pm.batch_size` stays the global
micro-batch: each process scores its share, the body and score head are one module for DDP /
FSDP / ZeRO, and the step matches a single process's on the same rows. Only the main process writes.

    cai run configs/quickstart.yaml --from pm
    accelerate launch --config_file configs/accelerate/ddp.yaml -m cai.cli run configs/quickstart.yaml --from pm
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cai import reward
from cai.batches import row_counts, split_rows
from cai.config import PipelineConfig, PMConfig, fingerprint, plain
from cai.rundir import Stage
from cai.stages.trained import model_saved, run_training

NAME = "pm"


def load_for_training(name: str, device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer): `name` with a fresh one-output head (fp32 weights; bf16 comes from autocast)."""
    from transformers import AutoModelForSequenceClassification

    from cai.models import load_model

    model, tok = load_model(name, "float32", device, model_class=AutoModelForSequenceClassification, num_labels=1)
    # Our scores never pool by pad token, but others loading the saved model with transformers do.
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def train(rows: Sequence[dict[str, Any]], cfg: PMConfig, out_dir: Path, seed: int = 0, device: str = "auto",
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train on the rows with split "train", evaluate on those with split "eval", save the model to
    `out_dir/model` and the evaluation to `out_dir/eval.json`. `on_step(step, metrics)` is called
    after each optimiser step (and its checkpoint). Returns steps, per-step log and evaluation.

    Under `accelerate launch` every process calls it: each takes its share of every micro-batch of
    `cfg.batch_size` pairs (the global micro-batch), gradients are averaged over the processes, and
    the logged figures are the whole step's; only the main process writes files."""
    import contextlib

    import torch
    from tqdm import tqdm

    from cai import training
    from cai.batches import pad_batch, preference_pairs
    from cai.checkpoints import MetricsLog, Progress
    from cai.distributed import (
        Joint,
        accelerator,
        check_grad_accum,
        full_state_dict,
        local_rows,
        per_process,
        prepare,
    )
    from cai.losses import pairwise_accuracy, soft_bt_loss
    from cai.training import optimizer_and_schedule, steps_for

    train_rows, eval_rows = split_rows(rows, NAME)
    acc = accelerator(cfg.bf16, device)
    micro_size = per_process(cfg.batch_size, acc, "pm.batch_size")
    check_grad_accum(acc, cfg.grad_accum, "pm.grad_accum")
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the new head's initial weights (the same on every process)
    model, tok = load_for_training(cfg.model, str(acc.device))
    pairs = preference_pairs(tok, train_rows, cfg.max_length)
    held_out = preference_pairs(tok, eval_rows, cfg.max_length)

    step_size = cfg.batch_size * cfg.grad_accum
    steps = steps_for(len(pairs), step_size, cfg.epochs, cfg.max_steps, seed)
    widths = [max(len(m["chosen"][0]), len(m["rejected"][0])) for m in pairs]
    # Body and head in one module, so one prepare() covers both and DDP reduces both's gradients.
    # The score function is looked up at call time (benchmarks wrap it).
    scorer = Joint(lambda m, ids, att: reward.last_token_scores(m.model, ids, att), model=model)
    opt, sched = optimizer_and_schedule(scorer.parameters(), cfg.learning_rate, len(steps), cfg.warmup_ratio,
                                        cfg.weight_decay)
    scorer, opt = prepare(acc, micro_size, scorer, opt)
    modules = {"model": acc.unwrap_model(scorer).model, "optimizer": opt, "scheduler": sched}
    log = MetricsLog(out_dir / "metrics.jsonl", cfg.report_to, run_name=f"{out_dir.parent.name}-pm", config=plain(cfg),
                     main=acc.is_main_process)
    progress = Progress(out_dir, modules, fingerprint(cfg, seed, [r.get("record_id") for r in train_rows]), log,
                        cfg.save_steps, len(steps), acc, on_step)
    start = progress.resume()

    # Dropout stays off (eval mode still gives gradients): scores in training then match the scores
    # the saved model gives, and the margin's noise does not blur soft targets.
    scorer.eval()
    bar = tqdm(range(start, len(steps)), initial=start, total=len(steps), desc="pm", leave=False,
               disable=not acc.is_main_process)
    for step in bar:
        idx = steps[step]
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=acc.device)
        margins, targets = [], []
        # The step's pairs longest first, so each micro-batch pads to a similar length (looked up at
        # call time: tests compare it with other cuts). Every process cuts the same way.
        cuts = training.micro_batches(idx, widths, cfg.batch_size, acc.num_processes, cfg.micro_tokens)
        for c, cut in enumerate(cuts):
            micro = [pairs[i] for i in local_rows(cut, acc)]
            batch = pad_batch([m["chosen"][0] for m in micro] + [m["rejected"][0] for m in micro], tok.pad_token_id)
            p = torch.tensor([m["p"] for m in micro], device=acc.device)
            last = c == len(cuts) - 1
            # Gradients are reduced once, on the step's last micro-batch.
            with contextlib.nullcontext() if last else acc.no_sync(scorer):
                with acc.autocast():
                    scores = scorer(batch["input_ids"].to(acc.device), batch["attention_mask"].to(acc.device))
                margin = scores[: len(micro)] - scores[len(micro):]
                # Each process's mean over its equal share, averaged over processes by the gradient
                # reduction, is the micro-batch's mean; weighted by the micro-batch's share of the
                # step, the sum over micro-batches is the per-pair mean over the whole step.
                loss = soft_bt_loss(margin, p) * (len(cut) / len(idx))
                acc.backward(loss)
            total += loss.detach()
            margins.append(margin.detach())
            targets.append(p)
        grad_norm = acc.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        m_all = acc.gather(torch.cat(margins))
        metrics = {"loss": float(acc.reduce(total, "mean")),
                   "accuracy": float(pairwise_accuracy(m_all)),
                   "margin": float(m_all.mean()), "target": float(acc.gather(torch.cat(targets)).mean()),
                   "lr": sched.get_last_lr()[0]}
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        progress.step_done(step + 1, metrics, grad_norm)  # log, checkpoint when due, on_step
    bar.close()
    log.close()

    report = evaluate(scorer, held_out, cfg.batch_size, tok.pad_token_id, acc)
    state_dict = full_state_dict(acc, scorer, prefix="model.")
    if acc.is_main_process:
        progress.save(acc.unwrap_model(scorer).model, tok, report, state_dict)  # eval.json, model/
    acc.wait_for_everyone()
    return progress.result(report, len(train_rows), len(eval_rows))


def evaluate(scorer: Any, pairs: Sequence[dict[str, Any]], batch_size: int, pad_id: int, acc: Any) -> dict[str, Any]:
    """Accuracy, ECE, loss and mean margin on tokenised pairs (`batches.preference_pairs`), overall
    and for AI and human labels (a group without pairs is None), scored by `scorer(input_ids,
    attention_mask)` (the prepared training module), each process scoring its share of the pairs."""
    import torch

    from cai.batches import pad_batch
    from cai.distributed import gather_padded, padded_share
    from cai.losses import preference_report

    if not pairs:
        return {"overall": None, "ai": None, "human": None}
    share, real = padded_share(list(pairs), acc)
    margins: list[float] = []
    with torch.no_grad():
        for k in range(0, len(share), batch_size):
            micro = share[k: k + batch_size]
            batch = pad_batch([m["chosen"][0] for m in micro] + [m["rejected"][0] for m in micro], pad_id)
            with acc.autocast():
                s = scorer(batch["input_ids"].to(acc.device), batch["attention_mask"].to(acc.device))
            margins += (s[: len(micro)].double() - s[len(micro):].double()).tolist()
    m = torch.tensor(gather_padded(margins, real, acc), dtype=torch.float64)
    return preference_report(m, torch.tensor([p["p"] for p in pairs]), [p["source"] for p in pairs])


def run(cfg: PipelineConfig, inputs: list[dict[str, Any]], inputs_fp: str, allow_changed: bool = False) -> Stage:
    settings = plain({"pm": cfg.pm, "seed": cfg.seed, "inputs": inputs_fp})
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)
    if model_saved(stage):
        return stage
    counts = row_counts(inputs, *split_rows(inputs, NAME))

    from cai.checkpoints import finished

    return run_training(stage, cfg.model.device, counts,
                        lambda: train(inputs, cfg.pm, stage.dir, seed=cfg.seed, device=cfg.model.device),
                        lambda result: finished(result, counts, stage.dir / "model"), drop_checkpoints=True)
