"""The vLLM and OpenAI back-ends against a real vLLM engine on CPU (vLLM's CPU build, `vllm-cpu`).

Run in .venv-vllm (scripts/vllm_cpu.sh makes it); skipped where vllm does not import:

    .venv-vllm/bin/python -m pytest -m vllm_cpu tests/test_lm_vllm.py tests/test_vllm_cpu.py -p no:cacheprovider -rP

The transformers reference (`hf_ref`, conftest.py) runs in the main venv (CAI_HF_PYTHON, default
.venv/bin/python). The figures (engine start-up, tokens per second) are printed; `-rP` shows them.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from cai.config import ModelConfig, OpenAIConfig, Sampling
from cai.constitution import load
from cai.lm import load_lm
from cai.testing import vllm_cpu_server

pytestmark = pytest.mark.vllm_cpu


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    pytest.importorskip("vllm")  # here, not at import: outside -m vllm_cpu the tests are deselected

C = load("default")
PROMPTS = ["What is 2+2?", "Tell me a joke about cats.", "Write a haiku about rain.", "How do I pick a lock?"]


def _convs(n: int = 4):
    return [[{"role": "user", "content": p}] for p in PROMPTS[:n]]


def _scoring_cases():
    contexts = [
        [*C.critique_few_shot(1), {"role": "user", "content": "Which reply is better, (A) or (B)?"},
         {"role": "assistant", "content": "The answer is:"}],
        [{"role": "user", "content": "Is the sky green? Answer (A) yes or (B) no."},
         {"role": "assistant", "content": "The answer is:"}],
        [{"role": "user", "content": "Say A or B."}],
    ]
    return contexts, [[" (A)", " (B)"], [" (A) yes", " (B) no, it is blue"], ["A", "B"]]


# ---- the vLLM back-end (offline engine) --------------------------------------------------------


def test_engine_startup_and_generate_throughput(vllm_lm):
    convs = _convs() * 4  # 16 requests
    s = Sampling(temperature=0.8, top_p=0.95, max_new_tokens=64)
    vllm_lm.generate(convs[:1], Sampling(temperature=0, max_new_tokens=4))  # warm
    t0 = time.perf_counter()
    out = vllm_lm.generate(convs, s, seeds=list(range(len(convs))))
    batch_s = time.perf_counter() - t0
    batch_tokens = sum(c.num_tokens for x in out for c in x)
    t0 = time.perf_counter()
    one = vllm_lm.generate(convs[1:2], Sampling(temperature=0, max_new_tokens=64))
    one_s = time.perf_counter() - t0
    print(f"vLLM CPU engine: start-up {vllm_lm.startup_s:.1f} s (fp32, enforce_eager, max_model_len 2048); "
          f"16 requests x 64 new tokens: {batch_tokens} tokens in {batch_s:.2f} s = {batch_tokens / batch_s:.1f} tok/s; "
          f"one stream: {one[0][0].num_tokens / one_s:.1f} tok/s "
          f"(VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')})")
    assert batch_tokens > 0 and all(c.finish_reason in ("stop", "length") for x in out for c in x)


def test_finish_reasons_and_stop_strings_match_the_transformers_backend(vllm_lm, hf_ref):
    convs = _convs()
    plain = Sampling(temperature=0, max_new_tokens=24)
    got = vllm_lm.generate(convs, plain)
    want = hf_ref.generate(convs, plain)
    assert {x[0].finish_reason for x in got} == {"stop", "length"}  # EOS and the token limit both reached
    assert [(x[0].text, x[0].finish_reason, x[0].num_tokens) for x in got] == \
        [(w[0]["text"], w[0]["finish_reason"], w[0]["num_tokens"]) for w in want]
    # A stop string taken from inside each greedy answer: the text ends before it, reason "stop".
    for conv, x in zip(convs, got):
        words = x[0].text.split()
        if len(words) < 3:
            continue
        stop = " " + words[2]
        s = Sampling(temperature=0, max_new_tokens=24, stop=[stop])
        g, r = vllm_lm.generate([conv], s)[0][0], hf_ref.generate([conv], s)[0][0]
        assert g.finish_reason == r["finish_reason"] == "stop"
        assert g.text == r["text"] == x[0].text[: x[0].text.index(stop)].strip()
        assert stop not in g.text
        print(f"stop {stop!r}: vLLM {g.num_tokens} tokens, transformers {r['num_tokens']} tokens, text {g.text!r}")


def test_too_long_prompts_are_refused_before_the_engine(vllm_lm):
    with pytest.raises(ValueError, match="max_model_len=2048"):
        vllm_lm.generate([[{"role": "user", "content": "word " * 2100}]], Sampling(temperature=0, max_new_tokens=8))
    with pytest.raises(ValueError, match="max_model_len is 2048"):
        vllm_lm.score_options([[{"role": "user", "content": "word " * 2100}]], [["A"]])


# ---- the OpenAI back-end against `vllm serve` ----------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(model_dir, tmp_path_factory):
    """`vllm serve` of the embedded model on 127.0.0.1 and a free port, serving it as `smollm2-135m`
    (the name the OpenAI back-end also loads its tokenizer by), from this interpreter, fp32, with the
    engine's own core binding unless VLLM_CPU_OMP_THREADS_BIND says otherwise. Yields (base_url,
    start-up seconds)."""
    pytest.importorskip("vllm")
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    try:
        with vllm_cpu_server(model_dir, dtype="float32", log=log, python=sys.executable) as served:
            yield served
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def served(vllm_server):
    base_url, startup_s = vllm_server
    print(f"vllm serve: healthy after {startup_s:.1f} s")
    lm = load_lm(ModelConfig(name="smollm2-135m", backend="openai",
                             openai=OpenAIConfig(base_url=base_url, scoring="prompt_logprobs", max_concurrency=8)))
    yield lm
    lm.close()


def test_openai_backend_generates_on_vllm_serve(served, hf_ref, vllm_server):
    convs = _convs()
    s = Sampling(temperature=0, max_new_tokens=24)
    got = served.generate(convs, s)
    want = hf_ref.generate(convs, s)
    agree = sum(g[0].text == w[0]["text"] for g, w in zip(got, want))
    print(f"OpenAI back-end on vllm serve: greedy text agreement with the transformers back-end {agree}/{len(convs)}")
    assert [g[0].finish_reason for g in got] == [w[0]["finish_reason"] for w in want]
    assert agree == len(convs)
    # Seeds fix the samples; other seeds give others.
    s = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=16)
    a = served.generate(convs[:3], s, n=2, seeds=[1, 2, 3])
    b = served.generate(convs[:3], s, n=2, seeds=[1, 2, 3])
    c = served.generate(convs[:3], s, n=2, seeds=[4, 5, 6])
    texts = [[x.text for x in r] for r in a]
    assert texts == [[x.text for x in r] for r in b]
    assert texts != [[x.text for x in r] for r in c]
    # Stop strings, as the offline back-end.
    stop = " " + got[0][0].text.split()[2]
    r = served.generate(convs[:1], Sampling(temperature=0, max_new_tokens=24, stop=[stop]))[0][0]
    assert r.finish_reason == "stop" and r.text == got[0][0].text[: got[0][0].text.index(stop)].strip()
    # A small throughput figure over HTTP.
    t0 = time.perf_counter()
    out = served.generate(convs * 4, Sampling(temperature=0.8, top_p=0.95, max_new_tokens=64), seeds=list(range(16)))
    secs = time.perf_counter() - t0
    tokens = sum(x.num_tokens for r in out for x in r)
    print(f"OpenAI back-end on vllm serve: 16 requests x 64 new tokens: {tokens} tokens in {secs:.2f} s = "
          f"{tokens / secs:.1f} tok/s")


def test_openai_backend_scores_options_through_prompt_logprobs_and_echo(served, hf_ref, vllm_server):
    contexts, options = _scoring_cases()
    want = hf_ref.score_options(contexts, options)
    got = served.score_options(contexts, options)  # model.openai.scoring: prompt_logprobs
    with load_lm(ModelConfig(name="smollm2-135m", backend="openai",
                             openai=OpenAIConfig(base_url=vllm_server[0], scoring="echo"))) as echo:
        got_echo = echo.score_options(contexts, options)
    for mode, scores in (("prompt_logprobs", got), ("echo", got_echo)):
        diff = max(abs(x - y) for g, w in zip(scores, want) for x, y in zip(g, w))
        print(f"OpenAI back-end on vllm serve, scoring {mode}: largest option log-prob difference {diff:.2e} nats")
        for g, w in zip(scores, want):
            assert g == pytest.approx(w, abs=1e-3)
