"""The pipeline: an ordered list of stages and a for-loop over them.

    cai run configs/quickstart.yaml                     # everything
    cai run configs/quickstart.yaml --from sft          # only the fine-tune, from saved rows
    cai run configs/quickstart.yaml --to sl_export      # stop before training

Each stage reads the previous stage's rows from the run directory and is fingerprinted with their
content hash, so changing an upstream input is noticed downstream.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cai import constitution as constitution_mod
from cai.config import PipelineConfig, to_dict
from cai.lm.base import LM, load_lm
from cai.rundir import Stage, atomic_write

STAGES = ("prompts", "sl_generate", "sl_export", "sft")


class PipelineError(RuntimeError):
    pass


def _previous(cfg: PipelineConfig, name: str) -> tuple[list[dict[str, Any]], str]:
    """Rows and content hash of a finished earlier stage, read from the run directory."""
    st = Stage.view(cfg.run_dir, name)
    m = st.manifest()
    if not m or m.get("status") != "complete":
        raise PipelineError(f"stage '{name}' has not completed in {cfg.run_dir}; run it first (drop --from)")
    return st.rows(), st.content_hash()


def select(start: str | None, stop: str | None) -> list[str]:
    for s in (start, stop):
        if s is not None and s not in STAGES:
            raise PipelineError(f"unknown stage '{s}'; stages are: {', '.join(STAGES)}")
    i = STAGES.index(start) if start else 0
    j = STAGES.index(stop) if stop else len(STAGES) - 1
    if i > j:
        raise PipelineError(f"--from {start} comes after --to {stop}")
    return list(STAGES[i : j + 1])


def run(cfg: PipelineConfig, start: str | None = None, stop: str | None = None, allow_changed: bool = False,
        lm_factory: Callable[[], LM] | None = None, on_chunk: Callable[[int], None] | None = None) -> dict[str, Stage]:
    """Run the selected stages in order; returns each stage's folder."""
    from cai.stages import prompts, sft, sl_export, sl_generate

    names = select(start, stop)
    constitution = constitution_mod.load(cfg.constitution)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    constitution.save(run_dir / "constitution.yaml")
    lm_cache: list[LM] = []

    def get_lm() -> LM:
        if not lm_cache:
            lm_cache.append(lm_factory() if lm_factory else load_lm(cfg.model))
        return lm_cache[0]

    done: dict[str, Stage] = {}
    for name in names:
        if name == "prompts":
            done[name] = prompts.run(cfg, allow_changed)
        elif name == "sl_generate":
            rows, fp = _previous(cfg, "prompts")
            done[name] = sl_generate.run(cfg, get_lm, constitution, rows, fp, allow_changed, on_chunk)
        elif name == "sl_export":
            rows, fp = _previous(cfg, "sl_generate")
            done[name] = sl_export.run(cfg, rows, fp, allow_changed)
        elif name == "sft":
            lm_cache.clear()  # free the inference model before training
            rows, fp = _previous(cfg, "sl_export")
            done[name] = sft.run(cfg, rows, fp, allow_changed)
        # The resolved config is saved once a stage has accepted it.
        atomic_write(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return done
