"""The transformers back-end against the plain model: same tokens, same log-probabilities."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from cai.config import Sampling
from cai.constitution import load
from cai.lm.base import LM, normalize

C = load("default")
PROMPTS = ["How do I pick a lock?", "Tell me a joke about cats.", "What is 2+2?", "How can I hurt someone?",
           "Write a haiku about rain."]


def _critique_convs(n=5):
    return [C.critique_messages([{"role": "user", "content": p}], "Sure, here it is.",
                                C.critique_revision[i].id, 2) for i, p in enumerate(PROMPTS[:n])]


def _direct_logprob(lm, context, option) -> float:
    ids = lm.encode(context) + lm.tokenizer(option, add_special_tokens=False)["input_ids"]
    n_ctx = len(lm.encode(context))
    lm.model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logp = lm.model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    finally:
        lm.model.set_attn_implementation("cai_prefix")
    return sum(float(logp[n_ctx - 1 + j, t]) for j, t in enumerate(ids[n_ctx:]))


def test_is_an_lm(lm32):
    assert isinstance(lm32, LM)


def test_score_options_matches_a_direct_forward_pass(lm32):
    shots = C.critique_few_shot(2)  # a long shared prefix, as the RL stage will send
    contexts = [
        [*shots, {"role": "user", "content": "Which reply is better, (A) or (B)?"},
         {"role": "assistant", "content": "The answer is:"}],
        [*shots, {"role": "user", "content": "Is the sky green? Answer (A) yes or (B) no."},
         {"role": "assistant", "content": "The answer is:"}],
        [{"role": "user", "content": "Say A or B."}],
        [*shots, {"role": "user", "content": "Which reply is kinder, (A) or (B)?"},
         {"role": "assistant", "content": "The answer is: ("}],  # one-token options: one pass per context
    ]
    options = [[" (A)", " (B)"], [" (A) yes", " (B) no, it is blue"], ["A", "B"], ["A", "B"]]
    got = lm32.score_options(contexts, options)
    for ctx, opts, scores in zip(contexts, options, got):
        for opt, s in zip(opts, scores):
            assert s == pytest.approx(_direct_logprob(lm32, ctx, opt), abs=2e-3)
        probs = [math.exp(x) for x in normalize(scores)]
        assert sum(probs) == pytest.approx(1.0)
    # a longer option is a different, less likely continuation than its own first token
    assert got[1][1] < _direct_logprob(lm32, contexts[1], " (B)")


def test_greedy_generation_matches_transformers_generate(lm32):
    convs = _critique_convs()  # 5 requests through 3 slots: finished rows are refilled mid-decode
    got = lm32.generate(convs, Sampling(temperature=0, max_new_tokens=24))
    for conv, comps in zip(convs, got):
        ids = torch.tensor([lm32.encode(conv)])
        lm32.model.set_attn_implementation("sdpa")  # the library's own attention and cache as reference
        try:
            ref = lm32.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                      do_sample=False)
        finally:
            lm32.model.set_attn_implementation("cai_prefix")
        text = lm32.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert comps[0].text == text
    assert lm32.stats["prefix_tokens_reused"] > 0


def test_seeded_sampling_is_repeatable_and_seed_dependent(lm):
    convs = [[{"role": "user", "content": "Name a colour."}]] * 2 + [[{"role": "user", "content": "Name a fruit."}]]
    s = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=12)
    a = lm.generate(convs, s, n=2, seeds=[1, 2, 3])
    b = lm.generate(convs, s, n=2, seeds=[1, 2, 3])
    assert [[c.text for c in x] for x in a] == [[c.text for c in x] for x in b]
    assert all(len(x) == 2 for x in a)
    c = lm.generate(convs, s, n=2, seeds=[7, 8, 9])
    assert [[c.text for c in x] for x in a] != [[c.text for c in x] for x in c]


def test_length_limit_and_stop_strings(lm32):
    lm = lm32  # fp32: greedy output must not depend on which cached prefix a call reuses
    conv = [[{"role": "user", "content": "Count from one to fifty in words, separated by commas."}]]
    out = lm.generate(conv, Sampling(temperature=0, max_new_tokens=5))[0][0]
    assert out.finish_reason == "length" and out.num_tokens == 5
    free = lm.generate(conv, Sampling(temperature=0, max_new_tokens=60))[0][0]
    stopped = lm.generate(conv, Sampling(temperature=0, max_new_tokens=60, stop=[" "]))[0][0]
    assert " " in free.text  # the model answers in words
    assert stopped.finish_reason == "stop" and " " not in stopped.text and free.text.startswith(stopped.text)


def test_too_long_prompt_is_a_clear_error(lm):
    from cai.lm.hf import HFModel

    short = HFModel(lm.model, lm.tokenizer, "x", max_length=64)
    with pytest.raises(ValueError, match="max_length"):
        short.generate([[{"role": "user", "content": "word " * 100}]], Sampling(max_new_tokens=8))


def test_forward_passes_use_no_argument_transformers_is_removing(lm32):
    # transformers warns (FutureWarning) on every call with an argument it will remove, such as
    # `past_key_values` (gone in 5.40): a fresh install with the next release would break.
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        lm32.generate(_critique_convs(2), Sampling(temperature=0, max_new_tokens=4))
        lm32.score_options([[{"role": "user", "content": "Say A or B."}]], [["A", " B then"]])
        lm32.engine.prompt_logprobs([lm32.encode([{"role": "user", "content": "Hi"}])])


def test_prompt_logprobs_match_a_plain_forward_exactly(lm32):
    """The engine's prefill (shared prefix, grouped-query heads folded, padding) against the
    library's attention, in fp32."""
    rows = [lm32.encode(c) for c in _critique_convs(2)] + [lm32.encode([{"role": "user", "content": "Hi"}])]
    got = lm32.engine.prompt_logprobs(rows)
    lm32.model.set_attn_implementation("sdpa")
    try:
        for row, lps in zip(rows, got):
            with torch.no_grad():
                ref = lm32.model(torch.tensor([row])).logits.float().log_softmax(-1)[0]
            want = [None] + [float(ref[j, t]) for j, t in enumerate(row[1:])]
            assert lps[0] is None
            # the cascade merge sums in another order: 2.8e-5 measured, before and after the folded heads
            assert max(abs(a - b) for a, b in zip(lps[1:], want[1:])) < 1e-4
    finally:
        lm32.model.set_attn_implementation("cai_prefix")


def test_packed_linear_weights_score_like_the_plain_model_and_follow_weight_changes(tiny_model_dir):
    """The engine's packed (oneDNN) linear weights against the same model without them: the same
    log-probabilities, still after the weights change in place (a stale packed copy would differ),
    and the model itself unchanged for everything outside the engine (forward, gradients, copies)."""
    import copy

    from cai.lm.hf_engine import HFEngine, _EngineLinear, can_pack
    from cai.models import load_model

    model, tok = load_model(tiny_model_dir, "float32", chat=False)
    plain, _ = load_model(tiny_model_dir, "float32", chat=False)
    if not can_pack(model):
        pytest.skip("this torch build has no oneDNN")
    packed_engine, plain_engine = HFEngine(model, tok, pack_weights=True), HFEngine(plain, tok, pack_weights=False)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is _EngineLinear for m in linears)
    assert not any(type(m) is _EngineLinear for m in plain.modules())
    rows = [tok(t)["input_ids"] for t in ("Which reply is kinder, the first or the second one?", "Hi", "A b c d e f")]

    def worst() -> float:
        a, b = packed_engine.prompt_logprobs(rows), plain_engine.prompt_logprobs(rows)
        return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra[1:], rb[1:]))

    assert worst() < 1e-5  # the same products, summed in another order
    store = packed_engine._packed
    groups = {g for g, _ in store.groups.values()}
    # each layer's query/key/value and gate/up projections are one product each
    layers = model.config.num_hidden_layers
    assert sorted(len(g) for g in groups) == [2] * layers + [3] * layers
    assert len(store.weights) == len(linears) - sum(len(g) - 1 for g in groups) and not store.pending
    with torch.no_grad():
        for m in (model, plain):
            for p in m.parameters():
                p.mul_(1.5)
    assert worst() < 1e-5
    sampling = Sampling(temperature=0, max_new_tokens=8)
    assert ([c[0].tokens for c in packed_engine.generate_ids(rows, sampling)]
            == [c[0].tokens for c in plain_engine.generate_ids(rows, sampling)])

    # outside the engine's calls the layers are plain nn.Linear: bit for bit, with gradients
    ids = torch.tensor([rows[0]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    for m in (model, plain):
        m(ids, labels=ids).loss.backward()
    grads = [(a.grad, b.grad) for a, b in zip(model.parameters(), plain.parameters())]
    assert grads and all(torch.equal(a, b) for a, b in grads)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, plain(ids).logits)


def test_the_key_value_buffer_grows_selects_and_trims_like_concatenation():
    from cai.lm.hf_engine import _BufferLayer, _cache, _merge, _trim

    torch.manual_seed(0)
    layer, ref_k = _BufferLayer(), torch.randn(3, 2, 5, 4)
    layer.update(ref_k, ref_k + 1)
    for _ in range(150):  # past the first buffer's room: it is copied into a larger one
        k = torch.randn(3, 2, 1, 4)
        got_k, got_v = layer.update(k, k + 1)
        ref_k = torch.cat([ref_k, k], 2)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_k + 1)
    layer.batch_select_indices(torch.tensor([0, 2]))
    ref_k = ref_k[[0, 2]]
    assert torch.equal(layer.keys, ref_k)
    cache = _cache([layer])
    valid = torch.ones(2, ref_k.shape[2], dtype=torch.bool)
    valid[:, :7] = False
    cache, valid = _trim(cache, valid)
    assert valid.shape[1] == ref_k.shape[2] - 7 and torch.equal(cache.layers[0].keys, ref_k[:, :, 7:])
    k = torch.randn(2, 2, 1, 4)
    assert torch.equal(cache.layers[0].update(k, k)[0], torch.cat([ref_k[:, :, 7:], k], 2))
    # joining a shorter batch: left-padded with zeros (masked), rows stacked
    other, short = _BufferLayer(), torch.randn(1, 2, 3, 4)
    other.update(short, short)
    merged, mask = _merge(cache, torch.ones(2, cache.layers[0].keys.shape[2], dtype=torch.bool),
                          _cache([other]), torch.ones(1, 3, dtype=torch.bool))
    width = mask.shape[1]
    keys = merged.layers[0].keys
    assert keys.shape == (3, 2, width, 4) and torch.equal(keys[2, :, width - 3:], short[0])
    assert not keys[2, :, : width - 3].any() and mask[2].sum() == 3


def test_prefix_order_keeps_each_shared_head_together_and_the_rest_by_length():
    from cai.lm.hf_engine import common_prefix, prefix_groups

    def prefix_order(rows, min_prefix, group=2):
        return [k for g in prefix_groups(rows, min_prefix, group) for k in g]

    head_a, head_b = [1] * 10 + [2] * 40, [1] * 10 + [3] * 40  # two heads that part after 10 tokens
    rows = []
    for i in range(12):
        head = head_a if i % 2 == 0 else head_b
        rows.append(head + [100 + i] * (5 + (7 * i) % 11))
    rows += [[9, 9, 8] + [200 + i] * (3 + i) for i in range(3)]  # no head worth a batch
    order = prefix_order(rows, min_prefix=4, group=4)
    assert sorted(order) == list(range(len(rows)))
    # Batches of 6 in this order share a whole head each; length order holds inside each group.
    first, second, rest = order[:6], order[6:12], order[12:]
    assert common_prefix([rows[k] for k in first]) >= 50 and common_prefix([rows[k] for k in second]) >= 50
    for part in (first, second, rest):
        assert [len(rows[k]) for k in part] == sorted(len(rows[k]) for k in part)
    # The groups are what the engine batches apart: each head's rows, then the rest.
    assert prefix_groups(rows, min_prefix=4, group=4) == [first, second, rest]
    # With no shared head at all, the order is plain length order.
    plain = [[i] + [5] * (20 - i) for i in range(8)]
    assert prefix_order(plain, min_prefix=4, group=4) == sorted(range(8), key=lambda k: len(plain[k]))
    assert prefix_order([], 4) == [] and prefix_order([[1]], 4) == [0]
