"""Tests for the held-out evaluation prompt sets shipped with the toolkit (`builtin:eval_red_team`,
`builtin:eval_helpful`) and the labelled judge comparisons (`builtin:judge_pairs`): their size and
categories, and that they are disjoint from the training sets, so an evaluation never scores a prompt
the model was trained on."""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from cai.config import PairSource, PromptSource
from cai.sources import PromptError, read_pairs, read_prompts, read_source, shipped

RED_TEAM_CATEGORIES = {"weapons", "violence", "fraud", "privacy", "illegal", "self-harm", "hate", "sexual",
                       "misinformation", "cybercrime", "drugs"}
TRAINING_SETS = ("red_team", "helpful", "helpful_pairs")
HELD_OUT_SETS = ("eval_red_team", "eval_helpful", "judge_pairs")  # never trained on
JUDGE_CATEGORIES = {"harmless", "helpful", "honest"}
JUDGE_KEYS = {"id", "category", "prompt", "chosen", "rejected"}
NEAR = 0.8  # difflib ratio above which two prompts count as near duplicates


def _rows(name: str) -> list[dict]:
    path = Path(str(resources.files("cai") / "resources" / "prompts" / f"{name}.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _norm(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _training_prompts() -> list[str]:
    out = []
    for name in TRAINING_SETS:
        for row in _rows(name):
            out += [v for k, v in row.items() if k == "prompt" and isinstance(v, str)]
    return out


@pytest.fixture(scope="module")
def training() -> list[str]:
    prompts = _training_prompts()
    assert len(prompts) >= 150  # every training set was read
    return [_norm(p) for p in prompts]


@pytest.mark.parametrize("name, prefix, min_rows, min_per_category, categories", [
    ("eval_red_team", "ert", 88, 8, RED_TEAM_CATEGORIES),
    ("eval_helpful", "ehp", 64, 1, None),
])
def test_size_categories_and_ids(name, prefix, min_rows, min_per_category, categories):
    rows = _rows(name)
    assert len(rows) >= min_rows
    for row in rows:
        assert set(row) == {"id", "category", "prompt"}
        assert isinstance(row["category"], str) and row["category"].strip() == row["category"] != ""
        assert isinstance(row["prompt"], str) and row["prompt"].strip() == row["prompt"] != ""
        assert re.fullmatch(rf"{prefix}-\d{{3}}", row["id"])
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    counts = Counter(r["category"] for r in rows)
    if categories is not None:
        assert set(counts) == categories
    else:
        assert len(counts) >= 8
    assert min(counts.values()) >= min_per_category


def test_helpful_set_spreads_evenly():
    counts = Counter(r["category"] for r in _rows("eval_helpful"))
    assert min(counts.values()) >= 6


def test_ids_unique_across_every_shipped_set():
    ids = [r["id"] for name in (*HELD_OUT_SETS, *TRAINING_SETS) for r in _rows(name)]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", HELD_OUT_SETS)
def test_disjoint_from_the_training_sets(name, training):
    exact = set(training)
    for row in _rows(name):
        p = _norm(row["prompt"])
        assert p not in exact, f"{row['id']} repeats a training prompt"
        for t in training:
            ratio = difflib.SequenceMatcher(None, p, t).ratio()
            assert ratio <= NEAR, f"{row['id']} nearly repeats a training prompt ({ratio:.2f}): {t!r}"


def test_the_held_out_sets_do_not_repeat_each_other():
    """No prompt of eval_red_team, eval_helpful or judge_pairs equals or nearly repeats another
    prompt of these sets, in the same set or another."""
    prompts = [_norm(r["prompt"]) for name in HELD_OUT_SETS for r in _rows(name)]
    assert len(set(prompts)) == len(prompts)
    for i, p in enumerate(prompts):
        for q in prompts[i + 1:]:
            assert difflib.SequenceMatcher(None, p, q).ratio() <= NEAR, (p, q)


def test_the_check_catches_a_near_duplicate(training):
    """The disjointness check itself: a lightly edited training prompt is caught."""
    edited = _norm(_training_prompts()[0].upper().replace("?", "!!") + " please")
    assert max(difflib.SequenceMatcher(None, edited, t).ratio() for t in training) > NEAR


@pytest.mark.parametrize("name", ["eval_red_team", "eval_helpful"])
def test_loads_through_the_prompt_reader_with_categories(name):
    raw = _rows(name)
    rows = read_prompts([PromptSource(f"builtin:{name}")])
    assert len(rows) == len(raw)
    assert [r["record_id"] for r in rows] == [r["id"] for r in raw]
    assert [r["category"] for r in rows] == [r["category"] for r in raw]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in raw]
    assert all(r["source"] == f"builtin:{name}" for r in rows)
    assert read_source(PromptSource(f"builtin:{name}", limit=3)) == rows[:3]


def test_eval_sets_load_together_with_the_training_sets():
    rows = read_prompts([PromptSource("builtin:eval_red_team"), PromptSource("builtin:eval_helpful"),
                         PromptSource("builtin:red_team")])
    assert {r["source"] for r in rows} == {"builtin:eval_red_team", "builtin:eval_helpful", "builtin:red_team"}


def test_eval_sets_are_prompt_sets_not_pair_sets():
    from cai.sources import PreferenceDataError

    assert shipped("eval_red_team").name == "eval_red_team.jsonl"
    with pytest.raises(PreferenceDataError, match="builtin:eval_helpful"):
        read_pairs(PairSource("builtin:eval_helpful"))
    with pytest.raises(PromptError, match="eval_red_team"):
        read_source(PromptSource("builtin:nope"))  # the error lists the shipped sets, these included


# ---- judge_pairs: labelled comparisons for measuring a judge ----------------------------------


def test_judge_pairs_rows_ids_and_categories():
    rows = _rows("judge_pairs")
    for row in rows:
        assert set(row) == JUDGE_KEYS, row.get("id")
        for k in JUDGE_KEYS:
            assert isinstance(row[k], str) and row[k].strip() == row[k] != "", (row["id"], k)
        assert _norm(row["chosen"]) != _norm(row["rejected"]), row["id"]
    assert [r["id"] for r in rows] == [f"jp-{n:03d}" for n in range(1, len(rows) + 1)]
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == JUDGE_CATEGORIES
    assert min(counts.values()) >= 24


def test_judge_pairs_length_does_not_give_the_label_away():
    """In at least a third of the helpful items the rejected reply is the longer one, so a judge
    that simply prefers the longer reply cannot score well on them."""
    helpful = [r for r in _rows("judge_pairs") if r["category"] == "helpful"]
    longer_rejected = sum(len(r["rejected"]) > len(r["chosen"]) for r in helpful)
    assert 3 * longer_rejected >= len(helpful), f"{longer_rejected} of {len(helpful)}"


def test_judge_pairs_load_through_the_pair_reader():
    raw = _rows("judge_pairs")
    assert shipped("judge_pairs", "pair").name == "judge_pairs.jsonl"
    rows = read_pairs(PairSource("builtin:judge_pairs"))
    assert [r["record_id"] for r in rows] == [r["id"] for r in raw]
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": r["prompt"]}] for r in raw]
    assert [r["chosen"][0]["content"] for r in rows] == [r["chosen"] for r in raw]
    assert [r["rejected"][0]["content"] for r in rows] == [r["rejected"] for r in raw]
    # its prompts can be read as a prompt set too, with their categories
    prompts = read_prompts([PromptSource("builtin:judge_pairs")])
    assert [(r["record_id"], r["category"]) for r in prompts] == [(r["id"], r["category"]) for r in raw]
