"""Benchmark: the SL-CAI critique-revision stage, batched with prefix reuse, against a naive loop.

Both run in the same process on the same model weights and dtype. The naive baseline sends one
conversation at a time through `model.generate` (no batching, no shared-prefix cache), the way a
first script would. Prints generated tokens per second for both, their ratio, and seconds per
finished revision.

    python bench/bench_sl_cai.py                       # 32 prompts batched, 4 naive
    python bench/bench_sl_cai.py --prompts 64 --naive-prompts 8 --rounds 2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from cai.config import PromptSource, Sampling, load_config
from cai.constitution import load
from cai.lm.base import Completion
from cai.lm.hf import HFModel
from cai.models import _bf16_speed_ratio as bf16_speed
from cai.models import cpu_description, load_model
from cai.sources import read_source
from cai.stages.sl_generate import process_chunk


class NaiveLM:
    """One conversation at a time through `model.generate`; no batching, no prefix reuse."""

    name = "naive"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.generated = 0

    def generate(self, conversations, sampling: Sampling, n=1, seeds=None):
        out = []
        for i, conv in enumerate(conversations):
            ids = self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
            torch.manual_seed(seeds[i] if seeds else i)
            t = float(sampling.temperature)
            kw = {"do_sample": True, "temperature": t, "top_p": sampling.top_p} if t > 0 else {"do_sample": False}
            gen = self.model.generate(**ids, max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **kw)
            new = gen[0, ids["input_ids"].shape[1]:]
            ended = bool(len(new)) and int(new[-1]) in (self.tokenizer.eos_token_id,)
            toks = new[:-1] if ended else new
            self.generated += len(toks)
            out.append([Completion(self.tokenizer.decode(toks, skip_special_tokens=True).strip(),
                                   "stop" if ended or len(new) < sampling.max_new_tokens else "length", len(toks))])
        return out

    def score_options(self, contexts, options):  # not used by this stage
        raise NotImplementedError


def run_stage(lm, rows, constitution, sl, counter) -> tuple[float, int, int]:
    start_tokens = counter()
    t = time.perf_counter()
    out = process_chunk(rows, lm, constitution, sl, seed=0)
    dt = time.perf_counter() - t
    revisions = sum(1 for r in out for rd in r["rounds"])
    return dt, counter() - start_tokens, revisions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--naive-prompts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default=None, help="model dtype (default: the config's; auto = bf16 where the CPU "
                    "has it natively, else float32); float32 on a bf16 CPU stands in for one without")
    args = ap.parse_args()

    cfg = load_config(args.config)
    if args.dtype:
        cfg = replace(cfg, model=replace(cfg.model, dtype=args.dtype))
    sl = replace(cfg.sl, rounds=args.rounds)
    constitution = load(cfg.constitution)
    rows = [{**r, "kind": "red_team"} for r in read_source(PromptSource("builtin:red_team", limit=args.prompts))]
    torch.set_num_threads(torch.get_num_threads())

    lm = HFModel.from_config(replace(cfg.model, batch_size=args.batch_size))
    naive_model, naive_tok = load_model(cfg.model.name, cfg.model.dtype)
    naive = NaiveLM(naive_model, naive_tok)
    print(f"{cpu_description()}; bf16 matrix products {bf16_speed():.2f}x fp32's speed")
    print(f"model {cfg.model.name}, dtype {lm.model.dtype}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, {sl.few_shot} few-shot examples")

    # warm-up (kernels, allocator) on one prompt each, not timed
    process_chunk(rows[:1], lm, constitution, replace(sl, rounds=1), seed=1)
    naive.generate([[{"role": "user", "content": "hi"}]], Sampling(temperature=0, max_new_tokens=4))

    b_dt, b_tok, b_rev = run_stage(lm, rows, constitution, sl, lambda: lm.stats["generated_tokens"])
    n_dt, n_tok, n_rev = run_stage(naive, rows[: args.naive_prompts], constitution, sl, lambda: naive.generated)

    b_rate, n_rate = b_tok / b_dt, n_tok / n_dt
    print(f"{'':10} {'prompts':>8} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'s/revision':>11}")
    print(f"{'batched':10} {len(rows):>8} {b_tok:>8} {b_dt:>8.1f} {b_rate:>8.1f} {b_dt / b_rev:>11.2f}")
    print(f"{'naive':10} {args.naive_prompts:>8} {n_tok:>8} {n_dt:>8.1f} {n_rate:>8.1f} {n_dt / n_rev:>11.2f}")
    print(f"speed-up: {b_rate / n_rate:.1f}x tokens/s, {(n_dt / n_rev) / (b_dt / b_rev):.1f}x per revision")
    st = lm.stats
    print(f"prefix tokens reused: {st['prefix_tokens_reused']} of {st['prompt_tokens']} prompt tokens; "
          f"prefill {st['prefill_s']:.1f}s, decode {st['decode_s']:.1f}s over {st['decode_steps']} steps")
    roofline(lm.model, st)


def roofline(model, st) -> None:
    """What a decode step costs against what this machine can do: the weights read once per step at
    the measured memory bandwidth, and the step's matrix work at the measured matrix-product speed."""
    dtype = next(model.parameters()).dtype
    big = torch.ones(64 << 20)  # 256 MB of fp32
    big.sum()
    t = time.perf_counter()
    for _ in range(5):
        big.sum()
    bandwidth = 5 * big.numel() * 4 / (time.perf_counter() - t)
    a, w = torch.randn(512, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    torch.nn.functional.linear(a, w)
    t = time.perf_counter()
    for _ in range(10):
        torch.nn.functional.linear(a, w)
    flops = 10 * 2 * 512 * 576 * 1536 / (time.perf_counter() - t)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    steps = max(st["decode_steps"], 1)
    rows = st["generated_tokens"] / steps  # mean rows per step (end-of-sequence tokens are not counted)
    per_step = st["decode_s"] / steps
    memory, compute = weights / bandwidth, 2 * params * rows / flops
    print(f"roofline: {bandwidth / 1e9:.1f} GB/s read, {flops / 1e9:.0f} GFLOP/s ({dtype}); a decode step "
          f"took {per_step * 1000:.0f} ms at ~{rows:.0f} rows, against {memory * 1000:.0f} ms to read the weights "
          f"and {compute * 1000:.0f} ms of matrix work ({per_step / max(memory, compute):.1f}x the larger)")


if __name__ == "__main__":
    main()
