"""The HTTP transport of `cai serve`: a threaded HTTP/1.1 server with keep-alive in front of `App`.

Each connection gets a handler thread that reads the body (at most `MAX_BODY` bytes), passes it to
the routes and writes the JSON answer. `Server` puts the scheduler, the routes and the HTTP server
together; it binds to 127.0.0.1 unless told otherwise (`is_loopback` tells whether a host is only
reachable from this machine). Closing it stops accepting, answers or refuses what is queued, ends
open connections and joins every thread.

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from cai.serve.errors import APIError
from cai.serve.routes import App
from cai.serve.scheduler import Scheduler

if TYPE_CHECKING:
    from cai.lm.hf import HFModel

MAX_BODY = 64 << 20


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
                 batch_size: int = 8):
        if (lm is None) == (reward is None):
            raise ValueError("Server: give a language model or a preference model (reward=)")
        self.scheduler = Scheduler(lm.engine if lm is not None else None, reward, batch_size)
        limit = max_length or (lm.max_length if lm is not None else None) or 4096
        self.app = App(self.scheduler, name, api_key, limit)
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
