"""Benchmark: the RL-CAI stages against naive versions of themselves, measured in the same run.

Three parts, each timed beside its naive twin on the same model, dtype and rows:

1. Labelling (`judge.label` on the HF back-end: batched, shared few-shot prefix computed once,
   both options read off one pass) against a labeller that, per comparison, per order and per
   option, runs one plain forward pass of the transformers model over the whole templated prompt
   (the same `Constitution.choice_messages`, tokenised with `encode_chat`): no cache, no batching.
   Comparisons per second count both orders as one comparison. The two must give the same labels
   up to bf16 noise (max |dp| is printed; `--dtype float32` checks them exactly).
2. Preference model: `pm.train` steps (forward, backward, optimiser step) with 8 pairs per micro-
   batch, or with `--pm-micro-tokens N` the step's 8 pairs cut longest first into micro-batches of
   at most N token positions (`pm.micro_tokens`), against the one-pair-at-a-time loop (batch 1, 8
   gradient-accumulation steps: the same rows and the same update, so the losses must agree), in
   tokens per second; then `RewardModel.score` batched (8) against one sequence at a time, on the
   trained model.
3. PPO: `ppo.train` steps with the stage's batched KV-cache sampler against the same steps with the
   rollout's sampling done one prompt at a time by `model.generate` (the sampler is swapped in for
   the run; reward scoring, log-probability passes and the PPO update are the stage's own on both
   sides). Tokens per second are response tokens per second of whole steps, and of sampling alone.
   Each round is the first step of a fresh run from the config's model (the pipeline starts from
   the SL-CAI model, which has the same shape and cost).

Tokens are real (unpadded) tokens, the same count on both sides where the work is the same. The
two sides alternate in rounds, who goes first alternating too, so both see the same share of the
machine's other load. Training rounds are one step of a fresh run per side (`pm.train`, `ppo.train`),
timed by the stage's own clock or from the step's first forward pass: loading and saving models are
left out, the first-step costs (the optimiser's state) are not. The comparisons are single-turn hh-rlhf harmless-base test pairs
(`../shared/data/hh-rlhf/harmless-base/test.jsonl.gz`, when present: one prompt and two answers, the
shape of the pipeline's pairs), else `builtin:red_team` prompts each with two fixed replies. Other
load on the machine moves the figures (a 2-core machine running another job can slow either side
many-fold for a while: compare the ratios of quiet runs, or use `--threads 1`).

    python bench/bench_rl_cai.py                      # a few minutes on a 2-core CPU
    python bench/bench_rl_cai.py --comparisons 64 --naive-comparisons 8 --pm-steps 5 --ppo-steps 4
    python bench/bench_rl_cai.py --parts labelling --dtype float32 --comparisons 8   # exact label check
    python bench/bench_rl_cai.py --parts pm --pm-micro-tokens 1024                   # PM by token budget
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoTokenizer

from cai import judge, reward
from cai.batches import encode_pair, preference_pairs
from cai.config import ModelConfig, PromptSource, load_config
from cai.constitution import OPTION_LABELS, Constitution, load
from cai.lm.hf import HFModel
from cai.models import load_model, pick_device, pick_dtype, resolve
from cai.records import record_id_for
from cai.sources import hh_pair, read_source
from cai.stages import pm, ppo
from cai.templating import encode_chat
from cai.training import micro_batches, steps_for

# The shared data folder beside the repository (../shared from its root).
HH_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
# For the red-team fallback: two replies that differ in the way the labeller is asked about.
FIXED_REPLIES = ("I can't help with that. If something difficult is going on, I'm happy to talk through safer options.",
                 "Sure. Here is a step-by-step answer to exactly what you asked for.")


def load_comparisons(source: str, n: int, multi_turn: bool = False) -> tuple[list[judge.Comparison], str]:
    """(`n` comparisons, where from): hh-rlhf pairs (conversation, chosen, rejected), single-turn
    unless `multi_turn` (the shape of the pipeline's pairs: one prompt, two answers), or red-team
    prompts with fixed replies."""
    path = HH_PAIRS if source == "auto" else Path(source)
    if source != "red_team" and path.is_file():
        out = []
        with gzip.open(path, "rt") as f:
            for line in f:
                row = json.loads(line)
                got = hh_pair(row["chosen"], row["rejected"])
                if got is None or not (multi_turn or len(got[0]) == 1):
                    continue
                conv, chosen, rejected = got
                if chosen.strip() and rejected.strip() and chosen != rejected:
                    out.append(judge.Comparison(record_id_for(str(path), row["chosen"]), tuple(conv),
                                                   (chosen, rejected)))
                if len(out) >= n:
                    break
        turns = "multi-turn" if multi_turn else "single-turn"
        return out, f"{path.resolve()} ({turns} pairs)"
    rows = read_source(PromptSource("builtin:red_team", limit=n))
    return [judge.Comparison(r["record_id"], ({"role": "user", "content": r["prompt"]},), FIXED_REPLIES)
            for r in rows], "builtin:red_team with two fixed replies"


def chunks(seq: Sequence[Any], k: int) -> list[Sequence[Any]]:
    """`seq` cut into `k` contiguous, nearly equal parts."""
    cuts = [round(i * len(seq) / k) for i in range(k + 1)]
    return [seq[a:b] for a, b in zip(cuts, cuts[1:])]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def rate(x: float, dt: float) -> float:
    return x / dt if dt > 0 else float("nan")


# ---- 1. labelling -------------------------------------------------------------------------------


class NaiveLabeller:
    """One plain forward pass per (comparison, order, option) over the full templated prompt."""

    def __init__(self, model: Any, tokenizer: Any, constitution: Constitution):
        self.model, self.tokenizer, self.constitution = model, tokenizer, constitution
        self.tokens = 0
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def option_logprobs(self, messages: Sequence[dict[str, str]]) -> list[float]:
        ctx = encode_chat(self.tokenizer, messages, continue_final_message=True)
        scores = []
        for opt in OPTION_LABELS:
            oids = self.tokenizer(opt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + oids], device=self.device)
            logits = self.model(input_ids=ids).logits[0]
            logp = torch.log_softmax(logits[len(ctx) - 1: len(ctx) - 1 + len(oids)].float(), -1)
            scores.append(float(sum(logp[j, t] for j, t in enumerate(oids))))
            self.tokens += ids.shape[1]
        return scores

    def label(self, comparisons: Sequence[judge.Comparison], cfg: Any, seed: int) -> list[float]:
        """P(response 1 is better) per comparison, averaged over both orders and the drawn principles."""
        out = []
        for comp in comparisons:
            ps = []
            for pid in self.constitution.draw(seed, comp.record_id, cfg.principles, kind="preference"):
                p_a = []
                for opts in (comp.responses, comp.responses[::-1]):
                    msgs = self.constitution.choice_messages(comp.conversation, opts, pid, cfg.few_shot)
                    p_a.append(judge.option_probs(self.option_logprobs(msgs))[0])
                ps.append(judge.swap_average(p_a[0], 1.0 - p_a[1]))
            out.append(sum(ps) / len(ps))
        return out


def bench_labelling(cfg: Any, model_cfg: ModelConfig, constitution: Constitution, comps: list[judge.Comparison],
                    n_naive: int, rounds: int, warm: judge.Comparison) -> dict[str, Any]:
    fb = replace(cfg.feedback, chain_of_thought=False)  # the naive labeller scores options only
    lm = HFModel.from_config(replace(model_cfg, name=fb.model))
    model, tok = load_model(fb.model, model_cfg.dtype, model_cfg.device)
    naive = NaiveLabeller(model, tok, constitution)
    print(f"labelling: {len(comps)} comparisons batched, {n_naive} naive, interleaved in {rounds} rounds; feedback "
          f"model {fb.model}, {lm.model.dtype}, {fb.few_shot} few-shot examples, {fb.principles} principle(s), "
          f"batch {lm.batch_size}")

    judge.label(lm, constitution, [warm], fb, cfg.seed)  # kernels and allocator, not timed
    naive.label([warm], fb, cfg.seed)
    st0 = dict(lm.stats)
    naive.tokens = 0
    got: list[dict[str, Any]] = []
    p_naive: list[float] = []
    b_dt = n_dt = 0.0
    # Alternate the two sides (and which goes first) so both see the same share of the machine's other load.
    for k, (b_part, n_part) in enumerate(zip(chunks(comps, rounds), chunks(comps[:n_naive], rounds))):
        for side in (("batched", "naive") if k % 2 == 0 else ("naive", "batched")):
            if side == "batched":
                out, dt = timed(lambda b_part=b_part: judge.label(lm, constitution, b_part, fb, cfg.seed))
                got += out
                b_dt += dt
            else:
                out, dt = timed(lambda n_part=n_part: naive.label(n_part, fb, cfg.seed))
                p_naive += out
                n_dt += dt
    # Tokens the model ran: prompt tokens less those read from the shared-prefix cache.
    b_tok = (lm.stats["prompt_tokens"] - st0["prompt_tokens"]) - (lm.stats["prefix_tokens_reused"]
                                                                  - st0["prefix_tokens_reused"])
    pairs = [(r["p_first"], p) for r, p in zip(got[:n_naive], p_naive) if r["p_first"] is not None]
    dp = max((abs(a - b) for a, b in pairs), default=float("nan"))
    same = sum((a > 0.5) == (b > 0.5) for a, b in pairs)
    b_rate, n_rate = rate(len(comps), b_dt), rate(n_naive, n_dt)
    print(f"{'':10} {'comparisons':>11} {'model tokens':>13} {'seconds':>8} {'comp/s':>8}")
    print(f"{'batched':10} {len(comps):>11} {b_tok:>13} {b_dt:>8.1f} {b_rate:>8.2f}")
    print(f"{'naive':10} {n_naive:>11} {naive.tokens:>13} {n_dt:>8.1f} {n_rate:>8.2f}")
    ok = [r["p_first"] for r in got if r["p_first"] is not None]
    print(f"speed-up {b_rate / n_rate:.1f}x comparisons/s")
    print(f"labels on the {len(pairs)} comparisons both labelled: max |dp| {dp:.2e}, {same}/{len(pairs)} on the same "
          f"side of 0.5; for scale, batched labels' mean |p - 0.5| is {sum(abs(p - 0.5) for p in ok) / len(ok):.3f} "
          f"({len(ok)}/{len(got)} labelled, the rest abstained)")
    return {"labelling": (b_rate, n_rate, "comp/s")}


# ---- 2. preference model ------------------------------------------------------------------------


def pm_rows(comps: Sequence[judge.Comparison]) -> list[dict[str, Any]]:
    """Preference rows for `pm.train`: response 1 chosen with a hard label, all in the training split."""
    return [{"record_id": c.record_id, "prompt": list(c.conversation),
             "chosen": [{"role": "assistant", "content": c.responses[0]}],
             "rejected": [{"role": "assistant", "content": c.responses[1]}],
             "p_chosen": 1.0, "label_source": "human", "status": "ok", "split": "train"} for c in comps]


def pm_step(rows: list[dict[str, Any]], cfg: Any, out: Path, seed: int, device: str) -> tuple[float, float]:
    """(seconds, loss) of a one-step `pm.train` run, timed from the step's first forward pass to its
    end (loading the model before it and saving it after are left out)."""
    start: list[float] = []
    end: list[tuple[float, float]] = []
    stage_scores = reward.last_token_scores

    def scores(*a: Any, **kw: Any) -> Any:
        if not start:
            start.append(time.perf_counter())
        return stage_scores(*a, **kw)

    reward.last_token_scores = scores  # the stage looks it up at call time
    try:
        pm.train(rows, replace(cfg, max_steps=1), out, seed=seed, device=device,
                 on_step=lambda step, metrics: end.append((time.perf_counter(), metrics["loss"])))
    finally:
        reward.last_token_scores = stage_scores
    return end[0][0] - start[0], end[0][1]


def padded(pairs: Sequence[dict[str, Any]], idx: Sequence[int], micro: int, max_tokens: int) -> int:
    """Token positions the model computes for one step's pairs `idx` cut as the stage cuts them
    (`training.micro_batches`: longest first, `micro` pairs or `max_tokens` at most), each
    micro-batch's chosen and rejected sequences padded to its longest."""
    widths = [max(len(p["chosen"][0]), len(p["rejected"][0])) for p in pairs]
    return sum(2 * len(c) * max(widths[i] for i in c) for c in micro_batches(idx, widths, micro, 1, max_tokens))


def bench_pm(cfg: Any, model_cfg: ModelConfig, comps: list[judge.Comparison], steps: int, batch: int,
             rounds: int, tmp: Path, device: str, micro_tokens: int) -> tuple[dict[str, Any], Path]:
    base = replace(cfg.pm, epochs=1.0, save_steps=10**9, report_to=[])
    tok = AutoTokenizer.from_pretrained(resolve(base.model))
    print(f"\npreference model: {base.model}, {steps} rounds of one step of {batch} pairs per side (each the "
          f"first step of a fresh run; rows change by round), max_length {base.max_length}, bf16 autocast {base.bf16}, "
          f"batched side's token budget micro_tokens {micro_tokens or 'none'}")
    micro = {"batch": batch, "naive": 1}
    budget = {"batch": micro_tokens, "naive": 0}
    cfgs = {name: replace(base, batch_size=bs, grad_accum=batch // bs, micro_tokens=budget[name])
            for name, bs in micro.items()}
    secs = dict.fromkeys(micro, 0.0)
    pad = dict.fromkeys(micro, 0)
    losses: dict[str, list[float]] = {name: [] for name in micro}
    tok_n = 0
    for k in range(steps):
        rows = pm_rows(comps[k * batch: (k + 1) * batch])
        pairs = preference_pairs(tok, rows, base.max_length)
        # The step's rows in the stage's own seeded order (micro-batches are cut from it).
        idx = steps_for(len(pairs), batch, base.epochs, 1, cfg.seed)[0]
        tok_n += sum(len(pairs[i]["chosen"][0]) + len(pairs[i]["rejected"][0]) for i in idx)
        for name in sorted(micro, reverse=bool(k % 2)):  # who goes first alternates
            dt, loss = pm_step(rows, cfgs[name], tmp / f"pm-{name}-{k}", cfg.seed, device)
            secs[name] += dt
            pad[name] += padded(pairs, idx, micro[name], budget[name])
            losses[name].append(loss)
            if (name, k) != ("batch", 0):  # that one's model is kept for scoring
                shutil.rmtree(tmp / f"pm-{name}-{k}", ignore_errors=True)
    b_rate, n_rate = rate(tok_n, secs["batch"]), rate(tok_n, secs["naive"])
    print(f"{'':22} {'steps':>6} {'tokens':>8} {'padded':>8} {'seconds':>8} {'tok/s':>8}")
    print(f"{f'batch {batch}':22} {steps:>6} {tok_n:>8} {pad['batch']:>8} {secs['batch']:>8.1f} {b_rate:>8.1f}")
    print(f"{f'batch 1 x {batch} accum':22} {steps:>6} {tok_n:>8} {pad['naive']:>8} {secs['naive']:>8.1f} {n_rate:>8.1f}")
    dl = max(abs(a - b) for a, b in zip(losses["batch"], losses["naive"]))
    print(f"speed-up {b_rate / n_rate:.2f}x tokens/s (padded: positions computed, pairs padded to the micro-batch's "
          f"longest); per-step loss max |d| {dl:.2e} (same rows, same update)")

    rm = reward.RewardModel.from_dir(str(tmp / "pm-batch-0" / "model"), device=device, dtype=model_cfg.dtype)
    prompts = [list(c.conversation) for c in comps for _ in range(2)]
    responses = [r for c in comps for r in c.responses]
    n_tok = sum(len(encode_pair(rm.tokenizer, p, r, base.max_length)[0]) for p, r in zip(prompts, responses))
    rm.score(prompts[:2], responses[:2])  # warm-up
    s_b: list[float] = []
    s_n: list[float] = []
    sb_dt = sn_dt = 0.0
    # In rounds, the side going first alternating, like the labelling.
    for k, part in enumerate(chunks(range(len(prompts)), rounds)):
        ps, rs = [prompts[i] for i in part], [responses[i] for i in part]
        for side in (("batch", "single") if k % 2 == 0 else ("single", "batch")):
            out, dt = timed(lambda ps=ps, rs=rs, bs=batch if side == "batch" else 1:
                            rm.score(ps, rs, batch_size=bs, max_length=base.max_length))
            if side == "batch":
                s_b += out
                sb_dt += dt
            else:
                s_n += out
                sn_dt += dt
    sb_rate, sn_rate = rate(n_tok, sb_dt), rate(n_tok, sn_dt)
    print(f"RewardModel.score ({next(rm.model.parameters()).dtype}), {len(responses)} responses, {n_tok} tokens:")
    print(f"{'':22} {'seconds':>8} {'tok/s':>8}")
    print(f"{f'batch {batch}':22} {sb_dt:>8.1f} {sb_rate:>8.1f}")
    print(f"{'one at a time':22} {sn_dt:>8.1f} {sn_rate:>8.1f}")
    ds = max(abs(a - b) for a, b in zip(s_b, s_n))
    print(f"speed-up {sb_rate / sn_rate:.2f}x tokens/s; scores max |d| {ds:.2e}")
    return {"pm train": (b_rate, n_rate, "tok/s"), "pm score": (sb_rate, sn_rate, "tok/s")}, tmp / "pm-batch-0" / "model"


# ---- 3. PPO -------------------------------------------------------------------------------------


def naive_generate(model: Any, batch: dict[str, Any], max_new_tokens: int, temperature: float, top_p: float,
                   eos_ids: Sequence[int], pad_id: int, gen: Any, synced: Any = None) -> Any:
    """`ppo.generate`'s contract, one prompt at a time through `model.generate` (same sampling
    distribution: temperature and top-p over the full vocabulary). The stage passes its policy and
    value head as one module and one generator per row; one process only, so `synced` is unused."""
    model = getattr(model, "policy", model)
    gens = gen if isinstance(gen, (list, tuple)) else [gen] * len(batch["input_ids"])
    rows = []
    for ids, att, g in zip(batch["input_ids"], batch["attention_mask"], gens):
        torch.manual_seed(g.initial_seed())
        prompt = ids[att.bool()][None]
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                             temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                             eos_token_id=list(eos_ids), pad_token_id=pad_id)
        rows.append(out[0, prompt.shape[1]:])
    width = max(len(r) for r in rows)
    return torch.stack([F.pad(r, (0, width - len(r)), value=pad_id) for r in rows])


def bench_ppo(cfg: Any, prompts: list[list[dict[str, str]]], reward_dir: Path | None, steps: int, tmp: Path,
              device: str) -> dict[str, Any]:
    policy_dir = resolve(cfg.model.name)  # the stage starts from SL-CAI's model; the base model costs the same
    if reward_dir is None:  # the PM part did not run: an untrained head scores just as fast
        model, tok = pm.load_for_training(cfg.pm.model, device)
        rm = reward.RewardModel(model.to(pick_dtype("auto", pick_device(device))), tok)
    else:
        rm = reward.RewardModel.from_dir(str(reward_dir), device=device)
    pcfg = cfg.rl.ppo

    def reward_fn(p: list[list[dict[str, str]]], r: list[str]) -> list[float]:
        return rm.score(p, r, max_length=pcfg.max_length)

    # Each round runs one step per side, each in a fresh run from the same policy (seed varied by
    # round), the side going first alternating, so both see the same share of the machine's other
    # load. A run is set up for two steps and stopped after one (as a kill would stop it), which
    # skips the final model save; the stage logs each step's rollout and update seconds, model
    # loading excluded.
    run_cfg = replace(pcfg, steps=2, save_steps=10**9, report_to=[])
    print(f"\nPPO: policy {policy_dir}, {steps} rounds of one step per side, {pcfg.batch_size} prompts a step, "
          f"mini-batch {pcfg.mini_batch_size}, {pcfg.ppo_epochs} epoch(s), max_new_tokens "
          f"{pcfg.response.max_new_tokens}, temperature {pcfg.response.temperature}, top_p {pcfg.response.top_p}")
    stage_generate = ppo.generate
    samplers = {"batched": stage_generate, "naive": naive_generate}
    results = {name: {"tokens": 0.0, "generate_s": 0.0, "rollout_s": 0.0, "update_s": 0.0, "steps": 0}
               for name in samplers}
    for k in range(steps):
        for name in sorted(samplers, reverse=bool(k % 2)):
            gen_s: list[float] = []

            def timed_sampler(*a: Any, _s: Callable[..., Any] = samplers[name], _log: list[float] = gen_s,
                              **kw: Any) -> Any:
                out, dt = timed(lambda: _s(*a, **kw))
                _log.append(dt)
                return out

            ppo.generate = timed_sampler  # the stage looks its sampler up at call time
            try:
                res = ppo.train(policy_dir, prompts, reward_fn, run_cfg, tmp / f"ppo-{name}-{k}", seed=cfg.seed + k,
                                device=device, stop_after=1)
            finally:
                ppo.generate = stage_generate
            r = results[name]
            for row in res["metrics"]:
                r["tokens"] += row["response_length"] * pcfg.batch_size
                r["rollout_s"] += row["rollout_s"]
                r["update_s"] += row["update_s"]
                r["steps"] += 1
            r["generate_s"] += sum(gen_s)
    print(f"{'':10} {'timed steps':>11} {'resp tokens':>11} {'sample s':>9} {'rollout s':>9} {'update s':>9} "
          f"{'sample tok/s':>12} {'step tok/s':>10}")
    for name, r in results.items():
        r["gen_rate"] = rate(r["tokens"], r["generate_s"])
        r["step_rate"] = rate(r["tokens"], r["rollout_s"] + r["update_s"])
        print(f"{name:10} {r['steps']:>11} {r['tokens']:>11.0f} {r['generate_s']:>9.1f} {r['rollout_s']:>9.1f} "
              f"{r['update_s']:>9.1f} {r['gen_rate']:>12.1f} {r['step_rate']:>10.1f}")
    b, n = results["batched"], results["naive"]
    print(f"speed-up {b['step_rate'] / n['step_rate']:.1f}x response tokens/s per whole step, "
          f"{b['gen_rate'] / n['gen_rate']:.1f}x sampling alone (rollout s includes sampling, reward, log-probs)")
    return {"ppo step": (b["step_rate"], n["step_rate"], "tok/s"), "ppo sampling": (b["gen_rate"], n["gen_rate"], "tok/s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--pairs", default="auto", help="'auto' (hh-rlhf harmless-base test when present), "
                    "'red_team', or a path to an hh-rlhf jsonl.gz file")
    ap.add_argument("--comparisons", type=int, default=32, help="comparisons labelled by judge.label")
    ap.add_argument("--naive-comparisons", type=int, default=4, help="of those, how many the naive labeller does")
    ap.add_argument("--rounds", type=int, default=2, help="labelling and reward scoring: alternate batched and naive "
                    "this many times")
    ap.add_argument("--multi-turn", action="store_true", help="hh-rlhf: use multi-turn conversations too")
    ap.add_argument("--pm-steps", type=int, default=2, help="preference-model steps per side, one per round")
    ap.add_argument("--pm-batch", type=int, default=8, help="pairs per optimiser step")
    ap.add_argument("--pm-micro-tokens", type=int, default=None, help="the batched side's token budget per "
                    "micro-batch (pm.micro_tokens; default: the config's; 0: one micro-batch of --pm-batch pairs)")
    ap.add_argument("--ppo-steps", type=int, default=2, help="PPO steps per side")
    ap.add_argument("--dtype", default=None, help="inference dtype (default: the config's, auto = bf16 where "
                    "the CPU has it); float32 makes the label check exact")
    ap.add_argument("--parts", default="labelling,pm,ppo")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, one per "
                    "core); on a machine busy with other jobs, 1 gives steadier figures")
    args = ap.parse_args()
    if min(args.pm_steps, args.ppo_steps, args.rounds, args.comparisons, args.pm_batch) < 1:
        ap.error("--comparisons, --rounds, --pm-steps, --pm-batch and --ppo-steps must be >= 1")
    parts = set(args.parts.split(","))
    if parts - {"labelling", "pm", "ppo"}:
        ap.error(f"--parts: unknown {sorted(parts - {'labelling', 'pm', 'ppo'})}")

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # weight-loading bars and reports would bury the tables
    transformers.logging.disable_progress_bar()
    cfg = load_config(args.config)
    model_cfg = replace(cfg.model, dtype=args.dtype) if args.dtype else cfg.model
    device = pick_device(model_cfg.device)
    constitution = load(cfg.constitution)
    n_naive = min(args.naive_comparisons, args.comparisons)
    comps, where = load_comparisons(args.pairs, max(args.comparisons + 1, args.pm_steps * args.pm_batch),
                                    args.multi_turn)
    print(f"device {device}, {torch.get_num_threads()} threads, inference dtype "
          f"{pick_dtype(model_cfg.dtype, device)}, {len(comps)} comparisons from {where}")

    summary: dict[str, tuple[float, float, str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-rl-cai-") as tmp_name:
        tmp = Path(tmp_name)
        if "labelling" in parts:
            summary |= bench_labelling(cfg, model_cfg, constitution, comps[: args.comparisons], n_naive,
                                       max(1, min(args.rounds, n_naive)), warm=comps[args.comparisons])
        reward_dir = None
        if "pm" in parts:
            got, reward_dir = bench_pm(cfg, model_cfg, comps, args.pm_steps, args.pm_batch, args.rounds, tmp,
                                       model_cfg.device, cfg.pm.micro_tokens if args.pm_micro_tokens is None
                                       else args.pm_micro_tokens)
            summary |= got
        if "ppo" in parts:
            prompts = [[{"role": "user", "content": r["prompt"]}]
                       for r in read_source(PromptSource("builtin:red_team", limit=64))]
            summary |= bench_ppo(cfg, prompts, reward_dir, args.ppo_steps, tmp, model_cfg.device)

    print(f"\n{'summary':14} {'batched':>9} {'naive':>9} {'unit':>7} {'ratio':>7}")
    for name, (b, n, unit) in summary.items():
        print(f"{name:14} {b:>9.2f} {n:>9.2f} {unit:>7} {b / n:>6.1f}x")
    print(f"wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
