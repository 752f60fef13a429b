"""`cai serve`: an OpenAI-compatible HTTP server over the in-process transformers back-end.

Other tools (and `model.backend: openai` in this project) can then use a trained policy or
preference model. It speaks the OpenAI API as vLLM implements it: chat completions, completions
with prompt log-probabilities, vLLM's pooling API for a preference model, models and health (the
routes and their fields: `cai.serve.routes`). The package, from the wire inwards:

- `transport`: the threaded HTTP/1.1 server, and `Server`, which puts the parts together;
- `routes`: `App`, which maps a method, path, headers and body to a status and a JSON body;
- `parsing`: request fields read and checked, unsupported options refused (`errors`: the
  OpenAI-style error bodies);
- `scheduler`: the one model thread; requests sent together are batched, and generation requests
  that share the running batch's prompt prefix join it. Sampling is seeded per request, so
  concurrency changes speed, not results.

The model is loaded the way it was saved (`load`): a causal LM as an `HFModel`, whose token-level
`HFEngine` the server drives, or a preference model (`is_preference_model`) as a `RewardModel`.

The server binds to 127.0.0.1 unless told otherwise; `--api-key-env NAME` requires
`Authorization: Bearer <value of $NAME>` (the key is never printed or logged). Every read from a
client is bounded by `--request-timeout` seconds (default 30; `cai.serve.transport`).

    cai serve smollm2-135m --port 8000
    cai serve runs/quickstart/sft/model --api-key-env CAI_SERVE_KEY
    cai serve runs/quickstart/pm/model          # a preference model: POST /pooling
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai.serve.errors import APIError
from cai.serve.transport import REQUEST_TIMEOUT_S, Server, is_loopback

__all__ = ["APIError", "Server", "is_loopback", "is_preference_model", "load", "serve"]


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
          ready: Callable[[Server], None] | None = None, request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
    """Load `model` and serve it until interrupted (Ctrl-C); `ready(server)` runs once it listens."""
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {api_key_env} is not set or empty")
    if batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if not request_timeout_s > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {request_timeout_s}")
    if not is_loopback(host):
        print(f"warning: serving on {host}, not a loopback address: anyone who can reach this port can use the "
              "model" + ("" if api_key else "; set --api-key-env to require a key"), file=sys.stderr, flush=True)
    lm, reward = load(model, dtype, device, batch_size, max_length)
    server = Server(lm, model, host, port, api_key, reward=reward, max_length=max_length, batch_size=batch_size,
                    request_timeout_s=request_timeout_s)
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
