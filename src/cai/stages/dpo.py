"""Stage `dpo`: direct preference optimisation of the SL-CAI model on the preference rows, the
alternative to PM + PPO (`rl.method: dpo`).

Policy and reference both start from `policy_dir` (the pipeline passes `<run>/sft/model`); the
reference stays frozen, so its sequence log-probabilities are computed once before training. The
loss is `soft_bt_loss(dpo_margin(...), target)` with target `p_chosen` when `rl.dpo.soft_labels`
is on (an AI label of 0.7 pulls less hard than 1.0 and is satisfied by a finite margin) and 1
otherwise. Rows with split "train" are trained on; rows with split "eval" are scored at the end with
the implicit reward (accuracy, ECE, loss) for AI and human labels separately (`<run>/dpo/eval.json`).
With `rl.dpo.method: lora` only LoRA adapters on every linear layer are trained and the reference
is the same model with its adapters switched off, so one model's weights are held and only the
adapters have gradients and optimiser state (a 7B policy on one GPU); the adapters are merged into
the saved model. Checkpoints go to `<run>/dpo/checkpoints` (the adapters only, with LoRA); a stopped
run resumes with the same data order and RNG state. Per-step loss, margin, reward accuracy and chosen/rejected implicit rewards are logged to
`<run>/dpo/metrics.jsonl`; the model is saved as safetensors with its tokenizer in `<run>/dpo/model`.

A step's `batch_size * grad_accum` pairs are cut into micro-batches longest first
(`training.micro_batches`), so each pads to a similar length; `rl.dpo.micro_tokens` > 0 also caps
the token positions of one micro-batch. Each micro-batch's mean loss is weighted by its share of
the step's pairs, so the step's gradient is the per-pair mean whatever the cut.

Under `accelerate launch` (configs in `configs/accelerate/`) `rl.dpo.batch_size` stays the global
micro-batch: each process takes its share of it and of the reference pass, and the step matches a
single process's on the same rows. Only the main process writes.

    cai run configs/quickstart.yaml rl.method=dpo --from dpo
    accelerate launch --config_file configs/accelerate/ddp.yaml -m cai.cli run configs/quickstart.yaml rl.method=dpo --from dpo
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cai.batches import row_counts, split_rows
from cai.config import DPOConfig, PipelineConfig, fingerprint, plain
from cai.rundir import Stage
from cai.stages.trained import model_saved, run_training

NAME = "dpo"


def response_logps(model: Any, pairs: Sequence[dict[str, Any]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """Summed log-probabilities of the chosen and of the rejected responses of tokenised pairs
    (`batches.preference_pairs`), in one forward pass over both."""
    from cai.batches import pad_batch, sequence_logprob

    seqs = [p["chosen"][0] for p in pairs] + [p["rejected"][0] for p in pairs]
    starts = [p["chosen"][1] for p in pairs] + [p["rejected"][1] for p in pairs]
    batch = {k: v.to(device) for k, v in pad_batch(seqs, pad_id, starts).items()}
    lp = sequence_logprob(model, batch)
    return lp[: len(pairs)], lp[len(pairs):]


def dpo_loss(model: Any, pairs: Sequence[dict[str, Any]], ref_chosen: Any, ref_rejected: Any, beta: float,
             soft_labels: bool, pad_id: int, device: Any) -> tuple[Any, dict[str, Any]]:
    """The DPO loss of a batch of pairs against precomputed reference log-probabilities, and its
    per-pair margin and implicit rewards (beta times the policy-to-reference log-ratio)."""
    import torch

    from cai.losses import dpo_margin, soft_bt_loss

    pi_c, pi_r = response_logps(model, pairs, pad_id, device)
    ref_c, ref_r = ref_chosen.to(pi_c.device), ref_rejected.to(pi_c.device)
    margin = dpo_margin(pi_c, pi_r, ref_c, ref_r, beta)
    target = torch.tensor([p["p"] if soft_labels else 1.0 for p in pairs], device=margin.device)
    stats = {"margin": margin.detach(), "chosen_reward": beta * (pi_c - ref_c).detach(),
             "rejected_reward": beta * (pi_r - ref_r).detach(), "target": target}
    return soft_bt_loss(margin, target), stats


def reference_logps(model: Any, pairs: Sequence[dict[str, Any]], batch_size: int, pad_id: int, acc: Any
                    ) -> tuple[Any, Any]:
    """Log-probabilities of every pair's responses under `model` as it is now (no gradients), each
    process computing its share (`distributed.padded_share`); every process gets them all."""
    import torch

    from cai.distributed import gather_padded, padded_share

    share, real = padded_share(list(pairs), acc)
    chosen: list[float] = []
    rejected: list[float] = []
    with torch.no_grad():
        for k in range(0, len(share), batch_size):
            with acc.autocast():
                c, r = response_logps(model, share[k: k + batch_size], pad_id, acc.device)
            chosen += c.float().cpu().tolist()
            rejected += r.float().cpu().tolist()
    both = gather_padded(list(zip(chosen, rejected)), real, acc)
    if not both:
        return torch.zeros(0), torch.zeros(0)
    return torch.tensor([c for c, _ in both]), torch.tensor([r for _, r in both])


def train(rows: Sequence[dict[str, Any]], cfg: DPOConfig, policy_dir: str, out_dir: Path, seed: int = 0,
          device: str = "auto", on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train the model in `policy_dir` with DPO on the rows with split "train" (reference: the same
    model, frozen), evaluate the implicit reward on the rows with split "eval", save the model to
    `out_dir/model` and the evaluation to `out_dir/eval.json`. `on_step(step, metrics)` is called
    after each optimiser step (and its checkpoint). Returns steps, per-step log and evaluation.

    Under `accelerate launch` every process calls it: each takes its share of every micro-batch of
    `cfg.batch_size` pairs (the global micro-batch) and of the reference pass, gradients are
    averaged over the processes, and the logged figures are the whole step's; only the main
    process writes files."""
    import contextlib

    import torch
    from tqdm import tqdm

    from cai import training
    from cai.batches import preference_pairs
    from cai.checkpoints import MetricsLog, Progress
    from cai.distributed import (
        accelerator,
        check_grad_accum,
        full_state_dict,
        gather_padded,
        local_rows,
        padded_share,
        per_process,
        prepare,
        sharded,
    )
    from cai.losses import pairwise_accuracy, preference_report
    from cai.models import load_model
    from cai.training import optimizer_and_schedule, steps_for

    train_rows, eval_rows = split_rows(rows, NAME)
    torch.manual_seed(seed)
    acc = accelerator(cfg.bf16, device)
    micro_size = per_process(cfg.batch_size, acc, "rl.dpo.batch_size")
    check_grad_accum(acc, cfg.grad_accum, "rl.dpo.grad_accum")
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    # fp32 weights: bf16 comes from autocast, and tiny DPO updates would vanish in bf16 weights.
    if cfg.method == "lora" and sharded(acc):
        raise ValueError("rl.dpo.method=lora under FSDP/DeepSpeed is not supported (merging the adapters needs the "
                         "whole weights); use configs/accelerate/ddp.yaml or rl.dpo.method=full")
    model, tok = load_model(policy_dir, "float32", str(acc.device))
    if cfg.method == "lora":
        model = with_lora(model, cfg)
    # Dropout off (eval mode still gives gradients): the policy's log-probs must match the
    # reference's exactly at the start, or the margin starts from noise. LoRA's own dropout is
    # switched on for training passes only; the adapters start at zero, so the start is exact too.
    model.eval()
    pad_id = tok.pad_token_id
    pairs = preference_pairs(tok, train_rows, cfg.max_length)
    held_out = preference_pairs(tok, eval_rows, cfg.max_length)
    with model.disable_adapter() if cfg.method == "lora" else contextlib.nullcontext():
        ref_c, ref_r = reference_logps(model, pairs + held_out, cfg.batch_size, pad_id, acc)
    lora_dropout(model, True)

    step_size = cfg.batch_size * cfg.grad_accum
    steps = steps_for(len(pairs), step_size, cfg.epochs, cfg.max_steps, seed)
    widths = [max(len(m["chosen"][0]), len(m["rejected"][0])) for m in pairs]
    opt, sched = optimizer_and_schedule(model.parameters(), cfg.learning_rate, len(steps), cfg.warmup_ratio)
    model, opt = prepare(acc, micro_size, model, opt)
    modules = {"model": model, "optimizer": opt, "scheduler": sched}
    log = MetricsLog(out_dir / "metrics.jsonl", cfg.report_to, run_name=f"{out_dir.parent.name}-dpo",
                     config=plain(cfg), main=acc.is_main_process)
    plan = fingerprint(cfg, seed, policy_id(policy_dir), [r.get("record_id") for r in train_rows])
    progress = Progress(out_dir, modules, plan, log, cfg.save_steps, len(steps), acc, on_step)
    start = progress.resume()

    bar = tqdm(range(start, len(steps)), initial=start, total=len(steps), desc="dpo", leave=False,
               disable=not acc.is_main_process)
    for step in bar:
        idx = steps[step]
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=acc.device)
        parts = []
        # The step's pairs longest first, so each micro-batch pads to a similar length (looked up at
        # call time: tests compare it with other cuts). Every process cuts the same way.
        cuts = training.micro_batches(idx, widths, cfg.batch_size, acc.num_processes, cfg.micro_tokens)
        for c, cut in enumerate(cuts):
            micro = list(local_rows(cut, acc))
            last = c == len(cuts) - 1
            # Gradients are reduced once, on the step's last micro-batch.
            with contextlib.nullcontext() if last else acc.no_sync(model):
                with acc.autocast():
                    loss, stats = dpo_loss(model, [pairs[i] for i in micro], ref_c[micro], ref_r[micro], cfg.beta,
                                           cfg.soft_labels, pad_id, acc.device)
                # Each process's mean over its equal share, averaged over processes by the gradient
                # reduction, is the micro-batch's mean; weighted by the micro-batch's share of the
                # step, the sum over micro-batches is the per-pair mean over the whole step.
                loss = loss * (len(cut) / len(idx))
                acc.backward(loss)
            total += loss.detach()
            parts.append(stats)
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        cat = {k: acc.gather(torch.cat([s[k] for s in parts]).float()) for k in parts[0]}
        metrics = {"loss": float(acc.reduce(total, "mean")), "margin": float(cat["margin"].mean()),
                   "reward_accuracy": float(pairwise_accuracy(cat["margin"])),
                   "chosen_reward": float(cat["chosen_reward"].mean()),
                   "rejected_reward": float(cat["rejected_reward"].mean()),
                   "target": float(cat["target"].mean()), "lr": sched.get_last_lr()[0]}
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        progress.step_done(step + 1, metrics, grad_norm)  # log, checkpoint when due, on_step
    bar.close()
    log.close()

    lora_dropout(model, False)
    report: dict[str, Any] = {"overall": None, "ai": None, "human": None}
    if held_out:
        # Each process scores its share through the prepared model (collective under FSDP/ZeRO-3).
        n = len(pairs)
        share, real = padded_share(list(range(len(held_out))), acc)
        margins: list[float] = []
        with torch.no_grad():
            for k in range(0, len(share), cfg.batch_size):
                sel = share[k: k + cfg.batch_size]
                with acc.autocast():
                    _, stats = dpo_loss(model, [held_out[i] for i in sel], ref_c[[n + i for i in sel]],
                                        ref_r[[n + i for i in sel]], cfg.beta, cfg.soft_labels, pad_id, acc.device)
                margins += stats["margin"].double().cpu().tolist()
        report = preference_report(torch.tensor(gather_padded(margins, real, acc), dtype=torch.float64),
                                   torch.tensor([p["p"] for p in held_out]), [p["source"] for p in held_out])
    state_dict = full_state_dict(acc, model)
    if acc.is_main_process:
        final = acc.unwrap_model(model)
        if cfg.method == "lora":
            final = final.merge_and_unload()  # a plain model: what load_model, vLLM and `cai chat` read
        progress.save(final, tok, report, state_dict)  # eval.json, model/
    acc.wait_for_everyone()
    return progress.result(report, len(train_rows), len(eval_rows))


def with_lora(model: Any, cfg: DPOConfig) -> Any:
    """The model wrapped with fresh LoRA adapters on every linear layer (the only trainable weights);
    `disable_adapter()` on the result gives back the model as loaded, the DPO reference."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def lora_dropout(model: Any, on: bool) -> None:
    """Switch the LoRA adapters' dropout on (training passes) or off (scoring), leaving the rest of
    the model in eval mode; a model without adapters is left as it is."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and ".lora_dropout." in f".{name}.":
            module.train(on)


def policy_id(policy_dir: str) -> str:
    """A cheap identity of a model directory's weights (names, sizes and modification times), so a
    retrained SL-CAI model is noticed without hashing gigabytes."""
    from cai.models import resolve

    root = Path(resolve(policy_dir))
    h = hashlib.sha256()
    for f in sorted(root.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def run(cfg: PipelineConfig, inputs: list[dict[str, Any]], inputs_fp: str, policy_dir: str,
        allow_changed: bool = False) -> Stage:
    settings = plain({"dpo": cfg.rl.dpo, "seed": cfg.seed, "inputs": inputs_fp,
                      "policy": {"dir": str(policy_dir), "weights": policy_id(policy_dir)}})
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)
    if model_saved(stage):
        return stage
    counts = row_counts(inputs, *split_rows(inputs, NAME))

    from cai.checkpoints import finished

    def finish(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        done, extra = finished(result, counts, stage.dir / "model")
        return done, {**extra, "policy_dir": str(policy_dir)}

    return run_training(stage, cfg.model.device, counts, lambda: train(
        inputs, cfg.rl.dpo, policy_dir, stage.dir, seed=cfg.seed, device=cfg.model.device), finish,
        drop_checkpoints=True)
