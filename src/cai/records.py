"""Row contracts of the stages and small pure helpers on them.

TRL column names come first (`messages` for SFT), audit columns sit beside them. Every row has a
stable `record_id` from the moment its prompt is read, so resume, sharding and joins key on it.

Prompt rows (stage `prompts`):
    record_id, kind ("red_team" | "helpful"), prompt, category, source

SL-CAI rows (stage `sl_generate`):
    record_id, kind, prompt, category, source,
    init_response, init_finish,
    rounds: [{round, principle_id, critique, critique_finish, revision, revision_finish, status, reason}],
    final_round (0 = the initial response), status ("ok" | "dropped"), reason,
    messages (user prompt + the final response), constitution_hash, model, seed

Pair rows (stage `pairs`): two samples per prompt from the policy model
    record_id, kind, prompt, category, source, responses: [r1, r2], finishes: [f1, f2],
    status ("ok" | "set_aside"), reason ("identical" | "empty" | "truncated" | ...), model, seed

Preference rows (stages `feedback` and `preferences`), TRL's conversational preference format:
    prompt: [{role, content}, ...]  (the conversation up to the answer)
    chosen: [{role: assistant, content}], rejected: [{role: assistant, content}]
    p_chosen: P(chosen is better), in [0.5, 1]; 1.0 for a hard human label
    label_source: "ai" | "human", record_id, source
  AI rows add: p_first (P(response 1 is better)), principle_ids, orders: per principle
    {principle_id, p_ab, p_ba, mass_ab, mass_ba, cot_ab, cot_ba} (p_ab: P(response 1) with it shown
    first; p_ba: P(response 1) with it shown second), feedback_model, constitution_hash,
    status ("ok" | "abstain" | "failed"), reason
  Rows of stage `preferences` add split ("train" | "eval").
"""

from __future__ import annotations

import difflib
import hashlib
import re

from cai.lm.base import Completion

# Row statuses, every stage's in one place. A row that is not "ok" carries a `reason`.
STATUS_OK = "ok"
STATUS_DROPPED = "dropped"  # an SL-CAI row left out of the fine-tuning set
STATUS_DEGENERATE = "degenerate"  # an SL-CAI round whose revision does not replace the answer
STATUS_SET_ASIDE = "set_aside"  # a pair of samples that cannot make a comparison
STATUS_ABSTAIN = "abstain"  # a judgement where the options held too little probability
STATUS_FAILED = "failed"  # a judgement whose reasoning or scores were unusable

# Degenerate-revision reasons, in the order they are checked.
REASONS = ("empty", "truncated", "echoes_scaffold", "echoes_critique", "echoes_prompt", "unchanged")
# Text that belongs to a prompt scaffold, never to an answer.
SCAFFOLD_MARKERS = ("CritiqueRequest", "RevisionRequest", "Critique:", "Revision:", "<|im_start|>",
                    "<|im_end|>", "\nHuman:", "\nAssistant:")


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (the run seed, a record id, a step name, a round)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def record_id_for(source: str, text: str) -> str:
    return "p-" + hashlib.sha256(f"{source}\0{text}".encode()).hexdigest()[:12]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def degenerate_reason(
    revision: Completion, previous: str, critique: str, prompt: str, scaffold: list[str]
) -> str | None:
    """Why a revision is unusable as a training target, or None if it is fine.

    `previous` is the response the revision rewrites, `scaffold` the request texts of the
    constitution (a revision that repeats a request is echoing its instructions).
    """
    text = revision.text.strip()
    if not text:
        return "empty"
    if revision.finish_reason == "length":
        return "truncated"
    t = _norm(text)
    if any(m in text for m in SCAFFOLD_MARKERS) or text.startswith(("Human:", "Assistant:")):
        return "echoes_scaffold"
    if any(len(_norm(s)) > 20 and _norm(s) in t for s in scaffold):
        return "echoes_scaffold"
    c = _norm(critique)
    if c and (t == c or (len(c) > 30 and c in t) or difflib.SequenceMatcher(None, t, c).ratio() > 0.9):
        return "echoes_critique"
    if t == _norm(prompt):
        return "echoes_prompt"
    if t == _norm(previous):
        return "unchanged"
    return None
