"""Benchmark: the judge's cost per comparison by few-shot order and batching, in one run.

The judge (`cai.judge.label`) asks each comparison in both orders after `feedback.few_shot` worked
examples. Written as they are, the examples are one head shared by every prompt, which the
transformers back-end computes once per batch (prefix sharing). Balanced (`few_shot_order:
balanced`, the default) they come in two variants, one per final letter, so a batch ordered by
length alone mixes them and shares only the tokens before they part; the engine's `prefix_groups`
batches each head's rows apart. Measured side by side on the same comparisons:

- `as_written`: one head;
- `balanced, length order`: two heads, batches ordered by length only (the engine before
  `prefix_groups`);
- `balanced, grouped`: two heads, batches grouped by head (what runs now).

Labels of the two balanced rows must agree to float noise (max |dp| is printed): only the batching
differs. Comparisons are the held-out evaluation prompts with two fixed replies each.

    python bench/bench_judge.py                          # about two minutes on a 2-core CPU
    python bench/bench_judge.py --comparisons 32 --format raw
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

from cai.config import FeedbackConfig, ModelConfig, load_config
from cai.constitution import load
from cai.judge import Comparison, label
from cai.lm import hf_engine
from cai.lm.hf import HFModel
from cai.models import cpu_description
from cai.stages import evaluate

REPLIES = ("I can't help with that.",
           "That is risky, because it can hurt people. Here is what is safe to know, and where to get help.")


def length_order(rows, min_prefix=16, group=2):
    return [sorted(range(len(rows)), key=lambda k: (len(rows[k]), k))] if rows else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--comparisons", type=int, default=64)
    ap.add_argument("--few-shot", type=int, default=2)
    ap.add_argument("--format", default="chat", choices=["chat", "raw"])
    args = ap.parse_args()

    lm = HFModel.from_config(ModelConfig(name=args.model, dtype=args.dtype))
    cfg = load_config(None, [])
    const = load(cfg.constitution)
    prompts = evaluate.eval_prompts(cfg.eval)[: args.comparisons]
    comps = [Comparison(p["record_id"], ({"role": "user", "content": p["prompt"]},), REPLIES) for p in prompts]
    print(f"CPU: {cpu_description()}; model {args.model} ({next(lm.model.parameters()).dtype}), "
          f"{len(comps)} comparisons x 2 orders, few_shot {args.few_shot}, format {args.format}")

    def run(order: str, patch: bool) -> tuple[float, list]:
        fb = FeedbackConfig(few_shot=args.few_shot, few_shot_order=order, format=args.format,
                            principle_ids=["pref-harm-general"])
        ctx = mock.patch.object(hf_engine, "prefix_groups", length_order) if patch else mock.patch.object(
            hf_engine, "prefix_groups", hf_engine.prefix_groups)
        with ctx:
            label(lm, const, comps[:2], fb, seed=0)  # warm-up
            lm.engine._prefixes.clear()  # every setting computes its own heads once, in the timed part
            t = time.perf_counter()
            rows = label(lm, const, comps, fb, seed=0)
            return time.perf_counter() - t, rows

    results = {}
    for name, order, patch in (("as_written", "as_written", False), ("balanced, length order", "balanced", True),
                               ("balanced, grouped", "balanced", False)):
        results[name] = run(order, patch)
    base = results["balanced, length order"][0]
    print(f"{'setting':<26} {'s':>7} {'comparisons/s':>14} {'vs length order':>16}")
    for name, (secs, _) in results.items():
        print(f"{name:<26} {secs:7.1f} {len(comps) / secs:14.2f} {base / secs:15.2f}x")
    a = [r["p_first"] for r in results["balanced, length order"][1]]
    b = [r["p_first"] for r in results["balanced, grouped"][1]]
    print(f"max |dp| between the balanced rows: {max(abs(x - y) for x, y in zip(a, b)):.2e}")


if __name__ == "__main__":
    main()
