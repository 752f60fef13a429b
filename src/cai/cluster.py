"""Run a data stage's chunks in this process, or spread over Ray workers (`ray.enabled`).

The data stages' chunk loop (cai/stages/chunked.py) cuts their records into chunks and passes
them to `map_chunks` with a picklable `work(lm, rows, on_call) -> rows` function and a picklable
`lm_factory`. Without Ray the chunks run here, in order, on one back-end. With Ray,
`ray.num_workers` actors each build their own back-end once, from `lm_factory`, and take one chunk
at a time; each finished chunk comes back to this process as soon as it is done, and only this
process writes the run directory, so a chunk is on disk before any worker can lose it.

When something goes wrong on Ray:

- A worker process that dies (a crash, the OOM killer, a lost node) is restarted by Ray, which
  gives the chunk it held to the new process, up to `ray.max_retries` times per chunk. A chunk that
  still fails raises `ClusterError` naming the chunk's first record and the worker's error; the
  chunks written so far stay, so running the stage again resumes after them.
- An exception raised by the work itself (a back-end error, a spent request budget) is not
  retried: it is raised here as the same exception type, as it would be without Ray.

Ray is imported only when `ray.enabled` is set. `ray.address` None joins the cluster named by
RAY_ADDRESS or one started on this machine with `ray start`, and otherwise starts a local one.

    cai run configs/cluster.yaml --to sl_export
"""

from __future__ import annotations

import functools
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cai.config import RayConfig
from cai.lm.base import LM
from cai.rundir import StageError

Row = dict[str, Any]
# work(lm, rows, on_call) -> finished rows; on_call (None on Ray) is called after each model call.
Work = Callable[[LM, list[Row], Callable[[], None] | None], list[Row]]


class ClusterError(StageError):
    """Ray is missing, or a chunk kept killing its Ray workers; the message says which and what to do."""


def map_chunks(chunks: Sequence[list[Row]], work: Work, lm_factory: Callable[[], LM], ray_cfg: RayConfig,
               on_call: Callable[[int], None] | None = None, name: str = "stage") -> Iterator[tuple[int, list[Row]]]:
    """Yield (chunk index, finished rows) for every chunk: in order when run here, as workers
    finish on Ray. `on_call(chunk index)` follows each model call here; Ray reports whole chunks.
    Close the iterator when you stop early (`contextlib.closing`) so the Ray workers are released.
    """
    if not chunks:
        return
    if not ray_cfg.enabled:
        lm = lm_factory()
        for i, chunk in enumerate(chunks):
            yield i, work(lm, chunk, None if on_call is None else functools.partial(on_call, i))
        return
    yield from _on_ray(chunks, work, lm_factory, ray_cfg, name)


class _Worker:
    """A Ray actor's state: one back-end, built on its first chunk (so a factory error reaches the
    driver as that chunk's error rather than as a dead actor) and kept for the next ones."""

    def __init__(self, lm_factory: Callable[[], LM], work: Work):
        self.lm_factory, self.work, self.lm = lm_factory, work, None

    def run(self, rows: list[Row]) -> list[Row]:
        if self.lm is None:
            self.lm = self.lm_factory()
        return self.work(self.lm, rows, None)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ClusterError("ray.enabled is set but Ray is not installed; install the `ray` extra: "
                           "pip install 'constitutional-ai[ray]' (or set ray.enabled=false)") from e
    return ray


def _on_ray(chunks: Sequence[list[Row]], work: Work, lm_factory: Callable[[], LM], ray_cfg: RayConfig,
            name: str) -> Iterator[tuple[int, list[Row]]]:
    ray = _import_ray()
    if not ray.is_initialized():  # left running for the next stage; Ray shuts it down at exit
        ray.init(address=ray_cfg.address)
    # Ray restarts a dead actor (re-running __init__: a fresh back-end) and resends the call it was
    # running, up to max_task_retries times per call; exceptions raised by the work are not retried.
    actor = ray.remote(_Worker).options(num_cpus=ray_cfg.num_cpus_per_worker,
                                        num_gpus=ray_cfg.num_gpus_per_worker,
                                        max_restarts=-1, max_task_retries=ray_cfg.max_retries)
    workers = [actor.remote(lm_factory, work) for _ in range(min(ray_cfg.num_workers, len(chunks)))]
    queue = deque(range(len(chunks)))
    running: dict[Any, tuple[int, Any]] = {}  # result ref -> (chunk index, worker)

    def give(worker: Any) -> None:
        if queue:
            i = queue.popleft()
            running[worker.run.remote(chunks[i])] = (i, worker)

    try:
        for w in workers:  # one chunk per worker at a time: a death costs only the chunk it held
            give(w)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            i, w = running.pop(ref)
            where = f"{name} chunk {i + 1}/{len(chunks)} (first record {chunks[i][0]['record_id']})"
            try:
                rows = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the work raised: the error is the stage's
                if not isinstance(e.cause, BaseException):
                    raise
                if sys.version_info >= (3, 11):  # notes show in the traceback, not in the message
                    e.cause.add_note(f"raised on a Ray worker in {where}")
                raise e.cause from e
            except ray.exceptions.RayError as e:  # the worker died on every try
                raise ClusterError(
                    f"{where} could not be finished on Ray: its worker failed {ray_cfg.max_retries + 1} "
                    f"time(s) (ray.max_retries={ray_cfg.max_retries}). The chunks finished so far are saved; "
                    f"running the stage again resumes after them. Last worker error (the worker's own log is under "
                    f"/tmp/ray/session_latest/logs on its node): {str(e).strip()}") from None
            give(w)
            yield i, rows
    finally:
        for w in workers:
            ray.kill(w)

