"""PPO (stage `ppo`) on a tiny random model against a known reward: shorter answers score higher.

A few steps raise the reward while the KL to the reference stays bounded, and a large KL
coefficient holds the policy closer; the adaptive coefficient moves the way the KL asks; a run
killed after a checkpoint resumes to the same metrics as an uninterrupted run; the saved policy
and value head load; `run` writes the manifest and skips a finished stage.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from cai.config import ModelConfig, PipelineConfig, PPOConfig, RLConfig, Sampling
from cai.stages import ppo

QUESTIONS = ["Hi", "Say something.", "What is 2+2?", "Tell me a story.", "Why?", "Name a color.",
             "Count to three.", "Bye"]
PROMPTS = [[{"role": "user", "content": q}] for q in QUESTIONS]
KEYS = {"step", "reward", "kl", "non_score_reward", "kl_coef", "entropy", "response_length", "truncated",
        "policy_loss", "value_loss", "clipfrac", "approx_kl", "value", "return", "lr", "rollout_s", "update_s"}
TIMES = {"rollout_s", "update_s"}
CFG = PPOConfig(steps=16, batch_size=8, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3, kl_coef=0.05,
                response=Sampling(temperature=1.0, top_p=1.0, max_new_tokens=16), max_length=128, save_steps=8,
                bf16=False)


def short_is_better(prompts, responses):
    return [-len(r) / 50 for r in responses]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small gain nothing from threads; on a shared machine threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ending_model(src: str, out, p_end: float = 0.06) -> str:
    """The tiny random model `src`, saved to `out` with an end-of-turn token it actually samples.

    A random model spreads its mass nearly evenly over 49k tokens, so it never ends an answer and a
    length reward would have nothing to learn from. Pointing the (tied) end-of-turn embedding along
    the mean final hidden state, scaled for a mean probability `p_end` per token, makes answers
    end at varied lengths.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.batches import pad_batch
    from cai.templating import encode_prompt

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    batch = pad_batch([encode_prompt(tok, p) for p in PROMPTS], tok.pad_token_id, left=True)
    with torch.no_grad():
        resp = ppo.generate(model, batch, 16, 1.0, 1.0, [tok.eos_token_id], tok.pad_token_id,
                            torch.Generator().manual_seed(0))
        full = {"input_ids": torch.cat([batch["input_ids"], resp], 1),
                "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(resp)], 1)}
        hidden = model(**full, output_hidden_states=True).hidden_states[-1][:, -resp.shape[1]:]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        emb = model.get_input_embeddings().weight
        direction = hidden.mean(0) / hidden.mean(0).norm()
        rest = torch.logsumexp(hidden @ emb.T, -1)  # the end-of-turn row's own share is negligible here
        lo, hi = 0.0, 50.0
        for _ in range(40):  # bisect for the scale
            mid = (lo + hi) / 2
            p = torch.sigmoid(mid * (hidden @ direction) - rest).mean()
            lo, hi = (mid, hi) if p < p_end else (lo, mid)
        emb[tok.eos_token_id] = lo * direction
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def policy_dir(tiny_model_dir, tmp_path_factory) -> str:
    return ending_model(tiny_model_dir, tmp_path_factory.mktemp("ppo-policy"))


@pytest.fixture(scope="module")
def learned(policy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo-run")
    return out, ppo.train(policy_dir, PROMPTS, short_is_better, CFG, out, seed=0, device="cpu")


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_ppo_raises_reward_with_bounded_kl(learned):
    _, result = learned
    rows = result["metrics"]
    assert [r["step"] for r in rows] == list(range(1, CFG.steps + 1))
    assert _mean(rows[-4:], "reward") > _mean(rows[:4], "reward") + 0.2
    assert _mean(rows[-4:], "response_length") < _mean(rows[:4], "response_length")
    assert rows[0]["kl"] == 0.0  # the first rollout comes from the reference weights themselves
    # Bounded: under one nat per token of the response budget, at every step.
    assert all(math.isfinite(r["kl"]) and r["kl"] < CFG.response.max_new_tokens for r in rows)
    assert all(r["kl_coef"] == CFG.kl_coef for r in rows)  # no kl_target: a fixed coefficient
    for r in rows:
        assert r["non_score_reward"] == pytest.approx(-r["kl_coef"] * r["kl"], rel=1e-5, abs=1e-7)
        assert 0.0 <= r["clipfrac"] <= 1.0 and 0.0 <= r["truncated"] <= 1.0
        assert 1.0 <= r["response_length"] <= CFG.response.max_new_tokens
        assert 0.0 < r["lr"] <= CFG.learning_rate


def test_metrics_file_has_the_documented_keys(learned):
    out, result = learned
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == CFG.steps
    for line in lines:
        row = json.loads(line)
        assert set(row) == KEYS
        assert all(math.isfinite(v) for v in row.values())
    assert [json.loads(ln) for ln in lines] == result["metrics"]


def test_saved_policy_and_value_head_load(learned, policy_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, result = learned
    assert result["model_dir"] == str(out / "model") and not result["stopped"]
    trained = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    changed = [n for (n, a), (_, b) in zip(trained.named_parameters(), start.named_parameters())
               if not torch.equal(a, b)]
    assert changed
    head = load_file(str(out / "value_head.safetensors"))
    assert head["weight"].shape == (1, trained.config.hidden_size) and head["weight"].abs().sum() > 0
    assert (out / "model" / "tokenizer_config.json").exists()


def test_large_kl_coefficient_keeps_the_policy_closer(learned, policy_dir, tmp_path):
    _, loose = learned
    tight = ppo.train(policy_dir, PROMPTS, short_is_better, dataclasses.replace(CFG, kl_coef=1.0), tmp_path,
                      seed=0, device="cpu")
    assert _mean(tight["metrics"][-4:], "kl") < 0.5 * _mean(loose["metrics"][-4:], "kl")


def test_adaptive_kl_coefficient_moves_toward_its_target(policy_dir, tmp_path):
    # A target below any KL the updates will reach: the coefficient grows at every step whose KL
    # is above it and shrinks at the first (a rollout from the reference weights has KL 0).
    cfg = dataclasses.replace(CFG, steps=4, kl_target=1e-3, kl_horizon=CFG.batch_size)
    rows = ppo.train(policy_dir, PROMPTS, short_is_better, cfg, tmp_path, seed=0, device="cpu")["metrics"]
    assert rows[0]["kl_coef"] == CFG.kl_coef
    for prev, nxt in zip(rows, rows[1:]):
        moved = nxt["kl_coef"] - prev["kl_coef"]
        assert moved != 0 and (moved > 0) == (prev["kl"] > cfg.kl_target)
    assert rows[-1]["kl_coef"] > rows[1]["kl_coef"]


def test_kill_and_resume_repeats_the_uninterrupted_run(policy_dir, tmp_path):
    cfg = dataclasses.replace(CFG, steps=4, save_steps=2)
    whole = ppo.train(policy_dir, PROMPTS, short_is_better, cfg, tmp_path / "whole", seed=3, device="cpu")
    cut = ppo.train(policy_dir, PROMPTS, short_is_better, cfg, tmp_path / "cut", seed=3, device="cpu", stop_after=3)
    assert cut["stopped"] and cut["model_dir"] is None and len(cut["metrics"]) == 3
    resumed = ppo.train(policy_dir, PROMPTS, short_is_better, cfg, tmp_path / "cut", seed=3, device="cpu")
    assert resumed["resumed_from"].endswith("step-2")
    assert [r["step"] for r in resumed["metrics"]] == [1, 2, 3, 4]  # step 3 was redone, not logged twice
    for a, b in zip(whole["metrics"], resumed["metrics"]):
        assert a.keys() == b.keys()
        for k in a.keys() - TIMES:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (a["step"], k)


def test_run_writes_the_manifest_and_skips_a_finished_stage(policy_dir, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # An untrained one-output preference model, loaded back by `cai.reward.RewardModel`.
    pm_dir = tmp_path / "pm"
    pm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    pm.config.pad_token_id = pm.config.eos_token_id
    pm.save_pretrained(pm_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(pm_dir)

    cfg = PipelineConfig(run_dir=str(tmp_path / "run"), model=ModelConfig(device="cpu"),
                         rl=RLConfig(ppo=dataclasses.replace(CFG, steps=2, batch_size=4, save_steps=1)))
    rows = [{"record_id": f"p{i}", "kind": "red_team", "prompt": q} for i, q in enumerate(QUESTIONS)]
    stage = ppo.run(cfg, rows, "fp-1", policy_dir, str(pm_dir))
    m = stage.manifest()
    assert m["status"] == "complete" and m["counts"]["steps"] == 2 and m["counts"]["prompts"] == len(rows)
    assert m["counts"]["first_reward"] == json.loads((stage.dir / "metrics.jsonl").read_text().splitlines()[0])["reward"]
    assert math.isfinite(m["counts"]["last_kl"])
    assert (stage.dir / "model" / "config.json").exists() and not (stage.dir / "checkpoints").exists()
    weights = stage.dir / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    ppo.run(cfg, rows, "fp-1", policy_dir, str(pm_dir))
    assert weights.stat().st_mtime_ns == before  # finished: not trained again


def test_bad_reward_function_is_a_clear_error(policy_dir, tmp_path):
    with pytest.raises(ValueError, match="finite scores"):
        ppo.train(policy_dir, PROMPTS, lambda p, r: [float("nan")] * len(r), dataclasses.replace(CFG, steps=1),
                  tmp_path, device="cpu")


def test_missing_eos_penalty_lowers_the_return_of_truncated_answers(policy_dir, tmp_path):
    one = dataclasses.replace(CFG, steps=1)
    plain = ppo.train(policy_dir, PROMPTS, short_is_better, one, tmp_path / "a", device="cpu")["metrics"][0]
    fined = ppo.train(policy_dir, PROMPTS, short_is_better, dataclasses.replace(one, missing_eos_penalty=1.0),
                      tmp_path / "b", device="cpu")["metrics"][0]
    assert 0 < plain["truncated"] < 1 and fined["truncated"] == plain["truncated"]  # the same rollout
    assert fined["reward"] == plain["reward"]  # the logged reward is the preference score itself
    assert fined["return"] < plain["return"]
