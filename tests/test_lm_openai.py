"""The OpenAI-compatible HTTP back-end against a real HTTP server on loopback.

`FakeServer` speaks the wire protocol (chat completions; completions with `echo` + `logprobs` or
`prompt_logprobs` on token-id prompts) with canned but protocol-correct answers, and fails on
demand: statuses with or without `Retry-After`, dropped connections, slow requests, servers that
cannot score. It serves a bounded number of requests, so a client that loops is caught. Backoff
waits are recorded instead of slept; nothing here asserts on wall time.
"""

from __future__ import annotations

import email.utils
import json
import logging
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cai.config import ModelConfig, OpenAIConfig, Sampling, load_config
from cai.constitution import load as load_constitution
from cai.lm import load_lm
from cai.lm.base import LM, BackendError, BudgetExhausted, RunsPrograms, run_programs
from cai.lm.openai import OpenAIModel, RequestFailed, retry_after_seconds
from cai.stages import pairs, sl_generate

SECRET = "sk-test-7f3a9c1e5b2d4680"


def canned_logprob(prev: int, tok: int) -> float:
    """The fake model's log-probability of `tok` after `prev` (any fixed function will do)."""
    return -((prev * 7919 + tok * 104729) % 1000) / 250.0 - 0.01


def canned_reply(messages: list[dict[str, str]], seed: int, sample: int, temperature: float) -> str:
    last = messages[-1]["content"][:40]
    return f"  reply to [{last}] seed {seed if temperature > 0 else 'greedy'} sample {sample}\n"


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1 (port 0) in a thread.

    `faults` are applied to the next requests in order; `rule(request)` may fail any request. A
    fault is `(status, headers, message)` or `"drop"` (close the connection without answering).
    `hold(server, request)` runs while a request is in flight (after it is counted)."""

    def __init__(self, max_requests: int = 300):
        self.max_requests = max_requests
        self.requests: list[dict[str, Any]] = []
        self.faults: deque[Any] = deque()
        self.rule: Callable[[dict[str, Any]], Any] | None = None
        self.hold: Callable[[FakeServer, dict[str, Any]], None] | None = None
        self.api_key: str | None = None
        self.echo_auth = False  # put the Authorization header into error messages (a careless server)
        self.scoring = {"echo": "ok", "prompt_logprobs": "ok"}  # or "silent" (no log-probs) / "reject" (400)
        self.reverse_choices = False
        self.cond = threading.Condition()
        self.in_flight = 0
        self.peak = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                req = {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                with server.cond:
                    server.requests.append(req)
                    over = len(server.requests) > server.max_requests
                    fault = server.faults.popleft() if server.faults else None
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                    server.cond.notify_all()
                try:
                    if over:
                        status, headers, payload = 418, {}, _error("request bound of the test server exceeded")
                    else:
                        if fault is None and server.rule is not None:
                            fault = server.rule(req)
                        if server.hold is not None:
                            server.hold(server, req)
                        if fault == "drop":
                            self.close_connection = True
                            return
                        status, headers, payload = server.answer(req, fault)
                finally:
                    with server.cond:  # before the answer, so the client never sees more in flight than we do
                        server.in_flight -= 1
                        server.cond.notify_all()
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self) -> Counter:
        return Counter(r["path"] for r in self.requests)

    def answer(self, req: dict[str, Any], fault: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
        if self.api_key is not None and req["auth"] != f"Bearer {self.api_key}":
            fault = (401, {}, "invalid API key")
        if fault is not None:
            status, headers, message = fault
            if self.echo_auth:
                message = f"{message} (you sent {req['auth']})"
            return status, headers, _error(message)
        body = req["body"]
        if req["path"] == "/v1/chat/completions":
            return 200, {}, self._chat(body)
        if req["path"] == "/v1/completions":
            return self._complete(body)
        return 404, {}, _error(f"no route {req['path']}")

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        n, seed, t = body.get("n", 1), body.get("seed", 0), body["temperature"]
        choices = [{"index": j, "message": {"role": "assistant", "content": canned_reply(body["messages"], seed, j, t)},
                    "finish_reason": "length" if body["max_tokens"] < 8 else "stop"} for j in range(n)]
        if self.reverse_choices:
            choices.reverse()
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": choices, "usage": {"prompt_tokens": 10, "completion_tokens": 6 * n, "total_tokens": 10 + 6 * n}}

    def _complete(self, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        prompts = body["prompt"]
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            # One token-id prompt to continue (a raw-text generate): n canned samples naming it.
            n, seed, t = body.get("n", 1), body.get("seed", 0), body["temperature"]
            said = f" continues {len(prompts)} tokens seed {seed if t > 0 else 'greedy'} sample "
            choices = [{"index": j, "text": f"{said}{j}\n\nHuman: x", "finish_reason": "stop", "logprobs": None}
                       for j in range(n)]
            return 200, {}, {"id": "cmpl-2", "object": "text_completion", "created": 0, "model": body["model"],
                             "choices": choices, "usage": {"prompt_tokens": len(prompts), "completion_tokens": 5 * n,
                                                           "total_tokens": len(prompts) + 5 * n}}
        if not (isinstance(prompts, list) and all(isinstance(p, list) and all(isinstance(t, int) for t in p)
                                                  for p in prompts)):
            return 400, {}, _error("this test server takes token-id prompts only")
        mode = "prompt_logprobs" if "prompt_logprobs" in body else "echo" if body.get("echo") else None
        if mode and self.scoring[mode] == "reject":
            return 400, {}, _error(f"unsupported parameter: {mode}")
        if mode and self.scoring[mode] == "invalid500":  # llama-cpp-python: a body it cannot parse is a 500
            detail = "".join(f"\n  {{'type': 'string_type', 'loc': ('body', 'prompt', 'list[str]', {k}), "
                             f"'msg': 'Input should be a valid string', 'input': {p}}}" for k, p in enumerate(prompts))
            return 500, {}, _error(f"{len(prompts)} validation errors:{detail}")
        choices = []
        for k, ids in enumerate(prompts):
            lps = [None] + [canned_logprob(a, b) for a, b in zip(ids, ids[1:])]
            choice: dict[str, Any] = {"index": k, "text": "x", "finish_reason": "length", "logprobs": None}
            if mode == "echo" and self.scoring["echo"] == "ok":
                choice["logprobs"] = {"tokens": [f"t{i}" for i in ids] + ["x"], "token_logprobs": lps + [-0.5],
                                      "top_logprobs": [None] + [{"x": -0.1}] * len(ids),
                                      "text_offset": list(range(len(ids) + 1))}
            elif mode == "echo":  # silently ignores echo: log-probs of the generated token only
                choice["logprobs"] = {"tokens": ["x"], "token_logprobs": [-0.5], "top_logprobs": [None],
                                      "text_offset": [0]}
            if mode == "prompt_logprobs" and self.scoring["prompt_logprobs"] == "ok":
                # vLLM style: the prompt's own token plus a distractor, keyed by token id.
                choice["prompt_logprobs"] = [None] + [
                    {str(t): {"logprob": lp, "rank": 3, "decoded_token": "t"},
                     str(t + 1): {"logprob": -0.05, "rank": 1, "decoded_token": "u"}} for t, lp in zip(ids[1:], lps[1:])]
            choices.append(choice)
        if self.reverse_choices:
            choices.reverse()
        return 200, {}, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                         "choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": None}}


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def _model(server: FakeServer, pauses: list[float] | None = None, **kw: Any) -> OpenAIModel:
    kw = {"max_concurrency": 4, "max_retries": 3, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 10.0, **kw}
    lm = OpenAIModel("served-model", server.url, **kw)
    if pauses is not None:
        lm._pause = lambda seconds, stop: pauses.append(seconds)  # record backoff waits instead of sleeping
    return lm


def _convs(n: int, tag: str = "question") -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"{tag} {i}"}] for i in range(n)]


def _content(req: dict[str, Any]) -> str:
    return req["body"]["messages"][-1]["content"]


# ---- generate -------------------------------------------------------------------------------


def test_generate_sends_the_protocol_and_returns_choices_in_input_order(server):
    server.reverse_choices = True

    def hold(s, req):  # later conversations answer first, so replies arrive out of order
        time.sleep(0.02 * (5 - int(_content(req).split()[-1])))

    server.hold = hold
    lm = _model(server)
    sampling = Sampling(temperature=0.7, top_p=0.9, max_new_tokens=20, stop=["\nUser:"])
    out = lm.generate(_convs(5), sampling, n=2, seeds=[11, 12, 13, 14, 15])
    assert [[c.text for c in comps] for comps in out] == [
        [canned_reply(conv, 11 + i, j, 0.7).strip() for j in range(2)] for i, conv in enumerate(_convs(5))]
    assert all(c.finish_reason == "stop" and c.num_tokens == 6 for comps in out for c in comps)
    by_conv = {_content(r): r["body"] for r in server.requests}
    assert len(by_conv) == 5 == len(server.requests)
    for i in range(5):
        assert by_conv[f"question {i}"] == {"model": "served-model", "messages": _convs(5)[i], "n": 2, "temperature": 0.7,
                                            "top_p": 0.9, "max_tokens": 20, "seed": 11 + i, "stop": ["\nUser:"]}
    assert all(r["auth"] is None for r in server.requests)  # no key configured, none sent

    # Without seeds conversation i gets seed i (as in-process); no stop list -> no "stop" key;
    # a token limit hit is reported as "length".
    (comp,), = lm.generate(_convs(1), Sampling(temperature=[0.5, 0.1], max_new_tokens=4))
    body = server.requests[-1]["body"]
    assert body["seed"] == 0 and body["temperature"] == 0.5 and "stop" not in body
    assert comp.finish_reason == "length"
    assert lm._tokenizer is None  # generation never loads a tokenizer
    assert lm.generate([], sampling) == []
    with pytest.raises(ValueError, match="one seed per conversation"):
        lm.generate(_convs(2), sampling, seeds=[1])


def test_concurrency_reaches_the_cap_and_never_exceeds_it(server):
    def hold(s, req):  # wait until the cap has been reached once, so reaching it does not depend on timing
        with s.cond:
            s.cond.wait_for(lambda: s.peak >= 3, timeout=5)

    server.hold = hold
    lm = _model(server, max_concurrency=3)
    out = lm.generate(_convs(10), Sampling(temperature=0.0), seeds=list(range(10)))
    assert len(server.requests) == 10 and len(out) == 10
    assert server.peak == 3


def _program(i: int, seen: list[str]):
    tag = f"p{i}" + (" slow" if i == 0 else "")
    for k in range(3):
        c = yield ([{"role": "user", "content": f"{tag} step {k}"}],
                   Sampling(temperature=0.7, max_new_tokens=16), 1000 * i + k)
        seen.append(c.text)


class Lockstep:
    """The same back-end seen only through `generate`, so `run_programs` steps in lockstep."""

    def __init__(self, lm: OpenAIModel):
        self.lm, self.name = lm, lm.name

    def generate(self, *a: Any, **kw: Any):
        return self.lm.generate(*a, **kw)

    def score_options(self, *a: Any, **kw: Any):
        return self.lm.score_options(*a, **kw)


def test_run_programs_interleaves_programs_and_gives_the_lockstep_records(server):
    gate = threading.Event()
    fast_done = [0]

    def hold(s, req):
        # Program 0's first request is held until six other requests have been served: with two
        # slots, only interleaving (not lockstep) lets programs 1 and 2 finish meanwhile.
        if "slow step 0" in _content(req):
            gate.wait(timeout=5)
        elif "slow" not in _content(req):
            with s.cond:
                fast_done[0] += 1
                if fast_done[0] == 6:
                    gate.set()

    server.hold = hold
    lm = _model(server, max_concurrency=2)
    assert isinstance(lm, RunsPrograms) and isinstance(lm, LM)
    seen: list[list[str]] = [[], [], []]
    calls = []
    run_programs(lm, [_program(i, seen[i]) for i in range(3)], on_done=lambda *_, ended=False, **__: ended or calls.append(1))
    assert len(calls) == 9 and len(server.requests) == 9
    order = [_content(r) for r in server.requests]
    assert order.index("p0 slow step 1") > max(order.index(f"p{i} step {k}") for i in (1, 2) for k in range(3))
    assert server.peak <= 2

    server.hold = None
    lock: list[list[str]] = [[], [], []]
    run_programs(Lockstep(lm), [_program(i, lock[i]) for i in range(3)])
    assert lock == seen
    assert seen[1] == [canned_reply([{"role": "user", "content": f"p1 step {k}"}], 1000 + k, 0, 0.7).strip()
                       for k in range(3)]


# ---- retries --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(server, status):
    server.faults.append((status, {}, "try again"))
    pauses: list[float] = []
    lm = _model(server, pauses)
    (comp,), = lm.generate(_convs(1), Sampling(temperature=0.0))
    assert comp.text == canned_reply(_convs(1)[0], 0, 0, 0.0).strip()
    assert len(server.requests) == 2 and len(pauses) == 1 and lm.requests_sent == 2


def test_retry_after_is_honoured_in_seconds_or_as_a_date_and_capped(server):
    pauses: list[float] = []
    lm = _model(server, pauses, max_backoff_s=10.0)
    date = email.utils.formatdate(time.time() + 5, usegmt=True)
    server.faults.extend([(429, {"Retry-After": "3"}, "slow down"), (503, {"Retry-After": date}, "busy"),
                          (429, {"Retry-After": "120"}, "much slower")])
    lm.generate(_convs(1), Sampling(temperature=0.0))
    assert len(server.requests) == 4
    assert pauses[0] == 3.0
    assert 2.0 < pauses[1] <= 5.0  # an HTTP date has one-second resolution
    assert pauses[2] == 10.0  # capped at max_backoff_s
    assert retry_after_seconds("not a date") is None and retry_after_seconds(None) is None


def test_backoff_doubles_with_jitter_up_to_the_cap(server):
    pauses: list[float] = []
    lm = _model(server, pauses, max_retries=5, backoff_s=0.01, max_backoff_s=0.05)
    server.faults.extend([(503, {}, "busy")] * 5)
    lm.generate(_convs(1), Sampling(temperature=0.0))
    assert len(server.requests) == 6
    for k, p in enumerate(pauses):
        ceiling = min(0.01 * 2 ** k, 0.05)
        assert ceiling / 2 <= p <= ceiling


def test_a_request_that_keeps_failing_gives_up_naming_the_request(server):
    server.rule = lambda req: (503, {}, "engine overloaded") if _content(req) == "question 1" else None
    pauses: list[float] = []
    lm = _model(server, pauses, max_retries=2)
    with pytest.raises(RequestFailed) as err:
        lm.generate(_convs(3), Sampling(temperature=0.0))
    msg = str(err.value)
    for part in ("served-model", f"POST {server.url}/chat/completions", "conversation 1", "HTTP 503",
                 "engine overloaded", "3 attempts"):
        assert part in msg
    assert err.value.status == 503
    assert sum(_content(r) == "question 1" for r in server.requests) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_not_retried_and_name_the_request(server, status):
    server.rule = lambda req: (status, {}, "bad field 'top_p'") if _content(req) == "question 2" else None
    pauses: list[float] = []
    lm = _model(server, pauses)
    with pytest.raises(RequestFailed) as err:
        lm.generate(_convs(4), Sampling(temperature=0.0))
    msg = str(err.value)
    for part in (f"POST {server.url}/chat/completions", "conversation 2", f"HTTP {status}", "bad field 'top_p'"):
        assert part in msg
    assert sum(_content(r) == "question 2" for r in server.requests) == 1 and pauses == []


def test_dropped_connections_are_retried(server):
    server.faults.extend(["drop", "drop"])
    pauses: list[float] = []
    lm = _model(server, pauses)
    (comp,), = lm.generate(_convs(1), Sampling(temperature=0.0))
    assert comp.text.startswith("reply to [question 0]")
    assert len(server.requests) == 3 and len(pauses) == 2


def test_an_unreachable_server_fails_after_the_retries_naming_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pauses: list[float] = []
    lm = OpenAIModel("m", f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_s=0.01, max_backoff_s=0.05)
    lm._pause = lambda seconds, stop: pauses.append(seconds)
    with pytest.raises(RequestFailed, match=rf"POST http://127.0.0.1:{port}/v1/chat/completions \(conversation 0\): "
                                            r"ConnectError.*3 attempts"):
        lm.generate(_convs(1), Sampling(temperature=0.0))
    assert len(pauses) == 2 and lm.requests_sent == 3


# ---- request budget ------------------------------------------------------------------------


def test_the_budget_stops_before_the_request_that_would_exceed_it(server):
    lm = _model(server, max_concurrency=2, request_budget=5)
    with pytest.raises(BudgetExhausted, match="request budget of 5"):
        lm.generate(_convs(8), Sampling(temperature=0.0))
    assert len(server.requests) == 5 == lm.requests_sent
    with pytest.raises(BudgetExhausted):
        lm.generate(_convs(1), Sampling(temperature=0.0))
    assert len(server.requests) == 5


def test_retries_count_against_the_budget(server):
    server.faults.extend([(503, {}, "busy")] * 2)
    lm = _model(server, [], request_budget=2)
    with pytest.raises(BudgetExhausted):
        lm.generate(_convs(1), Sampling(temperature=0.0))
    assert len(server.requests) == 2


ROWS = [{"record_id": f"r{i}", "kind": "red_team", "prompt": f"How do I pick lock number {i}?", "category": None,
         "source": "test"} for i in range(6)]


def _stage_cfg(tmp_path, name: str):
    return load_config(None, [f"run_dir={tmp_path / name}", "sl.rounds=1", "sl.few_shot=1", "sl.chunk_size=2",
                              "pairs.chunk_size=2", "pairs.kinds=[red_team]", "model.backend=openai"])


@pytest.mark.parametrize("stage", ["sl_generate", "pairs"])
def test_a_stage_stopped_by_the_budget_resumes_to_the_rows_of_an_unstopped_run(server, tmp_path, stage):
    constitution = load_constitution("default")

    def run(name: str, budget: int | None):
        cfg = _stage_cfg(tmp_path, name)
        factory = lambda: _model(server, request_budget=budget)  # noqa: E731
        if stage == "sl_generate":
            return sl_generate.run(cfg, factory, constitution, ROWS, "inputs-fp")
        return pairs.run(cfg, factory, ROWS, "inputs-fp", "model-fp")

    per_record = 3 if stage == "sl_generate" else 1  # answer, critique, revision / one request with n=2
    full = run("full", None).rows()
    assert len(full) == 6
    with pytest.raises(BudgetExhausted):
        run("stopped", 3 * per_record)  # chunk 1 (2 records) fits, chunk 2 is cut short
    written = [json.loads(line) for line in (tmp_path / "stopped" / stage / "rows.jsonl").read_text().splitlines()]
    assert [r["record_id"] for r in written] == ["r0", "r1"]
    assert json.loads((tmp_path / "stopped" / stage / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(BudgetExhausted):  # a budget too small for one chunk changes nothing on disk
        run("stopped", 1)
    assert len((tmp_path / "stopped" / stage / "rows.jsonl").read_text().splitlines()) == 2
    resumed = run("stopped", 100)
    assert resumed.rows() == full


# ---- API key --------------------------------------------------------------------------------


def test_the_api_key_is_sent_and_never_shown(server, monkeypatch, caplog):
    server.api_key = SECRET
    server.echo_auth = True
    monkeypatch.setenv("CAI_TEST_KEY", SECRET)
    cfg = ModelConfig(name="served-model", backend="openai",
                      openai=OpenAIConfig(base_url=server.url, api_key_env="CAI_TEST_KEY", backoff_s=0.01,
                                          max_backoff_s=0.02, max_retries=1))
    lm = load_lm(cfg)
    assert isinstance(lm, OpenAIModel) and lm.name == "served-model"
    lm.generate(_convs(1), Sampling(temperature=0.0))
    assert server.requests[-1]["auth"] == f"Bearer {SECRET}"
    assert SECRET not in repr(lm) and SECRET not in repr(lm._client.headers)

    # A careless server echoes the header into its errors: neither the log nor the error repeats it.
    server.faults.extend([(503, {}, "overloaded"), (401, {}, "token revoked")])
    with caplog.at_level(logging.WARNING, logger="cai.lm.openai"), pytest.raises(RequestFailed) as err:
        lm.generate(_convs(1), Sampling(temperature=0.0))
    assert "HTTP 401" in str(err.value) and "token revoked" in str(err.value) and "CAI_TEST_KEY" in str(err.value)
    assert "overloaded" in caplog.text
    assert SECRET not in str(err.value) and SECRET not in caplog.text and SECRET not in repr(err.value)

    monkeypatch.delenv("CAI_TEST_KEY")
    with pytest.raises(BackendError, match="CAI_TEST_KEY.*not set"):
        OpenAIModel.from_config(cfg)


# ---- option scoring ------------------------------------------------------------------------

CONTEXTS = [
    [{"role": "user", "content": "Which reply is kinder?"}, {"role": "assistant", "content": "The answer is: ("}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pick one: sun or <|im_end|> rain?"}],
    [{"role": "user", "content": "Name a colour."}],
]
OPTIONS = [["A", "B"], [" sun", "rain and wind", "Sunny skies"], ["red"]]


def _expected(hf, contexts, options) -> tuple[list[list[float]], list[list[int]]]:
    scores, prompts = [], []
    for ctx, opts in zip(contexts, options):
        cids = hf.encode(ctx)
        row = []
        for opt in opts:
            oids = hf.tokenizer(opt, add_special_tokens=False)["input_ids"]
            ids = cids + oids
            prompts.append(ids)
            row.append(sum(canned_logprob(ids[p - 1], ids[p]) for p in range(len(cids), len(ids))))
        scores.append(row)
    return scores, prompts


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_dir):
    from cai.lm.hf import HFModel

    return HFModel.from_config(ModelConfig(name=tiny_model_dir, dtype="float32"))


@pytest.mark.parametrize("scoring", ["echo", "prompt_logprobs"])
def test_scoring_templates_like_the_in_process_back_end_and_reads_prompt_logprobs(server, tiny_hf, tiny_model_dir,
                                                                                  scoring):
    server.reverse_choices = True  # choices are matched to prompts by index
    lm = _model(server, tokenizer=tiny_model_dir, scoring=scoring, score_batch_size=4)
    scores = lm.score_options(CONTEXTS, OPTIONS)
    expected, prompts = _expected(tiny_hf, CONTEXTS, OPTIONS)
    assert [x for row in scores for x in row] == pytest.approx([x for row in expected for x in row], abs=1e-9)
    assert [len(row) for row in scores] == [len(o) for o in OPTIONS]
    # Token for token what HFModel.encode and the option's tokens give, 4 prompts per request.
    sent = sorted((r["body"]["prompt"] for r in server.requests), key=len, reverse=True)
    assert sent == [prompts[:4], prompts[4:]]
    body = server.requests[0]["body"]
    assert body["max_tokens"] == 1 and body["temperature"] == 0.0
    assert (body.get("echo") is True) == (scoring == "echo") and ("prompt_logprobs" in body) == (scoring != "echo")
    # A forged turn inside a message is plain text: the context templates like HFModel's.
    assert lm.encode(CONTEXTS[1]) == tiny_hf.encode(CONTEXTS[1])
    with pytest.raises(ValueError, match="option 1 of context 0 is empty"):
        lm.score_options(CONTEXTS[:1], [["A", ""]])
    assert lm.score_options([], []) == []


def test_both_scoring_modes_give_the_same_scores(server, tiny_model_dir):
    echo = _model(server, tokenizer=tiny_model_dir, scoring="echo").score_options(CONTEXTS, OPTIONS)
    plp = _model(server, tokenizer=tiny_model_dir, scoring="prompt_logprobs").score_options(CONTEXTS, OPTIONS)
    assert echo == plp


@pytest.mark.parametrize("scoring,behaviour", [("echo", "silent"), ("echo", "reject"), ("echo", "invalid500"),
                                               ("prompt_logprobs", "silent"), ("prompt_logprobs", "reject")])
def test_a_server_that_cannot_score_says_so(server, tiny_model_dir, scoring, behaviour):
    server.scoring[scoring] = behaviour
    lm = _model(server, [], tokenizer=tiny_model_dir, scoring=scoring)
    with pytest.raises(BackendError) as err:
        lm.score_options(CONTEXTS[:1], OPTIONS[:1])
    msg = str(err.value)
    other = "prompt_logprobs" if scoring == "echo" else "echo"
    for part in (server.url, "served-model", f"scoring: {scoring}", f"Try model.openai.scoring: {other}",
                 "context 0 options 0, 1"):
        assert part in msg
    if behaviour == "reject":
        assert f"unsupported parameter: {scoring}" in msg
    if behaviour == "invalid500":
        assert "HTTP 422" in msg and "validation errors" in msg
    assert len(server.requests) == 1  # not retried


def test_a_5xx_that_is_a_validation_error_is_not_retried_and_long_messages_are_cut(server):
    message = "2 validation errors:\n  prompt: " + "x" * 5000
    server.faults.extend([(500, {}, message)] * 3)
    pauses: list[float] = []
    with pytest.raises(RequestFailed) as err:
        _model(server, pauses).generate(_convs(1), Sampling(temperature=0.0))
    assert err.value.status == 422 and pauses == [] and len(server.requests) == 1
    assert "not retried" in str(err.value) and f"({len(message)} characters)" in str(err.value) and len(str(err.value)) < 1400
    # Any other 5xx is still retried.
    server.faults.clear()
    server.faults.append((500, {}, "internal error"))
    assert _model(server, pauses).generate(_convs(1), Sampling(temperature=0.0))[0][0].text
    assert len(pauses) == 1


def test_the_embedded_default_resolves_to_its_tokenizer(server, model_dir):
    from transformers import AutoTokenizer

    from cai.templating import encode_chat

    lm = _model(server)
    lm.name = "smollm2-135m"  # the name the server knows it by is also the tokenizer's
    tok = AutoTokenizer.from_pretrained(model_dir)
    conv = CONTEXTS[0]
    assert lm.encode(conv) == encode_chat(tok, conv, continue_final_message=True)
    assert lm.encode(conv[:1]) == encode_chat(tok, conv[:1], add_generation_prompt=True)
    # Once a tokenizer is loaded it counts completion tokens itself (of the text as generated).
    (comp,), = lm.generate(_convs(1), Sampling(temperature=0.0))
    raw = canned_reply(_convs(1)[0], 0, 0, 0.0)
    assert comp.text == raw.strip() and comp.num_tokens == len(tok(raw, add_special_tokens=False)["input_ids"]) != 6


def test_an_unknown_tokenizer_is_a_clear_error(server, tmp_path):
    lm = _model(server, tokenizer=str(tmp_path / "nowhere"))
    with pytest.raises(BackendError, match="nowhere.*set model.openai.tokenizer"):
        lm.score_options(CONTEXTS[:1], OPTIONS[:1])
    assert server.requests == []


def test_a_raw_text_prompt_is_sent_to_completions_as_the_tokens_the_in_process_back_end_sees(server, tiny_hf,
                                                                                              tiny_model_dir):
    lm = _model(server, tokenizer=tiny_model_dir)
    raw = "Human: Is the sky blue?<|im_end|>\n\nAssistant:"
    [[a, b]] = lm.generate([raw], Sampling(temperature=0.7, max_new_tokens=16, stop=["\n\nHuman:"]), n=2, seeds=[5])
    [req] = server.requests
    assert req["path"] == "/v1/completions" and "messages" not in req["body"]
    # The same ids as HFModel.encode of the string: no chat template, the special-token text split.
    assert req["body"]["prompt"] == tiny_hf.encode(raw) == lm.encode(raw)
    assert tiny_hf.tokenizer.convert_tokens_to_ids("<|im_end|>") not in req["body"]["prompt"]
    assert req["body"]["n"] == 2 and req["body"]["seed"] == 5
    n_ids = len(req["body"]["prompt"])
    assert (a.text, b.text) == (f"continues {n_ids} tokens seed 5 sample 0", f"continues {n_ids} tokens seed 5 sample 1")
    # Raw contexts are scored as their own tokens too.
    scores = lm.score_options([raw], [["A", "B"]])
    expected, _ = _expected(tiny_hf, [raw], [["A", "B"]])
    assert scores[0] == pytest.approx(expected[0], abs=1e-9)


def test_extra_body_reaches_every_request_and_cannot_override_the_run(server, tiny_model_dir, monkeypatch):
    cfg = load_config(None, ["model.backend=openai", f"model.openai.base_url={server.url}", "model.name=served-model",
                             "model.openai.extra_body.top_k=20", "model.openai.extra_body.repetition_penalty=1.1",
                             f"model.openai.tokenizer={tiny_model_dir}"])
    lm = OpenAIModel.from_config(cfg.model)
    lm.generate(_convs(1), Sampling(temperature=0.7, max_new_tokens=4), seeds=[3])
    lm.score_options(CONTEXTS[:1], OPTIONS[:1])
    gen, score = server.requests[0]["body"], server.requests[-1]["body"]
    assert gen["top_k"] == 20 and gen["repetition_penalty"] == 1.1 and gen["seed"] == 3 and gen["temperature"] == 0.7
    assert score["top_k"] == 20 and score["max_tokens"] == 1
    # the back-end's own fields win even over a mapping built by hand
    lm2 = _model(server, extra_body={"seed": 99, "min_p": 0.05})
    lm2.generate(_convs(1), Sampling(max_new_tokens=4), seeds=[5])
    assert server.requests[-1]["body"]["seed"] == 5 and server.requests[-1]["body"]["min_p"] == 0.05
