"""Tests for the `preferences` stage: the AI/human mix, the eval split and the stage output as a
`datasets` table. Reading human pair sources is tested in test_sources.py."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cai.config import PairSource, PipelineConfig, PreferencesConfig
from cai.rundir import ResumeError, StageError
from cai.stages import preferences as P
from cai.stages.preferences import human_needed, mix


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
