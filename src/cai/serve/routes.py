"""The routes of `cai serve`: the OpenAI API as vLLM implements it, over the scheduler.

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

Errors are OpenAI-style bodies (`cai.serve.errors`). With an API key set, every route but
`/health` needs `Authorization: Bearer <key>`. `App` knows nothing of HTTP: the transport
(`cai.serve.transport`) hands it a method, path, headers and body. Run by `cai serve MODEL`;
tested by `pytest tests/test_serve.py`.
"""

from __future__ import annotations

import hmac
import json
import math
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from cai.serve.errors import APIError, bad
from cai.serve.parsing import (
    MAX_CHOICES,
    MAX_LOGPROBS,
    read_max_tokens,
    read_messages,
    read_number,
    read_prompts,
    read_sampling,
    refuse_unsupported,
)
from cai.serve.scheduler import Scheduler
from cai.templating import encode_prompt

ROUTES = ("GET /health", "GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions",
          "POST /pooling", "POST /v1/pooling")


_KEYS = frozenset(ROUTES)


def _clean(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/") or "/"


def _finite(x: float | None) -> float | None:
    # JSON has no infinities; a log-probability that underflowed is reported as vLLM does.
    return None if x is None else (x if math.isfinite(x) else -9999.0)


class App:
    """Routes and request handling, independent of the HTTP plumbing: `handle` maps a method, path,
    headers and body to a status and a JSON body."""

    def __init__(self, scheduler: Scheduler, name: str, api_key: str | None = None, max_length: int = 4096):
        self.scheduler = scheduler
        self.name = name
        self._api_key = api_key
        self.max_length = max_length
        self._tok_lock = threading.Lock()
        self._local = threading.local()  # the handler thread's announced request
        backend = scheduler.engine if scheduler.engine is not None else scheduler.reward
        self.tokenizer = backend.tokenizer
        self.vocab = backend.model.get_input_embeddings().num_embeddings
        # No token covers more characters than the longest vocabulary entry, so a text longer than
        # this cannot fit in max_length tokens: it is refused before the tokenizer spends time on it.
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.max_chars = 2 * max_length * max(longest, 1)

    def handle(self, method: str, path: str, headers: Any, raw: bytes) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) for one request; every failure is answered, none is raised."""
        self._local.arrival = self.scheduler.announce() if method == "POST" else None
        try:
            return 200, self._route(method, _clean(path), headers, raw)
        except APIError as e:
            return e.status, e.body()
        except Exception as e:  # noqa: BLE001 - answered as a 500, the server keeps running
            traceback.print_exc(file=sys.stderr)
            return 500, {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                                   "param": None, "code": 500}}
        finally:
            if self._local.arrival is not None:
                self.scheduler.settle(self._local.arrival)

    def preflight(self, method: str, path: str, headers: Any) -> None:
        """What can be refused before the body is read: an unknown route, a wrong method, a missing
        or wrong key (so an unauthorised client cannot make the server read a large body)."""
        key = f"{method} {_clean(path)}"
        if key != "GET /health" and key in _KEYS:
            self._authorize(headers)
        elif key != "GET /health":
            self._check_route(method, _clean(path))

    def _check_route(self, method: str, path: str) -> None:
        if f"{method} {path}" not in _KEYS:
            if any(r.split(" ", 1)[1] == path for r in ROUTES):
                raise APIError(405, f"{method} is not allowed on {path}")
            raise APIError(404, f"no route {method} {path}; routes: {', '.join(ROUTES)}")

    def _route(self, method: str, path: str, headers: Any, raw: bytes) -> dict[str, Any]:
        routes: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "POST /v1/chat/completions": self.chat, "POST /v1/completions": self.completions,
            "POST /pooling": self.pooling, "POST /v1/pooling": self.pooling}
        key = f"{method} {path}"
        if key == "GET /health":
            return {"status": "ok"}
        self._check_route(method, path)
        self._authorize(headers)
        if key == "GET /v1/models":
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "cai"}]}
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "request body is not valid JSON: nested too deeply") from None
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
        if what == "lm" and self.scheduler.engine is None:
            raise APIError(400, f"{self.name} is a preference model (a scalar head, no language-model head): "
                                "it answers POST /pooling only")
        if what == "reward" and self.scheduler.reward is None:
            raise APIError(400, f"{self.name} is a language model, not a preference model: /pooling needs a model "
                                "saved by stage pm")

    def _wait(self, kind: str, payload: Any) -> Any:
        return self.scheduler.submit(kind, payload, self._local.arrival).result()

    def _check_chars(self, n: int, param: str) -> None:
        if n > self.max_chars:
            raise bad(param, f"{n} characters cannot fit in the model's maximum length {self.max_length} tokens")

    def _check_length(self, ids: Sequence[int], max_tokens: int, param: str) -> None:
        if len(ids) + max_tokens > self.max_length:
            raise bad(param, f"{len(ids)} prompt tokens plus max_tokens={max_tokens} exceed the model's "
                             f"maximum length {self.max_length}")

    # -- chat --

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /v1/chat/completions`."""
        self._need("lm")
        refuse_unsupported(body, chat=True)
        msgs = read_messages(body)
        self._check_chars(sum(len(m["content"]) for m in msgs), "messages")
        with self._tok_lock:
            ids = encode_prompt(self.tokenizer, msgs)  # as HFModel.encode templates it
        max_tokens = read_max_tokens(body, None, 1)
        if max_tokens is None:  # as vLLM: whatever room the context leaves
            max_tokens = self.max_length - len(ids)
            if max_tokens < 1:
                raise bad("messages", f"{len(ids)} prompt tokens leave no room below the model's maximum "
                                      f"length {self.max_length}")
        self._check_length(ids, max_tokens, "messages")
        sampling, n, seed = read_sampling(body, max_tokens)
        from cai.lm.hf_engine import TokenRequest

        (results,) = self._wait("generate", [TokenRequest(ids, sampling, n, seed)])
        choices = []
        for j, tc in enumerate(results):
            c = self.scheduler.engine.completion(tc, sampling)
            choices.append({"index": j, "message": {"role": "assistant", "content": c.text},
                            "logprobs": None, "finish_reason": c.finish_reason})
        gen = sum(len(tc.tokens) for tc in results)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": gen, "total_tokens": len(ids) + gen}}

    # -- completions --

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /v1/completions`: generation, echo and prompt log-probabilities."""
        self._need("lm")
        refuse_unsupported(body, chat=False)
        prompts = read_prompts(body, "prompt")
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise bad("echo", "must be true or false")
        logprobs = read_number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        prompt_lp = read_number(body, "prompt_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        max_tokens = read_max_tokens(body, 16, 0)
        if max_tokens == 0 and not (echo or prompt_lp is not None):
            raise bad("max_tokens", "must be at least 1 unless echo or prompt_logprobs is set")
        sampling, n, seed = read_sampling(body, max_tokens)
        if len(prompts) * n > MAX_CHOICES:
            raise bad("n", f"{len(prompts)} prompts times n={n} exceed {MAX_CHOICES} choices a request")
        engine = self.scheduler.engine
        ids: list[list[int]] = []
        with self._tok_lock:
            for i, p in enumerate(prompts):
                param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
                if isinstance(p, str):
                    self._check_chars(len(p), param)
                    toks = engine.tokenizer(p)["input_ids"]
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
                if tok in engine.eos_ids:
                    g: tuple[list[int], str] = ([], "stop")
                else:
                    hit = any(s in engine.decode_text([tok]) for s in sampling.stop)
                    g = ([tok], "stop" if hit else "length")
                gens.append([g] * n)
                scores.append([p] * n)
        else:
            from cai.lm.hf_engine import TokenRequest

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
                text = engine.decode_text(toks, sampling.stop)
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
        """`POST /pooling`: a preference model's reward for each input."""
        self._need("reward")
        if body.get("messages") is not None:
            if body.get("input") is not None:
                raise bad("input", "send either messages or input, not both")
            msgs = read_messages(body)
            self._check_chars(sum(len(m["content"]) for m in msgs), "messages")
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
                raise bad("messages", "must end with a user message and then the assistant response to score")
            from cai.batches import encode_pair

            with self._tok_lock:
                rows = [encode_pair(self.tokenizer, msgs[:-1], msgs[-1]["content"], self.max_length)[0]]
        else:
            prompts = read_prompts(body, "input")
            rows = []
            with self._tok_lock:
                for i, p in enumerate(prompts):
                    param = "input" if len(prompts) == 1 else f"input[{i}]"
                    if isinstance(p, str):
                        self._check_chars(len(p), param)
                    toks = self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
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
