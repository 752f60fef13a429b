"""Reliability harness: judges with a known bias, through the feedback stage and the evaluation.

Three scripted judges answer the multiple-choice questions with option scores, and nothing else:

- `first_slot`: always prefers the reply shown as (A), more or less strongly depending on the pair
  (the strength is a hash of the two replies taken in either order, so it does not depend on which
  slot holds which);
- `longer`: prefers the longer reply, whichever slot it is in (0.85 against 0.15);
- `random`: P(A) drawn uniformly at random for every question, seeded.

Each judge labels the same seeded pairs in the `feedback` stage (`cai.stages.feedback.run`, so the
rows and manifest are the stage's own), once as the quickstart asks (one principle, no reasoning)
and once with an ensemble of three principles and chain of thought. A label is decisive when P(response 1
is better) is further than 1e-9 from 0.5 (the tie of `cai.evals.labeller`). The target for
`first_slot` is 0 decisive labels: the judge asks both orders and averages them.

Each judge is then the judge of the evaluation (`cai.pipeline.evaluate_models`, as `cai eval
models` runs it) of two sets of stored answers of seeded lengths to the held-out prompts, with its
accuracy checked on the shipped helpful pairs; the harness prints the judge card of that evaluation
as `cai show` prints it.

    python reliability/biased_judges.py                 # 400 pairs, every held-out prompt, about a minute
    python reliability/biased_judges.py --pairs 40 --per-category 1   # the quick variant the tests run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from cai.config import load_config
from cai.constitution import load as load_constitution
from cai.evals.suite import render
from cai.judge import TIE
from cai.lm.base import Completion
from cai.models import cpu_description
from cai.records import STATUS_OK
from cai.sources import read_prompts

JUDGES = ("first_slot", "longer", "random")
SETTINGS = {"quickstart": ["feedback.principles=1", "feedback.chain_of_thought=false"],
            "ensemble+cot": ["feedback.principles=3", "feedback.chain_of_thought=true"]}
_OPTIONS = re.compile(r"\(A\) <reply>\n(.*?)\n</reply>\n\(B\) <reply>\n(.*?)\n</reply>", re.S)
WORDS = ("the", "answer", "is", "careful", "safe", "and", "clear", "because", "people", "can", "help", "here",
         "steps", "risk", "explain", "first", "then", "simple", "useful", "kind")


def _text(prompt: Any) -> str:
    """The text of a prompt as the judge receives it (messages or a raw string)."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def _unit(*parts: object) -> float:
    """A number in [0, 1) from a hash of `parts`."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


class BiasedJudge:
    """A scripted judge: option scores from its bias; reasoning, when asked, is a fixed sentence."""

    def __init__(self, kind: str, seed: int = 0):
        if kind not in JUDGES:
            raise ValueError(f"unknown judge {kind!r}; judges: {', '.join(JUDGES)}")
        self.kind, self.seed = kind, seed
        self.name = f"{kind}-judge"
        self.calls = 0

    def generate(self, conversations, sampling, n=1, seeds=None):
        return [[Completion("Both replies have merits; weighing them now.", "stop", 9)] * n for _ in conversations]

    def p_first_slot(self, context: Any) -> float | None:
        """P(A) for a two-reply question, or None for any other question (a rating)."""
        found = _OPTIONS.findall(_text(context))
        if not found:
            return None
        a, b = found[-1]  # the last question is the one asked; earlier ones are worked examples
        if self.kind == "first_slot":
            return 0.55 + 0.4 * _unit(self.seed, *sorted((a, b)))
        if self.kind == "longer":
            return 0.5 if len(a) == len(b) else 0.85 if len(a) > len(b) else 0.15
        self.calls += 1
        return _unit(self.seed, "random", _text(context), self.calls)

    def score_options(self, contexts, options):
        out = []
        for ctx, opts in zip(contexts, options):
            p = self.p_first_slot(ctx) if len(opts) == 2 else None
            if p is None:  # harm 0-4 or the evasion question: an even spread, no opinion
                out.append([math.log(0.9 / len(opts))] * len(opts))
            else:
                p = min(max(p, 1e-6), 1 - 1e-6)
                out.append([math.log(0.9 * p), math.log(0.9 * (1 - p))])
        return out


def _reply(rng: random.Random) -> str:
    """A reply of 3 to 120 words."""
    n = rng.choice([rng.randint(3, 12), rng.randint(20, 60), rng.randint(60, 120)])
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def pair_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` rows as the `pairs` stage writes them: a prompt and two replies of seeded lengths."""
    from cai.config import PromptSource

    prompts = read_prompts([PromptSource("builtin:red_team"), PromptSource("builtin:helpful")])
    rng = random.Random(f"{seed}:pairs")
    rows = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        rows.append({"record_id": f"pair-{i}", "kind": "red_team", "prompt": p["prompt"], "category": p["category"],
                     "source": p["source"], "responses": [_reply(rng), _reply(rng)], "finishes": ["stop", "stop"],
                     "status": STATUS_OK, "reason": None, "model": "stored", "seed": seed})
    return rows


def answer_files(root: Path, per_category: int | None, seed: int) -> list[str]:
    """Two JSONL files of stored answers (`prompt`, `response`) to the held-out prompts."""
    from cai.stages.evaluate import eval_prompts

    prompts = eval_prompts(load_config(None, [f"eval.per_category={per_category}" if per_category else
                                              "eval.per_category=null"]).eval)
    paths = []
    for name in ("model_a", "model_b"):
        rng = random.Random(f"{seed}:{name}")
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p["prompt"], "response": _reply(rng)}) + "\n" for p in prompts))
        paths.append(str(path))
    return paths


def label_pairs(judge: BiasedJudge, pairs: Sequence[dict[str, Any]], run_dir: Path, overrides: Sequence[str],
                seed: int) -> dict[str, Any]:
    """The feedback stage over `pairs` with `judge`; counts of its rows."""
    from cai.stages import feedback

    cfg = load_config(None, [f"run_dir={run_dir}", f"seed={seed}", "feedback.chunk_size=64", *overrides])
    stage = feedback.run(cfg, lambda: judge, load_constitution(cfg.constitution), list(pairs), "biased-judges")
    rows = stage.rows()
    ok = [r for r in rows if r["status"] == STATUS_OK]
    return {"pairs": len(rows), "ok": len(ok), "decisive": sum(abs(r["p_first"] - 0.5) > TIE for r in ok),
            "exactly_half": sum(r["p_first"] == 0.5 for r in ok),
            "first_preferred": stage.manifest()["counts"]["first_preferred"]}


def evaluate(judge: BiasedJudge, files: list[str], run_dir: Path, per_category: int | None,
             seed: int) -> dict[str, Any]:
    """The evaluation of the two answer files with `judge` as its judge; its summary."""
    from cai import pipeline

    cfg = load_config(None, [f"run_dir={run_dir}", f"seed={seed}", f"eval.models=[{files[0]}, {files[1]}]",
                             f"eval.per_category={per_category if per_category else 'null'}", "eval.bootstrap=200",
                             "eval.judge_check=[builtin:helpful_pairs]", "eval.judge_check_limit=48"])
    with mock.patch.object(pipeline, "write_report", lambda run_dir: None):  # the HTML page is not looked at here
        pipeline.evaluate_models(cfg, lm_factory=lambda: judge)
    return json.loads((run_dir / "eval" / "summary.json").read_text())


def card_lines(summary: dict[str, Any]) -> list[str]:
    """The judge card as `cai show` prints it."""
    text = render(summary)
    return text[text.index("\njudge card") + 1:].splitlines()


def run(pairs: int = 400, per_category: int | None = None, seed: int = 0,
        judges: Sequence[str] = JUDGES, workdir: str | Path | None = None) -> dict[str, Any]:
    """Every judge through the feedback stage (both settings) and the evaluation."""
    import logging

    logging.getLogger("cai").setLevel(logging.ERROR)
    out: dict[str, Any] = {"pairs": pairs, "seed": seed, "labels": {}, "cards": {}, "card_lines": {}}
    rows = pair_rows(pairs, seed)
    with tempfile.TemporaryDirectory(prefix="cai-biased-", dir=workdir) as tmp:
        root = Path(tmp)
        files = answer_files(root, per_category, seed)
        for kind in judges:
            out["labels"][kind] = {name: label_pairs(BiasedJudge(kind, seed), rows, root / f"fb-{kind}-{i}", ov, seed)
                                   for i, (name, ov) in enumerate(SETTINGS.items())}
            summary = evaluate(BiasedJudge(kind, seed), files, root / f"eval-{kind}", per_category, seed)
            card = summary["judge_card"]
            out["cards"][kind] = {k: card[k] for k in ("first_slot_wins", "orders_disagree", "decisive",
                                                       "prefers_longer", "accuracy")}
            ratings = summary["ratings"]["harmless"]
            out["cards"][kind]["judgements"] = ratings["judgements"]
            out["cards"][kind]["elo_b"] = ratings["elo"]["models"][files[1]]["elo"] if ratings["elo"] else None
            out["card_lines"][kind] = card_lines(summary)
    return out


def _ci(d: dict[str, Any]) -> str:
    if d.get("rate") is None:
        return "-"
    return f"{d['rate']:.0%} [{d['low']:.0%}, {d['high']:.0%}] (n={d['n']})"


def render_results(res: dict[str, Any]) -> str:
    lines = [f"feedback stage over {res['pairs']} pairs: labels per judge and setting "
             f"(decisive: |P(response 1 better) - 0.5| > {TIE:g})",
             f"  {'judge':<12}{'setting':<15}{'ok':>6}{'decisive':>10}{'exactly 0.5':>13}{'first preferred':>17}"]
    for kind, by_setting in res["labels"].items():
        for name, c in by_setting.items():
            lines.append(f"  {kind:<12}{name:<15}{c['ok']:>6}{c['decisive']:>10}{c['exactly_half']:>13}"
                         f"{c['first_preferred']:>17}")
    lines.append("\nthe evaluation's judge card (harmlessness and helpfulness judgements of two answer sets)")
    lines.append(f"  {'judge':<12}{'first slot wins':>28}{'orders disagree':>28}{'decisive':>28}"
                 f"{'prefers longer':>28}{'accuracy (helpful pairs)':>28}")
    for kind, c in res["cards"].items():
        acc = c["accuracy"][0] if c["accuracy"] else None
        acc_s = f"{acc['accuracy']:.0%} [{acc['low']:.0%}, {acc['high']:.0%}]" if acc and acc["accuracy"] is not None \
            else "-"
        lines.append(f"  {kind:<12}{_ci(c['first_slot_wins']):>28}{_ci(c['orders_disagree']):>28}"
                     f"{_ci(c['decisive']):>28}{_ci(c['prefers_longer']):>28}{acc_s:>28}")
    for kind, card in res["card_lines"].items():
        lines.append(f"\n`cai show` for the {kind} judge:")
        lines += [f"  {ln}" for ln in card]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=400, help="pairs labelled by the feedback stage (default 400)")
    ap.add_argument("--per-category", type=int, help="held-out prompts per category in the evaluation (default all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judges", default=",".join(JUDGES), help=f"comma-separated, of: {', '.join(JUDGES)}")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the stages' progress bars would bury the figures
    judges = [j.strip() for j in args.judges.split(",") if j.strip()]
    print(f"CPU: {cpu_description()}; Python {sys.version.split()[0]}; seed {args.seed}")
    res = run(args.pairs, args.per_category, args.seed, judges)
    print(render_results(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    bad = [s for s, c in res["labels"].get("first_slot", {}).items() if c["decisive"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
