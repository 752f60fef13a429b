"""Benchmark: the SL-CAI critique-revision stage through `cai serve` against the same stage in process.

One run, same model, dtype, prompts and settings on both sides. In process, the stage advances
all prompts in lockstep, one batched `generate` per step. Served, `cai serve` runs in a separate
process and the OpenAI back-end sends each prompt's next request as soon as its previous answer
is back (`--concurrency` in flight); the server batches whatever is waiting. Prints revisions/s
and generated tokens/s for both, their ratio, and the HTTP path's own cost per request
(a one-token request over HTTP against the same request in process). Generated tokens are counted
from the records' texts on both sides, so the figures are comparable.

    python bench/bench_serve.py                         # 32 red-team prompts, 2 rounds, 64 new tokens
    python bench/bench_serve.py --prompts 64 --rounds 2 --max-new-tokens 96 --concurrency 64
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import httpx
import torch

from cai.config import PromptSource, Sampling, load_config
from cai.constitution import load
from cai.lm.hf import HFModel
from cai.lm.openai import OpenAIModel
from cai.sources import read_source
from cai.stages.sl_generate import calls_per_chunk, process_chunk
from cai.testing import free_port


def capped(s: Sampling, n: int) -> Sampling:
    return replace(s, max_new_tokens=min(s.max_new_tokens, n))


def generated_tokens(rows, tokenizer) -> int:
    texts = [r["init_response"] for r in rows] + [t for r in rows for rd in r["rounds"]
                                                    for t in (rd["critique"], rd["revision"])]
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def start_server(model: str, dtype: str, batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cai.cli", "serve", model, "--port", str(port), f"model.dtype={dtype}",
                             f"model.batch_size={batch_size}"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cai serve exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("cai serve did not come up within 300 s")


def timed(lm, rows, constitution, sl) -> tuple[float, list[dict]]:
    t = time.perf_counter()
    out = process_chunk([dict(r) for r in rows], lm, constitution, sl, seed=0)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="cap on every step's max_new_tokens")
    ap.add_argument("--concurrency", type=int, help="requests in flight (default: one per prompt)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--overhead-requests", type=int, default=20)
    args = ap.parse_args()

    cfg = load_config(args.config)
    sl = replace(cfg.sl, rounds=args.rounds, response=capped(cfg.sl.response, args.max_new_tokens),
                 critique=capped(cfg.sl.critique, args.max_new_tokens),
                 revision=capped(cfg.sl.revision, args.max_new_tokens))
    constitution = load(cfg.constitution)
    rows = [{**r, "kind": "red_team"} for r in read_source(PromptSource("builtin:red_team", limit=args.prompts))]
    model = cfg.model.name
    lm = HFModel.from_config(replace(cfg.model, dtype=args.dtype, batch_size=args.batch_size))
    proc, url = start_server(model, args.dtype, args.batch_size)
    client = OpenAIModel(model, url, max_concurrency=args.concurrency or len(rows), timeout_s=1800)
    try:
        print(f"model {model}, dtype {lm.model.dtype}, {torch.get_num_threads()} threads per process, "
              f"{len(rows)} prompts, {args.rounds} rounds, {sl.few_shot} few-shot examples, max_new_tokens <= "
              f"{args.max_new_tokens}, {client.max_concurrency} requests in flight; load {os.getloadavg()[0]:.2f}")
        # warm-up (kernels, allocator, the few-shot prefix cache) on one prompt each side, not timed
        warm = replace(sl, rounds=1)
        process_chunk([dict(rows[0])], lm, constitution, warm, seed=1)
        process_chunk([dict(rows[0])], client, constitution, warm, seed=1)

        in_dt, in_rows = timed(lm, rows, constitution, sl)
        sent = client.requests_sent
        sv_dt, sv_rows = timed(client, rows, constitution, sl)
        requests = client.requests_sent - sent
        assert requests == calls_per_chunk(rows, args.rounds)

        # The HTTP path's own cost: the same one-token request in process and over HTTP, one at a time.
        conv = [{"role": "user", "content": "Hi"}]
        one = Sampling(temperature=0.0, max_new_tokens=1)
        t = time.perf_counter()
        for i in range(args.overhead_requests):
            lm.generate([conv], one, seeds=[i])
        local = (time.perf_counter() - t) / args.overhead_requests
        t = time.perf_counter()
        for i in range(args.overhead_requests):
            client.generate([conv], one, seeds=[i])
        remote = (time.perf_counter() - t) / args.overhead_requests
    finally:
        client.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)

    tok = lm.tokenizer
    sides = []
    for name, dt, out in (("in-process", in_dt, in_rows), ("cai serve", sv_dt, sv_rows)):
        revs = sum(len(r["rounds"]) for r in out)
        sides.append((name, dt, revs, generated_tokens(out, tok)))
    print(f"{'':12} {'revisions':>9} {'tokens':>7} {'seconds':>8} {'rev/s':>7} {'tok/s':>7}")
    for name, dt, revs, ntok in sides:
        print(f"{name:12} {revs:>9} {ntok:>7} {dt:>8.1f} {revs / dt:>7.3f} {ntok / dt:>7.1f}")
    (_, a_dt, a_rev, a_tok), (_, b_dt, b_rev, b_tok) = sides
    print(f"served / in-process: {(b_rev / b_dt) / (a_rev / a_dt):.2f}x revisions/s, "
          f"{(b_tok / b_dt) / (a_tok / a_dt):.2f}x tokens/s")
    print(f"HTTP path: {1000 * (remote - local):.1f} ms per request (one-token request {1000 * remote:.1f} ms over "
          f"HTTP, {1000 * local:.1f} ms in process); {requests} requests in the served run, "
          f"so about {100 * requests * max(remote - local, 0) / b_dt:.1f}% of its time if none overlapped")
    same = sum(a == b for a, b in zip(in_rows, sv_rows))
    print(f"records identical on both sides: {same} of {len(rows)} (sampled steps may differ by batch-shape "
          f"rounding); load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
