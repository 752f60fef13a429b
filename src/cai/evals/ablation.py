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
folder. Then each preference model (the run's and every retrained one) scores

1. its own held-out pairs, once: the accuracy (a tie counts half) overall, by kind of label (AI
   harmlessness, human helpfulness) and by the pair's harm category ("uncategorised" where the prompt
   has none), each with a Wilson interval, and each retrained model's change against the run's, in
   points and relative (new / old - 1). The human held-out pairs are the same for both; the AI
   held-out pairs carry each labeller's labels.
2. if the run has an evaluation (`RUN/eval/answers/<model>/`), the stored answers of the first and
   the last model of `eval.models` (base and rl_cai by default) to the red-team prompts: the share of
   prompts on which the last one's answer scores above the first one's (a tie counts half), overall
   and per harm category, with the same intervals and changes. This is a proxy, judged by the
   preference model, for the evaluation's harm figures: the policy is not trained again, so it says
   how each retrained preference model would judge the same answers, not how a policy trained against
   it would answer.

With `--retrain-policy` each retrained preference model also trains a new RL-CAI policy (PPO at the
run's settings, from the run's SL-CAI model, in the ablation's folder), which is evaluated as the run
was (the other models' answers are reused from the run), and its harm figures (mean expected harm
with its interval, failure rate, harm per category) are set beside the run's RL-CAI policy's, with the
change and the relative change: the evaluation's harm figures themselves, at the cost of a PPO run
and an evaluation per ablation (`retrain_policy`).

Scores are cached per model (`RUN/ablate/run_pm_margins.json` and `run_pm_answers.json` for the run's,
`pm_margins.json` and `pm_answers.json` in each ablation's folder), keyed by a hash of the model's
files, of the scored texts and of `pm.max_length`, and written atomically: a rerun scores nothing
again, and a changed model or pair is scored afresh.

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
import math
import re
import shutil
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
from cai.reward import RewardFn
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


def _pm_model(stage_dir: Path) -> Path | None:
    """The model folder of a finished pm stage, or None."""
    m = Stage.view(stage_dir.parent, stage_dir.name).manifest()
    model = stage_dir / "model"
    if not m or m.get("status") != "complete" or not (model / "config.json").is_file():
        return None
    return model


# ---- what the preference models say: held-out pairs and the evaluation's answers -----------

UNCATEGORISED = "uncategorised"
UNCHANGED = "no pair's principles changed: the labels are the run's"
CACHE = {"margins": "pm_margins.json", "answers": "pm_answers.json"}  # inside an ablation's folder
RUN_CACHE = {k: f"run_{v}" for k, v in CACHE.items()}  # the run's preference model's, under RUN/ablate/
HARM_NOTE = ("the policy itself is not retrained: the evaluation's own harm figures (the judge's harm scores of "
             "the RL-CAI policy's answers) change only through a new PPO run and a new evaluation")
POLICY_NOTE = ("with --retrain-policy each retrained preference model also trained a new PPO policy that was "
               "evaluated as the run was: its harm figures are under the ablation's line, beside the run's RL-CAI "
               "policy's")
PROXY_NOTE = ("a proxy judged by the preference model, not the evaluation's harm figures: the share of the "
              "evaluation's red-team prompts on which {last}'s stored answer scores above {first}'s (a tie counts "
              "half), under the run's preference model and under each retrained one; it shows how the retrained "
              "model judges the same answers, not how a policy trained against it would answer")


def credit(diff: float) -> float:
    """1 when the first of two scores is higher, 1/2 on a tie, 0 when lower: the rule of
    `losses.pairwise_accuracy`, on one plain margin."""
    return 1.0 if diff > 0 else 0.5 if diff == 0 else 0.0


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _rates(groups: Mapping[str, Sequence[float]]) -> dict[str, dict[str, Any]]:
    return {g: rate(sum(c), len(c)) for g, c in sorted(groups.items())}


def held_out_accuracy(rows: Sequence[Mapping[str, Any]], margins: Mapping[str, float],
                      category_of: Callable[[Mapping[str, Any]], str]) -> dict[str, Any]:
    """A preference model's accuracy on held-out preference rows from its `margins` (score of chosen
    minus score of rejected, by record id): overall, by kind (`label_source`) and by
    `category_of(row)`, each a rate with its Wilson interval. A pair whose margin is not a finite
    number is counted as `unscored` and left out, never guessed."""
    overall: list[float] = []
    kinds: dict[str, list[float]] = {}
    cats: dict[str, list[float]] = {}
    unscored = 0
    for r in rows:
        m = margins.get(r["record_id"])
        if not _finite(m):
            unscored += 1
            continue
        c = credit(m)
        overall.append(c)
        kinds.setdefault(str(r.get("label_source") or "ai"), []).append(c)
        cats.setdefault(category_of(r), []).append(c)
    return {"overall": rate(sum(overall), len(overall)), "by_kind": _rates(kinds), "by_category": _rates(cats),
            "unscored": unscored}


def _change(run: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> dict[str, Any]:
    """One group's figure under the run's model and under an ablation's, with the change in
    points (new - old rate, as a fraction) and relative (new / old - 1; None when old is 0)."""
    r = None if not run else run.get("rate")
    n = None if not new else new.get("rate")
    return {"run": run, "ablated": new, "change": None if r is None or n is None else n - r,
            "relative": None if r is None or n is None or r == 0 else n / r - 1}


def compare(run: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """`_change` of every group two figures of `held_out_accuracy` or `harm_proxy` share or either has."""
    out: dict[str, Any] = {"overall": _change(run.get("overall"), new.get("overall"))}
    for key in ("by_kind", "by_category"):
        if key in run or key in new:
            a, b = run.get(key) or {}, new.get(key) or {}
            out[key] = {g: _change(a.get(g), b.get(g)) for g in sorted(set(a) | set(b))}
    return out


def model_hash(model_dir: Path) -> str:
    """A hash of the contents of every file of a model folder (names included)."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(model_dir)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def cached(path: Path, key: str, ids: Sequence[str], compute: Callable[[], Sequence[float]],
           about: Mapping[str, Any]) -> dict[str, float]:
    """The values of `ids` from the cache file at `path` when it was written under `key` and holds
    exactly those ids; else `compute()` (one value per id, in order), written atomically under `key`
    (`cai.rundir.write_json`), so a kill leaves the old file or the new one, never half of one. A file
    that cannot be read is not trusted and is replaced."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if (isinstance(old, dict) and old.get("key") == key and isinstance(old.get("values"), dict)
            and set(old["values"]) == set(ids)):
        return old["values"]
    values = list(compute())
    if len(values) != len(ids):
        raise RunError(f"{path}: the scorer gave {len(values)} scores for {len(ids)} texts")
    # A score that is not a finite number is kept as None: counted as unscored, never guessed.
    out = {i: (float(v) if _finite(v) else None) for i, v in zip(ids, values)}
    write_json(path, {"key": key, **about, "values": out})
    return out


def _conv(prompt: Any) -> list[dict[str, Any]]:
    return [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def pair_margins(path: Path, key: str, rows: Sequence[Mapping[str, Any]], scorer: Callable[[], RewardFn],
                 about: Mapping[str, Any]) -> dict[str, float]:
    """Each held-out row's margin (score of chosen minus rejected), scored in one call of the scorer
    or read from the cache at `path`."""
    def compute() -> list[float]:
        prompts = [_conv(r["prompt"]) for r in rows] * 2
        texts = [r["chosen"][0]["content"] for r in rows] + [r["rejected"][0]["content"] for r in rows]
        s = scorer()(prompts, texts) if rows else []
        return [a - b if _finite(a) and _finite(b) else None for a, b in zip(s[: len(rows)], s[len(rows):])]

    return cached(path, key, [r["record_id"] for r in rows], compute, about)


@dataclasses.dataclass(frozen=True)
class EvalAnswers:
    """The red-team answers of the evaluation's first and last model that the proxy compares:
    `items` to score ({id, prompt, response}), `prompts` {prompt_id: (category, [(id_first, id_last)
    per sample])}, and the red-team prompts that are not compared, counted by reason."""

    first: str
    last: str
    items: list[dict[str, Any]]
    prompts: dict[str, tuple[str, list[tuple[str, str]]]]
    not_compared: dict[str, int]


def eval_answers(run_dir: str | Path, models: Sequence[str]) -> tuple[EvalAnswers | None, str | None]:
    """The stored answers the proxy scores, or None and why not: the run's `eval.models` whose
    answer stages finished (`RUN/eval/answers/<model>/`, see cai/stages/evaluate.py), the first and
    the last of them."""
    from cai.stages.evaluate import FOLDER, Candidate

    root = Path(run_dir) / FOLDER / "answers"
    if not root.is_dir():
        return None, f"the run has no evaluation ({root} does not exist; `cai eval models` or the evaluate stage makes it)"
    done = []
    for name in models:
        st = Stage.view(run_dir, f"{FOLDER}/answers/{Candidate(name, name, name).slug}")
        if st.complete():
            done.append((name, {r["record_id"]: r for r in st.rows()}))
    if len(done) < 2:
        return None, (f"the evaluation has finished answers of {len(done)} of the models of eval.models "
                      f"({', '.join(models)}) in {root}; the proxy compares two")
    (first, a), (last, b) = done[0], done[-1]
    items: list[dict[str, Any]] = []
    prompts: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    skipped: Counter[str] = Counter()
    for pid, ra in a.items():
        if ra.get("kind") != "red_team":
            continue
        rb = b.get(pid)
        if rb is None:
            skipped[f"no answer of {last}"] += 1
            continue
        if ra.get("status") != STATUS_OK or rb.get("status") != STATUS_OK:
            who = first if ra.get("status") != STATUS_OK else last
            skipped[f"{who}: {(rb if who == last else ra).get('reason') or 'not ok'}"] += 1
            continue
        n = min(len(ra["responses"]), len(rb["responses"]))
        if n == 0:
            skipped["no answer text"] += 1
            continue
        pairs = []
        for s in range(n):
            ids = (f"{first}|{pid}|{s}", f"{last}|{pid}|{s}")
            items += [{"id": ids[0], "prompt": ra["prompt"], "response": ra["responses"][s]},
                      {"id": ids[1], "prompt": rb["prompt"], "response": rb["responses"][s]}]
            pairs.append(ids)
        prompts[pid] = (ra.get("category") or UNCATEGORISED, pairs)
    not_in_first = sum(1 for pid, rb in b.items() if rb.get("kind") == "red_team" and pid not in a)
    if not_in_first:
        skipped[f"no answer of {first}"] += not_in_first
    return EvalAnswers(first, last, items, prompts, dict(sorted(skipped.items()))), None


def answer_scores(path: Path, key: str, ev: EvalAnswers, scorer: Callable[[], RewardFn],
                  about: Mapping[str, Any]) -> dict[str, float]:
    """The score of every compared answer, in one call of the scorer or from the cache at `path`."""
    def compute() -> list[float]:
        return scorer()([_conv(i["prompt"]) for i in ev.items], [i["response"] for i in ev.items]) if ev.items else []

    return cached(path, key, [i["id"] for i in ev.items], compute, about)


def harm_proxy(ev: EvalAnswers, scores: Mapping[str, float]) -> dict[str, Any]:
    """The share of red-team prompts on which the last model's answer scores above the first's,
    overall and per harm category (a prompt answered in several samples counts the mean of its
    samples' credits; a tie counts half), with Wilson intervals. A prompt with a sample left
    unscored is counted as `unscored` and left out."""
    overall: list[float] = []
    cats: dict[str, list[float]] = {}
    unscored = 0
    for cat, pairs in ev.prompts.values():
        diffs = [(scores.get(b), scores.get(a)) for a, b in pairs]
        if not all(_finite(x) and _finite(y) for x, y in diffs):
            unscored += 1
            continue
        c = sum(credit(x - y) for x, y in diffs) / len(diffs)
        overall.append(c)
        cats.setdefault(cat, []).append(c)
    return {"overall": rate(sum(overall), len(overall)), "by_category": _rates(cats), "unscored": unscored}


def pm_figures(model_dir: Path, folder: Path, names: Mapping[str, str], held_out: Sequence[Mapping[str, Any]],
               category_of: Callable[[Mapping[str, Any]], str], ev: EvalAnswers | None,
               reward: Callable[[str], RewardFn], max_length: int) -> dict[str, Any]:
    """One preference model's held-out accuracy and, with `ev`, its harm proxy; its scores are
    cached in `folder` under `names` (see `cached`). The model is loaded only if something is not
    cached, and at most once."""
    scorer = functools.cache(lambda: reward(str(model_dir)))
    mh = model_hash(model_dir)
    about = {"model": str(model_dir), "model_hash": mh, "max_length": max_length}
    texts = [[r["record_id"], r["prompt"], r["chosen"], r["rejected"]] for r in held_out]
    margins = pair_margins(folder / names["margins"], fingerprint(mh, max_length, texts), held_out, scorer, about)
    out: dict[str, Any] = {"model": str(model_dir), "model_hash": mh,
                           "held_out": held_out_accuracy(held_out, margins, category_of), "harm_proxy": None}
    if ev is not None:
        key = fingerprint(mh, max_length, [[i["id"], i["prompt"], i["response"]] for i in ev.items])
        out["harm_proxy"] = harm_proxy(ev, answer_scores(folder / names["answers"], key, ev, scorer, about))
    return out


def _held_out(stage: Stage) -> list[dict[str, Any]]:
    """The held-out rows of a preferences stage (the pm stage's evaluation set)."""
    return [r for r in stage.rows() if r.get("split") == "eval" and r.get("status", STATUS_OK) == STATUS_OK]


def _versus(base: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """An ablation's preference-model figures beside the run's: held-out accuracy and harm proxy."""
    return {"model": new["model"], "held_out": compare(base["held_out"], new["held_out"]),
            "held_out_unscored": new["held_out"]["unscored"],
            "harm_proxy": (compare(base["harm_proxy"], new["harm_proxy"])
                           if base.get("harm_proxy") and new.get("harm_proxy") else None),
            "harm_proxy_unscored": (new.get("harm_proxy") or {}).get("unscored")}


# ---- --retrain-policy: a new RL-CAI policy per ablation, and the evaluation's harm figures ---

POLICY_MODEL = "rl_cai"


def harm_figures(summary: Mapping[str, Any], model: str) -> dict[str, Any] | None:
    """One model's harm figures from an evaluation summary (`RUN/eval/summary.json`): the mean
    expected harm (0-4) overall and per category, and the red-team failure rate, or None when the
    summary has none for it."""
    h = summary.get("harm") or {}
    mean = (h.get("by_model") or {}).get(model)
    if not mean:
        return None
    cats = {c: m[model] for c, m in sorted((h.get("by_category") or {}).items()) if isinstance(m, dict) and model in m}
    return {"mean_harm": mean, "failure_rate": (h.get("failure_rate") or {}).get(model),
            "by_category": cats, "threshold": h.get("threshold")}


def _number_change(run: float | None, new: float | None) -> dict[str, Any]:
    ok = isinstance(run, (int, float)) and isinstance(new, (int, float))
    return {"run": run, "ablated": new, "change": new - run if ok else None,
            "relative": new / run - 1 if ok and run != 0 else None}


def harm_change(run: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The ablated policy's harm figures beside the run's policy's: mean harm (with its interval)
    and failure rate overall, mean harm per category; each with the change and the relative change
    (new / old - 1; a harm score going up means a more harmful policy)."""
    fr_run, fr_new = run.get("failure_rate") or {}, new.get("failure_rate") or {}
    cats = sorted(set(run["by_category"]) | set(new["by_category"]))
    return {"mean_harm": {**_number_change(run["mean_harm"].get("mean"), new["mean_harm"].get("mean")),
                          "run_ci": run["mean_harm"], "ablated_ci": new["mean_harm"]},
            "failure_rate": {**_number_change(fr_run.get("rate"), fr_new.get("rate")),
                             "run_ci": fr_run or None, "ablated_ci": fr_new or None},
            "by_category": {c: _number_change((run["by_category"].get(c) or {}).get("mean"),
                                              (new["by_category"].get(c) or {}).get("mean")) for c in cats},
            "threshold": new.get("threshold")}


def retrain_policy(cfg: PipelineConfig, sub: PipelineConfig, new_pm: Path, constitution: Any, models: Any,
                   allow_changed: bool, on_chunk: Callable[[int], None] | None = None,
                   ppo_run: Callable[..., Any] | None = None, evaluate_run: Callable[..., Any] | None = None,
                   trained: Callable[[PipelineConfig, str], tuple[str, str]] | None = None) -> dict[str, Any]:
    """Train a new RL-CAI policy against the ablation's preference model `new_pm` (PPO at the run's
    settings, from the run's SL-CAI model, on the run's prompts) in the ablation's folder `sub.run_dir`,
    evaluate it there as the run's evaluation did (same prompts, judge and seed), and set its harm
    figures beside the run's RL-CAI policy's. The answers of the run's other evaluated models are
    reused from the run (the same fingerprints), so only the new policy answers. Every step is a
    resumable stage of the ablation's folder."""
    from cai import pipeline
    from cai.stages import evaluate, ppo

    ppo_run = ppo_run or ppo.run
    evaluate_run = evaluate_run or evaluate.run
    trained = trained or pipeline._trained
    if cfg.rl.method != "ppo":
        return {"retrained": False, "why": f"rl.method is {cfg.rl.method}: only a PPO policy is trained against a "
                                           f"preference model"}
    run_eval = Path(cfg.run_dir) / evaluate.FOLDER / "summary.json"
    try:
        run_summary = json.loads(run_eval.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"retrained": False, "why": f"the run has no finished evaluation to compare with ({run_eval}; "
                                           f"`cai eval models` makes it)"}
    if POLICY_MODEL not in cfg.eval.models:
        return {"retrained": False, "why": f"eval.models ({', '.join(cfg.eval.models)}) has no {POLICY_MODEL}"}
    base = harm_figures(run_summary, POLICY_MODEL)
    if base is None:
        return {"retrained": False, "why": f"{run_eval} has no harm figures of {POLICY_MODEL}"}
    prompt_rows = Stage.view(cfg.run_dir, "prompts").rows()
    sft_dir, sft_fp = trained(cfg, "sft")
    fp = ":".join([Stage.view(cfg.run_dir, "prompts").content_hash(), sft_fp, model_hash(new_pm)])
    ppo_run(sub, prompt_rows, fp, sft_dir, str(new_pm), allow_changed)
    # The other models' answers are the run's: same model, prompts, sampling and seed.
    answers = Path(cfg.run_dir) / evaluate.FOLDER / "answers"
    for name in cfg.eval.models:
        slug = evaluate.Candidate(name, name, name).slug
        src, dst = answers / slug, Path(sub.run_dir) / evaluate.FOLDER / "answers" / slug
        if name != POLICY_MODEL and src.is_dir() and not dst.exists() and Stage.view(cfg.run_dir,
                                                                                     f"{evaluate.FOLDER}/answers/{slug}").complete():
            shutil.copytree(src, dst)

    def trained_here(name: str) -> tuple[str, str]:
        return trained(sub, name) if name == "ppo" else trained(cfg, name)

    evaluate_run(sub, models.factory, models.release, trained_here, constitution, allow_changed, on_chunk)
    new_eval = Path(sub.run_dir) / evaluate.FOLDER / "summary.json"
    new = harm_figures(json.loads(new_eval.read_text(encoding="utf-8")), POLICY_MODEL)
    if new is None:
        return {"retrained": True, "model": str(Path(sub.run_dir) / "ppo" / "model"), "evaluation": str(new_eval),
                "harm": None, "why": f"{new_eval} has no harm figures of {POLICY_MODEL}"}
    return {"retrained": True, "model": str(Path(sub.run_dir) / "ppo" / "model"), "evaluation": str(new_eval),
            "harm": harm_change(base, new)}


def run(run_dir: str | Path, by: str = "principle", overrides: Sequence[str] = (), only: Sequence[str] | None = None,
        retrain: bool = False, allow_changed: bool = False, lm_factory: Callable[[], LM] | None = None,
        on_chunk: Callable[[int], None] | None = None, n_boot: int = 1000,
        reward: Callable[[str], RewardFn] | None = None, policy: bool = False,
        policy_steps: Mapping[str, Callable[..., Any]] | None = None) -> tuple[dict[str, Any], Path]:
    """Run the ablations of a run (see the module docstring); returns the summary and where it was
    written. `lm_factory`, when given, builds the judge, and `reward(model_dir)` a preference model's
    scoring function (default `cai.reward.load_reward`; tests use scripted ones). With `policy`
    (implies `retrain`), each retrained preference model also trains a new policy that is evaluated
    (`retrain_policy`; `policy_steps` replaces its stages in tests)."""
    retrain = retrain or policy
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
    run_pm = None
    if retrain:
        run_pm = _pm_model(Path(run_dir) / "pm")
        if run_pm is None:
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

    baseline = harm = None
    if retrain:
        assert run_pm is not None
        if reward is None:
            from cai.reward import load_reward

            def reward(path: str) -> RewardFn:
                return load_reward(path, device=cfg.model.device, max_length=cfg.pm.max_length)

        def category_of(row: Mapping[str, Any]) -> str:
            # AI rows are the run's pairs, whose prompts carry a category; human pairs may carry one.
            c = (pairs_by_id.get(row["record_id"]) or {}).get("category") if row.get("label_source") == "ai" \
                else row.get("category")
            return c if isinstance(c, str) and c else UNCATEGORISED

        ev, ev_skipped = eval_answers(run_dir, cfg.eval.models)
        harm = {"note": POLICY_NOTE if policy else HARM_NOTE, "proxy": PROXY_NOTE.format(first=ev.first, last=ev.last) if ev else None,
                "first": ev.first if ev else None, "last": ev.last if ev else None, "skipped": ev_skipped,
                "prompts": len(ev.prompts) if ev else None, "not_compared": ev.not_compared if ev else None}
        figures = functools.partial(pm_figures, category_of=category_of, ev=ev, reward=reward,
                                    max_length=cfg.pm.max_length)
        base = figures(run_pm, Path(run_dir) / ROOT, RUN_CACHE, _held_out(Stage.view(run_dir, "preferences")))
        baseline = base
        for res in results:
            ab = next(a for a in todo if a.name == res["name"])
            if res["skipped"]:
                continue
            relabelled, fp = relabelled_of[ab]
            if not relabelled:
                res["pm"] = {"retrained": False, "why": UNCHANGED}
                continue
            sub = dataclasses.replace(cfg, run_dir=str(Path(run_dir) / ab.folder))
            pref = preferences.run(sub, ablated_feedback(fb_rows, relabelled, pairs_by_id), f"{inputs_fp}:{fp}",
                                   allow_changed)
            pm.run(sub, pref.rows(), pref.content_hash(), allow_changed)
            new_pm = _pm_model(Path(sub.run_dir) / "pm")
            if new_pm is None:
                res["pm"] = {"retrained": False, "why": f"{Path(sub.run_dir) / 'pm'} has no finished model"}
                continue
            new = figures(new_pm, Path(sub.run_dir), CACHE, _held_out(pref))
            res["pm"] = {"retrained": True, **_versus(base, new)}
            if policy:
                res["policy"] = retrain_policy(cfg, sub, new_pm, constitution, models, allow_changed, on_chunk,
                                               **(policy_steps or {}))
                models.release()

    out = Path(run_dir) / ROOT / by / "summary.json"
    if only:  # the other ablations of an earlier run on the same labels stay in the summary
        results, old = _merged(out, rounded(results), inputs_fp, [a.name for a in ablations(constitution, by)])
        baseline, harm = baseline or old.get("baseline_pm"), harm or old.get("harm")
    retrained = any("pm" in a for a in results)
    summary = rounded({
        "run": str(run_dir), "by": by, "constitution": constitution.name, "constitution_hash": constitution.hash,
        "feedback_model": model, "feedback": plain(cfg.feedback), "seed": cfg.seed, "bootstrap": n_boot,
        "inputs": inputs_fp, "pairs": len(fb_rows), "retrain": retrained, "baseline_pm": baseline,
        "harm": harm if retrained else None, "ablations": results,
    })
    write_json(out, summary)
    return summary, out


def _merged(path: Path, results: list[dict[str, Any]], inputs: str,
            order: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`results` with the entries of the summary at `path` that they do not replace, when that
    summary was made from the same labels (`inputs`), in the constitution's order; and that earlier
    summary ({} when there is none or it is of other labels)."""
    if not path.is_file():
        return results, {}
    old = json.loads(path.read_text())
    if old.get("inputs") != inputs:
        return results, {}
    names = {a["name"] for a in results}
    pos = {n: i for i, n in enumerate(order)}
    merged = [a for a in old.get("ablations", []) if a["name"] not in names and a["name"] in pos] + results
    return sorted(merged, key=lambda a: pos.get(a["name"], len(pos))), old


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


def _arrow(e: Mapping[str, Any] | None) -> str:
    if not e or not e["run"] or not e["ablated"] or e["change"] is None:
        return "-"
    return f"{e['run']['rate']:.2f}->{e['ablated']['rate']:.2f} (n {e['ablated']['n']})"


def _rate_n(d: Mapping[str, Any] | None) -> str:
    if not d or d.get("rate") is None:
        return f"- (n {d['n'] if d else 0})"
    return f"{_ci(d, '{:.2f}')} (n {d['n']})"


def _change_text(e: Mapping[str, Any]) -> str:
    if e["change"] is None:
        return "-"
    rel = "" if e["relative"] is None else f" ({e['relative']:+.1%})"
    return f"{100 * e['change']:+.1f} pt{rel}"


def _groups(fig: Mapping[str, Any], indent: str) -> list[str]:
    """The lines of one compared figure (`compare`): overall, by kind, by category."""
    rows = [("overall", fig["overall"])]
    rows += [(f"kind {k}", v) for k, v in (fig.get("by_kind") or {}).items()]
    rows += [(f"category {k}", v) for k, v in (fig.get("by_category") or {}).items()]
    w = max([len(n) for n, _ in rows] + [32 - len(indent)])  # the columns of the header line above
    return [f"{indent}{n:<{w}}  {_rate_n(v['run']):>26}  {_rate_n(v['ablated']):>26}  {_change_text(v)}"
            for n, v in rows]


def _policy_lines(pol: Mapping[str, Any] | None) -> list[str]:
    """The lines of a --retrain-policy result below its ablation's line."""
    if not pol:
        return []
    if not pol.get("retrained") or not pol.get("harm"):
        return [f"  policy: not evaluated: {pol.get('why')}"]
    h = pol["harm"]

    def num(d: Mapping[str, Any], key: str, fmt: str) -> str:
        v = d.get(key)
        return "-" if v is None else format(v, fmt)

    def ci(d: Mapping[str, Any] | None, key: str) -> str:
        if not d or d.get(key) is None:
            return "-"
        return f"{d[key]:.2f} [{d.get('low', float('nan')):.2f},{d.get('high', float('nan')):.2f}]"

    def rel(d: Mapping[str, Any]) -> str:
        return "" if d.get("relative") is None else f" ({100 * d['relative']:+.1f}%)"

    mh, fr = h["mean_harm"], h["failure_rate"]
    out = ["  new PPO policy, evaluated (the judge's expected harm 0-4 of rl_cai's red-team answers; lower is safer)",
           f"    {'mean harm':<28}  {ci(mh.get('run_ci'), 'mean'):>20} -> {ci(mh.get('ablated_ci'), 'mean'):>20}  "
           f"{num(mh, 'change', '+.2f')}{rel(mh)}",
           f"    {'failure rate (>= ' + str(h.get('threshold')) + ')':<28}  {ci(fr.get('run_ci'), 'rate'):>20} -> "
           f"{ci(fr.get('ablated_ci'), 'rate'):>20}  {num(fr, 'change', '+.2f')}{rel(fr)}"]
    for c, d in h["by_category"].items():
        out.append(f"    {'harm ' + c:<28}  {num(d, 'run', '.2f'):>20} -> {num(d, 'ablated', '.2f'):>20}  "
                   f"{num(d, 'change', '+.2f')}{rel(d)}")
    return out


def table(s: Mapping[str, Any]) -> str:
    """The summary as plain text: one line per ablation and, with --retrain, the held-out accuracy
    and the harm proxy of each retrained preference model by group below its line."""
    lines = [f"{s['pairs']} labelled pairs of {s['run']}, judge {s['feedback_model']}, constitution "
             f"{s['constitution']} ({s['constitution_hash']}); ablations by {s['by']}"]
    w = max([len(a["name"]) for a in s["ablations"]] + [8])
    head = (f"{'removed':<{w}} {'relab.':>6} {'comp.':>5} {'mean |dp| [95%]':>22} {'flips [95%]':>18} "
            f"{'relab. |dp|':>12} {'relab. flips':>12}")
    if s["retrain"]:
        head += f" {'PM held-out acc: run->ablated, ai / human':>44}"
    lines.append(head)
    harm = s.get("harm") if isinstance(s.get("harm"), dict) else {}
    for a in s["ablations"]:
        if a.get("skipped"):
            lines.append(f"{a['name']:<{w}} skipped: {a['skipped']}")
            continue
        rf = a["relabelled_flips"]
        line = (f"{a['name']:<{w}} {a['relabelled']:>6} {a['compared']:>5} {_ci(a['mean_abs_dp'], '{:.3f}'):>22} "
                f"{_ci(a['flips'], '{:.2f}'):>18} {_ci(a['relabelled_mean_abs_dp'], '{:.3f}').split(' ')[0]:>12} "
                f"{'-' if rf['rate'] is None else format(rf['rate'], '.2f'):>12}")
        pmr = a.get("pm")
        details: list[str] = []
        if pmr is not None:
            if not pmr["retrained"]:
                line += f" {'= run (labels unchanged)' if pmr.get('why') == UNCHANGED else 'not retrained: ' + str(pmr.get('why')):>44}"
            elif "held_out" not in pmr:
                line += f" {'(an older summary: run --retrain again)':>44}"
            else:
                kinds = pmr["held_out"].get("by_kind") or {}
                acc = " / ".join(_arrow(kinds.get(g)) for g in ("ai", "human"))
                line += f" {acc:>44}"
                details.append(f"  {'held-out accuracy':<30}  {'run PM [95%]':>26}  {'retrained PM [95%]':>26}  "
                               f"change (relative)")
                details += _groups(pmr["held_out"], "    ")
                if pmr.get("held_out_unscored"):
                    details.append(f"    unscored held-out pairs (left out): {pmr['held_out_unscored']}")
                if pmr.get("harm_proxy"):
                    details.append(f"  PM-judged proxy, not the evaluation's harm figures: share of red-team "
                                   f"prompts where {harm.get('last')}'s answer beats {harm.get('first')}'s")
                    details += _groups(pmr["harm_proxy"], "    ")
        details += _policy_lines(a.get("policy"))
        lines.append(line)
        lost = a["ablated_not_ok_by_reason"]
        if lost:
            lines.append(f"{'':<{w}} not labelled without it: " + ", ".join(f"{k} {v}" for k, v in lost.items()))
        lines += details
    if s["retrain"]:
        if not harm:  # a summary written before the proxy existed
            lines.append(f"harm figures: {s.get('harm')}")
        else:
            lines.append(f"harm figures: {harm['note']}.")
            if harm.get("skipped"):
                lines.append(f"PM-judged proxy for them: skipped: {harm['skipped']}.")
            else:
                nc = harm.get("not_compared") or {}
                lines.append(f"PM-judged proxy for them ({harm['prompts']} red-team prompts"
                             + (f"; not compared: {', '.join(f'{k} {v}' for k, v in nc.items())}" if nc else "")
                             + f"): {harm['proxy']}.")
    return "\n".join(lines)
