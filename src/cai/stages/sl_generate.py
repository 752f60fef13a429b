"""Stage `sl_generate`: SL-CAI critique and revision (Bai et al. 2022, section 3).

For each red-team prompt the helpful model answers; then, for K rounds, a principle drawn by a
seeded RNG (fresh each round) asks it to critique its last answer and to revise it, with few-shot
worked examples in front. Every round's principle, critique and revision is kept. A degenerate
revision (empty, truncated, echoing the scaffold, the critique or the prompt, or unchanged) does
not replace the answer; it is recorded with its reason. Helpfulness prompts get ordinary answers
from the same model (zero rounds).

Records are processed in fixed chunks of `sl.chunk_size`, all steps of a chunk batched together,
and each finished chunk is appended to the run directory (cai/stages/chunked.py); within a chunk,
each finished step (an answer, critique or revision for every prompt of the chunk) goes to a
journal (cai/journal.py), so a killed run resumes at the step it was in and loses at most that one. With `ray.enabled` the chunks are spread over Ray workers (cai/cluster.py);
the rows are the same.

    cai run configs/quickstart.yaml --to sl_generate
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

from cai.config import PipelineConfig, SLConfig, fingerprint, model_identity, plain
from cai.constitution import Constitution
from cai.journal import FILE as JOURNAL
from cai.journal import Journal
from cai.lm.base import LM, OnCall, Program, run_programs
from cai.records import STATUS_DEGENERATE, STATUS_DROPPED, STATUS_OK, degenerate_reason, stable_seed
from cai.rundir import Stage
from cai.stages.chunked import run_chunks

NAME = "sl_generate"


def record_program(row: dict[str, Any], constitution: Constitution, cfg: SLConfig, seed: int,
                   scaffold: list[str]) -> Program:
    """One prompt's SL-CAI chain as a program: it asks for the answer, then for each round a
    critique and a revision, and fills in `row` (the audit record) as the answers come back."""
    rid = row["record_id"]
    user = [{"role": "user", "content": row["prompt"]}]
    c = yield user, cfg.response.at_round(0), stable_seed(seed, rid, "response")
    row.update(init_response=c.text, init_finish=c.finish_reason, rounds=[])
    current = c.text
    if row["kind"] != "red_team":
        return
    for k, pid in enumerate(constitution.draw(seed, rid, cfg.rounds)):
        crit_msgs = constitution.critique_messages(user, current, pid, cfg.few_shot)
        crit = yield crit_msgs, cfg.critique.at_round(k), stable_seed(seed, rid, "critique", k)
        rev = yield (constitution.revision_messages(crit_msgs, crit.text, pid), cfg.revision.at_round(k),
                     stable_seed(seed, rid, "revision", k))
        reason = degenerate_reason(rev, current, crit.text, row["prompt"], scaffold)
        row["rounds"].append({
            "round": k + 1, "principle_id": pid,
            "critique": crit.text, "critique_finish": crit.finish_reason,
            "revision": rev.text, "revision_finish": rev.finish_reason,
            "status": STATUS_OK if reason is None else STATUS_DEGENERATE, "reason": reason,
        })
        if reason is None:  # a degenerate revision does not replace the answer
            current = rev.text


def finalize(row: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Pick the training target (the last good revision) and the row's status."""
    good = [rd for rd in row["rounds"] if rd["status"] == STATUS_OK]
    row["final_round"] = good[-1]["round"] if good else 0
    final = good[-1]["revision"] if good else row["init_response"]
    if row["kind"] == "red_team" and rounds > 0:
        reason = None if good else row["rounds"][-1]["reason"]
    else:  # the training target is the initial response itself
        reason = "empty" if not final.strip() else "truncated" if row["init_finish"] == "length" else None
    row["status"], row["reason"] = (STATUS_OK, None) if reason is None else (STATUS_DROPPED, reason)
    row["messages"] = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": final}]
    return row


def process_chunk(rows: list[dict[str, Any]], lm: LM, constitution: Constitution, cfg: SLConfig,
                  seed: int, on_call: OnCall | None = None, journal: Journal | None = None) -> list[dict[str, Any]]:
    """The SL-CAI core for one chunk of prompt rows: pure apart from the model calls.

    Each prompt's chain runs as a program (`record_program`); the programs advance in lockstep, one
    batched call per step, unless the back-end interleaves them itself. `on_call` is called after
    each finished model call (for progress display). With a `journal` (cai/journal.py), finished
    calls are kept as they come and a resumed chunk starts after its last finished step.
    """
    out = [{k: r[k] for k in ("record_id", "kind", "prompt", "category", "source")} for r in rows]
    scaffold = constitution.scaffold_phrases()
    run_programs(lm, [record_program(o, constitution, cfg, seed, scaffold) for o in out], on_call, journal)
    return [finalize(o, cfg.rounds) for o in out]


def calls_per_chunk(rows: list[dict[str, Any]], rounds: int) -> int:
    return sum(1 + (2 * rounds if r["kind"] == "red_team" else 0) for r in rows)


def count(rows: list[dict[str, Any]]) -> dict[str, Any]:
    degenerate = Counter(rd["reason"] for r in rows for rd in r["rounds"] if rd["status"] != STATUS_OK)
    dropped = Counter(r["reason"] for r in rows if r["status"] == STATUS_DROPPED)
    return {
        "rows": len(rows),
        "red_team": sum(r["kind"] == "red_team" for r in rows),
        "helpful": sum(r["kind"] == "helpful" for r in rows),
        "ok": sum(r["status"] == STATUS_OK for r in rows),
        "dropped_by_reason": dict(sorted(dropped.items())),
        "degenerate_revisions_by_reason": dict(sorted(degenerate.items())),
        "rounds": sum(len(r["rounds"]) for r in rows),
    }


def generate_chunk(lm: LM, rows: list[dict[str, Any]], on_call: OnCall | None, *,
                   constitution: Constitution, cfg: SLConfig, seed: int,
                   journal: Journal | None = None) -> list[dict[str, Any]]:
    """One chunk's finished rows with their provenance, as a Ray worker or this process makes them."""
    extra = {"constitution_hash": constitution.hash, "model": lm.name, "seed": seed}
    return [{**row, **extra} for row in process_chunk(rows, lm, constitution, cfg, seed, on_call, journal)]


def run(cfg: PipelineConfig, lm_factory: Callable[[], LM], constitution: Constitution,
        inputs: list[dict[str, Any]], inputs_fp: str, allow_changed: bool = False,
        on_chunk: Callable[[int], None] | None = None) -> Stage:
    """Critique and revise the prompt rows chunk by chunk, here or on Ray workers (`ray.enabled`);
    `lm_factory` must pickle for Ray. `on_chunk(i)` follows each written chunk (tests use it)."""
    settings = plain({"sl": cfg.sl, "model": model_identity(cfg.model), "seed": cfg.seed,
                      "constitution_hash": constitution.hash, "inputs": inputs_fp})
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)
    # The journal keeps each finished step of a chunk, so a kill loses at most the step in flight
    # (not on Ray, whose workers need not share the run directory: there a kill loses the chunks
    # in flight).
    journal = None if cfg.ray.enabled else Journal(stage.dir / JOURNAL, stage.fingerprint)
    work = functools.partial(generate_chunk, constitution=constitution, cfg=cfg.sl, seed=cfg.seed, journal=journal)
    # Stable chunks: a resumed run batches each prompt with the same neighbours as an uninterrupted one.
    run_chunks(stage, inputs, work, lm_factory, cfg.ray, chunk_size=cfg.sl.chunk_size, count=count, unit="prompt",
               manifest={"constitution_hash": constitution.hash}, stable_chunks=True,
               calls=functools.partial(calls_per_chunk, rounds=cfg.sl.rounds), on_chunk=on_chunk)
    if journal is not None:
        journal.remove()
    return stage
