"""Tests for `cai.records` (degenerate revisions, seeds) and `cai.lm.base.normalize`."""

from __future__ import annotations

import math

import pytest

from cai import constitution as C
from cai.lm.base import Completion, normalize
from cai.records import (
    REASONS,
    SCAFFOLD_MARKERS,
    degenerate_reason,
    record_id_for,
    stable_seed,
)

PROMPT = "How can I get back at my coworker for taking credit for my work?"
PREVIOUS = "Delete their files and start a rumor about them so they learn a lesson."
CRITIQUE = ("The reply encourages sabotage and spreading rumors, which could get the user fired and hurts "
            "the coworker. It should suggest fair ways to handle the problem instead.")
REWRITE = ("Keep dated notes of what you did, share progress with your manager directly, and raise the "
           "issue calmly in a one-on-one.")


def _c(text: str, finish: str = "stop") -> Completion:
    return Completion(text=text, finish_reason=finish, num_tokens=len(text.split()))


def _reason(text: str, finish: str = "stop", scaffold: list[str] | None = None,
            previous: str = PREVIOUS, critique: str = CRITIQUE, prompt: str = PROMPT) -> str | None:
    return degenerate_reason(_c(text, finish), previous, critique, prompt, scaffold or [])


# ---- degenerate_reason ----------------------------------------------------------------------


def test_genuine_rewrite_is_fine():
    assert _reason(REWRITE) is None


def test_genuine_rewrite_is_fine_with_the_real_scaffold():
    scaffold = C.load("default").scaffold_phrases()
    assert _reason(REWRITE, scaffold=scaffold) is None


@pytest.mark.parametrize("text", ["", "   ", "\n\t\n"])
def test_empty(text):
    assert _reason(text) == "empty"


def test_empty_wins_over_truncated():
    assert _reason("", finish="length") == "empty"


def test_truncated():
    assert _reason(REWRITE, finish="length") == "truncated"


def test_truncated_checked_before_echo():
    assert _reason(PREVIOUS, finish="length") == "truncated"


@pytest.mark.parametrize("marker", SCAFFOLD_MARKERS)
def test_echoes_scaffold_markers(marker):
    assert _reason(f"{REWRITE} {marker} more text") == "echoes_scaffold"


@pytest.mark.parametrize("text", ["Human: what now?", "Assistant: " + REWRITE])
def test_echoes_scaffold_role_tags_at_start(text):
    assert _reason(text) == "echoes_scaffold"


def test_role_word_inside_a_sentence_is_not_scaffold():
    assert _reason("A Human: resources department can help. " + REWRITE) is None


def test_echoes_a_constitution_request():
    c = C.load("default")
    request = c.critique_revision[3].revision
    text = f"{REWRITE} {request}"
    assert _reason(text, scaffold=c.scaffold_phrases()) == "echoes_scaffold"
    # matched regardless of case and line wrapping
    wrapped = REWRITE + "\n" + request.upper().replace(" ", "\n  ", 3)
    assert _reason(wrapped, scaffold=c.scaffold_phrases()) == "echoes_scaffold"
    # without the scaffold list the same text is not flagged as scaffold
    assert _reason(text, scaffold=[]) != "echoes_scaffold"


def test_short_scaffold_phrases_are_ignored():
    # a very short request text would flag ordinary answers; only long ones count
    assert _reason(REWRITE, scaffold=["your manager"]) is None


def test_echoes_critique_exact_and_contained():
    assert _reason(CRITIQUE) == "echoes_critique"
    assert _reason("  " + CRITIQUE.upper() + "  ") == "echoes_critique"
    assert _reason("Here is my answer. " + CRITIQUE + " Thanks.") == "echoes_critique"


def test_echoes_critique_near_copy():
    near = CRITIQUE.replace("fired", "sacked")
    assert near != CRITIQUE
    assert _reason(near) == "echoes_critique"


def test_short_critique_inside_answer_is_not_an_echo():
    # a short critique ("Too rude.") appearing inside a real answer is not copying
    assert _reason("It was too rude. " + REWRITE, critique="Too rude.") is None


def test_echoes_prompt():
    assert _reason(PROMPT) == "echoes_prompt"
    assert _reason("  " + PROMPT.lower().replace(" ", "   ") + "\n") == "echoes_prompt"


@pytest.mark.parametrize(
    "text",
    [
        PREVIOUS,
        "  " + PREVIOUS + "\n",
        PREVIOUS.upper(),
        PREVIOUS.replace(" ", "\n"),
        PREVIOUS.replace(" ", "  \t "),
    ],
)
def test_unchanged_including_whitespace_and_case(text):
    assert _reason(text) == "unchanged"


def test_small_real_edit_is_not_unchanged():
    assert _reason(PREVIOUS.replace("Delete", "Do not delete")) is None


def test_every_reason_is_reachable_and_listed():
    got = {
        _reason(""),
        _reason(REWRITE, finish="length"),
        _reason("Critique: " + REWRITE),
        _reason(CRITIQUE),
        _reason(PROMPT),
        _reason(PREVIOUS),
    }
    assert got == set(REASONS)


# ---- seeds and ids --------------------------------------------------------------------------


def test_stable_seed_deterministic_and_in_range():
    a = stable_seed(0, "p-abc", "revision", 2)
    assert a == stable_seed(0, "p-abc", "revision", 2)
    assert 0 <= a < 2**63


@pytest.mark.parametrize(
    "other",
    [
        (1, "p-abc", "revision", 2),
        (0, "p-abd", "revision", 2),
        (0, "p-abc", "critique", 2),
        (0, "p-abc", "revision", 3),
        (0, "p-abc", "revision"),
        ("p-abc", 0, "revision", 2),
    ],
)
def test_stable_seed_is_part_sensitive(other):
    assert stable_seed(0, "p-abc", "revision", 2) != stable_seed(*other)


def test_stable_seed_spreads():
    seeds = {stable_seed(0, f"rec-{i}", "response") for i in range(500)}
    assert len(seeds) == 500


def test_record_id_for_depends_on_source_and_text():
    a = record_id_for("a.jsonl", "hello")
    assert a == record_id_for("a.jsonl", "hello")
    assert a.startswith("p-")
    assert a != record_id_for("b.jsonl", "hello")
    assert a != record_id_for("a.jsonl", "hello!")
    # the separator keeps (source, text) pairs apart
    assert record_id_for("ab", "c") != record_id_for("a", "bc")


# ---- normalize ------------------------------------------------------------------------------


@pytest.mark.parametrize("lps", [[-1.0, -2.0], [-3.5, -0.2, -7.0], [0.0], [-1000.0, -1001.0], [5.0, 5.0]])
def test_normalize_is_a_distribution(lps):
    out = normalize(lps)
    assert len(out) == len(lps)
    assert math.isclose(sum(math.exp(x) for x in out), 1.0, rel_tol=1e-9)
    assert all(x <= 1e-12 for x in out)
    for i in range(len(lps)):
        for j in range(len(lps)):
            assert math.isclose(out[i] - out[j], lps[i] - lps[j], abs_tol=1e-9)


def test_normalize_is_shift_invariant():
    a = normalize([-1.0, -2.5, -4.0])
    b = normalize([99.0, 97.5, 96.0])
    assert all(math.isclose(x, y, abs_tol=1e-9) for x, y in zip(a, b))


def test_normalize_equal_options_are_even():
    out = normalize([-12.0, -12.0])
    assert all(math.isclose(x, math.log(0.5)) for x in out)
