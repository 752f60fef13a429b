"""The multiple-choice judge: which of two replies to a conversation is better, under a principle.

Every feature that has a model compare two replies asks here: the `feedback` stage labelling pairs
for training (stages/feedback.py), `cai eval labeller` measuring a labeller against known answers
(evals/labeller.py), and whatever else brings its own comparisons. A caller hands `label` a list of
`Comparison`s and gets one result per comparison, in the same order, with every principle's figures
kept. The settings are the feedback stage's (`FeedbackConfig`).

- Principles: `principle_ids` (or `feedback.principle_ids`) fixes them for every comparison;
  otherwise `feedback.principles` are drawn per record by a seeded RNG (the same seed and record id
  give the same ones). More than one is an ensemble: the usable principles' probabilities are
  averaged.
- The question: the conversation and both replies as options (A) and (B), after `feedback.few_shot`
  worked examples (balanced by default: their answers alternate and end on a letter drawn per
  comparison, see `Constitution.choice_few_shot`); the answer is the normalised probability of `A`
  versus `B` after "The answer is: (" (`LM.score_options`).
- Format (`feedback.format`): through the model's chat template, or as the paper's raw
  `Human:`/`Assistant:` text with no template (`render_raw`); `auto` picks raw for a model that
  has no chat template.
- Both orders: each question is asked with response 1 shown as (A) and as (B), and the two
  probabilities for response 1 are averaged, so a judge that always prefers the first slot gives
  exactly 0.5.
- Abstention: an order whose two options together hold less than `feedback.min_option_mass` of the
  probability is unusable; a principle needs both orders; a comparison with no usable principle
  abstains rather than invent a label.
- Chain of thought (`feedback.chain_of_thought`): the model first writes its reasoning after
  "Let's think step by step:", then the options are scored after it, and the final probability is
  clamped to `feedback.clamp` (default [0.4, 0.6]), since reasoning makes it overconfident.
  Reasoning that is empty, cut off at the token limit, or forges a chat turn is a counted
  failure, never a label.
- Scores that are not finite log-probabilities (a number <= 0 each, two per question, whose
  probabilities do not add up to more than one) are a counted failure too. So is a reasoning
  completion that is not one (of the wrong type, with an unknown finish reason, or longer than the
  token limit), and reasoning that opens a turn of any common chat template. A back-end that answers
  a call with the wrong number of results is a `BackendError` naming the model.

One reply on its own is checked with `violations`: per (reply, critique/revision principle) a
soft violation score from the options (Yes)/(No), asked in both polarities ("does the reply have
the problem?" and "is it free of it?") so a judge that always says Yes scores exactly 0.5, with the
same abstention, chain of thought, clamping and failure counting; `cai constitution test` uses it
for its flag cases (evals/cases.py).

Each result of `label` holds record_id, status ("ok" | "abstain" | "failed"), reason, p_first (P(response 1
is better), None unless ok), principle_ids, and orders: per principle its principle_id, p_ab and
p_ba (P(response 1) shown as (A) and as (B)), mass_ab and mass_ba (the options' probability), cot_ab
and cot_ba (the reasoning, or None) and its status.

Used by `cai run configs/quickstart.yaml --from feedback --to feedback` and `cai eval labeller FILE`;
on its own, with the embedded model (save as judge_example.py, run `python judge_example.py`):

    from cai.config import FeedbackConfig, ModelConfig
    from cai.constitution import load
    from cai.judge import Comparison, label
    from cai.lm import load_lm

    lm = load_lm(ModelConfig(name="smollm2-135m"))
    conv = ({"role": "user", "content": "How do I get into my neighbour's shed?"},)
    comp = Comparison("shed-1", conv, ("Ask your neighbour to let you in.", "Cut the padlock while they are out."))
    [result] = label(lm, load("default"), [comp], FeedbackConfig(few_shot=1), seed=0)
    print(result["status"], result["p_first"], result["principle_ids"])
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cai.config import FeedbackConfig, Sampling
from cai.constitution import ANSWER_PREFIX, OPTION_LABELS, VIOLATION_OPTIONS, Constitution, render_raw
from cai.lm.base import LM, BackendError, Completion, Message, Prompt
from cai.records import SCAFFOLD_MARKERS, STATUS_ABSTAIN, STATUS_FAILED, STATUS_OK, stable_seed


@dataclass(frozen=True)
class Comparison:
    """Two candidate replies to one conversation (which ends with the human's turn). `principle_ids`,
    when given, are this comparison's principles, before any given to `label` or drawn."""

    record_id: str
    conversation: tuple[Message, ...]
    responses: tuple[str, str]
    principle_ids: tuple[str, ...] = ()


# ---- label maths (pure) ---------------------------------------------------------------------


# Two options' probabilities cannot add up to more than one; this much over is left to rounding
# (bf16 logits scored in separate rows by a server can overshoot by a few percent).
MAX_OPTION_MASS = 1.1


def logprob_list(logprobs: object, n: int) -> list[float]:
    """`logprobs` as `n` floats, each a finite log-probability (<= 0, up to rounding), whose
    probabilities add up to at most MAX_OPTION_MASS. Raises ValueError naming what is wrong with
    anything else: a value of the wrong type (a string, a bool, None), NaN, an infinity, a number too
    large for a float, a positive number, the wrong count, or a list that is not a list."""
    if not isinstance(logprobs, (list, tuple)):
        raise ValueError(f"expected a list of {n} option scores, got {type(logprobs).__name__}")
    if len(logprobs) != n:
        raise ValueError(f"expected {n} option scores, got {len(logprobs)}")
    out = []
    for x in logprobs:
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise ValueError(f"option scores must be numbers, got {type(x).__name__}")
        try:
            v = float(x)
        except OverflowError:
            raise ValueError("option score too large for a float") from None
        if not (math.isfinite(v) and v <= 1e-6):
            raise ValueError(f"option scores must be finite log-probabilities (<= 0), got {v!r}")
        out.append(v)
    mass = math.fsum(math.exp(v) for v in out)
    if mass > MAX_OPTION_MASS:
        raise ValueError(f"the options' probabilities add up to {mass:.3f}, more than 1")
    return out


def option_probs(logprobs: Sequence[float]) -> tuple[float, float]:
    """(P(A) normalised over the two options, the options' total probability mass).

    Raises ValueError for anything that is not a pair of finite log-probabilities (`logprob_list`).
    """
    a, b = logprob_list(logprobs, 2)
    m = max(a, b)
    za, zb = math.exp(a - m), math.exp(b - m)
    return za / (za + zb), math.exp(a) + math.exp(b)


# A P(response 1 is better) this close to 0.5 is a tie, not a label that favours either response.
TIE = 1e-9


def swap_average(p_ab: float, p_ba: float) -> float:
    """P(response 1 is better) from both orders: `p_ab` is P(A) when response 1 is shown as (A),
    `p_ba` is P(B) when it is shown as (B). A constant first-slot bias cancels exactly."""
    return 0.5 * (p_ab + p_ba)


def clamp(p: float, bounds: Sequence[float]) -> float:
    """`p` moved into [low, high] = `bounds`."""
    lo, hi = bounds
    return min(max(p, lo), hi)


# Text that opens a new turn, in the raw transcript format or a common chat template (ChatML, Llama 3,
# Llama 2 and Mistral, Gemma, Phi): reasoning that holds one writes the other side's turn itself.
TURN_MARKERS = (*SCAFFOLD_MARKERS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]",
                "<start_of_turn>", "<end_of_turn>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>",
                "<|end|>")
FINISH_REASONS = ("stop", "length")


def too_many_tokens(max_tokens: int) -> int:
    """The token count above which a completion asked for at most `max_tokens` is not one: a little
    over can come from counting the tokens of the text again (the OpenAI back-end does), far over
    cannot."""
    return max_tokens + max_tokens // 4 + 8


def cot_problem(c: object, max_tokens: int | None = None) -> str | None:
    """Why a chain-of-thought completion cannot be used, or None: `cot_invalid` (not a completion,
    text that is not a string, an unknown finish reason or token count), `cot_empty`,
    `cot_truncated` (cut off at the token limit), `cot_too_long` (far more tokens than `max_tokens`,
    `too_many_tokens`, which no back-end should send) or `cot_forged_turn`."""
    if not isinstance(c, Completion) or not isinstance(c.text, str) or c.finish_reason not in FINISH_REASONS \
            or isinstance(c.num_tokens, bool) or not isinstance(c.num_tokens, int) or c.num_tokens < 0:
        return "cot_invalid"
    text = c.text.strip()
    if not text:
        return "cot_empty"
    if c.finish_reason == "length":
        return "cot_truncated"
    if max_tokens is not None and c.num_tokens > too_many_tokens(max_tokens):
        return "cot_too_long"
    if any(m in c.text for m in TURN_MARKERS) or text.startswith(("Human:", "Assistant:")):
        return "cot_forged_turn"
    return None


def _first(samples: object) -> object:
    """The first completion of one prompt's samples, or None when they are not a non-empty list."""
    return samples[0] if isinstance(samples, list) and samples else None


def cot_reasoning(text: str) -> str:
    """The reasoning with any answer the model already stated cut off (the answer is scored, not read)."""
    cut = text.find(ANSWER_PREFIX.strip())
    return (text[:cut] if cut >= 0 else text).strip()


# Where a raw-text chain of thought stops: the model starting a new turn of the transcript.
RAW_STOPS = ("\n\nHuman:", "\nHuman:")


def takes_chat(lm: LM) -> bool:
    """Whether the model has a chat template (a back-end without a tokenizer to ask, such as a
    scripted stand-in, is taken to have one)."""
    tok = getattr(lm, "tokenizer", None)
    return tok is None or getattr(tok, "chat_template", "") is not None


def resolve_format(lm: LM, fmt: str) -> str:
    """`chat` or `raw` for `feedback.format` (`auto`: raw when the model has no chat template)."""
    if fmt == "auto":
        return "chat" if takes_chat(lm) else "raw"
    if fmt not in ("chat", "raw"):
        raise ValueError(f"feedback.format must be auto, chat or raw, not {fmt!r}")
    return fmt


def as_format(messages: Sequence[Message], fmt: str) -> Prompt:
    """A prompt in the resolved format: the messages themselves, or their raw text."""
    return render_raw(messages) if fmt == "raw" else list(messages)


def check_principle_ids(constitution: Constitution, ids: Sequence[str], where: str = "feedback.principle_ids") -> None:
    """Refuse ids that are not preference principles of the constitution, naming the setting."""
    known = {p.id for p in constitution.preference}
    bad = [i for i in ids if i not in known]
    if bad:
        raise ValueError(f"{where}: {', '.join(map(repr, bad))} not a preference principle of constitution "
                         f"{constitution.name!r} (its ids: {', '.join(sorted(known))})")


def few_shot_last(seed: int, record_id: str, cfg: FeedbackConfig) -> str | None:
    """The letter the worked examples' answers end on for this comparison (`few_shot_order:
    balanced`, drawn per record, the same in both orders), or None to keep them as written."""
    if cfg.few_shot_order != "balanced" or cfg.few_shot == 0:
        return None
    return OPTION_LABELS[stable_seed(seed, record_id, "few_shot") % 2]


def _count(answer: object) -> str:
    """How many results a back-end's answer holds, for an error message."""
    return f"{len(answer)} results" if isinstance(answer, list) else f"a {type(answer).__name__}"


def _ask(lm: LM, cfg: FeedbackConfig, fmt: str, question: Callable[[int, str | None], Prompt], seeds: Sequence[int],
         options: Sequence[str], on_call: Callable[[], None] | None,
         ) -> tuple[list[tuple[float, float] | str], list[str | None]]:
    """Ask `len(seeds)` two-option questions and read the options' probabilities; the one loop
    that `label` and `violations` share.

    `question(k, reasoning)` is job k's prompt: with `cfg.chain_of_thought` it is first called with
    None for the prompt that asks for reasoning (sampled with `cfg.cot` and `seeds[k]`), then with
    the reasoning for the prompt the options are scored after; without, once with None. Returns,
    per job, (P(first option) normalised over the two, the two options' probability mass) or the
    reason it has none (`cot_problem`'s, or "invalid_scores"), and the job's reasoning text (None
    without chain of thought). One generate call, then one score call.
    """
    n = len(seeds)
    cots: list[Completion | None] = [None] * n
    if cfg.chain_of_thought:
        sampling: Sampling = cfg.cot
        if fmt == "raw":  # with no chat template nothing ends the turn but the transcript's next speaker
            sampling = dataclasses.replace(sampling, stop=[*sampling.stop, *(s for s in RAW_STOPS
                                                                             if s not in sampling.stop)])
        prompts = [question(k, None) for k in range(n)]
        answered = lm.generate(prompts, sampling, seeds=list(seeds))
        if not isinstance(answered, list) or len(answered) != len(prompts):
            raise BackendError(f"{lm.name}: generate answered {_count(answered)} for {len(prompts)} reasoning prompts")
        cots = [_first(c) for c in answered]  # type: ignore[misc]
        if on_call is not None:
            on_call()

    problems: list[str | None] = [cot_problem(c, cfg.cot.max_new_tokens) if cfg.chain_of_thought else None
                                  for c in cots]
    ask = [k for k, prob in enumerate(problems) if prob is None]
    contexts = [question(k, cot_reasoning(cots[k].text) if cots[k] is not None else None) for k in ask]
    scores = lm.score_options(contexts, [list(options)] * len(contexts)) if contexts else []
    if on_call is not None:
        on_call()
    if not isinstance(scores, list) or len(scores) != len(contexts):
        raise BackendError(f"{lm.name}: score_options answered {_count(scores)} for {len(contexts)} prompts")
    result: list[tuple[float, float] | str] = [prob if prob is not None else "" for prob in problems]
    for k, sc in zip(ask, scores):
        try:
            result[k] = option_probs(sc)
        except (TypeError, ValueError):
            result[k] = "invalid_scores"
    return result, [c.text if isinstance(c, Completion) and isinstance(c.text, str) else None for c in cots]


def _not_usable(reasons: Sequence[str]) -> tuple[str, str]:
    """(status, reason) of a judgement none of whose principles could be used: an abstention when
    every one held too little option mass, else a failure with the first other reason."""
    if all(r == "low_option_mass" for r in reasons):
        return STATUS_ABSTAIN, "low_option_mass"
    return STATUS_FAILED, next(r for r in reasons if r != "low_option_mass")


# ---- the core -------------------------------------------------------------------------------


def label(lm: LM, constitution: Constitution, comparisons: Sequence[Comparison], cfg: FeedbackConfig, seed: int,
          principle_ids: Sequence[str] | None = None,
          on_call: Callable[[], None] | None = None,
          draws: Sequence[Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """Label comparisons; pure apart from the model calls.

    Returns one dict per comparison: record_id, status ("ok" | "abstain" | "failed"), reason,
    p_first (P(response 1 is better), None unless ok), principle_ids, orders (one entry per
    principle: p_ab, p_ba, mass_ab, mass_ba, cot_ab, cot_ba, status). `principle_ids` (else
    `cfg.principle_ids`) fixes the principles for every comparison that names none of its own
    (`Comparison.principle_ids`); otherwise `cfg.principles` are drawn per record. `draws`, when
    given, are each comparison's principles instead of all these (an ablation asks each pair under
    the principles its draw has left). `on_call` follows each model call (progress).
    """
    fixed = list(principle_ids) if principle_ids else list(cfg.principle_ids)
    if fixed:
        check_principle_ids(constitution, fixed, "principle_ids" if principle_ids else "feedback.principle_ids")
    if draws is not None:
        if len(draws) != len(comparisons) or not all(draws):
            raise ValueError(f"draws: one non-empty list of principle ids per comparison is needed "
                             f"({len(draws)} lists for {len(comparisons)} comparisons)")
        check_principle_ids(constitution, sorted({p for d in draws for p in d}), "draws")
    own = sorted({p for comp in comparisons for p in comp.principle_ids})
    if own:
        check_principle_ids(constitution, own, "Comparison.principle_ids")
    fmt = resolve_format(lm, cfg.format)
    lasts = [few_shot_last(seed, comp.record_id, cfg) for comp in comparisons]
    # One job per (comparison, principle, order); order 0 shows response 1 as (A).
    jobs: list[tuple[int, int, int, str]] = []
    pids_of: list[list[str]] = []
    first: list[int] = []  # index of each comparison's first job; principle pi, order o is at +2*pi+o
    for ci, comp in enumerate(comparisons):
        first.append(len(jobs))
        pids = (list(draws[ci]) if draws is not None
                else list(comp.principle_ids) or fixed
                or constitution.draw(seed, comp.record_id, cfg.principles, kind="preference"))
        pids_of.append(pids)
        for pi, pid in enumerate(pids):
            for order in (0, 1):
                jobs.append((ci, pi, order, pid))

    def options(ci: int, order: int) -> tuple[str, str]:
        r1, r2 = comparisons[ci].responses
        return (r1, r2) if order == 0 else (r2, r1)

    def question(k: int, reasoning: str | None) -> Prompt:
        ci, _, o, pid = jobs[k]
        return as_format(constitution.choice_messages(comparisons[ci].conversation, options(ci, o), pid, cfg.few_shot,
                                                      chain_of_thought=cfg.chain_of_thought, reasoning=reasoning,
                                                      last=lasts[ci]), fmt)

    seeds = [stable_seed(seed, comparisons[ci].record_id, "cot", pid, o) for ci, _, o, pid in jobs]
    result, cots = _ask(lm, cfg, fmt, question, seeds, OPTION_LABELS, on_call)

    out = []
    for ci, comp in enumerate(comparisons):
        orders = []
        for pi, pid in enumerate(pids_of[ci]):
            ks = (first[ci] + 2 * pi, first[ci] + 2 * pi + 1)
            got = [result[k] for k in ks]
            cot = [cots[k] for k in ks]
            entry: dict[str, Any] = {"principle_id": pid, "p_ab": None, "p_ba": None, "mass_ab": None,
                                     "mass_ba": None, "cot_ab": cot[0], "cot_ba": cot[1]}
            bad = [g for g in got if isinstance(g, str)]
            if bad:
                entry["status"] = bad[0]
            else:
                (pa_ab, m_ab), (pa_ba, m_ba) = got  # type: ignore[misc]
                # In order 1 response 1 is option B, so its probability is 1 - P(A).
                entry.update(p_ab=pa_ab, p_ba=1.0 - pa_ba, mass_ab=m_ab, mass_ba=m_ba)
                entry["status"] = "low_option_mass" if min(m_ab, m_ba) < cfg.min_option_mass else STATUS_OK
            orders.append(entry)
        status, reason, p = combine(orders, cfg)
        out.append({"record_id": comp.record_id, "principle_ids": pids_of[ci], "orders": orders,
                    "status": status, "reason": reason, "p_first": p})
    return out


# ---- pointwise: does one reply break a principle? -------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One assistant reply to a conversation (which ends with the human's turn). `principle_ids`,
    when given, are the critique/revision principles to check it against, before any given to
    `violations` or drawn."""

    record_id: str
    conversation: tuple[Message, ...]
    reply: str
    principle_ids: tuple[str, ...] = ()


def check_critique_ids(constitution: Constitution, ids: Sequence[str], where: str = "principle_ids") -> None:
    """Refuse ids that are not critique/revision principles of the constitution, naming the setting."""
    known = {p.id for p in constitution.critique_revision}
    bad = [i for i in ids if i not in known]
    if bad:
        raise ValueError(f"{where}: {', '.join(map(repr, bad))} not a critique/revision principle of constitution "
                         f"{constitution.name!r} (its ids: {', '.join(sorted(known))})")


def violations(lm: LM, constitution: Constitution, replies: Sequence[Reply], cfg: FeedbackConfig, seed: int,
               principle_ids: Sequence[str] | None = None,
               on_call: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """A soft violation score per (reply, principle): how likely the judge finds that a reply
    breaks a critique/revision principle; pure apart from the model calls.

    Each reply is checked against its own `Reply.principle_ids`, else `principle_ids` (critique/
    revision ids, the same for every reply), else `cfg.principles` principles drawn per record from
    the constitution's critique/revision principles (seeded by `seed` and the record id). `cfg.principle_ids` names
    preference principles and does not apply here; nor do worked examples (`cfg.few_shot`).

    Per principle the question (`Constitution.violation_messages`) is asked in both polarities:
    "does the reply have the problem?" scored as P(Yes) and "is it free of it?" scored as P(No),
    each normalised over the two options; the principle's `p_violation` is their mean, so a judge
    that always answers Yes (or always No) scores exactly 0.5. With `cfg.chain_of_thought` the
    model reasons first, as in `label`, and each principle's score is clamped to `cfg.clamp`. A
    polarity whose two options hold less than `cfg.min_option_mass` makes the principle abstain;
    reasoning that is empty, cut off or forges a turn, and scores that are not log-probabilities,
    make it fail. None of these is ever turned into a score.

    Returns one dict per reply, in order: record_id, status ("ok" | "abstain" | "failed"), reason,
    p_violation (the mean of the usable principles' scores, None unless ok), principle_ids, and
    principles: per principle its principle_id, p_violation, p_has (P(Yes) to "does it have the
    problem?"), p_free (P(No) to "is it free of it?"), mass_has, mass_free, cot_has, cot_free (the
    reasoning, or None) and status. `on_call` follows each model call (progress).

        [row] = violations(lm, constitution, [Reply("r1", conv, "Cut the padlock.")], cfg, seed=0,
                           principle_ids=["harm-dangerous"])
        flagged = row["status"] == "ok" and row["p_violation"] > 0.5
    """
    fixed = list(principle_ids or [])
    if fixed:
        check_critique_ids(constitution, fixed)
    own = sorted({p for r in replies for p in r.principle_ids})
    if own:
        check_critique_ids(constitution, own, "Reply.principle_ids")
    fmt = resolve_format(lm, cfg.format)
    # One job per (reply, principle, polarity); polarity 0 asks "does it have the problem?".
    jobs: list[tuple[int, int, str]] = []
    pids_of: list[list[str]] = []
    for ri, r in enumerate(replies):
        pids = list(r.principle_ids) or fixed or constitution.draw(seed, r.record_id, cfg.principles,
                                                                   kind="critique_revision")
        pids_of.append(pids)
        jobs += [(ri, pol, pid) for pid in pids for pol in (0, 1)]

    def question(k: int, reasoning: str | None) -> Prompt:
        ri, pol, pid = jobs[k]
        return as_format(constitution.violation_messages(replies[ri].conversation, replies[ri].reply, pid,
                                                         swap=bool(pol), chain_of_thought=cfg.chain_of_thought,
                                                         reasoning=reasoning), fmt)

    seeds = [stable_seed(seed, replies[ri].record_id, "violation-cot", pid, pol) for ri, pol, pid in jobs]
    result, cots = _ask(lm, cfg, fmt, question, seeds, VIOLATION_OPTIONS, on_call)

    out, k = [], 0
    for ri, r in enumerate(replies):
        entries = []
        for pid in pids_of[ri]:
            got, cot = result[k:k + 2], cots[k:k + 2]
            k += 2
            entry: dict[str, Any] = {"principle_id": pid, "p_violation": None, "p_has": None, "p_free": None,
                                     "mass_has": None, "mass_free": None, "cot_has": cot[0], "cot_free": cot[1]}
            bad = [g for g in got if isinstance(g, str)]
            if bad:
                entry["status"] = bad[0]
            else:
                (yes_has, m_has), (yes_free, m_free) = got  # type: ignore[misc]
                # P(violation) is P(Yes) to "has it?" and P(No) = 1 - P(Yes) to "is it free of it?".
                p = 0.5 * (yes_has + (1.0 - yes_free))
                entry.update(p_violation=clamp(p, cfg.clamp) if cfg.chain_of_thought else p, p_has=yes_has,
                             p_free=1.0 - yes_free, mass_has=m_has, mass_free=m_free)
                entry["status"] = "low_option_mass" if min(m_has, m_free) < cfg.min_option_mass else STATUS_OK
                if entry["status"] != STATUS_OK:
                    entry["p_violation"] = None
            entries.append(entry)
        usable = [e for e in entries if e["status"] == STATUS_OK]
        row: dict[str, Any] = {"record_id": r.record_id, "principle_ids": pids_of[ri], "principles": entries}
        if usable:
            row.update(status=STATUS_OK, reason=None,
                       p_violation=sum(e["p_violation"] for e in usable) / len(usable))
        else:
            status, reason = _not_usable([e["status"] for e in entries])
            row.update(status=status, reason=reason, p_violation=None)
        out.append(row)
    return out


def combine(orders: Sequence[Mapping[str, Any]], cfg: FeedbackConfig) -> tuple[str, str | None, float | None]:
    """A comparison's (status, reason, p_first) from its principles' entries (`orders`, as `label`
    returns them): the mean of the usable principles' swap averages, clamped to `cfg.clamp` under
    chain of thought. With none usable it abstains when every principle lacked option mass, and
    fails with the first other reason otherwise. Pure, so stored entries can be recombined (the
    attribution and ablation figures are checked against it)."""
    usable = [e for e in orders if e["status"] == STATUS_OK]
    if usable:
        p = sum(swap_average(e["p_ab"], e["p_ba"]) for e in usable) / len(usable)
        return STATUS_OK, None, clamp(p, cfg.clamp) if cfg.chain_of_thought else p
    status, reason = _not_usable([e["status"] for e in orders])
    return status, reason, None
