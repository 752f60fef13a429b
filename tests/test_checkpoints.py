"""Checkpoints and logs: `resume` continues only a checkpoint of the same plan, and `Progress` logs
every step, checkpoints every `save_steps` steps but the last, and calls back after the checkpoint."""

from __future__ import annotations

import torch

from cai.checkpoints import MetricsLog, Progress, resume, save_checkpoint
from cai.distributed import accelerator


def test_resume_continues_only_a_checkpoint_of_the_same_plan(tmp_path):
    torch.manual_seed(0)
    saved = torch.nn.Linear(3, 1)
    save_checkpoint(tmp_path / "ck", 5, {"model": saved}, {"plan": "a"})
    fresh = torch.nn.Linear(3, 1)
    step, path = resume(tmp_path / "ck", {"model": fresh}, "a")
    assert step == 5 and path.name == "step-5" and torch.equal(fresh.weight, saved.weight)
    other = torch.nn.Linear(3, 1)
    assert resume(tmp_path / "ck", {"model": other}, "b") == (0, None)
    assert not (tmp_path / "ck").exists() and not torch.equal(other.weight, saved.weight)
    assert resume(tmp_path / "ck", {"model": other}, "a") == (0, None)


def test_progress_logs_each_step_checkpoints_when_due_and_resumes_from_it(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    acc = accelerator(False, "cpu")  # one process: it writes
    seen: list[tuple[int, list[str]]] = []

    def on_step(step, metrics):  # called after the step's checkpoint
        seen.append((step, sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))))

    def progress(log_path):
        return Progress(tmp_path, {"model": model}, "plan-a", MetricsLog(log_path), save_steps=2, steps=5,
                        acc=acc, on_step=on_step)

    run = progress(tmp_path / "metrics.jsonl")
    assert run.resume() == 0 and run.resumed_from is None
    for step in range(1, 6):
        run.step_done(step, {"loss": float(10 - step)}, torch.tensor(0.5) if step != 3 else None)
    # A checkpoint at steps 2 and 4 (each replacing the one before), none at the last step.
    assert seen == [(1, []), (2, ["step-2"]), (3, ["step-2"]), (4, ["step-4"]), (5, ["step-4"])]
    rows = run.log.rows()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert "grad_norm" not in rows[2] and rows[0]["grad_norm"] == 0.5  # None: DeepSpeed gives no norm
    res = run.result({"overall": None}, train_rows=7, eval_rows=2)
    assert (res["steps"], res["first_loss"], res["last_loss"], res["resumed_from"], res["bf16"]) == (5, 9.0, 5.0,
                                                                                                   None, False)

    again = progress(tmp_path / "metrics.jsonl")
    assert again.resume() == 4 and again.resumed_from.name == "step-4"
    assert [r["step"] for r in again.log.rows()] == [1, 2, 3, 4]  # step 5 is logged again when redone
