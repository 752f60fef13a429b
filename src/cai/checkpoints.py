"""Checkpoints and logs of the training loops we own (preference model, DPO, PPO): checkpoints that
resume with the same data order and RNG state, the per-step metrics log, and the saved model.

`save_checkpoint` writes `step-<n>/` (weights as safetensors, optimiser and schedule state, RNG
state) and `resume` restores the newest one whose plan (a hash of config, seed and data) matches;
a stopped run so repeats the uninterrupted run's later steps. Under `accelerate launch` every
process calls these and only the main process writes (see distributed.py); sharded state (FSDP,
DeepSpeed) goes through accelerate's own save and load. `Progress` is what the preference model
and DPO write around their loops: per-step log and checkpoint, then the evaluation and the model.

    cai run configs/quickstart.yaml --from pm     # stopped and run again, it resumes from <run>/pm/checkpoints
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cai.distributed import barrier, main_process, sharded
from cai.rundir import write_json


def rng_state() -> dict[str, Any]:
    """The Python, torch and (where present) CUDA random states, as a checkpoint keeps them."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, modules: dict[str, Any], extra: dict[str, Any],
                    acc: Any | None = None) -> Path:
    """Write `step-<n>/` (module and optimiser state dicts, RNG state, `extra`) through a temporary
    folder renamed into place, then delete older checkpoints. Model weights go in safetensors.

    With `acc`, every process must call it: the main process writes (modules are unwrapped first),
    and where state is sharded (FSDP, DeepSpeed) the prepared models and optimisers go through
    `acc.save_state` (each process writes its shard) and only the other entries are written here."""
    from safetensors.torch import save_file

    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".step-{step}.tmp"
    main = main_process(acc)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(acc)
    split = acc is not None and sharded(acc)
    if split:
        acc.save_state(str(tmp / "accelerate"))
    if main:
        for name, obj in modules.items():
            if isinstance(obj, torch.nn.Module):
                if split:
                    continue
                obj = acc.unwrap_model(obj) if acc is not None else obj
                sd = {k: v.detach().contiguous().cpu() for k, v in _trained_state(obj).items()}
                save_file(_untie(sd), str(tmp / f"{name}.safetensors"))
            elif split and isinstance(obj, torch.optim.Optimizer):
                continue
            else:  # optimiser / scheduler state: plain tensors and numbers
                torch.save(obj.state_dict(), tmp / f"{name}.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in ckpt_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(acc)
    return final


def _trained_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a module: its whole state, or for a peft model (LoRA) only the
    trainable adapter weights: its base weights are frozen and are reloaded from the model directory."""
    if hasattr(module, "peft_config"):
        return {k: p for k, p in module.named_parameters() if p.requires_grad}
    return module.state_dict()


def _untie(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete `step-<n>` checkpoint in `ckpt_dir` (its state.json is written last), or None."""
    done = [p for p in ckpt_dir.glob("step-*") if (p / "state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def load_checkpoint(path: Path, modules: dict[str, Any], acc: Any | None = None) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into `modules` and the RNG; returns its state.json.
    Every process loads (with `acc`, into the unwrapped modules, or through `acc.load_state` where
    the checkpoint holds sharded state)."""
    from safetensors.torch import load_file

    split = (path / "accelerate").is_dir()
    if split:
        if acc is None:
            raise ValueError(f"{path}: a sharded (FSDP/DeepSpeed) checkpoint; resume it under the same accelerate launch")
        acc.load_state(str(path / "accelerate"))
    for name, obj in modules.items():
        if isinstance(obj, torch.nn.Module):
            if split:
                continue
            obj = acc.unwrap_model(obj) if acc is not None else obj
            # Tied weights are saved under both names (see _untie); strict loading catches a
            # checkpoint of another model or a prefix mismatch (a wrapper saved, a module loaded).
            sd = load_file(str(path / f"{name}.safetensors"))
            if hasattr(obj, "peft_config"):  # adapters only (see _trained_state), all of them
                expected = set(_trained_state(obj))
                if set(sd) != expected:
                    raise ValueError(f"{path / f'{name}.safetensors'}: its adapter weights do not match the model's "
                                     f"({len(set(sd) ^ expected)} names differ)")
                obj.load_state_dict(sd, strict=False)
            else:
                obj.load_state_dict(sd, strict=True)
        elif split and isinstance(obj, torch.optim.Optimizer):
            continue
        else:
            obj.load_state_dict(torch.load(path / f"{name}.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


def resume(ckpt_dir: Path, modules: dict[str, Any], plan: str, acc: Any | None = None) -> tuple[int, Path | None]:
    """Restore the newest checkpoint into `modules` if it was saved with `extra={"plan": plan}`
    (a hash of what fixes the step sequence: config, seed, data) and return (its step, its path).
    A checkpoint of another plan would continue a different schedule on different rows, so it is
    removed and the run starts afresh: (0, None). With `acc` every process must call it."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return 0, None
    same = json.loads((path / "state.json").read_text()).get("plan") == plan
    if not same:
        barrier(acc)  # every process has looked before the main one deletes
        if main_process(acc):
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        barrier(acc)
        return 0, None
    return int(load_checkpoint(path, modules, acc)["step"]), path


class MetricsLog:
    """Per-step metrics appended to `<stage>/metrics.jsonl`, and to TensorBoard / W&B / trackio
    when named in `report_to` (imported only then). With `main` False (a process other than the
    main one under `accelerate launch`) it writes nothing and reports to nothing."""

    def __init__(self, path: Path, report_to: Sequence[str] = (), run_name: str = "cai", config: Any = None,
                 main: bool = True):
        self.path = path
        self.main = main
        self.sinks: list[Any] = []
        for name in report_to if main else ():
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.sinks.append(("tensorboard", SummaryWriter(str(path.parent / "tensorboard"))))
            elif name == "wandb":
                import wandb

                self.sinks.append(("wandb", wandb.init(project="constitutional-ai", name=run_name, config=config)))
            elif name == "trackio":
                import trackio

                self.sinks.append(("trackio", trackio.init(project="constitutional-ai", name=run_name, config=config)))
            elif name != "none":
                raise ValueError(f"report_to: unknown tracker '{name}' (use tensorboard, wandb or trackio)")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so no step appears twice."""
        if not self.main or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                for k, v in metrics.items():
                    sink.add_scalar(k, float(v), step)
            else:
                sink.log({k: float(v) for k, v in metrics.items()}, step=step)

    def rows(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def close(self) -> None:
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                sink.close()
            elif kind == "wandb":
                sink.finish()


def save_model(model: Any, tokenizer: Any, out: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Save weights (safetensors) and tokenizer through a temporary folder renamed into place;
    `state_dict` (see `full_state_dict`) replaces the model's own where that is sharded. Called by
    the main process only."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


@dataclass
class Progress:
    """What a preference-trained loop (stages/pm.py, stages/dpo.py) writes in `out_dir` around its
    `steps` optimiser steps: the metrics `log`, a checkpoint of `modules` under `plan` every
    `save_steps` steps but the last (`checkpoints/`), and at the end the evaluation (`eval.json`)
    and the model (`model/`), which supersede the checkpoints once the stage is complete. With `acc`, every process calls each
    method except `save`, which only the main process calls."""

    out_dir: Path
    modules: dict[str, Any]
    plan: str
    log: MetricsLog
    save_steps: int
    steps: int
    acc: Any
    on_step: Callable[[int, dict[str, float]], None] | None = None
    start: int = 0
    resumed_from: Path | None = None

    def resume(self) -> int:
        """Restore the newest checkpoint of this plan (see `resume`), drop the log lines after it,
        and return the step to start from."""
        self.start, self.resumed_from = resume(self.out_dir / "checkpoints", self.modules, self.plan, self.acc)
        self.log.truncate_after(self.start)
        return self.start

    def step_done(self, step: int, metrics: dict[str, float], grad_norm: Any) -> None:
        """After optimiser step `step` (counted from 1): log `metrics` with the gradient norm,
        checkpoint when it is due, then call `on_step(step, metrics)`."""
        if grad_norm is not None:  # DeepSpeed clips inside its step and returns no norm here
            metrics["grad_norm"] = float(grad_norm)
        self.log.log(step, metrics)
        if step % self.save_steps == 0 and step < self.steps:
            save_checkpoint(self.out_dir / "checkpoints", step, self.modules, {"plan": self.plan}, self.acc)
        if self.on_step is not None:
            self.on_step(step, metrics)

    def save(self, model: Any, tokenizer: Any, report: dict[str, Any], state_dict: dict[str, Any] | None) -> None:
        """Write the evaluation and the model (see `save_model`). Called by the main process only.
        The checkpoints stay until the stage's manifest says complete (`run_training` with
        `drop_checkpoints`): a run killed between the two resumes from the last one, where
        removing them here made it train again from step 0 (reliability/kills.py)."""
        write_json(self.out_dir / "eval.json", report)
        save_model(model, tokenizer, self.out_dir / "model", state_dict)

    def result(self, report: dict[str, Any], train_rows: int, eval_rows: int) -> dict[str, Any]:
        """What the stage's `train` returns: steps, per-step log, evaluation, row counts, first and
        last loss, the checkpoint resumed from, and whether bf16 autocast was on."""
        rows = self.log.rows()
        losses = [r["loss"] for r in rows]
        return {"steps": self.steps, "log": rows, "eval": report, "train_rows": train_rows,
                "eval_rows": eval_rows, "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "bf16": self.acc.mixed_precision == "bf16"}


def finished(result: dict[str, Any], counts: dict[str, Any], model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The complete manifest of a stage trained with `Progress` (pm, dpo), as (counts, other
    fields) from what `Progress.result` returned: the row counts with the steps; the held-out
    evaluation, first and last loss, the saved model, the checkpoint resumed from, bf16."""
    return {**counts, "steps": result["steps"]}, {
        "eval": result["eval"], "first_loss": result["first_loss"], "last_loss": result["last_loss"],
        "model_dir": str(model_dir), "resumed_from": result["resumed_from"], "bf16": result["bf16"]}
