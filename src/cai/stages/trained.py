"""The run of a training stage (`sft`, `pm`, `ppo`, `dpo`), written once: what `run_chunks` is to
the data stages.

A training stage whose folder finished under the same fingerprint and holds its saved model is not
trained again. Otherwise the main process writes a `running` manifest, every process trains (under
`accelerate launch` all of them take part in each step), and the main process, the only one that
writes, records the result in the `complete` manifest. The training loops themselves stay in their
stage files; resuming a stopped run is theirs too (checkpoints).

    cai run configs/quickstart.yaml --from sft --to sft
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any, TypeVar

from cai.rundir import Stage

R = TypeVar("R")


def model_saved(stage: Stage) -> bool:
    """Whether the stage finished under its fingerprint with its model saved in `model/`."""
    return stage.complete() and (stage.dir / "model" / "config.json").exists()


def run_training(stage: Stage, device: str, running: dict[str, Any], train: Callable[[], R],
                 finish: Callable[[R], tuple[dict[str, Any], dict[str, Any]]], drop_checkpoints: bool = False) -> Stage:
    """Train once: `running` are the counts of the running manifest, `train()` trains (in every
    process) and `finish(result)`, called on the main process only, writes what the stage keeps
    beside its model and returns the complete manifest's (counts, other fields). With
    `drop_checkpoints` the stage's `checkpoints/` folder is removed once the manifest says complete
    (not before: a run killed in between must still find them)."""
    if model_saved(stage):
        return stage
    from cai.distributed import distributed_state

    main = distributed_state(device).is_main_process  # the only process that writes
    if main:
        stage.write_manifest("running", running)
    result = train()
    if main:
        counts, extra = finish(result)
        stage.write_manifest("complete", counts, **extra)
        if drop_checkpoints:
            shutil.rmtree(stage.dir / "checkpoints", ignore_errors=True)
    return stage
