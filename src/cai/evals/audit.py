"""Audit stored model outputs against the constitution: per reply, per principle, a soft violation
score from the judge, a review queue of what scores above a threshold, and flag rates.

    cai audit outputs.jsonl [-c CONFIG] [key=value ...] [--threshold 0.5] [--principle ID] [--out DIR]

The question is the judge's pointwise one (`cai.judge.violations`: both polarities of a Yes/No
question under a critique/revision principle's critique, soft, with abstentions and failures kept
apart). Every reply is checked against every critique/revision principle of the constitution, or
only those named with `--principle`. The judge is the feedback stage's (`feedback.model` under the
`model.*` settings; `feedback.format`, `feedback.chain_of_thought`, `feedback.min_option_mass`,
`feedback.chunk_size`); `seed` seeds its reasoning samples.

The layouts of FILE (JSONL, gzipped or not), told apart row by row:

- conversations: `{"id"?, "messages": [..., {"role": "assistant", "content": REPLY}], "category"?}`;
  the messages before the last one are the conversation the reply answers;
- prompt and reply: `{"id"?, "prompt": TEXT or messages, "reply": TEXT, "category"?}`;
- an OpenAI chat-completions log: `{"request": {"messages": [...], ...}, "response": {"id", "choices":
  [{"index", "message": {"content": REPLY}}, ...]}, "category"?}`, where the request may also sit
  under `"body"` and the response under `"response": {"body": ...}` (the OpenAI batch output
  layout). Each choice is one reply (id `<response id>:<index>`); a choice without text content
  (a tool call, a refusal field only) and a response without choices (an error) are not judged and
  are counted as `skipped` by reason.

A message's `content` may be a string or a list of text parts (`{"type": "text", "text": ...}`).
A row without an id gets one from a hash of its conversation and reply (a repeated one is suffixed
`#2`, `#3`, ... in file order); a row's `category` groups the summary ("uncategorised" without).
A malformed row is an error naming the file, line and field, before the judge is loaded.

DIR (default `runs/audit/<FILE's stem>`) holds:

- `rows.jsonl`: every judgement, one row per reply: record_id, where (file:line), category,
  conversation, reply, status, reason, p_violation (the mean over usable principles) and
  principles (per principle: p_violation, both polarities' probabilities and masses, the reasoning
  with chain of thought, status);
- `queue.jsonl`: the review queue, one line per (reply, principle) whose score is above the
  threshold: record_id, where, category, conversation, reply, principle_id, score, and reasoning
  (the judge's, with chain of thought; else null);
- `summary.json`: the flag rate with its 95% Wilson interval overall (a reply is flagged when any
  of its principles is), by principle and by category; abstentions and failures counted beside
  the rate, never in it;
- `manifest.json`: the stage manifest (fingerprint of the judge's settings, counts).

A rerun with the same judge settings judges only the replies whose rows are not written yet (an
appended log audits just the new lines); the threshold is not part of the judgement, so a rerun
with another threshold judges nothing and rewrites the queue and summary. `cai audit serve`
(`cai.serve.proxy`) writes the same files for live traffic.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.config import FeedbackConfig, PipelineConfig, fingerprint, plain
from cai.constitution import Constitution
from cai.evals.stats import wilson
from cai.judge import Reply, check_critique_ids, violations
from cai.lm.base import LM, ROLES, Message
from cai.records import STATUS_OK
from cai.rundir import Stage, atomic_write, write_json
from cai.sources import SourceError, file_rows

UNCATEGORISED = "uncategorised"
STAGE = "audit"


class AuditInputError(SourceError):
    """A file of outputs that cannot be audited; the message names the file, line and field."""


@dataclass(frozen=True)
class Output:
    """One stored reply to audit: the conversation it answers (ending with the human's turn)."""

    record_id: str
    where: str
    conversation: tuple[Message, ...]
    reply: str
    category: str = UNCATEGORISED


# ---- reading ----------------------------------------------------------------------------------


def content_text(where: str, field: str, content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise AuditInputError(f"{where}: '{field}'[{i}] must be a content part object")
            if part.get("type", "text") == "text":
                if not isinstance(part.get("text"), str):
                    raise AuditInputError(f"{where}: '{field}'[{i}].text must be a string")
                parts.append(part["text"])
        return "\n".join(parts)
    raise AuditInputError(f"{where}: '{field}' must be a string or a list of content parts, "
                          f"got {type(content).__name__}")


def conversation_of(where: str, field: str, value: Any) -> list[Message]:
    """Chat messages, checked field by field. Messages of other roles (tool results) and a system
    message's place are kept only as far as the judge's prompt can show them: tool and function
    messages are dropped, since the judge quotes a human/assistant conversation."""
    if not isinstance(value, list) or not value:
        raise AuditInputError(f"{where}: '{field}' must be a non-empty list of messages")
    out: list[Message] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise AuditInputError(f"{where}: '{field}'[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role in ("tool", "function", "developer"):
            role = "system" if role == "developer" else None
            if role is None:
                continue
        if role not in ROLES:
            raise AuditInputError(f"{where}: '{field}'[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        content = m.get("content")
        if content is None and role == "assistant":  # an assistant turn that only called tools
            continue
        out.append({"role": role, "content": content_text(where, f"{field}[{i}].content", content)})
    return out


def _category(where: str, row: dict[str, Any]) -> str:
    cat = row.get("category")
    if cat is None:
        return UNCATEGORISED
    if not isinstance(cat, str) or not cat.strip():
        raise AuditInputError(f"{where}: 'category' must be a non-empty string")
    return cat.strip()


def _check_conversation(where: str, field: str, conv: list[Message]) -> None:
    if not conv or conv[-1]["role"] != "user":
        raise AuditInputError(f"{where}: '{field}' must end with a user message before the reply")


def _own_id(where: str, row: dict[str, Any], key: str = "id") -> str | None:
    rid = row.get(key)
    if rid is None:
        return None
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or not str(rid).strip():
        raise AuditInputError(f"{where}: '{key}' must be a non-empty string or an integer")
    return str(rid).strip()


def content_id(conversation: Sequence[Message], reply: str) -> str:
    """A stable id for a reply to a conversation (rows without an id of their own)."""
    blob = json.dumps([list(conversation), reply], sort_keys=True, ensure_ascii=False)
    return "a-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def chat_log_outputs(where: str, row: dict[str, Any]) -> tuple[list[tuple[str | None, list[Message], str]],
                                                                 list[str]]:
    """The replies of one OpenAI chat-completions log row: ([(id or None, conversation, reply)],
    [reasons of choices that are not judged])."""
    request = row.get("request")
    if isinstance(request, dict) and "body" in request and "messages" not in request:
        request = request["body"]
    if not isinstance(request, dict) or "messages" not in request:
        raise AuditInputError(f"{where}: 'request' must be an object holding 'messages'")
    conv = conversation_of(where, "request.messages", request["messages"])
    _check_conversation(where, "request.messages", conv)
    response = row.get("response")
    if isinstance(response, dict) and "body" in response and "choices" not in response:
        response = response["body"]
    if not isinstance(response, dict):
        raise AuditInputError(f"{where}: 'response' must be an object")
    choices = response.get("choices")
    if choices is None:
        return [], ["no_choices"]  # an error response: nothing was said
    if not isinstance(choices, list):
        raise AuditInputError(f"{where}: 'response.choices' must be a list")
    base = _own_id(where, row) or _own_id(where, response)
    got, skipped = [], []
    for i, ch in enumerate(choices):
        if not isinstance(ch, dict) or not isinstance(ch.get("message"), dict):
            raise AuditInputError(f"{where}: 'response.choices'[{i}] must hold a 'message' object")
        content = ch["message"].get("content")
        if content is None:
            skipped.append("no_content")
            continue
        text = content_text(where, f"response.choices[{i}].message.content", content)
        if not text.strip():
            skipped.append("empty_reply")
            continue
        index = ch.get("index", i)
        got.append((None if base is None else f"{base}:{index}", conv, text))
    return got, skipped


def row_outputs(where: str, row: dict[str, Any]) -> tuple[list[tuple[str | None, list[Message], str]], list[str]]:
    """The replies one row of any accepted layout holds, as `chat_log_outputs` returns them."""
    if "request" in row or "response" in row:
        return chat_log_outputs(where, row)
    if "messages" in row:
        msgs = conversation_of(where, "messages", row["messages"])
        if msgs[-1]["role"] != "assistant":
            raise AuditInputError(f"{where}: 'messages' must end with the assistant reply to audit")
        conv, reply = msgs[:-1], msgs[-1]["content"]
        _check_conversation(where, "messages", conv)
    elif "prompt" in row and "reply" in row:
        if isinstance(row["prompt"], str):
            conv = [{"role": "user", "content": row["prompt"]}]
        else:
            conv = conversation_of(where, "prompt", row["prompt"])
        _check_conversation(where, "prompt", conv)
        if not isinstance(row["reply"], str):
            raise AuditInputError(f"{where}: 'reply' must be a string")
        reply = row["reply"]
    else:
        raise AuditInputError(f"{where}: a row holds 'messages', or 'prompt' and 'reply', or an OpenAI "
                              f"'request' and 'response'; this one has keys {sorted(row)}")
    if not conv[-1]["content"].strip():
        raise AuditInputError(f"{where}: the user message before the reply is empty")
    if not reply.strip():
        raise AuditInputError(f"{where}: the reply is empty")
    return [(_own_id(where, row), conv, reply)], []


def read_outputs(path: str | Path) -> tuple[list[Output], Counter[str]]:
    """Every reply of a file of stored outputs, checked, and the count of choices not judged by
    reason. Errors name the file and line: a malformed row, a repeated id, a file with no reply."""
    path = Path(path)
    if not path.is_file():
        raise AuditInputError(f"{path}: no such file")
    outputs: list[Output] = []
    skipped: Counter[str] = Counter()
    seen: dict[str, str] = {}
    repeats: Counter[str] = Counter()
    for where, row in file_rows(path, "jsonl", AuditInputError):
        category = _category(where, row)
        got, skip = row_outputs(where, row)
        skipped.update(skip)
        for rid, conv, reply in got:
            if rid is None:
                rid = content_id(conv, reply)
                repeats[rid] += 1
                if repeats[rid] > 1:
                    rid = f"{rid}#{repeats[rid]}"
            if rid in seen:
                raise AuditInputError(f"{where}: id {rid!r} is already used at {seen[rid]}")
            seen[rid] = where
            outputs.append(Output(rid, where, tuple(conv), reply, category))
    if not outputs:
        raise AuditInputError(f"{path}: no reply to audit in the file"
                              + (f" (not judged: {dict(skipped)})" if skipped else ""))
    return outputs, skipped


# ---- judging ----------------------------------------------------------------------------------


def principles_to_check(constitution: Constitution, principle_ids: Sequence[str] | None) -> list[str]:
    """The critique/revision principles an audit asks about: those named, else all of them."""
    if principle_ids:
        check_critique_ids(constitution, principle_ids, "--principle")
        return list(dict.fromkeys(principle_ids))
    return [p.id for p in constitution.critique_revision]


def judge_outputs(lm: LM, outputs: Sequence[Output | dict[str, Any]], constitution: Constitution,
                  cfg: FeedbackConfig, seed: int, principle_ids: Sequence[str],
                  on_call: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """One judgement row per output (an `Output`, or its fields as a dict), in order; pure apart
    from the model calls. Fields: see the module docstring (`rows.jsonl`)."""
    items = [o if isinstance(o, Output) else Output(**o) for o in outputs]
    replies = [Reply(o.record_id, o.conversation, o.reply, tuple(principle_ids)) for o in items]
    judged = violations(lm, constitution, replies, cfg, seed, on_call=on_call)
    return [{"record_id": o.record_id, "where": o.where, "category": o.category,
             "conversation": list(o.conversation), "reply": o.reply, "status": j["status"],
             "reason": j["reason"], "p_violation": j["p_violation"], "principles": j["principles"],
             "judge": lm.name, "constitution_hash": constitution.hash}
            for o, j in zip(items, judged)]


def failed_row(output: Output, reason: str, judge: str, constitution: Constitution) -> dict[str, Any]:
    """The row of a reply the judge could not be asked about (it raised): a failure, never a score."""
    return {"record_id": output.record_id, "where": output.where, "category": output.category,
            "conversation": list(output.conversation), "reply": output.reply, "status": "failed",
            "reason": reason, "p_violation": None, "principles": [], "judge": judge,
            "constitution_hash": constitution.hash}


def _judge_chunk(lm: LM, rows: list[dict[str, Any]], on_call: Callable[[], None] | None, *,
                 constitution: Constitution, cfg: FeedbackConfig, seed: int,
                 principle_ids: Sequence[str]) -> list[dict[str, Any]]:
    """`judge_outputs` over one chunk of the resumable loop (records are `Output` fields)."""
    return judge_outputs(lm, rows, constitution, cfg, seed, principle_ids, on_call)


# ---- queue and summary ----------------------------------------------------------------------


def _score(entry: dict[str, Any]) -> float | None:
    return entry["p_violation"] if entry.get("status") == STATUS_OK else None


def flagged(row: dict[str, Any], threshold: float) -> list[dict[str, Any]]:
    """The principles of a judgement row whose usable score is above `threshold`."""
    return [e for e in row.get("principles") or [] if (s := _score(e)) is not None and s > threshold]


def queue_lines(row: dict[str, Any], threshold: float) -> list[dict[str, Any]]:
    """A judgement row's entries of the review queue: one per principle above the threshold."""
    out = []
    for e in flagged(row, threshold):
        cots = [c for c in (e.get("cot_has"), e.get("cot_free")) if c]
        out.append({"record_id": row["record_id"], "where": row.get("where"), "category": row["category"],
                    "conversation": row["conversation"], "reply": row["reply"], "principle_id": e["principle_id"],
                    "score": e["p_violation"], "threshold": threshold,
                    "reasoning": {"has": e.get("cot_has"), "free": e.get("cot_free")} if cots else None})
    return out


def _rate(k: int, n: int) -> dict[str, Any]:
    ci = wilson(k, n)
    return {"flag_rate": round(k / n, 4) if n else None, "flag_ci": None if ci is None else [round(ci[0], 4),
                                                                                            round(ci[1], 4)]}


def summarise(rows: Iterable[dict[str, Any]], threshold: float, skipped: dict[str, int] | None = None
              ) -> dict[str, Any]:
    """Flag rates with 95% Wilson intervals: overall and by category (per reply: flagged when any
    principle is above the threshold; judged = usable), and by principle (per judgement of it).
    Abstentions and failures are counted beside each rate and never in it."""
    rows = list(rows)

    def replies(part: Sequence[dict[str, Any]]) -> dict[str, Any]:
        status = Counter(r["status"] for r in part)
        judged = status.get(STATUS_OK, 0)
        k = sum(1 for r in part if r["status"] == STATUS_OK and flagged(r, threshold))
        return {"n": len(part), "judged": judged, "flagged": k, **_rate(k, judged),
                "abstain": status.get("abstain", 0), "failed": status.get("failed", 0)}

    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_pid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
        for e in r.get("principles") or []:
            by_pid[e["principle_id"]].append(e)

    def principle(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
        scores = [s for e in entries if (s := _score(e)) is not None]
        k = sum(s > threshold for s in scores)
        status = Counter(e["status"] for e in entries if e["status"] != STATUS_OK)
        return {"n": len(entries), "judged": len(scores), "flagged": k, **_rate(k, len(scores)),
                "mean_score": round(sum(scores) / len(scores), 4) if scores else None,
                "abstain": status.pop("low_option_mass", 0), "failed": sum(status.values()),
                "not_ok_by_reason": dict(sorted(status.items()))}

    return {
        "threshold": threshold,
        **replies(rows),
        "not_ok_by_reason": dict(sorted(Counter(f"{r['status']}:{r['reason']}" for r in rows
                                                if r["status"] != STATUS_OK).items())),
        "skipped": dict(sorted((skipped or {}).items())),
        "by_principle": {p: principle(v) for p, v in sorted(by_pid.items())},
        "by_category": {c: replies(v) for c, v in sorted(by_cat.items())},
    }


def count(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's counts of judgement rows."""
    status = Counter(r["status"] for r in rows)
    return {"replies": len(rows), "ok": status.get(STATUS_OK, 0), "abstain": status.get("abstain", 0),
            "failed": status.get("failed", 0)}


def write_outputs(out: str | Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """The review queue (rewritten from the rows, so it always matches them and the threshold) and
    the summary."""
    out = Path(out)
    lines = [q for r in rows for q in queue_lines(r, summary["threshold"])]
    atomic_write(out / "queue.jsonl", "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in lines))
    write_json(out / "summary.json", summary)


def settings(cfg: PipelineConfig, constitution: Constitution, judge: str, principle_ids: Sequence[str]
             ) -> dict[str, Any]:
    """What a judgement depends on (the resume fingerprint); not the threshold, nor the input file."""
    fb = plain(cfg.feedback)
    return {"judge": judge, "model": plain(cfg.model), "feedback": {k: fb[k] for k in
            ("format", "chain_of_thought", "cot", "clamp", "min_option_mass")},
            "seed": cfg.seed, "constitution_hash": constitution.hash, "principle_ids": list(principle_ids)}


def open_stage(out: str | Path, cfg: PipelineConfig, constitution: Constitution, principle_ids: Sequence[str],
               allow_changed: bool = False) -> Stage:
    """The audit folder as a resumable stage (`rows.jsonl`, `manifest.json` in `out`)."""
    out = Path(out)
    st = settings(cfg, constitution, cfg.feedback.model, principle_ids)
    return Stage(out.parent, out.name, fingerprint(st), st, allow_changed)


def audit_file(path: str | Path, cfg: PipelineConfig, constitution: Constitution, lm_factory: Callable[[], LM],
               out: str | Path, threshold: float = 0.5, principle_ids: Sequence[str] | None = None,
               allow_changed: bool = False, on_chunk: Callable[[int], None] | None = None,
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Audit a file of stored outputs into `out` (resumable, chunk by chunk of
    `feedback.chunk_size`); returns (summary, every judgement row). The file is read and checked
    before the judge is built, and the judge is built only when something is left to judge."""
    from cai.stages.chunked import run_chunks

    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"--threshold must be in [0, 1), got {threshold}")
    outputs, skipped = read_outputs(path)
    pids = principles_to_check(constitution, principle_ids)
    stage = open_stage(out, cfg, constitution, pids, allow_changed)
    records = [{"record_id": o.record_id, "where": o.where, "conversation": o.conversation, "reply": o.reply,
                "category": o.category} for o in outputs]
    work = functools.partial(_judge_chunk, constitution=constitution, cfg=cfg.feedback, seed=cfg.seed,
                             principle_ids=pids)
    per_call = 2 * len(pids) * (2 if cfg.feedback.chain_of_thought else 1)
    run_chunks(stage, records, work, lm_factory, cfg.ray, chunk_size=cfg.feedback.chunk_size, count=count,
               unit="reply", desc="audit", calls=lambda chunk: 2 if cfg.feedback.chain_of_thought else 1,
               manifest={"constitution_hash": constitution.hash, "input": str(path),
                         "questions_per_reply": per_call}, on_chunk=on_chunk)
    wanted = {o.record_id for o in outputs}
    rows = [r for r in stage.rows() if r["record_id"] in wanted]
    summary = summarise(rows, threshold, skipped)
    summary.update(input=str(path), judge=cfg.feedback.model, constitution=constitution.name,
                   constitution_hash=constitution.hash, seed=cfg.seed, principle_ids=pids)
    write_outputs(out, rows, summary)
    return summary, rows


# ---- text ------------------------------------------------------------------------------------


def _ci(e: dict[str, Any]) -> str:
    c = e["flag_ci"]
    return "-" if c is None else f"{c[0]:.3f}-{c[1]:.3f}"


def _rate_text(e: dict[str, Any]) -> str:
    return "-" if e["flag_rate"] is None else f"{e['flag_rate']:.3f}"


def table(summary: dict[str, Any]) -> str:
    """The summary as text: the overall flag rate, then one line per principle and per category."""
    lines = [f"flagged {summary['flagged']}/{summary['judged']} judged replies = {_rate_text(summary)} "
             f"(95% CI {_ci(summary)}) at threshold {summary['threshold']}; {summary['n']} replies, "
             f"abstain {summary['abstain']}, failed {summary['failed']}"]
    if summary.get("skipped"):
        lines.append("not judged: " + ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()))
    for title, part in (("principle", summary["by_principle"]), ("category", summary["by_category"])):
        lines.append(f"{title:<24} {'judged':>6} {'flagged':>7} {'rate':>6} {'95% CI':>11} {'abst':>5} {'fail':>5}")
        for name, e in part.items():
            lines.append(f"  {name:<22} {e['judged']:>6} {e['flagged']:>7} {_rate_text(e):>6} {_ci(e):>11} "
                         f"{e['abstain']:>5} {e['failed']:>5}")
    if summary.get("not_ok_by_reason"):
        lines.append("no score: " + ", ".join(f"{k} {v}" for k, v in summary["not_ok_by_reason"].items()))
    return "\n".join(lines)
