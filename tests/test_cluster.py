"""Data stages on Ray (a local instance): the same rows as one process, no finished chunk lost when
a worker dies, a clear error and a resumable stage when a chunk keeps killing its workers."""

from __future__ import annotations

import functools
import json
import os
import sys
import zlib
from pathlib import Path

import pytest

from cai import pipeline
from cai.cluster import ClusterError
from cai.config import load_config
from cai.lm.base import BudgetExhausted, Completion

ray = pytest.importorskip("ray")

DATA_STAGES = ("sl_generate", "pairs", "feedback")


def _digest(*parts: object) -> int:
    return zlib.crc32(json.dumps(parts, sort_keys=True).encode())  # the same in every process


class SeededLM:
    """A deterministic LM whose answers depend only on the conversation, the seed and the sample
    index (so pairs differ and labels vary). With `kill_on`, the call after `kill_after` earlier
    calls that mention that text ends the process: every time, or only while `marker` does not
    exist yet. With `budget_on`, a call that mentions it raises BudgetExhausted. `log` gets a line
    (first prompt, pid) per call of first answers, i.e. one per chunk started."""

    name = "seeded"

    def __init__(self, kill_on: str | None = None, kill_after: int = 0, marker: str | None = None,
                 log: str | None = None, budget_on: str | None = None):
        self.kill_on, self.kill_after, self.marker = kill_on, kill_after, marker
        self.log, self.budget_on = log, budget_on
        self.seen = 0

    def _check(self, convs) -> None:
        text = json.dumps(convs)
        if self.budget_on and self.budget_on in text:
            raise BudgetExhausted("seeded: request budget of 0 requests is spent")
        if self.kill_on and self.kill_on in text:
            self.seen += 1
            if self.seen > self.kill_after and (self.marker is None or not os.path.exists(self.marker)):
                if self.marker is not None:
                    Path(self.marker).touch()
                os._exit(1)

    def generate(self, conversations, sampling, n=1, seeds=None):
        convs = [list(c) for c in conversations]
        if self.log and all(len(c) == 1 for c in convs):
            with open(self.log, "a") as f:
                f.write(f"{convs[0][0]['content']}\t{os.getpid()}\n")
        self._check(convs)
        seeds = seeds if seeds is not None else [0] * len(convs)
        return [[Completion(f"Answer {_digest(c, s, j) % 100000} (sample {j}).", "stop", 4) for j in range(n)]
                for c, s in zip(convs, seeds)]

    def score_options(self, contexts, options):
        self._check([list(c) for c in contexts])
        return [[-1.0 - _digest(c, o) % 100 / 50 for o in opts] for c, opts in zip(contexts, options)]


def _cfg(run_dir: Path, *extra: str):
    return load_config(None, [
        f"run_dir={run_dir}", "prompts.red_team=[{path: 'builtin:red_team', limit: 8}]", "sl.helpful_fraction=0.2",
        "sl.rounds=1", "sl.few_shot=1", "sl.chunk_size=2", "pairs.model=seeded", "pairs.chunk_size=2",
        "feedback.chunk_size=3", "preferences.human_fraction=0", "ray.num_workers=2", "ray.num_cpus_per_worker=1",
        *extra])


def _run_data_stages(cfg, factory) -> None:
    pipeline.run(cfg, stop="sl_export", lm_factory=factory)
    pipeline.run(cfg, start="pairs", stop="preferences", lm_factory=factory)


def _text(run_dir: Path, stage: str) -> str:
    return (run_dir / stage / "rows.jsonl").read_text()


def _by_id(text: str) -> dict[str, dict]:
    return {r["record_id"]: r for r in map(json.loads, text.splitlines())}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The workers cannot import this test module by name; send its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: every data stage and its consumers in this process, without Ray."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    _run_data_stages(_cfg(run_dir), SeededLM)
    return run_dir


def test_stages_on_ray_write_the_same_rows_as_one_process(local_ray, single, tmp_path):
    run_dir = tmp_path / "ray"
    _run_data_stages(_cfg(run_dir, "ray.enabled=true"), SeededLM)
    for stage in (*DATA_STAGES, "sl_export", "preferences"):
        # The same rows, restored to input order, so downstream fingerprints and data order match too.
        assert _text(run_dir, stage) == _text(single, stage), stage
        m = json.loads((run_dir / stage / "manifest.json").read_text())
        assert m["status"] == "complete"
        assert m["counts"] == json.loads((single / stage / "manifest.json").read_text())["counts"]
    assert len(_by_id(_text(run_dir, "feedback"))) >= 4


def test_a_worker_that_dies_mid_chunk_loses_no_finished_chunk(local_ray, single, tmp_path):
    prompts = [json.loads(x) for x in _text(single, "prompts").splitlines()]
    chunks = [prompts[i:i + 2] for i in range(0, len(prompts), 2)]  # sl.chunk_size=2
    # A late chunk with a critique call to die in: others have finished by the time it starts.
    k = max(i for i, c in enumerate(chunks) if c[0]["kind"] == "red_team")
    assert k >= 2
    marker, log = tmp_path / "died", tmp_path / "chunks.log"
    factory = functools.partial(SeededLM, kill_on=chunks[k][0]["prompt"], kill_after=1, marker=str(marker),
                                log=str(log))
    run_dir = tmp_path / "ray"
    pipeline.run(_cfg(run_dir, "ray.enabled=true"), stop="sl_generate", lm_factory=factory)

    assert marker.exists(), "the worker was never killed"
    assert _text(run_dir, "sl_generate") == _text(single, "sl_generate")
    starts: dict[str, list[str]] = {}
    for line in log.read_text().splitlines():
        prompt, pid = line.split("\t")
        starts.setdefault(prompt, []).append(pid)
    # Every chunk ran once, except the one whose worker died: it ran again, in a new process.
    assert {p: len(v) for p, v in starts.items()} == {c[0]["prompt"]: 1 + (i == k) for i, c in enumerate(chunks)}
    assert len(set(starts[chunks[k][0]["prompt"]])) == 2


def test_a_chunk_that_always_kills_its_worker_fails_clearly_and_the_stage_resumes(local_ray, single, tmp_path):
    prompts = [json.loads(x) for x in _text(single, "prompts").splitlines()]
    red = [r for r in prompts if r["kind"] == "red_team"]  # pairs.kinds; pairs.chunk_size=2
    bad = red[-2:]
    cfg = _cfg(tmp_path / "ray", "ray.enabled=true", "ray.max_retries=1")
    pipeline.run(cfg, stop="prompts")
    with pytest.raises(ClusterError, match=rf"pairs chunk 4/4 \(first record {bad[0]['record_id']}\).*failed 2 time"):
        pipeline.run(cfg, start="pairs", stop="pairs", lm_factory=functools.partial(SeededLM, kill_on=bad[0]["prompt"]))

    cfg_dir = tmp_path / "ray"
    saved = _by_id(_text(cfg_dir, "pairs"))
    expected = _by_id(_text(single, "pairs"))
    assert json.loads((cfg_dir / "pairs" / "manifest.json").read_text())["status"] == "running"
    assert len(saved) >= 2 and not {r["record_id"] for r in bad} & set(saved)
    assert all(saved[rid] == expected[rid] for rid in saved)

    log = tmp_path / "chunks.log"
    pipeline.run(cfg, start="pairs", stop="pairs", lm_factory=functools.partial(SeededLM, log=str(log)))
    assert _text(cfg_dir, "pairs") == _text(single, "pairs")
    redone = [line.split("\t")[0] for line in log.read_text().splitlines()]
    assert bad[0]["prompt"] in redone and not {r["prompt"] for r in red if r["record_id"] in saved} & set(redone)


def test_an_error_raised_by_the_work_is_not_retried_and_keeps_its_type(local_ray, single, tmp_path):
    prompts = [json.loads(x) for x in _text(single, "prompts").splitlines()]
    cfg = _cfg(tmp_path / "ray", "ray.enabled=true")
    factory = functools.partial(SeededLM, budget_on=prompts[6]["prompt"])
    with pytest.raises(BudgetExhausted, match="budget"):
        pipeline.run(cfg, stop="sl_generate", lm_factory=factory)
    rows = tmp_path / "ray" / "sl_generate" / "rows.jsonl"
    saved = _by_id(rows.read_text()) if rows.exists() else {}
    assert prompts[6]["record_id"] not in saved
    assert all(r == _by_id(_text(single, "sl_generate"))[rid] for rid, r in saved.items())


def test_the_real_back_end_on_ray_matches_one_process_and_the_driver_loads_no_model(
        local_ray, tiny_model_dir, tmp_path, monkeypatch):
    extra = (f"model.name={tiny_model_dir}", "model.dtype=float32", "prompts.red_team=[{path: 'builtin:red_team', "
             "limit: 3}]", "sl.response.max_new_tokens=6", "sl.critique.max_new_tokens=6",
             "sl.revision.max_new_tokens=6")
    pipeline.run(_cfg(tmp_path / "one", *extra), stop="sl_generate")

    from cai.lm.hf import HFModel

    def no_model_here(*a, **k):
        raise AssertionError("the driver loaded a model")

    monkeypatch.setattr(HFModel, "from_config", no_model_here)  # the workers import their own copy
    pipeline.run(_cfg(tmp_path / "ray", *extra, "ray.enabled=true"), stop="sl_generate")
    assert _text(tmp_path / "ray", "sl_generate") == _text(tmp_path / "one", "sl_generate")


def test_ray_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    cfg = _cfg(tmp_path / "run", "ray.enabled=true")
    pipeline.run(cfg, stop="prompts")
    with pytest.raises(ClusterError, match=r"constitutional-ai\[ray\]"):
        pipeline.run(cfg, start="sl_generate", stop="sl_generate", lm_factory=SeededLM)
