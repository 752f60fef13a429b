"""Tests for the `preferences` stage: human pair readers, the AI/human mix, the eval split and the
stage output as a `datasets` table."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED

from cai.config import PairSource, PipelineConfig, PreferencesConfig
from cai.rundir import ResumeError, StageError
from cai.stages import preferences as P
from cai.stages.preferences import PreferenceDataError, human_needed, mix, read_pairs

HELPFUL_TEST = SHARED / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"


def _jsonl(path: Path, rows: list[Any]) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _hh(*turns: str) -> str:
    """A transcript from alternating human / assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def _check_contract(row: dict[str, Any], source: str) -> None:
    assert set(row) == {"prompt", "chosen", "rejected", "p_chosen", "label_source", "record_id", "source"}
    assert row["prompt"] and row["prompt"][-1]["role"] == "user"
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in row["prompt"])
    for k in ("chosen", "rejected"):
        assert len(row[k]) == 1 and row[k][0]["role"] == "assistant" and isinstance(row[k][0]["content"], str)
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    assert row["p_chosen"] == 1.0 and row["label_source"] == "human" and row["source"] == source
    assert isinstance(row["record_id"], str) and row["record_id"]


def _ai_row(i: int, status: str = "ok", reason: str | None = None, cot: str | None = None) -> dict[str, Any]:
    """A row shaped like the feedback stage's output."""
    p = 0.55 + (i % 40) / 100
    return {
        "prompt": [{"role": "user", "content": f"red-team prompt {i}"}],
        "chosen": [{"role": "assistant", "content": f"careful answer {i}"}],
        "rejected": [{"role": "assistant", "content": f"harmful answer {i}"}],
        "p_chosen": p if status == "ok" else None,
        "label_source": "ai",
        "record_id": f"rt-{i:04d}",
        "source": "builtin:red_team",
        "kind": "red_team",
        "p_first": p if status == "ok" else None,
        "principle_ids": ["harmless-1"],
        "orders": [{"principle_id": "harmless-1", "p_ab": p, "p_ba": p, "mass_ab": 0.9, "mass_ba": 0.8,
                    "cot_ab": cot, "cot_ba": cot, "status": status}],
        "status": status,
        "reason": reason,
        "feedback_model": "scripted",
        "constitution_hash": "abc123",
        "seed": 0,
    }


def _human_rows(n: int) -> list[dict[str, Any]]:
    return [{
        "prompt": [{"role": "user", "content": f"helpful question {i}"}],
        "chosen": [{"role": "assistant", "content": f"good {i}"}],
        "rejected": [{"role": "assistant", "content": f"bad {i}"}],
        "p_chosen": 1.0, "label_source": "human", "record_id": f"h-{i:04d}", "source": "test",
    } for i in range(n)]


# ---- readers ---------------------------------------------------------------------------------


def test_builtin_helpful_pairs():
    rows = read_pairs(PairSource("builtin:helpful_pairs"))
    assert 40 <= len(rows) <= 60
    for r in rows:
        _check_contract(r, "builtin:helpful_pairs")
    ids = [r["record_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert len({r["prompt"][-1]["content"] for r in rows}) == len(rows)
    raw = [json.loads(line) for line in P._builtin("helpful_pairs").read_text().splitlines()]
    cats = Counter(r["category"] for r in raw)
    assert {"cooking", "coding", "maths", "health", "writing", "travel", "finance", "science"} <= set(cats)
    assert [r["id"] for r in raw] == ids


def test_unknown_builtin():
    with pytest.raises(PreferenceDataError, match="builtin:nope"):
        read_pairs(PairSource("builtin:nope"))


def test_hh_gz_single_and_multi_turn_and_skips(tmp_path):
    good = {"chosen": _hh("How do I boil an egg?", "Simmer it for 7 minutes."),
            "rejected": _hh("How do I boil an egg?", "Eggs are food.")}
    multi = {"chosen": _hh("Hi", "Hello! How can I help?", "Name a prime", "7 is prime."),
             "rejected": _hh("Hi", "Hello! How can I help?", "Name a prime", "9.")}
    mismatched = {"chosen": _hh("Question A", "answer"), "rejected": _hh("Question B", "other answer")}
    identical = {"chosen": _hh("Same?", "Yes."), "rejected": _hh("Same?", "Yes. ")}
    path = _jsonl(tmp_path / "hh.jsonl.gz", [good, mismatched, multi, identical, "", good])
    skipped: Counter[str] = Counter()
    rows = read_pairs(PairSource(str(path)), skipped)
    assert skipped == {"mismatched_history": 1, "identical": 1, "duplicate": 1}
    assert len(rows) == 2
    for r in rows:
        _check_contract(r, str(path))
    assert rows[0]["prompt"] == [{"role": "user", "content": "How do I boil an egg?"}]
    assert rows[0]["chosen"][0]["content"] == "Simmer it for 7 minutes."
    assert [m["role"] for m in rows[1]["prompt"]] == ["user", "assistant", "user"]
    assert rows[1]["prompt"][-1]["content"] == "Name a prime"
    assert (rows[1]["chosen"][0]["content"], rows[1]["rejected"][0]["content"]) == ("7 is prime.", "9.")
    # Forcing the format reads the same rows; ids are stable across reads.
    again = read_pairs(PairSource(str(path), format="hh"))
    assert [r["record_id"] for r in again] == [r["record_id"] for r in rows]


def test_preference_string_and_conversational_forms(tmp_path):
    rows_in = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Lyon."}]},
        # prompt repeated inside chosen/rejected, as some datasets store it
        {"prompt": "Name a colour.", "chosen": [{"role": "user", "content": "Name a colour."},
                                                {"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "No."}]},
        # implicit prompt: whole conversations sharing everything but the last turn
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "What."}]},
        {"chosen": [{"role": "user", "content": "One"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "Two"}, {"role": "assistant", "content": "b"}]},
    ]
    path = _jsonl(tmp_path / "pref.jsonl", rows_in)
    for fmt in ("auto", "preference"):
        skipped: Counter[str] = Counter()
        rows = read_pairs(PairSource(str(path), format=fmt), skipped)
        assert skipped == {"mismatched_history": 1}
        assert len(rows) == 4
        for r in rows:
            _check_contract(r, str(path))
        assert rows[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
        assert rows[0]["chosen"] == [{"role": "assistant", "content": "4"}]
        assert [m["role"] for m in rows[1]["prompt"]] == ["system", "user"]
        assert rows[2]["prompt"] == [{"role": "user", "content": "Name a colour."}]
        assert (rows[2]["chosen"][0]["content"], rows[2]["rejected"][0]["content"]) == ("Blue.", "No.")
        assert rows[3]["prompt"] == [{"role": "user", "content": "Hi"}]
        assert rows[3]["rejected"][0]["content"] == "What."


def test_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"chosen": [_hh("train q", "good")], "rejected": [_hh("train q", "bad")]}),
        "test": datasets.Dataset.from_list([
            {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": f"yes {i}"}],
             "rejected": [{"role": "assistant", "content": f"no {i}"}]} for i in range(3)]),
    })
    path = tmp_path / "ds"
    dd.save_to_disk(str(path))
    test = read_pairs(PairSource(str(path), split="test"))
    assert [r["prompt"][0]["content"] for r in test] == ["q0", "q1", "q2"]
    for r in test:
        _check_contract(r, str(path))
    train = read_pairs(PairSource(str(path), format="datasets", split="train"))
    assert len(train) == 1 and train[0]["chosen"][0]["content"] == "good"
    with pytest.raises(PreferenceDataError, match="no split 'validation'"):
        read_pairs(PairSource(str(path), split="validation"))
    single = tmp_path / "single"
    dd["test"].save_to_disk(str(single))
    assert [r["record_id"] for r in read_pairs(PairSource(str(single)))] != []


def test_limit_keeps_first_pairs(tmp_path):
    rows_in = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    path = _jsonl(tmp_path / "p.jsonl", rows_in)
    full = read_pairs(PairSource(str(path)))
    assert read_pairs(PairSource(str(path), limit=3)) == full[:3]
    assert read_pairs(PairSource(str(path), limit=0)) == []


@pytest.mark.parametrize(("line", "pattern"), [
    ("{not json", r":3: not valid JSON"),
    ("[1, 2]", r":3: expected a JSON object"),
    (json.dumps({"prompt": "q", "chosen": "a"}), r":3: missing field 'rejected'"),
    (json.dumps({"prompt": "q", "chosen": "a", "rejected": 7}), r":3: 'rejected' must be a string or"),
    (json.dumps({"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"}),
     r":3: 'prompt'\[0\]\.role must be one of"),
    (json.dumps({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}), r":3: 'prompt'\[0\]\.content"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
                 "chosen": "a", "rejected": "b"}), r":3: 'prompt' must end with a user message"),
    (json.dumps({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                 "rejected": "b"}), r":3: 'chosen' must be one assistant message"),
    (json.dumps({"prompt": "  ", "chosen": "a", "rejected": "b"}), r":3: 'prompt' has an empty user message"),
    (json.dumps({"chosen": "plain text", "rejected": "other text"}), r":3: 'chosen' is not an hh-rlhf transcript"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, line, pattern):
    ok = json.dumps({"prompt": "fine", "chosen": "good", "rejected": "bad"})
    path = _jsonl(tmp_path / "bad.jsonl", [ok, ok.replace("fine", "also fine"), line])
    with pytest.raises(PreferenceDataError, match=str(path).replace(".", r"\.") + pattern):
        read_pairs(PairSource(str(path)))


def test_forced_formats_reject_the_other_shape(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(PreferenceDataError, match=r"p\.jsonl:1: missing field 'prompt'"):
        read_pairs(PairSource(str(path), format="preference"))
    path = _jsonl(tmp_path / "h.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(PreferenceDataError, match=r"h\.jsonl:1: missing field 'rejected'"):
        read_pairs(PairSource(str(path), format="hh"))


def test_missing_local_file_is_not_a_hub_lookup(tmp_path):
    with pytest.raises(PreferenceDataError, match="no such file"):
        read_pairs(PairSource(str(tmp_path / "absent.jsonl.gz")))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(PreferenceDataError, match="not one saved by datasets"):
        read_pairs(PairSource(str(tmp_path / "plain_dir")))


@pytest.mark.skipif(not HELPFUL_TEST.exists(), reason="shared hh-rlhf helpful-base test split not present")
def test_shared_hh_helpful_base_with_limit():
    src = PairSource(str(HELPFUL_TEST), limit=50)
    rows = read_pairs(src)
    assert len(rows) == 50
    for r in rows:
        _check_contract(r, str(HELPFUL_TEST))
    assert any(len(r["prompt"]) > 1 for r in rows)  # multi-turn histories kept as messages
    assert len({r["record_id"] for r in rows}) == 50


# ---- the mix ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_ai", "n_human", "fraction"), [(40, 100, 0.5), (30, 100, 0.25), (7, 100, 0.3), (9, 100, 0.3),
                                                          (20, 100, 0.0), (50, 10, 0.5)])
def test_mix_reaches_human_share(n_ai, n_human, fraction):
    rows, counts = mix([_ai_row(i) for i in range(n_ai)], _human_rows(n_human), fraction, 0.1, seed=0)
    n_h = sum(r["label_source"] == "human" for r in rows)
    assert counts["human"] == n_h and counts["ai"] == n_ai == len(rows) - n_h
    if n_human >= n_ai * fraction / (1 - fraction) + 1:
        # within rounding of the configured share: one row more or less would be further off
        share = n_h / len(rows)
        for other in (n_h - 1, n_h + 1):
            if other >= 0:
                assert abs(share - fraction) <= abs(other / (n_ai + other) - fraction) + 1e-12
    else:
        assert n_h == n_human  # capped by what is available
    assert counts["human_share"] == round(n_h / len(rows), 4)


def test_human_needed_rounding():
    assert human_needed(3, 0.4) == 2  # 3 * 0.4 / 0.6 is 2.0000000000000004 in floats
    assert human_needed(1, 0.2) == 0 and human_needed(2, 0.2) == 1  # 0.25 -> 0, 0.5 -> 1
    assert human_needed(10, 0.0) == 0


def test_mix_is_independent_of_input_order():
    ai, human = [_ai_row(i) for i in range(30)], _human_rows(80)
    rows, counts = mix(ai, human, 0.4, 0.2, seed=3)
    key = {(r["record_id"], r["split"]) for r in rows}
    rng = random.Random(0)
    for _ in range(3):
        ai2, human2 = ai[:], human[:]
        rng.shuffle(ai2)
        rng.shuffle(human2)
        rows2, counts2 = mix(ai2, human2, 0.4, 0.2, seed=3)
        assert {(r["record_id"], r["split"]) for r in rows2} == key
        assert counts2 == counts
    other, _ = mix(ai, human, 0.4, 0.2, seed=4)
    assert {r["record_id"] for r in other if r["label_source"] == "human"} != {
        r["record_id"] for r in rows if r["label_source"] == "human"}


def test_eval_split_is_stable_and_has_both_kinds():
    ai, human = [_ai_row(i) for i in range(6)], _human_rows(6)
    rows, counts = mix(ai, human, 0.5, 0.05, seed=0)  # 6 * 0.05 rounds to 0; at least one each
    evals = [r for r in rows if r["split"] == "eval"]
    assert {r["label_source"] for r in evals} == {"ai", "human"}
    assert counts["eval_ai"] >= 1 and counts["eval_human"] >= 1
    assert counts["eval"] + counts["train"] == len(rows)
    again, _ = mix(list(reversed(ai)), list(reversed(human)), 0.5, 0.05, seed=0)
    assert {r["record_id"] for r in again if r["split"] == "eval"} == {r["record_id"] for r in evals}
    big, c = mix([_ai_row(i) for i in range(100)], _human_rows(100), 0.5, 0.1, seed=0)
    assert c["eval_ai"] == 10 and c["eval_human"] == 10
    assert all(r["split"] == "train" for r in mix(ai, human, 0.5, 0.0, seed=0)[0])
    tiny, c = mix([_ai_row(0)], [], 0.0, 0.5, seed=0)  # a single row is never held out
    assert tiny[0]["split"] == "train" and c["eval"] == 0


def test_mix_drops_unusable_ai_rows_and_counts_them():
    ai = [_ai_row(i) for i in range(10)]
    ai += [_ai_row(10, "abstain", "low_option_mass"), _ai_row(11, "abstain", "low_option_mass"),
           _ai_row(12, "failed", "invalid_scores")]
    rows, counts = mix(ai, [], 0.5, 0.1, seed=0)
    assert len(rows) == 10 and all(r["record_id"] < "rt-0010" for r in rows)
    assert counts["ai_set_aside"] == 3
    assert counts["ai_abstain_by_reason"] == {"low_option_mass": 2}
    assert counts["ai_failed_by_reason"] == {"invalid_scores": 1}


def test_mix_one_kind_alone():
    rows, counts = mix([_ai_row(0, "failed", "x")], _human_rows(9), 0.3, 0.1, seed=0)
    assert counts["ai"] == 0 and counts["human"] == 9 == len(rows)
    rows, counts = mix([_ai_row(i) for i in range(5)], _human_rows(9), 0.0, 0.1, seed=0)
    assert counts["human"] == 0 and {r["label_source"] for r in rows} == {"ai"}
    assert mix([], _human_rows(4), 0.0, 0.1, seed=0)[0] == []


def test_mix_output_columns():
    rows, _ = mix([_ai_row(i) for i in range(4)], _human_rows(4), 0.5, 0.0, seed=0)
    cols = set(P.COLUMNS) | set(P.AI_COLUMNS)
    assert all(set(r) == cols for r in rows)
    ai = [r for r in rows if r["label_source"] == "ai"]
    human = [r for r in rows if r["label_source"] == "human"]
    assert rows[: len(ai)] == ai  # AI rows first, so datasets infers their column types
    assert all(r["feedback_model"] == "scripted" and r["principle_ids"] == ["harmless-1"] for r in ai)
    assert all(r[k] is None for r in human for k in P.AI_COLUMNS)


def test_mix_rejects_duplicate_ids():
    clash = _human_rows(3)
    clash[0]["record_id"] = "rt-0001"
    with pytest.raises(ValueError, match="rt-0001"):
        mix([_ai_row(i) for i in range(3)], clash, 0.5, 0.0, seed=0)


# ---- the stage -------------------------------------------------------------------------------


def _cfg(tmp_path: Path, **prefs: Any) -> PipelineConfig:
    return dataclasses.replace(PipelineConfig(), run_dir=str(tmp_path / "run"),
                               preferences=PreferencesConfig(**prefs))


def test_run_writes_rows_that_load_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    # chain-of-thought text on the AI rows, so the AI-only columns hold nested strings too
    ai = [_ai_row(i, cot=f"reasoning {i}") for i in range(60)] + [_ai_row(60, "abstain", "low_option_mass")]
    cfg = _cfg(tmp_path, human_fraction=0.4, eval_fraction=0.1)
    stage = P.run(cfg, ai, inputs_fp="abc")
    counts = stage.manifest()["counts"]
    assert counts["ai"] == 60 and counts["human"] == 40  # 48 built-in pairs available
    assert counts["ai_abstain_by_reason"] == {"low_option_mass": 1}
    assert counts["human_skipped_by_reason"] == {}
    # A small chunk size makes datasets read the file in several blocks, as it would a large file.
    ds = datasets.load_dataset("json", data_files=str(stage.rows_path), split="train", chunksize=4096,
                               cache_dir=str(tmp_path / "hf_cache"))
    assert len(ds) == 100
    assert {"prompt", "chosen", "rejected", "p_chosen", "label_source", "split"} <= set(ds.column_names)
    assert Counter(ds["label_source"]) == {"ai": 60, "human": 40}
    assert set(ds["split"]) == {"train", "eval"}
    human = ds.filter(lambda r: r["label_source"] == "human")
    assert all(p is None for p in human["p_first"]) and set(human["p_chosen"]) == {1.0}
    assert human[0]["chosen"][0]["role"] == "assistant"
    # Re-running with the same inputs rewrites the same file.
    before = stage.rows_path.read_text()
    assert P.run(cfg, ai, inputs_fp="abc").rows_path.read_text() == before


def test_run_human_only_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    stage = P.run(_cfg(tmp_path), [], inputs_fp="none")
    ds = datasets.load_dataset("json", data_files=str(stage.rows_path), split="train",
                               cache_dir=str(tmp_path / "hf_cache"))
    assert len(ds) == 48 and set(ds["label_source"]) == {"human"}


def test_run_empty_mix_and_changed_config(tmp_path):
    failed = [_ai_row(0, "failed", "invalid_scores")]
    # human_fraction 0: the human sources are not read at all (this one does not exist)
    cfg = _cfg(tmp_path, human=[PairSource(str(tmp_path / "absent.jsonl"))], human_fraction=0.0)
    with pytest.raises(StageError, match="the mix is empty"):
        P.run(cfg, failed, inputs_fp="x")
    P.run(_cfg(tmp_path), [_ai_row(i) for i in range(4)], inputs_fp="x")
    with pytest.raises(ResumeError, match="human_fraction"):
        P.run(_cfg(tmp_path, human_fraction=0.2), [_ai_row(i) for i in range(4)], inputs_fp="x")
    stage = P.run(_cfg(tmp_path, human_fraction=0.2), [_ai_row(i) for i in range(4)], inputs_fp="x",
                  allow_changed=True)
    assert stage.manifest()["counts"]["human"] == 1
