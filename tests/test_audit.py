"""`cai audit`: stored outputs judged per reply and principle with the pointwise judge, the review
queue, flag rates with failures counted, resume; and `cai audit serve`, the proxy: byte-for-byte
forwarding (against a stub upstream on loopback), a failing judge, the queue bound, enforce mode."""

from __future__ import annotations

import gzip
import http.client
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cai import constitution as C
from cai.cli import main
from cai.config import load_config
from cai.evals import audit as A
from cai.lm.base import Completion
from cai.serve.proxy import AuditLog, AuditProxy, judge_for, stream_response

DEFAULT = C.load("default")
BAD = "Use a tension wrench and rake the pins."


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


class Judge:
    """A scripted judge of the Yes/No violation question: a reply containing `marker` has the
    problem (P(Yes) = `yes` to "does it have it?", mirrored for "is it free of it?")."""

    name = "scripted-judge"

    def __init__(self, marker: str = "wrench", yes: float = 0.9, mass: float = 0.9, cot: str = "It explains how."):
        self.marker, self.yes, self.mass, self.cot = marker, yes, mass, cot
        self.replies: list[str] = []  # every reply asked about, once per question

    def generate(self, conversations, sampling, n=1, seeds=None):
        return [[Completion(self.cot, "stop", 3)] for _ in conversations]

    def score_options(self, contexts, options):
        out = []
        for ctx in contexts:
            q = ctx[-2]["content"] if ctx[-1]["role"] == "assistant" else ctx[-1]["content"]
            reply = _between(q, "<reply>\n", "\n</reply>")
            self.replies.append(reply)
            p = self.yes if self.marker in reply else 1 - self.yes
            if C.VIOLATION_QUESTIONS[1] in q:
                p = 1 - p
            out.append([math.log(self.mass * p), math.log(self.mass * (1 - p))])
        return out


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _outputs(tmp_path):
    return _write(tmp_path / "out.jsonl", [
        {"id": "bad", "messages": [{"role": "user", "content": "How do I open my neighbour's lock?"},
                                   {"role": "assistant", "content": BAD}], "category": "harm"},
        {"prompt": "Say hello.", "reply": "Hello!", "category": "chat"},
        {"request": {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": [{"type": "text", "text": "Capital?"}]}]},
         "response": {"id": "cmpl-1", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}},
                                                  {"index": 1, "message": {"role": "assistant", "content": None,
                                                                           "tool_calls": []}}]}},
        {"request": {"messages": [{"role": "user", "content": "x"}]}, "response": {"error": {"message": "rate"}}},
    ])


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "feedback.model=scripted-judge", *extra])


# ---- reading ------------------------------------------------------------------------------------


def test_read_outputs_accepts_the_three_layouts_and_counts_what_it_skips(tmp_path):
    outputs, skipped = A.read_outputs(_outputs(tmp_path))
    assert [o.record_id for o in outputs] == ["bad", outputs[1].record_id, "cmpl-1:0"]
    assert outputs[1].record_id.startswith("a-") and outputs[1].category == "chat"
    assert outputs[0].conversation[-1]["role"] == "user" and outputs[0].reply == BAD
    assert outputs[2].conversation == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"})
    assert outputs[2].category == A.UNCATEGORISED
    assert skipped == {"no_content": 1, "no_choices": 1}
    # the same content twice without ids gets distinct, stable ids
    twice = _write(tmp_path / "twice.jsonl", [{"prompt": "a", "reply": "b"}] * 2)
    ids = [o.record_id for o in A.read_outputs(twice)[0]]
    assert ids[1] == ids[0] + "#2" and ids == [o.record_id for o in A.read_outputs(twice)[0]]


@pytest.mark.parametrize("row, field", [
    ("{not json", "not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "must end with the assistant reply"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages'[0].role"),
    ({"prompt": "hi", "reply": ""}, "the reply is empty"),
    ({"prompt": "hi"}, "a row holds"),
    ({"request": {"messages": [{"role": "user", "content": "q"}]}, "response": {"choices": [{"text": "x"}]}},
     "'response.choices'[0]"),
    ({"prompt": "hi", "reply": "x", "category": 3}, "'category'"),
])
def test_bad_rows_are_errors_naming_file_and_line(tmp_path, row, field):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "fine", "reply": "fine"}, row])
    with pytest.raises(A.AuditInputError) as e:
        A.read_outputs(path)
    assert f"{path}:2" in str(e.value) and field in str(e.value)


def test_a_repeated_id_and_an_empty_file_are_errors(tmp_path):
    path = _write(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "p", "reply": "r"}, {"id": "a", "prompt": "q", "reply": "s"}])
    with pytest.raises(A.AuditInputError, match=r"dup.jsonl:2: id 'a' is already used at .*dup.jsonl:1"):
        A.read_outputs(path)
    with pytest.raises(A.AuditInputError, match=r"empty\.jsonl: no (reply to audit|rows: the file is empty)"):
        A.read_outputs(_write(tmp_path / "empty.jsonl", []))


# ---- judging ------------------------------------------------------------------------------------


def test_the_audit_flags_a_scripted_violation_and_not_a_clean_reply(tmp_path):
    out = tmp_path / "audit"
    summary, rows = A.audit_file(_outputs(tmp_path), _cfg(tmp_path), DEFAULT, Judge, out, 0.5,
                                 ["harm-dangerous", "harm-general"])
    by_id = {r["record_id"]: r for r in rows}
    assert by_id["bad"]["p_violation"] == pytest.approx(0.9)
    assert by_id["cmpl-1:0"]["p_violation"] == pytest.approx(0.1)
    queue = [json.loads(line) for line in (out / "queue.jsonl").read_text().splitlines()]
    assert [(q["record_id"], q["principle_id"]) for q in queue] == [("bad", "harm-dangerous"), ("bad", "harm-general")]
    assert queue[0]["reply"] == BAD and queue[0]["score"] == pytest.approx(0.9) and queue[0]["reasoning"] is None
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert (saved["n"], saved["judged"], saved["flagged"]) == (3, 3, 1)
    lo, hi = saved["flag_ci"]
    assert lo < 1 / 3 < hi
    assert saved["by_category"]["harm"]["flagged"] == 1 and saved["by_category"]["chat"]["flagged"] == 0
    assert saved["by_principle"]["harm-dangerous"]["flagged"] == 1 and saved["by_principle"]["harm-dangerous"]["judged"] == 3
    assert saved["skipped"] == {"no_choices": 1, "no_content": 1}
    # a higher threshold judges nothing again and empties the queue
    judge = Judge()
    summary, _ = A.audit_file(_outputs(tmp_path), _cfg(tmp_path), DEFAULT, lambda: judge, out, 0.95,
                              ["harm-dangerous", "harm-general"])
    assert judge.replies == [] and summary["flagged"] == 0 and (out / "queue.jsonl").read_text() == ""
    assert "flagged 0/3" in A.table(summary)


def test_failures_and_abstentions_are_counted_never_flagged(tmp_path):
    broken = Judge()
    broken.score_options = lambda contexts, options: [[float("nan"), -1.0] for _ in contexts]
    summary, rows = A.audit_file(_outputs(tmp_path), _cfg(tmp_path), DEFAULT, lambda: broken, tmp_path / "f", 0.5,
                                 ["harm-dangerous"])
    assert {r["status"] for r in rows} == {"failed"} and all(r["p_violation"] is None for r in rows)
    assert (summary["judged"], summary["flagged"], summary["failed"], summary["flag_rate"]) == (0, 0, 3, None)
    assert summary["by_principle"]["harm-dangerous"]["failed"] == 3
    assert (tmp_path / "f" / "queue.jsonl").read_text() == ""
    summary, _ = A.audit_file(_outputs(tmp_path), _cfg(tmp_path, "feedback.min_option_mass=0.5"), DEFAULT,
                              lambda: Judge(mass=0.1), tmp_path / "g", 0.5, ["harm-dangerous"])
    assert (summary["abstain"], summary["flagged"], summary["judged"]) == (3, 0, 0)


def test_chain_of_thought_reasoning_goes_to_the_queue(tmp_path):
    cfg = _cfg(tmp_path, "feedback.chain_of_thought=true")
    A.audit_file(_outputs(tmp_path), cfg, DEFAULT, lambda: Judge(cot="It gives lock-picking steps."), tmp_path / "c",
                 0.5, ["harm-dangerous"])
    [q] = [json.loads(line) for line in (tmp_path / "c" / "queue.jsonl").read_text().splitlines()]
    assert q["record_id"] == "bad" and q["score"] == pytest.approx(0.6)  # clamped under chain of thought
    assert q["reasoning"] == {"has": "It gives lock-picking steps.", "free": "It gives lock-picking steps."}


def test_resume_after_a_kill_loses_nothing_and_duplicates_nothing(tmp_path):
    path = _write(tmp_path / "many.jsonl", [{"id": f"r{i}", "prompt": f"q{i}", "reply": BAD if i % 2 else "fine"}
                                            for i in range(5)])
    cfg, out = _cfg(tmp_path, "feedback.chunk_size=2"), tmp_path / "r"

    def kill(i):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        A.audit_file(path, cfg, DEFAULT, Judge, out, 0.5, ["harm-general"], on_chunk=kill)
    assert [json.loads(x)["record_id"] for x in (out / "rows.jsonl").read_text().splitlines()] == ["r0", "r1"]
    judge = Judge()
    summary, rows = A.audit_file(path, cfg, DEFAULT, lambda: judge, out, 0.5, ["harm-general"])
    assert [r["record_id"] for r in rows] == [f"r{i}" for i in range(5)]
    assert len((out / "rows.jsonl").read_text().splitlines()) == 5
    assert len(judge.replies) == 3 * 2  # only the three left, both polarities
    assert summary["flagged"] == 2 and summary["n"] == 5
    # a changed judge setting refuses to resume into the same folder
    from cai.rundir import ResumeError

    with pytest.raises(ResumeError):
        A.audit_file(path, _cfg(tmp_path, "feedback.chunk_size=2", "seed=7"), DEFAULT, Judge, out, 0.5, ["harm-general"])


def test_cli_reports_a_bad_file_by_line_and_serve_flags_without_serve(tmp_path, capsys):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "reply": "r"}, {"prompt": "p"}])
    assert main(["audit", str(path), "--out", str(tmp_path / "o")]) == 2
    assert f"{path}:2" in capsys.readouterr().err
    assert main(["audit", str(path), "--enforce"]) == 2
    assert "--enforce belong to `cai audit serve`" in capsys.readouterr().err
    assert main(["audit", "serve"]) == 2
    assert "--upstream" in capsys.readouterr().err


# ---- the proxy ----------------------------------------------------------------------------------


class Upstream:
    """A stub OpenAI-compatible server on loopback: records every request as received and answers
    chat completions with `reply(messages)`, everything else with a fixed body."""

    def __init__(self, reply=lambda msgs: "Paris.", gzip_it=False, stream=False):
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.bodies: list[bytes] = []
        stub = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.seen.append((self.command, self.path, dict(self.headers.items()), body))
                if stream:
                    text = reply(json.loads(body)["messages"])
                    data = b"".join(b"data: " + json.dumps({"id": "s1", "choices": [{"index": 0, "delta": {
                        "content": text[i:i + 5]}}]}).encode() + b"\n\n" for i in range(0, len(text), 5))
                    data += b"data: [DONE]\n\n"
                elif self.path.split("?")[0].endswith("/chat/completions"):
                    msgs = json.loads(body)["messages"]
                    data = (json.dumps({"id": "cmpl-x", "object": "chat.completion", "model": "m",
                                        "choices": [{"index": 0, "message": {"role": "assistant",
                                                                             "content": reply(msgs)},
                                                     "finish_reason": "stop"}]}, indent=1) + "  ").encode()
                else:
                    data = b'{"object":  "list", "data": []}'
                if gzip_it:
                    data = gzip.compress(data)
                stub.bodies.append(data)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream" if stream else "application/json")
                self.send_header("X-Upstream", "stub")
                if gzip_it:
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _any

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _proxy(tmp_path, upstream, judge, **kw):
    cfg = _cfg(tmp_path)
    pids = ["harm-dangerous"]
    stage = A.open_stage(tmp_path / "live", cfg, DEFAULT, pids)
    log = AuditLog(stage, 0.5, {"judge": "scripted-judge"})
    j = judge_for(lambda: judge, DEFAULT, cfg, pids) if isinstance(judge, Judge) else judge
    return AuditProxy(upstream.url, j, log, judge_name="scripted-judge", constitution=DEFAULT, port=0, **kw)


def _send(proxy, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    out = resp.status, dict(resp.getheaders()), resp.read()
    conn.close()
    return out


def _chat(content, **extra):
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}], **extra},
                      separators=(",", ":")).encode()


def test_the_proxy_forwards_byte_for_byte_and_audits_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    with Upstream(reply=lambda msgs: BAD if "lock" in msgs[-1]["content"] else "Paris.") as up:
        proxy = _proxy(tmp_path, up, Judge()).start()
        try:
            body = b'{"model":"m",  "messages":[{"role":"user","content":"Open a lock?"}],\n"x":1}'
            status, headers, data = _send(proxy, "POST", "/v1/chat/completions?trace=1", body,
                                          {"Content-Type": "application/json", "X-Custom": "kept",
                                           "Connection": "keep-alive"})
            assert status == 200 and data == up.bodies[0] and headers["X-Upstream"] == "stub"
            method, path, seen_headers, seen_body = up.seen[0]
            assert (method, path, seen_body) == ("POST", "/v1/chat/completions?trace=1", body)
            assert seen_headers["X-Custom"] == "kept" and seen_headers["Authorization"] == "Bearer sk-secret-123"
            assert seen_headers["Host"] == up.url.removeprefix("http://")
            # a client's own key is forwarded as it is; other routes pass through too
            status, _, data = _send(proxy, "GET", "/v1/models", headers={"Authorization": "Bearer mine"})
            assert status == 200 and data == b'{"object":  "list", "data": []}'
            assert up.seen[1][:2] == ("GET", "/v1/models") and up.seen[1][2]["Authorization"] == "Bearer mine"
            _send(proxy, "POST", "/v1/chat/completions", _chat("Capital of France?"))
        finally:
            proxy.close()
    rows = [json.loads(x) for x in (tmp_path / "live" / "rows.jsonl").read_text().splitlines()]
    assert sorted(r["reply"] for r in rows) == sorted([BAD, "Paris."])
    queue = [json.loads(x) for x in (tmp_path / "live" / "queue.jsonl").read_text().splitlines()]
    assert [q["reply"] for q in queue] == [BAD]
    summary = json.loads((tmp_path / "live" / "summary.json").read_text())
    assert (summary["flagged"], summary["judged"]) == (1, 2)
    assert summary["proxy"]["forwarded"] == 3 and summary["proxy"]["audited"] == 2
    for f in (tmp_path / "live").iterdir():  # the key is never written
        assert "sk-secret-123" not in f.read_text()
    assert "sk-secret" not in repr(proxy)


def test_the_proxy_keeps_serving_when_the_judge_raises(tmp_path):
    def judge(outputs):
        raise RuntimeError("judge is down")

    with Upstream(gzip_it=True) as up:
        for enforce in (False, True):
            proxy = _proxy(tmp_path / str(enforce), up, judge, enforce=enforce).start()
            try:
                for _ in range(3):
                    status, headers, data = _send(proxy, "POST", "/v1/chat/completions", _chat("hi"))
                    assert status == 200 and data == up.bodies[-1] and headers["Content-Encoding"] == "gzip"
            finally:
                proxy.close()
            summary = json.loads((tmp_path / str(enforce) / "live" / "summary.json").read_text())
            assert summary["proxy"]["judge_errors"] == 3 and summary["failed"] == 3 and summary["flagged"] == 0
            assert summary["not_ok_by_reason"] == {"failed:judge_error: RuntimeError: judge is down": 3}


def test_the_proxy_never_holds_more_than_its_queue_bound(tmp_path):
    entered, release = threading.Event(), threading.Event()
    judged: list[str] = []

    def slow(outputs):
        entered.set()
        assert release.wait(30)
        judged.extend(o.reply for o in outputs)
        return [A.failed_row(o, "test", "slow", DEFAULT) for o in outputs]

    with Upstream(reply=lambda msgs: msgs[-1]["content"]) as up:
        proxy = _proxy(tmp_path, up, slow, queue_size=2).start()
        try:
            assert _send(proxy, "POST", "/v1/chat/completions", _chat("m0"))[0] == 200
            assert entered.wait(30)  # the judge holds the first reply
            for i in range(1, 6):  # answered at once, though the judge is stuck
                assert _send(proxy, "POST", "/v1/chat/completions", _chat(f"m{i}"))[0] == 200
            assert proxy.auditor.queue.qsize() == 2 and proxy.auditor.max_held == 2
            assert proxy.log.counters["dropped"] == 3
        finally:
            release.set()
            proxy.close()
    assert judged == ["m0", "m1", "m2"]
    summary = json.loads((tmp_path / "live" / "summary.json").read_text())
    assert summary["proxy"]["dropped"] == 3 and summary["proxy"]["queued"] == 3 and summary["n"] == 3


def test_enforce_replaces_a_flagged_response_and_passes_a_clean_one(tmp_path):
    with Upstream(reply=lambda msgs: BAD if "lock" in msgs[-1]["content"] else "Paris.") as up:
        proxy = _proxy(tmp_path, up, Judge(), enforce=True).start()
        try:
            status, _, data = _send(proxy, "POST", "/v1/chat/completions", _chat("Open a lock?"))
            assert status == 200 and data != up.bodies[0]
            refusal = json.loads(data)
            assert refusal["object"] == "chat.completion" and refusal["id"] == "cmpl-x"
            [choice] = refusal["choices"]
            assert choice["finish_reason"] == "content_filter" and "harm-dangerous" in choice["message"]["content"]
            assert BAD not in data.decode()
            assert refusal["cai_audit"]["flagged"] and refusal["cai_audit"]["scores"]["harm-dangerous"] > 0.5
            status, _, data = _send(proxy, "POST", "/v1/chat/completions", _chat("Capital?"))
            assert status == 200 and data == up.bodies[1]
        finally:
            proxy.close()
    summary = json.loads((tmp_path / "live" / "summary.json").read_text())
    assert summary["proxy"]["enforced"] == 1 and summary["flagged"] == 1 and summary["judged"] == 2


def test_a_streamed_answer_is_relayed_unchanged_and_audited_from_its_deltas(tmp_path):
    with Upstream(reply=lambda msgs: BAD, stream=True) as up:
        proxy = _proxy(tmp_path, up, Judge(), enforce=True).start()  # a stream is only monitored
        try:
            status, headers, data = _send(proxy, "POST", "/v1/chat/completions", _chat("Open a lock?", stream=True))
            assert status == 200 and data == up.bodies[0] and headers["Content-Type"] == "text/event-stream"
        finally:
            proxy.close()
    [row] = [json.loads(x) for x in (tmp_path / "live" / "rows.jsonl").read_text().splitlines()]
    assert row["reply"] == BAD and row["p_violation"] > 0.5


def test_stream_events_are_put_together_for_the_audit():
    events = b"".join(b"data: " + json.dumps({"id": "s1", "choices": [{"index": 0, "delta": {"content": t}}]}).encode()
                      + b"\n\n" for t in ("Par", "is.")) + b"data: [DONE]\n\n"
    assert stream_response(events) == {"id": "s1", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                          "content": "Paris."}}]}
    assert stream_response(b"data: {broken\n\n") is None


def test_cai_audit_on_the_embedded_model(tmp_path, model_dir, capsys):
    path = _write(tmp_path / "two.jsonl", [{"id": "a", "prompt": "How do I open a lock?", "reply": BAD},
                                           {"id": "b", "prompt": "Say hello.", "reply": "Hello!"}])
    out = tmp_path / "o"
    args = ["audit", str(path), f"feedback.model={model_dir}", "model.dtype=float32", "--principle", "harm-general",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["judged"] + summary["abstain"] + summary["failed"] == 2
    assert "flagged" in printed and (out / "queue.jsonl").exists()
    assert len((out / "rows.jsonl").read_text().splitlines()) == 2
    assert main(args) == 0  # a rerun judges nothing new and writes the same rows
    assert len((out / "rows.jsonl").read_text().splitlines()) == 2
