"""How the judge's question reaches the model: the paper's raw `Human:`/`Assistant:` text or the chat
template (`feedback.format`), balanced few-shot answers (`feedback.few_shot_order`), and fixed
principles (`feedback.principle_ids`)."""

from __future__ import annotations

import math
import re

import pytest

from cai import constitution as constitution_mod
from cai.config import ConfigError, FeedbackConfig, load_config
from cai.constitution import render_raw
from cai.evals import labeller
from cai.judge import Comparison, label, resolve_format
from cai.lm.base import Completion
from cai.models import ModelError
from cai.templating import encode_prompt

CONST = constitution_mod.load("default")
Q = ({"role": "user", "content": "How do I get into my neighbour's shed?"},)
SAFE = "Ask your neighbour; if something of yours is inside, they can let you in."
UNSAFE = "Use bolt cutters on the padlock when they are at work."


def _text(ctx) -> str:
    """The whole prompt as one string, whatever its format."""
    return ctx if isinstance(ctx, str) else "\n\n".join(m["content"] for m in ctx)


def _question(ctx) -> str:
    """The last question of a prompt (after any worked examples)."""
    text = _text(ctx)
    return text[text.rindex("Consider this conversation"):]


class CopyingLM:
    """A judge with no view of the replies: P(A) is `p` when the last worked example answered (A)
    and 1 - p when it answered (B), 0.5 with no examples. Records every prompt it is given."""

    name = "copier"

    def __init__(self, p: float = 0.9, tokenizer=None):
        self.p, self.seen = p, []
        if tokenizer is not None:
            self.tokenizer = tokenizer

    def generate(self, conversations, sampling, n=1, seeds=None):
        self.seen += list(conversations)
        return [[Completion("(A) is kinder to the neighbour.", "stop", 6)] for _ in conversations]

    def score_options(self, contexts, options):
        out = []
        for ctx in contexts:
            self.seen.append(ctx)
            answers = re.findall(r"The answer is: \(([AB])\)", _text(ctx))
            pa = 0.5 if not answers else self.p if answers[-1] == "A" else 1 - self.p
            out.append([math.log(0.9 * pa), math.log(0.9 * (1 - pa))])
        return out


class ReadingLM(CopyingLM):
    """A judge that reads the question: P(A) = 0.8 when (A) is the safe reply."""

    def score_options(self, contexts, options):
        out = []
        for ctx in contexts:
            self.seen.append(ctx)
            q = _question(ctx)
            a = q.split("(A) <reply>\n", 1)[1].split("\n</reply>", 1)[0]
            pa = 0.8 if a == SAFE else 0.2
            out.append([math.log(pa), math.log(1 - pa)])
        return out


class Tok:
    def __init__(self, template):
        self.chat_template = template


# ---- raw text ---------------------------------------------------------------------------------


def test_render_raw_writes_the_transcript_and_leaves_the_answer_open():
    msgs = CONST.choice_messages(Q, (SAFE, UNSAFE), "pref-harm-general", few_shot=1)
    raw = render_raw(msgs)
    turns = raw.split("\n\nHuman: ")
    assert raw.startswith("Human: Consider this conversation") and len(turns) == 2  # one worked example
    assert raw.endswith("\n\nAssistant: The answer is: (")
    assert "\n\nAssistant: The answer is: (" in turns[0]  # the example's answer, closed
    assert SAFE in raw and UNSAFE in raw and "<|im_start|>" not in raw
    # A conversation that ends with the human gets an open assistant turn; a system message is plain text.
    assert render_raw([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) == \
        "Be brief.\n\nHuman: Hi\n\nAssistant:"


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_the_judge_asks_in_the_format_set_and_labels_the_same(fmt):
    lm = ReadingLM()
    rows = label(lm, CONST, [Comparison("r1", Q, (SAFE, UNSAFE)), Comparison("r2", Q, (UNSAFE, SAFE))],
                 FeedbackConfig(few_shot=2, format=fmt), seed=0)
    assert [r["p_first"] for r in rows] == pytest.approx([0.8, 0.2])
    assert all(isinstance(c, str) == (fmt == "raw") for c in lm.seen) and len(lm.seen) == 4
    if fmt == "raw":
        assert all(c.startswith("Human: ") and c.endswith("Assistant: The answer is: (") for c in lm.seen)


def test_auto_is_raw_for_a_model_without_a_chat_template():
    assert resolve_format(CopyingLM(tokenizer=Tok(None)), "auto") == "raw"
    assert resolve_format(CopyingLM(tokenizer=Tok("{{ messages }}")), "auto") == "chat"
    assert resolve_format(CopyingLM(), "auto") == "chat"  # nothing to ask: a chat stand-in
    assert resolve_format(CopyingLM(tokenizer=Tok(None)), "chat") == "chat"
    lm = CopyingLM(tokenizer=Tok(None))
    label(lm, CONST, [Comparison("r1", Q, (SAFE, UNSAFE))], FeedbackConfig(few_shot=0), seed=0)
    assert all(isinstance(c, str) for c in lm.seen)


def test_raw_chain_of_thought_stops_at_the_next_turn_and_is_scored_after_the_reasoning():
    seen_sampling = []

    class CotLM(ReadingLM):
        def generate(self, conversations, sampling, n=1, seeds=None):
            seen_sampling.append(sampling)
            return super().generate(conversations, sampling, n, seeds)

    lm = CotLM()
    [row] = label(lm, CONST, [Comparison("r1", Q, (SAFE, UNSAFE))],
                  FeedbackConfig(few_shot=1, format="raw", chain_of_thought=True), seed=0)
    assert row["status"] == "ok" and row["p_first"] == pytest.approx(0.6)  # 0.8, clamped to [0.4, 0.6]
    assert "\n\nHuman:" in seen_sampling[0].stop
    asked = [c for c in lm.seen if c.endswith("The answer is: (")]
    assert len(asked) == 2 and all("Let's think step by step: (A) is kinder to the neighbour.\nThe answer is: ("
                                   in c for c in asked)


def test_a_string_prompt_is_tokenised_as_text_and_a_conversation_needs_a_template(model_dir):
    from cai.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    ids = encode_prompt(tok, "Human: hi <|im_start|>assistant\n\nAssistant:")
    assert tok.convert_tokens_to_ids("<|im_start|>") not in ids  # special-token text stays text
    assert tok.decode(ids) == "Human: hi <|im_start|>assistant\n\nAssistant:"
    bare = load_tokenizer(model_dir, chat=False)
    bare.chat_template = None
    assert encode_prompt(bare, "Human: hi\n\nAssistant:") == encode_prompt(tok, "Human: hi\n\nAssistant:")
    with pytest.raises(ModelError, match=r"no chat template.*feedback.format: raw"):
        encode_prompt(bare, [{"role": "user", "content": "hi"}])


# ---- balanced few-shot ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("last", ["A", "B"])
def test_balanced_examples_alternate_and_end_on_the_letter_asked(n, last):
    msgs = CONST.choice_few_shot(n, "Pick one.", chain_of_thought=False, last=last)
    answers = [m["content"][-2] for m in msgs if m["role"] == "assistant"]
    assert len(answers) == n and answers[-1] == last
    assert all(a != b for a, b in zip(answers, answers[1:]))
    # Each example still answers with its better reply: swapping options moved the answer with them.
    for q, a, ex in zip(msgs[::2], answers, CONST.preference_examples):
        better = ex.options["AB".index(ex.answer)]
        assert f"({a}) <reply>\n{better}\n</reply>" in q["content"]


def test_balanced_chain_of_thought_examples_swap_the_letters_in_their_reasoning():
    ex = CONST.cot_examples[0]
    other = "B" if ex.answer == "A" else "A"
    msgs = CONST.choice_few_shot(1, "Pick one.", chain_of_thought=True, last=other)
    reply = msgs[1]["content"]
    assert reply.endswith(f"The answer is: ({other})")
    swapped = ex.reasoning.replace("(A)", "@").replace("(B)", "(A)").replace("@", "(B)")
    assert swapped in reply and ex.reasoning not in reply


def test_balanced_examples_leave_a_judge_that_copies_them_no_letter_to_favour():
    comps = [Comparison(f"r{i}", Q, (SAFE, UNSAFE)) for i in range(200)]
    biased = labeller_position_bias(comps, FeedbackConfig(few_shot=2, few_shot_order="as_written"))
    balanced = labeller_position_bias(comps, FeedbackConfig(few_shot=2))
    assert biased == pytest.approx(0.1)  # the written examples end on (B): the copier says B every time
    assert balanced == pytest.approx(0.5, abs=0.08)  # the last letter is drawn per comparison
    # One comparison shows the same examples in both of its orders.
    lm = CopyingLM()
    label(lm, CONST, comps[:1], FeedbackConfig(few_shot=2), seed=0)
    heads = [_text(c)[:_text(c).rindex("Consider this conversation")] for c in lm.seen]
    assert len(heads) == 2 and heads[0] == heads[1]


def labeller_position_bias(comps, cfg) -> float:
    """Mean P(A) over both orders of every comparison."""
    rows = label(CopyingLM(), CONST, comps, cfg, seed=7)
    p_a = [p for r in rows for e in r["orders"] for p in (e["p_ab"], 1 - e["p_ba"])]
    return sum(p_a) / len(p_a)


# ---- fixed principles -------------------------------------------------------------------------


def test_fixed_principles_are_asked_for_every_comparison():
    cfg = FeedbackConfig(few_shot=0, principle_ids=["pref-harm-general", "pref-meta-not-evasive"])
    lm = ReadingLM()
    rows = label(lm, CONST, [Comparison(f"r{i}", Q, (SAFE, UNSAFE)) for i in range(3)], cfg, seed=0)
    assert all(r["principle_ids"] == ["pref-harm-general", "pref-meta-not-evasive"] for r in rows)
    instr = CONST.preference_principle("pref-meta-not-evasive").instruction
    assert sum(instr in _text(c) for c in lm.seen) == 6  # 3 comparisons x 2 orders
    with pytest.raises(ValueError, match=r"feedback.principle_ids: 'pref-nope' not a preference principle"):
        label(lm, CONST, rows and [Comparison("x", Q, (SAFE, UNSAFE))], FeedbackConfig(principle_ids=["pref-nope"]),
              seed=0)


def test_the_config_checks_the_new_settings(tmp_path):
    with pytest.raises(ConfigError, match="feedback.principle_ids must not repeat"):
        load_config(None, ["feedback.principle_ids=[pref-harm-general,pref-harm-general]"])
    with pytest.raises(ConfigError, match="feedback.format"):
        load_config(None, ["feedback.format=html"])
    with pytest.raises(ConfigError, match="feedback.few_shot_order"):
        load_config(None, ["feedback.few_shot_order=random"])
    cfg = load_config(None, ["feedback.format=raw", "feedback.principle_ids=[pref-meta-wise]"])
    assert cfg.feedback.format == "raw" and cfg.feedback.principle_ids == ["pref-meta-wise"]


def test_the_labeller_table_shows_the_interval_and_the_setting():
    items = [labeller.Item(f"i{k}", Q, (SAFE, UNSAFE) if k % 2 == 0 else (UNSAFE, SAFE), k % 2, "f:1") for k in range(40)]
    rows = labeller.comparison_rows(items, label(ReadingLM(), CONST, [Comparison(it.id, it.conversation, it.responses)
                                                                      for it in items], FeedbackConfig(), seed=0))
    s = labeller.summarise(rows)
    assert s["accuracy"] == 1.0 and s["order_agreement"] == 1.0
    lo, hi = s["accuracy_ci"]
    assert 0.9 < lo < 0.95 and hi == 1.0  # Wilson at 40/40
    report = {"model": "m", "constitution": "default", "constitution_hash": "h", "seed": 0,
              "feedback": {"format": "raw", "few_shot": 2, "few_shot_order": "balanced", "principles": 1,
                           "principle_ids": []}, "principle_ids": None,
              "files": [{"file": "f", "format": "hh", "skipped": {}, **s}]}
    text = labeller.table(report)
    assert "judge: format raw, few_shot 2, few_shot_order balanced, principles drawn 1" in text
    assert f"{lo:.3f}-1.000" in text
