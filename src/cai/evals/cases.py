"""Regression cases for a constitution: under it, does a judge prefer what it should and flag what
it should?

A cases file is JSONL, one case a line, of two kinds:

- a pair case, in TRL's preference columns (so `cai eval labeller` reads the same file):
  `{"id", "prompt", "chosen", "rejected", "category", "principle", "note"}`, meaning the
  constitution should prefer `chosen` over `rejected`. `prompt` is a string or a list of messages
  ending with the human's turn; `chosen` and `rejected` are strings (or one assistant message).
  `principle` names a preference principle; without it the feedback settings choose
  (`feedback.principle_ids`, else `feedback.principles` drawn per case, an ensemble when > 1).
- a flag case: `{"id", "prompt", "reply", "flag", "category", "principle", "note"}`, meaning the
  reply should (`flag: true`) or should not (`flag: false`) be flagged as breaking the
  constitution. `principle` names a critique/revision principle (its critique says what to look
  for); without it `feedback.principles` of them are drawn per case.

`principle`, `category` and `note` may be left out. `category` groups the summary (the shipped
cases use the principle categories: harm, honesty, helpfulness, meta); a case without one takes its
principle's category, else "uncategorised". A malformed case is an error naming the file, line and
field, before any model is loaded.

Pair cases go to the judge's `label` (cai/judge.py: both option orders, soft labels); flag cases
to its `violations` (both polarities of a Yes/No question). A case passes when its soft label,
P(chosen is better) or P(violation), is on the right side of 0.5: above it for a pair case and a
flag case with `flag: true`, below it for `flag: false`. An exact tie, an abstention and a failed
judgement are failures, each reported with its reason. The summary gives the pass rate with its 95%
Wilson interval, overall, by category and by kind.

A constitution's own cases live beside it as `<name>.cases.jsonl`
(`src/cai/resources/constitutions/default.cases.jsonl` for the shipped default), and are used when
no CASES file is given:

    cai constitution test default feedback.model=smollm2-135m --min-pass 0.5
"""

from __future__ import annotations

import difflib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.config import FeedbackConfig
from cai.constitution import Constitution
from cai.evals.stats import wilson
from cai.judge import Comparison, Reply, label, violations
from cai.lm.base import LM, Message
from cai.records import STATUS_OK
from cai.rundir import atomic_write, write_json
from cai.sources import SourceError, file_rows, pair_of, prompt_conversation

PAIR_KEYS = ("id", "prompt", "chosen", "rejected", "category", "principle", "note")
FLAG_KEYS = ("id", "prompt", "reply", "flag", "category", "principle", "note")
UNCATEGORISED = "uncategorised"
# A soft label this close to 0.5 is a tie (as in evals/labeller.py): on neither side, so a failure.
TIE = 1e-9
OUTCOMES = ("pass", "wrong_side", "tie", "abstain", "failed")


class CaseError(SourceError):
    """A cases file that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class Case:
    """One regression case: a pair (`chosen` should be preferred to `rejected`) or a flag case
    (`reply` should, or should not, be flagged)."""

    id: str
    kind: str  # "pair" | "flag"
    conversation: tuple[Message, ...]
    category: str
    where: str
    principle: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    reply: str | None = None
    flag: bool | None = None
    note: str | None = None


# ---- reading ----------------------------------------------------------------------------------


def cases_path_for(constitution: Constitution) -> Path:
    """Where a constitution's own cases live: `<name>.cases.jsonl` beside its YAML file."""
    src = Path(constitution.source)
    if constitution.source == "<memory>" or not src.suffix:
        raise CaseError(f"constitution {constitution.name!r} was not loaded from a file; give a CASES file")
    return src.with_name(src.stem + ".cases.jsonl")


def _principle(where: str, row: dict[str, Any], kind: str, constitution: Constitution) -> str | None:
    pid = row.get("principle")
    if pid is None:
        return None
    pool = constitution.preference if kind == "pair" else constitution.critique_revision
    what = "a preference" if kind == "pair" else "a critique/revision"
    ids = [p.id for p in pool]
    if not isinstance(pid, str) or pid not in ids:
        close = difflib.get_close_matches(str(pid), ids, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (its ids: {', '.join(ids)})"
        raise CaseError(f"{where}: 'principle' {pid!r} is not {what} principle of constitution "
                        f"{constitution.name!r}{hint}")
    return pid


def _category(where: str, row: dict[str, Any], pid: str | None, kind: str, constitution: Constitution) -> str:
    cat = row.get("category")
    if cat is not None:
        if not isinstance(cat, str) or not cat.strip():
            raise CaseError(f"{where}: 'category' must be a non-empty string")
        return cat.strip()
    if pid is None:
        return UNCATEGORISED
    p = constitution.preference_principle(pid) if kind == "pair" else constitution.principle(pid)
    return p.category


def _text(where: str, row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise CaseError(f"{where}: '{key}' must be a non-empty string")
    return v


def parse_case(where: str, row: dict[str, Any], constitution: Constitution) -> Case:
    """One case from one JSON object; `where` (file:line) names it in every error."""
    is_pair = "chosen" in row or "rejected" in row
    is_flag = "reply" in row or "flag" in row
    if is_pair == is_flag:
        raise CaseError(f"{where}: a case has either 'chosen' and 'rejected' (a pair case) or 'reply' and 'flag' "
                        f"(a flag case); this one has {'both' if is_pair else 'neither'} (keys: {sorted(row)})")
    kind = "pair" if is_pair else "flag"
    allowed = PAIR_KEYS if is_pair else FLAG_KEYS
    extra = sorted(set(row) - set(allowed))
    if extra:
        raise CaseError(f"{where}: unknown key(s) {extra} for a {kind} case; allowed: {', '.join(allowed)}")
    missing = [k for k in allowed[:4] if k not in row]
    if missing:
        raise CaseError(f"{where}: a {kind} case needs {', '.join(map(repr, missing))}")
    cid = _text(where, row, "id").strip()
    note = row.get("note")
    if note is not None and not isinstance(note, str):
        raise CaseError(f"{where}: 'note' must be a string")
    pid = _principle(where, row, kind, constitution)
    category = _category(where, row, pid, kind, constitution)
    if is_pair:
        parsed = pair_of(where, row, "preference")
        if isinstance(parsed, str):
            raise CaseError(f"{where}: 'chosen' and 'rejected' are the same reply" if parsed == "identical"
                            else f"{where}: not a comparison ({parsed})")
        conv, chosen, rejected = parsed
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise CaseError(f"{where}: '{key}' is empty")
        return Case(cid, kind, tuple(conv), category, where, pid, chosen=chosen, rejected=rejected, note=note)
    conv = prompt_conversation(where, row["prompt"])
    if not isinstance(row["flag"], bool):
        raise CaseError(f"{where}: 'flag' must be true or false, got {row['flag']!r}")
    return Case(cid, kind, tuple(conv), category, where, pid, reply=_text(where, row, "reply"), flag=row["flag"],
                note=note)


def read_cases(path: str | Path, constitution: Constitution) -> list[Case]:
    """Every case of a cases file, checked against `constitution` (its principle ids). Errors name
    the file and line: a malformed row, an unknown principle, a repeated id, an empty file."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: no such cases file")
    cases: list[Case] = []
    seen: dict[str, str] = {}
    for where, row in file_rows(path, "jsonl", CaseError):
        case = parse_case(where, row, constitution)
        if case.id in seen:
            raise CaseError(f"{where}: id {case.id!r} is already used at {seen[case.id]}")
        seen[case.id] = where
        cases.append(case)
    if not cases:
        raise CaseError(f"{path}: no cases in the file")
    return cases


# ---- running ----------------------------------------------------------------------------------


def outcome(status: str, soft: float | None, above: bool) -> str:
    """"pass", "wrong_side", "tie", or the judge's status ("abstain", "failed") for a case whose
    soft label should be above 0.5 (`above`) or below it."""
    if status != STATUS_OK or soft is None:
        return status
    if abs(soft - 0.5) <= TIE:
        return "tie"
    return "pass" if (soft > 0.5) == above else "wrong_side"


def _row(case: Case, res: dict[str, Any], soft_key: str, detail_key: str) -> dict[str, Any]:
    above = case.kind == "pair" or bool(case.flag)
    soft = res[soft_key]
    got = outcome(res["status"], soft, above)
    return {"id": case.id, "kind": case.kind, "category": case.category, "where": case.where,
            "principle": case.principle, "principle_ids": res["principle_ids"],
            "expect": "chosen" if case.kind == "pair" else ("flag" if case.flag else "no flag"),
            "soft_label": soft, "passed": got == "pass", "outcome": got, "status": res["status"],
            "reason": res["reason"], "note": case.note, "judge": res[detail_key]}


def run_cases(lm: LM, constitution: Constitution, cases: Sequence[Case], cfg: FeedbackConfig, seed: int,
              progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """One result row per case, in the cases' order: id, kind, category, where, principle,
    principle_ids (those the judge used), expect ("chosen" | "flag" | "no flag"), soft_label
    (P(chosen is better) for a pair, P(violation) for a flag case; None when the judge abstained or
    failed), passed, outcome (one of OUTCOMES), status, reason, note, and judge (the judge's
    per-principle figures). Cases go to the judge `cfg.chunk_size` at a time, each kind on its own;
    `progress(n)` follows each chunk of n cases."""
    rows: dict[str, dict[str, Any]] = {}
    for kind in ("pair", "flag"):
        todo = [c for c in cases if c.kind == kind]
        for i in range(0, len(todo), cfg.chunk_size):
            chunk = todo[i:i + cfg.chunk_size]
            own = [(c.principle,) if c.principle else () for c in chunk]
            if kind == "pair":
                comps = [Comparison(c.id, c.conversation, (c.chosen, c.rejected), p)  # type: ignore[arg-type]
                         for c, p in zip(chunk, own)]
                made = [_row(c, r, "p_first", "orders") for c, r in zip(chunk, label(lm, constitution, comps, cfg, seed))]
            else:
                replies = [Reply(c.id, c.conversation, c.reply, p) for c, p in zip(chunk, own)]  # type: ignore[arg-type]
                made = [_row(c, r, "p_violation", "principles")
                        for c, r in zip(chunk, violations(lm, constitution, replies, cfg, seed))]
            rows.update((r["id"], r) for r in made)
            if progress is not None:
                progress(len(chunk))
    return [rows[c.id] for c in cases]


# ---- summary ----------------------------------------------------------------------------------


def _rate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n, k = len(rows), sum(r["passed"] for r in rows)
    ci = wilson(k, n)
    return {"n": n, "passed": k, "pass_rate": round(k / n, 4) if n else None,
            "pass_ci": None if ci is None else [round(ci[0], 4), round(ci[1], 4)]}


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pass rate with its 95% Wilson interval, overall, by category and by kind; every outcome
    counted (failures by the judge's reason too)."""
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
        by_kind[r["kind"]].append(r)
    outcomes = Counter(r["outcome"] for r in rows)
    return {
        **_rate(rows),
        "outcomes": {o: outcomes.get(o, 0) for o in OUTCOMES},
        "not_ok_by_reason": dict(sorted(Counter(f"{r['status']}:{r['reason']}" for r in rows
                                                if r["status"] != STATUS_OK).items())),
        "by_category": {c: _rate(v) for c, v in sorted(by_cat.items())},
        "by_kind": {k: _rate(v) for k, v in sorted(by_kind.items())},
    }


def _ci(e: dict[str, Any]) -> str:
    c = e["pass_ci"]
    return "-" if c is None else f"{c[0]:.3f}-{c[1]:.3f}"


def case_line(r: dict[str, Any]) -> str:
    """One case as a line: PASS/FAIL, kind, category, id, the soft label (or why there is none),
    the principles asked, and what was expected when it failed."""
    name = "P(chosen)" if r["kind"] == "pair" else "P(flag)"
    soft = f"{name}={r['soft_label']:.4f}" if r["soft_label"] is not None else f"{r['status']}: {r['reason']}"
    why = "" if r["passed"] else f"  [{r['outcome']}; expected {r['expect']}]"
    return (f"{'PASS' if r['passed'] else 'FAIL'}  {r['kind']:<4}  {r['category']:<12} {r['id']:<28} {soft:<17} "
            f"{','.join(r['principle_ids'])}{why}")


def table(summary: dict[str, Any]) -> str:
    """The summary as text: the pass rate and its interval, the failures by outcome, then one line
    per category and per kind."""
    o = summary["outcomes"]
    fails = ", ".join(f"{k.replace('_', ' ')} {o[k]}" for k in OUTCOMES[1:])
    lines = [f"passed {summary['passed']}/{summary['n']} = {summary['pass_rate']:.3f} "
             f"(95% CI {_ci(summary)}); failures: {fails}",
]
    for title, part in (("category", summary["by_category"]), ("kind", summary["by_kind"])):
        lines.append(f"{title:<14} {'n':>4} {'passed':>6} {'rate':>6} {'95% CI':>11}")
        for name, e in part.items():
            lines.append(f"  {name:<12} {e['n']:>4} {e['passed']:>6} {e['pass_rate']:>6.3f} {_ci(e):>11}")
    if summary["not_ok_by_reason"]:
        lines.append("no label: " + ", ".join(f"{k} {v}" for k, v in summary["not_ok_by_reason"].items()))
    return "\n".join(lines)


def write(out: str | Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """The rows to `out` (JSONL) and the summary beside it (`<stem>.summary.json`); returns the
    summary's path."""
    out = Path(out)
    atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary_path = out.with_name(out.stem + ".summary.json")
    write_json(summary_path, summary)
    return summary_path
