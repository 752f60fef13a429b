"""`cai audit serve`: an OpenAI-compatible proxy that audits the replies passing through it.

    cai audit serve --upstream http://127.0.0.1:8000 [-c CONFIG] [key=value ...] [--port 8100]
        [--host 127.0.0.1] [--threshold 0.5] [--principle ID] [--enforce] [--queue-size 64] [--out DIR]

Clients point at the proxy instead of the server (`base_url` http://127.0.0.1:8100/v1). Every
request is forwarded as it came (method, path and query after the upstream URL's own path, the
body's bytes, every header but the hop-by-hop ones and Host) and the upstream's answer comes back as
it went (status, body bytes, headers but the hop-by-hop ones; a streamed answer is relayed as it
arrives). Nothing of the proxy's own is served: every path is the upstream's.

- Audit: the reply of a successful `POST .../chat/completions` (each choice; a streamed one from
  its deltas once it ends) is judged as `cai audit FILE` judges a stored one (cai/evals/audit.py),
  in a background thread, into the same DIR files (`rows.jsonl`, `queue.jsonl`, `summary.json`),
  the summary holding the proxy's counters under `proxy`. The request's `metadata.category`, when
  a string, is the reply's category.
- Bounded: the background queue holds at most `--queue-size` replies besides the one being judged;
  when it is full a reply is dropped and counted (`dropped`), and the client never waits for it.
- Monitor mode (the default) never changes an answer. With `--enforce` a non-streamed chat
  completion is judged before it is answered, and when any principle scores above the threshold the
  client gets, with status 200, a chat completion in the upstream's shape whose choice is a refusal
  naming the principles (`finish_reason: "content_filter"`, and `cai_audit: {flagged, threshold,
  scores, record_id}` beside it). A streamed answer is already on its way and is only monitored.
- A judge that raises never stops the proxy: the reply gets a `failed` row (reason
  `judge_error: ...`), `judge_errors` is counted, and the upstream's answer is served (also under
  `--enforce`: the proxy fails open).
- Stopping (Ctrl-C or SIGTERM) ends at once: replies still queued are dropped and counted; the
  rows written so far stay, and a restart on the same DIR keeps counting them in the summary.
- Loopback by default. The key for the upstream comes only from the environment (`OPENAI_API_KEY`,
  or the variable `--api-key-env` names) and is added as `Authorization: Bearer ...` to a request
  that has none of its own; it is never printed, logged or written.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import queue
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cai.evals import audit as A
from cai.serve.transport import MAX_BODY, _HTTPServer, _HTTPServer6

# Headers that describe one connection, not the message (RFC 9110 §7.6.1); never forwarded.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-connection"})
REFUSAL = ("This reply was withheld by the audit proxy: the judge found that it may break these principles of the "
           "constitution: {principles}.")

Judge = Callable[[Sequence[A.Output]], list[dict[str, Any]]]


def _hop_by_hop(headers: Any) -> set[str]:
    """The hop-by-hop header names of a message, with those its Connection header lists."""
    named = {t.strip().lower() for v in headers.get_all("Connection") or [] for t in v.split(",") if t.strip()}
    return HOP_BY_HOP | named


class AuditLog:
    """The audit folder of a proxy: judgement rows appended as they come, the review queue
    appended with them, the summary rewritten after each, with the proxy's counters."""

    def __init__(self, stage: Any, threshold: float, meta: dict[str, Any]):
        self.stage, self.threshold, self.meta = stage, threshold, meta
        self.out = Path(stage.dir)
        self.rows = stage.rows()  # earlier sessions' rows count in the summary
        self.counters: Counter[str] = Counter()
        self.lock = threading.Lock()
        A.write_outputs(self.out, self.rows, self._summary())

    def _summary(self) -> dict[str, Any]:
        s = A.summarise(self.rows, self.threshold)
        s.update(self.meta)
        s["proxy"] = dict(sorted(self.counters.items()))
        return s

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] += n

    def record(self, rows: Sequence[dict[str, Any]]) -> None:
        with self.lock:
            self.stage.append(rows)
            lines = [q for r in rows for q in A.queue_lines(r, self.threshold)]
            if lines:
                with open(self.out / "queue.jsonl", "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in lines))
            self.rows.extend(rows)
            self.counters["audited"] += len(rows)
            A.write_json(self.out / "summary.json", self._summary())

    def flush(self) -> None:
        with self.lock:
            A.write_json(self.out / "summary.json", self._summary())


class Auditor:
    """The judge behind the proxy: a bounded queue and one thread that judges what it holds, or
    a judgement now (`--enforce`). The judge is called by one thread at a time."""

    def __init__(self, judge: Judge, log: AuditLog, queue_size: int, judge_name: str, constitution: Any):
        if queue_size < 1:
            raise ValueError("--queue-size must be >= 1")
        self.judge, self.log = judge, log
        self.judge_name, self.constitution = judge_name, constitution
        self.queue: queue.Queue[A.Output | None] = queue.Queue(maxsize=queue_size)
        self.judge_lock = threading.Lock()
        self.max_held = 0
        self._thread = threading.Thread(target=self._loop, name="cai-audit-judge", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, output: A.Output) -> bool:
        """Queue a reply for judging; False (and counted as dropped) when the queue is full."""
        try:
            self.queue.put_nowait(output)
        except queue.Full:
            self.log.count("dropped")
            return False
        self.max_held = max(self.max_held, self.queue.qsize())
        self.log.count("queued")
        return True

    def judge_now(self, outputs: Sequence[A.Output]) -> list[dict[str, Any]]:
        """Judge `outputs` in this thread and record them; a judge that raises gives failed rows."""
        with self.judge_lock:
            try:
                rows = self.judge(outputs)
                if len(rows) != len(outputs):
                    raise RuntimeError(f"the judge returned {len(rows)} rows for {len(outputs)} replies")
            except Exception as e:  # noqa: BLE001 - any judge failure is counted, and serving goes on
                self.log.count("judge_errors", len(outputs))
                reason = " ".join(f"judge_error: {type(e).__name__}: {e}".split())[:300]
                rows = [A.failed_row(o, reason, self.judge_name, self.constitution) for o in outputs]
        self.log.record(rows)
        return rows

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            self.judge_now([item])

    def close(self, wait: bool = True) -> None:
        """Stop the thread: after what is queued when `wait`, else dropping it (counted)."""
        if not wait:
            with contextlib.suppress(queue.Empty):
                while True:
                    if self.queue.get_nowait() is not None:
                        self.log.count("dropped")
        self.queue.put(None)  # blocks only while the thread still has work queued
        self._thread.join()
        self.log.flush()


def _decoded(body: bytes, encoding: str | None) -> bytes | None:
    """A response body without its content coding (gzip, deflate), None for any other coding."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    try:
        if enc in ("gzip", "x-gzip"):
            return gzip.decompress(body)
        if enc == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error):
        return None
    return None


def stream_response(data: bytes) -> dict[str, Any] | None:
    """A streamed chat completion's server-sent events put together as one response (choices'
    content joined from their deltas); None when the stream cannot be read."""
    texts: dict[int, list[str]] = {}
    rid = None
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            return None
        if not isinstance(event, dict):
            return None
        rid = rid or event.get("id")
        for ch in event.get("choices") or []:
            delta = ch.get("delta") or {}
            if isinstance(delta.get("content"), str):
                texts.setdefault(int(ch.get("index", 0)), []).append(delta["content"])
    if not texts:
        return None
    return {"id": rid, "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(t)}}
                                   for i, t in sorted(texts.items())]}


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "cai-audit-proxy"
    disable_nagle_algorithm = True

    def _body(self) -> bytes | None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > MAX_BODY:
                    return None
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY:
            return None
        return self.rfile.read(length) if length else b""

    def _error(self, status: int, message: str) -> None:
        data = json.dumps({"error": {"message": message, "type": "proxy_error", "code": status}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _forward(self) -> None:
        proxy: AuditProxy = self.server.proxy  # type: ignore[attr-defined]
        try:
            body = self._body()
        except ValueError:
            body = None
        if body is None:
            self.close_connection = True
            self._error(413 if self.headers.get("Content-Length", "0").isdigit() else 400,
                        f"request body unreadable or too large (at most {MAX_BODY} bytes)")
            return
        drop = _hop_by_hop(self.headers) | {"host", "content-length"}
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in drop]
        if body or "Content-Length" in self.headers or self.command in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(body))))
        if proxy.api_key and not any(k.lower() == "authorization" for k, _ in headers):
            headers.append(("Authorization", f"Bearer {proxy.api_key}"))
        proxy.log.count("forwarded")
        try:
            conn = proxy.connect()
            conn.putrequest(self.command, proxy.prefix + self.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", proxy.netloc)
            for k, v in headers:
                conn.putheader(k, v)
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
        except OSError as e:
            proxy.log.count("upstream_errors")
            self._error(502, f"upstream {proxy.netloc} unreachable: {type(e).__name__}")
            return
        try:
            self._relay(proxy, body, resp)
        finally:
            conn.close()

    def _relay(self, proxy: AuditProxy, body: bytes, resp: http.client.HTTPResponse) -> None:
        # A HEAD answer's Content-Length is the upstream's (there is no body to measure here).
        drop = _hop_by_hop(resp.headers) | (set() if self.command == "HEAD" else {"content-length"})
        headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in drop]
        chat = self.command == "POST" and self.path.split("?", 1)[0].rstrip("/").endswith("/chat/completions")
        streamed = "text/event-stream" in (resp.headers.get("Content-Type") or "")
        if streamed and self.command != "HEAD":
            self.send_response(resp.status, resp.reason)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            got = []
            while chunk := resp.read1(65536):
                got.append(chunk)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            data = b"".join(got)
            if chat and resp.status == 200:
                proxy.audit(body, stream_response(_decoded(data, resp.headers.get("Content-Encoding")) or b""),
                            enforce=False)
            return
        data = resp.read()
        if chat and resp.status == 200:
            plain = _decoded(data, resp.headers.get("Content-Encoding"))
            try:
                parsed = json.loads(plain) if plain is not None else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                parsed = None
            refusal = proxy.audit(body, parsed if isinstance(parsed, dict) else None, enforce=proxy.enforce)
            if refusal is not None:
                data = json.dumps(refusal).encode()
                headers = [(k, v) for k, v in headers if k.lower() not in ("content-type", "content-encoding")]
                headers.append(("Content-Type", "application/json"))
        self.send_response(resp.status, resp.reason)
        for k, v in headers:
            self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _forward  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class AuditProxy:
    """The proxy: an HTTP server on `host:port` forwarding to `upstream`, with an `Auditor`.
    `start()` serves from a background thread; `serve_forever()` from this one."""

    def __init__(self, upstream: str, judge: Judge, log: AuditLog, *, judge_name: str, constitution: Any,
                 host: str = "127.0.0.1", port: int = 8100, enforce: bool = False, queue_size: int = 64,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 600.0):
        u = urlsplit(upstream)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"--upstream must be an http:// or https:// URL, got {upstream!r}")
        self.scheme, self.netloc, self.prefix = u.scheme, u.netloc, u.path.rstrip("/")
        self.upstream_host, self.upstream_port = u.hostname, u.port
        self.timeout, self.enforce, self.log = timeout, enforce, log
        self.api_key = os.environ.get(api_key_env) or None  # kept in memory only
        self.auditor = Auditor(judge, log, queue_size, judge_name, constitution)
        cls = _HTTPServer6 if ":" in host else _HTTPServer
        self.httpd = cls((host, port), _ProxyHandler)
        self.httpd.proxy = self  # type: ignore[attr-defined]
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never the key
        return f"AuditProxy({self.url} -> {self.scheme}://{self.netloc}{self.prefix}, enforce={self.enforce})"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.upstream_host, self.upstream_port, timeout=self.timeout)

    def audit(self, request_body: bytes, response: dict[str, Any] | None, enforce: bool) -> dict[str, Any] | None:
        """Judge a chat completion's replies (in the background, or now when `enforce`); the
        refusal to answer with instead, or None to answer with the upstream's."""
        try:
            request = json.loads(request_body)
            if response is None:
                raise A.AuditInputError("the response is not a chat completion the proxy can read")
            where = f"proxy:{time.strftime('%Y-%m-%dT%H:%M:%S')}"
            got, skipped = A.chat_log_outputs(where, {"request": request, "response": response})
            meta = request.get("metadata") if isinstance(request, dict) else None
            category = meta.get("category") if isinstance(meta, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError, A.AuditInputError, TypeError, ValueError, AttributeError):
            self.log.count("not_audited")
            return None
        for reason in skipped:
            self.log.count(f"not_judged_{reason}")
        category = category.strip() if isinstance(category, str) and category.strip() else A.UNCATEGORISED
        outputs = [A.Output(f"px-{uuid.uuid4().hex[:12]}" + (f"-{rid}" if rid else ""), where, tuple(conv), reply,
                            category) for rid, conv, reply in got]
        if not enforce:
            for o in outputs:
                self.auditor.submit(o)
            return None
        rows = self.auditor.judge_now(outputs) if outputs else []
        hits = [(r, A.flagged(r, self.log.threshold)) for r in rows]
        hits = [(r, f) for r, f in hits if f]
        if not hits:
            return None
        self.log.count("enforced")
        pids = sorted({e["principle_id"] for _, f in hits for e in f})
        return {
            "id": response.get("id"), "object": "chat.completion", "created": response.get("created", int(time.time())),
            "model": response.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": REFUSAL.format(principles=", ".join(pids))},
                         "finish_reason": "content_filter", "logprobs": None}],
            "usage": response.get("usage"),
            "cai_audit": {"flagged": True, "threshold": self.log.threshold, "record_ids": [r["record_id"] for r, _ in hits],
                          "scores": {e["principle_id"]: e["p_violation"] for _, f in hits for e in f}},
        }

    def start(self) -> AuditProxy:
        self.auditor.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cai-audit-proxy", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.auditor.start()
        self.httpd.serve_forever()

    def close(self, wait: bool = True) -> None:
        """Stop accepting, end open connections, then judge what is queued (or drop it, counted)."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.close_connections()
        self.httpd.server_close()
        self.auditor.close(wait)

    def __enter__(self) -> AuditProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def judge_for(lm_factory: Callable[[], Any], constitution: Any, cfg: Any, principle_ids: Sequence[str]) -> Judge:
    """The proxy's judge: `evals.audit.judge_outputs` with the model built on first use."""
    held: list[Any] = []

    def judge(outputs: Sequence[A.Output]) -> list[dict[str, Any]]:
        if not held:
            held.append(lm_factory())
        return A.judge_outputs(held[0], outputs, constitution, cfg.feedback, cfg.seed, principle_ids)

    return judge
