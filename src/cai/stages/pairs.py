"""Stage `pairs`: two sampled responses per prompt from the policy model, to be compared by the
feedback model (Bai et al. 2022, section 4.1: the SL-CAI model generates the pairs).

Each prompt's two samples use seeds derived from (run seed, record id), so a resumed run, or one
whose chunks are spread over Ray workers (`ray.enabled`, cai/cluster.py), draws the same pairs. A
pair whose responses are identical, or where either response is empty, cut off at the token limit
(when `pairs.set_aside_truncated`) or echoes a prompt scaffold, is set aside with its reason and
counted; it never reaches the labeller.

    cai run configs/quickstart.yaml --from pairs --to pairs
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

from cai.config import PairsConfig, PipelineConfig, fingerprint, plain
from cai.lm.base import LM, Completion
from cai.records import SCAFFOLD_MARKERS, STATUS_OK, STATUS_SET_ASIDE, stable_seed
from cai.rundir import Stage
from cai.stages.chunked import run_chunks

NAME = "pairs"


def pair_problem(a: Completion, b: Completion, set_aside_truncated: bool) -> str | None:
    """Why two samples cannot make a comparison, or None."""
    for c in (a, b):
        if not c.text.strip():
            return "empty"
        if any(m in c.text for m in SCAFFOLD_MARKERS):
            return "echoes_scaffold"
        if set_aside_truncated and c.finish_reason == "length":
            return "truncated"
    if " ".join(a.text.split()) == " ".join(b.text.split()):
        return "identical"
    return None


def process_chunk(rows: list[dict[str, Any]], lm: LM, cfg: PairsConfig, seed: int) -> list[dict[str, Any]]:
    """Sample two responses for each prompt row; pure apart from the model call."""
    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    seeds = [stable_seed(seed, r["record_id"], "pair") for r in rows]
    samples = lm.generate(convs, cfg.sampling, n=2, seeds=seeds)
    out = []
    for r, (a, b) in zip(rows, samples):
        reason = pair_problem(a, b, cfg.set_aside_truncated)
        out.append({
            **{k: r.get(k) for k in ("record_id", "kind", "prompt", "category", "source")},
            "responses": [a.text, b.text],
            "finishes": [a.finish_reason, b.finish_reason],
            "status": STATUS_OK if reason is None else STATUS_SET_ASIDE,
            "reason": reason,
        })
    return out


def count(rows: list[dict[str, Any]]) -> dict[str, Any]:
    aside = Counter(r["reason"] for r in rows if r["status"] != STATUS_OK)
    return {"rows": len(rows), "ok": sum(r["status"] == STATUS_OK for r in rows),
            "set_aside": sum(aside.values()), "set_aside_by_reason": dict(sorted(aside.items()))}


def pair_chunk(lm: LM, rows: list[dict[str, Any]], on_call: Callable[[], None] | None, *, cfg: PairsConfig,
               seed: int) -> list[dict[str, Any]]:
    """One chunk's pair rows with their provenance, as a Ray worker or this process makes them."""
    return [{**r, "model": lm.name, "seed": seed} for r in process_chunk(rows, lm, cfg, seed)]


def all_set_aside(rows: list[dict[str, Any]]) -> str | None:
    """Why the stage fails when no pair is left to label, or None."""
    if any(r["status"] == STATUS_OK for r in rows):
        return None
    return (f"{NAME}: every pair was set aside ({count(rows)['set_aside_by_reason']}); nothing to "
            "label. For 'identical', raise pairs.sampling.temperature; for 'truncated', raise "
            "pairs.sampling.max_new_tokens or set pairs.set_aside_truncated=false.")


def run(cfg: PipelineConfig, lm_factory: Callable[[], LM], inputs: list[dict[str, Any]], inputs_fp: str,
        model_fp: str, allow_changed: bool = False) -> Stage:
    """Sample pairs for the prompt rows of the kinds in `pairs.kinds`, here or on Ray workers
    (`ray.enabled`). `model_fp` identifies the policy's weights (the SL-CAI stage's fingerprint when
    it is this run's model)."""
    prompts = [r for r in inputs if r["kind"] in cfg.pairs.kinds]
    settings = plain({"pairs": cfg.pairs, "seed": cfg.seed, "inputs": inputs_fp, "model": model_fp})
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)
    work = functools.partial(pair_chunk, cfg=cfg.pairs, seed=cfg.seed)
    run_chunks(stage, prompts, work, lm_factory, cfg.ray, chunk_size=cfg.pairs.chunk_size, count=count,
               unit="prompt", refuse=all_set_aside)
    return stage
