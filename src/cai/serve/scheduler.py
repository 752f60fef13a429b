"""The scheduler of `cai serve`: one thread runs the model, and requests are batched for it.

Handler threads tokenise and validate, then queue token-level work for the model thread.
Generation requests that share the running batch's prompt prefix join it as slots free up (so the
few-shot block of SL-CAI prompts is computed once), and each is answered as soon as its own samples
finish; scoring requests waiting together go through one batched pass. Sampling is seeded per
request, so concurrency changes speed, not results (beyond floating-point noise of batch shapes).

The model is an `HFEngine` (`cai.lm.hf_engine`, token-level generation and prompt
log-probabilities) or a `RewardModel` (a preference model's scores). Run by `cai serve MODEL`;
tested by `pytest tests/test_serve.py`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cai.serve.errors import APIError

if TYPE_CHECKING:
    from cai.lm.hf_engine import HFEngine, TokenRequest

# A generation request joins a running batch only if its prompt starts with the batch's shared
# prefix and adds at most this many tokens (or as many as the prefix has): a long prompt with a
# prefix of its own is better served in a batch that shares that prefix.
JOIN_TAIL = 256


@dataclass
class _Arrival:
    settled: bool = False


@dataclass
class _Work:
    kind: str  # "generate" | "score" | "reward"
    payload: Any  # list[TokenRequest] | (rows, top) | rows
    future: Future = field(default_factory=Future)
    pending: int = 0  # generation: requests not finished yet


def _short_tails(a: int, b: int, shared: int) -> bool:
    """Whether two prompts of lengths a and b sharing `shared` leading tokens batch well together."""
    room = max(shared, JOIN_TAIL)
    return a - shared <= room and b - shared <= room


class Scheduler:
    """The one thread that runs the model. Handler threads `submit` token-level work and wait on
    the returned future. Generation work is decoded with continuous batching (`HFEngine.run_requests`):
    waiting requests that share the running batch's prefix join it, and each is answered when its
    own samples finish. Scoring and reward work waiting together goes through one batched call.
    Work is taken in arrival order; while anything waits that cannot join the running batch, the
    batch takes no newcomers, so it drains and nothing waits for long."""

    def __init__(self, engine: HFEngine | None = None, reward: Any = None, batch_size: int = 8,
                 max_linger_s: float = 0.05):
        self.engine, self.reward = engine, reward
        self.batch_size = batch_size  # rows per batch for preference-model scoring (the engine has its own)
        self.max_linger_s = max_linger_s
        self._arriving = 0  # requests being read and tokenised that will submit work
        self.runs: deque[dict[str, Any]] = deque(maxlen=10_000)  # per model call: kind, requests, rows
        self._waiting: deque[_Work] = deque()
        self._cv = threading.Condition()
        self._held = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="cai-serve-model", daemon=True)

    def start(self) -> Scheduler:
        """Start the model thread."""
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
        """How many submitted pieces of work wait for the model thread."""
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
        """Queue work for the model thread: "generate" (a list of `TokenRequest`; the future gives
        each one's completions), "score" ((token id rows, top): their `PromptLogprobs`) or "reward"
        (token id rows: their scores). `arrival`, if announced, is settled by this."""
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
                out = self.engine.prompt_logprobs_detail(rows, top)
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
        from cai.lm.hf_engine import common_prefix

        p0 = first.payload[0].prompt

        def fits_first(w: _Work) -> bool:
            if w.kind != "generate":
                return False
            if w is first:
                return True
            p = w.payload[0].prompt
            return _short_tails(len(p0), len(p), common_prefix([p0, p]))

        works = self._pop(fits_first)
        owner = {id(r): w for w in works for r in w.payload}
        stat = {"kind": "generate", "requests": len(works), "rows": sum(r.n for w in works for r in w.payload)}

        def admit(prefix: Sequence[int]) -> list[TokenRequest]:
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
                    if not joins(w) or rows >= self.engine.batch_size:
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

        def done(r: TokenRequest) -> None:
            w = owner.pop(id(r))
            w.pending -= 1
            if w.pending == 0:
                w.future.set_result([q.results for q in w.payload])

        # Recorded before any answer goes out (requests that join update it in place), so a client
        # that has its answer finds the run that made it in `runs`.
        self.runs.append(stat)
        try:
            self.engine.run_requests([r for w in works for r in w.payload], admit, done)
        except Exception as e:  # noqa: BLE001
            for w in {id(w): w for w in owner.values()}.values():
                if not w.future.done():
                    w.future.set_exception(e)
            raise
