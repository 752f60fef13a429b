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
also changes which are drawn), and the second labelling costs only the questions the edit changed.
This is the measured distance between two constitutions, and a prediction of what an edit will
change before anything is trained.

The pairs go `feedback.chunk_size` at a time (labelled under A, then under B, through one memo),
and each finished chunk's rows are appended to `RUN/constitution_diff/<a-stem>__<b-stem>/rows.jsonl`
(the shared chunk loop, cai/stages/chunked.py), so a kill loses at most the chunk in flight and the
same command resumes after the chunks written. The folder is fingerprinted by both constitutions'
contents, the judge (its model and `feedback.*` settings, the seed) and the run's pairs: a rerun with
any of them changed starts that folder afresh (its old rows are not reused), and one that only
changes `--limit` reuses the pairs it shares. The report goes beside the rows (`report.json`), and
to `--out` when given.

    cai constitution diff default mine.yaml --pairs runs/quickstart --limit 50
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cai.config import (
    ConfigError,
    FeedbackConfig,
    PipelineConfig,
    Sampling,
    fingerprint,
    load_config,
    model_identity,
    plain,
)
from cai.constitution import Constitution
from cai.evals.stats import bootstrap_mean, wilson
from cai.lm.base import LM, Completion, Prompt
from cai.records import STATUS_OK
from cai.rundir import Stage, StageError, atomic_write, write_json
from cai.stages import feedback, pairs

# A probability this close to 0.5 is a tie (as in evals/labeller.py).
TIE = 1e-9
# Where a run's behavioural diffs are kept: RUN/constitution_diff/<a-stem>__<b-stem>/.
ROOT = "constitution_diff"
NO_CATEGORY = "(none)"


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
        self.seen: set[str] | None = None  # while set, the keys of the questions asked (`questions_of`)

    def score_options(self, contexts: Sequence[Prompt], options: Sequence[Sequence[str]]) -> list[list[float]]:
        keys = [json.dumps([c, list(o)], sort_keys=True) for c, o in zip(contexts, options)]
        if self.seen is not None:
            self.seen.update(keys)
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
        if self.seen is not None:
            self.seen.update(keys)
        new = {k: i for i, k in enumerate(keys) if k not in self._samples}
        if new:
            idx = list(new.values())
            got = self.lm.generate([conversations[i] for i in idx], sampling, n=n,
                                   seeds=[seeds[i] for i in idx] if seeds[0] is not None else None)
            self._samples.update(zip(new, got))
        self.asked += len(new)
        self.reused += len(keys) - len(new)
        return [self._samples[k] for k in keys]

    def questions_of(self, ask: Callable[[Memo], Any]) -> set[str]:
        """The keys of the questions `ask(self)` puts, all of which must be answered already: this
        replays a labelling to see what it asked, without a model call."""
        before, self.seen = self.asked, set()
        try:
            ask(self)
        finally:
            seen, self.seen = self.seen, None
        if self.asked != before:
            raise RuntimeError("a replayed labelling asked a question the memo had not been asked")
        return seen


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


def diff_chunk(lm: LM, pair_list: list[dict[str, Any]], on_call: Callable[[], None] | None = None, *,
               a: Constitution, b: Constitution, cfg: FeedbackConfig, seed: int) -> list[dict[str, Any]]:
    """One chunk of pairs labelled under `a` and then under `b` through one `Memo` (one batched call
    each; under B only the questions the edit changed): the `pair_rows`, each with `questions`, the
    number of its questions asked under A, new under B and unchanged under B."""
    judge = Memo(lm)
    labels_a = feedback.process_chunk(pair_list, judge, a, cfg, seed, on_call)
    labels_b = feedback.process_chunk(pair_list, judge, b, cfg, seed, on_call)
    rows = pair_rows(pair_list, labels_a, labels_b, a, b)
    for p, row in zip(pair_list, rows):  # each pair's own questions, replayed from the memo
        qa = judge.questions_of(lambda m, p=p: feedback.process_chunk([p], m, a, cfg, seed))
        qb = judge.questions_of(lambda m, p=p: feedback.process_chunk([p], m, b, cfg, seed))
        row["questions"] = {"a": len(qa), "b_new": len(qb - qa), "b_unchanged": len(qb & qa)}
    return rows


def summary(rows: Sequence[dict[str, Any]], a: Constitution, b: Constitution, judge: str, cfg: FeedbackConfig,
            seed: int, top: int = 5) -> dict[str, Any]:
    """The report of compared pair rows (`diff_chunk`): both constitutions, the judge, its settings,
    the questions asked, and the flip figures (`compare`)."""
    return {"a": {"name": a.name, "hash": a.hash, "source": a.source},
            "b": {"name": b.name, "hash": b.hash, "source": b.source},
            "judge": judge, "seed": seed, "feedback": plain(cfg),
            "questions": {k: sum(r["questions"][k] for r in rows) for k in ("a", "b_new", "b_unchanged")},
            **compare(rows, seed, top)}


def behavioural_diff(lm: LM, a: Constitution, b: Constitution, pair_list: Sequence[dict[str, Any]],
                     cfg: FeedbackConfig, seed: int, top: int = 5,
                     progress: Callable[[int], None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Relabel `pair_list` under `a` and under `b` with the same judge and settings, `cfg.chunk_size`
    pairs at a time (`diff_chunk`), in memory; the report (`summary`) and the per-pair rows. `run`
    does the same through the run directory, resumably."""
    rows: list[dict[str, Any]] = []
    for i in range(0, len(pair_list), cfg.chunk_size):
        chunk = list(pair_list[i:i + cfg.chunk_size])
        rows += diff_chunk(lm, chunk, a=a, b=b, cfg=cfg, seed=seed)
        if progress is not None:
            progress(len(chunk))
    return summary(rows, a, b, lm.name, cfg, seed, top), rows


# ---- the resumable command --------------------------------------------------------------------


def _stem(c: Constitution) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(c.source).stem if c.source else c.name).strip("._")[:40]
    return s or "constitution"


def default_folder(run_dir: str | Path, a: Constitution, b: Constitution) -> Path:
    """Where the diff of `a` and `b` on a run's pairs is kept: RUN/constitution_diff/<a-stem>__<b-stem>."""
    return Path(run_dir) / ROOT / f"{_stem(a)}__{_stem(b)}"


def _count(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pairs": len(rows), "compared": sum(r["soft"] is not None for r in rows),
            "hard_flips": sum(bool(r["hard"]) for r in rows)}


def open_folder(folder: Path, settings: dict[str, Any]) -> tuple[Stage, list[str]]:
    """The diff's stage folder for `settings`, and what changed when the folder held a diff of other
    settings (then started afresh: its rows answer another question, so none is kept)."""
    fp = fingerprint(settings)
    old = Stage.view(folder.parent, folder.name).manifest()
    changed: list[str] = []
    if old and old.get("fingerprint") != fp:
        from cai.rundir import _diff_keys

        changed = _diff_keys(old.get("settings", {}), settings) or ["its inputs"]
        for name in ("rows.jsonl", "manifest.json", "report.json"):
            (folder / name).unlink(missing_ok=True)
    return Stage(folder.parent, folder.name, fp, settings), changed


def run(run_dir: str | Path, a: Constitution, b: Constitution, overrides: Sequence[str] = (),
        limit: int | None = None, top: int = 5, folder: str | Path | None = None,
        lm_factory: Callable[[], LM] | None = None, on_chunk: Callable[[int], None] | None = None,
        ) -> tuple[dict[str, Any], list[dict[str, Any]], Stage, list[str]]:
    """The behavioural diff of `a` and `b` on a run's pairs, resumable (see the module docstring):
    (report, rows, the stage folder, what changed since an earlier diff in that folder). The report
    is also written to the folder's `report.json`. `lm_factory` builds the judge (default: the run's
    feedback model with the overrides); `on_chunk(i)` follows each written chunk (tests stop a run
    with it)."""
    from cai import pipeline
    from cai.lm import load_lm
    from cai.stages.chunked import run_chunks

    cfg = run_config(run_dir, overrides)
    pair_list = run_pairs(run_dir, limit)
    mc = pipeline.judge_config(cfg)
    settings = plain({"a": a.hash, "b": b.hash, "judge": model_identity(mc), "feedback": cfg.feedback,
                      "seed": cfg.seed, "pairs": Stage.view(run_dir, pairs.NAME).content_hash()})
    stage, changed = open_folder(Path(folder) if folder else default_folder(run_dir, a, b), settings)
    work = functools.partial(diff_chunk, a=a, b=b, cfg=cfg.feedback, seed=cfg.seed)
    rows = run_chunks(stage, pair_list, work, lm_factory or functools.partial(load_lm, mc), cfg.ray,
                      chunk_size=cfg.feedback.chunk_size, count=_count, unit="pair", desc="diff relabel",
                      stable_chunks=True, on_chunk=on_chunk,
                      manifest={"a": {"name": a.name, "source": a.source}, "b": {"name": b.name, "source": b.source}})
    by_id = {r["record_id"]: r for r in rows}  # pairs of an earlier, larger --limit stay in the folder
    rows = [by_id[p["record_id"]] for p in pair_list]
    report = {**summary(rows, a, b, cfg.feedback.model, cfg.feedback, cfg.seed, top), "run": str(run_dir),
              "folder": str(stage.dir)}
    write_json(stage.dir / "report.json", report)
    return report, rows, stage, changed


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


def write(out: str | Path, report: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Path:
    """The report to `out` (JSON) and the per-pair rows beside it (`<stem>.pairs.jsonl`); returns
    the rows' path."""
    out = Path(out)
    write_json(out, report)
    rows_path = out.with_name(out.stem + ".pairs.jsonl")
    atomic_write(rows_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows_path
