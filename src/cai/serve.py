"""`cai serve`: an OpenAI-compatible HTTP server over the in-process transformers back-end.

Other tools (and `model.backend: openai` in this project) can then use a trained policy or
preference model. It speaks the OpenAI API as vLLM implements it:

- `POST /v1/chat/completions`: messages, n, temperature, top_p, max_tokens (or
  max_completion_tokens), seed, stop. A request (messages, seed, n) gives what
  `HFModel.generate([messages], sampling, n, seeds=[seed])` gives in process.
- `POST /v1/completions`: `prompt` as a string, a list of token ids, or a list of either (choice
  `i * n + j` is sample j of prompt i); max_tokens (default 16; 0 with `echo` or `prompt_logprobs`
  scores the prompt only), temperature, top_p, n, seed, stop, `echo`, `logprobs` (0-20: the
  legacy per-token `tokens`/`token_logprobs`/`top_logprobs`/`text_offset`, prompt tokens included
  with `echo`) and vLLM's `prompt_logprobs` (0-20: per prompt token `{token id: {logprob, rank,
  decoded_token}}`, the actual token always included). Prompt log-probabilities equal
  `HFModel.score_options` for the same tokens. Log-probabilities of generated tokens are those of
  the model itself (before temperature or top-p).
- `POST /pooling` (also `/v1/pooling`), for a preference model saved by stage `pm` (a one-label
  sequence-classification model): vLLM's pooling API. Send `{"messages": [...]}` (one conversation
  ending with the assistant response to score) or `{"input": ...}` (a string, a list of token ids,
  or a list of either, scored as given); each `data[i].data` is `[reward]`, the value
  `RewardModel.score` gives. A preference-model server answers only this route, `/v1/models` and
  `/health`.
- `GET /v1/models`; `GET /health` (never needs the API key).

Errors are OpenAI-style bodies `{"error": {"message", "type", "param", "code"}}`: 400 names the bad
field, 401 a missing or wrong key, 404 an unknown route or model. Streaming, chat log-probabilities,
tools and penalties are refused with a 400 rather than ignored.

Requests are batched: handler threads tokenise and validate, then queue token-level work for one
model thread. Generation requests that share the running batch's prompt prefix join it as slots
free up (so the few-shot block of SL-CAI prompts is computed once), and each is answered as soon
as its own samples finish; scoring requests waiting together go through one batched pass. Sampling is seeded
per request, so concurrency changes speed, not results (beyond floating-point noise of batch shapes).

The server binds to 127.0.0.1 unless told otherwise; `--api-key-env NAME` requires
`Authorization: Bearer <value of $NAME>` (the key is never printed or logged).

    cai serve smollm2-135m --port 8000
    cai serve runs/quickstart/sft/model --api-key-env CAI_SERVE_KEY
    cai serve runs/quickstart/pm/model          # a preference model: POST /pooling
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cai.config import Sampling

MAX_BODY = 64 << 20
MAX_N = 128
MAX_LOGPROBS = 20
# A generation request joins a running batch only if its prompt starts with the batch's shared
# prefix and adds at most this many tokens (or as many as the prefix has): a long prompt with a
# prefix of its own is better served in a batch that shares that prefix.
JOIN_TAIL = 256
ROUTES = ("GET /health", "GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions",
          "POST /pooling", "POST /v1/pooling")


class APIError(Exception):
    """An error answered as an OpenAI-style body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


# ---- the model thread -------------------------------------------------------------------------


@dataclass
class _Arrival:
    settled: bool = False


@dataclass
class _Work:
    kind: str  # "generate" | "score" | "reward"
    payload: Any  # list[TokenRequest] | (rows, top) | rows
    future: Future = field(default_factory=Future)
    pending: int = 0  # generation: requests not finished yet


def _lcp_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _short_tails(a: int, b: int, shared: int) -> bool:
    """Whether two prompts of lengths a and b sharing `shared` leading tokens batch well together."""
    room = max(shared, JOIN_TAIL)
    return a - shared <= room and b - shared <= room


class Engine:
    """The one thread that runs the model. Handler threads `submit` token-level work and wait on
    the returned future. Generation work is decoded with continuous batching (`HFModel.run_requests`):
    waiting requests that share the running batch's prefix join it, and each is answered when its
    own samples finish. Scoring and reward work waiting together goes through one batched call.
    Work is taken in arrival order; while anything waits that cannot join the running batch, the
    batch takes no newcomers, so it drains and nothing waits for long."""

    def __init__(self, lm: Any = None, reward: Any = None, batch_size: int = 8, max_linger_s: float = 0.05):
        self.lm, self.reward = lm, reward
        self.batch_size = batch_size  # rows per batch for preference-model scoring (the LM has its own)
        self.max_linger_s = max_linger_s
        self._arriving = 0  # requests being read and tokenised that will submit work
        self.runs: deque[dict[str, Any]] = deque(maxlen=10_000)  # per model call: kind, requests, rows
        self._waiting: deque[_Work] = deque()
        self._cv = threading.Condition()
        self._held = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="cai-serve-model", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop taking work; what still waits is answered with 503. The running batch finishes."""
        with self._cv:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        for w in left:
            w.future.set_exception(APIError(503, "the server is shutting down"))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Queue work without running it until the block ends (lets a caller line requests up)."""
        with self._cv:
            self._held = True
        try:
            yield
        finally:
            with self._cv:
                self._held = False
                self._cv.notify_all()

    def waiting(self) -> int:
        with self._cv:
            return len(self._waiting)

    def announce(self) -> _Arrival:
        """Say that a request is being prepared: the model thread waits briefly for its work
        (up to `max_linger_s`), so requests sent together are batched together."""
        with self._cv:
            self._arriving += 1
        return _Arrival()

    def settle(self, arrival: _Arrival) -> None:
        """The announced request will submit nothing more (it failed, or it has submitted)."""
        with self._cv:
            if not arrival.settled:
                arrival.settled = True
                self._arriving -= 1
                self._cv.notify_all()

    def submit(self, kind: str, payload: Any, arrival: _Arrival | None = None) -> Future:
        w = _Work(kind, payload)
        if kind == "generate":
            w.pending = len(payload)
        with self._cv:
            if self._closed:
                raise APIError(503, "the server is shutting down")
            self._waiting.append(w)
            if arrival is not None and not arrival.settled:
                arrival.settled = True
                self._arriving -= 1
            self._cv.notify_all()
        return w.future

    # -- the loop --

    def _take_first(self) -> _Work | None:
        with self._cv:
            while not self._closed and (self._held or not self._waiting):
                self._cv.wait()
            if self._closed:
                return None
            # Requests that are being prepared now were most likely sent together with this one:
            # wait a little for them, so they share a batch (a lone request does not wait).
            deadline = time.monotonic() + self.max_linger_s
            while self._arriving and not self._held and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            while self._held and not self._closed:
                self._cv.wait()
            return self._waiting[0] if self._waiting and not self._closed else None

    def _loop(self) -> None:
        while True:
            first = self._take_first()
            if first is None:
                return
            try:
                if first.kind == "generate":
                    self._generate(first)
                else:
                    self._batch(first.kind)
            except Exception:  # noqa: BLE001 - a model failure answers its requests, never kills the thread
                traceback.print_exc(file=sys.stderr)

    def _pop(self, pick: Callable[[_Work], bool]) -> list[_Work]:
        with self._cv:
            got = [w for w in self._waiting if pick(w)]
            for w in got:
                self._waiting.remove(w)
            return got

    def _batch(self, kind: str) -> None:
        works = self._pop(lambda w: w.kind == kind)
        if not works:  # closed meanwhile
            return
        try:
            if kind == "score":
                rows = [r for w in works for r in w.payload[0]]
                top = max(w.payload[1] for w in works)
                out = self.lm.prompt_logprobs_detail(rows, top)
            else:
                rows = [r for w in works for r in w.payload]
                out = self.reward.score_ids(rows, self.batch_size)
        except Exception as e:  # noqa: BLE001
            for w in works:
                w.future.set_exception(e)
            raise
        self.runs.append({"kind": kind, "requests": len(works), "rows": len(rows)})
        k = 0
        for w in works:
            n = len(w.payload[0] if kind == "score" else w.payload)
            w.future.set_result(out[k : k + n])
            k += n

    def _generate(self, first: _Work) -> None:
        p0 = first.payload[0].prompt

        def fits_first(w: _Work) -> bool:
            if w.kind != "generate":
                return False
            if w is first:
                return True
            p = w.payload[0].prompt
            return _short_tails(len(p0), len(p), _lcp_len(p0, p))

        works = self._pop(fits_first)
        owner = {id(r): w for w in works for r in w.payload}
        stat = {"kind": "generate", "requests": len(works), "rows": sum(r.n for w in works for r in w.payload)}

        def admit(prefix: Sequence[int]) -> list[Any]:
            n = len(prefix)
            prefix = list(prefix)

            def joins(w: _Work) -> bool:
                return w.kind == "generate" and all(
                    len(r.prompt) > n and r.prompt[:n] == prefix and len(r.prompt) - n <= max(n, JOIN_TAIL)
                    for r in w.payload)

            with self._cv:
                if self._closed or self._held:
                    return []
                got = []
                rows = 0
                for w in self._waiting:
                    # In arrival order; the first that cannot join ends admission, so it is not overtaken.
                    if not joins(w) or rows >= self.lm.batch_size:
                        break
                    got.append(w)
                    rows += sum(r.n for r in w.payload)
                for w in got:
                    self._waiting.remove(w)
            for w in got:
                for r in w.payload:
                    owner[id(r)] = w
            stat["requests"] += len(got)
            stat["rows"] += sum(r.n for w in got for r in w.payload)
            return [r for w in got for r in w.payload]

        def done(r: Any) -> None:
            w = owner.pop(id(r))
            w.pending -= 1
            if w.pending == 0:
                w.future.set_result([q.results for q in w.payload])

        try:
            self.lm.run_requests([r for w in works for r in w.payload], admit, done)
        except Exception as e:  # noqa: BLE001
            for w in {id(w): w for w in owner.values()}.values():
                if not w.future.done():
                    w.future.set_exception(e)
            raise
        finally:
            self.runs.append(stat)


# ---- request parsing --------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, integer: bool = False,
            lo_open: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(name, f"must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}")
    if not (lo < v if lo_open else lo <= v) or v > hi or (isinstance(v, float) and math.isnan(v)):
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return v


def _stop(body: dict[str, Any]) -> list[str]:
    s = body.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) and x for x in s):
        raise bad("stop", "must be a non-empty string or a list of non-empty strings")
    return list(s)


def _refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    if body.get("stream"):
        raise bad("stream", "streaming is not supported by cai serve; send stream: false")
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0) and not (name == "repetition_penalty" and v == 1):
            raise bad(name, "penalties are not supported by cai serve")
    if body.get("logit_bias"):
        raise bad("logit_bias", "not supported by cai serve")
    if chat:
        if body.get("logprobs") or body.get("top_logprobs"):
            raise bad("logprobs", "chat log-probabilities are not supported; use /v1/completions with echo and "
                      "logprobs, or prompt_logprobs")
        if body.get("tools") or body.get("functions"):
            raise bad("tools", "tool calling is not supported by cai serve")
    else:
        if body.get("suffix"):
            raise bad("suffix", "not supported by cai serve")
        if body.get("best_of") not in (None, 1, body.get("n", 1)):
            raise bad("best_of", "must equal n (no best-of selection in cai serve)")


def _sampling(body: dict[str, Any], max_tokens: int) -> tuple[Sampling, int, int]:
    """(sampling settings, n, seed) of a request."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(62)  # no seed: a fresh draw, as OpenAI servers do
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise bad("seed", f"must be an integer, got {json.dumps(seed)}")
    return Sampling(temperature=float(temperature), top_p=float(top_p), max_new_tokens=max_tokens,
                    stop=_stop(body)), n, seed


def _messages(body: dict[str, Any], name: str = "messages") -> list[dict[str, str]]:
    msgs = body.get(name)
    if not isinstance(msgs, list) or not msgs:
        raise bad(name, "must be a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise bad(f"{where}.role", f"must be system, user or assistant, got {json.dumps(role)}")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{where}.content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", "must be a string")
        out.append({"role": role, "content": content})
    return out


def _token_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompts(body: dict[str, Any], name: str) -> list[str | list[int]]:
    """A prompt field as a list of prompts, each a string or a list of token ids."""
    p = body.get(name)
    if isinstance(p, str) or _token_list(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) or _token_list(x) for x in p):
        return list(p)
    raise bad(name, "must be a string, a non-empty list of token ids, or a non-empty list of either")


def _finite(x: float | None) -> float | None:
    # JSON has no infinities; a log-probability that underflowed is reported as vLLM does.
    return None if x is None else (x if math.isfinite(x) else -9999.0)


# ---- the application ------------------------------------------------------------------------------


class App:
    """Routes and request handling, independent of the HTTP plumbing: `handle` maps a method, path,
    headers and body to a status and a JSON body."""

    def __init__(self, engine: Engine, name: str, api_key: str | None = None, max_length: int = 4096):
        self.engine = engine
        self.name = name
        self._api_key = api_key
        self.max_length = max_length
        self._tok_lock = threading.Lock()
        self._local = threading.local()  # the handler thread's announced request
        backend = engine.lm if engine.lm is not None else engine.reward
        self.tokenizer = backend.tokenizer
        self.vocab = backend.model.get_input_embeddings().num_embeddings

    def handle(self, method: str, path: str, headers: Any, raw: bytes) -> tuple[int, dict[str, Any]]:
        self._local.arrival = self.engine.announce() if method == "POST" else None
        try:
            return 200, self._route(method, path.split("?", 1)[0].rstrip("/") or "/", headers, raw)
        except APIError as e:
            return e.status, e.body()
        except Exception as e:  # noqa: BLE001 - answered as a 500, the server keeps running
            traceback.print_exc(file=sys.stderr)
            return 500, {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                                   "param": None, "code": 500}}
        finally:
            if self._local.arrival is not None:
                self.engine.settle(self._local.arrival)

    def _route(self, method: str, path: str, headers: Any, raw: bytes) -> dict[str, Any]:
        routes: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "POST /v1/chat/completions": self.chat, "POST /v1/completions": self.completions,
            "POST /pooling": self.pooling, "POST /v1/pooling": self.pooling}
        key = f"{method} {path}"
        if key == "GET /health":
            return {"status": "ok"}
        if key not in routes and key != "GET /v1/models":
            if any(r.split(" ", 1)[1] == path for r in ROUTES):
                raise APIError(405, f"{method} is not allowed on {path}")
            raise APIError(404, f"no route {method} {path}; routes: {', '.join(ROUTES)}")
        self._authorize(headers)
        if key == "GET /v1/models":
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "cai"}]}
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.name:
            raise APIError(404, f"model {json.dumps(model)} is not served here; this server serves "
                                f"{json.dumps(self.name)}", "model")
        return routes[key](body)

    def _authorize(self, headers: Any) -> None:
        if self._api_key is None:
            return
        auth = headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._api_key.encode()):
            raise APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'")

    def _need(self, what: str) -> None:
        if what == "lm" and self.engine.lm is None:
            raise APIError(400, f"{self.name} is a preference model (a scalar head, no language-model head): "
                                "it answers POST /pooling only")
        if what == "reward" and self.engine.reward is None:
            raise APIError(400, f"{self.name} is a language model, not a preference model: /pooling needs a model "
                                "saved by stage pm")

    def _wait(self, kind: str, payload: Any) -> Any:
        return self.engine.submit(kind, payload, self._local.arrival).result()

    def _max_tokens(self, body: dict[str, Any], default: int | None, lo: int) -> int | None:
        name = "max_completion_tokens" if body.get("max_tokens") is None and "max_completion_tokens" in body \
            else "max_tokens"
        return _number(body, name, default, lo, 1 << 20, integer=True)

    def _check_length(self, ids: Sequence[int], max_tokens: int, param: str) -> None:
        if len(ids) + max_tokens > self.max_length:
            raise bad(param, f"{len(ids)} prompt tokens plus max_tokens={max_tokens} exceed the model's "
                             f"maximum length {self.max_length}")

    # -- chat --

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self._need("lm")
        _refuse_unsupported(body, chat=True)
        msgs = _messages(body)
        with self._tok_lock:
            ids = self.engine.lm.encode(msgs)
        max_tokens = self._max_tokens(body, None, 1)
        if max_tokens is None:  # as vLLM: whatever room the context leaves
            max_tokens = self.max_length - len(ids)
            if max_tokens < 1:
                raise bad("messages", f"{len(ids)} prompt tokens leave no room below the model's maximum "
                                      f"length {self.max_length}")
        self._check_length(ids, max_tokens, "messages")
        sampling, n, seed = _sampling(body, max_tokens)
        from cai.lm.hf import TokenRequest

        (results,) = self._wait("generate", [TokenRequest(ids, sampling, n, seed)])
        choices = []
        for j, tc in enumerate(results):
            c = self.engine.lm.completion(tc, sampling)
            choices.append({"index": j, "message": {"role": "assistant", "content": c.text},
                            "logprobs": None, "finish_reason": c.finish_reason})
        gen = sum(len(tc.tokens) for tc in results)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": gen, "total_tokens": len(ids) + gen}}

    # -- completions --

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        self._need("lm")
        _refuse_unsupported(body, chat=False)
        prompts = _prompts(body, "prompt")
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise bad("echo", "must be true or false")
        logprobs = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        prompt_lp = _number(body, "prompt_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        max_tokens = self._max_tokens(body, 16, 0)
        if max_tokens == 0 and not (echo or prompt_lp is not None):
            raise bad("max_tokens", "must be at least 1 unless echo or prompt_logprobs is set")
        sampling, n, seed = _sampling(body, max_tokens)
        lm = self.engine.lm
        ids: list[list[int]] = []
        with self._tok_lock:
            for i, p in enumerate(prompts):
                param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                if isinstance(p, str):
                    toks = lm.tokenizer(p)["input_ids"]
                    if not toks:
                        raise bad(param, "tokenises to no tokens")
                else:
                    toks = list(p)
                    badtok = next((t for t in toks if not 0 <= t < self.vocab), None)
                    if badtok is not None:
                        raise bad(param, f"token id {badtok} is out of range [0, {self.vocab})")
                self._check_length(toks, max_tokens, param)
                ids.append(toks)

        top = max(logprobs or 0, prompt_lp or 0)
        # per prompt: n (generated tokens, finish reason); and the scores of prompt + generated tokens
        gens: list[list[tuple[list[int], str]]]
        scores: list[list[Any]] | None = None  # [prompt][sample] -> PromptLogprobs
        want_scores = logprobs is not None or prompt_lp is not None
        if max_tokens == 0:
            gens = [[([], "length")] * n for _ in ids]
        elif want_scores and max_tokens == 1 and sampling.temperature == 0:
            # Greedy, one token: the scoring pass already has the next-token distribution.
            pl = self._wait("score", (ids, top))
            gens, scores = [], []
            for p in pl:
                tok = p.next_token
                if tok in lm.eos_ids:
                    g: tuple[list[int], str] = ([], "stop")
                else:
                    hit = any(s in lm.decode_text([tok]) for s in sampling.stop)
                    g = ([tok], "stop" if hit else "length")
                gens.append([g] * n)
                scores.append([p] * n)
        else:
            from cai.lm.hf import TokenRequest

            results = self._wait("generate", [TokenRequest(t, sampling, n, seed) for t in ids])
            gens = [[(tc.tokens, tc.finish_reason) for tc in row] for row in results]
        if want_scores and scores is None:
            rows = [p + g for p, row in zip(ids, gens) for g, _ in row] if logprobs is not None else ids
            pl = self._wait("score", (rows, top))
            scores = [pl[i * n:(i + 1) * n] for i in range(len(ids))] if logprobs is not None \
                else [[p] * n for p in pl]

        choices = []
        for i, (p, raw) in enumerate(zip(ids, prompts)):
            prompt_text = raw if isinstance(raw, str) else self._decode(p)
            for j, (toks, finish) in enumerate(gens[i]):
                text = lm.decode_text(toks, sampling.stop)
                choice: dict[str, Any] = {"index": i * n + j, "text": (prompt_text if echo else "") + text,
                                          "logprobs": None, "finish_reason": finish}
                if logprobs is not None:
                    choice["logprobs"] = self._legacy_logprobs(p, toks, scores[i][j], logprobs, echo,  # type: ignore[index]
                                                               prompt_text)
                if prompt_lp is not None:
                    choice["prompt_logprobs"] = self._vllm_prompt_logprobs(p, scores[i][j], prompt_lp)  # type: ignore[index]
                choices.append(choice)
        n_prompt = sum(len(p) for p in ids)
        n_gen = sum(len(t) for row in gens for t, _ in row)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}}

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _legacy_logprobs(self, prompt: list[int], gen: list[int], sc: Any, k: int, echo: bool,
                         prompt_text: str) -> dict[str, Any]:
        """OpenAI's legacy completions log-probabilities for the echoed prompt (if any) and the
        generated tokens. `sc` scores prompt + generated tokens (or, in the greedy one-token case,
        the prompt with the next-token distribution)."""
        toks = (prompt if echo else []) + gen
        start = 0 if echo else len(prompt)
        lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        full = len(sc.logprobs) == len(prompt) + len(gen)
        for pos in range(start, len(prompt) + len(gen)):
            tok = (prompt + gen)[pos]
            if full or pos < len(prompt):
                lp, alts = sc.logprobs[pos], sc.top[pos]
            else:  # the one greedy token, read off the prompt's next-token distribution
                lp, alts = sc.next_logprob, sc.next_top
            lps.append(_finite(lp))
            if lp is None:
                tops.append(None)
            else:
                d = {self._decode([t]): _finite(v) for t, v in alts[:k]}
                d.setdefault(self._decode([tok]), _finite(lp))
                tops.append(d)
        texts = [self._decode([t]) for t in toks]
        offsets, at = [], 0 if echo else len(prompt_text)
        for t in texts:
            offsets.append(at)
            at += len(t)
        return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _vllm_prompt_logprobs(self, prompt: list[int], sc: Any, k: int) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = [None]
        for pos in range(1, len(prompt)):
            tok = prompt[pos]
            entry = {str(t): {"logprob": _finite(v), "rank": r + 1, "decoded_token": self._decode([t])}
                     for r, (t, v) in enumerate(sc.top[pos][:k])}
            entry[str(tok)] = {"logprob": _finite(sc.logprobs[pos]), "rank": sc.ranks[pos],
                               "decoded_token": self._decode([tok])}
            out.append(entry)
        return out

    # -- pooling (preference models) --

    def pooling(self, body: dict[str, Any]) -> dict[str, Any]:
        self._need("reward")
        if body.get("messages") is not None:
            if body.get("input") is not None:
                raise bad("input", "send either messages or input, not both")
            msgs = _messages(body)
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
                raise bad("messages", "must end with a user message and then the assistant response to score")
            from cai.batches import encode_pair

            with self._tok_lock:
                rows = [encode_pair(self.tokenizer, msgs[:-1], msgs[-1]["content"], self.max_length)[0]]
        else:
            prompts = _prompts(body, "input")
            rows = []
            with self._tok_lock:
                for i, p in enumerate(prompts):
                    toks = self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
                    param = "input" if len(prompts) == 1 else f"input[{i}]"
                    if not toks:
                        raise bad(param, "tokenises to no tokens")
                    badtok = next((t for t in toks if not 0 <= t < self.vocab), None)
                    if badtok is not None:
                        raise bad(param, f"token id {badtok} is out of range [0, {self.vocab})")
                    if len(toks) > self.max_length:
                        raise bad(param, f"{len(toks)} tokens exceed the model's maximum length {self.max_length}")
                    rows.append(toks)
        scores = self._wait("reward", rows)
        n = sum(len(r) for r in rows)
        return {"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": self.name,
                "data": [{"index": i, "object": "pooling", "data": [float(s)]} for i, s in enumerate(scores)],
                "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}}


# ---- HTTP ---------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "cai-serve"
    # Small replies must not wait for the client's delayed ACK (Nagle): that costs ~40 ms a request.
    disable_nagle_algorithm = True

    def _serve(self, method: str) -> None:
        app: App = self.server.app  # type: ignore[attr-defined]
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the body is left unread, so the connection cannot be reused
            err = APIError(413, f"request body too large (at most {MAX_BODY} bytes)") if length > MAX_BODY \
                else APIError(400, "bad Content-Length header")
            self._send(err.status, err.body())
            return
        status, body = app.handle(method, self.path, self.headers, self.rfile.read(length) if length else b"")
        self._send(status, body)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet: one line per request would swamp the console under load


class _HTTPServer(ThreadingHTTPServer):
    # Handler threads are joined on close: a thread still running when the interpreter exits can
    # drop the last reference to the model there and abort the process while freeing it.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End every open connection, so handler threads waiting on idle keep-alive clients finish."""
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """An OpenAI-compatible server over a loaded back-end (an `HFModel`, or a `RewardModel` with
    `reward=`). `start()` serves from a background thread; `serve_forever()` from this one."""

    def __init__(self, lm: Any = None, name: str = "model", host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, reward: Any = None, max_length: int | None = None,
                 batch_size: int = 8):
        if (lm is None) == (reward is None):
            raise ValueError("Server: give a language model or a preference model (reward=)")
        self.engine = Engine(lm, reward, batch_size)
        self.app = App(self.engine, name, api_key, max_length or getattr(lm, "max_length", None) or 4096)
        cls = _HTTPServer6 if ":" in host else _HTTPServer
        self.httpd = cls((host, port), _Handler)
        self.httpd.app = self.app  # type: ignore[attr-defined]
        self.host = host
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL clients use (`model.openai.base_url`), ending in /v1."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> Server:
        self.engine.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cai-serve-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.engine.start()
        self.httpd.serve_forever()

    def close(self) -> None:
        """Stop accepting, answer or refuse what is queued, end open connections, join every thread."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.engine.close()
        self.httpd.close_connections()
        self.httpd.server_close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_preference_model(path: str) -> bool:
    """Whether `path` is a saved one-label sequence-classification model (stage `pm`'s output)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    conf = json.loads(cfg.read_text())
    archs = conf.get("architectures") or []
    labels = conf.get("num_labels", len(conf.get("id2label") or {}) or None)
    return any(a.endswith("ForSequenceClassification") for a in archs) and labels == 1


def load(model: str, dtype: str = "auto", device: str = "auto", batch_size: int = 32,
         max_length: int = 4096) -> tuple[Any, Any]:
    """(language model, preference model), one of them None: `model` loaded the way it was saved."""
    from cai.models import resolve

    path = resolve(model)
    if is_preference_model(path):
        from cai.reward import RewardModel

        return None, RewardModel.from_dir(path, device, dtype)
    from cai.config import ModelConfig
    from cai.lm.hf import HFModel

    return HFModel.from_config(ModelConfig(name=model, dtype=dtype, device=device, batch_size=batch_size,  # type: ignore[arg-type]
                                           max_length=max_length)), None


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto", device: str = "auto",
          batch_size: int = 32, api_key_env: str | None = None, max_length: int = 4096,
          ready: Callable[[Server], None] | None = None) -> None:
    """Load `model` and serve it until interrupted (Ctrl-C); `ready(server)` runs once it listens."""
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {api_key_env} is not set or empty")
    if batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if not is_loopback(host):
        print(f"warning: serving on {host}, not a loopback address: anyone who can reach this port can use the "
              "model" + ("" if api_key else "; set --api-key-env to require a key"), file=sys.stderr, flush=True)
    lm, reward = load(model, dtype, device, batch_size, max_length)
    server = Server(lm, model, host, port, api_key, reward=reward, max_length=max_length, batch_size=batch_size)
    if ready is not None:
        ready(server)
    previous = None
    if threading.current_thread() is threading.main_thread():  # `kill` (SIGTERM) stops it as Ctrl-C does
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        server.close()
