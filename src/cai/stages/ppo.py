"""Stage `ppo`: RL-CAI policy optimisation with PPO against the preference model.

The policy and a frozen reference both start as the SL-CAI model (`<run>/sft/model`). Each step:

1. Rollout: a batch of prompts (a seeded order, `training.batch_order`) is templated with the
   chat template, left-padded, and answered by the current policy (`generate` below: a KV-cache
   loop over the sampler that generation shares, `cai.lm.sampling`, with temperature / top-p from
   `rl.ppo.response`). Each response has its own generator seeded by (seed, step, position), so
   step k draws the same responses however often the run was stopped and resumed.
2. Reward: the preference model scores each (prompt, response); the score is clipped to
   +-`reward_clip` and, for a response cut off at `max_new_tokens` (no end-of-turn token), lowered
   by `missing_eos_penalty` (0 by default: truncated answers are kept as they are). Each response
   token t gets `-kl_coef * (log pi(t) - log pi_ref(t))`, and the last one also gets the score.
   `kl_coef` is fixed, or adaptive toward `kl_target` (Ziegler et al. 2019; `losses.AdaptiveKL`,
   fed the mean per-response KL in nats, summed over tokens, with `batch_size` samples per step).
3. Advantages by GAE over the response tokens (whitened over the batch), then `ppo_epochs` passes
   over shuffled mini-batches with the clipped policy loss plus `vf_coef` times the clipped value
   loss (`losses.ppo_policy_loss`, `losses.ppo_value_loss`).

The value function is a linear head (`Linear(hidden, 1)`, zero-initialised) on the policy's last
hidden states, sharing its trunk: one forward pass gives both log-probabilities and values, which
is what keeps a step affordable on a CPU. The value loss therefore also trains the trunk (weighted
by `vf_coef`); a separate value model would avoid that at twice the compute. The model runs in
eval mode throughout (no dropout), so the log-probabilities of the rollout and of the first PPO
pass agree. Sampling is our own short loop over the KV cache (inverse-CDF draws from a seeded
generator: `torch.multinomial` over a 49k vocabulary costs more than the small model's step on a
CPU); with `top_p` < 1 the loss still uses the untruncated log-probabilities, as is usual. bf16
runs as autocast over fp32 weights.

Under `accelerate launch` (configs in `configs/accelerate/`) each process samples, scores and runs
the no-gradient passes for its contiguous share of the step's prompts; each response has its own
seeded generator (seed, step, position in the batch), so the rollouts do not depend on the number
of processes. The rollout is then shared with every process, so advantages are whitened over the
whole batch and the PPO mini-batches are the single-process ones, each process taking its share
of every mini-batch, with the token-mean losses normalised by the whole mini-batch's token count.
Policy and value head are one module (`distributed.Joint`) for `accelerate.prepare`; the frozen
reference and the preference model are full copies in every process. Only the main process writes.

Every `save_steps` a checkpoint (policy and value head as safetensors, optimiser, schedule, KL
coefficient, RNG state, step) goes to `<run>/ppo/checkpoints`; a stopped run resumes from it and
repeats the uninterrupted run's later steps (exactly, in fp32). Per-step metrics go to
`<run>/ppo/metrics.jsonl` (and TensorBoard / W&B / trackio when `report_to` names them):

    reward            mean preference-model score (before clipping and penalty)
    kl                mean per-response KL to the reference, nats summed over response tokens
    non_score_reward  mean per-response sum of the KL penalty (-kl_coef * kl)
    kl_coef           the coefficient used this step
    entropy           mean per-token entropy of the policy on its responses (nats)
    response_length   mean response tokens; truncated: the share that hit max_new_tokens
    policy_loss, value_loss, clipfrac, approx_kl (0.5 E[(log ratio)^2]), value, return, lr
    rollout_s, update_s  seconds spent sampling and scoring, and in the PPO epochs

The final policy is saved to `<run>/ppo/model` (safetensors, tokenizer, chat template), its value
head to `<run>/ppo/value_head.safetensors`.

    cai run configs/quickstart.yaml --from ppo
    accelerate launch --config_file configs/accelerate/ddp.yaml -m cai.cli run configs/quickstart.yaml --from ppo
    cai chat runs/quickstart/ppo/model -p "How do I pick a lock?"
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai.config import PipelineConfig, PPOConfig, fingerprint, plain
from cai.lm.base import Message
from cai.records import stable_seed
from cai.reward import RewardFn, load_reward
from cai.rundir import Stage, StageError
from cai.stages.trained import model_saved, run_training

NAME = "ppo"


def _forward(model: Any, batch: dict[str, Any], n_resp: int, temperature: float,
             values: bool = False) -> tuple[Any, Any]:
    """Logits at the sampling temperature predicting each of the last `n_resp` tokens (B, R, V),
    and (with `values`, for a `_policy_value` module) the value (B, R) of the state each is
    predicted from. Position ids follow the attention mask, as in `generate`, so left padding does
    not shift positions."""
    att = batch["attention_mask"]
    kw = {"input_ids": batch["input_ids"], "attention_mask": att,
          "position_ids": (att.cumsum(-1) - 1).clamp(min=0), "logits_to_keep": n_resp + 1}
    if not values:
        return model(**kw).logits[:, :-1].float() / temperature, None
    out, value = model(value_tokens=n_resp, **kw)
    return out.logits[:, :-1].float() / temperature, value


def _policy_value(m: Any, value_tokens: int = 0, **kwargs: Any) -> Any:
    """Forward of the policy with its value head (a `distributed.Joint` of `policy` and `value_head`):
    the policy's output, and with `value_tokens` also the values of the states before each of the
    last `value_tokens` positions. One forward, so DDP reduces both parts' gradients."""
    if not value_tokens:
        return m.policy(**kwargs)
    out = m.policy(**kwargs, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -value_tokens - 1: -1]
    return out, m.value_head(hidden.to(m.value_head.weight.dtype)).squeeze(-1).float()


def _response_mask(resp: Any, eos_ids: Sequence[int]) -> tuple[Any, Any]:
    """(mask, finished): 1 on each response's tokens up to and including its first end-of-turn
    token (generate pads after it); finished is False for a response cut off at the token limit."""
    import torch

    is_eos = torch.isin(resp, torch.tensor(list(eos_ids), device=resp.device))
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~seen_before).long(), is_eos.any(-1)


def generate(model: Any, batch: dict[str, Any], max_new_tokens: int, temperature: float, top_p: float,
             eos_ids: Sequence[int], pad_id: int, gen: Any, synced: Any = None) -> Any:
    """Sample responses to left-padded prompts with a KV cache: (B, R) token ids, `pad_id` after a
    row's first end-of-turn token, R <= max_new_tokens (the loop ends when every row has ended).
    `gen` is one torch.Generator for the batch or one per row; with one per row, a row's tokens do
    not depend on which other rows share its batch. With `synced` (an accelerator) the loop goes on
    until every process's rows have ended, as a collective forward pass (FSDP, ZeRO-3) needs."""
    import torch

    from cai.lm.sampling import sample_next

    att = batch["attention_mask"]
    ids = batch["input_ids"]
    pos = att.sum(-1, keepdim=True)
    eos = torch.tensor(list(eos_ids), device=ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    out = model(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    tokens = []
    for _ in range(max_new_tokens):
        tok = sample_next(out.logits[:, -1], temperature, top_p, gen)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done |= torch.isin(tok, eos)
        ended = bool(done.all())
        if synced is not None:
            ended = float(synced.reduce(torch.tensor(float(not ended), device=ids.device), "sum")) == 0.0
        if ended or len(tokens) == max_new_tokens:
            break
        att = torch.cat([att, torch.ones_like(att[:, :1])], 1)
        out = model(input_ids=tok[:, None], attention_mask=att, position_ids=pos, cache=out.cache,
                    use_cache=True)
        pos = pos + 1
    return torch.stack(tokens, 1)


def _seed(seed: int, what: str, step: int) -> int:
    return stable_seed(seed, "ppo", what, step) % (2**63)


def train(policy_dir: str, prompts: list[list[Message]], reward_fn: RewardFn, cfg: PPOConfig, out_dir: Path,
          seed: int = 0, device: str = "auto", stop_after: int | None = None) -> dict[str, Any]:
    """Run PPO for `cfg.steps` steps from the model in `policy_dir`, resuming from the newest
    checkpoint in `out_dir/checkpoints`. `reward_fn(prompts, responses)` gives one score per
    response. `stop_after` ends the run after that step (as a kill would, without the final save).

    Returns {"metrics": per-step rows, "steps": steps done, "resumed_from": checkpoint or None,
    "stopped": bool, "model_dir": the saved model or None, "kl_coef": the final coefficient}."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from cai import distributed, losses
    from cai.batches import pad_batch
    from cai.checkpoints import MetricsLog, resume, save_checkpoint, save_model
    from cai.models import eos_token_ids, load_model
    from cai.templating import encode_prompt
    from cai.training import batch_order, optimizer_and_schedule

    if not prompts:
        raise StageError("ppo: no prompts to train on")
    out_dir = Path(out_dir)
    acc = distributed.accelerator(cfg.bf16, device)
    local_b = distributed.per_process(cfg.batch_size, acc, "rl.ppo.batch_size")
    local_mb = distributed.per_process(cfg.mini_batch_size, acc, "rl.ppo.mini_batch_size")
    main = acc.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    policy, tok = load_model(policy_dir, "float32", str(acc.device), model_class=AutoModelForCausalLM)
    ref, _ = load_model(policy_dir, "float32", str(acc.device), model_class=AutoModelForCausalLM)
    ref.requires_grad_(False)
    head = torch.nn.Linear(policy.config.get_text_config().hidden_size, 1).to(acc.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)

    n_mb = cfg.batch_size // cfg.mini_batch_size
    if n_mb < 1 or cfg.batch_size % cfg.mini_batch_size:
        raise ValueError("rl.ppo.batch_size must be a positive multiple of rl.ppo.mini_batch_size")
    joint = distributed.Joint(_policy_value, policy=policy, value_head=head)
    opt, sched = optimizer_and_schedule(joint.parameters(), cfg.learning_rate, cfg.steps * cfg.ppo_epochs * n_mb,
                                        warmup_ratio=0.0)
    model, opt = distributed.prepare(acc, local_mb, joint, opt)
    # No-gradient passes and sampling go through the module itself, not DDP's wrapper (whose
    # forward syncs buffers, a collective); under FSDP/ZeRO-3 they are collective anyway, so the
    # sampling loop is kept in step across processes.
    inner = acc.unwrap_model(model)
    synced = acc if distributed.sharded(acc) else None
    kl_ctl = losses.AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    prompt_budget = cfg.max_length - cfg.response.max_new_tokens
    if prompt_budget < 1:
        raise ValueError(f"rl.ppo.max_length ({cfg.max_length}) must exceed rl.ppo.response.max_new_tokens "
                         f"({cfg.response.max_new_tokens})")
    # The prompt's start is dropped when it is too long: its end holds the generation prompt.
    encoded = [encode_prompt(tok, p)[-prompt_budget:] for p in prompts]
    order = batch_order(len(prompts), cfg.batch_size, cfg.steps * cfg.batch_size / len(prompts), seed)
    order = order[: cfg.steps]

    eos_ids = sorted(eos_token_ids(tok, policy.generation_config.eos_token_id))
    # The policy being optimised is the model sampled at this temperature: log-probabilities, the KL
    # and the entropy are all taken from logits divided by it (greedy rollouts would not explore).
    temperature = float(cfg.response.at_round(0).temperature)
    if temperature <= 0:
        raise ValueError("rl.ppo.response.temperature must be > 0 for PPO rollouts")

    ckpt_dir = out_dir / "checkpoints"
    modules = {"policy": inner.policy, "value_head": inner.value_head, "optimizer": opt, "scheduler": sched}
    log = MetricsLog(out_dir / "metrics.jsonl", cfg.report_to, run_name="ppo", config=plain(cfg), main=main)
    # A checkpoint of another plan (config, seed, prompts, starting model) is discarded, not resumed.
    plan = fingerprint(dataclasses.replace(cfg, save_steps=1, report_to=[]), seed, str(policy_dir), prompts)
    start, ckpt = resume(ckpt_dir, modules, plan, acc)
    resumed_from = str(ckpt) if ckpt is not None else None
    if ckpt is not None:
        kl_ctl.coef = json.loads((ckpt / "state.json").read_text())["kl_coef"]
    log.truncate_after(start)

    bar = tqdm(total=cfg.steps, initial=start, desc="ppo", unit="step", dynamic_ncols=True, disable=not main)
    stopped, done = False, start
    rank = acc.process_index
    mine = range(rank * local_b, (rank + 1) * local_b)  # this process's rows of every step's batch
    model.eval()  # no dropout: the rollout's log-probabilities must match the first PPO pass
    for step in range(start, cfg.steps):
        idx = order[step]
        B = len(idx)

        # ---- rollout: this process's share ---------------------------------------------------
        t0 = time.perf_counter()
        prompt_batch = {k: v.to(acc.device) for k, v in
                        pad_batch([encoded[idx[j]] for j in mine], tok.pad_token_id, left=True).items()}
        gens = [torch.Generator().manual_seed(stable_seed(seed, "ppo", "rollout", step, j) % (2**63)) for j in mine]
        with torch.no_grad(), acc.autocast():
            resp = generate(inner, prompt_batch, cfg.response.max_new_tokens, temperature, cfg.response.top_p,
                            eos_ids, tok.pad_token_id, gens, synced)
        resp_mask, finished = _response_mask(resp, eos_ids)
        answers = [resp[i][resp_mask[i].bool()].tolist() for i in range(len(mine))]
        texts = [tok.decode(a, skip_special_tokens=True) for a in answers]
        raw = [float(s) for s in reward_fn([prompts[idx[j]] for j in mine], texts)]
        if len(raw) != len(mine) or not all(math.isfinite(s) for s in raw):
            raise ValueError(f"ppo: the reward function must return {len(mine)} finite scores, got {raw!r}")

        # ---- the whole batch, on every process --------------------------------------------------
        rollout = distributed.gather_list(list(zip(answers, finished.tolist(), raw)), acc)
        answers = [a for a, _, _ in rollout]
        finished = torch.tensor([f for _, f, _ in rollout], device=acc.device)
        raw = [s for _, _, s in rollout]
        R = max(len(a) for a in answers)
        resp = torch.full((B, R), tok.pad_token_id, dtype=torch.long)
        resp_mask = torch.zeros((B, R), dtype=torch.long)
        for i, a in enumerate(answers):
            resp[i, : len(a)] = torch.tensor(a, dtype=torch.long)
            resp_mask[i, : len(a)] = 1
        resp, resp_mask = resp.to(acc.device), resp_mask.to(acc.device)
        prompt_batch = {k: v.to(acc.device) for k, v in
                        pad_batch([encoded[i] for i in idx], tok.pad_token_id, left=True).items()}
        full = {"input_ids": torch.cat([prompt_batch["input_ids"], resp], 1),
                "attention_mask": torch.cat([prompt_batch["attention_mask"], resp_mask], 1)}
        score = torch.tensor(raw, device=acc.device).clamp(-cfg.reward_clip, cfg.reward_clip)
        score = score - cfg.missing_eos_penalty * (~finished).float()

        with torch.no_grad(), acc.autocast():
            old_logp, old_values, ref_logp, entropy = [], [], [], []
            for sl in torch.tensor(list(mine)).split(local_mb):
                mb = {k: v[sl] for k, v in full.items()}
                logits, values = _forward(inner, mb, R, temperature, values=True)
                old_logp.append(losses.token_logprobs(logits, resp[sl]))
                entropy.append(losses.entropy_from_logits(logits))
                old_values.append(values)
                ref_logits, _ = _forward(ref, mb, R, temperature)
                ref_logp.append(losses.token_logprobs(ref_logits, resp[sl]))
            old_logp, old_values = acc.gather(torch.cat(old_logp)), acc.gather(torch.cat(old_values))
            ref_logp, entropy = acc.gather(torch.cat(ref_logp)), acc.gather(torch.cat(entropy))
        mask = resp_mask.float()
        old_values = old_values * mask

        # ---- rewards and advantages ---------------------------------------------------------
        kl_tok = (old_logp - ref_logp) * mask
        coef = kl_ctl.coef
        rewards = -coef * kl_tok
        last = resp_mask.sum(-1) - 1
        rewards[torch.arange(B, device=acc.device), last] += score
        adv, returns = losses.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        adv = losses.masked_whiten(adv, mask)

        # ---- PPO updates: each process takes its share of every mini-batch --------------------
        t1 = time.perf_counter()
        gen = torch.Generator().manual_seed(_seed(seed, "minibatch", step))
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": []}
        for _ in range(cfg.ppo_epochs):
            for sl in torch.randperm(B, generator=gen).split(cfg.mini_batch_size):
                part = sl[rank * local_mb: (rank + 1) * local_mb].to(acc.device)
                sl = sl.to(acc.device)
                with acc.autocast():
                    logits, values = _forward(model, {k: v[part] for k, v in full.items()}, R, temperature,
                                              values=True)
                logp = losses.token_logprobs(logits, resp[part])
                pg_loss, clipfrac = losses.ppo_policy_loss(logp, old_logp[part], adv[part], mask[part], cfg.cliprange)
                vf_loss = losses.ppo_value_loss(values, old_values[part], returns[part], mask[part],
                                                cfg.cliprange_value)
                # The losses are token means over this process's tokens; weighted by its share of
                # the mini-batch's tokens (and by the process count, which the gradient average
                # divides out) they sum to the token mean over the whole mini-batch, exactly.
                share = mask[part].sum() / mask[sl].sum().clamp(min=1)
                acc.backward((pg_loss + cfg.vf_coef * vf_loss) * (share * acc.num_processes))
                if cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    approx_kl = 0.5 * losses.masked_mean((logp - old_logp[part]) ** 2, mask[part])
                    whole = acc.reduce(torch.stack([pg_loss, vf_loss, clipfrac, approx_kl]).detach() * share, "sum")
                for k, v in zip(("policy_loss", "value_loss", "clipfrac", "approx_kl"), whole.tolist()):
                    stats[k].append(float(v))

        t2 = time.perf_counter()
        kl_seq = kl_tok.sum(-1)
        metrics = {
            "reward": sum(raw) / B,
            "kl": float(kl_seq.mean()),
            "non_score_reward": float((-coef * kl_seq).mean()),
            "kl_coef": coef,
            "entropy": float(losses.masked_mean(entropy, mask)),
            "response_length": float(mask.sum(-1).mean()),
            "truncated": float((~finished).float().mean()),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            "value": float(losses.masked_mean(old_values, mask)),
            "return": float(losses.masked_mean(returns, mask)),
            "lr": sched.get_last_lr()[0],
            "rollout_s": t1 - t0,
            "update_s": t2 - t1,
        }
        kl_ctl.update(metrics["kl"], B)
        log.log(step + 1, metrics)
        done = step + 1
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}")
        if done % cfg.save_steps == 0:
            save_checkpoint(ckpt_dir, done, modules, {"kl_coef": kl_ctl.coef, "plan": plan}, acc)
        if stop_after is not None and stop_after <= done < cfg.steps:
            stopped = True
            break
    bar.close()
    log.close()

    model_dir = None
    if not stopped:
        state_dict = distributed.full_state_dict(acc, model)
        if main:
            parts = {p: None if state_dict is None else {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}
                     for p in ("policy.", "value_head.")}
            save_model(inner.policy, tok, out_dir / "model", parts["policy."])
            head_sd = parts["value_head."] or inner.value_head.state_dict()
            save_file({k: v.detach().cpu().contiguous() for k, v in head_sd.items()},
                      str(out_dir / "value_head.safetensors"))
        model_dir = str(out_dir / "model")
    acc.wait_for_everyone()
    return {"metrics": log.rows(), "steps": done, "resumed_from": resumed_from, "stopped": stopped,
            "model_dir": model_dir, "kl_coef": kl_ctl.coef}


def run(cfg: PipelineConfig, prompt_rows: list[dict[str, Any]], inputs_fp: str, policy_dir: str, reward_dir: str,
        allow_changed: bool = False) -> Stage:
    """Train the RL-CAI policy on the `prompts` stage's rows against the preference model in
    `reward_dir`, starting from the SL-CAI model in `policy_dir`."""
    settings = plain({"ppo": cfg.rl.ppo, "seed": cfg.seed, "inputs": inputs_fp, "policy": str(policy_dir),
                      "reward": str(reward_dir)})
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)
    if model_saved(stage):
        return stage
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in prompt_rows]
    if not prompts:
        raise StageError("ppo: the prompts stage has no rows to train on")

    def train_here() -> dict[str, Any]:
        from cai.distributed import process_device

        # Every process scores its own rollouts, with its own copy of the preference model.
        reward_fn = load_reward(reward_dir, process_device(cfg.model.device), cfg.rl.ppo.max_length)
        return train(policy_dir, prompts, reward_fn, cfg.rl.ppo, stage.dir, seed=cfg.seed, device=cfg.model.device)

    def finish(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        rows = result["metrics"]
        return {"prompts": len(prompts), "steps": result["steps"],
                "first_reward": rows[0]["reward"] if rows else None,
                "last_reward": rows[-1]["reward"] if rows else None, "last_kl": rows[-1]["kl"] if rows else None}, {
            "model_dir": result["model_dir"], "resumed_from": result["resumed_from"], "kl_coef": result["kl_coef"]}

    # Once the final model is saved, the checkpoint (policy plus optimiser state) is no longer needed.
    return run_training(stage, cfg.model.device, {"prompts": len(prompts)}, train_here, finish, drop_checkpoints=True)
