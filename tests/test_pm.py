"""The preference model: learns a separable toy preference, reports held-out accuracy and calibration
for AI and human labels separately, saves a model that RewardModel scores the same way, reads the
score at the last real token, and resumes a stopped run to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai.config import PipelineConfig, PMConfig
from cai.reward import RewardModel, last_token_scores
from cai.rundir import StageError
from cai.stages import pm

TOPICS = ["gardens", "rivers", "trains", "violins", "glaciers", "bakeries", "comets", "lanterns", "beetles", "harbors",
          "deserts", "kites", "museums", "orchards", "tides", "volcanoes", "wolves", "castles", "bridges", "clocks"]


def toy_rows(n: int = 40, eval_every: int = 5) -> list[dict]:
    """Chosen answers are polite, rejected ones rude, on the same topic; every second row is a hard
    human label, the others soft AI labels; every `eval_every`-th row is held out."""
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        human = i % 2 == 1
        rows.append({
            "record_id": f"r{i}", "prompt": [{"role": "user", "content": f"Tell me something about {t}."}],
            "chosen": [{"role": "assistant", "content": f"Gladly: {t} are interesting, kindly explained."}],
            "rejected": [{"role": "assistant", "content": f"Whatever: {t} are boring, go away now."}],
            "p_chosen": 1.0 if human else 0.85, "label_source": "human" if human else "ai",
            "split": "eval" if i % eval_every == 0 else "train",
        })
    return rows


def cfg_for(model: str, run_dir: Path, **pm_kw) -> PipelineConfig:
    kw = {"learning_rate": 5e-3, "epochs": 2.0, "batch_size": 8, "warmup_ratio": 0.0, "bf16": False, **pm_kw}
    return PipelineConfig(run_dir=str(run_dir), pm=PMConfig(model=model, **kw))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pm-run")
    rows = toy_rows()
    stage = pm.run(cfg_for(tiny_model_dir, run_dir), rows, "rows-fp")
    return stage, rows


def test_pm_learns_a_separable_preference_and_reports_each_label_source(trained):
    stage, rows = trained
    m = stage.manifest()
    assert m["status"] == "complete"
    n_eval = sum(r["split"] == "eval" for r in rows)
    assert m["counts"]["train_rows"] == len(rows) - n_eval and m["counts"]["eval_rows"] == n_eval
    assert m["counts"]["eval_rows_ai"] + m["counts"]["eval_rows_human"] == n_eval
    report = json.loads((stage.dir / "eval.json").read_text())
    assert report == m["eval"]
    assert report["overall"]["accuracy"] >= 0.9
    for group in ("ai", "human"):
        assert report[group]["n"] == m["counts"][f"eval_rows_{group}"] > 0
        assert set(report[group]) >= {"accuracy", "ece", "loss", "margin"}
    # Hard human labels push the loss lower than soft AI labels at the same margin.
    assert report["human"]["loss"] < report["ai"]["loss"]
    losses = [json.loads(ln)["loss"] for ln in (stage.dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == m["counts"]["steps"] and losses[-1] < losses[0]
    assert not (stage.dir / "checkpoints").exists()


def test_saved_model_is_a_standard_safetensors_model_scored_like_in_training(trained):
    from transformers import AutoModelForSequenceClassification

    stage, rows = trained
    model_dir = stage.dir / "model"
    assert (model_dir / "model.safetensors").exists() and not list(model_dir.glob("*.bin"))
    plain_hf = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert plain_hf.config.num_labels == 1 and plain_hf.config.pad_token_id is not None

    rm = RewardModel.from_dir(str(model_dir), device="cpu", dtype="float32")
    held = [r for r in rows if r["split"] == "eval"]
    prompts = [r["prompt"] for r in held]
    good = rm.score(prompts, [r["chosen"][0]["content"] for r in held], batch_size=3)
    bad = rm.score(prompts, [r["rejected"][0]["content"] for r in held], batch_size=5)
    margins = torch.tensor(good, dtype=torch.float64) - torch.tensor(bad, dtype=torch.float64)
    report = stage.manifest()["eval"]
    acc = float(((margins > 0).double() + 0.5 * (margins == 0).double()).mean())
    assert acc == pytest.approx(report["overall"]["accuracy"])
    assert float(margins.mean()) == pytest.approx(report["overall"]["margin"], rel=1e-3, abs=1e-4)
    # Unseen prompts: the learned preference carries over.
    new = [[{"role": "user", "content": "Tell me something about lighthouses."}]]
    assert rm.score(new, ["Gladly: lighthouses are interesting, kindly explained."])[0] > \
        rm.score(new, ["Whatever: lighthouses are boring, go away now."])[0]


def test_score_is_read_at_the_last_real_token_whatever_the_padding(trained):
    from cai.batches import encode_pair, pad_batch

    stage, rows = trained
    rm = RewardModel.from_dir(str(stage.dir / "model"), device="cpu", dtype="float32")
    prompt = rows[0]["prompt"]
    short, long = "Gladly.", "Gladly: " + "a fine and kindly explained answer " * 6
    alone = rm.score([prompt], [short])[0]
    batched = rm.score([prompt, prompt], [long, short])
    assert batched[1] == pytest.approx(alone, abs=1e-4)
    # By hand: the head on the hidden state of the final token (the end-of-turn token, which is
    # also the pad token) of the unpadded sequence.
    ids, _ = encode_pair(rm.tokenizer, prompt, short, 512)
    assert ids[-1] == rm.tokenizer.pad_token_id
    with torch.no_grad():
        h = rm.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        by_hand = float(rm.model.score(h))
        left = pad_batch([ids, encode_pair(rm.tokenizer, prompt, long, 512)[0]], rm.tokenizer.pad_token_id, left=True)
        left_scores = last_token_scores(rm.model, left["input_ids"], left["attention_mask"])
    assert alone == pytest.approx(by_hand, abs=1e-4)
    assert float(left_scores[0]) == pytest.approx(by_hand, abs=1e-4)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rm.score([prompt, prompt], [short])


def test_run_skips_when_complete(trained, tiny_model_dir):
    stage, rows = trained
    before = (stage.dir / "model" / "model.safetensors").stat().st_mtime_ns
    again = pm.run(cfg_for(tiny_model_dir, stage.dir.parent), rows, "rows-fp")
    assert (again.dir / "model" / "model.safetensors").stat().st_mtime_ns == before


class Stop(Exception):
    pass


def test_a_stopped_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    rows = toy_rows(20)
    cfg = PMConfig(model=tiny_model_dir, learning_rate=5e-3, epochs=1.0, batch_size=4, grad_accum=1,
                   save_steps=2, warmup_ratio=0.25, bf16=True)
    full = pm.train(rows, cfg, tmp_path / "full", seed=3)
    assert full["steps"] == 4 and full["resumed_from"] is None

    def stop_at_3(step, metrics):
        if step == 3:
            raise Stop  # after the step-2 checkpoint; step 3's update is lost and redone

    with pytest.raises(Stop):
        pm.train(rows, cfg, tmp_path / "cut", seed=3, on_step=stop_at_3)
    assert (tmp_path / "cut" / "checkpoints" / "step-2").exists()
    resumed = pm.train(rows, cfg, tmp_path / "cut", seed=3)
    assert resumed["resumed_from"] and resumed["resumed_from"].endswith("step-2")
    assert [r["loss"] for r in resumed["log"]] == [r["loss"] for r in full["log"]]
    assert [r["step"] for r in resumed["log"]] == [1, 2, 3, 4]
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["eval"] == full["eval"]


def test_missing_label_kinds_are_null_and_no_training_rows_is_an_error(tiny_model_dir, tmp_path):
    rows = [r for r in toy_rows(12, eval_every=3) if r["label_source"] == "ai" or r["split"] == "train"]
    res = pm.train(rows, PMConfig(model=tiny_model_dir, max_steps=1, batch_size=4, bf16=False), tmp_path / "a")
    assert res["eval"]["human"] is None and res["eval"]["ai"]["n"] == res["eval"]["overall"]["n"] > 0
    no_eval = pm.train([r for r in rows if r["split"] == "train"],
                       PMConfig(model=tiny_model_dir, max_steps=1, batch_size=4, bf16=False), tmp_path / "b")
    assert no_eval["eval"] == {"overall": None, "ai": None, "human": None}
    only_eval = [r for r in toy_rows(6) if r["split"] == "eval"]
    with pytest.raises(StageError, match="split 'train'"):
        pm.run(cfg_for(tiny_model_dir, tmp_path / "run"), only_eval, "fp")
    abstained = [{**r, "split": "train", "status": "abstain"} for r in toy_rows(4)]
    with pytest.raises(StageError, match="usable for training"):
        pm.train(abstained, PMConfig(model=tiny_model_dir), tmp_path / "c")
