"""The OpenAI back-end against llama.cpp's server (llama-cpp-python), serving the embedded model's own GGUF.

Run in the main venv once scripts/llama_cpp.sh has made .venv-llama (or CAI_LLAMA_PYTHON names an
interpreter with llama_cpp.server); skipped without it:

    .venv/bin/python -m pytest -m llama_cpp tests/test_llama_cpp.py -p no:cacheprovider -rP

llama.cpp computes with the GGUF's Q4_1 weights in its own kernels, the transformers back-end with
the same weights de-quantised, so greedy text agrees for the first tokens, not always to the end: the
agreement is printed, not asserted. What llama-cpp-python 0.3.36's server does not do through the
OpenAI API as the project uses it: `n` > 1 (one choice comes back) and log-probabilities of token-id
prompts (option scoring); both must end in a clear error, not a wrong row.
"""

from __future__ import annotations

import time

import pytest

from cai.config import ModelConfig, OpenAIConfig, Sampling
from cai.constitution import load
from cai.lm import load_lm
from cai.lm.base import BackendError
from cai.testing import llama_cpp_python, llama_cpp_server

pytestmark = pytest.mark.llama_cpp

PROMPTS = ["What is 2+2?", "Tell me a joke about cats.", "Write a haiku about rain.", "How do I pick a lock?"]


def _convs(n: int = 4):
    return [[{"role": "user", "content": p}] for p in PROMPTS[:n]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if llama_cpp_python() is None:
        pytest.skip("llama.cpp's server is not installed (scripts/llama_cpp.sh makes .venv-llama)")
    log = tmp_path_factory.mktemp("llama-cpp") / "server.log"
    with llama_cpp_server(log=log) as (base_url, startup_s):
        print(f"llama.cpp server: answered after {startup_s:.1f} s")
        yield base_url


@pytest.fixture(scope="module")
def served(server):
    lm = load_lm(ModelConfig(name="smollm2-135m", backend="openai",
                             openai=OpenAIConfig(base_url=server, max_concurrency=4, max_retries=2)))
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    from cai.lm.hf import HFModel

    return HFModel.from_config(ModelConfig(name=model_dir, dtype="float32"))


def test_greedy_generation_and_finish_reasons(served, reference):
    convs = _convs()
    s = Sampling(temperature=0, max_new_tokens=24)
    got = served.generate(convs, s)
    want = reference.generate(convs, s)
    first = [len(set(g[0].text.split()[:3]) ^ set(w[0].text.split()[:3])) == 0 for g, w in zip(got, want)]
    whole = sum(g[0].text == w[0].text for g, w in zip(got, want))
    print(f"llama.cpp (Q4_1) against transformers (de-quantised, fp32), greedy: whole text equal {whole}/{len(convs)}, "
          f"first three words equal {sum(first)}/{len(convs)}")
    assert all(g[0].text for g in got)
    assert {g[0].finish_reason for g in got} <= {"stop", "length"}
    for g in got:  # the server's usage counts the tokens; a reply cut by the limit has exactly the limit
        assert 0 < g[0].num_tokens <= 24
        if g[0].finish_reason == "length":
            assert g[0].num_tokens == 24
    assert sum(first) >= len(convs) // 2  # the same model: most replies start alike
    t = served.generate(convs[:1], Sampling(temperature=0, max_new_tokens=4))[0][0]
    assert t.finish_reason == "length" and t.num_tokens == 4


def test_seeds_fix_the_samples_and_stop_strings_cut(served):
    convs = _convs(3)
    s = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=16)
    a = [r[0].text for r in served.generate(convs, s, seeds=[1, 2, 3])]
    b = [r[0].text for r in served.generate(convs, s, seeds=[1, 2, 3])]
    c = [r[0].text for r in served.generate(convs, s, seeds=[4, 5, 6])]
    assert a == b and a != c
    full = served.generate(convs[:1], Sampling(temperature=0, max_new_tokens=24))[0][0].text
    stop = " " + full.split()[2]
    cut = served.generate(convs[:1], Sampling(temperature=0, max_new_tokens=24, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)].strip()


def test_what_the_server_cannot_do_is_a_clear_error(served):
    with pytest.raises(BackendError, match="returned 1 choices for n=2"):
        served.generate(_convs(1), Sampling(temperature=1.0, max_new_tokens=8), n=2)
    before = served.requests_sent
    ctx = [*_convs(1)[0], {"role": "assistant", "content": "The answer is:"}]
    with pytest.raises(BackendError) as err:
        served.score_options([ctx], [[" (A)", " (B)"]])
    msg = str(err.value)
    assert "option scoring needs" in msg and "HTTP 422" in msg and "validation error" in msg
    assert served.requests_sent - before == 1  # a 500 that is a validation error is not retried
    assert len(msg) < 2500


def test_critique_revision_runs_on_llama_cpp(served):
    from cai.config import PromptSource, SLConfig
    from cai.sources import read_source
    from cai.stages.sl_generate import process_chunk

    rows = [{**r, "kind": "red_team"} for r in read_source(PromptSource("builtin:red_team", limit=2))]
    sl = SLConfig(rounds=2)
    calls = []
    t0 = time.perf_counter()
    out = process_chunk(rows, served, load("default"), sl, seed=0, on_call=lambda n=0, ended=False, **_: ended or calls.append(n))
    secs = time.perf_counter() - t0
    print(f"llama.cpp: {len(rows)} prompts x 2 rounds, {len(calls)} calls, {sum(calls)} tokens in {secs:.1f} s "
          f"= {sum(calls) / secs:.1f} tok/s")
    assert [r["record_id"] for r in out] == [r["record_id"] for r in rows]
    for r in out:
        assert r["init_response"] and r["status"] and len(r["rounds"]) == 2
        assert all(rd["critique"] and rd["status"] for rd in r["rounds"])
    assert len(calls) == 2 * (1 + 2 * 2)  # per prompt: the answer, then a critique and a revision per round
