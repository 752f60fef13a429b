"""Stage `sft`: fine-tune the model on the SL-CAI export with TRL's SFTTrainer (full or LoRA).

Rows are turned into TRL's conversational prompt/completion form, so the loss falls on the
assistant's answer only. Checkpoints go to `<run>/sft/checkpoints` and a stopped run resumes from
the newest one. The final model (LoRA adapters merged in) is saved as safetensors with its
tokenizer and chat template in `<run>/sft/model`, which loads like any model name.

Under `accelerate launch` (configs in `configs/accelerate/`) `sft.batch_size` stays the global batch:
each process takes batch_size / processes rows a step, and the loss is normalised by the token
count of the whole batch (transformers' `average_tokens_across_devices`), so a step is the one a
single process takes on the whole batch. Only the main process writes the model and the manifest.

    cai run configs/quickstart.yaml --from sft
    accelerate launch --config_file configs/accelerate/ddp.yaml -m cai.cli run configs/quickstart.yaml --from sft
    cai chat runs/quickstart/sft/model -p "How do I pick a lock?"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cai.config import ModelConfig, PipelineConfig, SFTConfig, fingerprint, plain
from cai.rundir import Stage
from cai.stages.trained import run_training

NAME = "sft"


def to_prompt_completion(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` rows -> TRL conversational prompt/completion rows (loss on the last assistant turn)."""
    out = []
    for r in rows:
        msgs = r["messages"]
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError(f"record {r.get('record_id')}: messages must end with an assistant turn")
        out.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return out


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    ckpts = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    # Trainer writes trainer_state.json last; a checkpoint without it was cut off mid-save.
    ckpts = [p for p in ckpts if (p / "trainer_state.json").exists()]
    return str(ckpts[-1]) if ckpts else None


def at_last_step(ckpt: str, cfg: SFTConfig) -> bool:
    """Whether a Trainer checkpoint was saved at the last step of the training `cfg` asks for: its
    `max_steps`, or (with max_steps -1) the checkpoint's own last step when it was taken with the
    same number of epochs. A run asked to go further than the checkpoint's is not at its end."""
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    if cfg.max_steps > 0:
        target = cfg.max_steps
    elif state.get("num_train_epochs") == cfg.epochs:
        target = state.get("max_steps", 0)
    else:
        return False
    return target > 0 and state.get("global_step", 0) >= target


def train(model_cfg: ModelConfig, rows: list[dict[str, Any]], cfg: SFTConfig, out_dir: Path, seed: int = 0,
          resume: bool = True) -> dict[str, Any]:
    """Train and save to `out_dir/model`; returns the training log (loss per logged step)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from cai.checkpoints import save_model
    from cai.distributed import distributed_state, per_process, process_device, sharded
    from cai.models import bf16_fast, load_model, pick_device

    state = distributed_state(model_cfg.device)
    per_device = per_process(cfg.batch_size, state, "sft.batch_size")
    # Train in fp32 weights with bf16 autocast where it helps; the back-end's dtype is for inference.
    model, tok = load_model(model_cfg.name, "float32", process_device(model_cfg.device), model_cfg.revision,
                            model_cfg.trust_remote_code, model_class=AutoModelForCausalLM)
    model.train()
    device = pick_device(model_cfg.device)
    use_bf16 = cfg.bf16 and bf16_fast(device)
    args = TRLConfig(
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type="cosine",
        max_length=cfg.max_length,
        bf16=use_bf16,
        use_cpu=device == "cpu",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=1,
        report_to=cfg.report_to or "none",
        seed=seed,
        data_seed=seed,
        completion_only_loss=True,
        dataloader_num_workers=0,
    )
    peft_config = None
    if cfg.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(to_prompt_completion(rows)),
                         processing_class=tok, peft_config=peft_config)
    split = sharded(trainer.accelerator)
    if split and cfg.method == "lora":
        raise ValueError("sft.method=lora under FSDP/DeepSpeed is not supported (merging the adapters needs the "
                         "whole weights); use configs/accelerate/ddp.yaml or sft.method=full")
    ckpt = latest_checkpoint(out_dir / "checkpoints") if resume else None
    if ckpt is not None and not split and at_last_step(ckpt, cfg):
        # Resumed at its last step, the Trainer takes one step more than max_steps (transformers 5.x;
        # found by reliability/kills.py): a run killed after its final checkpoint takes that
        # checkpoint's weights and log instead, as they were when the uninterrupted run ended.
        from transformers import TrainerState

        trainer._load_from_checkpoint(ckpt)
        trainer.state = TrainerState.load_from_json(str(Path(ckpt) / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=ckpt)
    # Where weights are sharded every process takes part in gathering them; the main one saves.
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if split else None
    if state.is_main_process:
        final = trainer.model
        if cfg.method == "lora":
            final = final.merge_and_unload()
        final = final.to(torch.float32)
        if state_dict is not None:
            state_dict = {k: v.float() for k, v in state_dict.items()}
        save_model(final, tok, out_dir / "model", state_dict)
    state.wait_for_everyone()
    return {"log": [h for h in trainer.state.log_history if "loss" in h], "resumed_from": ckpt,
            "global_step": trainer.state.global_step, "bf16": use_bf16}


def run(cfg: PipelineConfig, inputs: list[dict[str, Any]], inputs_fp: str, allow_changed: bool = False) -> Stage:
    settings = plain({"sft": cfg.sft, "model": cfg.model.name, "seed": cfg.seed, "inputs": inputs_fp})
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)

    def finish(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        (stage.dir / "train_log.json").write_text(json.dumps(result["log"], indent=1))
        losses = [h["loss"] for h in result["log"]]
        return {"train_rows": len(inputs), "steps": result["global_step"],
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}, {
            "model_dir": str(stage.dir / "model"), "resumed_from": result["resumed_from"], "bf16": result["bf16"]}

    return run_training(stage, cfg.model.device, {"train_rows": len(inputs)},
                        lambda: train(cfg.model, inputs, cfg.sft, stage.dir, seed=cfg.seed), finish)
