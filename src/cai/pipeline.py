"""The pipeline: an ordered list of stages and a for-loop over them.

    cai run configs/quickstart.yaml                     # everything
    cai run configs/quickstart.yaml --from sft          # only the fine-tune, from saved rows
    cai run configs/quickstart.yaml --to sl_export      # stop before training
    cai run configs/quickstart.yaml --from pairs        # RL-CAI on a finished SL-CAI run
    cai run configs/quickstart.yaml rl.method=dpo       # DPO instead of preference model + PPO
    cai run configs/quickstart.yaml --from evaluate     # only the evaluation (eval.enabled: true)

Each stage reads an earlier stage's rows from the run directory (`INPUTS`) and is fingerprinted
with their content hash, followed by the fingerprints of the trained models it builds on, so
changing an upstream input is noticed downstream. `_run_stage` calls each stage with what it
reads and, for a generating stage, its model; the generating stages hold one back-end at a time
(`Models`), and it is freed before any other stage runs. When the stages are done (or one fails),
the run report is written to `RUN/report.html` (cai/report/); a report that cannot be written is
a logged warning, never a failed run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cai import constitution as constitution_mod
from cai.config import PipelineConfig, to_dict
from cai.constitution import Constitution
from cai.lm import LM, load_lm
from cai.rundir import Stage, atomic_write
from cai.stages import (
    dpo,
    evaluate,
    feedback,
    pairs,
    pm,
    ppo,
    preferences,
    prompts,
    redteam,
    sft,
    sl_export,
    sl_generate,
)

STAGES = ("prompts", "sl_generate", "sl_export", "sft", "pairs", "feedback", "preferences", "pm", "ppo", "dpo",
          "evaluate")
# A stage's folder in the run directory, where it is not the stage's name.
FOLDERS = {"evaluate": evaluate.FOLDER}
# Under `accelerate launch` these run on every process; the others on the main process only.
TRAINING = ("sft", "pm", "ppo", "dpo")
# Stages that only run under one RL method (`rl.method`); DPO needs no preference model.
ONLY_FOR = {"pm": "ppo", "ppo": "ppo", "dpo": "dpo"}
# Stages that generate with a back-end built here; any other stage runs with none held.
GENERATING = ("sl_generate", "pairs", "feedback", "evaluate")
# What each stage reads: the earlier stage whose rows are its input, then the trained models (stages
# of this run) it builds on, whose fingerprints join those rows' content hash in its inputs fingerprint.
INPUTS = {
    "sl_generate": ("prompts",), "sl_export": ("sl_generate",), "sft": ("sl_export",),
    "pairs": ("prompts",), "feedback": ("pairs",), "preferences": ("feedback",), "pm": ("preferences",),
    "ppo": ("prompts", "sft", "pm"), "dpo": ("preferences", "sft"),
}


log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    pass


def _inputs(cfg: PipelineConfig, rows_of: str, *models: str) -> tuple[list[dict[str, Any]], str]:
    """The rows of the finished stage `rows_of`, and the fingerprint a stage reading them is
    given: their content hash, then the fingerprint of each trained model (a stage of this run) it
    builds on, joined by ':'."""
    st = Stage.view(cfg.run_dir, rows_of)
    m = st.manifest()
    if not m or m.get("status") != "complete":
        raise PipelineError(f"stage '{rows_of}' has not completed in {cfg.run_dir}; run it first (drop --from)")
    return st.rows(), ":".join([st.content_hash(), *(_trained(cfg, name)[1] for name in models)])


def _trained(cfg: PipelineConfig, name: str) -> tuple[str, str]:
    """The model folder and fingerprint of a finished training stage of this run."""
    st = Stage.view(cfg.run_dir, name)
    m = st.manifest()
    model = st.dir / "model"
    if not m or m.get("status") != "complete" or not (model / "config.json").exists():
        raise PipelineError(f"stage '{name}' has no finished model in {cfg.run_dir}; run it first (drop --from)")
    return str(model), m["fingerprint"]


def policy_model(cfg: PipelineConfig, name: str) -> tuple[str, str]:
    """(model name or folder, fingerprint) for a stage's `model` setting: `sft` is this run's
    SL-CAI model; anything else is a model name used as it is."""
    return _trained(cfg, "sft") if name == "sft" else (name, name)


def judge_config(cfg: PipelineConfig) -> Any:
    """The model config of the feedback stage's judge, which every command that asks its questions
    uses: `cfg.model` under the name `feedback.model` (`sft`: this run's SL-CAI model)."""
    name, _ = policy_model(cfg, cfg.feedback.model)
    return dataclasses.replace(cfg.model, name=name)


def select(start: str | None, stop: str | None, method: str = "ppo", evaluate: bool = False) -> list[str]:
    """The stages from `start` to `stop` that run with `rl.method` = `method`; `evaluate` only when
    `eval.enabled` (`evaluate`)."""
    for s in (start, stop):
        if s is not None and s not in STAGES:
            raise PipelineError(f"unknown stage '{s}'; stages are: {', '.join(STAGES)}")
        if s is not None and ONLY_FOR.get(s, method) != method:
            raise PipelineError(f"stage '{s}' does not run with rl.method={method}")
        if s == "evaluate" and not evaluate:
            raise PipelineError("stage 'evaluate' runs with eval.enabled=true (or use `cai eval models CONFIG`)")
    i = STAGES.index(start) if start else 0
    j = STAGES.index(stop) if stop else len(STAGES) - 1
    if i > j:
        raise PipelineError(f"--from {start} comes after --to {stop}")
    return [s for s in STAGES[i : j + 1] if ONLY_FOR.get(s, method) == method and (s != "evaluate" or evaluate)]


class Models:
    """The generating stages' back-ends, one held at a time (the next model, or a training stage,
    may need the memory). `lm_factory`, when given, replaces every model (tests use a scripted one)."""

    def __init__(self, cfg: PipelineConfig, lm_factory: Callable[[], LM] | None):
        self.cfg, self.lm_factory = cfg, lm_factory
        self.held: dict[str, LM] = {}

    def factory(self, name: str) -> Callable[[], LM]:
        """A factory for the back-end over model `name`."""
        if self.cfg.ray.enabled:  # a picklable factory: each Ray worker builds its own; this process loads none
            return self.lm_factory or functools.partial(load_lm, dataclasses.replace(self.cfg.model, name=name))

        def make() -> LM:
            if name not in self.held:
                self.release()
                self.held[name] = self.lm_factory() if self.lm_factory else load_lm(
                    dataclasses.replace(self.cfg.model, name=name))
            return self.held[name]
        return make

    def release(self) -> None:
        """Drop the held back-end, so its memory can be reclaimed."""
        self.held.clear()


def _run_stage(name: str, cfg: PipelineConfig, models: Models, constitution: Constitution, allow_changed: bool,
               on_chunk: Callable[[int], None] | None) -> Stage:
    """Run stage `name` on its inputs (`INPUTS`) and, for a generating stage, its model."""
    if name == "prompts":
        return prompts.run(cfg, allow_changed)
    if name == "evaluate":
        return evaluate.run(cfg, models.factory, models.release, functools.partial(_trained, cfg), constitution,
                            allow_changed, on_chunk)
    rows, fp = _inputs(cfg, *INPUTS[name])
    if name == "sl_generate":
        return sl_generate.run(cfg, models.factory(cfg.model.name), constitution, rows, fp, allow_changed, on_chunk)
    if name == "sl_export":
        return sl_export.run(cfg, rows, fp, allow_changed)
    if name == "sft":
        return sft.run(cfg, rows, fp, allow_changed)
    if name == "pairs":
        model, model_fp = policy_model(cfg, cfg.pairs.model)
        return pairs.run(cfg, models.factory(model), rows, fp, model_fp, allow_changed)
    if name == "feedback":
        model, _ = policy_model(cfg, cfg.feedback.model)
        return feedback.run(cfg, models.factory(model), constitution, rows, fp, allow_changed)
    if name == "preferences":
        return preferences.run(cfg, rows, fp, allow_changed)
    if name == "pm":
        return pm.run(cfg, rows, fp, allow_changed)
    if name == "ppo":
        return ppo.run(cfg, rows, fp, _trained(cfg, "sft")[0], _trained(cfg, "pm")[0], allow_changed)
    if name == "dpo":
        return dpo.run(cfg, rows, fp, _trained(cfg, "sft")[0], allow_changed)
    raise PipelineError(f"unknown stage '{name}'")  # pragma: no cover - select() checks names


def run(cfg: PipelineConfig, start: str | None = None, stop: str | None = None, allow_changed: bool = False,
        lm_factory: Callable[[], LM] | None = None, on_chunk: Callable[[int], None] | None = None) -> dict[str, Stage]:
    """Run the selected stages in order; returns each stage's folder. `lm_factory`, when given,
    builds the model for every generating stage (tests use a scripted one); with `ray.enabled` it
    must pickle, since each Ray worker calls it."""
    names = select(start, stop, cfg.rl.method, cfg.eval.enabled)
    constitution = constitution_mod.load(cfg.constitution)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    constitution.save(run_dir / "constitution.yaml")
    models = Models(cfg, lm_factory)
    done: dict[str, Stage] = {}
    # Under `accelerate launch` (WORLD_SIZE > 1) every process runs this loop: training stages on
    # all of them, data stages on the main one while the others wait, then read its rows.
    barrier = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from cai.distributed import StageBarrier

        barrier = StageBarrier(cfg.model.device)
    main = barrier is None or barrier.is_main_process  # the only process that writes the report
    try:
        for name in names:
            if barrier is not None and name not in TRAINING and not barrier.is_main_process:
                barrier.wait()
                done[name] = Stage.view(cfg.run_dir, FOLDERS.get(name, name))
                continue
            if name not in GENERATING:
                models.release()  # one model at a time: a training stage loads its own
            done[name] = _run_stage(name, cfg, models, constitution, allow_changed, on_chunk)
            # The resolved config is saved once a stage has accepted it.
            atomic_write(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            if barrier is not None:
                barrier.wait()  # the stage's files are complete before any process reads them
    except Exception:
        if main:
            write_report(run_dir)  # a failed run's report shows where it stopped
        raise
    if main:
        write_report(run_dir)
    return done


def write_report(run_dir: str | Path) -> Path | None:
    """Write `run_dir/report.html` (cai/report/) and return its path; a failure to write it is
    logged as a warning and gives None, never an error: the report must not fail the run."""
    try:
        from cai.report import write_report as write

        return write(run_dir)
    except Exception as e:  # anything at all: a broken report is not a broken run
        log.warning("could not write the run report in %s: %s: %s", run_dir, type(e).__name__, e)
        return None


def evaluate_models(cfg: PipelineConfig, allow_changed: bool = False, lm_factory: Callable[[], LM] | None = None,
                    on_chunk: Callable[[int], None] | None = None) -> Stage:
    """The evaluate stage on its own (`cai eval models`), whether or not `eval.enabled` is set; the
    run report is rewritten after it."""
    constitution = constitution_mod.load(cfg.constitution)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    models = Models(cfg, lm_factory)
    try:
        stage = evaluate.run(cfg, models.factory, models.release, functools.partial(_trained, cfg), constitution,
                             allow_changed, on_chunk)
    except Exception:
        write_report(cfg.run_dir)
        raise
    write_report(cfg.run_dir)
    return stage


def generate_redteam(cfg: PipelineConfig, allow_changed: bool = False, lm_factory: Callable[[], LM] | None = None,
                     on_chunk: Callable[[int], None] | None = None) -> Stage:
    """`cai redteam generate`: red-team prompts written by `redteam.model` (default `model.name`) into
    `RUN/redteam/` (cai/stages/redteam.py); one back-end serves the candidates and the probes."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    models = Models(cfg, lm_factory)
    try:
        return redteam.run(cfg, models.factory(cfg.redteam.model or cfg.model.name), allow_changed, on_chunk)
    finally:
        models.release()
