"""`cai serve` against a real server on loopback: routes, error bodies, keys, batching, and
answers equal to the in-process back-end (generation per seed, prompt log-probabilities equal to
`score_options`)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import httpx
import pytest

from cai.config import Sampling
from cai.constitution import load
from cai.serve import Server, is_loopback, is_preference_model, serve

C = load("default")


@pytest.fixture(scope="module")
def server(tiny_hf):
    with Server(tiny_hf, "tiny", port=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


USER = [{"role": "user", "content": "Tell me a joke about cats."}]


def _post_all(client, path, bodies):
    """POST the bodies concurrently; responses in order."""
    out = [None] * len(bodies)

    def one(i):
        out[i] = client.post(path, json=bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, out


def test_binds_loopback_by_default(server):
    assert server.httpd.server_address[0] == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")
    from cai.cli import build_parser

    assert build_parser().parse_args(["serve", "m"]).host == "127.0.0.1"


def test_models_health_and_unknown_routes(server, client):
    assert client.get("/models").json()["data"][0]["id"] == "tiny"
    root = server.url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").status_code == 200
    r = client.get("/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    assert client.get("/chat/completions").status_code == 405
    r = client.post("/completions", json={"model": "other", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


@pytest.mark.parametrize("path,body,param", [
    ("/chat/completions", {"messages": []}, "messages"),
    ("/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("/chat/completions", {"messages": USER, "temperature": 3}, "temperature"),
    ("/chat/completions", {"messages": USER, "top_p": 0}, "top_p"),
    ("/chat/completions", {"messages": USER, "n": 0}, "n"),
    ("/chat/completions", {"messages": USER, "max_tokens": "ten"}, "max_tokens"),
    ("/chat/completions", {"messages": USER, "seed": 1.5}, "seed"),
    ("/chat/completions", {"messages": USER, "stop": [3]}, "stop"),
    ("/chat/completions", {"messages": USER, "stream": True}, "stream"),
    ("/chat/completions", {"messages": USER, "max_tokens": 10**6}, "messages"),
    ("/completions", {"prompt": [1, 2, 10**7]}, "prompt"),
    ("/completions", {"prompt": ["ok", [1, -1]]}, "prompt[1]"),
    ("/completions", {"prompt": {"text": "hi"}}, "prompt"),
    ("/completions", {"prompt": "hi", "logprobs": 99}, "logprobs"),
    ("/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/completions", {"prompt": "hi", "frequency_penalty": 0.5}, "frequency_penalty"),
    ("/pooling", {"input": "hi"}, None),
])
def test_bad_requests_get_400_naming_the_field(client, server, path, body, param):
    url = server.url.removesuffix("/v1") + path if path == "/pooling" else path
    r = client.post(url, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == 400
    if param is not None:
        assert err["param"] == param and err["message"].startswith(param)
    else:
        assert "preference model" in err["message"]


def test_malformed_json_is_a_400(client):
    r = client.post("/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_chat_gives_what_generate_gives_for_the_seed(client, tiny_hf):
    sampling = Sampling(temperature=0.8, top_p=0.9, max_new_tokens=8)
    body = {"model": "tiny", "messages": USER, "n": 2, "seed": 11, "temperature": 0.8, "top_p": 0.9, "max_tokens": 8}
    got = client.post("/chat/completions", json=body).json()
    want = tiny_hf.generate([USER], sampling, n=2, seeds=[11])[0]
    assert [c["index"] for c in got["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in got["choices"]] == [w.text for w in want]
    assert [c["finish_reason"] for c in got["choices"]] == [w.finish_reason for w in want]
    assert got["usage"]["completion_tokens"] == sum(w.num_tokens for w in want)
    assert got["usage"]["prompt_tokens"] == len(tiny_hf.encode(USER))


def _scoring_items(lm):
    shots = C.critique_few_shot(1)  # a shared prefix long enough to be cached and reused
    contexts = [
        [*shots, {"role": "user", "content": "Which is kinder, (A) or (B)?"}, {"role": "assistant", "content": "Answer: ("}],
        [*shots, {"role": "user", "content": "Is the sky green? (A) yes (B) no"}, {"role": "assistant", "content": "It is"}],
        [{"role": "user", "content": "Say A or B."}],
    ]
    options = [["A", "B"], [" (A) yes", " (B) no, it is blue"], ["A", " B then"]]
    prompts, spans = [], []
    for ctx, opts in zip(contexts, options):
        for o in opts:
            oids = lm.tokenizer(o, add_special_tokens=False)["input_ids"]
            prompts.append(lm.encode(ctx) + oids)
            spans.append(len(oids))
    return contexts, options, prompts, spans


def test_prompt_logprobs_equal_score_options(client, tiny_hf):
    contexts, options, prompts, spans = _scoring_items(tiny_hf)
    want = [s for row in tiny_hf.score_options(contexts, options) for s in row]
    echo = client.post("/completions", json={"prompt": prompts, "max_tokens": 1, "temperature": 0, "echo": True,
                                             "logprobs": 1}).json()
    vllm = client.post("/completions", json={"prompt": prompts, "max_tokens": 1, "temperature": 0,
                                             "prompt_logprobs": 0}).json()
    for k, (ids, m) in enumerate(zip(prompts, spans)):
        e = next(c for c in echo["choices"] if c["index"] == k)
        lps = e["logprobs"]["token_logprobs"]
        assert lps[0] is None and len(lps) == len(e["logprobs"]["tokens"]) in (len(ids), len(ids) + 1)
        assert sum(lps[len(ids) - m: len(ids)]) == pytest.approx(want[k], abs=1e-5)
        v = next(c for c in vllm["choices"] if c["index"] == k)["prompt_logprobs"]
        assert v[0] is None and len(v) == len(ids)
        assert sum(v[p][str(ids[p])]["logprob"] for p in range(len(ids) - m, len(ids))) == pytest.approx(want[k], abs=1e-5)
    # the greedy token the scoring pass reports is the one generation picks
    gen = tiny_hf.engine.generate_ids(prompts[:1], Sampling(temperature=0, max_new_tokens=1))[0][0]
    assert echo["choices"][0]["logprobs"]["tokens"][len(prompts[0]):] == [tiny_hf.tokenizer.decode([t]) for t in gen.tokens]


def test_echo_logprobs_of_sampled_tokens_match_rescoring(client, tiny_hf):
    ids = tiny_hf.encode(USER)
    got = client.post("/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 1.0, "seed": 3,
                                            "logprobs": 2}).json()["choices"][0]
    gen = tiny_hf.engine.generate_ids([ids], Sampling(temperature=1.0, max_new_tokens=4), seeds=[3])[0][0]
    lp = got["logprobs"]
    assert got["text"] == tiny_hf.engine.decode_text(gen.tokens) and len(lp["tokens"]) == len(gen.tokens)
    want = tiny_hf.engine.prompt_logprobs([ids + gen.tokens])[0][len(ids):]
    assert lp["token_logprobs"] == pytest.approx(want, abs=1e-5)
    assert all(len(d) in (2, 3) for d in lp["top_logprobs"])  # the top 2, plus the sampled token if not among them


def test_completions_generate_from_raw_prompts(client, tiny_hf):
    ids = tiny_hf.encode(USER)
    body = {"prompt": ["Once upon a time", ids], "max_tokens": 6, "temperature": 0.9, "n": 2, "seed": 5, "echo": True}
    got = client.post("/completions", json=body).json()
    assert [c["index"] for c in got["choices"]] == [0, 1, 2, 3]  # choice i * n + j: sample j of prompt i
    first = tiny_hf.tokenizer("Once upon a time")["input_ids"]
    want = tiny_hf.engine.generate_ids([first, ids], Sampling(temperature=0.9, max_new_tokens=6), n=2, seeds=[5, 5])
    for i, prompt_text in enumerate(["Once upon a time", tiny_hf.tokenizer.decode(ids)]):
        for j in range(2):
            c = got["choices"][2 * i + j]
            assert c["text"] == prompt_text + tiny_hf.engine.decode_text(want[i][j].tokens)
    # a stop string ends the text before it, with finish_reason "stop"
    plain = client.post("/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0.9, "seed": 5}).json()
    text = plain["choices"][0]["text"]
    stop = next(text[k:k + 2] for k in range(1, len(text) - 1) if text[k:k + 2].strip() == text[k:k + 2]
                and text.find(text[k:k + 2]) == k)
    cut = client.post("/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0.9, "seed": 5,
                                            "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.find(stop)]


def _queued_together(scheduler, client, path, bodies):
    """POST the bodies while the model thread is held until all of them wait in its queue; the
    model runs that followed, and the responses."""
    before = len(scheduler.runs)
    with scheduler.held():
        threads, out = _post_all(client, path, bodies)
        deadline = time.monotonic() + 60
        while scheduler.waiting() < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join()
    return list(scheduler.runs)[before:], out


def test_concurrent_requests_are_batched(server, client, tiny_hf):
    scheduler = server.scheduler
    bodies = [{"messages": [{"role": "user", "content": f"Question {i}?"}], "max_tokens": 5, "temperature": 0.7,
               "seed": i} for i in range(4)]
    runs, out = _queued_together(scheduler, client, "/chat/completions", bodies)
    assert [r["requests"] for r in runs if r["kind"] == "generate"] == [4]
    assert all(r.status_code == 200 and len(r.json()["choices"]) == 1 for r in out)

    _, _, prompts, _ = _scoring_items(tiny_hf)
    score = [{"prompt": prompts[k:k + 2], "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 0}
             for k in (0, 2, 4)]
    runs, out = _queued_together(scheduler, client, "/completions", score)
    assert runs == [{"kind": "score", "requests": 3, "rows": 6}]
    assert all(len(r.json()["choices"]) == 2 for r in out)


def test_api_key_is_required_when_set(tiny_hf):
    with Server(tiny_hf, "tiny", port=0, api_key="s3cret-value") as srv:
        root = srv.url.removesuffix("/v1")
        assert httpx.get(f"{root}/health").status_code == 200  # health stays open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-value"}):
            r = httpx.get(f"{srv.url}/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert "s3cret" not in r.text
        assert httpx.get(f"{srv.url}/models", headers={"Authorization": "Bearer s3cret-value"}).status_code == 200


def test_serve_refuses_an_unset_key_variable(monkeypatch):
    monkeypatch.delenv("CAI_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="CAI_TEST_NO_SUCH_KEY"):
        serve("unused", api_key_env="CAI_TEST_NO_SUCH_KEY")


def test_non_loopback_host_warns(monkeypatch, capsys, tiny_model_dir):
    # The warning comes before the model loads; stop there, so nothing binds a public address.
    monkeypatch.setattr("cai.serve.load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        serve(tiny_model_dir, host="0.0.0.0")
    assert "not a loopback address" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pm_dir(tiny_model_dir, tmp_path_factory):
    """A preference model as stage pm saves it: a one-label sequence-classification model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("tiny-pm")
    LlamaForSequenceClassification(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


def test_preference_model_serves_rewards(pm_dir, tiny_model_dir):
    from cai.reward import RewardModel

    assert is_preference_model(pm_dir) and not is_preference_model(tiny_model_dir)
    rm = RewardModel.from_dir(pm_dir, dtype="float32")
    with Server(reward=rm, name="pm", port=0) as srv:
        root = srv.url.removesuffix("/v1")
        convs = [[*USER, {"role": "assistant", "content": reply}] for reply in ("Sure!", "No.", "Why did the cat...")]
        threads, out = _post_all(httpx.Client(timeout=60), f"{root}/pooling", [{"messages": c} for c in convs])
        for t in threads:
            t.join()
        want = rm.score([USER] * 3, ["Sure!", "No.", "Why did the cat..."])
        got = [r.json()["data"][0]["data"][0] for r in out]
        assert got == pytest.approx(want, abs=1e-5)
        ids = [[1, 2, 3, 4], [5, 6, 7]]
        body = httpx.post(f"{srv.url}/pooling", json={"model": "pm", "input": ids}).json()
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert [d["data"][0] for d in body["data"]] == pytest.approx(rm.score_ids(ids), abs=1e-5)
        r = httpx.post(f"{srv.url}/chat/completions", json={"messages": USER})
        assert r.status_code == 400 and "/pooling" in r.json()["error"]["message"]
        r = httpx.post(f"{root}/pooling", json={"messages": USER})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_cli_serves_until_interrupted(tiny_model_dir, capsys):
    from cai.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen = {}

    def stop_when_up():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                seen["health"] = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

    # A shell starts background jobs with SIGINT ignored, and Python then keeps it ignored: give
    # this test Ctrl-C's usual handler, whoever launched it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t = threading.Thread(target=stop_when_up)
    t.start()
    try:
        rc = main(["serve", tiny_model_dir, "--port", str(port), "model.dtype=float32"])
    finally:
        t.join()
        signal.signal(signal.SIGINT, previous)
    out = capsys.readouterr()
    assert rc == 0 and seen.get("health") == 200
    assert f"at http://127.0.0.1:{port}/v1" in out.out and "stopped" in out.err


def test_requests_join_a_running_batch_that_shares_their_prefix(tiny_hf):
    from cai.lm.hf_engine import TokenRequest

    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    crit = [tiny_hf.encode(C.critique_messages([{"role": "user", "content": q}], "Sure.", C.critique_revision[0].id, 1))
            for q in ("How do I pick a lock?", "How do I steal a bike?")]
    alone = tiny_hf.engine.generate_ids(crit, greedy, n=1, seeds=[1, 2])  # also caches the prefix the two share
    first, late = TokenRequest(crit[0], greedy, n=2, seed=1), TokenRequest(crit[1], greedy, seed=2)
    offered, done = [], []

    def admit(prefix):
        offered.append(list(prefix))
        # `late` arrives after the first decoding step, and may join only if it shares the prefix
        return [late] if len(offered) == 2 and crit[1][:len(prefix)] == list(prefix) else []

    tiny_hf.engine.run_requests([first], admit, done.append)
    assert len(offered[0]) >= tiny_hf.engine.min_prefix  # the shared few-shot block, not all of the first prompt
    assert done == [first, late] or done == [late, first]
    assert first.results[0] == first.results[1] == alone[0][0] and late.results == alone[1]
