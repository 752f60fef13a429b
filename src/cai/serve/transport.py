"""The HTTP transport of `cai serve`: a threaded HTTP/1.1 server with keep-alive in front of `App`.

Each connection gets a handler thread that reads the body (at most `MAX_BODY` bytes), passes it to
the routes and writes the JSON answer. Every wait is bounded (`request_timeout_s`, `cai serve
--request-timeout`): a connection that sends no request in that time gets a 408 and is closed, as
does a request not received in full (a client sending a byte a second), and an idle keep-alive
connection is closed quietly. The route, method and API key are checked before the body is read;
chunked bodies get a 411; past `max_connections` open connections a new one gets a 503 at once.
Every refusal is an OpenAI-style JSON body, `http.server`'s own ones (bad request line, too many
headers) included. `Server` puts the scheduler, the routes and the HTTP server together; it binds
to 127.0.0.1 unless told otherwise (`is_loopback` tells whether a host is only reachable from this
machine). Closing it stops accepting, answers or refuses what is queued, ends open connections and
joins every thread.

    python -c "from cai.serve import Server; from cai.lm.hf import HFModel; \
      from cai.config import ModelConfig; lm = HFModel.from_config(ModelConfig()); \
      s = Server(lm, 'smollm2-135m', port=8000).start(); print(s.url); s.close()"
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from cai.serve.errors import APIError
from cai.serve.routes import App
from cai.serve.scheduler import Scheduler

if TYPE_CHECKING:
    from cai.lm.hf import HFModel

MAX_BODY = 64 << 20
DRAIN = 1 << 20  # a refused request's body up to this size is read and dropped, not left on the line
MAX_CONNECTIONS = 256
REQUEST_TIMEOUT_S = 30.0


class _DeadlineReader:
    """The request stream of one connection, read against a deadline: a client that sends a byte a
    second cannot hold a handler past it, since every wait on the socket is cut to the time left.
    `readline` and `read` are all that `http.server` and `_Handler` call."""

    def __init__(self, f: Any, sock: socket.socket):
        self.f, self.sock = f, sock
        self.deadline: float | None = None

    def _arm(self) -> None:
        if self.deadline is None:
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(left)

    def wait_first(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a request's first byte; False at end of stream."""
        self.sock.settimeout(timeout)
        return bool(self.f.peek(1))

    def readline(self, limit: int = -1) -> bytes:
        out = bytearray()
        while limit < 0 or len(out) < limit:
            self._arm()
            chunk = self.f.peek(1)  # at most one read on the socket, whatever it brings
            if not chunk:
                break
            nl = chunk.find(b"\n")
            take = len(chunk) if nl < 0 else nl + 1
            if limit >= 0:
                take = min(take, limit - len(out))
            out += self.f.read(take)  # already buffered: does not block
            if out.endswith(b"\n"):
                break
        return bytes(out)

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            self._arm()
            chunk = self.f.read1(n - len(out) if n >= 0 else 1 << 16)
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def close(self) -> None:
        self.f.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "cai-serve"
    # Small replies must not wait for the client's delayed ACK (Nagle): that costs ~40 ms a request.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self.rfile = _DeadlineReader(self.rfile, self.connection)  # type: ignore[assignment]
        self._served = 0

    def handle_one_request(self) -> None:
        """One request, with every read bounded: `http.server`'s own loop, plus the timeouts."""
        limit: float = self.server.request_timeout_s  # type: ignore[attr-defined]
        self._phase = "idle"
        # what `send_response` reads, for an answer sent before the request line is parsed
        self.requestline, self.request_version, self.command = "", self.protocol_version, ""
        self.rfile.deadline = None  # type: ignore[attr-defined]
        try:
            if not self.rfile.wait_first(limit):  # type: ignore[attr-defined]
                self.close_connection = True  # the client closed the connection
                return
        except TimeoutError:
            self.close_connection = True
            if self._served == 0:  # a connection that never sent a request gets told why it is closed
                self._error(APIError(408, f"no request received within {limit:g} s; closing the connection"))
            return  # an idle keep-alive connection is closed quietly, as HTTP allows
        except OSError:
            self.close_connection = True
            return
        self._phase = "reading"
        self.rfile.deadline = time.monotonic() + limit  # type: ignore[attr-defined]
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414, "request line too long")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():  # it has answered the error itself
                return
            self._served += 1
            if not hasattr(self, "do_" + self.command):
                self.close_connection = True
                self._error(APIError(405, f"method {self.command} is not allowed; use GET or POST"))
                return
            getattr(self, "do_" + self.command)()
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True
            if self._phase == "reading":
                self._error(APIError(408, f"request not received in full within {limit:g} s"))
        except OSError:
            self.close_connection = True  # the client went away; nothing to answer

    def _serve(self, method: str) -> None:
        app: App = self.server.app  # type: ignore[attr-defined]
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # the body is left unread, so the connection cannot be reused
            self._error(APIError(411, "send the body with a Content-Length header (chunked transfer encoding "
                                      "is not supported)"))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            err = APIError(413, f"request body too large (at most {MAX_BODY} bytes)") if length > MAX_BODY \
                else APIError(400, "bad Content-Length header")
            self._error(err)
            return
        try:  # route, method and key are checked before a byte of the body is read
            app.preflight(method, self.path, self.headers)
        except APIError as e:
            if length > DRAIN:
                self.close_connection = True
            else:  # a small body is read and dropped, so the client reads the answer on a clean connection
                self.rfile.read(length)
            self._error(e)
            return
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:
            self.close_connection = True
            self._error(APIError(400, f"request body ended after {len(raw)} of {length} bytes"))
            return
        self._phase = "answering"
        self.rfile.deadline = None  # type: ignore[attr-defined]
        # Writing the answer is bounded too: a client that does not read cannot hold the thread.
        self.connection.settimeout(self.server.request_timeout_s)  # type: ignore[attr-defined]
        status, body = app.handle(method, self.path, self.headers, raw)
        self._send(status, body)

    def _error(self, err: APIError) -> None:
        with contextlib.suppress(OSError):
            self.rfile.deadline = None  # type: ignore[attr-defined]
            self.connection.settimeout(5.0)  # a refusal is short: a client that does not read it is let go
            self._send(err.status, err.body())

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """`http.server`'s own refusals (bad request line, too many headers...) as JSON error bodies."""
        self.close_connection = True
        self._error(APIError(code, message or self.responses.get(code, ("error",))[0]))

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
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

    def __init__(self, *args: Any, request_timeout_s: float = REQUEST_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            full = len(self._conns) >= self.max_connections
            if not full:
                self._conns.add(request)
        if full:  # no thread for it: a short answer from the accepting thread, then close
            err = APIError(503, f"too many open connections (at most {self.max_connections}); retry later")
            data = json.dumps(err.body()).encode()
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(data)
                                + data)
            self.shutdown_request(request)
            return
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
    """Whether `host` (a name or an address) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """An OpenAI-compatible server over a loaded back-end (an `HFModel`, or a `RewardModel` with
    `reward=`). `start()` serves from a background thread; `serve_forever()` from this one."""

    def __init__(self, lm: HFModel | None = None, name: str = "model", host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, reward: Any = None, max_length: int | None = None,
                 batch_size: int = 8, request_timeout_s: float = REQUEST_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS):
        if (lm is None) == (reward is None):
            raise ValueError("Server: give a language model or a preference model (reward=)")
        self.scheduler = Scheduler(lm.engine if lm is not None else None, reward, batch_size)
        limit = max_length or (lm.max_length if lm is not None else None) or 4096
        self.app = App(self.scheduler, name, api_key, limit)
        cls = _HTTPServer6 if ":" in host else _HTTPServer
        if request_timeout_s <= 0 or max_connections < 1:
            raise ValueError("Server: request_timeout_s must be > 0 and max_connections >= 1")
        self.httpd = cls((host, port), _Handler, request_timeout_s=request_timeout_s,
                         max_connections=max_connections)
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
        self.scheduler.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cai-serve-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.scheduler.start()
        self.httpd.serve_forever()

    def close(self) -> None:
        """Stop accepting, answer or refuse what is queued, end open connections, join every thread."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.scheduler.close()
        self.httpd.close_connections()
        self.httpd.server_close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
