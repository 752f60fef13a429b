"""How much each principle (or category) decides: relabel a run's pairs without it, and optionally
retrain the preference model on those labels.

For each ablation (one per preference principle of the run's constitution, or one per category
with `--by category`), every pair of the run's feedback stage gets the principles the feedback
stage would have drawn for it had the removed ones not been there: the pair's own seeded sequence
of draws (`Constitution.draw`) with the removed ids skipped, so a pair that never drew them keeps
its principles, and one that did gets the next principle of its own sequence in their place. (Drawing
afresh from the smaller constitution would reshuffle every pair and mix the removal's effect with
sampling noise.) With fixed `feedback.principle_ids` the removed ids are dropped from the list.
An ablation that leaves a pair no principle at all is skipped and says so.

Only the pairs whose principles change are relabelled. They go to the run's judge (`cai.judge.label`,
the run's `feedback.*` settings, seed and feedback model) under the principles they were not asked
under yet; the entries of the principles they keep are the stored ones the feedback stage computed
with the same settings, and the label is recombined by the judge's own rule (`cai.judge.combine`).
The label change is reported against the run's labels over the pairs both label (soft: mean
|p_ablated - p_run| with a seeded bootstrap interval; hard: the share whose chosen response flips,
Wilson interval), over all pairs and over the relabelled ones. Pairs the run or the ablation could
not label are counted by reason and left out, never imputed.

With `--retrain` each ablation whose labels changed builds its training mix with the `preferences`
stage and trains a preference model with the `pm` stage, both at the run's settings, inside its own
folder, and reports the held-out accuracy (overall, AI, human) beside the run's preference model.
The human held-out pairs are the same for both; the AI held-out pairs carry each labeller's labels.

Everything is resumable and fingerprinted under `RUN/ablate/<by>/<name>/`: `relabel/` (chunked
rows, `cai/stages/chunked.py`), `preferences/` and `pm/` (checkpoints), so a kill loses nothing and
a rerun reuses finished work; the summary goes to `RUN/ablate/<by>/summary.json`.

    cai eval ablate runs/quickstart                              # one ablation per principle
    cai eval ablate runs/quickstart --by category --retrain      # per category, with new preference models
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cai.config import ConfigError, FeedbackConfig, PipelineConfig, fingerprint, load_config, plain
from cai.constitution import CATEGORIES, Constitution
from cai.evals.attribution import RunError, feedback_rows, run_config, run_constitution
from cai.evals.suite import mean_ci, rate, rounded
from cai.judge import Comparison, combine, label
from cai.lm.base import LM
from cai.records import STATUS_ABSTAIN, STATUS_FAILED, STATUS_OK
from cai.rundir import Stage, write_json

ROOT = "ablate"
BY = ("principle", "category")
# What an ablation must share with the run it measures: its judge and its preference-model settings.
FIXED = ("constitution", "seed", "feedback", "preferences", "pm")


@dataclasses.dataclass(frozen=True)
class Ablation:
    """One ablation: `removed` preference principle ids, named after the principle or category."""

    by: str
    name: str
    removed: tuple[str, ...]

    @property
    def folder(self) -> str:
        """Its folder in the run: `ablate/<by>/<name>` (a name that is not a safe folder name gets
        a short hash of itself)."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("._")[:48]
        if slug != self.name:
            slug = f"{slug}-{hashlib.sha256(self.name.encode()).hexdigest()[:8]}"
        return f"{ROOT}/{self.by}/{slug}"


def ablations(constitution: Constitution, by: str, only: Sequence[str] | None = None) -> list[Ablation]:
    """One ablation per preference principle (`by` = principle) or per category that has
    preference principles (`by` = category), in the constitution's order; `only` keeps the named ones."""
    if by == "principle":
        out = [Ablation(by, p.id, (p.id,)) for p in constitution.preference]
    elif by == "category":
        out = [Ablation(by, c, tuple(p.id for p in constitution.preference if p.category == c)) for c in CATEGORIES]
        out = [a for a in out if a.removed]
    else:
        raise ValueError(f"--by must be one of {', '.join(BY)}, not {by!r}")
    if only:
        names = {a.name for a in out}
        bad = [n for n in only if n not in names]
        if bad:
            raise ValueError(f"--only: {', '.join(map(repr, bad))} not a {by} of constitution {constitution.name!r} "
                             f"(have: {', '.join(a.name for a in out)})")
        out = [a for a in out if a.name in set(only)]
    return out


# ---- the draw without the removed principles (pure) -----------------------------------------


def ablated_draw(constitution: Constitution, seed: int, record_id: str, k: int, removed: Sequence[str]) -> list[str]:
    """The `k` principles the feedback stage draws for `record_id` with the `removed` ones skipped:
    its own sequence of draws, in order, without them. A record whose first `k` draws hold none of
    them keeps exactly those. Empty when nothing is left."""
    pool = [p.id for p in constitution.preference]
    if not set(pool) - set(removed):
        return []
    # `draw` goes pass by pass through shuffles of the whole pool, and a longer draw starts with the
    # shorter one; k passes hold at least k kept ids.
    seq = constitution.draw(seed, record_id, k * len(pool), kind="preference")
    return [p for p in seq if p not in set(removed)][:k]


def principles_left(constitution: Constitution, cfg: FeedbackConfig, seed: int, record_id: str,
                    removed: Sequence[str]) -> list[str]:
    """A record's principles under an ablation: the fixed `principle_ids` without the removed ones,
    or its draw without them (`ablated_draw`)."""
    if cfg.principle_ids:
        return [p for p in cfg.principle_ids if p not in set(removed)]
    return ablated_draw(constitution, seed, record_id, cfg.principles, removed)


def leaves_nothing(constitution: Constitution, cfg: FeedbackConfig, removed: Sequence[str]) -> bool:
    """Whether the ablation leaves the judge no principle to ask under."""
    ids = cfg.principle_ids or [p.id for p in constitution.preference]
    return not set(ids) - set(removed)


# ---- relabelling ----------------------------------------------------------------------------


def relabel_chunk(lm: LM, records: list[dict[str, Any]], on_call: Callable[[], None] | None, *,
                  constitution: Constitution, cfg: FeedbackConfig, seed: int) -> list[dict[str, Any]]:
    """Relabel a chunk of pairs under their ablated principles: each record holds its `principle_ids`
    (ablated) and `kept` (the stored entries of the principles it keeps); the judge is asked only
    under the others, and the label is `combine` of the entries in `principle_ids` order."""
    need = [[p for p in dict.fromkeys(r["principle_ids"]) if p not in r["kept"]] for r in records]
    ask = [i for i, n in enumerate(need) if n]
    comps = [Comparison(records[i]["record_id"], ({"role": "user", "content": records[i]["prompt"]},),
                        tuple(records[i]["responses"])) for i in ask]
    labs = label(lm, constitution, comps, cfg, seed, on_call=on_call, draws=[need[i] for i in ask]) if ask else []
    fresh = {i: {e["principle_id"]: e for e in lab["orders"]} for i, lab in zip(ask, labs)}
    out = []
    for i, r in enumerate(records):
        entries = {**r["kept"], **fresh.get(i, {})}
        orders = [entries[p] for p in r["principle_ids"]]
        status, reason, p = combine(orders, cfg)
        out.append({"record_id": r["record_id"], "principle_ids": r["principle_ids"], "asked": need[i],
                    "orders": orders, "status": status, "reason": reason, "p_first": p,
                    "run_p_first": r["run_p_first"], "run_status": r["run_status"], "feedback_model": lm.name})
    return out


def count(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The relabel manifest's counts."""
    not_ok = Counter(f"{r['status']}:{r['reason']}" for r in rows if r["status"] != STATUS_OK)
    return {"rows": len(rows), "ok": sum(r["status"] == STATUS_OK for r in rows),
            "abstain": sum(r["status"] == STATUS_ABSTAIN for r in rows),
            "failed": sum(r["status"] == STATUS_FAILED for r in rows),
            "not_ok_by_reason": dict(sorted(not_ok.items())),
            "asked": sum(len(r["asked"]) for r in rows)}


def to_relabel(fb_rows: Sequence[Mapping[str, Any]], pairs_by_id: Mapping[str, Mapping[str, Any]],
               constitution: Constitution, cfg: FeedbackConfig, seed: int, removed: Sequence[str],
               where: str = "pairs") -> list[dict[str, Any]]:
    """The records of the pairs whose principles the ablation changes, with what relabelling needs."""
    out = []
    for r in fb_rows:
        left = principles_left(constitution, cfg, seed, r["record_id"], removed)
        if left == list(r["principle_ids"]):
            continue
        pair = pairs_by_id.get(r["record_id"])
        if pair is None:
            raise RunError(f"{where}: no pair with record_id {r['record_id']!r}, which the feedback stage labelled")
        kept = {e["principle_id"]: e for e in r["orders"] if e["principle_id"] not in set(removed)}
        out.append({"record_id": r["record_id"], "prompt": pair["prompt"], "responses": list(pair["responses"]),
                    "principle_ids": left, "kept": kept, "run_p_first": r["p_first"], "run_status": r["status"]})
    return out


# ---- the label change (pure) --------------------------------------------------------------


def chosen_first(p: float) -> bool:
    """Whether response 1 is the chosen one for label `p` (the feedback stage's rule: ties go to it)."""
    return p >= 0.5


def effect(fb_rows: Sequence[Mapping[str, Any]], relabelled: Mapping[str, Mapping[str, Any]], n_boot: int,
           seed: int, top: int = 3) -> dict[str, Any]:
    """The label change of an ablation against the run: over the pairs both label, the mean |dp|
    and the hard flip rate, for all pairs and for the relabelled ones, and the pairs that moved most."""
    dps: list[float] = []
    flips: list[bool] = []
    moved: list[dict[str, Any]] = []
    run_not_ok = 0
    lost: Counter[str] = Counter()
    gained = 0
    for r in fb_rows:
        a = relabelled.get(r["record_id"])
        new = a if a is not None else r
        if r["status"] != STATUS_OK:
            run_not_ok += 1
            gained += new["status"] == STATUS_OK
            continue
        if new["status"] != STATUS_OK:
            lost[f"{new['status']}:{new['reason']}"] += 1
            continue
        dp = abs(new["p_first"] - r["p_first"])
        flip = chosen_first(new["p_first"]) != chosen_first(r["p_first"])
        dps.append(dp)
        flips.append(flip)
        if a is not None:
            moved.append({"record_id": r["record_id"], "run": r["p_first"], "ablated": new["p_first"], "dp": dp,
                          "flip": flip, "principles": [list(r["principle_ids"]), list(new["principle_ids"])]})
    moved.sort(key=lambda d: (-d["dp"], d["record_id"]))
    rel = [(m["dp"], m["flip"]) for m in moved]
    return {
        "pairs": len(fb_rows), "relabelled": len(relabelled), "compared": len(dps),
        "run_not_ok": run_not_ok, "ablated_not_ok_by_reason": dict(sorted(lost.items())),
        "labelled_only_by_ablation": gained,
        "mean_abs_dp": mean_ci(dps, n_boot, seed), "flips": rate(sum(flips), len(flips)),
        "relabelled_mean_abs_dp": mean_ci([d for d, _ in rel], n_boot, seed),
        "relabelled_flips": rate(sum(f for _, f in rel), len(rel)),
        "moved_most": moved[:top],
    }


def ablated_feedback(fb_rows: Sequence[Mapping[str, Any]], relabelled: Mapping[str, Mapping[str, Any]],
                     pairs_by_id: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The run's feedback rows with the relabelled pairs' labels in place (the `preferences`
    stage's input), as the feedback stage writes them."""
    from cai.stages.feedback import preference_row

    out = []
    for r in fb_rows:
        a = relabelled.get(r["record_id"])
        if a is None:
            out.append(dict(r))
            continue
        row = preference_row(pairs_by_id[r["record_id"]], a)
        out.append({**row, **{k: r.get(k) for k in ("constitution_hash", "seed")},
                    "feedback_model": a["feedback_model"]})
    return out


# ---- the command ----------------------------------------------------------------------------


def ablation_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """The run's saved config with `overrides` laid over it, `run_dir` set to `run_dir`. Overrides
    may change how the judge runs (model.*, ray.*), not what decides the labels or the preference
    model (`FIXED`): the ablation measures the run's own."""
    base = run_config(run_dir)
    cfg = load_config(Path(run_dir) / "config.yaml", list(overrides))
    changed = [k for k in FIXED if getattr(cfg, k) != getattr(base, k)]
    if changed:
        raise ConfigError(f"cai eval ablate relabels with the run's judge and retrains at its settings, so "
                          f"{', '.join(changed)} cannot be overridden (model.* and ray.* can)")
    return dataclasses.replace(cfg, run_dir=str(run_dir))


def _pm_eval(stage_dir: Path) -> dict[str, Any] | None:
    """The held-out accuracy (overall, ai, human) of a finished pm stage, or None."""
    m = Stage.view(stage_dir.parent, stage_dir.name).manifest()
    if not m or m.get("status") != "complete" or not m.get("eval"):
        return None
    return {g: (None if e is None else {"accuracy": e["accuracy"], "n": e["n"]}) for g, e in m["eval"].items()}


def _accuracy_change(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for g in ("overall", "ai", "human"):
        b, n = base.get(g), new.get(g)
        out[g] = {"run": b, "ablated": n,
                  "change": None if not b or not n else n["accuracy"] - b["accuracy"]}
        for k, e in (("run_ci", b), ("ablated_ci", n)):
            out[g][k] = None if not e else rate(e["accuracy"] * e["n"], e["n"])
    return out


HARM_NOTE = ("not measured: the evaluation's harm figures score the answers of the RL-CAI policy, which a new "
             "preference model changes only through a new PPO run and a new evaluation; --retrain stops at the "
             "preference model")


def run(run_dir: str | Path, by: str = "principle", overrides: Sequence[str] = (), only: Sequence[str] | None = None,
        retrain: bool = False, allow_changed: bool = False, lm_factory: Callable[[], LM] | None = None,
        on_chunk: Callable[[int], None] | None = None, n_boot: int = 1000) -> tuple[dict[str, Any], Path]:
    """Run the ablations of a run (see the module docstring); returns the summary and where it was
    written. `lm_factory`, when given, builds the judge (tests use a scripted one)."""
    from cai import pipeline
    from cai.stages import pm, preferences

    cfg = ablation_config(run_dir, overrides)
    constitution = run_constitution(run_dir)
    fb_rows, fb_stage = feedback_rows(run_dir)
    hashes = sorted({r.get("constitution_hash") for r in fb_rows if r.get("constitution_hash")})
    if hashes not in ([], [constitution.hash]):
        raise RunError(f"{Path(run_dir) / 'constitution.yaml'} (hash {constitution.hash}) is not the constitution "
                       f"the feedback rows were labelled with ({', '.join(hashes)}); relabelling under it would "
                       f"measure the edit as well as the ablation")
    pairs_stage = Stage.view(run_dir, "pairs")
    pairs_by_id = {p["record_id"]: p for p in pairs_stage.rows()}
    todo = ablations(constitution, by, only)
    baseline = None
    if retrain:
        baseline = _pm_eval(Path(run_dir) / "pm")
        if baseline is None:
            raise RunError(f"{Path(run_dir) / 'pm'}: --retrain compares with the run's preference model, and the run "
                           f"has no finished one (a run with rl.method dpo trains none)")
    model, _ = pipeline.policy_model(cfg, cfg.feedback.model)
    models = pipeline.Models(cfg, lm_factory)
    inputs_fp = f"{fb_stage.content_hash()}:{(fb_stage.manifest() or {}).get('fingerprint')}"
    work = functools.partial(relabel_chunk, constitution=constitution, cfg=cfg.feedback, seed=cfg.seed)

    results = []
    relabelled_of: dict[Ablation, tuple[dict[str, dict[str, Any]], str]] = {}
    for ab in todo:
        entry: dict[str, Any] = {"name": ab.name, "removed": list(ab.removed), "folder": ab.folder}
        if leaves_nothing(constitution, cfg.feedback, ab.removed):
            results.append({**entry, "skipped": "removes every principle the judge could ask under"})
            continue
        records = to_relabel(fb_rows, pairs_by_id, constitution, cfg.feedback, cfg.seed, ab.removed,
                             str(pairs_stage.rows_path))
        settings = plain({"removed": list(ab.removed), "feedback": cfg.feedback, "seed": cfg.seed,
                          "constitution_hash": constitution.hash, "inputs": inputs_fp})
        stage = Stage(run_dir, f"{ab.folder}/relabel", fingerprint(settings), settings, allow_changed)
        rows = run_chunks_for(stage, records, work, models.factory(model), cfg, on_chunk, ab)
        relabelled = {r["record_id"]: r for r in rows}
        relabelled_of[ab] = (relabelled, stage.content_hash())
        results.append({**entry, "skipped": None, **effect(fb_rows, relabelled, n_boot, cfg.seed)})
    models.release()  # the judge's memory, before any training

    if retrain:
        for res in results:
            ab = next(a for a in todo if a.name == res["name"])
            if res["skipped"]:
                continue
            relabelled, fp = relabelled_of[ab]
            if not relabelled:
                res["pm"] = {"retrained": False, "why": "no pair's principles changed: the labels are the run's"}
                continue
            sub = dataclasses.replace(cfg, run_dir=str(Path(run_dir) / ab.folder))
            pref = preferences.run(sub, ablated_feedback(fb_rows, relabelled, pairs_by_id), f"{inputs_fp}:{fp}",
                                   allow_changed)
            pm.run(sub, pref.rows(), pref.content_hash(), allow_changed)
            new = _pm_eval(Path(sub.run_dir) / "pm")
            res["pm"] = {"retrained": True, "accuracy": _accuracy_change(baseline, new) if new else None}

    out = Path(run_dir) / ROOT / by / "summary.json"
    if only:  # the other ablations of an earlier run on the same labels stay in the summary
        results, baseline = _merged(out, rounded(results), baseline, inputs_fp, [a.name for a in ablations(constitution, by)])
    retrained = any("pm" in a for a in results)
    summary = rounded({
        "run": str(run_dir), "by": by, "constitution": constitution.name, "constitution_hash": constitution.hash,
        "feedback_model": model, "feedback": plain(cfg.feedback), "seed": cfg.seed, "bootstrap": n_boot,
        "inputs": inputs_fp, "pairs": len(fb_rows), "retrain": retrained, "baseline_pm": baseline,
        "harm": HARM_NOTE if retrained else None, "ablations": results,
    })
    write_json(out, summary)
    return summary, out


def _merged(path: Path, results: list[dict[str, Any]], baseline: dict[str, Any] | None, inputs: str,
            order: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """`results` with the entries of the summary at `path` that they do not replace, when that
    summary was made from the same labels (`inputs`), in the constitution's order; and the baseline
    preference model's figures (this run's, else the earlier summary's)."""
    if not path.is_file():
        return results, baseline
    old = json.loads(path.read_text())
    if old.get("inputs") != inputs:
        return results, baseline
    names = {a["name"] for a in results}
    pos = {n: i for i, n in enumerate(order)}
    merged = [a for a in old.get("ablations", []) if a["name"] not in names and a["name"] in pos] + results
    return sorted(merged, key=lambda a: pos.get(a["name"], len(pos))), baseline or old.get("baseline_pm")


def run_chunks_for(stage: Stage, records: list[dict[str, Any]], work: Callable[..., list[dict[str, Any]]],
                   factory: Callable[[], LM], cfg: PipelineConfig, on_chunk: Callable[[int], None] | None,
                   ab: Ablation) -> list[dict[str, Any]]:
    """The relabel stage's rows: the shared chunk loop over the records still to do (a model is
    built only when some are left)."""
    from cai.stages.chunked import run_chunks

    return run_chunks(stage, records, work, factory, cfg.ray, chunk_size=cfg.feedback.chunk_size, count=count,
                      unit="pair", desc=f"ablate {ab.by} {ab.name}", stable_chunks=True,
                      manifest={"removed": list(ab.removed), "relabelled": len(records)}, on_chunk=on_chunk)


# ---- printing -------------------------------------------------------------------------------


def _ci(d: Mapping[str, Any] | None, fmt: str) -> str:
    if not d:
        return "-"
    v = d.get("mean", d.get("rate"))
    if v is None:
        return "-"
    return f"{fmt.format(v)} [{fmt.format(d['low'])},{fmt.format(d['high'])}]"


def _change(e: Mapping[str, Any]) -> str:
    if not e["run"] or not e["ablated"]:
        return "-"
    return f"{e['run']['accuracy']:.2f}->{e['ablated']['accuracy']:.2f} (n {e['ablated']['n']})"


def table(s: Mapping[str, Any]) -> str:
    """The summary as plain text: one line per ablation."""
    lines = [f"{s['pairs']} labelled pairs of {s['run']}, judge {s['feedback_model']}, constitution "
             f"{s['constitution']} ({s['constitution_hash']}); ablations by {s['by']}"]
    w = max([len(a["name"]) for a in s["ablations"]] + [8])
    head = (f"{'removed':<{w}} {'relab.':>6} {'comp.':>5} {'mean |dp| [95%]':>22} {'flips [95%]':>18} "
            f"{'relab. |dp|':>12} {'relab. flips':>12}")
    if s["retrain"]:
        head += f" {'PM held-out acc: run->ablated, ai / human':>44}"
    lines.append(head)
    for a in s["ablations"]:
        if a.get("skipped"):
            lines.append(f"{a['name']:<{w}} skipped: {a['skipped']}")
            continue
        rf = a["relabelled_flips"]
        line = (f"{a['name']:<{w}} {a['relabelled']:>6} {a['compared']:>5} {_ci(a['mean_abs_dp'], '{:.3f}'):>22} "
                f"{_ci(a['flips'], '{:.2f}'):>18} {_ci(a['relabelled_mean_abs_dp'], '{:.3f}').split(' ')[0]:>12} "
                f"{'-' if rf['rate'] is None else format(rf['rate'], '.2f'):>12}")
        pmr = a.get("pm")
        if pmr is not None:
            if not pmr["retrained"]:
                line += f" {'= run (labels unchanged)':>44}"
            elif pmr["accuracy"]:
                acc = " / ".join(_change(pmr["accuracy"][g]) for g in ("ai", "human"))
                line += f" {acc:>44}"
        lines.append(line)
        lost = a["ablated_not_ok_by_reason"]
        if lost:
            lines.append(f"{'':<{w}} not labelled without it: " + ", ".join(f"{k} {v}" for k, v in lost.items()))
    if s["retrain"]:
        lines.append(f"harm figures: {s['harm']}")
    return "\n".join(lines)
