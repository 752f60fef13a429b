"""The pipeline: an ordered list of stages and a for-loop over them.

    cai run configs/quickstart.yaml                     # everything
    cai run configs/quickstart.yaml --from sft          # only the fine-tune, from saved rows
    cai run configs/quickstart.yaml --to sl_export      # stop before training
    cai run configs/quickstart.yaml --from pairs        # RL-CAI on a finished SL-CAI run
    cai run configs/quickstart.yaml rl.method=dpo       # DPO instead of preference model + PPO

Each stage reads the previous stage's rows from the run directory and is fingerprinted with their
content hash, so changing an upstream input is noticed downstream.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cai import constitution as constitution_mod
from cai.config import PipelineConfig, to_dict
from cai.lm import load_lm
from cai.lm.base import LM
from cai.rundir import Stage, atomic_write

STAGES = ("prompts", "sl_generate", "sl_export", "sft", "pairs", "feedback", "preferences", "pm", "ppo", "dpo")
# Under `accelerate launch` these run on every process; the others on the main process only.
TRAINING = ("sft", "pm", "ppo", "dpo")
# Stages that only run under one RL method (`rl.method`); DPO needs no preference model.
ONLY_FOR = {"pm": "ppo", "ppo": "ppo", "dpo": "dpo"}


class PipelineError(RuntimeError):
    pass


def _previous(cfg: PipelineConfig, name: str) -> tuple[list[dict[str, Any]], str]:
    """Rows and content hash of a finished earlier stage, read from the run directory."""
    st = Stage.view(cfg.run_dir, name)
    m = st.manifest()
    if not m or m.get("status") != "complete":
        raise PipelineError(f"stage '{name}' has not completed in {cfg.run_dir}; run it first (drop --from)")
    return st.rows(), st.content_hash()


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


def select(start: str | None, stop: str | None, method: str = "ppo") -> list[str]:
    for s in (start, stop):
        if s is not None and s not in STAGES:
            raise PipelineError(f"unknown stage '{s}'; stages are: {', '.join(STAGES)}")
        if s is not None and ONLY_FOR.get(s, method) != method:
            raise PipelineError(f"stage '{s}' does not run with rl.method={method}")
    i = STAGES.index(start) if start else 0
    j = STAGES.index(stop) if stop else len(STAGES) - 1
    if i > j:
        raise PipelineError(f"--from {start} comes after --to {stop}")
    return [s for s in STAGES[i : j + 1] if ONLY_FOR.get(s, method) == method]


def run(cfg: PipelineConfig, start: str | None = None, stop: str | None = None, allow_changed: bool = False,
        lm_factory: Callable[[], LM] | None = None, on_chunk: Callable[[int], None] | None = None) -> dict[str, Stage]:
    """Run the selected stages in order; returns each stage's folder. `lm_factory`, when given,
    builds the model for every generating stage (tests use a scripted one); with `ray.enabled` it
    must pickle, since each Ray worker calls it."""
    names = select(start, stop, cfg.rl.method)
    constitution = constitution_mod.load(cfg.constitution)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    constitution.save(run_dir / "constitution.yaml")
    held: dict[str, LM] = {}

    def lm_for(name: str) -> Callable[[], LM]:
        """A factory for the back-end over model `name`; one model is held at a time."""
        if cfg.ray.enabled:  # a picklable factory: each Ray worker builds its own; this process loads none
            return lm_factory or functools.partial(load_lm, dataclasses.replace(cfg.model, name=name))

        def make() -> LM:
            if name not in held:
                held.clear()
                held[name] = lm_factory() if lm_factory else load_lm(dataclasses.replace(cfg.model, name=name))
            return held[name]
        return make

    done: dict[str, Stage] = {}
    # Under `accelerate launch` (WORLD_SIZE > 1) every process runs this loop: training stages on
    # all of them, data stages on the main one while the others wait, then read its rows.
    barrier = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from cai.distributed import StageBarrier

        barrier = StageBarrier(cfg.model.device)
    for name in names:
        if barrier is not None and name not in TRAINING and not barrier.is_main_process:
            barrier.wait()
            done[name] = Stage.view(cfg.run_dir, name)
            continue
        stage = importlib.import_module(f"cai.stages.{name}")  # late: training stages import torch
        if name == "prompts":
            done[name] = stage.run(cfg, allow_changed)
        elif name == "sl_generate":
            rows, fp = _previous(cfg, "prompts")
            done[name] = stage.run(cfg, lm_for(cfg.model.name), constitution, rows, fp, allow_changed, on_chunk)
        elif name == "sl_export":
            rows, fp = _previous(cfg, "sl_generate")
            done[name] = stage.run(cfg, rows, fp, allow_changed)
        elif name == "sft":
            held.clear()  # free the inference model before training
            rows, fp = _previous(cfg, "sl_export")
            done[name] = stage.run(cfg, rows, fp, allow_changed)
        elif name == "pairs":
            rows, fp = _previous(cfg, "prompts")
            model, model_fp = policy_model(cfg, cfg.pairs.model)
            done[name] = stage.run(cfg, lm_for(model), rows, fp, model_fp, allow_changed)
        elif name == "feedback":
            rows, fp = _previous(cfg, "pairs")
            model, _ = policy_model(cfg, cfg.feedback.model)
            done[name] = stage.run(cfg, lm_for(model), constitution, rows, fp, allow_changed)
        elif name == "preferences":
            rows, fp = _previous(cfg, "feedback")
            done[name] = stage.run(cfg, rows, fp, allow_changed)
        elif name == "pm":
            held.clear()
            rows, fp = _previous(cfg, "preferences")
            done[name] = stage.run(cfg, rows, fp, allow_changed)
        elif name == "ppo":
            held.clear()
            rows, fp = _previous(cfg, "prompts")
            policy, policy_fp = policy_model(cfg, "sft")
            reward, reward_fp = _trained(cfg, "pm")
            done[name] = stage.run(cfg, rows, f"{fp}:{policy_fp}:{reward_fp}", policy, reward, allow_changed)
        elif name == "dpo":
            held.clear()
            rows, fp = _previous(cfg, "preferences")
            policy, policy_fp = policy_model(cfg, "sft")
            done[name] = stage.run(cfg, rows, f"{fp}:{policy_fp}", policy, allow_changed)
        # The resolved config is saved once a stage has accepted it.
        atomic_write(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if barrier is not None:
            barrier.wait()  # the stage's files are complete before any process reads them
    return done
