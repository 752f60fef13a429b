"""Micro-batches cut in length order (training.micro_batches), for the preference model and DPO: a
step keeps its rows, the cut respects the batch size, the token budget and the processes' equal
shares, fewer padding positions are computed on rows of mixed lengths, and fp32 training reaches the
same weights as the previous cut (contiguous `batch_size` slices of the step's shuffled rows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cai import batches, training
from cai.config import DPOConfig, PMConfig, load_config
from cai.stages import dpo, pm
from cai.training import micro_batches

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "birds", "sing", "loudly"]


def mixed_rows(n: int = 16) -> list[dict]:
    """Preference rows whose answers run from a few words to about a hundred, in no length order."""
    rows = []
    for i in range(n):
        k = 3 + (i * 37) % 90
        rows.append({
            "record_id": f"m{i}", "prompt": [{"role": "user", "content": f"Say something, number {i}."}],
            "chosen": [{"role": "assistant", "content": " ".join(WORDS[j % len(WORDS)] for j in range(k))}],
            "rejected": [{"role": "assistant", "content": " ".join(WORDS[(j * 3) % len(WORDS)] for j in range(k // 2 + 1))}],
            "p_chosen": 1.0 if i % 2 else 0.8, "label_source": "human" if i % 2 else "ai", "split": "train",
        })
    return rows


def previous_cut(rows, lengths, batch_size, processes=1, max_tokens=0, seqs_per_row=2):
    """The cut before length ordering: contiguous slices of the step's shuffled rows."""
    return [list(rows[k: k + batch_size]) for k in range(0, len(rows), batch_size)]


def positions(cuts: list[list[int]], lengths: list[int]) -> int:
    return sum(2 * len(c) * max(lengths[i] for i in c) for c in cuts)


def test_the_cut_keeps_the_steps_rows_and_orders_them_longest_first():
    lengths = [5, 90, 12, 40, 41, 7, 88, 3]
    rows = [3, 0, 7, 6, 1, 2, 5, 4]
    cuts = micro_batches(rows, lengths, 2)
    assert sorted(i for c in cuts for i in c) == sorted(rows)
    assert [len(c) for c in cuts] == [2, 2, 2, 2]
    assert cuts[0] == [1, 6] and cuts[-1] == [0, 7]
    flat = [lengths[i] for c in cuts for i in c]
    assert flat == sorted(flat, reverse=True)
    assert positions(cuts, lengths) < positions(previous_cut(rows, lengths, 2), lengths)


def test_a_token_budget_packs_short_rows_together_and_keeps_equal_shares():
    lengths = [100, 100, 10, 10, 10, 10, 10, 10, 50, 50, 10, 10]
    rows = list(range(12))
    cuts = micro_batches(rows, lengths, 8, max_tokens=420)
    assert [len(c) for c in cuts] == [2, 4, 6]  # 2x2x100, 4x2x50, then 6 short rows under the budget
    assert all(2 * len(c) * max(lengths[i] for i in c) <= 420 for c in cuts)
    # Two processes: every micro-batch splits evenly, and one too long for the budget still has a row each.
    two = micro_batches(rows, lengths, 8, processes=2, max_tokens=150)
    assert all(len(c) % 2 == 0 and len(c) >= 2 for c in two) and sorted(i for c in two for i in c) == rows
    with pytest.raises(ValueError, match="multiples of the 2 processes"):
        micro_batches(rows[:7], lengths, 8, processes=2)


@pytest.mark.parametrize("section", ["pm", "rl.dpo"])
def test_micro_tokens_is_range_checked(section):
    with pytest.raises(Exception, match=f"{section}.micro_tokens must be >= 0"):
        load_config(None, [f"{section}.micro_tokens=-1"])
    assert load_config(None, [f"{section}.micro_tokens=2048"])


def count_positions(monkeypatch) -> list[int]:
    """Token positions of every padded batch the stages build from here on."""
    seen: list[int] = []
    real = batches.pad_batch

    def counting(seqs, *a, **kw):
        out = real(seqs, *a, **kw)
        seen.append(out["input_ids"].numel())
        return out

    monkeypatch.setattr(batches, "pad_batch", counting)
    return seen


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float) -> None:
    """fp32, the same gradient summed in another order: all but a few in 10^4 weights agree to 1e-6,
    and every weight to 1% of the learning rate (Adam's early steps turn a gradient as small as its
    eps into an update of up to lr, so rounding moves those few weights most)."""
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(diffs.max()) <= 0.01 * lr, float(diffs.max())
    assert float((diffs > 1e-6).double().mean()) < 1e-4


@pytest.mark.parametrize("micro_tokens", [0, 600])
def test_pm_weights_match_the_previous_cut_with_fewer_positions(tiny_model_dir, tmp_path, monkeypatch, micro_tokens):
    rows = mixed_rows(16)
    cfg = PMConfig(model=tiny_model_dir, learning_rate=5e-3, epochs=1.0, batch_size=2, grad_accum=4,
                   warmup_ratio=0.0, bf16=False, max_length=256, save_steps=100, micro_tokens=micro_tokens)
    seen = count_positions(monkeypatch)
    new = pm.train(rows, cfg, tmp_path / "new", seed=1)
    new_pos = sum(seen)
    seen.clear()
    with monkeypatch.context() as m:
        m.setattr(training, "micro_batches", previous_cut)
        old = pm.train(rows, cfg, tmp_path / "old", seed=1)
    old_pos = sum(seen)
    assert new["steps"] == old["steps"] == 2
    assert new_pos < old_pos  # the same pairs (eval has none), less padding
    for a, b in zip(new["log"], old["log"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    w_new, w_old = _weights(tmp_path / "new"), _weights(tmp_path / "old")
    start = pm.load_for_training(tiny_model_dir, "cpu")[0].state_dict()
    assert any(not torch.equal(w_new[k], start[k]) for k in w_new if k in start)  # training moved the weights
    _assert_close(w_new, w_old, cfg.learning_rate)


@pytest.mark.parametrize("micro_tokens", [0, 600])
def test_dpo_weights_match_the_previous_cut_with_fewer_positions(tiny_model_dir, tmp_path, monkeypatch, micro_tokens):
    rows = mixed_rows(16)
    cfg = DPOConfig(beta=0.1, learning_rate=2e-3, batch_size=2, grad_accum=4, epochs=1.0, warmup_ratio=0.0,
                    bf16=False, max_length=256, save_steps=100, micro_tokens=micro_tokens)
    seen = count_positions(monkeypatch)
    new = dpo.train(rows, cfg, tiny_model_dir, tmp_path / "new", seed=1)
    new_pos = sum(seen)
    seen.clear()
    with monkeypatch.context() as m:
        m.setattr(training, "micro_batches", previous_cut)
        old = dpo.train(rows, cfg, tiny_model_dir, tmp_path / "old", seed=1)
    old_pos = sum(seen)
    assert new["steps"] == old["steps"] == 2
    assert new_pos < old_pos  # the reference pass is the same on both sides; training pads less
    for a, b in zip(new["log"], old["log"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    _assert_close(_weights(tmp_path / "new"), _weights(tmp_path / "old"), cfg.learning_rate)
