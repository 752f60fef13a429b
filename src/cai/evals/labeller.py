"""How well a feedback model labels multiple-choice comparisons with a known answer.

Three kinds of input file, recognised by their content (or forced with `--format`):

- `hh`: hh-rlhf preference pairs, JSONL (optionally gzipped) rows `{"chosen", "rejected"}` holding
  whole `Human:`/`Assistant:` transcripts. The better response is `chosen`. Pairs whose transcripts
  do not share the history before the last answer, or whose two answers are identical, are skipped
  and counted.
- `hhh`: BIG-bench `hhh_alignment` task files, JSON `{"examples": [{"input", "target_scores"}]}`
  with two options per example; the better one has the higher score. A directory is searched for
  `task.json` files (the subtasks harmless/helpful/honest/other), each reported on its own. An
  input written as a `Human:`/`Assistant:` dialogue becomes those turns; any other input is one
  human turn.
- `paper`: pre-rendered questions, JSONL rows `{"prompt", "corrects", "incorrects"}`, where the
  prompt already lists the options and the two lists hold the answer strings (" (A)", " (B)").

`hh` and `hhh` comparisons go through the judge the feedback stage labels with (`cai/judge.py`),
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
accuracy (P(correct) > 0.5 counts 1, a tie 0.5), order agreement (the share of principles whose
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.config import FeedbackConfig, plain
from cai.constitution import ANSWER_PREFIX, Constitution
from cai.judge import Comparison, label
from cai.lm.base import LM, Message
from cai.records import (
    STATUS_ABSTAIN,
    STATUS_FAILED,
    STATUS_OK,
    hh_pair,
    iter_jsonl,
    open_text,
    parse_hh,
    record_id_for,
    stable_seed,
)
from cai.rundir import atomic_write, write_json

FORMATS = ("hh", "hhh", "paper")
# The opening of the assistant turn after which a pre-rendered question's options are scored.
PAPER_OPENING = ANSWER_PREFIX.strip()
# A probability this close to 0.5 is a tie: the swap average of a judge that only ever looks at the
# slot is 0.5 up to float rounding.
TIE = 1e-9
_ANSWER_TAIL = re.compile(r"\s*the answer is\s*:?\s*$", re.IGNORECASE)


class EvalInputError(ValueError):
    """An evaluation file that cannot be read; the message names the file and the line or example."""


@dataclass(frozen=True)
class Item:
    """A comparison with a known answer: `responses[correct]` is the better reply to `conversation`
    (which ends with the human's turn)."""

    id: str
    conversation: tuple[Message, ...]
    responses: tuple[str, str]
    correct: int
    where: str


@dataclass(frozen=True)
class RenderedItem:
    """A pre-rendered multiple-choice question: the answer strings are scored after the prompt."""

    id: str
    prompt: str
    corrects: tuple[str, ...]
    incorrects: tuple[str, ...]
    where: str


@dataclass
class Source:
    """The items read from one file, with the counts of those skipped by reason."""

    path: str
    format: str
    items: list[Any]
    skipped: dict[str, int] = field(default_factory=dict)


# ---- reading --------------------------------------------------------------------------------


def correct_slot(seed: int, item_id: str) -> int:
    """Which slot (0 or 1) shows the better response: a seeded hash of the id, so it is the same on
    every run with this seed and independent of file order and batching."""
    return stable_seed(seed, "eval-slot", item_id) & 1


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    return iter_jsonl(path, EvalInputError)


def _unique(ids: Counter[str], base: str) -> str:
    """`base`, or `base#k` for its k-th repeat in the same file (duplicate rows keep distinct ids)."""
    ids[base] += 1
    return base if ids[base] == 1 else f"{base}#{ids[base] - 1}"


def read_hh(path: str | Path, seed: int = 0, limit: int | None = None) -> Source:
    """hh-rlhf pairs as comparisons; the first `limit` usable pairs."""
    path = Path(path)
    out = Source(str(path), "hh", [])
    skipped: Counter[str] = Counter()
    ids: Counter[str] = Counter()
    for n, row in _jsonl(path):
        if limit is not None and len(out.items) >= limit:
            break
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise EvalInputError(f"{path}:{n}: an hh-rlhf row needs 'chosen' and 'rejected' strings")
        pair = hh_pair(chosen, rejected)
        if pair is None:
            skipped["no_shared_history"] += 1
            continue
        conv, good, bad = pair
        if good.strip() == bad.strip():
            skipped["identical"] += 1
            continue
        iid = _unique(ids, record_id_for("hh", f"{chosen}\0{rejected}"))
        slot = correct_slot(seed, iid)
        responses = (good, bad) if slot == 0 else (bad, good)
        out.items.append(Item(iid, tuple(conv), responses, slot, f"{path}:{n}"))
    out.skipped = dict(skipped)
    return out


def hhh_conversation(text: str) -> list[Message]:
    """A BIG-bench HHH input as chat turns: a `Human:`/`Assistant:` dialogue ending with the human
    becomes its turns; anything else is one human turn."""
    if text.lstrip().startswith("Human:"):
        turns = parse_hh(text)
        if turns and turns[-1]["role"] == "user" and all(t["content"] for t in turns):
            return turns
    return [{"role": "user", "content": text.strip()}]


def _task_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("task.json") if p.is_file())


def _json(path: Path) -> Any:
    try:
        with open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvalInputError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    except (UnicodeDecodeError, EOFError, OSError) as e:
        raise EvalInputError(f"{path}: cannot read: {e}") from None


def read_hhh(path: str | Path, seed: int = 0, limit: int | None = None) -> Source:
    """One BIG-bench task file (two options per example) as comparisons; the first `limit` examples."""
    path = Path(path)
    data = _json(path)
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise EvalInputError(f"{path}: a BIG-bench task file needs an 'examples' list")
    out = Source(str(path), "hhh", [])
    ids: Counter[str] = Counter()
    for i, ex in enumerate(examples):
        if limit is not None and len(out.items) >= limit:
            break
        where = f"{path}: examples[{i}]"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not ex["input"].strip():
            raise EvalInputError(f"{where}: needs a non-empty 'input' string")
        scores = ex.get("target_scores")
        if not isinstance(scores, dict) or len(scores) != 2:
            got = len(scores) if isinstance(scores, dict) else type(scores).__name__
            raise EvalInputError(f"{where}: 'target_scores' must map exactly two options to scores, got {got}")
        (a, sa), (b, sb) = scores.items()
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in (sa, sb)) or sa == sb:
            raise EvalInputError(f"{where}: the two target scores must be different numbers, got {sa!r} and {sb!r}")
        if not a.strip() or not b.strip():
            raise EvalInputError(f"{where}: an option is empty")
        good, bad = (a, b) if sa > sb else (b, a)
        iid = _unique(ids, record_id_for("hhh", f"{ex['input']}\0{good}\0{bad}"))
        slot = correct_slot(seed, iid)
        responses = (good.strip(), bad.strip()) if slot == 0 else (bad.strip(), good.strip())
        out.items.append(Item(iid, tuple(hhh_conversation(ex["input"])), responses, slot, where))
    return out


def read_paper(path: str | Path, limit: int | None = None) -> Source:
    """Pre-rendered questions with their correct and incorrect answer strings; the first `limit`."""
    path = Path(path)
    out = Source(str(path), "paper", [])
    ids: Counter[str] = Counter()
    for n, row in _jsonl(path):
        if limit is not None and len(out.items) >= limit:
            break
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise EvalInputError(f"{path}:{n}: needs a non-empty 'prompt' string")
        lists = {}
        for key in ("corrects", "incorrects"):
            v = row.get(key)
            if not (isinstance(v, list) and v and all(isinstance(o, str) and o.strip() for o in v)):
                raise EvalInputError(f"{path}:{n}: '{key}' must be a non-empty list of non-empty strings")
            lists[key] = tuple(v)
        if set(lists["corrects"]) & set(lists["incorrects"]):
            raise EvalInputError(f"{path}:{n}: an option is listed as both correct and incorrect")
        iid = _unique(ids, record_id_for("paper", prompt))
        out.items.append(RenderedItem(iid, prompt, lists["corrects"], lists["incorrects"], f"{path}:{n}"))
    return out


def detect_format(path: str | Path) -> str:
    """`hh`, `hhh` or `paper`, from the file's content (a directory holds `hhh` task files)."""
    path = Path(path)
    if path.is_dir():
        return "hhh"
    first = None
    try:
        with open_text(path) as f:
            for line in f:
                if line.strip():
                    first = line
                    break
    except (UnicodeDecodeError, EOFError, OSError) as e:
        raise EvalInputError(f"{path}: cannot read: {e}") from None
    if first is None:
        raise EvalInputError(f"{path}: the file is empty")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        row = None  # not one object per line: a pretty-printed JSON document, perhaps a task file
    if isinstance(row, dict):
        if "examples" in row:
            return "hhh"
        if "chosen" in row and "rejected" in row:
            return "hh"
        if "prompt" in row and ("corrects" in row or "incorrects" in row):
            return "paper"
    elif first.lstrip().startswith("{"):
        return "hhh"  # read_hhh reports it if it is not a task file after all
    raise EvalInputError(f"{path}: cannot tell the format (expected hh-rlhf rows with chosen/rejected, a BIG-bench "
                         f"task JSON with examples, or rows with prompt/corrects/incorrects); pass --format")


def read(path: str | Path, fmt: str = "auto", seed: int = 0, limit: int | None = None) -> list[Source]:
    """The items of one path, in format `fmt` (`auto` detects it). A directory gives one source per
    BIG-bench task file under it that has examples; `limit` applies to each source."""
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"{path}: no such file or directory")
    if fmt not in ("auto", *FORMATS):
        raise EvalInputError(f"{path}: unknown format '{fmt}' (use auto, {', '.join(FORMATS)})")
    if fmt == "auto":
        fmt = detect_format(path)
    if path.is_dir():
        if fmt != "hhh":
            raise EvalInputError(f"{path}: a directory can only hold BIG-bench task files (format hhh)")
        found = []
        for task in _task_files(path):
            data = _json(task)
            # The parent task of a task with subtasks lists them but has no examples of its own.
            if isinstance(data, dict) and "examples" in data:
                found.append(read_hhh(task, seed, limit))
        if not found:
            raise EvalInputError(f"{path}: no task.json with 'examples' under this directory")
        return found
    if fmt == "hh":
        return [read_hh(path, seed, limit)]
    if fmt == "hhh":
        return [read_hhh(path, seed, limit)]
    return [read_paper(path, limit)]


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
        rows.append({"id": it.id, "where": it.where, "correct": it.correct, "correct_first": it.correct == 0,
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
    return {
        "n": len(rows),
        "answered": len(ok),
        "abstained": sum(r["status"] == STATUS_ABSTAIN for r in rows),
        "failed": sum(r["status"] == STATUS_FAILED for r in rows),
        "not_ok_by_reason": dict(sorted(Counter(f"{r['status']}:{r['reason']}" for r in rows
                                                if r["status"] != STATUS_OK).items())),
        "accuracy": _mean([r["hit"] for r in ok]),
        "order_agreement": _mean(agreement),
        "order_agreement_by_principle": {pid: _mean(v) for pid, v in sorted(by_principle.items())} or None,
        "mean_p_correct": _mean([r["p_correct"] for r in ok]),
        "ece": ece,
        "position_bias": _mean(p_a),
    }


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
            scores = lm.score_options([rendered_context(it.prompt) for it in chunk],
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
    have = [p.id for p in constitution.preference]
    bad = [pid for pid in principle_ids or () if pid not in have]
    if bad:
        raise ValueError(f"{constitution.source}: no preference principle {', '.join(map(repr, bad))} "
                         f"(have: {', '.join(have)})")


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

    head = f"{'file':<40} {'format':<6} {'n':>5} {'answered':>8} {'acc':>6} {'agree':>6} {'P(cor)':>6} " \
           f"{'ECE':>6} {'P(A)':>6}"
    lines = [f"model {report['model']}, constitution {report['constitution']} ({report['constitution_hash']}), "
             f"seed {report['seed']}", head]
    entries = [(e["file"], e) for e in report["files"]]
    if "overall" in report:
        entries.append(("all", {**report["overall"], "format": ""}))
    for name, e in entries:
        short = name if len(name) <= 40 else "…" + name[-39:]
        lines.append(f"{short:<40} {e['format']:<6} {e['n']:>5} {e['answered']:>8} {f(e['accuracy']):>6} "
                     f"{f(e['order_agreement']):>6} {f(e['mean_p_correct']):>6} {f(e['ece']):>6} "
                     f"{f(e['position_bias']):>6}")
    skipped = {e["file"]: e["skipped"] for e in report["files"] if e.get("skipped")}
    for name, sk in skipped.items():
        lines.append(f"skipped in {name}: " + ", ".join(f"{k} {v}" for k, v in sorted(sk.items())))
    return "\n".join(lines)
