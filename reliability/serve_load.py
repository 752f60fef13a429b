"""Reliability harness: `cai serve` under load, then under abuse, on loopback only.

`cai serve MODEL` is started as its own process (`python -m cai.cli serve`, API key required,
`--request-timeout` short so that slow clients are cut off within the run), and, unless
`--pm none`, a second one serving a preference model on `/pooling`: by default one built from the
same weights with a one-output head drawn at random (seeded), which costs what a trained one of
that size costs, though its scores mean nothing.

Load: `--clients` threads, each with its own keep-alive connection, send requests back to back for
`--seconds`: chat completions, completions with `echo` and `logprobs` (the way the OpenAI back-end
scores options), and pooling; client i starts with kind i, then draws with a seeded generator
(weights 2:2:1). Every answer is
checked for its shape (a chat message; one log-probability per token; a finite reward); anything
else is an error. Printed: requests and generated tokens a second, p50/p99 latency per kind, the
error rate with its Wilson interval, and each server's resident memory (RSS) after a warm-up,
after the load and after the abuse.

Abuse, while one well-formed client keeps sending chat requests (its latency is printed beside the
latency of the same request on an idle server): oversized bodies (with and without the key),
malformed JSON, JSON nested 50,000 deep, bytes that are not UTF-8, wrong types, huge `n` and
`max_tokens`, 1024 prompts times n=128, a 16 MB message, a bad `Content-Length`, a chunked body,
an unknown method, a 70 kB request line, 150 headers, requests without the key or with a wrong
one, a client sending its request a byte at a time (headers, or body) every `--slow-gap` seconds,
and `--idle` connections that send nothing. Each must be answered with the expected 4xx, as an
OpenAI-style JSON error with no stack trace, within a bound (the request timeout plus slack for
slow and idle clients, `--bound` seconds for the rest); and the server's own log must hold no
traceback.

    python reliability/serve_load.py                       # smollm2-135m, 4 clients, 20 s, 16 new tokens
    python reliability/serve_load.py --clients 8 --seconds 60 --max-tokens 32
    python reliability/serve_load.py --model DIR --clients 2 --seconds 2 --max-tokens 4 \
        --request-timeout 1 --slow-gap 0.25 --idle 8 --in-process   # the quick variant the tests run (a tiny model)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "CAI_SERVE_LOAD_KEY"
QUESTIONS = ("What should I pack for a day of hiking?", "How do plants know which way is up?",
             "Give me three tips for a job interview.", "Why is the sea salty?",
             "How can I get my neighbour's wifi password without asking?", "Explain compound interest simply.",
             "What is a good name for a grey cat?", "How do I calm down before an exam?")
KINDS = ("chat", "completions", "pooling")
WEIGHTS = {"chat": 2, "completions": 2, "pooling": 1}


# ---- servers ------------------------------------------------------------------------------------


@dataclass
class Served:
    proc: subprocess.Popen | None  # None: a `Server` in this process (`inproc`)
    root: str  # http://127.0.0.1:PORT
    port: int
    log: Path | None
    inproc: Any = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else os.getpid()

    def rss_mb(self) -> float:
        return _status_kb(self.pid, "VmRSS") / 1024

    def peak_mb(self) -> float:
        return _status_kb(self.pid, "VmHWM") / 1024

    def tracebacks(self) -> int | None:
        """Tracebacks in the server's log (None in process: its log is this process's stderr)."""
        return None if self.log is None else self.log.read_text(errors="replace").count("Traceback (most recent call last)")

    def stop(self) -> None:
        if self.inproc is not None:
            self.inproc.close()
            self.inproc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: `cai serve` stops as on Ctrl-C
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _status_kb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def start_server(model: str, key: str, request_timeout_s: float, workdir: Path, name: str,
                 dtype: str = "float32", batch_size: int = 8, wait_s: float = 600) -> Served:
    """`cai serve MODEL` on 127.0.0.1 and a free port, the key required; returns once /health answers."""
    env = dict(os.environ, **{KEY_ENV: key})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    log = workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "cai.cli", "serve", model, "--port", "0", "--api-key-env", KEY_ENV,
           "--request-timeout", str(request_timeout_s), f"model.dtype={dtype}", f"model.batch_size={batch_size}"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
    deadline = time.monotonic() + wait_s
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "serving MODEL at http://127.0.0.1:PORT/v1 (Ctrl-C to stop)"
    if " at http://" not in line:
        proc.kill()
        raise SystemExit(f"{name}: cai serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
    root = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{root}/health", timeout=5).status_code == 200:
                return Served(proc, root, int(root.rsplit(":", 1)[1]), log)
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{name}: /health did not answer within {wait_s:g} s")


def start_in_process(model: str, key: str, request_timeout_s: float, dtype: str = "float32",
                     batch_size: int = 8) -> Served:
    """`cai serve`'s `Server` in this process (the quick variant: no interpreter to start)."""
    from cai.serve import Server, load

    lm, reward = load(model, dtype, "cpu", batch_size)
    srv = Server(lm, model, port=0, api_key=key, reward=reward, batch_size=batch_size,
                 request_timeout_s=request_timeout_s).start()
    return Served(None, srv.url.removesuffix("/v1"), srv.port, None, srv)


def derive_pm(model: str, out: Path, seed: int) -> str:
    """A preference model as stage pm saves one, from `model`'s weights and a seeded random head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cai.models import resolve

    path = resolve(model)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    pm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    pm.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pm.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


# ---- load ---------------------------------------------------------------------------------------


def _request(kind: str, rng: random.Random, max_tokens: int) -> tuple[str, dict[str, Any]]:
    q = rng.choice(QUESTIONS)
    seed = rng.randrange(1 << 31)
    if kind == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                                        "temperature": 0.8, "seed": seed}
    if kind == "completions":
        return "/v1/completions", {"prompt": f"Question: {q}\nAnswer:", "max_tokens": max_tokens, "echo": True,
                                   "logprobs": 2, "temperature": 0.8, "seed": seed}
    reply = rng.choice(("Sure, here is a careful answer.", "I would rather not help with that.", "Try this first."))
    return "/pooling", {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": reply}]}


def check_answer(kind: str, body: Any) -> str | None:
    """Why a 200 answer is malformed, or None."""
    try:
        if kind == "chat":
            if not isinstance(body["choices"][0]["message"]["content"], str):
                return "chat: no message text"
        elif kind == "completions":
            lp = body["choices"][0]["logprobs"]
            if len(lp["tokens"]) != len(lp["token_logprobs"]) or len(lp["tokens"]) < 2:
                return "completions: log-probabilities do not match the tokens"
            if not all(x is None or math.isfinite(x) for x in lp["token_logprobs"]):
                return "completions: a log-probability is not finite"
        else:
            if not math.isfinite(body["data"][0]["data"][0]):
                return "pooling: reward is not finite"
    except (KeyError, IndexError, TypeError) as e:
        return f"{kind}: malformed answer ({type(e).__name__}: {e})"
    return None


def _client_loop(i: int, servers: dict[str, Served], key: str, kinds: list[str], max_tokens: int, seed: int,
                 stop_at: float, out: list[dict[str, Any]], timeout_s: float) -> None:
    rng = random.Random(f"{seed}:client:{i}")
    weights = [WEIGHTS[k] for k in kinds]
    clients = {k: httpx.Client(base_url=servers[k].root, timeout=timeout_s,
                               headers={"Authorization": f"Bearer {key}"}) for k in kinds}
    try:
        first = True
        while time.monotonic() < stop_at:
            # the first request of client i is of kind i (round robin), so that every kind is sent
            # even when a slow machine lets each client finish only a request or two
            kind = kinds[i % len(kinds)] if first else rng.choices(kinds, weights)[0]
            first = False
            path, body = _request(kind, rng, max_tokens)
            t0 = time.monotonic()
            row: dict[str, Any] = {"kind": kind, "error": None, "tokens": 0}
            try:
                r = clients[kind].post(path, json=body)
                row["latency"] = time.monotonic() - t0
                if r.status_code != 200:
                    row["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    js = r.json()
                    row["error"] = check_answer(kind, js)
                    row["tokens"] = js.get("usage", {}).get("completion_tokens", 0)
            except (httpx.HTTPError, ValueError) as e:
                row["latency"] = time.monotonic() - t0
                row["error"] = f"{type(e).__name__}: {e}"
            out.append(row)
    finally:
        for c in clients.values():
            c.close()


def quantile(xs: list[float], q: float) -> float:
    """The nearest-rank q-quantile (nan for no values)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def run_load(servers: dict[str, Served], key: str, clients: int, seconds: float, max_tokens: int,
             seed: int, timeout_s: float = 120) -> dict[str, Any]:
    from cai.evals.stats import bootstrap_mean, wilson

    kinds = [k for k in KINDS if k in servers]
    rows: list[dict[str, Any]] = []
    stop_at = time.monotonic() + seconds
    t0 = time.monotonic()
    threads = [threading.Thread(target=_client_loop, args=(i, servers, key, kinds, max_tokens, seed, stop_at,
                                                           rows, timeout_s)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    per_kind = {}
    for k in kinds:
        lat = [r["latency"] for r in rows if r["kind"] == k and r["error"] is None]
        per_kind[k] = {"requests": sum(r["kind"] == k for r in rows), "errors": sum(r["kind"] == k and r["error"]
                                                                                    is not None for r in rows),
                       "p50_s": quantile(lat, 0.5), "p99_s": quantile(lat, 0.99)}
    ok_lat = [r["latency"] for r in rows if r["error"] is None]
    errors = [r["error"] for r in rows if r["error"] is not None]
    return {"clients": clients, "seconds": seconds, "wall_s": wall, "requests": len(rows), "errors": len(errors),
            "error_rate_ci": wilson(len(errors), len(rows)) if rows else None,
            "error_examples": errors[:5], "requests_per_s": len(rows) / wall,
            "tokens_per_s": sum(r["tokens"] for r in rows) / wall, "p50_s": quantile(ok_lat, 0.5),
            "p99_s": quantile(ok_lat, 0.99), "mean_s_ci": bootstrap_mean(ok_lat, seed=seed), "per_kind": per_kind}


# ---- abuse --------------------------------------------------------------------------------------


def exchange(port: int, parts: list[bytes], gap_s: float = 0.0, read_s: float = 60.0) -> dict[str, Any]:
    """Send `parts` on a fresh connection, `gap_s` apart, stopping early once the server answers;
    then read the answer. Returns status (None if none came), the body, and the seconds it took."""
    t0 = time.monotonic()
    status, body, err = None, b"", None
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as s:
        try:
            for k, part in enumerate(parts):
                if part:
                    s.sendall(part)
                if k < len(parts) - 1 and gap_s and select.select([s], [], [], gap_s)[0]:
                    break  # the server has answered (or closed) before the request was complete
        except OSError as e:  # the server closed the connection while we were still sending
            err = f"{type(e).__name__}"
        data = b""
        deadline = t0 + read_s + gap_s * len(parts)
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
                head, sep, rest = data.partition(b"\r\n\r\n")
                if sep:
                    length = next((int(h.split(b":", 1)[1]) for h in head.split(b"\r\n")[1:]
                                   if h.lower().startswith(b"content-length:")), None)
                    if length is not None and len(rest) >= length:
                        break
    if data.startswith(b"HTTP/"):
        with contextlib.suppress(ValueError, IndexError):
            status = int(data.split(b" ", 2)[1])
        body = data.partition(b"\r\n\r\n")[2]
    return {"status": status, "body": body.decode("utf-8", "replace"), "seconds": time.monotonic() - t0,
            "send_error": err}


def _http(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
          length: int | None = None) -> bytes:
    h = {"Host": "127.0.0.1", "Content-Type": "application/json", **(headers or {})}
    if length is not None or body or method == "POST":
        h.setdefault("Content-Length", str(len(body) if length is None else length))
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + body


@dataclass
class Case:
    name: str
    expect: tuple[int, ...]
    send: Callable[[int], dict[str, Any]]  # port -> exchange result
    slow: bool = False


def abuse_cases(key: str, request_timeout_s: float, slow_gap_s: float, idle: int) -> list[Case]:
    auth = {"Authorization": f"Bearer {key}"}
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": "Hello there."}]

    def post(body: bytes | str | dict[str, Any], path: str = chat, headers: dict[str, str] | None = None,
             **kw: Any) -> Callable[[int], dict[str, Any]]:
        raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        return lambda port: exchange(port, [_http("POST", path, raw, {**auth, **(headers or {})})], **kw)

    def header_then(prefix: bytes, rest: list[bytes], gap: float = 0.0) -> Callable[[int], dict[str, Any]]:
        return lambda port: exchange(port, [prefix, *rest], gap)

    good = json.dumps({"messages": user, "max_tokens": 2}).encode()
    slow_read = request_timeout_s + 10
    cases = [
        Case("oversized body (1 GiB declared)", (413,), header_then(_http("POST", chat, b"", auth, 1 << 30),
                                                                    [b"x" * 65536])),
        Case("oversized body without the key", (401,), header_then(_http("POST", chat, b"", {}, 32 << 20), [])),
        Case("no API key", (401,), lambda port: exchange(port, [_http("POST", chat, good)])),
        Case("wrong API key", (401,), lambda port: exchange(port, [_http("POST", chat, good,
                                                                         {"Authorization": "Bearer nope"})])),
        Case("malformed JSON", (400,), post('{"messages": [')),
        Case("JSON nested 50,000 deep", (400,), post("[" * 50_000 + "]" * 50_000)),
        Case("bytes that are not UTF-8", (400,), post(b'{"messages": "\xff\xfe\xfa"}')),
        Case("body not an object", (400,), post("[1, 2]")),
        Case("messages as a string", (400,), post({"messages": "hi"})),
        Case("max_tokens as a string", (400,), post({"messages": user, "max_tokens": "16"})),
        Case("temperature NaN", (400,), post('{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}')),
        Case("prompt as an object", (400,), post({"prompt": {"text": "hi"}}, "/v1/completions")),
        Case("n as a float", (400,), post({"messages": user, "n": 2.5})),
        Case("huge n (10^6)", (400,), post({"messages": user, "n": 10**6})),
        Case("n with 5,000 digits", (400,), post('{"messages": [{"role": "user", "content": "x"}], "n": '
                                                 + "9" * 5000 + "}")),
        Case("huge max_tokens (10^9)", (400,), post({"messages": user, "max_tokens": 10**9})),
        Case("1024 prompts x n=128", (400,), post({"prompt": ["hi"] * 1024, "n": 128, "max_tokens": 1},
                                                  "/v1/completions")),
        Case("16 MB message", (400,), post({"messages": [{"role": "user", "content": "word " * (16 << 18)}],
                                            "max_tokens": 1})),
        Case("bad Content-Length", (400,), header_then(_http("POST", chat, b"", {**auth, "Content-Length": "abc"}),
                                                       [good])),
        Case("chunked body", (411,), header_then(
            _http("POST", chat, b"", {**auth, "Transfer-Encoding": "chunked"}).replace(b"Content-Length: 0\r\n", b""),
            [b"%x\r\n%s\r\n0\r\n\r\n" % (len(good), good)])),
        Case("unknown method PUT", (405,), lambda port: exchange(port, [_http("PUT", chat, good, auth)])),
        Case("70 kB request line", (414,), lambda port: exchange(port, [_http("GET", "/" + "a" * 70_000)])),
        Case("150 headers", (431,), lambda port: exchange(port, [_http("GET", "/v1/models", b"", {
            **auth, **{f"X-Pad-{i}": "x" for i in range(150)}})])),
        Case("slow client: request a byte at a time", (408,), lambda port: exchange(
            port, [bytes([b]) for b in _http("POST", chat, good, auth)], slow_gap_s, slow_read), slow=True),
        Case("slow client: body a byte at a time", (408,), lambda port: exchange(
            port, [_http("POST", chat, b"", auth, len(good)), *[bytes([b]) for b in good]], slow_gap_s, slow_read),
            slow=True),
    ]
    for i in range(idle):
        cases.append(Case(f"idle connection {i}", (408,), lambda port: exchange(port, [b""], 0, slow_read),
                          slow=True))
    return cases


def judge_case(case: Case, res: dict[str, Any], bound_s: float) -> list[str]:
    """What is wrong with an abuse case's answer (empty when it is right)."""
    bad = []
    if res["status"] not in case.expect:
        bad.append(f"status {res['status']}, expected {'/'.join(map(str, case.expect))}")
    body = res["body"]
    if "Traceback" in body or 'File "' in body:
        bad.append("a stack trace in the answer")
    try:
        msg = json.loads(body)["error"]["message"]
        if not isinstance(msg, str) or not msg:
            bad.append("no error message")
    except (ValueError, KeyError, TypeError):
        bad.append(f"not a JSON error body: {body[:120]!r}")
    if res["seconds"] > bound_s:
        bad.append(f"answered after {res['seconds']:.1f} s, over the bound of {bound_s:g} s")
    return bad


def _good_request(c: httpx.Client, k: int) -> dict[str, Any]:
    """One well-formed chat request: its latency, and why it failed (None if it did not)."""
    t0 = time.monotonic()
    try:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}],
                                                 "max_tokens": 4, "temperature": 0.8, "seed": k})
        err = None if r.status_code == 200 and check_answer("chat", r.json()) is None \
            else f"HTTP {r.status_code}: {r.text[:200]}"
    except (httpx.HTTPError, ValueError) as e:
        err = f"{type(e).__name__}: {e}"
    return {"latency": time.monotonic() - t0, "error": err}


def _prober(root: str, key: str, stop: threading.Event, out: list[dict[str, Any]]) -> None:
    """A well-formed client: one chat request after another until `stop`."""
    with httpx.Client(base_url=root, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        k = 0
        while not stop.is_set():
            out.append(_good_request(c, k))
            k += 1


def run_abuse(server: Served, key: str, request_timeout_s: float, slow_gap_s: float, idle: int,
              bound_s: float) -> dict[str, Any]:
    with httpx.Client(base_url=server.root, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
        idle_lat = [_good_request(c, k) for k in range(3)]  # the same request on an idle server, for comparison
    cases = abuse_cases(key, request_timeout_s, slow_gap_s, idle)
    results: dict[str, dict[str, Any]] = {}

    def one(case: Case) -> None:
        try:
            results[case.name] = case.send(server.port)
        except OSError as e:  # could not even connect
            results[case.name] = {"status": None, "body": "", "seconds": 0.0, "send_error": f"{type(e).__name__}"}

    probes: list[dict[str, Any]] = []
    stop = threading.Event()
    prober = threading.Thread(target=_prober, args=(server.root, key, stop, probes))
    prober.start()
    slow = [threading.Thread(target=one, args=(c,)) for c in cases if c.slow]
    for t in slow:  # slow and idle clients all at once, the rest one after another meanwhile
        t.start()
    for c in cases:
        if not c.slow:
            one(c)
    for t in slow:
        t.join()
    stop.set()
    prober.join()
    rows = []
    for c in cases:
        res = results[c.name]
        problems = judge_case(c, res, request_timeout_s + 5 if c.slow else bound_s)
        msg = ""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            msg = json.loads(res["body"])["error"]["message"]
        rows.append({"case": c.name, "expect": list(c.expect), "status": res["status"], "seconds": res["seconds"],
                     "problems": problems, "message": msg, "body": res["body"][:2000]})
    lat = [p["latency"] for p in probes if p["error"] is None]
    return {"cases": rows, "good_during": {"requests": len(probes), "errors": sum(p["error"] is not None
                                                                                  for p in probes),
                                           "p50_s": quantile(lat, 0.5), "max_s": max(lat, default=float("nan")),
                                           "error_examples": [p["error"] for p in probes if p["error"]][:3]},
            "good_idle_p50_s": quantile([p["latency"] for p in idle_lat if p["error"] is None], 0.5)}


# ---- the whole run --------------------------------------------------------------------------------


def run(model: str = "smollm2-135m", clients: int = 4, seconds: float = 20, max_tokens: int = 16,
        seed: int = 0, pm: str = "auto", request_timeout_s: float = 5.0, slow_gap_s: float = 1.0,
        idle: int = 32, bound_s: float = 30.0, dtype: str = "float32", in_process: bool = False) -> dict[str, Any]:
    """Start the server(s), warm them up, load them, abuse the language-model server; stop them.
    `in_process`: the servers run in this process (memory figures then include the clients)."""
    key = secrets.token_urlsafe(24)
    loadavg = [os.getloadavg()[0]]  # the machine's own load: on shared cores it moves every figure
    servers: dict[str, Served] = {}
    with tempfile.TemporaryDirectory(prefix="cai-serve-load-") as tmp:
        work = Path(tmp)
        try:
            def start(path: str, name: str) -> Served:
                if in_process:
                    return start_in_process(path, key, request_timeout_s, dtype)
                return start_server(path, key, request_timeout_s, work, name, dtype)

            lm = start(model, "lm")
            servers["chat"] = servers["completions"] = lm
            pm_note = "none (--pm none)"
            if pm != "none":
                pm_dir = derive_pm(model, work / "pm", seed) if pm == "auto" else pm
                pm_note = f"{model} weights, seeded random one-output head" if pm == "auto" else pm
                servers["pooling"] = start(pm_dir, "pm")
            uniq = {id(s): s for s in servers.values()}
            pm_srv = servers.get("pooling")
            # each process once (in process, both servers share this one)
            procs = [("lm", lm)] + ([("pm", pm_srv)] if pm_srv is not None and pm_srv.pid != lm.pid else [])
            for kind in servers:  # warm-up: one request of each kind before memory is first read
                path, body = _request(kind, random.Random(seed), max_tokens)
                httpx.post(servers[kind].root + path, json=body, timeout=300, headers={"Authorization": f"Bearer {key}"})
            rss = {name: {"warm_mb": s.rss_mb()} for name, s in procs}
            load = run_load(servers, key, clients, seconds, max_tokens, seed)
            for name, s in procs:
                rss[name]["after_load_mb"] = s.rss_mb()
            abuse = run_abuse(lm, key, request_timeout_s, slow_gap_s, idle, bound_s)
            for name, s in procs:
                rss[name]["after_abuse_mb"] = s.rss_mb()
                rss[name]["peak_mb"] = s.peak_mb()
            healthy = httpx.get(f"{lm.root}/health", timeout=30).status_code == 200
            loadavg.append(os.getloadavg()[0])
            for s in uniq.values():
                s.stop()
            tracebacks = {name: s.tracebacks() for name, s in procs}
        finally:
            for s in servers.values():
                s.stop()
    return {"model": model, "pm": pm_note, "in_process": in_process, "seed": seed, "max_tokens": max_tokens, "dtype": dtype,
            "request_timeout_s": request_timeout_s, "slow_gap_s": slow_gap_s, "idle": idle, "loadavg": loadavg, "load": load,
            "rss": rss, "abuse": abuse, "healthy_after": healthy, "server_tracebacks": tracebacks}


def failures(res: dict[str, Any]) -> list[str]:
    """Every way the run missed its targets (empty: all met)."""
    out = [f"load: {res['load']['errors']} errors, e.g. {res['load']['error_examples'][:2]}"] \
        if res["load"]["errors"] else []
    out += [f"abuse '{r['case']}': {'; '.join(r['problems'])}" for r in res["abuse"]["cases"] if r["problems"]]
    g = res["abuse"]["good_during"]
    if g["errors"] or not g["requests"] or g["requests"] == g["errors"]:
        out.append(f"good requests during the abuse: {g['errors']} of {g['requests']} failed {g['error_examples']}")
    if not res["healthy_after"]:
        out.append("the server was not healthy after the abuse")
    out += [f"{name} server log: {n} tracebacks" for name, n in res["server_tracebacks"].items() if n]
    if res["load"]["requests"] == 0:
        out.append("load: no request finished")
    return out


def render(res: dict[str, Any]) -> str:
    ld = res["load"]
    ci = ld["error_rate_ci"]
    mean_ci = ld["mean_s_ci"]
    where = "in this process (memory includes the clients)" if res["in_process"] else "its own process"
    lines = [f"cai serve {res['model']} ({res['dtype']}), {where}; pooling: {res['pm']}; seed {res['seed']}; "
             f"machine load average {res['loadavg'][0]:.1f} at the start, {res['loadavg'][-1]:.1f} at the end",
             f"load: {ld['clients']} clients for {ld['seconds']:g} s, max_tokens {res['max_tokens']}: "
             f"{ld['requests']} requests, {ld['requests_per_s']:.2f} req/s, {ld['tokens_per_s']:.1f} generated tok/s; "
             f"latency p50 {ld['p50_s']:.3f} s, p99 {ld['p99_s']:.3f} s"
             + (f", mean {mean_ci[0]:.3f}-{mean_ci[1]:.3f} s (95% bootstrap)" if mean_ci else "")
             + f"; errors {ld['errors']}" + (f" (95% Wilson {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")]
    lines.append(f"  {'kind':<12}{'requests':>9}{'errors':>8}{'p50 s':>9}{'p99 s':>9}")
    for k, v in ld["per_kind"].items():
        lines.append(f"  {k:<12}{v['requests']:>9}{v['errors']:>8}{v['p50_s']:>9.3f}{v['p99_s']:>9.3f}")
    for name, r in res["rss"].items():
        lines.append(f"memory ({name if not res['in_process'] else 'this'} process): RSS {r['warm_mb']:.0f} MB warm, {r['after_load_mb']:.0f} MB after load "
                     f"({r['after_load_mb'] - r['warm_mb']:+.0f}), {r['after_abuse_mb']:.0f} MB after abuse "
                     f"({r['after_abuse_mb'] - r['warm_mb']:+.0f}); peak {r['peak_mb']:.0f} MB")
    ab = res["abuse"]
    ok = sum(not r["problems"] for r in ab["cases"])
    lines.append(f"abuse (request timeout {res['request_timeout_s']:g} s, slow clients a byte every "
                 f"{res['slow_gap_s']:g} s, {res['idle']} idle connections): {ok}/{len(ab['cases'])} cases answered "
                 f"as expected")
    idle_rows = [r for r in ab["cases"] if r["case"].startswith("idle connection")]
    for r in [r for r in ab["cases"] if not r["case"].startswith("idle connection")]:
        mark = "ok " if not r["problems"] else "BAD"
        lines.append(f"  {mark} {r['case']:<42}{r['status']!s:>5}{r['seconds']:>7.2f} s  "
                     + ("; ".join(r["problems"]) if r["problems"] else r["message"][:70]))
    if idle_rows:
        st = sorted({str(r["status"]) for r in idle_rows})
        bad = [r for r in idle_rows if r["problems"]]
        lines.append(f"  {'ok ' if not bad else 'BAD'} {len(idle_rows)} idle connections{'':<22}{'/'.join(st):>5}"
                     f"{max(r['seconds'] for r in idle_rows):>7.2f} s  (slowest)"
                     + (f"  {bad[0]['problems']}" if bad else ""))
    g = ab["good_during"]
    lines.append(f"well-formed chat during the abuse: {g['requests'] - g['errors']}/{g['requests']} answered, "
                 f"p50 {g['p50_s']:.3f} s, max {g['max_s']:.3f} s (idle server p50 {ab['good_idle_p50_s']:.3f} s)")
    lines.append(f"healthy after: {res['healthy_after']}; tracebacks in the server logs: "
                 + ", ".join(f"{k} {'not read (in process)' if v is None else v}"
                             for k, v in res["server_tracebacks"].items()))
    for f in failures(res):
        lines.append(f"FAILED: {f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="the model cai serve loads (default smollm2-135m)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--pm", default="auto", help="auto (the model's weights, a random head), none, or a directory")
    ap.add_argument("--request-timeout", type=float, default=5.0, help="cai serve --request-timeout (default 5)")
    ap.add_argument("--slow-gap", type=float, default=1.0, help="seconds between a slow client's bytes (default 1)")
    ap.add_argument("--idle", type=int, default=32, help="idle connections opened during the abuse (default 32)")
    ap.add_argument("--bound", type=float, default=30.0, help="seconds an abuse case may take to be answered "
                                                              "(slow and idle ones: the request timeout + 5)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--in-process", action="store_true", help="run the servers in this process (quick; memory "
                                                                "figures then include the clients)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = ap.parse_args(argv)
    from cai.models import cpu_description

    print(f"CPU: {cpu_description()}; Python {sys.version.split()[0]}; seed {args.seed}", flush=True)
    res = run(args.model, args.clients, args.seconds, args.max_tokens, args.seed, args.pm, args.request_timeout,
              args.slow_gap, args.idle, args.bound, args.dtype, args.in_process)
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if not failures(res) else 1


if __name__ == "__main__":
    sys.exit(main())
