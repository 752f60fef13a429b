"""The OpenAI-compatible HTTP back-end: any stage against vLLM, TGI, llama.cpp, Ollama or `cai serve`.

`generate` sends one chat-completions request per conversation (with `n`, `seed`, `temperature`,
`top_p`, `max_tokens`, `stop`); a raw-text prompt (a string, no chat template) goes to `/completions`
as token ids instead. `score_options` templates each context here, exactly as the
transformers back-end does (`cai.templating.encode_prompt`, continuing a final assistant message),
and asks `/completions` for the log-probabilities of token-id prompts, either through `echo` +
`logprobs` or vLLM's `prompt_logprobs` extension (`model.openai.scoring`). `run_programs` runs
multi-step record programs (SL-CAI's answer -> critique -> revision chain) interleaved: a program's
next request goes out as soon as its previous one is back. Every request carries its own seed, so
records do not depend on timing or on which requests were in flight together.

Requests run on a thread pool, at most `max_concurrency` at a time. 408, 409, 429, 5xx and
connection failures are retried with jittered exponential backoff that honours `Retry-After`;
other errors fail at once. `request_budget` caps the HTTP requests sent (retries included): the
request that would exceed it raises `BudgetExhausted` before it is sent, nothing new starts, and
the stage, which writes each finished chunk, resumes where it stopped when run again. The API key
is read from the environment variable named by `api_key_env` and kept out of every repr, log line
and error message.

    cai run configs/quickstart.yaml model.backend=openai model.openai.base_url=http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import httpx

from cai.config import ModelConfig, Sampling
from cai.lm.base import BackendError, BudgetExhausted, Completion, Message, OnCall, Program, Request

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx
# Statuses on the scoring route that mean "this server cannot do this", not "this request was bad".
_NO_CAPABILITY = frozenset({400, 404, 422, 501})
# A 5xx whose message is a request validation error (llama-cpp-python's server answers a request body it
# cannot parse, such as token-id prompts, with HTTP 500 and pydantic's "N validation errors: ..."): the
# same request would fail again, so it is not retried, and on the scoring route it is read as a 422.
_VALIDATION_ERROR = re.compile(r"^\d+ validation errors?\b")
_MESSAGE_CHARS = 1000  # of a server's error message quoted in ours (some quote the whole request back)
_OTHER_MODE = {"echo": "prompt_logprobs", "prompt_logprobs": "echo"}
_CAPABILITY = {"echo": "prompt log-probabilities through `echo` + `logprobs` on token-id prompts",
               "prompt_logprobs": "the `prompt_logprobs` extension on token-id prompts"}


class RequestFailed(BackendError):
    """An HTTP request that failed for good; `status` is None for a connection failure."""

    def __init__(self, message: str, status: int | None = None, server_message: str = ""):
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class _Cancelled(Exception):
    """A queued or backing-off request abandoned because another request of the call failed."""


@dataclass(frozen=True)
class _Job:
    key: Any  # what the result belongs to (a conversation, a program step, a scoring batch)
    run: Callable[[threading.Event], Any]


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _describe(batch: Sequence[tuple[int, int, Any, Any]]) -> str:
    """Which (context, option) prompts a scoring request carries, short enough for a message."""
    by_context: dict[int, list[int]] = {}
    for ci, oi, _, _ in batch:
        by_context.setdefault(ci, []).append(oi)
    if len(by_context) > 4:
        return f"contexts {min(by_context)}-{max(by_context)}, {len(batch)} prompts"
    return "; ".join(f"context {ci} options {', '.join(map(str, ois))}" for ci, ois in by_context.items())


class OpenAIModel:
    """`LM` (and `RunsPrograms`) over an OpenAI-compatible server. Use `from_config`."""

    def __init__(self, name: str, base_url: str, *, api_key: str | None = None, api_key_env: str | None = None,
                 tokenizer: str | None = None, scoring: str = "echo", max_concurrency: int = 8,
                 max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 timeout_s: float = 300.0, request_budget: int | None = None, score_batch_size: int = 32,
                 revision: str | None = None, trust_remote_code: bool = False,
                 extra_body: Mapping[str, Any] | None = None):
        if scoring not in _OTHER_MODE:
            raise ValueError(f"model.openai.scoring: must be 'echo' or 'prompt_logprobs', got {scoring!r}")
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.extra_body = dict(extra_body or {})  # under every request body; the back-end's own fields win
        self.scoring = scoring
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.request_budget = request_budget
        self.score_batch_size = score_batch_size
        self._api_key_env = api_key_env
        self._tokenizer_name = tokenizer
        self._revision = revision
        self._trust_remote_code = trust_remote_code
        self._tokenizer: Any = None
        self._tokenizer_lock = threading.Lock()
        self._key = api_key or None
        self._sent = 0
        self._budget_lock = threading.Lock()
        self._rng = random.Random()  # backoff jitter only; never reaches a record
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx redacts the Authorization header in its own reprs.
        self._client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> OpenAIModel:
        o = cfg.openai
        key = None
        if o.api_key_env:
            key = os.environ.get(o.api_key_env)
            if not key:
                raise BackendError(f"model.openai.api_key_env is {o.api_key_env!r}, but that environment variable "
                                   "is not set (or is empty); export it with the server's API key")
        return cls(cfg.name, o.base_url, api_key=key, api_key_env=o.api_key_env, tokenizer=o.tokenizer,
                   scoring=o.scoring, max_concurrency=o.max_concurrency, max_retries=o.max_retries,
                   backoff_s=o.backoff_s, max_backoff_s=o.max_backoff_s, timeout_s=o.timeout_s,
                   request_budget=o.request_budget, score_batch_size=cfg.batch_size,
                   revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, extra_body=o.extra_body)

    def __repr__(self) -> str:
        return (f"OpenAIModel(name={self.name!r}, base_url={self.base_url!r}, scoring={self.scoring!r}, "
                f"max_concurrency={self.max_concurrency}, requests_sent={self._sent}, "
                f"request_budget={self.request_budget})")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def requests_sent(self) -> int:
        """HTTP requests sent so far by this instance (retries included); what the budget counts."""
        return self._sent

    # ---- tokenisation (option scoring only) -----------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The tokenizer named by `model.openai.tokenizer` (default: the model name), loaded on first use."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = self._load_tokenizer()
            return self._tokenizer

    def _load_tokenizer(self) -> Any:
        from cai.models import ModelError, load_tokenizer

        name = self._tokenizer_name or self.name
        # The model's revision applies when the tokenizer is the model's own.
        revision = self._revision if self._tokenizer_name is None else None
        try:
            return load_tokenizer(name, revision, self._trust_remote_code, chat=False)
        except (ValueError, ModelError) as e:
            raise BackendError(f"{self.name}: could not load the tokenizer {name!r} that option scoring needs to "
                               f"render the chat template ({e}); set model.openai.tokenizer to the served "
                               "chat model's hub id or a local folder") from None

    def encode(self, conversation: Sequence[Message]) -> list[int]:
        """Template a conversation as `HFModel.encode` does: a final assistant message is left open
        to be continued, otherwise a generation prompt is added."""
        from cai.templating import encode_prompt

        return encode_prompt(self.tokenizer, conversation)

    # ---- HTTP -----------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text

    def _reserve(self, request: str) -> None:
        """Count one HTTP request against the budget, or refuse to send it."""
        with self._budget_lock:
            if self.request_budget is not None and self._sent >= self.request_budget:
                raise BudgetExhausted(
                    f"{self.name} at {self.base_url}: the request budget of {self.request_budget} HTTP requests "
                    f"(model.openai.request_budget) is spent; {request} was not sent")
            self._sent += 1

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry number `attempt + 1`: the server's `Retry-After` when given, else
        `backoff_s` doubling per attempt with jitter; both capped at `max_backoff_s`."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        base = min(self.backoff_s * 2 ** attempt, self.max_backoff_s)
        return base * (0.5 + 0.5 * self._rng.random())

    def _pause(self, seconds: float, stop: threading.Event) -> None:
        """Wait before a retry; wakes early (and abandons the request) when the call is stopping."""
        if stop.wait(seconds):
            raise _Cancelled

    def _server_message(self, resp: httpx.Response) -> str:
        try:
            body = resp.json()
        except ValueError:
            body = None
        msg: Any = None
        if isinstance(body, dict):
            err = body.get("error")
            msg = err.get("message") if isinstance(err, dict) else err
            msg = msg or body.get("message") or body.get("detail")
        if not msg:
            msg = resp.text.strip()[:500] or resp.reason_phrase
        return self._redact(str(msg))

    def _post(self, path: str, payload: dict[str, Any], what: str, stop: threading.Event) -> dict[str, Any]:
        """POST with retries; `what` names the request's records in every message."""
        url = f"{self.base_url}{path}"
        request = f"POST {url} ({what})"
        attempt = 0
        while True:
            if stop.is_set():
                raise _Cancelled
            self._reserve(request)
            retry_after, server_message = None, ""
            try:
                resp = self._client.post(url, json=payload)
            except httpx.TransportError as e:
                status, problem = None, self._redact(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            else:
                status = resp.status_code
                if 200 <= status < 300:
                    try:
                        body = resp.json()
                    except ValueError:
                        body = None
                    if not isinstance(body, dict):
                        raise RequestFailed(f"{self.name}: {request}: HTTP {status} but the body is not a JSON "
                                            f"object: {self._redact(resp.text[:200])!r}", status)
                    return body
                server_message = self._server_message(resp)
                shown = server_message if len(server_message) <= _MESSAGE_CHARS else \
                    server_message[:_MESSAGE_CHARS] + f"... ({len(server_message)} characters)"
                problem = f"HTTP {status}: {shown}"
                if status >= 500 and _VALIDATION_ERROR.match(server_message):
                    raise RequestFailed(f"{self.name}: {request}: {problem} (a request validation error: not "
                                        "retried)", 422, shown)
                if status not in RETRY_STATUSES and status < 500:
                    hint = ""
                    if status in (401, 403):
                        hint = (f" (check the API key in the environment variable {self._api_key_env!r}, named by "
                                "model.openai.api_key_env)" if self._api_key_env else
                                " (the server wants an API key: set model.openai.api_key_env to the name of the "
                                "environment variable that holds it)")
                    raise RequestFailed(f"{self.name}: {request}: {problem}{hint}", status, shown)
                retry_after = retry_after_seconds(resp.headers.get("retry-after"))
            if attempt >= self.max_retries:
                raise RequestFailed(f"{self.name}: {request}: {problem} (gave up after {attempt + 1} attempts, "
                                    "model.openai.max_retries)", status, server_message)
            delay = self._backoff(attempt, retry_after)
            log.warning("%s failed with %s; retry %d of %d in %.2f s", request, problem, attempt + 1,
                        self.max_retries, delay)
            self._pause(delay, stop)
            attempt += 1

    def _execute(self, jobs: Iterable[_Job], on_result: Callable[[Any, Any], Iterable[_Job]]) -> None:
        """Run jobs on the pool, at most `max_concurrency` at once, handing each result to
        `on_result` (in this thread), which may return follow-up jobs. On the first failure nothing
        new starts, requests in flight finish, and the failure is raised."""
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="cai-openai")
        pending: dict[Future, tuple[int, Any]] = {}
        seq = 0

        def submit(job: _Job) -> None:
            nonlocal seq
            pending[pool.submit(job.run, stop)] = (seq, job.key)
            seq += 1

        try:
            for job in jobs:
                submit(job)
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: pending[f][0]):
                    _, key = pending.pop(fut)
                    for nxt in on_result(key, fut.result()):
                        submit(nxt)
        except Exception:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            stop.set()  # on an interrupt, requests in flight are left to finish on their own
            pool.shutdown(wait=False, cancel_futures=True)

    # ---- generate -------------------------------------------------------------------------

    def _chat_payload(self, conversation: Sequence[Message] | str, sampling: Sampling, n: int,
                      seed: int) -> dict[str, Any]:
        """A chat-completions payload, or for a raw-text prompt a completions payload whose prompt
        is the token ids `encode` gives (the same tokens the other back-ends see)."""
        s = sampling.at_round(0)
        payload: dict[str, Any] = {
            "model": self.name, "n": n, "temperature": float(s.temperature), "top_p": s.top_p,
            "max_tokens": s.max_new_tokens, "seed": int(seed),
        }
        if isinstance(conversation, str):
            payload["prompt"] = self.encode(conversation)
        else:
            payload["messages"] = [{"role": m["role"], "content": m["content"]} for m in conversation]
        if s.stop:
            payload["stop"] = list(s.stop)
        return {**self.extra_body, **payload}

    def _choices(self, body: dict[str, Any], n: int, sampling: Sampling, what: str,
                 path: str = "/chat/completions") -> list[tuple[str, str, int]]:
        """(text as generated up to a stop string, finish reason, usage tokens) per choice, in index order."""
        choices = body.get("choices")
        if not isinstance(choices, list) or len(choices) != n:
            got = len(choices) if isinstance(choices, list) else "no"
            error = f" ({self._redact(str(body['error']))})" if body.get("error") else ""
            raise BackendError(f"{self.name}: POST {self.base_url}{path} ({what}) returned {got} "
                               f"choices for n={n}{error}")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        per_choice = int((body.get("usage") or {}).get("completion_tokens") or 0) // n
        out = []
        for c in choices:
            text = ((c.get("message") or {}).get("content") if "message" in c else c.get("text")) or ""
            # Servers differ on whether they keep the stop string; the in-process back-end does not.
            cut = [text.find(s) for s in sampling.stop if s in text]
            if cut:
                text = text[: min(cut)]
            out.append((text, "length" if c.get("finish_reason") == "length" else "stop", per_choice))
        return out

    def _completions(self, choices: list[tuple[str, str, int]]) -> list[Completion]:
        """Completions as the in-process back-end gives them (text stripped). Runs in the calling
        thread: tokenizers are not safe to share between threads."""
        tok = self._tokenizer  # counts tokens only if option scoring already loaded it
        return [Completion(text=text.strip(), finish_reason=finish,  # type: ignore[arg-type]
                           num_tokens=len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else num)
                for text, finish, num in choices]

    def _chat_job(self, key: Any, conversation: Sequence[Message] | str, sampling: Sampling, n: int, seed: int,
                  what: str) -> _Job:
        payload = self._chat_payload(conversation, sampling, n, seed)
        path = "/completions" if isinstance(conversation, str) else "/chat/completions"
        return _Job(key, lambda stop: self._choices(self._post(path, payload, what, stop), n, sampling, what, path))

    def generate(self, conversations: Sequence[Sequence[Message]], sampling: Sampling, n: int = 1,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """`n` completions per conversation, one request each; `seeds[i]` (default i) fixes
        conversation i's samples."""
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError("generate: need one seed per conversation")
        out: list[list[Completion]] = [[] for _ in conversations]

        def store(i: int, choices: list[tuple[str, str, int]]) -> list[_Job]:
            out[i] = self._completions(choices)
            return []

        self._execute((self._chat_job(i, c, sampling, n, seeds[i] if seeds is not None else i, f"conversation {i}")
                       for i, c in enumerate(conversations)), store)
        return out

    def run_programs(self, programs: Sequence[Program], on_done: OnCall | None = None) -> None:
        """Run programs interleaved: each program's next request is sent as soon as its previous
        one is answered, up to `max_concurrency` requests in flight."""
        steps = [0] * len(programs)

        def job(i: int, req: Request) -> _Job:
            conversation, sampling, seed = req
            return self._chat_job(i, conversation, sampling, 1, seed, f"program {i}, request {steps[i]}")

        def advance(i: int, choices: list[tuple[str, str, int]]) -> list[_Job]:
            completion = self._completions(choices)[0]
            if on_done is not None:
                on_done(completion.num_tokens)
            steps[i] += 1
            try:
                return [job(i, programs[i].send(completion))]
            except StopIteration:
                return []

        def first() -> Iterable[_Job]:
            for i, prog in enumerate(programs):
                try:
                    req = next(prog)
                except StopIteration:  # a program may need no model at all
                    continue
                yield job(i, req)

        self._execute(first(), advance)

    # ---- score_options --------------------------------------------------------------------

    def _score_payload(self, prompts: list[list[int]]) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.name, "prompt": prompts, "max_tokens": 1, "temperature": 0.0}
        if self.scoring == "echo":
            # logprobs 1 rather than 0: some servers treat 0 as "no log-probabilities"; the value only
            # sets how many alternatives come back beside each prompt token's own log-probability.
            payload.update(echo=True, logprobs=1)
        else:
            payload["prompt_logprobs"] = 0
        return {**self.extra_body, **payload}

    def _no_capability(self, what: str, detail: str) -> BackendError:
        other = _OTHER_MODE[self.scoring]
        return BackendError(
            f"{self.name} at {self.base_url}: option scoring needs {_CAPABILITY[self.scoring]} "
            f"(model.openai.scoring: {self.scoring}), which this server does not provide for POST "
            f"{self.base_url}/completions ({what}): {detail}. Try model.openai.scoring: {other}, or a server "
            "that returns prompt log-probabilities (vLLM, `cai serve`)")

    def _prompt_logprobs(self, choice: dict[str, Any], ids: list[int], what: str) -> list[float]:
        """Log-probabilities of prompt tokens 1.. of `ids` from one completion choice."""
        if self.scoring == "echo":
            lps = (choice.get("logprobs") or {}).get("token_logprobs")
            if not isinstance(lps, list) or len(lps) < len(ids) or any(x is None for x in lps[1:len(ids)]):
                raise self._no_capability(what, "the response has no log-probabilities for the prompt tokens")
            return [float(x) for x in lps[1:len(ids)]]
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) < len(ids):
            raise self._no_capability(what, "the response has no `prompt_logprobs`")
        out = []
        for pos in range(1, len(ids)):
            entry = entries[pos] or {}
            got = entry.get(str(ids[pos]))
            if got is None:
                raise self._no_capability(what, f"prompt position {pos} lacks its own token {ids[pos]}")
            out.append(float(got["logprob"] if isinstance(got, dict) else got))
        return out

    def _score_job(self, key: int, batch: list[tuple[int, int, list[int], int]]) -> _Job:
        """One request scoring several (context, option) prompts; returns one total per prompt."""
        prompts = [ids for _, _, ids, _ in batch]
        what = "scoring " + _describe(batch)
        payload = self._score_payload(prompts)

        def run(stop: threading.Event) -> list[float]:
            try:
                body = self._post("/completions", payload, what, stop)
            except RequestFailed as e:
                if e.status in _NO_CAPABILITY:
                    raise self._no_capability(what, f"HTTP {e.status}: {e.server_message}") from None
                raise
            choices = body.get("choices")
            if not isinstance(choices, list):
                raise self._no_capability(what, "the response has no choices")
            by_index = {c.get("index", k): c for k, c in enumerate(choices) if isinstance(c, dict)}
            totals = []
            for k, (_, _, ids, m) in enumerate(batch):
                if k not in by_index:
                    raise BackendError(f"{self.name}: POST {self.base_url}/completions ({what}): no choice with "
                                       f"index {k} for prompt {k} of {len(batch)}")
                lps = self._prompt_logprobs(by_index[k], ids, what)
                # lps[j] is the log-probability of token j + 1; the option is the last m tokens.
                totals.append(sum(lps[len(ids) - 1 - m:]))
            return totals

        return _Job(key, run)

    def score_options(self, contexts: Sequence[Sequence[Message]], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """Sum of log-probabilities of each option's tokens after its context, from the server's
        prompt log-probabilities of context + option token ids."""
        if len(contexts) != len(options):
            raise ValueError("score_options: need one list of options per context")
        scores: list[list[float]] = [[0.0] * len(o) for o in options]
        items: list[tuple[int, int, list[int], int]] = []  # (context, option, prompt ids, option length)
        for ci, (ctx, opts) in enumerate(zip(contexts, options)):
            if not opts:
                continue
            cids = self.encode(ctx)
            for oi, opt in enumerate(opts):
                oids = self.tokenizer(opt, add_special_tokens=False)["input_ids"]
                if not oids:
                    raise ValueError(f"score_options: option {oi} of context {ci} is empty")
                if not cids:
                    raise ValueError(f"score_options: context {ci} templates to no tokens")
                items.append((ci, oi, cids + oids, len(oids)))
        batches = [items[i:i + self.score_batch_size] for i in range(0, len(items), self.score_batch_size)]

        def store(b: int, totals: list[float]) -> list[_Job]:
            for (ci, oi, _, _), total in zip(batches[b], totals):
                scores[ci][oi] = total
            return []

        self._execute((self._score_job(b, batch) for b, batch in enumerate(batches)), store)
        return scores
