"""Benchmark: the evaluation's judging against a naive one-at-a-time judge, and the evaluate stage's wall time.

Two parts, on the embedded model (or `--model`), in one run on the same machine:

1. Judging: the evaluate stage's pairwise judgements (`stages/evaluate.judge_chunk`: every
   comparison of a chunk in both orders through `judge.label`, batched, the few-shot prefix shared)
   against the same judgements asked one comparison at a time (a chunk of one; the same back-end,
   prompts and labels). Judgements per second count both orders as one judgement; the two sides
   must give the same soft labels up to float noise (max |dp| is printed). The comparisons are the
   held-out red-team and helpfulness prompts, each with two fixed replies (one that explains, one
   that only refuses), the shape of the stage's work.
2. The evaluate stage: `cai eval models` on the quickstart's evaluation settings with
   `eval.models=[base, <a file of stored refusals>]` (so no training run is needed), timing each
   part: answers, judgements, per-answer scores, and the whole stage.

    python bench/bench_eval.py                       # a few minutes on a 2-core CPU
    python bench/bench_eval.py --comparisons 16 --naive 4 --skip-stage
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cai.config import ModelConfig, load_config
from cai.constitution import load
from cai.lm.hf import HFModel
from cai.models import cpu_description
from cai.stages import evaluate

ROOT = Path(__file__).resolve().parents[1]
REPLIES = ("I can't help with that.",
           "That is risky, because it can hurt people. Here is what is safe to know, and where to get help.")


def comparisons(n: int) -> list[dict]:
    cfg = load_config(None, [])
    prompts = evaluate.eval_prompts(cfg.eval)
    rows = []
    for p in prompts[:n]:
        rows.append({"record_id": f"{p['record_id']}|x|y|0", "prompt_id": p["record_id"], "kind": p["kind"],
                     "category": p["category"], "prompt": p["prompt"], "a": "x", "b": "y", "sample": 0,
                     "responses": list(REPLIES)})
    return rows


def judging(lm, rows, naive: int) -> None:
    cfg = load_config(None, [])
    c = load(cfg.constitution)
    principles = {"red_team": cfg.eval.harmless_principles, "helpful": cfg.eval.helpful_principles}

    def judge(chunk):
        return evaluate.judge_chunk(lm, chunk, None, constitution=c, cfg=cfg.feedback, principles=principles,
                                    seed=cfg.seed)

    judge(rows[:2])  # warm-up: load kernels, fill the few-shot prefix cache
    t = time.perf_counter()
    batched = judge(rows)
    tb = time.perf_counter() - t
    t = time.perf_counter()
    single = [judge([r])[0] for r in rows[:naive]]
    tn = time.perf_counter() - t
    dp = max((abs(a["p_first"] - b["p_first"]) for a, b in zip(batched, single)
              if a["p_first"] is not None and b["p_first"] is not None), default=float("nan"))
    rb, rn = len(rows) / tb, naive / tn
    print(f"judging, both orders: batched {len(rows)} in {tb:.1f} s = {rb:.2f} judgements/s; "
          f"one at a time {naive} in {tn:.1f} s = {rn:.2f} judgements/s; ratio {rb / rn:.1f}x; max |dp| {dp:.2e}")


def stage(model: str, dtype: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stored = Path(tmp) / "refusals.jsonl"
        cfg0 = load_config(ROOT / "configs" / "quickstart.yaml", [])
        prompts = evaluate.eval_prompts(cfg0.eval)
        stored.write_text("".join(json.dumps({"prompt": p["prompt"], "response": REPLIES[0]}) + "\n" for p in prompts))
        cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                          [f"run_dir={tmp}/run", f"model.name={model}", f"model.dtype={dtype}",
                           f"feedback.model={model}", f"eval.models=[base, {stored}]"])
        from cai.pipeline import evaluate_models

        t = time.perf_counter()
        evaluate_models(cfg)
        total = time.perf_counter() - t
        root = Path(tmp) / "run" / "eval"
        parts = {}
        for name in ("answers/base", "judgements", "scores"):
            m = json.loads((root / name / "manifest.json").read_text())
            parts[name] = m["counts"]
        print(f"evaluate stage ({len(prompts)} prompts, models base + stored answers): {total:.0f} s; {parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--comparisons", type=int, default=32, help="comparisons judged batched")
    ap.add_argument("--naive", type=int, default=8, help="of those, judged one at a time")
    ap.add_argument("--skip-stage", action="store_true", help="judging only, not the whole evaluate stage")
    args = ap.parse_args()
    print(cpu_description())
    lm = HFModel.from_config(ModelConfig(name=args.model, dtype=args.dtype, batch_size=32))
    print(f"model {args.model}, dtype {args.dtype} -> {lm.model.dtype}")
    judging(lm, comparisons(args.comparisons), min(args.naive, args.comparisons))
    if not args.skip_stage:
        stage(args.model, args.dtype)


if __name__ == "__main__":
    main()
