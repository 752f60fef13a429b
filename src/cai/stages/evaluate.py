"""Stage `evaluate`: did it work? Held-out prompts, answered by each model, judged (Bai et al. 2022, section 4.4).

The models of `eval.models` (`base`, `sl_cai`, `rl_cai`, any model name or folder, or a JSONL file
of stored answers) answer the held-out red-team and helpfulness prompts of `eval.red_team` and
`eval.helpful` (the toolkit's own sets by default, disjoint from the training sets), then the judge
(`eval.judge`, default `feedback.model`, asked with the `feedback.*` settings through cai/judge.py)

1. compares every two models' answers to each prompt in both orders, under the harmlessness
   principles on red-team prompts and the helpfulness principles on helpfulness prompts;
2. scores each red-team answer's harm 0-4 (the distribution over the options "0".."4" after the
   constitution's rubric), and asks of every answer whether it explains or only refuses; the
   phrase detector (cai/evals/refusal.py) reads every answer too;
3. with a preference model (the run's, or `eval.reward_model`), scores every answer and the SL-CAI
   rows' initial answer and each revision round (the revision curve).

Everything lands in `<run>/eval/`: `answers/<model>/`, `judgements/`, `scores/` and `pm/`, each a
resumable, fingerprinted stage folder with rows and a manifest, then `summary.json` (ratings with
intervals, harm by category, failure, evasiveness and over-refusal rates, the judge card;
cai/evals/suite.py) and the umbrella `manifest.json`. The same config and seed give the same bytes.

    cai run configs/quickstart.yaml                      # ends with this stage (eval.enabled: true)
    cai eval models configs/quickstart.yaml eval.per_category=2
    cai show runs/quickstart
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cai.config import EvalConfig, FeedbackConfig, PipelineConfig, fingerprint, model_identity, plain
from cai.constitution import EVASION_OPTIONS, HARM_OPTIONS, Constitution
from cai.evals import suite
from cai.evals.refusal import classify
from cai.judge import Comparison, as_format, label, logprob_list, option_probs, resolve_format
from cai.lm.base import LM, BackendError
from cai.records import STATUS_ABSTAIN, STATUS_FAILED, STATUS_OK, stable_seed
from cai.rundir import Stage, atomic_write, write_json
from cai.sources import read_prompts
from cai.stages.chunked import run_chunks

NAME = "evaluate"
FOLDER = "eval"
STATUS_MISSING = "missing"  # a prompt a file of stored answers does not answer


class EvalError(ValueError):
    """An evaluation that cannot run as configured; the message names the setting or file."""


# ---- what is evaluated --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One model of `eval.models`: a model to run (`target` a name or folder) or a file of answers."""

    name: str
    target: str
    fingerprint: str
    answers_file: bool = False

    @property
    def slug(self) -> str:
        """A folder name for the model's answers: the name's last path part, made safe, with a short
        hash of the whole name when that is not the name itself."""
        s = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name.rstrip("/").split("/")[-1]).strip("._")[:48]
        return s if s == self.name else f"{s}-{hashlib.sha256(self.name.encode()).hexdigest()[:8]}"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def candidates(cfg: PipelineConfig, trained: Callable[[str], tuple[str, str]]) -> list[Candidate]:
    """The models of `eval.models`, resolved. `trained(stage)` gives the (model folder, fingerprint)
    of a finished training stage of this run (`pipeline._trained`)."""
    out = []
    for name in cfg.eval.models:
        if name == "base":
            out.append(Candidate(name, cfg.model.name, cfg.model.name))
        elif name == "sl_cai":
            out.append(Candidate(name, *trained("sft")))
        elif name == "rl_cai":
            out.append(Candidate(name, *trained(cfg.rl.method)))
        elif name.endswith((".jsonl", ".jsonl.gz")):
            p = Path(name)
            if not p.is_file():
                raise EvalError(f"eval.models: '{name}' looks like a file of answers, but there is no such file")
            out.append(Candidate(name, str(p), _file_hash(p), answers_file=True))
        else:
            out.append(Candidate(name, name, name))
    return out


def eval_prompts(cfg: EvalConfig) -> list[dict[str, Any]]:
    """The held-out prompts: red-team then helpfulness rows {record_id, kind, prompt, category,
    source}, at most `per_category` of each category and kind, in source order."""
    rows = []
    for kind, sources in (("red_team", cfg.red_team), ("helpful", cfg.helpful)):
        taken: Counter = Counter()
        for r in read_prompts(sources):
            cat = r["category"] if isinstance(r["category"], str) and r["category"] else None
            if cfg.per_category is not None and taken[cat] >= cfg.per_category:
                continue
            taken[cat] += 1
            rows.append({"record_id": r["record_id"], "kind": kind, "prompt": r["prompt"], "category": cat,
                         "source": r["source"]})
    seen: dict[str, str] = {}
    for r in rows:
        if r["record_id"] in seen:
            raise EvalError(f"eval: prompt id '{r['record_id']}' is used by {seen[r['record_id']]} and {r['source']}")
        seen[r["record_id"]] = r["source"]
    if not rows:
        raise EvalError("eval.red_team and eval.helpful hold no prompts")
    return rows


def _conv(prompt: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": prompt},)


# ---- answers ------------------------------------------------------------------------------


def answer_chunk(lm: LM, rows: list[dict[str, Any]], on_call: Callable[..., None] | None, *, sampling: Any,
                 samples: int, seed: int) -> list[dict[str, Any]]:
    """`samples` answers to each prompt, seeded per record (a resumed or re-chunked run draws the same)."""
    seeds = [stable_seed(seed, r["record_id"], "eval-answer") for r in rows]
    out = lm.generate([list(_conv(r["prompt"])) for r in rows], sampling, n=samples, seeds=seeds)
    if on_call is not None:
        on_call(sum(c.num_tokens for cs in out for c in cs))
    return [{**r, "model_name": lm.name, "responses": [c.text for c in cs], "finishes": [c.finish_reason for c in cs],
             "status": STATUS_OK, "reason": None} for r, cs in zip(rows, out)]


def _file_rows(path: Path) -> list[tuple[str, str | None, list[str]]]:
    """(prompt, category, responses) of each line of a file of stored answers; errors name the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{where}: expected an object")
            prompt = row.get("prompt")
            if prompt is None and isinstance(row.get("messages"), list):
                users = [m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
                prompt = users[-1] if users else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise EvalError(f"{where}: needs a 'prompt' string or 'messages' with a user turn")
            resp = row.get("responses", row.get("response"))
            if isinstance(resp, str):
                resp = [resp]
            if not isinstance(resp, list) or not resp or not all(isinstance(x, str) for x in resp):
                raise EvalError(f"{where}: needs 'response' (a string) or 'responses' (a non-empty list of strings)")
            cat = row.get("category")
            out.append((prompt.strip(), cat if isinstance(cat, str) else None, resp))
    return out


def file_answers(path: str, prompts: Sequence[dict[str, Any]], samples: int) -> tuple[list[dict[str, Any]], int]:
    """Answer rows from a file of stored answers, matched to the prompts by text (at most `samples`
    answers each), and how many of the file's lines answer no evaluated prompt. A prompt the file
    does not answer is a row with status `missing` (left out of every figure for this model)."""
    by_prompt: dict[str, list[str]] = {}
    for prompt, _, resp in _file_rows(Path(path)):
        by_prompt.setdefault(prompt, resp)
    wanted = {p["prompt"].strip() for p in prompts}
    rows = []
    for p in prompts:
        resp = by_prompt.get(p["prompt"].strip())
        rows.append({**p, "model_name": path, "responses": (resp or [])[:samples], "finishes": ["stop"] * len((resp or [])[:samples]),
                     "status": STATUS_OK if resp else STATUS_MISSING,
                     "reason": None if resp else "no answer in the file"})
    return rows, sum(k not in wanted for k in by_prompt)


def _answer_count(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rows": len(rows), "ok": sum(r["status"] == STATUS_OK for r in rows),
            "missing": sum(r["status"] == STATUS_MISSING for r in rows),
            "answers": sum(len(r["responses"]) for r in rows),
            "empty": sum(not t.strip() for r in rows for t in r["responses"]),
            "cut_off": sum(f == "length" for r in rows for f in r["finishes"])}


# ---- judgements ---------------------------------------------------------------------------


def comparisons(models: Sequence[str], prompts: Sequence[dict[str, Any]],
                answers: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per prompt, pair of models (in `models` order) and sample both answered."""
    out = []
    for p in prompts:
        pid = p["record_id"]
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                ra, rb = answers[a].get(pid), answers[b].get(pid)
                if not ra or not rb or ra["status"] != STATUS_OK or rb["status"] != STATUS_OK:
                    continue
                for s in range(min(len(ra["responses"]), len(rb["responses"]))):
                    out.append({"record_id": f"{pid}|{a}|{b}|{s}", "prompt_id": pid, "kind": p["kind"],
                                "category": p["category"], "prompt": p["prompt"], "a": a, "b": b, "sample": s,
                                "responses": [ra["responses"][s], rb["responses"][s]]})
    return out


def judge_chunk(lm: LM, rows: list[dict[str, Any]], on_call: Callable[..., None] | None, *,
                constitution: Constitution, cfg: FeedbackConfig, principles: dict[str, list[str]],
                seed: int) -> list[dict[str, Any]]:
    """The judge's soft label for each comparison, under the principles of its prompt's kind."""
    out: dict[str, dict[str, Any]] = {}
    for kind, pids in principles.items():
        part = [r for r in rows if r["kind"] == kind]
        if not part:
            continue
        comps = [Comparison(r["record_id"], _conv(r["prompt"]), tuple(r["responses"])) for r in part]
        for r, lab in zip(part, label(lm, constitution, comps, cfg, seed, principle_ids=pids, on_call=on_call)):
            out[r["record_id"]] = {**r, "judge": lm.name, "p_first": lab["p_first"], "status": lab["status"],
                                   "reason": lab["reason"], "principle_ids": lab["principle_ids"],
                                   "orders": lab["orders"]}
    return [out[r["record_id"]] for r in rows]


# ---- per-answer scores --------------------------------------------------------------------


def _distribution(logprobs: Sequence[float], min_mass: float) -> tuple[str, str | None, list[float] | None]:
    """(status, reason, normalised probabilities) of one scored option list."""
    try:
        logprobs = logprob_list(logprobs, len(HARM_OPTIONS))
    except ValueError:
        return STATUS_FAILED, "invalid_scores", None
    m = max(logprobs)
    z = [math.exp(x - m) for x in logprobs]
    probs = [x / sum(z) for x in z]
    if sum(math.exp(x) for x in logprobs) < min_mass:
        return STATUS_ABSTAIN, "low_option_mass", probs
    return STATUS_OK, None, probs


def score_chunk(lm: LM, rows: list[dict[str, Any]], on_call: Callable[..., None] | None, *,
                constitution: Constitution, min_mass: float, fmt: str = "auto") -> list[dict[str, Any]]:
    """Harm 0-4 (red-team answers), the evasion question in both option orders, and the refusal
    detector, for each answer; asked in the judge's `feedback.format` (`fmt`)."""
    fmt = resolve_format(lm, fmt)
    harm_at = [k for k, r in enumerate(rows) if r["kind"] == "red_team"]
    contexts = [as_format(constitution.harm_messages(_conv(rows[k]["prompt"]), rows[k]["response"]), fmt)
                for k in harm_at]
    harm = lm.score_options(contexts, [list(HARM_OPTIONS)] * len(contexts)) if contexts else []
    evasion_ctx = [as_format(constitution.evasion_messages(_conv(r["prompt"]), r["response"], swap=swap), fmt)
                   for r in rows for swap in (False, True)]
    evasion = lm.score_options(evasion_ctx, [list(EVASION_OPTIONS)] * len(evasion_ctx))
    if on_call is not None:
        on_call()
    if not (isinstance(harm, list) and isinstance(evasion, list) and len(harm) == len(contexts)
            and len(evasion) == len(evasion_ctx)):
        raise BackendError(f"{lm.name}: score_options answered the wrong number of results")
    out = []
    harm_of = dict(zip(harm_at, harm))
    for k, r in enumerate(rows):
        row = {**r, "judge": lm.name, "harm": None, "harm_probs": None, "harm_status": None, "harm_reason": None}
        if k in harm_of:
            status, reason, probs = _distribution(harm_of[k], min_mass)
            row.update(harm_status=status, harm_reason=reason, harm_probs=probs,
                       harm=sum(i * p for i, p in enumerate(probs)) if status == STATUS_OK else None)
        # Order 0 shows "explains" as (A); order 1 swaps the options, so a slot bias cancels.
        p_refuses, reason = [], None
        for swap, lp in zip((False, True), evasion[2 * k: 2 * k + 2]):
            try:
                pa, mass = option_probs(lp)
            except ValueError:
                reason = "invalid_scores"
                break
            if mass < min_mass:
                reason = reason or "low_option_mass"
            p_refuses.append(pa if swap else 1.0 - pa)
        status = STATUS_OK if reason is None else STATUS_FAILED if reason == "invalid_scores" else STATUS_ABSTAIN
        row.update(p_refuses=sum(p_refuses) / 2 if status == STATUS_OK else None, evasion_status=status,
                   evasion_reason=reason, evasion_orders=p_refuses,
                   refusal=classify(r["response"]) if r["response"].strip() else None)
        out.append(row)
    return out


def answer_records(models: Sequence[str], answers: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per model, prompt and sample answered."""
    return [{"record_id": f"{m}|{pid}|{s}", "model": m, "prompt_id": pid, "kind": r["kind"],
             "category": r["category"], "prompt": r["prompt"], "sample": s, "response": text}
            for m in models for pid, r in answers[m].items() if r["status"] == STATUS_OK
            for s, text in enumerate(r["responses"])]


def _count_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rows": len(rows), "harm_ok": sum(r["harm_status"] == STATUS_OK for r in rows),
            "evasion_ok": sum(r["evasion_status"] == STATUS_OK for r in rows),
            "not_ok": dict(sorted(Counter(f"{k}:{r[k + '_reason']}" for r in rows for k in ("harm", "evasion")
                                          if r[k + "_status"] not in (None, STATUS_OK)).items()))}


def _count_judgements(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rows": len(rows), "ok": sum(r["status"] == STATUS_OK for r in rows),
            "abstain": sum(r["status"] == STATUS_ABSTAIN for r in rows),
            "failed": sum(r["status"] == STATUS_FAILED for r in rows)}


# ---- the preference model's view ------------------------------------------------------------


def after_round(row: dict[str, Any], k: int) -> str:
    """An SL-CAI row's answer after round `k` (0: the initial answer): the last usable revision so far."""
    text = row["init_response"]
    for rd in row.get("rounds", []):
        if rd["round"] <= k and rd["status"] == STATUS_OK:
            text = rd["revision"]
    return text


def pm_view(reward: Any, models: Sequence[str], records: Sequence[dict[str, Any]], sl_rows: Sequence[dict[str, Any]],
            n_boot: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, summary part): `reward(prompts, responses)` scores every answer and, from the SL-CAI
    rows, each red-team prompt's answer after each round."""
    scores = reward([list(_conv(r["prompt"])) for r in records], [r["response"] for r in records]) if records else []
    rows = [{"record_id": r["record_id"], "model": r["model"], "kind": r["kind"], "score": s}
            for r, s in zip(records, scores)]
    red = [r for r in sl_rows if r.get("kind") == "red_team"]
    rounds = max((len(r.get("rounds", [])) for r in red), default=0)
    curve = []
    for k in range(rounds + 1 if red else 0):
        vals = reward([list(_conv(r["prompt"])) for r in red], [after_round(r, k) for r in red])
        rows += [{"record_id": f"sl|{r['record_id']}|{k}", "model": "sl_generate", "kind": "red_team", "round": k,
                  "score": v} for r, v in zip(red, vals)]
        curve.append({"round": k, **suite.mean_ci(vals, n_boot, seed)})
    by_model = {m: suite.mean_ci([r["score"] for r in rows if r["model"] == m], n_boot, seed) for m in models}
    return rows, {"by_model": by_model, "revision_curve": curve}


# ---- the stage ----------------------------------------------------------------------------


def judge_hash(cfg: PipelineConfig, judge: str, constitution: Constitution) -> str:
    """A hash of everything that decides the judge's answers: its model, constitution and settings."""
    return fingerprint(model_identity(dataclasses.replace(cfg.model, name=judge)), constitution.hash, cfg.feedback,
                       cfg.eval.harmless_principles, cfg.eval.helpful_principles)


def check_principles(cfg: EvalConfig, constitution: Constitution) -> None:
    have = {p.id for p in constitution.preference}
    for key in ("harmless_principles", "helpful_principles"):
        for pid in getattr(cfg, key):
            if pid not in have:
                raise EvalError(f"eval.{key}: '{pid}' is not a preference principle of constitution "
                                f"'{constitution.name}' (have: {', '.join(sorted(have))})")


def _judge_check(cfg: PipelineConfig, judge_lm: Callable[[], LM], constitution: Constitution, where: Path,
                 key: str) -> list[dict[str, Any]]:
    """The judge's accuracy on each `eval.judge_check` file (kept in `judge_check.json` under `key`)."""
    if not cfg.eval.judge_check:
        return []
    cached = json.loads(where.read_text()) if where.exists() else {}
    if cached.get("key") == key:
        return cached["files"]
    from cai.evals import labeller
    from cai.evals.stats import wilson
    from cai.sources import read_items

    sources = [s for f in cfg.eval.judge_check for s in read_items(f, "auto", cfg.seed, cfg.eval.judge_check_limit)]
    report = labeller.run(sources, judge_lm(), constitution, cfg.feedback, cfg.seed)
    files = []
    for f in report["files"]:
        ci = wilson(f["accuracy"] * f["answered"], f["answered"]) if f["accuracy"] is not None else None
        files.append({"file": f["file"], "n": f["answered"], "accuracy": f["accuracy"],
                      "low": ci[0] if ci else None, "high": ci[1] if ci else None,
                      "order_agreement": f["order_agreement"]})
    write_json(where, {"key": key, "files": files})
    return files


def run(cfg: PipelineConfig, factory: Callable[[str], Callable[[], LM]], release: Callable[[], None],
        trained: Callable[[str], tuple[str, str]], constitution: Constitution, allow_changed: bool = False,
        on_chunk: Callable[[int], None] | None = None, reward: Callable[[str], Any] | None = None) -> Stage:
    """Evaluate the models of `eval.models`. `factory(name)` gives a factory of the back-end over a
    model (one held at a time; `release()` frees it), `trained(stage)` a finished training stage's
    (model folder, fingerprint), `reward(path)` a preference model's scoring function (default:
    cai.reward.load_reward)."""
    ev = cfg.eval
    check_principles(ev, constitution)
    models = candidates(cfg, trained)
    names = [m.name for m in models]
    prompts = eval_prompts(ev)
    prompts_fp = fingerprint(prompts)
    root = Path(cfg.run_dir) / FOLDER

    # 1. answers, one model at a time
    answers: dict[str, dict[str, dict[str, Any]]] = {}
    answer_fps = []
    for m in models:
        settings = plain({"model": m.fingerprint, "answers_file": m.answers_file, "samples": ev.samples,
                          "sampling": None if m.answers_file else ev.sampling, "seed": cfg.seed, "prompts": prompts_fp})
        stage = Stage(cfg.run_dir, f"{FOLDER}/answers/{m.slug}", fingerprint(settings), settings, allow_changed)
        if m.answers_file:
            rows, unmatched = file_answers(m.target, prompts, ev.samples)
            stage.rows_path.unlink(missing_ok=True)
            stage.append(rows)
            stage.write_manifest("complete", {**_answer_count(rows), "unmatched_lines": unmatched}, model=m.name)
        else:
            work = functools.partial(answer_chunk, sampling=ev.sampling, samples=ev.samples, seed=cfg.seed)
            rows = run_chunks(stage, prompts, work, factory(m.target), cfg.ray, chunk_size=ev.chunk_size,
                              count=_answer_count, unit="prompt", desc=f"eval answers: {m.name}",
                              manifest={"model": m.name}, calls=lambda chunk: 1, on_chunk=on_chunk)
        answers[m.name] = {r["record_id"]: r for r in rows}
        answer_fps.append(stage.content_hash())

    # 2. pairwise judgements and 3. per-answer scores, by the judge
    judge = ev.judge or cfg.feedback.model
    jhash = judge_hash(cfg, judge, constitution)
    judge_settings = {"judge": jhash, "seed": cfg.seed, "answers": answer_fps}
    principles = {"red_team": ev.harmless_principles, "helpful": ev.helpful_principles}
    stage = Stage(cfg.run_dir, f"{FOLDER}/judgements", fingerprint(judge_settings), judge_settings, allow_changed)
    work = functools.partial(judge_chunk, constitution=constitution, cfg=cfg.feedback, principles=principles,
                             seed=cfg.seed)
    judgements = run_chunks(stage, comparisons(names, prompts, answers), work, factory(judge), cfg.ray,
                            chunk_size=ev.chunk_size, count=_count_judgements, unit="comparison",
                            desc="eval judgements", on_chunk=on_chunk)
    stage = Stage(cfg.run_dir, f"{FOLDER}/scores", fingerprint(judge_settings), judge_settings, allow_changed)
    work = functools.partial(score_chunk, constitution=constitution, min_mass=cfg.feedback.min_option_mass,
                             fmt=cfg.feedback.format)
    records = answer_records(names, answers)
    scores = run_chunks(stage, records, work, factory(judge), cfg.ray, chunk_size=ev.chunk_size,
                        count=_count_scores, unit="answer", desc="eval scores", on_chunk=on_chunk)
    checks = _judge_check(cfg, factory(judge), constitution, root / "judge_check.json",
                          fingerprint(jhash, ev.judge_check, ev.judge_check_limit, cfg.seed))
    release()

    # 4. the preference model's view
    pm_summary = None
    pm_path, pm_fp = ev.reward_model, ev.reward_model
    if pm_path is None and cfg.rl.method == "ppo":
        try:
            pm_path, pm_fp = trained("pm")
        except Exception:  # the run has no finished preference model: no PM view
            pm_path = None
    if pm_path is not None:
        sl = Stage.view(cfg.run_dir, "sl_generate")
        sl_rows = sl.rows() if sl.complete() else []
        settings = {"reward_model": pm_fp, "answers": answer_fps, "sl_generate": sl.content_hash() if sl_rows else None,
                    "seed": cfg.seed, "bootstrap": ev.bootstrap}
        stage = Stage(cfg.run_dir, f"{FOLDER}/pm", fingerprint(settings), settings, allow_changed)
        summary_path = stage.dir / "summary.json"
        if stage.complete() and summary_path.exists():
            pm_summary = json.loads(summary_path.read_text())
        else:
            if reward is None:
                from cai.reward import load_reward

                def reward(path: str) -> Any:
                    return load_reward(path, device=cfg.model.device)
            rows, pm_summary = pm_view(reward(pm_path), names, records, sl_rows, ev.bootstrap, cfg.seed)
            pm_summary = {"model": pm_path, **suite.rounded(pm_summary)}
            stage.rows_path.unlink(missing_ok=True)
            stage.append(rows)
            write_json(summary_path, pm_summary)
            stage.write_manifest("complete", {"rows": len(rows)})

    # 5. the summary
    card = {"judge": judge, "hash": jhash, "constitution": constitution.name, "constitution_hash": constitution.hash,
            "principles": principles, "format": plain(cfg.feedback), "accuracy": checks}
    summary = suite.summarise(names, prompts, {m: list(a.values()) for m, a in answers.items()}, judgements, scores,
                              pm_summary, card, ev.failure_threshold, ev.bootstrap, cfg.seed)
    atomic_write(root / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    settings = plain({"eval": ev, "judge": jhash, "seed": cfg.seed})
    top = Stage(cfg.run_dir, FOLDER, fingerprint(settings), settings, allow_changed=True)
    top.write_manifest("complete", {"models": len(names), "prompts": len(prompts), "judgements": len(judgements),
                                    "answers_scored": len(scores)}, summary=str(root / "summary.json"))
    return top
