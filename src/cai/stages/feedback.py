"""Stage `feedback`: AI preference labels for comparison pairs (Bai et al. 2022, section 4).

For each pair the feedback model sees the conversation and both responses as a multiple-choice
question under a preference principle drawn by a seeded RNG (or `feedback.principles` of them, an
ensemble whose labels are averaged), after few-shot worked examples. The label is the normalised
probability of `A` versus `B` after "The answer is: (" (`LM.score_options`). Each question is asked
in both orders and the two probabilities for response 1 are averaged, so a judge that always
prefers the first slot gives exactly 0.5.

- Abstention: an order whose two options together hold less than `feedback.min_option_mass` of the
  probability is unusable; a principle needs both orders; a row with no usable principle abstains
  rather than invent a label.
- Chain of thought (`feedback.chain_of_thought`): the model first writes its reasoning after
  "Let's think step by step:", then the options are scored after it, and the final probability is
  clamped to `feedback.clamp` (default [0.4, 0.6]), since reasoning makes it overconfident.
  Reasoning that is empty, cut off at the token limit, or forges a chat turn is a counted
  failure, never a label.
- Scores that are not finite log-probabilities are a counted failure too.

Rows are TRL conversational preference rows (`prompt`/`chosen`/`rejected`) with `p_chosen` and the
audit columns (records.py). Chunks are appended as they finish, so a killed run resumes; with
`ray.enabled` they are spread over Ray workers (cai/cluster.py).

    cai run configs/quickstart.yaml --from feedback --to feedback
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cai.config import FeedbackConfig, PipelineConfig, Sampling, fingerprint, plain
from cai.constitution import ANSWER_PREFIX, OPTION_LABELS, Constitution
from cai.lm.base import LM, Completion, Message
from cai.records import SCAFFOLD_MARKERS, STATUS_ABSTAIN, STATUS_FAILED, STATUS_OK, stable_seed
from cai.rundir import Stage
from cai.stages.chunked import run_chunks

NAME = "feedback"


@dataclass(frozen=True)
class Comparison:
    """Two candidate replies to one conversation (which ends with the human's turn)."""

    record_id: str
    conversation: tuple[Message, ...]
    responses: tuple[str, str]


# ---- label maths (pure) ---------------------------------------------------------------------


def option_probs(logprobs: Sequence[float]) -> tuple[float, float]:
    """(P(A) normalised over the two options, the options' total probability mass).

    Raises ValueError for anything that is not a pair of finite log-probabilities (<= 0).
    """
    if len(logprobs) != 2:
        raise ValueError(f"expected 2 option scores, got {len(logprobs)}")
    a, b = (float(x) for x in logprobs)
    if not all(math.isfinite(x) and x <= 1e-6 for x in (a, b)):
        raise ValueError(f"option scores must be finite log-probabilities, got {a!r}, {b!r}")
    m = max(a, b)
    za, zb = math.exp(a - m), math.exp(b - m)
    return za / (za + zb), math.exp(a) + math.exp(b)


def swap_average(p_ab: float, p_ba: float) -> float:
    """P(response 1 is better) from both orders: `p_ab` is P(A) when response 1 is shown as (A),
    `p_ba` is P(B) when it is shown as (B). A constant first-slot bias cancels exactly."""
    return 0.5 * (p_ab + p_ba)


def clamp(p: float, bounds: Sequence[float]) -> float:
    lo, hi = bounds
    return min(max(p, lo), hi)


def cot_problem(c: Completion) -> str | None:
    """Why a chain-of-thought completion cannot be used, or None."""
    text = c.text.strip()
    if not text:
        return "cot_empty"
    if c.finish_reason == "length":
        return "cot_truncated"
    if any(m in c.text for m in SCAFFOLD_MARKERS):
        return "cot_forged_turn"
    return None


def cot_reasoning(text: str) -> str:
    """The reasoning with any answer the model already stated cut off (the answer is scored, not read)."""
    cut = text.find(ANSWER_PREFIX.strip())
    return (text[:cut] if cut >= 0 else text).strip()


# ---- the core -------------------------------------------------------------------------------


def label(lm: LM, constitution: Constitution, comparisons: Sequence[Comparison], cfg: FeedbackConfig, seed: int,
          principle_ids: Sequence[str] | None = None,
          on_call: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Label comparisons; pure apart from the model calls.

    Returns one dict per comparison: record_id, status ("ok" | "abstain" | "failed"), reason,
    p_first (P(response 1 is better), None unless ok), principle_ids, orders (one entry per
    principle: p_ab, p_ba, mass_ab, mass_ba, cot_ab, cot_ba, status). `principle_ids` fixes the
    principles for every comparison; otherwise `cfg.principles` are drawn per record.
    """
    # One job per (comparison, principle, order); order 0 shows response 1 as (A).
    jobs: list[tuple[int, int, int, str]] = []
    pids_of: list[list[str]] = []
    first: list[int] = []  # index of each comparison's first job; principle pi, order o is at +2*pi+o
    for ci, comp in enumerate(comparisons):
        first.append(len(jobs))
        pids = list(principle_ids) if principle_ids else constitution.draw(seed, comp.record_id, cfg.principles,
                                                                           kind="preference")
        pids_of.append(pids)
        for pi, pid in enumerate(pids):
            for order in (0, 1):
                jobs.append((ci, pi, order, pid))

    def options(ci: int, order: int) -> tuple[str, str]:
        r1, r2 = comparisons[ci].responses
        return (r1, r2) if order == 0 else (r2, r1)

    cots: list[Completion | None] = [None] * len(jobs)
    if cfg.chain_of_thought:
        prompts = [constitution.choice_messages(comparisons[ci].conversation, options(ci, o), pid, cfg.few_shot,
                                                chain_of_thought=True) for ci, _, o, pid in jobs]
        seeds = [stable_seed(seed, comparisons[ci].record_id, "cot", pid, o) for ci, _, o, pid in jobs]
        sampling: Sampling = cfg.cot
        for k, c in enumerate(lm.generate(prompts, sampling, seeds=seeds)):
            cots[k] = c[0]
        if on_call is not None:
            on_call()

    problems: list[str | None] = [cot_problem(c) if c is not None else None for c in cots]
    ask = [k for k, prob in enumerate(problems) if prob is None]
    contexts = []
    for k in ask:
        ci, _, o, pid = jobs[k]
        reasoning = cot_reasoning(cots[k].text) if cots[k] is not None else None
        contexts.append(constitution.choice_messages(comparisons[ci].conversation, options(ci, o), pid, cfg.few_shot,
                                                     chain_of_thought=cfg.chain_of_thought, reasoning=reasoning))
    scores = lm.score_options(contexts, [list(OPTION_LABELS)] * len(contexts)) if contexts else []
    if on_call is not None:
        on_call()
    if len(scores) != len(contexts):
        raise RuntimeError(f"{lm.name}: score_options returned {len(scores)} results for {len(contexts)} prompts")

    # (P(option A), mass) per job, or the reason it has none.
    result: dict[int, tuple[float, float] | str] = {k: prob for k, prob in enumerate(problems) if prob is not None}
    for k, s in zip(ask, scores):
        try:
            result[k] = option_probs(s)
        except (TypeError, ValueError):
            result[k] = "invalid_scores"

    out = []
    for ci, comp in enumerate(comparisons):
        orders = []
        for pi, pid in enumerate(pids_of[ci]):
            ks = (first[ci] + 2 * pi, first[ci] + 2 * pi + 1)
            got = [result[k] for k in ks]
            cot = [cots[k].text if cots[k] is not None else None for k in ks]
            entry: dict[str, Any] = {"principle_id": pid, "p_ab": None, "p_ba": None, "mass_ab": None,
                                     "mass_ba": None, "cot_ab": cot[0], "cot_ba": cot[1]}
            bad = [g for g in got if isinstance(g, str)]
            if bad:
                entry["status"] = bad[0]
            else:
                (pa_ab, m_ab), (pa_ba, m_ba) = got  # type: ignore[misc]
                # In order 1 response 1 is option B, so its probability is 1 - P(A).
                entry.update(p_ab=pa_ab, p_ba=1.0 - pa_ba, mass_ab=m_ab, mass_ba=m_ba)
                entry["status"] = "low_option_mass" if min(m_ab, m_ba) < cfg.min_option_mass else STATUS_OK
            orders.append(entry)
        usable = [e for e in orders if e["status"] == STATUS_OK]
        row: dict[str, Any] = {"record_id": comp.record_id, "principle_ids": pids_of[ci], "orders": orders}
        if usable:
            p = sum(swap_average(e["p_ab"], e["p_ba"]) for e in usable) / len(usable)
            if cfg.chain_of_thought:
                p = clamp(p, cfg.clamp)
            row.update(status=STATUS_OK, reason=None, p_first=p)
        else:
            reasons = [e["status"] for e in orders]
            status = STATUS_ABSTAIN if all(r == "low_option_mass" for r in reasons) else STATUS_FAILED
            row.update(status=status, reason=next(r for r in reasons if r != "low_option_mass")
                       if status == STATUS_FAILED else "low_option_mass", p_first=None)
        out.append(row)
    return out


def preference_row(pair: dict[str, Any], lab: dict[str, Any]) -> dict[str, Any]:
    """A labelled pair as a TRL preference row: chosen is the response the label favours (response
    1 on an exact tie), `p_chosen` = P(chosen is better) >= 0.5."""
    r1, r2 = pair["responses"]
    p = lab["p_first"]
    first = p is None or p >= 0.5
    return {
        "prompt": [{"role": "user", "content": pair["prompt"]}],
        "chosen": [{"role": "assistant", "content": r1 if first else r2}],
        "rejected": [{"role": "assistant", "content": r2 if first else r1}],
        "p_chosen": None if p is None else (p if first else 1.0 - p),
        "label_source": "ai",
        "record_id": pair["record_id"],
        "source": pair.get("source"),
        "kind": pair.get("kind"),
        "p_first": p,
        "principle_ids": lab["principle_ids"],
        "orders": lab["orders"],
        "status": lab["status"],
        "reason": lab["reason"],
    }


def process_chunk(pairs: list[dict[str, Any]], lm: LM, constitution: Constitution, cfg: FeedbackConfig, seed: int,
                  on_call: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    comps = [Comparison(p["record_id"], ({"role": "user", "content": p["prompt"]},), tuple(p["responses"]))
             for p in pairs]
    labels = label(lm, constitution, comps, cfg, seed, on_call=on_call)
    return [preference_row(p, lab) for p, lab in zip(pairs, labels)]


def count(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == STATUS_OK]
    not_ok = Counter(f"{r['status']}:{r['reason']}" for r in rows if r["status"] != STATUS_OK)
    return {
        "rows": len(rows),
        "ok": len(ok),
        "abstain": sum(r["status"] == STATUS_ABSTAIN for r in rows),
        "failed": sum(r["status"] == STATUS_FAILED for r in rows),
        "not_ok_by_reason": dict(sorted(not_ok.items())),
        "mean_p_chosen": round(sum(r["p_chosen"] for r in ok) / len(ok), 4) if ok else None,
        "first_preferred": sum(r["p_first"] > 0.5 for r in ok),
    }


def label_chunk(lm: LM, pairs: list[dict[str, Any]], on_call: Callable[[], None] | None, *,
                constitution: Constitution, cfg: FeedbackConfig, seed: int) -> list[dict[str, Any]]:
    """One chunk's preference rows with their provenance, as a Ray worker or this process makes them."""
    extra = {"feedback_model": lm.name, "constitution_hash": constitution.hash, "seed": seed}
    return [{**r, **extra} for r in process_chunk(pairs, lm, constitution, cfg, seed, on_call)]


def run(cfg: PipelineConfig, lm_factory: Callable[[], LM], constitution: Constitution, inputs: list[dict[str, Any]],
        inputs_fp: str, allow_changed: bool = False) -> Stage:
    """Label the `pairs` stage's usable pairs with the feedback model, chunk by chunk, here or on
    Ray workers (`ray.enabled`)."""
    pairs = [p for p in inputs if p["status"] == STATUS_OK]
    settings = plain({"feedback": cfg.feedback, "seed": cfg.seed, "constitution_hash": constitution.hash,
                      "inputs": inputs_fp})
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)
    work = functools.partial(label_chunk, constitution=constitution, cfg=cfg.feedback, seed=cfg.seed)
    run_chunks(stage, pairs, work, lm_factory, cfg.ray, chunk_size=cfg.feedback.chunk_size, count=count, unit="pair",
               manifest={"constitution_hash": constitution.hash})
    return stage
