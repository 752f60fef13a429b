"""The behavioural diff of two constitutions: relabel a run's comparison pairs under each and
measure how far the labels move.

`cai constitution diff A B --pairs RUN` prints the textual diff (`cai.constitution.diff`) and then
this. The usable pairs of RUN's `pairs` stage (stages/pairs.py) are labelled by the feedback
stage's own core (`stages.feedback.process_chunk`, the judge of cai/judge.py) once under A and
once under B, with the run's feedback settings and seed (RUN/config.yaml, overridable with
key=value), and compared pair by pair on P(response 1 is better):

- soft flip: |p_A - p_B|; its mean, with a seeded bootstrap interval;
- hard flip: the label's side of 0.5 changed (an exact tie is a side of its own); the share of
  pairs, with a Wilson interval;

overall, by principle category (each category of the principles that labelled the pair under A
or B), by principle, and by harm category (the category of the pair's prompt, where it has one),
with the pairs that move most. A pair the judge abstains on or fails under either constitution is
counted by reason and left out of the rates, never imputed. Both labellings draw principles with
the same seed and record id and go through one memo of the judge's answers (`Memo`): a question
asked the same way under both is asked once, so a constitution diffed with itself flips nothing,
an edit to one principle moves only the pairs that principle labels (adding or removing principles
also changes which are drawn), and the second labelling costs only the questions the edit changed. This is the measured distance between two constitutions, and a prediction of what
an edit will change before anything is trained.

    cai constitution diff default mine.yaml --pairs runs/quickstart --limit 50

The report goes to `RUN/constitution_diff/<A>-vs-<B>/diff.json` (`default_out`; `--out FILE`
chooses another place), with the per-pair rows beside it, where the run report finds it.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cai.config import ConfigError, FeedbackConfig, PipelineConfig, Sampling, load_config, plain
from cai.constitution import Constitution
from cai.evals.stats import bootstrap_mean, wilson
from cai.lm.base import LM, Completion, Prompt
from cai.records import STATUS_OK
from cai.rundir import Stage, StageError, atomic_write, write_json
from cai.stages import feedback, pairs

# A probability this close to 0.5 is a tie (as in evals/labeller.py).
TIE = 1e-9
NO_CATEGORY = "(none)"
ROOT = "constitution_diff"  # under the run directory: one folder per diffed pair of constitutions


# ---- inputs -----------------------------------------------------------------------------------


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """The resolved config a run was made with (RUN/config.yaml), `overrides` laid over it."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; is {run_dir} a run directory (made by `cai run`)?")
    return load_config(path, list(overrides))


def run_pairs(run_dir: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The usable pairs (status ok) of a run's finished `pairs` stage, in file order; the first
    `limit` of them."""
    st = Stage.view(run_dir, pairs.NAME)
    m = st.manifest()
    if not m or m.get("status") != "complete":
        raise StageError(f"{st.dir}: the pairs stage has not completed in this run; run it first "
                         f"(`cai run CONFIG --to pairs`)")
    rows = [r for r in st.rows() if r.get("status") == STATUS_OK]
    if not rows:
        raise StageError(f"{st.rows_path}: no usable pairs (all {len(st.rows())} were set aside)")
    return rows[:limit] if limit is not None else rows


# ---- relabelling ------------------------------------------------------------------------------


class Memo:
    """The judge with a memory: a question (prompt and options, or prompt, sampling and seed) it
    was already asked is answered as it was the first time, and only new ones reach the model, in
    one call. Both constitutions are asked through one Memo, so a pair whose questions an edit
    leaves unchanged gets the same label under both: it cannot move, and it costs nothing the
    second time. Without it such pairs would still move a little, since a model in bf16 scores a
    prompt slightly differently in a batch of other prompts. `asked` and `reused` count the
    questions that went to the model and those answered from memory."""

    def __init__(self, lm: LM):
        self.lm = lm
        self.name = lm.name
        self.tokenizer = getattr(lm, "tokenizer", None)  # the judge's format follows the model's template
        self._scores: dict[str, list[float]] = {}
        self._samples: dict[str, list[Completion]] = {}
        self.asked = self.reused = 0

    def score_options(self, contexts: Sequence[Prompt], options: Sequence[Sequence[str]]) -> list[list[float]]:
        keys = [json.dumps([c, list(o)], sort_keys=True) for c, o in zip(contexts, options)]
        new = {k: i for i, k in enumerate(keys) if k not in self._scores}  # each new question once
        if new:
            got = self.lm.score_options([contexts[i] for i in new.values()], [options[i] for i in new.values()])
            if len(got) != len(new):
                raise RuntimeError(f"{self.name}: score_options returned {len(got)} results for {len(new)} prompts")
            self._scores.update(zip(new, got))
        self.asked += len(new)
        self.reused += len(keys) - len(new)
        return [self._scores[k] for k in keys]

    def generate(self, conversations: Sequence[Prompt], sampling: Sampling, n: int = 1,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        seeds = list(seeds) if seeds is not None else [None] * len(conversations)  # type: ignore[list-item]
        keys = [json.dumps([c, plain(sampling), n, s], sort_keys=True) for c, s in zip(conversations, seeds)]
        new = {k: i for i, k in enumerate(keys) if k not in self._samples}
        if new:
            idx = list(new.values())
            got = self.lm.generate([conversations[i] for i in idx], sampling, n=n,
                                   seeds=[seeds[i] for i in idx] if seeds[0] is not None else None)
            self._samples.update(zip(new, got))
        self.asked += len(new)
        self.reused += len(keys) - len(new)
        return [self._samples[k] for k in keys]



def relabel(lm: LM, constitution: Constitution, rows: Sequence[dict[str, Any]], cfg: FeedbackConfig, seed: int,
            progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """The pair rows labelled under `constitution` exactly as the feedback stage labels them
    (`feedback.process_chunk`, `cfg.chunk_size` pairs a call): preference rows with p_first,
    principle_ids, orders, status and reason, in the same order."""
    out: list[dict[str, Any]] = []
    for i in range(0, len(rows), cfg.chunk_size):
        chunk = list(rows[i:i + cfg.chunk_size])
        out += feedback.process_chunk(chunk, lm, constitution, cfg, seed)
        if progress is not None:
            progress(len(chunk))
    return out


# ---- comparing --------------------------------------------------------------------------------


def side(p: float) -> int:
    """-1, 0 or 1: which side of 0.5 a label is on (0 for a tie)."""
    return 0 if abs(p - 0.5) <= TIE else (1 if p > 0.5 else -1)


def flip_stats(rows: Sequence[dict[str, Any]], seed: int, n_boot: int = 1000) -> dict[str, Any]:
    """Soft and hard flip rates of compared pair rows (each with `soft` and `hard`), with
    intervals: a seeded bootstrap of the mean soft flip, a Wilson interval of the hard-flip share."""
    soft = [r["soft"] for r in rows]
    hard = sum(r["hard"] for r in rows)
    boot = bootstrap_mean(soft, n_boot=n_boot, seed=seed)
    ci = wilson(hard, len(rows))

    def rnd(x: Sequence[float] | None) -> list[float] | None:
        return None if x is None else [round(v, 4) for v in x]

    return {"n": len(rows), "soft": round(sum(soft) / len(soft), 4) if soft else None, "soft_ci": rnd(boot),
            "hard_flips": hard, "hard": round(hard / len(rows), 4) if rows else None, "hard_ci": rnd(ci)}


def _categories(constitution: Constitution, pids: Sequence[str]) -> set[str]:
    cat = {p.id: p.category for p in constitution.preference}
    return {cat[p] for p in pids if p in cat}


def pair_rows(pair_list: Sequence[dict[str, Any]], labels_a: Sequence[dict[str, Any]],
              labels_b: Sequence[dict[str, Any]], a: Constitution, b: Constitution) -> list[dict[str, Any]]:
    """One row per pair: its prompt, category, responses, each side's principles, status, reason and
    p_first, and, where both sides labelled it, `soft` (|p_A - p_B|) and `hard` (the side changed);
    `principle_categories` are the categories of the principles used under A or B."""
    out = []
    for p, la, lb in zip(pair_list, labels_a, labels_b, strict=True):
        if not (p["record_id"] == la["record_id"] == lb["record_id"]):
            raise ValueError(f"relabelled rows out of order at {p['record_id']}")
        both = la["status"] == STATUS_OK and lb["status"] == STATUS_OK
        row = {"record_id": p["record_id"], "prompt": p["prompt"], "category": p.get("category"),
               "kind": p.get("kind"), "responses": p["responses"],
               "principle_ids_a": la["principle_ids"], "principle_ids_b": lb["principle_ids"],
               "status_a": la["status"], "status_b": lb["status"], "reason_a": la["reason"], "reason_b": lb["reason"],
               "p_a": la["p_first"], "p_b": lb["p_first"],
               "principle_categories": sorted(_categories(a, la["principle_ids"]) |
                                              _categories(b, lb["principle_ids"])),
               "soft": abs(la["p_first"] - lb["p_first"]) if both else None,
               "hard": side(la["p_first"]) != side(lb["p_first"]) if both else None}
        out.append(row)
    return out


def compare(rows: Sequence[dict[str, Any]], seed: int, top: int = 5, n_boot: int = 1000) -> dict[str, Any]:
    """The flip figures of `pair_rows`: overall, by principle category, by principle (under A or B)
    and by harm category, the labels missing on each side by reason, and the `top` pairs that move
    most (largest soft flip; ties by record id)."""
    done = [r for r in rows if r["soft"] is not None]
    by_cat, by_pid, by_harm = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in done:
        for c in r["principle_categories"]:
            by_cat[c].append(r)
        for pid in sorted(set(r["principle_ids_a"]) | set(r["principle_ids_b"])):
            by_pid[pid].append(r)
        by_harm[r["category"] or NO_CATEGORY].append(r)

    def missing(s: str) -> dict[str, int]:
        return dict(sorted(Counter(f"{r['status_' + s]}:{r['reason_' + s]}" for r in rows
                                   if r["status_" + s] != STATUS_OK).items()))

    moved = sorted((r for r in done if r["soft"] > 0), key=lambda r: (-r["soft"], r["record_id"]))[:top]
    return {
        "pairs": len(rows),
        "compared": len(done),
        "not_labelled": {"a": missing("a"), "b": missing("b")},
        "overall": flip_stats(done, seed, n_boot),
        "by_principle_category": {c: flip_stats(v, seed, n_boot) for c, v in sorted(by_cat.items())},
        "by_principle": {p: flip_stats(v, seed, n_boot) for p, v in sorted(by_pid.items())},
        "by_harm_category": {c: flip_stats(v, seed, n_boot) for c, v in sorted(by_harm.items())},
        "top": [{k: r[k] for k in ("record_id", "prompt", "category", "principle_ids_a", "principle_ids_b", "p_a",
                                   "p_b", "soft", "hard")} for r in moved],
    }


def behavioural_diff(lm: LM, a: Constitution, b: Constitution, pair_list: Sequence[dict[str, Any]],
                     cfg: FeedbackConfig, seed: int, top: int = 5,
                     progress: Callable[[int], None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Relabel `pair_list` under `a` and under `b` with the same judge and settings, through one
    `Memo` (a question asked the same way under both is asked once); the report (`compare`, with
    the judge, its settings and the questions asked) and the per-pair rows."""
    judge = Memo(lm)
    labels_a = relabel(judge, a, pair_list, cfg, seed, progress)
    asked_a = judge.asked
    labels_b = relabel(judge, b, pair_list, cfg, seed, progress)
    rows = pair_rows(pair_list, labels_a, labels_b, a, b)
    report = {"a": {"name": a.name, "hash": a.hash, "source": a.source},
              "b": {"name": b.name, "hash": b.hash, "source": b.source},
              "judge": lm.name, "seed": seed, "feedback": plain(cfg),
              "questions": {"a": asked_a, "b_new": judge.asked - asked_a, "b_unchanged": judge.reused},
              **compare(rows, seed, top)}
    return report, rows


# ---- output -----------------------------------------------------------------------------------


def _clean(text: Any, width: int = 90) -> str:
    """Model or user text on one line, control characters dropped, cut to `width`."""
    s = " ".join("".join(ch if ch.isprintable() or ch.isspace() else " " for ch in str(text)).split())
    return s if len(s) <= width else s[: width - 1] + "…"


def _fmt(e: dict[str, Any]) -> str:
    def ci(c: list[float] | None) -> str:
        return "-" if c is None else f"{c[0]:.3f}-{c[1]:.3f}"

    if not e["n"]:
        return f"{0:>5}"
    return (f"{e['n']:>5} {e['soft']:>6.3f} {ci(e['soft_ci']):>11} {e['hard_flips']:>5} {e['hard']:>6.3f} "
            f"{ci(e['hard_ci']):>11}")


def table(report: dict[str, Any]) -> str:
    """The report as text: the judge, the overall flip rates, one line per principle category and
    harm category, what could not be labelled, and the pairs that moved most."""
    head = f"{'':<22} {'pairs':>5} {'soft':>6} {'95% CI':>11} {'flips':>5} {'hard':>6} {'95% CI':>11}"
    lines = [f"behavioural diff: {report['pairs']} pairs relabelled by {report['judge']} (seed {report['seed']}) "
             f"under {report['a']['name']} ({report['a']['hash']}) and {report['b']['name']} ({report['b']['hash']}); "
             f"{report['compared']} labelled under both; questions asked: {report['questions']['a']} under A, "
             f"{report['questions']['b_new']} new under B ({report['questions']['b_unchanged']} unchanged by the edit)",
             head, f"{'all':<22} {_fmt(report['overall'])}"]
    for title, key in (("principle category", "by_principle_category"), ("harm category", "by_harm_category")):
        if report[key]:
            lines.append(f"by {title}:")
            lines += [f"  {_clean(name, 20):<20} {_fmt(e)}" for name, e in report[key].items()]
    for s in ("a", "b"):
        if report["not_labelled"][s]:
            lines.append(f"no label under {report[s]['name']}: "
                         + ", ".join(f"{k} {v}" for k, v in report["not_labelled"][s].items()))
    if report["top"]:
        lines.append("moved most (P(response 1 is better) under A -> B):")
        for r in report["top"]:
            pids = ",".join(r["principle_ids_a"])
            if r["principle_ids_b"] != r["principle_ids_a"]:
                pids += " -> " + ",".join(r["principle_ids_b"])
            lines.append(f"  {r['p_a']:.3f} -> {r['p_b']:.3f}  {'FLIP ' if r['hard'] else ''}{r['record_id']} "
                         f"[{pids}] {_clean(r['prompt'], 70)}")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.") or "x"


def default_out(run_dir: str | Path, a: Constitution, b: Constitution) -> Path:
    """Where the diff of `a` and `b` on the pairs of `run_dir` goes unless `--out` says:
    `RUN/constitution_diff/<A>-vs-<B>/diff.json` by the constitutions' names, with their hashes
    added when the names are the same (a constitution and an edited copy of it)."""
    na, nb = _slug(a.name), _slug(b.name)
    if na == nb:
        na, nb = f"{na}.{a.hash[:8]}", f"{nb}.{b.hash[:8]}"
    return Path(run_dir) / ROOT / f"{na}-vs-{nb}" / "diff.json"


def write(out: str | Path, report: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Path:
    """The report to `out` (JSON) and the per-pair rows beside it (`<stem>.pairs.jsonl`); returns
    the rows' path."""
    out = Path(out)
    write_json(out, report)
    rows_path = out.with_name(out.stem + ".pairs.jsonl")
    atomic_write(rows_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows_path
