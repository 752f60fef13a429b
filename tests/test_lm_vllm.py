"""The vLLM back-end.

On any machine: the pure helpers (engine and sampling settings, vLLM outputs to completions and
option scores) and the back-end's plumbing over a stand-in engine that answers like `vllm.LLM`
(output objects shaped as vLLM 0.11-0.33 returns them) but computes with the transformers model,
so prompt rendering, option positions and sample bookkeeping are checked against the transformers
back-end. With a real engine, the same checks against the transformers back-end: on a CUDA machine
with the `vllm` extra (`pytest -m gpu`, or scripts/gpu_check.sh), or on vLLM's CPU build in
.venv-vllm (`pytest -m vllm_cpu`, set up by scripts/vllm_cpu.sh; more in tests/test_vllm_cpu.py).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from cai.config import ModelConfig, Sampling, VLLMConfig
from cai.constitution import load
from cai.lm import load_lm
from cai.lm.base import LM, BackendError
from cai.lm.vllm import VLLMModel, engine_kwargs, prompt_logprob_sum, sampling_kwargs, to_completion

C = load("default")
PROMPTS = ["What is 2+2?", "Tell me a joke about cats.", "Write a haiku about rain.", "How do I pick a lock?"]


def _convs(n: int = 4):
    return [[{"role": "user", "content": p}] for p in PROMPTS[:n]]


def _scoring_cases(few_shot=2):
    shots = C.critique_few_shot(few_shot)
    contexts = [
        [*shots, {"role": "user", "content": "Which reply is better, (A) or (B)?"},
         {"role": "assistant", "content": "The answer is:"}],
        [{"role": "user", "content": "Is the sky green? Answer (A) yes or (B) no."},
         {"role": "assistant", "content": "The answer is:"}],
        [{"role": "user", "content": "Say A or B."}],
    ]
    options = [[" (A)", " (B)"], [" (A) yes", " (B) no, it is blue"], ["A", "B"]]
    return contexts, options


# ---- stand-ins shaped like vLLM's outputs --------------------------------------------------------


def _logprob(x: float) -> SimpleNamespace:
    return SimpleNamespace(logprob=x, rank=1, decoded_token=None)


def _output(token_ids, finish_reason, stop_reason=None, index=0) -> SimpleNamespace:
    return SimpleNamespace(index=index, text="(vLLM's own text, unused)", token_ids=list(token_ids),
                           cumulative_logprob=None, logprobs=None, finish_reason=finish_reason,
                           stop_reason=stop_reason)


class FlatPromptLogprobs:
    """A stand-in for vLLM's FlatLogprobs: flat arrays, and a {token id: Logprob} dict per position."""

    def __init__(self, per_position):
        self.start, self.end, self.ids, self.lps = [], [], [], []
        for entry in per_position:
            self.start.append(len(self.ids))
            for t, lp in (entry or {}).items():
                self.ids.append(t)
                self.lps.append(lp.logprob)
            self.end.append(len(self.ids))

    def __len__(self):
        return len(self.start)

    def __getitem__(self, k):
        return {self.ids[i]: _logprob(self.lps[i]) for i in range(self.start[k], self.end[k])}


class TransformersEngine:
    """Answers `generate(prompts, sampling_params, use_tqdm=...)` as `vllm.LLM` does (greedy only),
    computing with a transformers model. Records every request it is sent."""

    def __init__(self, model, eos_ids):
        self.model = model
        self.eos_ids = eos_ids
        self.requests: list[tuple[list[int], SimpleNamespace]] = []

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        assert not use_tqdm
        self.model.set_attn_implementation("sdpa")  # plain attention (the model is shared with `lm32`)
        try:
            return self._generate(prompts, params)
        finally:
            self.model.set_attn_implementation("cai_prefix")

    def _generate(self, prompts, params):
        outs = []
        for prompt, p in zip(prompts, params):
            ids = list(prompt["prompt_token_ids"])
            self.requests.append((ids, p))
            if getattr(p, "prompt_logprobs", None) is not None:
                outs.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=self._prompt_logprobs(ids),
                                            outputs=[_output([0], "length")]))
            else:
                outs.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=None,
                                            outputs=[self._greedy(ids, p)]))
        return outs

    @torch.no_grad()
    def _prompt_logprobs(self, ids):
        logp = self.model(torch.tensor([ids], device=self.model.device)).logits.float().log_softmax(-1)[0]
        # As vLLM with prompt_logprobs=1: position k holds the prompt token and the top-1 token.
        plp = [None]
        for k in range(1, len(ids)):
            row = logp[k - 1]
            top = int(row.argmax())
            plp.append({ids[k]: _logprob(float(row[ids[k]])), top: _logprob(float(row[top]))})
        return plp

    @torch.no_grad()
    def _greedy(self, ids, p):
        assert p.temperature == 0 and p.n == 1, "the stand-in engine decodes greedily, one sample"
        x = torch.tensor([ids], device=self.model.device)
        gen = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=p.max_tokens,
                                  do_sample=False)[0, len(ids):].tolist()
        for k, t in enumerate(gen):
            if t in self.eos_ids:  # vLLM keeps the EOS token in the output ids
                return _output(gen[: k + 1], "stop")
        return _output(gen, "length")


class RecordingEngine:
    """Answers every request with `n` outputs, in reverse index order, whose text names the sample."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: list[tuple[list[int], SimpleNamespace]] = []

    def generate(self, prompts, params, use_tqdm=True):
        outs = []
        for prompt, p in zip(prompts, params):
            self.requests.append((list(prompt["prompt_token_ids"]), p))
            samples = [_output(self.tokenizer(f" sample {j}", add_special_tokens=False)["input_ids"], "length",
                               index=j) for j in range(p.n)]
            outs.append(SimpleNamespace(prompt_logprobs=None, outputs=samples[::-1]))
        return outs


@pytest.fixture(scope="module")
def standin(lm32):
    engine = TransformersEngine(lm32.model, lm32.eos_ids)
    return VLLMModel(engine, lm32.tokenizer, "standin", max_model_len=2048, sampling_params=SimpleNamespace,
                     eos_ids=lm32.eos_ids)


# ---- engine and sampling settings --------------------------------------------------------------


def test_engine_kwargs_follow_the_config():
    kw = engine_kwargs(ModelConfig(backend="vllm"), "/models/m")
    assert kw["model"] == kw["tokenizer"] == "/models/m"
    assert kw["trust_remote_code"] is False  # never on unless the config says so
    assert kw["enable_prefix_caching"] is True
    assert "max_model_len" not in kw  # the model's own unless set
    cfg = ModelConfig(backend="vllm", dtype="bfloat16", revision="abc", trust_remote_code=True,
                      vllm=VLLMConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5,
                                      enable_prefix_caching=False, max_model_len=4096, enforce_eager=True))
    kw = engine_kwargs(cfg, "/models/m")
    assert (kw["dtype"], kw["revision"], kw["tokenizer_revision"], kw["trust_remote_code"]) == \
        ("bfloat16", "abc", "abc", True)
    assert (kw["tensor_parallel_size"], kw["gpu_memory_utilization"], kw["enable_prefix_caching"],
            kw["max_model_len"], kw["enforce_eager"]) == (2, 0.5, False, 4096, True)


def test_data_parallel_is_refused_with_the_alternatives():
    with pytest.raises(BackendError, match="data_parallel_size=2") as e:
        engine_kwargs(ModelConfig(backend="vllm", vllm=VLLMConfig(data_parallel_size=2)), "m")
    assert "ray.enabled" in str(e.value) and "vllm serve" in str(e.value)


def test_missing_vllm_names_the_extra(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now fails, installed or not
    with pytest.raises(BackendError, match=r"`vllm` extra"):
        load_lm(ModelConfig(name=tiny_model_dir, backend="vllm"))


def test_sampling_kwargs():
    s = Sampling(temperature=[0.7, 0.3], top_p=0.9, max_new_tokens=33, stop=["\n\n"])
    kw = sampling_kwargs(s, 4, seed=12)
    assert (kw["n"], kw["temperature"], kw["top_p"], kw["max_tokens"], kw["stop"]) == (4, 0.7, 0.9, 33, ["\n\n"])
    assert sampling_kwargs(Sampling(), 2, 0)["stop"] is None
    # vLLM refuses n > 1 when greedy: one sample is asked for
    assert sampling_kwargs(Sampling(temperature=0.0), 3, 0)["n"] == 1
    # vLLM seeds sample j with seed + j: no two records (seeds 0..99, 8 samples) share a sample seed
    engine_seeds = [sampling_kwargs(s, 8, r)["seed"] + j for r in range(100) for j in range(8)]
    assert len(set(engine_seeds)) == len(engine_seeds)
    assert all(0 <= x < 2**63 for x in engine_seeds)
    assert sampling_kwargs(s, 8, -5)["seed"] >= 0
    assert sampling_kwargs(s, 8, 12)["seed"] == kw["seed"]


# ---- vLLM outputs to completions and scores -----------------------------------------------------


def test_to_completion_drops_the_stop_token_and_cuts_stop_strings(lm32):
    tok = lm32.tokenizer
    eos = tok.eos_token_id
    ids = tok("Four. Anything else?", add_special_tokens=False)["input_ids"]

    def conv(out, stop=()):
        return to_completion(out, lambda t: tok.decode(t, skip_special_tokens=True), list(stop),
                             frozenset({eos}))

    c = conv(_output(ids + [eos], "stop"))  # stopped on EOS: vLLM returns the EOS id last
    assert (c.text, c.finish_reason, c.num_tokens) == ("Four. Anything else?", "stop", len(ids))
    c = conv(_output(ids, "length"))
    assert (c.text, c.finish_reason, c.num_tokens) == ("Four. Anything else?", "length", len(ids))
    other = tok("!", add_special_tokens=False)["input_ids"][0]
    c = conv(_output(ids + [other], "stop", stop_reason=other))  # a stop token id
    assert c.num_tokens == len(ids) and c.text == "Four. Anything else?"
    c = conv(_output(ids, "stop", stop_reason=" else"), stop=[" else"])  # a stop string: every token counts
    assert (c.text, c.num_tokens) == ("Four. Anything", len(ids))
    c = conv(_output(ids, "stop", stop_reason="?"), stop=["?"])  # a final token that only ends a stop string stays
    assert c.num_tokens == len(ids)
    with pytest.raises(BackendError, match="abort"):
        conv(_output(ids, "abort"))


def test_prompt_logprob_sum_reads_the_option_positions():
    ids = [5, 9, 2, 7, 7]
    plp = [None, {9: _logprob(-0.5)}, {2: _logprob(-1.0), 4: _logprob(-0.1)}, {7: _logprob(-2.0)},
           {7: _logprob(-0.25)}]
    assert prompt_logprob_sum(plp, ids, 3) == pytest.approx(-2.25)
    assert prompt_logprob_sum(plp, ids, 1) == pytest.approx(-3.75)
    assert prompt_logprob_sum(FlatPromptLogprobs(plp), ids, 2) == pytest.approx(-3.25)
    with pytest.raises(BackendError, match="3 of 5"):
        prompt_logprob_sum(plp[:3], ids, 3)
    with pytest.raises(BackendError, match="prompt token 2"):
        prompt_logprob_sum([None, {9: _logprob(-0.5)}, {4: _logprob(-0.1)}, *plp[3:]], ids, 2)
    with pytest.raises(BackendError):
        prompt_logprob_sum(None, ids, 2)
    with pytest.raises(ValueError, match="start=0"):
        prompt_logprob_sum(plp, ids, 0)


# ---- the back-end over a stand-in engine ---------------------------------------------------------


def test_standin_backend_is_an_lm(standin):
    assert isinstance(standin, LM)


def test_score_options_over_prompt_logprobs_match_the_transformers_backend(standin, lm32):
    contexts, options = _scoring_cases(few_shot=0)
    engine = standin.llm
    engine.requests.clear()
    got = standin.score_options(contexts, options)
    want = lm32.score_options(contexts, options)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=2e-3)
    assert len(engine.requests) == sum(len(o) for o in options)  # all in one engine call
    assert {p.prompt_logprobs for _, p in engine.requests} == {1}
    assert engine.requests[0][0] == lm32.encode(contexts[0]) + lm32.tokenizer(" (A)", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="option 1 of context 0 is empty"):
        standin.score_options(contexts[:1], [["A", ""]])


def test_greedy_generate_matches_the_transformers_backend(standin, lm32):
    convs = _convs(2)
    s = Sampling(temperature=0, max_new_tokens=16)
    got = standin.generate(convs, s, n=2, seeds=[7, 8])
    want = lm32.generate(convs, s)
    assert [[c.text for c in x] for x in got] == [[w[0].text] * 2 for w in want]
    assert [[(c.finish_reason, c.num_tokens) for c in x] for x in got] == \
        [[(w[0].finish_reason, w[0].num_tokens)] * 2 for w in want]
    assert {w[0].finish_reason for w in want} == {"stop", "length"}  # both ends are exercised
    sent = standin.llm.requests[-2:]
    assert [ids for ids, _ in sent] == [lm32.encode(c) for c in convs]
    assert [p.n for _, p in sent] == [1, 1]


def test_sampled_requests_keep_their_seed_and_sample_order(lm32):
    vm = VLLMModel(RecordingEngine(lm32.tokenizer), lm32.tokenizer, "recording", max_model_len=2048,
                   sampling_params=SimpleNamespace)
    convs = _convs(3)
    s = Sampling(temperature=0.8, top_p=0.9, max_new_tokens=8)
    got = vm.generate(convs, s, n=3, seeds=[1, 2, 3])
    assert [[c.text for c in x] for x in got] == [["sample 0", "sample 1", "sample 2"]] * 3
    together = vm.llm.requests[-1]
    vm.generate(convs[2:], s, n=3, seeds=[3])
    alone = vm.llm.requests[-1]
    assert together[0] == alone[0] and vars(together[1]) == vars(alone[1])  # batch-independent request
    assert vm.generate(convs[:1], s, n=3)[0][0].text == "sample 0"  # without seeds: the conversation index


def test_generate_refuses_prompts_beyond_max_model_len(lm32):
    small = VLLMModel(TransformersEngine(lm32.model, lm32.eos_ids), lm32.tokenizer, "standin", max_model_len=40,
                      sampling_params=SimpleNamespace)
    with pytest.raises(ValueError, match="conversation 1 has .* max_model_len=40"):
        small.generate([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "word " * 50}]],
                       Sampling(temperature=0, max_new_tokens=8))
    assert small.llm.requests == []


# ---- the real engine: a CUDA GPU (`pytest -m gpu`) or vLLM's CPU build (`pytest -m vllm_cpu`) ------
# `vllm_lm` and `hf_ref` (conftest.py): the engine in fp32, and the transformers back-end in fp32 (in
# another Python when vLLM's venv pins an older transformers).


def _engine_greedy_ids(vlm, conv, max_tokens):
    out = vlm.llm.generate([{"prompt_token_ids": vlm.encode(conv)}],
                           vlm._params(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


@pytest.mark.gpu
@pytest.mark.vllm_cpu
def test_import_is_lazy():
    pytest.importorskip("vllm")
    code = ("import sys, cai, cai.cli, cai.pipeline, cai.lm.vllm; from cai.lm import load_lm; "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@pytest.mark.vllm_cpu
def test_vllm_renders_prompts_as_the_transformers_backend(vllm_lm, hf_ref):
    convs = _convs() + [C.critique_messages(c, "Sure, here it is.", C.critique_revision[0].id, 2) for c in _convs(2)]
    assert [vllm_lm.encode(c) for c in convs] == [hf_ref.encode(c) for c in convs]


@pytest.mark.gpu
@pytest.mark.vllm_cpu
def test_vllm_greedy_matches_the_transformers_backend(vllm_lm, hf_ref):
    convs = _convs() + [C.critique_messages(c, "Sure, here it is.", C.critique_revision[0].id, 2) for c in _convs(2)]
    s = Sampling(temperature=0, max_new_tokens=32)
    got = vllm_lm.generate(convs, s)
    want = hf_ref.generate(convs, s)
    same = 0
    for i, (conv, g, w) in enumerate(zip(convs, got, want)):
        a, b = _engine_greedy_ids(vllm_lm, conv, 32), hf_ref.greedy_ids(conv, 32)
        if a == b:
            assert (g[0].text, g[0].finish_reason, g[0].num_tokens) == \
                (w[0]["text"], w[0]["finish_reason"], w[0]["num_tokens"]), f"conversation {i}"
            same += 1
            continue
        # The engines' kernels differ in rounding (and may use TF32 matmuls): a greedy token may flip
        # only where the two candidates' logits (typically several units apart) nearly tie.
        k = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
        gap = hf_ref.logit_gap(conv, b[:k], a[k], b[k])
        print(f"conversation {i}: greedy token {k} differs ({a[k]} vs {b[k]}), logit gap {gap:.4f}")
        assert gap < 0.1, f"conversation {i}: token {k} differs ({a[k]} vs {b[k]}), logit gap {gap}"
    print(f"greedy text agreement with the transformers back-end: {same}/{len(convs)} conversations")


@pytest.mark.gpu
@pytest.mark.vllm_cpu
def test_vllm_score_options_match_the_transformers_backend(vllm_lm, hf_ref):
    contexts, options = _scoring_cases()
    got = vllm_lm.score_options(contexts, options)
    want = hf_ref.score_options(contexts, options)
    diff = max(abs(x - y) for g, w in zip(got, want) for x, y in zip(g, w))
    print(f"option log-probs, vLLM vs the transformers back-end: largest difference {diff:.2e} nats")
    # A misread position would be off by nats. On CUDA TF32 matmuls allow hundredths; on vLLM's CPU
    # engine in fp32 the largest difference measured was 3.2e-05 nats (smollm2-135m, these cases).
    tol = 2e-2 if torch.cuda.is_available() else 1e-3
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=tol)


@pytest.mark.gpu
@pytest.mark.vllm_cpu
def test_vllm_seeds_fix_the_samples(vllm_lm):
    convs = _convs(3)
    s = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=16)
    a = vllm_lm.generate(convs, s, n=2, seeds=[1, 2, 3])
    b = vllm_lm.generate(convs, s, n=2, seeds=[1, 2, 3])
    alone = vllm_lm.generate(convs[2:], s, n=2, seeds=[3])
    other = vllm_lm.generate(convs, s, n=2, seeds=[4, 5, 6])
    texts = [[c.text for c in x] for x in a]
    assert texts == [[c.text for c in x] for x in b]
    assert texts[2] == [c.text for c in alone[0]], "a record's samples changed with its batch"
    assert texts != [[c.text for c in x] for x in other]
    assert any(x[0] != x[1] for x in texts)  # a request's samples have seeds of their own
    assert all(len(x) == 2 for x in a)


@pytest.mark.gpu
@pytest.mark.vllm_cpu
def test_vllm_prefix_caching_is_on_and_reused_prefixes_decode_the_same(vllm_lm):
    assert vllm_lm.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    convs = [C.critique_messages(c, "Sure, here it is.", C.critique_revision[0].id, 2) for c in _convs()]
    s = Sampling(temperature=0, max_new_tokens=24)
    first = vllm_lm.generate(convs, s)
    again = vllm_lm.generate(convs, s)  # the few-shot block is now in the cache
    assert [x[0].text for x in first] == [x[0].text for x in again]
