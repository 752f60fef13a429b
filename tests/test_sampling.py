"""The one next-token sampler that generation and PPO rollouts share (cai/lm/sampling.py)."""

from __future__ import annotations

import pytest
import torch

from cai.lm.sampling import sample_next

PROBS = [0.5, 0.3, 0.15, 0.05]


def test_sampler_keeps_to_the_nucleus():
    logits = torch.log(torch.tensor([PROBS] * 2000))
    gen = torch.Generator().manual_seed(0)
    picks = sample_next(logits, 1.0, 0.75, gen)
    counts = torch.bincount(picks, minlength=4).float() / len(picks)
    assert counts[2:].sum() == 0  # outside the top 75% of the mass
    assert counts[0] == pytest.approx(0.5 / 0.8, abs=0.05)
    picks = sample_next(logits, 1.0, 1.0, gen)
    counts = torch.bincount(picks, minlength=4).float() / len(picks)
    assert torch.allclose(counts, torch.tensor(PROBS), atol=0.04)
    assert sample_next(logits[:1], 0.0, 1.0, gen).tolist() == [0]


def test_nucleus_beyond_the_partial_sort_is_found_by_a_full_sort():
    # 64 equally likely tokens: with top_k=8 the partial sort holds 1/8 of the mass, short of top_p.
    logits = torch.zeros(4000, 64)
    picks = sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(1), top_k=8)
    assert len(set(picks.tolist())) > 8  # the nucleus reached past the top 8
    assert len(set(picks.tolist())) <= 33  # and stopped near half the vocabulary


def test_each_row_follows_its_own_settings_and_generator():
    logits = torch.log(torch.tensor([PROBS] * 3))
    temps, tops = [0.0, 1.0, 1.0], [1.0, 0.6, 1.0]

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = sample_next(logits, temps, tops, gens([1, 2, 3]))
    b = sample_next(logits, temps, tops, gens([9, 2, 3]))
    assert a[0] == b[0] == 0  # greedy
    assert a[1:].tolist() == b[1:].tolist()  # another row's seed changes nothing here
    assert a[1] in (0, 1)  # top_p 0.6 keeps the first two tokens
    # A row's token is the same alone as in a batch.
    alone = sample_next(logits[1:2], [1.0], [0.6], gens([2]))
    assert alone.tolist() == [int(a[1])]


def test_mismatched_settings_are_a_clear_error():
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, [1.0], 1.0, torch.Generator())
    with pytest.raises(ValueError, match="generators"):
        sample_next(logits, 1.0, 1.0, [torch.Generator()])
