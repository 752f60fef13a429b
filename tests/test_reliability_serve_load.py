"""`reliability/serve_load.py` in its quick variant (tiny models, servers in process, a one-second
request timeout), and the `cai serve` fixes it led to, each pinned on its own."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from cai.config import ModelConfig
from cai.serve import Server

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    path = ROOT / "reliability" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("reliability_serve_load", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pm_dir(tiny_model_dir, tmp_path_factory):
    return _harness().derive_pm(tiny_model_dir, tmp_path_factory.mktemp("pm"), seed=0)


def test_quick_load_and_abuse(tiny_model_dir, pm_dir, capfd):
    sl = _harness()
    res = sl.run(tiny_model_dir, clients=2, seconds=1.0, max_tokens=4, pm=pm_dir, request_timeout_s=1.0,
                 slow_gap_s=0.25, idle=4, in_process=True)
    text = sl.render(res)
    load = res["load"]
    assert load["requests"] > 0 and load["errors"] == 0, text
    assert all(v["errors"] == 0 for v in load["per_kind"].values())
    assert set(load["per_kind"]) == {"chat", "completions", "pooling"}
    cases = res["abuse"]["cases"]
    assert len(cases) == len(sl.abuse_cases("k", 1.0, 0.25, 4))
    for c in cases:
        assert c["status"] in c["expect"], (c["case"], c["status"], c["body"][:300])
        assert "Traceback" not in c["body"] and 'File "' not in c["body"], c["case"]
        err = json.loads(c["body"])["error"]
        assert err["code"] == c["status"] and err["message"]
    statuses = {c["case"]: c["status"] for c in cases}
    assert statuses["no API key"] == statuses["oversized body without the key"] == 401
    assert statuses["slow client: request a byte at a time"] == statuses["idle connection 0"] == 408
    assert statuses["huge n (10^6)"] == statuses["huge max_tokens (10^9)"] == 400
    good = res["abuse"]["good_during"]
    assert good["requests"] >= 1 and good["errors"] == 0, good  # well-formed requests kept being served
    assert res["healthy_after"]
    assert "Traceback" not in capfd.readouterr().err  # the in-process servers logged no failure
    assert "FAILED" not in text


def test_the_harness_counts_a_wrong_answer_as_a_problem():
    sl = _harness()
    case = sl.Case("x", (400,), lambda port: {})
    assert sl.judge_case(case, {"status": 400, "body": '{"error": {"message": "n: bad"}}', "seconds": 0.1}, 5) == []
    problems = sl.judge_case(case, {"status": 500, "body": 'Traceback (most recent call last):\n  File "x"',
                                    "seconds": 9.0}, 5)
    assert len(problems) == 4  # status, trace, not JSON, too slow
    assert sl.check_answer("completions", {"choices": [{"logprobs": {"tokens": ["a", "b"],
                                                                     "token_logprobs": [None]}}]})
    assert sl.check_answer("pooling", {"data": [{"data": [float("nan")]}]})
    assert sl.check_answer("chat", {"choices": []})


@pytest.fixture(scope="module")
def keyed(tiny_model_dir):
    from cai.lm.hf import HFModel

    lm = HFModel.from_config(ModelConfig(name=tiny_model_dir, dtype="float32", batch_size=4))
    with Server(lm, "tiny", port=0, api_key="k3y", request_timeout_s=1.0) as srv:
        yield srv


def test_idle_keep_alive_connection_closes_quietly_after_a_request(keyed):
    # A pooled client must never read a stray 408 as the answer to its next request.
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k3y\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(good)}\r\n\r\n").encode() + good
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=30) as s:
        s.sendall(req)
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            data += s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")
        rest = b""
        while chunk := s.recv(65536):  # the server closes it after the idle timeout, saying nothing
            rest += chunk
        assert rest == b""


def test_unauthorised_request_is_refused_before_its_body_is_read(keyed):
    # 32 MB declared, none sent: the 401 comes at once, not after a wait for the body.
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 33554432\r\n\r\n")
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=30) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):  # it answers, then closes: the body is never read
            data += chunk
    assert data.startswith(b"HTTP/1.1 401") and b"authentication_error" in data


def test_over_long_text_and_too_many_choices_are_400s(keyed):
    h = {"Authorization": "Bearer k3y"}
    long_text = "a" * (keyed.app.max_chars + 1)
    r = httpx.post(f"{keyed.url}/completions", json={"prompt": long_text, "max_tokens": 1}, headers=h, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{keyed.url}/completions", json={"prompt": ["a", "b"], "n": 128, "max_tokens": 0, "echo": True},
                   headers=h, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 256  # 256 choices are allowed
    r = httpx.post(f"{keyed.url}/completions", json={"prompt": ["a"] * 9, "n": 128, "max_tokens": 1}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_connections_past_the_cap_get_a_503(tiny_model_dir):
    from cai.lm.hf import HFModel

    lm = HFModel.from_config(ModelConfig(name=tiny_model_dir, dtype="float32", batch_size=4))
    with Server(lm, "tiny", port=0, request_timeout_s=5.0, max_connections=2) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(2)]
        try:
            deadline = time.monotonic() + 30
            while len(srv.httpd._conns) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 503")
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 30
        while srv.httpd._conns and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(srv.url.removesuffix("/v1") + "/health").status_code == 200


def test_cli_passes_the_request_timeout():
    from cai.cli import build_parser

    assert build_parser().parse_args(["serve", "m"]).request_timeout == 30.0
    assert build_parser().parse_args(["serve", "m", "--request-timeout", "2.5"]).request_timeout == 2.5
