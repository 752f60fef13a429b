"""Stage `sl_generate`: SL-CAI critique and revision (Bai et al. 2022, section 3).

For each red-team prompt the helpful model answers; then, for K rounds, a principle drawn by a
seeded RNG (fresh each round) asks it to critique its last answer and to revise it, with few-shot
worked examples in front. Every round's principle, critique and revision is kept. A degenerate
revision (empty, truncated, echoing the scaffold, the critique or the prompt, or unchanged) does
not replace the answer; it is recorded with its reason. Helpfulness prompts get ordinary answers
from the same model (zero rounds).

Records are processed in fixed chunks of `sl.chunk_size`, all steps of a chunk batched together,
and each finished chunk is appended to the run directory, so a killed run resumes at the next chunk.

    cai run configs/quickstart.yaml --to sl_generate
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from cai.config import PipelineConfig, SLConfig, fingerprint, plain
from cai.constitution import Constitution
from cai.lm.base import LM, Completion
from cai.records import STATUS_DROPPED, STATUS_OK, degenerate_reason, stable_seed
from cai.rundir import Stage

NAME = "sl_generate"


def _gen(lm: LM, convs: list[list[dict[str, str]]], sampling, seeds: list[int]) -> list[Completion]:
    return [c[0] for c in lm.generate(convs, sampling, n=1, seeds=seeds)] if convs else []


def process_chunk(rows: list[dict[str, Any]], lm: LM, constitution: Constitution, cfg: SLConfig,
                  seed: int, step: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """The SL-CAI core for one chunk of prompt rows: pure apart from the model calls.

    `step` is told which step starts ("responses", "round 1/4 critiques", ...), for progress display.
    """
    step("responses")
    init = _gen(lm, [[{"role": "user", "content": r["prompt"]}] for r in rows], cfg.response.at_round(0), [stable_seed(seed, r["record_id"], "response") for r in rows])
    out = []
    for r, c in zip(rows, init):
        out.append({
            **{k: r[k] for k in ("record_id", "kind", "prompt", "category", "source")},
            "init_response": c.text, "init_finish": c.finish_reason, "rounds": [],
            "current": c.text,
        })
    red = [o for o in out if o["kind"] == "red_team"]
    draws = {o["record_id"]: constitution.draw(seed, o["record_id"], cfg.rounds) for o in red}
    scaffold = constitution.scaffold_phrases()
    for k in range(cfg.rounds):
        pids = [draws[o["record_id"]][k] for o in red]
        step(f"round {k + 1}/{cfg.rounds} critiques")
        crit_msgs = [
            constitution.critique_messages([{"role": "user", "content": o["prompt"]}], o["current"], pid, cfg.few_shot)
            for o, pid in zip(red, pids)
        ]
        critiques = _gen(lm, crit_msgs, cfg.critique.at_round(k),
                         [stable_seed(seed, o["record_id"], "critique", k) for o in red])
        step(f"round {k + 1}/{cfg.rounds} revisions")
        rev_msgs = [constitution.revision_messages(m, c.text, pid) for m, c, pid in zip(crit_msgs, critiques, pids)]
        revisions = _gen(lm, rev_msgs, cfg.revision.at_round(k),
                         [stable_seed(seed, o["record_id"], "revision", k) for o in red])
        for o, pid, c, v in zip(red, pids, critiques, revisions):
            reason = degenerate_reason(v, o["current"], c.text, o["prompt"], scaffold)
            o["rounds"].append({
                "round": k + 1, "principle_id": pid,
                "critique": c.text, "critique_finish": c.finish_reason,
                "revision": v.text, "revision_finish": v.finish_reason,
                "status": STATUS_OK if reason is None else "degenerate", "reason": reason,
            })
            if reason is None:
                o["current"] = v.text
    for o in out:
        good = [rd["round"] for rd in o["rounds"] if rd["status"] == STATUS_OK]
        o["final_round"] = good[-1] if good else 0
        final = o.pop("current")
        if o["kind"] == "red_team" and cfg.rounds > 0:
            reason = None if good else o["rounds"][-1]["reason"]
        else:  # the training target is the initial response itself
            reason = "empty" if not final.strip() else "truncated" if o["init_finish"] == "length" else None
        o["status"], o["reason"] = (STATUS_OK, None) if reason is None else (STATUS_DROPPED, reason)
        o["messages"] = [{"role": "user", "content": o["prompt"]}, {"role": "assistant", "content": final}]
    return out


def chunks(rows: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


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


def run(cfg: PipelineConfig, lm_factory: Callable[[], LM], constitution: Constitution,
        inputs: list[dict[str, Any]], inputs_fp: str, allow_changed: bool = False,
        on_chunk: Callable[[int], None] | None = None) -> Stage:
    settings = plain({"sl": cfg.sl, "model": cfg.model, "seed": cfg.seed,
                      "constitution_hash": constitution.hash, "inputs": inputs_fp})
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)
    done = stage.done_ids()
    todo_chunks = [c for c in chunks(inputs, cfg.sl.chunk_size) if any(r["record_id"] not in done for r in c)]
    stage.write_manifest("running", count(stage.rows()), constitution_hash=constitution.hash)
    if todo_chunks:
        lm = lm_factory()
        extra = {"constitution_hash": constitution.hash, "model": lm.name, "seed": cfg.seed}
        bar = tqdm(total=len(inputs), initial=len(done & {r["record_id"] for r in inputs}),
                   desc="sl_generate", unit="prompt")
        for i, chunk in enumerate(todo_chunks):
            todo = [r for r in chunk if r["record_id"] not in done]
            done_rows = process_chunk(todo, lm, constitution, cfg.sl, cfg.seed,
                                      step=lambda s, i=i: bar.set_postfix_str(f"chunk {i + 1}/{len(todo_chunks)}: {s}"))
            stage.append({**row, **extra} for row in done_rows)
            bar.update(len(todo))
            if on_chunk is not None:
                on_chunk(i)
        bar.close()
    rows = stage.rows()
    stage.write_manifest("complete", count(rows), constitution_hash=constitution.hash)
    return stage
