"""Stage `feedback`: AI preference labels for comparison pairs (Bai et al. 2022, section 4).

Each usable pair from the `pairs` stage goes to the judge (cai/judge.py) as one comparison: a
multiple-choice question under a principle drawn by a seeded RNG (or `feedback.principles` of them,
an ensemble), asked in both orders, with abstention, optional chain of thought and clamping, and
failures counted. The judge's P(response 1 is better) becomes a TRL conversational preference row
(`prompt`/`chosen`/`rejected`) with `p_chosen` and the audit columns (records.py); rows the judge
abstains on or fails stay in the file with their status and reason, and are never a label.

Chunks are appended as they finish, so a killed run resumes; with `ray.enabled` they are spread
over Ray workers (cai/cluster.py).

    cai run configs/quickstart.yaml --from feedback --to feedback
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

from cai.config import FeedbackConfig, PipelineConfig, fingerprint, plain
from cai.constitution import Constitution
from cai.judge import Comparison, label
from cai.lm.base import LM
from cai.records import STATUS_ABSTAIN, STATUS_FAILED, STATUS_OK
from cai.rundir import Stage
from cai.stages.chunked import run_chunks

NAME = "feedback"


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
