"""From preference rows to token pairs: a malformed row names its record and field, a good one gives
the response's tokens after the prompt's; training and held-out rows are split and counted."""

from __future__ import annotations

import pytest

from cai.batches import preference_pairs, row_counts, split_rows
from cai.rundir import StageError

GOOD = {"record_id": "r0", "prompt": [{"role": "user", "content": "Tell me something about gardens."}],
        "chosen": [{"role": "assistant", "content": "Gladly: gardens are interesting, kindly explained."}],
        "rejected": [{"role": "assistant", "content": "Whatever: gardens are boring, go away now."}],
        "p_chosen": 0.85, "label_source": "ai", "split": "eval"}


def test_malformed_rows_name_the_record_and_field(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    good = GOOD
    for bad, field in [({**good, "p_chosen": 1.5}, "p_chosen"), ({**good, "rejected": "rude"}, "rejected"),
                       ({**good, "prompt": [{"role": "assistant", "content": "hi"}]}, "prompt")]:
        with pytest.raises(ValueError, match=f"r0: '{field}'"):
            preference_pairs(tok, [bad], 64)
    (pair,) = preference_pairs(tok, [good], 512)
    ids, start = pair["chosen"]
    assert tok.decode(ids[start:]).startswith("Gladly") and pair["p"] == 0.85 and pair["source"] == "ai"


def test_rows_without_a_label_are_left_out_and_counted():
    rows = [{**GOOD, "record_id": "t1", "split": "train"},
            {**GOOD, "record_id": "t2", "split": "train", "status": "abstain"},
            {**GOOD, "record_id": "e1", "label_source": "human"},
            {**GOOD, "record_id": "e2", "status": "failed"}]
    train_rows, eval_rows = split_rows(rows, "pm")
    assert [r["record_id"] for r in train_rows] == ["t1"] and [r["record_id"] for r in eval_rows] == ["e1"]
    assert row_counts(rows, train_rows, eval_rows) == {"rows": 4, "skipped_rows": 2, "train_rows": 1, "eval_rows": 1,
                                                       "eval_rows_ai": 0, "eval_rows_human": 1}
    with pytest.raises(StageError, match="dpo: none of the 2 preference rows"):
        split_rows(rows[2:], "dpo")
