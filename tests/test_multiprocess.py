"""Training on many processes: `accelerate launch` with the shipped configs/accelerate/ddp.yaml and two
CPU processes (gloo) runs the pipeline (`cai run`: SFT, preference model, PPO, then DPO), and every
training stage's per-step losses and metrics match a single process on the same global batches. The
data stages run once, on the main process, and give the single process's rows; only the main
process writes. The DeepSpeed and FSDP configs go through accelerate's own launcher code and build
their plugins (neither can run here: no GPU, no deepspeed; accelerate runs FSDP on GPUs only).

The launch runs this file as a script (`worker` below), both pipeline commands in one launch, since
starting the processes is most of the cost.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
DATA_STAGES = ("prompts", "sl_generate", "sl_export", "pairs", "feedback", "preferences")
TRAINING_STAGES = ("sft", "pm", "ppo", "dpo")
# Seconds per step, not results: they differ between any two runs.
TIMES = {"rollout_s", "update_s", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
# fp32 throughout. Two processes sum the same terms in another order (each its share, then the
# gradient all-reduce) and pad their micro-batches to other widths, so results agree to float32
# rounding (~1e-7 relative per operation), which a few optimiser steps carry along but do not
# amplify much (Adam normalises the update). 1e-4 relative is far above that and far below any
# real difference: a process training on the wrong rows, or a loss normalised by the local instead
# of the global token count, moves these figures by percents. DPO's implicit rewards are beta times
# differences of summed log-probabilities (~1e2 in float32, rounding ~1e-5), so near zero they agree
# to ~1e-6 in absolute terms, not relative ones.
REL, ABS = 1e-4, 1e-5
# At DPO's first step the policy is the reference: every margin is float noise around 0, so the
# share with a positive margin (ties half) is noise too, whatever the processes.
NOISE = {("dpo", 0, "reward_accuracy")}


def pipeline_config(run_dir: Path, model: str) -> dict:
    """A whole pipeline on the tiny random model, each stage a few steps; every global batch splits
    evenly over two processes. PM and DPO accumulate two micro-batches per step, PPO takes two
    mini-batches per batch over two epochs, and PPO and DPO checkpoint mid-run."""
    return {
        "run_dir": str(run_dir), "seed": 3,
        "model": {"name": model, "device": "cpu", "dtype": "float32", "batch_size": 8},
        "prompts": {"red_team": [{"path": "builtin:red_team", "limit": 12}],
                    "helpful": [{"path": "builtin:helpful", "limit": 6}]},
        # Enough prompts, with room for their answers to end (the model ends a turn at 0.3 a token), that
        # SFT's 3 steps of 4 rows fit in the export's first epoch: see the check in `runs`.
        "sl": {"rounds": 1, "few_shot": 1, "response": {"max_new_tokens": 32}, "critique": {"max_new_tokens": 8},
               "revision": {"max_new_tokens": 32}, "helpful_fraction": 0.5},
        "sft": {"batch_size": 4, "max_steps": 3, "learning_rate": 1e-3, "warmup_ratio": 0.0, "bf16": False,
                "save_steps": 100},
        "pairs": {"model": model, "sampling": {"max_new_tokens": 8}},
        "feedback": {"model": model, "few_shot": 1, "min_option_mass": 0.0},
        "preferences": {"human_fraction": 0.5, "eval_fraction": 0.25},
        "pm": {"model": model, "batch_size": 2, "grad_accum": 2, "max_steps": 3, "learning_rate": 1e-3,
               "warmup_ratio": 0.0, "bf16": False},
        "rl": {"ppo": {"steps": 3, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "learning_rate": 1e-3,
                       "response": {"max_new_tokens": 8}, "max_length": 256, "save_steps": 2, "bf16": False},
               "dpo": {"batch_size": 2, "grad_accum": 2, "max_steps": 3, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                       "save_steps": 2, "bf16": False}},
    }


def run_pipeline(cfg_path: str, count_to: Path) -> None:
    """What the launch runs in every process, and the test in one: `cai run` with PPO, then DPO.
    Writes to `count_to` how many sequences went through a forward pass with gradients (the
    training passes) in this process."""
    import torch

    from cai.cli import main

    rows = [0]

    def count(module: torch.nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, torch.nn.Embedding) and torch.is_grad_enabled() and args:
            rows[0] += args[0].shape[0]

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        for argv in (["run", cfg_path], ["run", cfg_path, "rl.method=dpo", "--from", "dpo"]):
            code = main(argv)
            if code != 0:
                raise SystemExit(f"cai {' '.join(argv)} exited with {code}")
    finally:
        hook.remove()
    count_to.write_text(str(rows[0]))


def _launch(script_args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch",
           "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), __file__, *script_args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=ABS)


def _mismatches(name: str, one: list[dict], two: list[dict]) -> list[str]:
    if len(one) != len(two):
        return [f"{name}: {len(one)} logged steps with one process, {len(two)} with two"]
    out = []
    for k, (a, b) in enumerate(zip(one, two)):
        if set(a) != set(b):
            out.append(f"{name} row {k}: keys {sorted(set(a) ^ set(b))} differ")
        out += [f"{name} row {k} {key}: {a[key]!r} vs {b[key]!r}" for key in sorted(set(a) & set(b) - TIMES)
                if isinstance(a[key], (int, float)) and (name, k, key) not in NOISE
                and not _close(float(a[key]), float(b[key]))]
    return out


def _metrics(run_dir: Path, stage: str) -> list[dict]:
    if stage == "sft":
        return [h for h in json.loads((run_dir / "sft" / "train_log.json").read_text())]
    return [json.loads(ln) for ln in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same pipeline config run by one process (here) and by two (`accelerate launch`)."""
    import torch
    from test_ppo import ending_model

    tmp = tmp_path_factory.mktemp("mp")
    # The tiny random model with an end-of-turn token it samples often, so its answers end within
    # the few tokens allowed and the SL-CAI export has rows to fine-tune on.
    model = ending_model(tiny_model_dir, tmp / "model", p_end=0.3)
    out: dict = {}
    for n in (2, 1):
        run_dir = tmp / f"run{n}"
        cfg_path = tmp / f"config{n}.yaml"
        cfg_path.write_text(yaml.safe_dump(pipeline_config(run_dir, model)))
        if n == 2:
            proc = _launch([str(cfg_path), str(tmp / "rows-rank{rank}")], tmp)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as each launched process runs
            try:
                run_pipeline(str(cfg_path), tmp / "rows-one")
            finally:
                torch.set_num_threads(threads)
        out[n] = run_dir
    out["trained_rows"] = {k: int((tmp / f"rows-{k}").read_text()) for k in ("one", "rank0", "rank1")}
    # At an epoch's end TRL's SFT loader gives one process a short batch where accelerate pads two
    # processes' batches (its even_batches): the runs match only if SFT never reaches a short batch.
    exported = json.loads((out[1] / "sl_export" / "manifest.json").read_text())["counts"]["exported"]
    assert exported >= 12 or exported % 4 == 0, f"the SL-CAI export has {exported} rows: SFT's 3 steps of 4 " \
                                                "would reach a short last batch"
    return out


def test_two_processes_train_like_one_on_the_same_global_batches(runs):
    problems = []
    for stage in TRAINING_STAGES:
        one, two = _metrics(runs[1], stage), _metrics(runs[2], stage)
        assert len(one) == 3, f"{stage}: expected 3 steps, got {len(one)}"
        problems += _mismatches(stage, one, two)
    for stage in ("pm", "dpo"):  # held-out evaluation, each process scoring its share
        a = json.loads((runs[1] / stage / "eval.json").read_text())
        b = json.loads((runs[2] / stage / "eval.json").read_text())
        problems += _mismatches(f"{stage} eval", [a["overall"]], [b["overall"]])
    assert not problems, "\n".join(problems)
    # Each process trained on half of every batch, not on all of it.
    counts = runs["trained_rows"]
    assert counts["one"] > 0 and counts["rank0"] == counts["rank1"] == counts["one"] // 2, counts


def test_data_stages_ran_once_on_the_main_process_with_the_single_process_rows(runs):
    for stage in DATA_STAGES:
        one = (runs[1] / stage / "rows.jsonl").read_text()
        two = (runs[2] / stage / "rows.jsonl").read_text()
        assert one and two == one, stage


def test_only_the_main_process_wrote_the_outputs(runs):
    from safetensors.torch import load_file

    for stage in TRAINING_STAGES:
        d = runs[2] / stage
        assert json.loads((d / "manifest.json").read_text())["status"] == "complete"
        assert (d / "model" / "model.safetensors").exists()
        assert not list(d.glob(".*tmp"))
        if stage != "sft":  # one line per step: a second writer would double them
            assert not (d / "checkpoints").exists()  # removed once the model is saved
            steps = [json.loads(ln)["step"] for ln in (d / "metrics.jsonl").read_text().splitlines()]
            assert steps == [1, 2, 3], stage
    # The saved models are the trained ones, equal to the single process's up to float rounding.
    for stage in TRAINING_STAGES:
        a = load_file(str(runs[1] / stage / "model" / "model.safetensors"))
        b = load_file(str(runs[2] / stage / "model" / "model.safetensors"))
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < 1e-4, (stage, worst)
    assert (runs[2] / "ppo" / "value_head.safetensors").exists()


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED"),
                                       ("fsdp", "FSDP")])
def test_shipped_accelerate_configs_validate_and_build_their_plugins(name, kind, monkeypatch):
    """What `accelerate launch --config_file <file>` does before starting processes: read the file,
    check it, turn it into the processes' environment; then the plugin each process would build."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE_CONFIGS / f"{name}.yaml"),
                                               "--num_processes", "2", "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert defaults.distributed_type == kind
    if kind == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for k in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if kind == "DEEPSPEED":
        ds = DeepSpeedPlugin().deepspeed_config
        assert ds["zero_optimization"]["stage"] == int(name[-1])
        assert ds["gradient_accumulation_steps"] == 1  # our loops' grad_accum handles accumulation
        # ZeRO-3 must gather the final weights for the main process to save them.
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (name == "zero3")
    elif kind == "FSDP":
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
        assert plugin.auto_wrap_policy is not None and not plugin.cpu_ram_efficient_loading


if __name__ == "__main__":  # under `accelerate launch`: every process runs the pipeline
    run_pipeline(sys.argv[1], Path(sys.argv[2].format(rank=os.environ["RANK"])))
