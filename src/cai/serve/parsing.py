"""Request parsing and validation for `cai serve`: every field read, checked and refused by name.

Each reader takes the JSON body and returns plain values (numbers in range, stop strings, chat
messages, prompts as text or token ids, sampling settings) or raises a 400 `APIError` whose message
starts with the field's name. Options the server does not implement (streaming, chat
log-probabilities, tools, penalties, logit bias, suffix, best-of selection) are refused with a 400
rather than ignored. Used by the routes (`cai.serve.routes`); tested by `pytest tests/test_serve.py`.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import Any

from cai.config import Sampling
from cai.serve.errors import bad

MAX_N = 128
MAX_CHOICES = 1024  # prompts times n in one request
MAX_LOGPROBS = 20


def read_number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, integer: bool = False,
                lo_open: bool = False) -> Any:
    """Field `name`: a number (an integer if `integer`) in [lo, hi] (or (lo, hi]), `default` if absent."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(name, f"must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}")
    if not (lo < v if lo_open else lo <= v) or v > hi or (isinstance(v, float) and math.isnan(v)):
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return v


def read_stop(body: dict[str, Any]) -> list[str]:
    """Field `stop`: a non-empty string or a list of them, as a list (empty if absent)."""
    s = body.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) and x for x in s):
        raise bad("stop", "must be a non-empty string or a list of non-empty strings")
    return list(s)


def refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    """A 400 for any option this server does not implement, rather than ignoring it."""
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


def read_sampling(body: dict[str, Any], max_tokens: int) -> tuple[Sampling, int, int]:
    """(sampling settings, n, seed) of a request."""
    temperature = read_number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = read_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    n = read_number(body, "n", 1, 1, MAX_N, integer=True)
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(62)  # no seed: a fresh draw, as OpenAI servers do
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise bad("seed", f"must be an integer, got {json.dumps(seed)}")
    return Sampling(temperature=float(temperature), top_p=float(top_p), max_new_tokens=max_tokens,
                    stop=read_stop(body)), n, seed


def read_messages(body: dict[str, Any], name: str = "messages") -> list[dict[str, str]]:
    """Field `name`: a non-empty list of {role, content} chat messages (text content parts joined)."""
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


def read_prompts(body: dict[str, Any], name: str) -> list[str | list[int]]:
    """A prompt field as a list of prompts, each a string or a list of token ids (at most
    `MAX_CHOICES` of them)."""
    p = body.get(name)
    if isinstance(p, str) or _token_list(p):
        return [p]
    if isinstance(p, list) and len(p) > MAX_CHOICES:
        raise bad(name, f"{len(p)} prompts exceed {MAX_CHOICES} a request")
    if isinstance(p, list) and p and all(isinstance(x, str) or _token_list(x) for x in p):
        return list(p)
    raise bad(name, "must be a string, a non-empty list of token ids, or a non-empty list of either")


def read_max_tokens(body: dict[str, Any], default: int | None, lo: int) -> int | None:
    """`max_tokens` (or, when only it is given, `max_completion_tokens`): an integer >= lo."""
    name = "max_completion_tokens" if body.get("max_tokens") is None and "max_completion_tokens" in body \
        else "max_tokens"
    return read_number(body, name, default, lo, 1 << 20, integer=True)
