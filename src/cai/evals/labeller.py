"""How well a feedback model labels multiple-choice comparisons with a known answer.

Four kinds of input file, read by `cai.sources.read_items` and recognised by their content (or
forced with `--format`):

- `hh`: hh-rlhf preference pairs, JSONL (optionally gzipped) rows `{"chosen", "rejected"}` holding
  whole `Human:`/`Assistant:` transcripts. The better response is `chosen`. Pairs whose transcripts
  do not share the history before the last answer, or whose two answers are identical, are skipped
  and counted.
- `hhh`: BIG-bench `hhh_alignment` task files, JSON `{"examples": [{"input", "target_scores"}]}`
  with two options per example; the better one has the higher score. A directory is searched for
  `task.json` files (the subtasks harmless/helpful/honest/other), each reported on its own. An
  input written as a `Human:`/`Assistant:` dialogue becomes those turns; any other input is one
  human turn.
- `preference`: JSONL (or CSV) rows `{"prompt", "chosen", "rejected"}` in TRL's layout, with an
  optional `id` and `category`; `chosen` is the better reply. `builtin:NAME` reads a shipped pair set
  (`builtin:judge_pairs`, written for this: harmless, helpful and honest comparisons;
  `builtin:helpful_pairs`). Items with a category are also summarised per category. A
  constitution's regression cases (`cai constitution test`) are such a file; rows that are not
  pairs (its flag cases) are skipped and counted.
- `paper`: pre-rendered questions, JSONL rows `{"prompt", "corrects", "incorrects"}`, where the
  prompt already lists the options and the two lists hold the answer strings (" (A)", " (B)").

`hh`, `hhh` and `preference` comparisons go through the judge the feedback stage labels with (`cai/judge.py`),
with the constitution's principles, few-shot examples, both option orders and abstention, so the
figures describe the labels the pipeline would produce. Which slot holds the better response is
decided by a seeded hash of the item's id, so a judge that always picks the first slot cannot
score well, and every per-item row records the slot.

`paper` prompts are already rendered, so they are scored as they stand: the context is the prompt
without its trailing "The answer is:" as the human turn (a prompt written as a `Human:` dialogue
becomes those turns), then an assistant turn opened with "The answer is:", and the options are
`corrects + incorrects` scored as its continuation. Their order cannot be swapped, so order
agreement is null for this format.

Metrics (`summarise`), over the items the judge answered (status ok) unless said otherwise:
accuracy (P(correct) > 0.5 counts 1, a tie 0.5) with its 95% Wilson interval, order agreement (the share of principles whose
two orders pick the same response, averaged per item), mean P(correct), expected calibration error
of P(the response in slot 1 is better) against whether it is, and position bias (mean P(A) over
all scored orders; 0.5 is none).

    cai eval labeller ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz feedback.model=smollm2-135m --limit 200
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cai.config import FeedbackConfig, plain
from cai.constitution import ANSWER_PREFIX, Constitution
from cai.evals.stats import wilson
from cai.judge import TIE, Comparison, as_format, check_principle_ids, label, resolve_format
from cai.lm.base import LM, Message
from cai.records import STATUS_ABSTAIN, STATUS_FAILED, STATUS_OK
from cai.rundir import atomic_write, write_json
from cai.sources import Item, RenderedItem, Source, parse_hh

# The opening of the assistant turn after which a pre-rendered question's options are scored.
PAPER_OPENING = ANSWER_PREFIX.strip()
_ANSWER_TAIL = re.compile(r"\s*the answer is\s*:?\s*$", re.IGNORECASE)


# ---- scoring (pure) --------------------------------------------------------------------------


def _hit(p_correct: float) -> float:
    return 0.5 if abs(p_correct - 0.5) <= TIE else float(p_correct > 0.5)


def comparison_rows(items: Sequence[Item], labels: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-item result rows from the judge's results for `items` (in the same order).

    `p_first` is P(the response in slot 1 is better), `p_correct` P(the better one is), `hit` 1, 0.5
    (a tie) or 0; all None unless the judge answered.
    """
    if len(items) != len(labels):
        raise ValueError(f"comparison_rows: {len(items)} items but {len(labels)} labels")
    rows = []
    for it, lab in zip(items, labels):
        if lab["record_id"] != it.id:
            raise ValueError(f"comparison_rows: label for {lab['record_id']} where {it.id} was expected")
        p = lab["p_first"] if lab["status"] == STATUS_OK else None
        pc = None if p is None else (p if it.correct == 0 else 1.0 - p)
        rows.append({"id": it.id, "where": it.where, "category": it.category, "correct": it.correct, "correct_first": it.correct == 0,
                     "status": lab["status"], "reason": lab["reason"], "p_first": p, "p_correct": pc,
                     "hit": None if pc is None else _hit(pc), "principle_ids": lab["principle_ids"],
                     "orders": lab["orders"], "conversation": list(it.conversation),
                     "responses": list(it.responses)})
    return rows


def rendered_context(prompt: str) -> list[Message]:
    """The context a pre-rendered question's answer strings are scored after: the prompt without its
    trailing "The answer is:" as the human turn(s), then an assistant turn opened with it."""
    text = _ANSWER_TAIL.sub("", prompt)
    conv: list[Message] = []
    if text.lstrip().startswith("Human:"):
        turns = parse_hh(text)
        if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns = turns[:-1]  # the open "Assistant:" tag the answer was to follow
        if turns and turns[-1]["role"] == "user" and all(t["content"] for t in turns):
            conv = turns
    if not conv:
        conv = [{"role": "user", "content": text.strip()}]
    return [*conv, {"role": "assistant", "content": PAPER_OPENING}]


def rendered_rows(items: Sequence[RenderedItem], scores: Sequence[Sequence[float]],
                  min_option_mass: float = 0.0) -> list[dict[str, Any]]:
    """Per-item result rows from the log-probabilities of each item's `corrects + incorrects`.

    `hit` is 1 when the best correct option beats every incorrect one (0.5 on a tie); `p_correct` is
    the correct options' share of the options' probability; `p_first` the share of the option whose
    label sorts first ("(A)"). Options holding less than `min_option_mass` in all abstain.
    """
    if len(items) != len(scores):
        raise ValueError(f"rendered_rows: {len(items)} items but {len(scores)} score lists")
    rows = []
    for it, lp in zip(items, scores):
        opts = [*it.corrects, *it.incorrects]
        row: dict[str, Any] = {"id": it.id, "where": it.where, "prompt": it.prompt, "options": opts,
                               "option_logprobs": list(lp), "orders": None, "principle_ids": None}
        first = min(range(len(opts)), key=lambda i: opts[i].strip())
        row["correct"] = [i for i in range(len(opts)) if i < len(it.corrects)]
        row["correct_first"] = first < len(it.corrects)
        valid = len(lp) == len(opts) and all(isinstance(x, (int, float)) and math.isfinite(x) and x <= 1e-6
                                             for x in lp)
        if not valid:
            rows.append({**row, "status": STATUS_FAILED, "reason": "invalid_scores", "p_first": None,
                         "p_correct": None, "hit": None})
            continue
        m = max(lp)
        z = [math.exp(x - m) for x in lp]
        probs = [x / sum(z) for x in z]
        if sum(math.exp(x) for x in lp) < min_option_mass:
            rows.append({**row, "status": STATUS_ABSTAIN, "reason": "low_option_mass", "p_first": None,
                         "p_correct": None, "hit": None})
            continue
        best_c, best_i = max(lp[:len(it.corrects)]), max(lp[len(it.corrects):])
        hit = 0.5 if abs(best_c - best_i) <= TIE else float(best_c > best_i)
        rows.append({**row, "status": STATUS_OK, "reason": None, "p_first": probs[first],
                     "p_correct": sum(probs[:len(it.corrects)]), "hit": hit})
    return rows


def _agree(p_ab: float, p_ba: float) -> float:
    """1 when both orders favour the same response (a tie in both counts as agreeing)."""
    def side(p: float) -> int:
        return 0 if abs(p - 0.5) <= TIE else (1 if p > 0.5 else -1)

    return float(side(p_ab) == side(p_ba))


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def summarise(rows: Sequence[dict[str, Any]], bins: int = 10) -> dict[str, Any]:
    """Accuracy, order agreement, mean P(correct), calibration and position bias of result rows
    (from `comparison_rows` or `rendered_rows`). Rates are over answered items; None when none are."""
    ok = [r for r in rows if r["status"] == STATUS_OK]
    agreement, by_principle = [], defaultdict(list)
    p_a = []  # P(option A) in every scored order: 0.5 on average means no position bias
    for r in ok:
        if r["orders"] is None:
            p_a.append(r["p_first"])
            continue
        usable = [e for e in r["orders"] if e["status"] == STATUS_OK]
        per = [_agree(e["p_ab"], e["p_ba"]) for e in usable]
        for e, a in zip(usable, per):
            by_principle[e["principle_id"]].append(a)
            # p_ba is P(response 1) shown as (B), so P(A) in that order is 1 - p_ba.
            p_a += [e["p_ab"], 1.0 - e["p_ba"]]
        if per:
            agreement.append(sum(per) / len(per))
    ece = None
    if ok:
        import torch

        from cai.losses import expected_calibration_error

        ece = round(expected_calibration_error(torch.tensor([r["p_first"] for r in ok]),
                                               torch.tensor([float(r["correct_first"]) for r in ok]), bins), 4)
    hits = [r["hit"] for r in ok]
    ci = wilson(sum(hits), len(hits))
    return {
        "n": len(rows),
        "answered": len(ok),
        "abstained": sum(r["status"] == STATUS_ABSTAIN for r in rows),
        "failed": sum(r["status"] == STATUS_FAILED for r in rows),
        "not_ok_by_reason": dict(sorted(Counter(f"{r['status']}:{r['reason']}" for r in rows
                                                if r["status"] != STATUS_OK).items())),
        "accuracy": _mean(hits),
        "accuracy_ci": None if ci is None else [round(ci[0], 4), round(ci[1], 4)],
        "order_agreement": _mean(agreement),
        "order_agreement_by_principle": {pid: _mean(v) for pid, v in sorted(by_principle.items())} or None,
        "mean_p_correct": _mean([r["p_correct"] for r in ok]),
        "ece": ece,
        "position_bias": _mean(p_a),
    }


def by_category(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """`summarise` of the rows of each category, when the items carry categories (else None)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("category") is not None:
            groups[r["category"]].append(r)
    return {c: summarise(g) for c, g in sorted(groups.items())} or None


# ---- running ---------------------------------------------------------------------------------


def evaluate(lm: LM, constitution: Constitution, source: Source, cfg: FeedbackConfig, seed: int,
             principle_ids: Sequence[str] | None = None,
             progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Result rows for every item of `source`, `cfg.chunk_size` items per model call."""
    rows: list[dict[str, Any]] = []
    size = cfg.chunk_size
    for i in range(0, len(source.items), size):
        chunk = source.items[i:i + size]
        if source.format == "paper":
            fmt = resolve_format(lm, cfg.format)
            scores = lm.score_options([as_format(rendered_context(it.prompt), fmt) for it in chunk],
                                      [[*it.corrects, *it.incorrects] for it in chunk])
            rows += rendered_rows(chunk, scores, cfg.min_option_mass)
        else:
            comps = [Comparison(it.id, it.conversation, it.responses) for it in chunk]
            rows += comparison_rows(chunk, label(lm, constitution, comps, cfg, seed, principle_ids))
        if progress is not None:
            progress(len(chunk))
    return rows


def check_principles(constitution: Constitution, principle_ids: Sequence[str] | None) -> None:
    """Raise ValueError naming any id that is not a preference principle of `constitution`."""
    if principle_ids:
        check_principle_ids(constitution, principle_ids, "--principle")


def run(sources: Sequence[Source], lm: LM, constitution: Constitution, cfg: FeedbackConfig, seed: int,
        principle_ids: Sequence[str] | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Score every source and return the report: settings, one summary per source, and (with more
    than one source) the pooled summary. With `out`, the report is written there as JSON and the
    per-item rows beside it (`<out stem>.items.jsonl`)."""
    from tqdm import tqdm

    check_principles(constitution, principle_ids)
    report: dict[str, Any] = {
        "model": lm.name, "constitution": constitution.name, "constitution_hash": constitution.hash,
        "seed": seed, "feedback": plain(cfg), "principle_ids": list(principle_ids) if principle_ids else None,
        "files": [],
    }
    all_rows: list[dict[str, Any]] = []
    bar = tqdm(total=sum(len(s.items) for s in sources), desc="eval labeller", unit="item")
    for s in sources:
        t0 = time.perf_counter()
        rows = evaluate(lm, constitution, s, cfg, seed, principle_ids, progress=bar.update)
        all_rows += [{"file": s.path, "format": s.format, **r} for r in rows]
        report["files"].append({"file": s.path, "format": s.format, "skipped": s.skipped, **summarise(rows),
                                "by_category": by_category(rows),
                                "wall_s": round(time.perf_counter() - t0, 1)})
    bar.close()
    if len(sources) > 1:
        report["overall"] = summarise(all_rows)
    if out is not None:
        out = Path(out)
        write_json(out, report)
        items_path = items_path_for(out)
        atomic_write(items_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rows))
        report["items_path"] = str(items_path)
    return report


def items_path_for(out: str | Path) -> Path:
    """Where the per-item rows of a report written to `out` go."""
    out = Path(out)
    return out.with_name(out.stem + ".items.jsonl")


def table(report: dict[str, Any]) -> str:
    """A short plain-text table of a report, one line per file (and the pooled line)."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    def ci(e: dict[str, Any]) -> str:
        c = e.get("accuracy_ci")
        return "-" if c is None else f"{c[0]:.3f}-{c[1]:.3f}"

    head = f"{'file':<40} {'format':<6} {'n':>5} {'answered':>8} {'acc':>6} {'95% CI':>11} {'agree':>6} " \
           f"{'P(cor)':>6} {'ECE':>6} {'P(A)':>6}"
    fb = report.get("feedback") or {}
    setting = ", ".join(f"{k} {fb[k]}" for k in ("format", "few_shot", "few_shot_order") if k in fb)
    pids = report.get("principle_ids") or fb.get("principle_ids")
    setting += f", principles {','.join(pids) if pids else 'drawn ' + str(fb.get('principles', '?'))}"
    lines = [f"model {report['model']}, constitution {report['constitution']} ({report['constitution_hash']}), "
             f"seed {report['seed']}", f"judge: {setting}", head]
    entries = []
    for e in report["files"]:
        entries.append((e["file"], e))
        entries += [(f"  {cat}", {**c, "format": ""}) for cat, c in (e.get("by_category") or {}).items()]
    if "overall" in report:
        entries.append(("all", {**report["overall"], "format": ""}))
    for name, e in entries:
        short = name if len(name) <= 40 else "…" + name[-39:]
        lines.append(f"{short:<40} {e['format']:<6} {e['n']:>5} {e['answered']:>8} {f(e['accuracy']):>6} "
                     f"{ci(e):>11} {f(e['order_agreement']):>6} {f(e['mean_p_correct']):>6} {f(e['ece']):>6} "
                     f"{f(e['position_bias']):>6}")
    skipped = {e["file"]: e["skipped"] for e in report["files"] if e.get("skipped")}
    for name, sk in skipped.items():
        lines.append(f"skipped in {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(sk.items())))
    return "\n".join(lines)
