"""DPO against the frozen SL-CAI model: a few steps move the policy-to-reference margin toward the
chosen answers, a soft 0.7 label pulls less hard than a hard one, the reference stays as it was,
the model is saved as safetensors, and a stopped run resumes to the same weights. With LoRA only the
adapters train, the reference is the model with them off, and the saved model is a merged plain one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from cai.batches import preference_pairs
from cai.config import DPOConfig, PipelineConfig, RLConfig
from cai.stages import dpo


def rows_for(n: int = 12, eval_every: int = 4, p: float = 0.9) -> list[dict]:
    rows = []
    for i in range(n):
        human = i % 2 == 1
        rows.append({
            "record_id": f"d{i}", "prompt": [{"role": "user", "content": f"Question number {i}: how are you?"}],
            "chosen": [{"role": "assistant", "content": "I am well, thank you for asking."}],
            "rejected": [{"role": "assistant", "content": "Leave me alone."}],
            "p_chosen": 1.0 if human else p, "label_source": "human" if human else "ai",
            "split": "eval" if i % eval_every == 0 else "train",
        })
    return rows


def _dir_hash(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _log_ratio_margin(model_dir: str, ref_dir: str, rows: list[dict]) -> float:
    """Mean (logp_pi(chosen) - logp_pi(rejected)) - (logp_ref(chosen) - logp_ref(rejected))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref_dir)
    pairs = preference_pairs(tok, rows, 256)
    out = []
    for d in (model_dir, ref_dir):
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            c, r = dpo.response_logps(m, pairs, tok.pad_token_id, "cpu")
        out.append(c - r)
    return float((out[0] - out[1]).mean())


def cfg(**kw) -> DPOConfig:
    base = {"beta": 0.1, "learning_rate": 2e-3, "batch_size": 4, "epochs": 2.0, "max_steps": 4,
            "warmup_ratio": 0.0, "bf16": False, "save_steps": 2}
    return DPOConfig(**{**base, **kw})


def test_dpo_steps_move_the_margin_toward_chosen_and_keep_the_reference(tiny_model_dir, tmp_path):
    rows = rows_for()
    before = _dir_hash(tiny_model_dir)
    pipe = PipelineConfig(run_dir=str(tmp_path / "run"), rl=RLConfig(method="dpo", dpo=cfg()))
    stage = dpo.run(pipe, rows, "rows-fp", tiny_model_dir)
    assert _dir_hash(tiny_model_dir) == before  # the reference model on disk is untouched

    m = stage.manifest()
    assert m["status"] == "complete" and m["counts"]["steps"] == 4
    assert m["counts"]["train_rows"] == sum(r["split"] == "train" for r in rows)
    log = [json.loads(ln) for ln in (stage.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"loss", "margin", "reward_accuracy", "chosen_reward", "rejected_reward"} <= set(log[0])
    # The first step is taken from the reference itself: zero implicit rewards, loss log 2 for p=1.
    assert abs(log[0]["chosen_reward"]) < 1e-5 and abs(log[0]["rejected_reward"]) < 1e-5
    assert log[-1]["margin"] > 0 and log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["chosen_reward"] > log[-1]["rejected_reward"]

    model_dir = stage.dir / "model"
    assert (model_dir / "model.safetensors").exists() and not list(model_dir.glob("*.bin"))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert _log_ratio_margin(str(model_dir), tiny_model_dir, train_rows) > 0
    report = json.loads((stage.dir / "eval.json").read_text())
    assert report == m["eval"] and report["overall"]["n"] == m["counts"]["eval_rows"]
    assert report["overall"]["margin"] > 0  # held-out prompts of the same form move too
    assert set(report) == {"overall", "ai", "human"}

    again = dpo.run(pipe, rows, "rows-fp", tiny_model_dir)  # complete: nothing redone
    assert json.loads((again.dir / "manifest.json").read_text())["updated"] == m["updated"]


def test_a_soft_label_pulls_less_hard_than_a_hard_one(tiny_model_dir):
    from cai.models import load_model

    model, tok = load_model(tiny_model_dir, "float32", "cpu")
    row = rows_for(1)[0]
    grads = {}
    for p, soft in [(0.7, True), (1.0, True), (0.7, False)]:
        pairs = preference_pairs(tok, [{**row, "p_chosen": p}], 256)
        with torch.no_grad():
            ref_c, ref_r = dpo.response_logps(model, pairs, tok.pad_token_id, "cpu")
        model.zero_grad()
        loss, stats = dpo.dpo_loss(model, pairs, ref_c, ref_r, 0.1, soft, tok.pad_token_id, "cpu")
        assert float(stats["margin"].abs().max()) < 1e-6  # policy == reference here
        loss.backward()
        grads[(p, soft)] = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])
    soft_norm, hard_norm = grads[(0.7, True)].norm(), grads[(1.0, True)].norm()
    # d loss / d margin = sigmoid(0) - p, so the whole gradient scales with p - 1/2.
    assert float(soft_norm / hard_norm) == pytest.approx((0.7 - 0.5) / (1.0 - 0.5), rel=1e-4)
    assert torch.allclose(grads[(0.7, True)], grads[(1.0, True)] * 0.4, atol=1e-7)
    # Without soft labels every pair is a hard label.
    assert torch.allclose(grads[(0.7, False)], grads[(1.0, True)])


class Stop(Exception):
    pass


def _full_and_stopped_then_resumed(rows, c, model_dir, tmp_path, stop_at, while_stopped=lambda: None):
    """An uninterrupted run in tmp_path/full, and one stopped at step `stop_at` then resumed in
    tmp_path/cut (`while_stopped` is called in between); their results."""
    full = dpo.train(rows, c, model_dir, tmp_path / "full", seed=1)

    def stop(step, metrics):
        if step == stop_at:
            raise Stop

    with pytest.raises(Stop):
        dpo.train(rows, c, model_dir, tmp_path / "cut", seed=1, on_step=stop)
    while_stopped()
    return full, dpo.train(rows, c, model_dir, tmp_path / "cut", seed=1)


def _assert_same_run(full, resumed, tmp_path):
    from safetensors.torch import load_file

    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in full["log"]]
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stopped_dpo_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    rows = rows_for(8, eval_every=8)
    c = cfg(batch_size=2, bf16=True, warmup_ratio=0.25)
    full, resumed = _full_and_stopped_then_resumed(rows, c, tiny_model_dir, tmp_path, stop_at=3)
    assert resumed["resumed_from"].endswith("step-2")
    _assert_same_run(full, resumed, tmp_path)


def _lora_cfg(**kw) -> DPOConfig:
    return cfg(method="lora", learning_rate=1e-2, lora_r=4, lora_alpha=8, **kw)


def test_lora_dpo_trains_only_the_adapters_and_saves_a_merged_model(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from cai.models import load_model

    seen = {}
    wrap = dpo.with_lora

    def keep(model, c):
        seen["model"] = wrapped = wrap(model, c)
        seen["base"] = {n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_" not in n}
        return wrapped

    def check(step, metrics):
        named = dict(seen["model"].named_parameters())
        assert all(named[n].grad is None and torch.equal(named[n], v) for n, v in seen["base"].items())
        adapters = [p for n, p in named.items() if "lora_" in n]
        assert adapters and all(p.requires_grad and p.grad is not None for p in adapters)

    monkeypatch.setattr(dpo, "with_lora", keep)
    rows = rows_for()
    out = dpo.train(rows, _lora_cfg(), tiny_model_dir, tmp_path / "dpo", on_step=check)
    log = out["log"]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # Fresh adapters are zero: the first step starts from the reference itself.
    assert abs(log[0]["chosen_reward"]) < 1e-6 and abs(log[0]["rejected_reward"]) < 1e-6
    assert log[-1]["margin"] > 0 and log[-1]["loss"] < log[0]["loss"]
    assert out["eval"]["overall"]["margin"] > 0

    model_dir = tmp_path / "dpo" / "model"
    weights = load_file(str(model_dir / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k or k.startswith("base_model") for k in weights)
    assert not (model_dir / "adapter_config.json").exists()
    train_rows = [r for r in rows if r["split"] == "train"]
    assert _log_ratio_margin(str(model_dir), tiny_model_dir, train_rows) > 0
    trained, tok = load_model(str(model_dir), "float32", "cpu")
    base, _ = load_model(tiny_model_dir, "float32", "cpu")
    assert type(trained) is type(base)
    ids = torch.tensor([tok("Question number 1: how are you?")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(trained(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)


def test_the_lora_reference_is_the_model_with_its_adapters_off(tiny_model_dir):
    from cai.distributed import accelerator
    from cai.models import load_model

    base, tok = load_model(tiny_model_dir, "float32", "cpu")
    pairs = preference_pairs(tok, rows_for(6), 256)
    with torch.no_grad():
        want_c, want_r = dpo.response_logps(base.eval(), pairs, tok.pad_token_id, "cpu")
    model = dpo.with_lora(load_model(tiny_model_dir, "float32", "cpu")[0], _lora_cfg()).eval()
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # adapters that change the output when on
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    acc = accelerator(False, "cpu")
    with model.disable_adapter():
        ref_c, ref_r = dpo.reference_logps(model, pairs, 4, tok.pad_token_id, acc)
    assert torch.allclose(ref_c, want_c, atol=1e-6, rtol=0) and torch.allclose(ref_r, want_r, atol=1e-6, rtol=0)
    on_c, _ = dpo.reference_logps(model, pairs, 4, tok.pad_token_id, acc)
    assert (on_c - want_c).abs().max() > 1e-3


def test_a_stopped_lora_dpo_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    rows = rows_for(8, eval_every=8)
    c = _lora_cfg(batch_size=2, save_steps=1, max_steps=3)

    def adapters_only():
        ckpt = load_file(str(tmp_path / "cut" / "checkpoints" / "step-1" / "model.safetensors"))
        assert ckpt and all("lora_" in k for k in ckpt)  # the adapters only, not the frozen base

    full, resumed = _full_and_stopped_then_resumed(rows, c, tiny_model_dir, tmp_path, stop_at=1,
                                                   while_stopped=adapters_only)
    assert resumed["resumed_from"].endswith("step-1")
    _assert_same_run(full, resumed, tmp_path)


def test_lora_rank_is_checked_when_lora_is_on(tmp_path):
    from cai.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("rl: {method: dpo, dpo: {method: lora, lora_r: 0}}\n")
    with pytest.raises(ConfigError, match="rl.dpo.lora_r"):
        load_config(path)
    assert load_config(path, ["rl.dpo.method=full"]).rl.dpo.lora_r == 0  # unused without LoRA
