"""The errors `cai serve` answers with, as OpenAI-style bodies.

A refused or failed request gets `{"error": {"message", "type", "param", "code"}}`: 400 names the bad
field (its message starts with the field's name), 401 a missing or wrong key, 404 an unknown route
or model, 405 a known route with the wrong method (or a method the server has no use for), 408 a
request not received in time, 411 a chunked body, 413 a body over the size limit, 414 and 431 a
request line or headers too long, 503 a server shutting down or out of connections. Raised by
request parsing, the routes, the scheduler and the transport; tested by `pytest tests/test_serve.py`
and `pytest tests/test_reliability_serve_load.py`.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered as an OpenAI-style body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 408: "timeout_error", 411: "invalid_request_error",
             413: "invalid_request_error", 414: "invalid_request_error", 431: "invalid_request_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}


def bad(param: str, message: str) -> APIError:
    """A 400 naming the request field `param`."""
    return APIError(400, f"{param}: {message}", param)
