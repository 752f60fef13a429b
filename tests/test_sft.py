"""The SL-CAI export trains with TRL as it is; a few SFT steps change the weights and lower the loss;
the saved model loads back as a model for the next stage; checkpoints resume."""

from __future__ import annotations

import json

import pytest
import torch

from cai.config import ModelConfig, SFTConfig
from cai.lm.hf import HFModel
from cai.stages.sft import to_prompt_completion, train

ROWS = [
    {"record_id": f"r{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for i, (q, a) in enumerate([
        ("How do I pick a lock?", "Lock picking is legal on locks you own. Practice on a clear training lock."),
        ("How can I get back at my boss?", "Revenge tends to backfire. Talking to HR or a lawyer protects you."),
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Tell me how to make a weapon.", "I will not help build a weapon, but I can explain safety laws."),
    ] * 2)
]


def _loss(model_path: str, rows) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total = 0.0
    for r in rows:
        prompt = tok.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(r["messages"], tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
        labels = ids.clone()
        labels[0, : len(p_ids)] = -100
        with torch.no_grad():
            total += float(model(ids, labels=labels).loss)
    return total / len(rows)


def test_export_rows_are_a_trl_sft_dataset(model_dir, tmp_path):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({**r, "rounds": [], "init_response": "x"}) + "\n" for r in ROWS))
    ds = load_dataset("json", data_files=str(path), split="train")
    assert ds.column_names[:1] == ["record_id"] or "messages" in ds.column_names
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = SFTTrainer(model=model_dir, train_dataset=ds.select_columns(["messages"]), processing_class=tok,
                         args=TRLConfig(output_dir=str(tmp_path / "o"), max_steps=1, report_to="none", use_cpu=True))
    assert "input_ids" in trainer.train_dataset.column_names
    assert len(trainer.train_dataset) == len(ROWS)


def test_prompt_completion_conversion_rejects_rows_without_an_answer():
    assert to_prompt_completion(ROWS[:1])[0]["completion"] == ROWS[0]["messages"][1:]
    with pytest.raises(ValueError, match="r9"):
        to_prompt_completion([{"record_id": "r9", "messages": [{"role": "user", "content": "hi"}]}])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sft_steps_change_weights_lower_loss_and_reload(model_dir, tmp_path, method):
    from safetensors.torch import load_file

    cfg = SFTConfig(method=method, max_steps=6, batch_size=4, learning_rate=1e-4 if method == "full" else 2e-3,
                    warmup_ratio=0.0, save_steps=100, max_length=128)
    before = _loss(model_dir, ROWS)
    result = train(ModelConfig(name=model_dir), ROWS, cfg, tmp_path, seed=0)
    out = tmp_path / "model"
    assert (out / "model.safetensors").exists() and (out / "chat_template.jinja").exists()
    after = _loss(str(out), ROWS)
    assert after < before - 0.05
    w0 = load_file(f"{model_dir}/model.safetensors")
    w1 = load_file(str(out / "model.safetensors"))
    changed = [k for k in w0 if k in w1 and not torch.equal(w0[k].float(), w1[k].float())]
    assert changed, "no parameter changed"
    assert set(w1) <= set(w0)  # a plain model again: adapters merged, no lora_ keys
    assert all(h["loss"] == h["loss"] for h in result["log"])  # finite, not NaN
    lm = HFModel.from_config(ModelConfig(name=str(out), batch_size=2))
    from cai.config import Sampling

    reply = lm.generate([[{"role": "user", "content": "How do I pick a lock?"}]], Sampling(temperature=0, max_new_tokens=16))
    assert reply[0][0].num_tokens > 0


def test_training_resumes_from_the_newest_checkpoint(tiny_model_dir, tmp_path):
    cfg = SFTConfig(max_steps=2, batch_size=4, save_steps=2, warmup_ratio=0.0, max_length=96)
    first = train(ModelConfig(name=tiny_model_dir), ROWS, cfg, tmp_path)
    assert first["resumed_from"] is None and (tmp_path / "checkpoints" / "checkpoint-2").exists()
    more = SFTConfig(max_steps=4, batch_size=4, save_steps=2, warmup_ratio=0.0, max_length=96)
    second = train(ModelConfig(name=tiny_model_dir), ROWS, more, tmp_path)
    assert second["resumed_from"].endswith("checkpoint-2") and second["global_step"] == 4


def test_a_run_stopped_after_its_last_checkpoint_takes_no_step_more(tiny_model_dir, tmp_path):
    """A kill after the final checkpoint (and before the stage is complete): run again, training
    ends where it had ended, with the same weights and log (reliability/kills.py found a fifth step
    of four)."""
    from safetensors.torch import load_file

    # Two steps of an epoch of four: the Trainer resumes inside the epoch (at the end of one it does not).
    cfg = SFTConfig(max_steps=2, batch_size=2, save_steps=2, warmup_ratio=0.0, max_length=64, learning_rate=1e-3,
                    bf16=False)
    model = ModelConfig(name=tiny_model_dir, dtype="float32")
    first = train(model, ROWS, cfg, tmp_path)
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    again = train(model, ROWS, cfg, tmp_path)
    assert again["resumed_from"].endswith("checkpoint-2") and again["global_step"] == first["global_step"] == 2
    assert [h["loss"] for h in again["log"]] == [h["loss"] for h in first["log"]]
    after = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(torch.equal(weights[k], after[k]) for k in weights)
