"""The resumable chunk loop of the data stages: records in, model work per chunk, rows out.

`sl_generate`, `pairs` and `feedback` (and the evaluation stages to come) open their stage folder
with their own settings, then hand `run_chunks` their input records and a picklable
`work(lm, rows, on_call) -> rows`. The loop:

1. skips the records whose rows the folder already holds (`Stage.done_ids`) and cuts the rest
   into chunks of `chunk_size`;
2. writes a `running` manifest, then maps `work` over the chunks in this process or on Ray
   workers (`ray.enabled`, cai/cluster.py), showing progress;
3. appends each finished chunk with one write as it arrives, so a run killed at any point resumes
   at the next chunk with nothing lost or written twice;
4. puts the rows back in input order (chunks land out of order on Ray), so the rows file, and the
   fingerprints downstream stages take from it, are those of an uninterrupted single-process run;
5. writes the `complete` manifest, or `failed` and raises `StageError` when the stage refuses
   the rows it got.

    cai run configs/quickstart.yaml --to feedback
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from typing import Any

from tqdm import tqdm

from cai.cluster import Row, Work, map_chunks
from cai.config import RayConfig
from cai.lm.base import LM
from cai.rundir import Stage, StageError


def _cut(records: Sequence[Row], size: int) -> list[list[Row]]:
    """`records` in consecutive chunks of `size` (the last one shorter)."""
    return [list(records[i : i + size]) for i in range(0, len(records), size)]


def run_chunks(stage: Stage, records: Sequence[Row], work: Work, lm_factory: Callable[[], LM], ray_cfg: RayConfig,
               *, chunk_size: int, count: Callable[[list[Row]], dict[str, Any]], unit: str,
               desc: str | None = None, manifest: Mapping[str, Any] | None = None, stable_chunks: bool = False,
               calls: Callable[[list[Row]], int] | None = None, on_chunk: Callable[[int], None] | None = None,
               refuse: Callable[[list[Row]], str | None] | None = None) -> list[Row]:
    """Run `work` over the `records` (each with a `record_id`) whose rows `stage` does not hold
    yet, and return all of the stage's rows in input order.

    - `lm_factory` builds the model (once here, once per Ray worker); it and `work` must pickle
      for Ray.
    - `count(rows)` gives the manifest's counts; `manifest` holds its other fields.
    - `stable_chunks` cuts the chunks from all records before finished ones are dropped, so the
      chunk boundaries (the batches the model sees) do not move on resume; otherwise only the
      records still to do are cut.
    - `desc` (default: the stage's name) and `unit` label the progress bar; `calls(chunk)`, when
      given, is the number of model calls a chunk makes, shown as it goes (in this process only:
      Ray reports whole chunks).
    - `on_chunk(i)` follows the write of each chunk (`i` counts the chunks of this call; tests
      stop a run with it).
    - `refuse(rows)` may name why the finished rows are no use: the manifest then says `failed`
      and `StageError` is raised with that message.
    """
    extra = dict(manifest or {})
    done = stage.done_ids()
    if stable_chunks:
        todo = [left for chunk in _cut(records, chunk_size)
                if (left := [r for r in chunk if r["record_id"] not in done])]
    else:
        todo = _cut([r for r in records if r["record_id"] not in done], chunk_size)
    stage.write_manifest("running", count(stage.rows()), **extra)
    if todo:
        _map(stage, todo, len(records), work, lm_factory, ray_cfg, desc or stage.name, unit, calls, on_chunk)
    stage.restore_order([r["record_id"] for r in records])
    rows = stage.rows()
    why = refuse(rows) if refuse is not None else None
    if why is not None:
        stage.write_manifest("failed", count(rows), **extra)
        raise StageError(why)
    stage.write_manifest("complete", count(rows), **extra)
    return rows


def _map(stage: Stage, todo: list[list[Row]], total: int, work: Work, lm_factory: Callable[[], LM],
         ray_cfg: RayConfig, desc: str, unit: str, calls: Callable[[list[Row]], int] | None,
         on_chunk: Callable[[int], None] | None) -> None:
    """Map `work` over the chunks `todo` and append each as it finishes, with a progress bar over
    all `total` records."""
    left = sum(len(chunk) for chunk in todo)
    with tqdm(total=total, initial=total - left, desc=desc, unit=unit) as bar:
        tick = None
        if calls is not None:
            tick = _CallProgress(bar, [calls(chunk) for chunk in todo])

        with closing(map_chunks(todo, work, lm_factory, ray_cfg, tick, stage.name)) as results:
            for i, rows in results:
                stage.append(rows)
                bar.update(len(rows) - (tick.ended[i] if tick is not None else 0))
                if on_chunk is not None:
                    on_chunk(i)


class _CallProgress:
    """Model calls as they finish, shown beside the record count: the chunk's calls, tokens per
    second, and the time left at the rate of this run's calls so far (calls answered from a
    journal count as done, not towards the rate). A record counts on the bar as soon as its
    program ends (`ended`; its calls are journalled by then), before its chunk is written: one by
    one where the back-end interleaves programs (servers), at the chunk's last step in lockstep."""

    def __init__(self, bar: tqdm, want: list[int]):
        self.bar, self.want = bar, want
        self.made = [0] * len(want)
        self.ended = [0] * len(want)  # records of each chunk counted on the bar before it is written
        self.fresh = self.tokens = 0
        self.start = time.monotonic()

    def __call__(self, i: int, tokens: int = 0, replayed: bool = False, ended: bool = False) -> None:
        if ended:
            self.ended[i] += 1
            self.bar.update(1)
            return
        self.made[i] += 1
        if not replayed:
            self.fresh += 1
            self.tokens += tokens
        now = time.monotonic()
        parts = [f"chunk {i + 1}/{len(self.want)}: {self.made[i]}/{self.want[i]} calls"]
        elapsed = now - self.start
        if self.fresh and elapsed > 0:
            if self.tokens:
                parts.append(f"{self.tokens / elapsed:.1f} tok/s")
            todo = sum(self.want) - sum(self.made)
            parts.append(f"~{_clock(todo * elapsed / self.fresh)} left")
        self.bar.set_postfix_str(", ".join(parts))


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
