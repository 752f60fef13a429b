"""The pipeline's own rules: importing it (and so every stage) loads no heavy library, one
generating model is held at a time, and each stage is fingerprinted with its inputs' content hash
followed by the trained models it builds on."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

from cai import pipeline
from cai.config import load_config
from cai.lm.base import Completion
from cai.rundir import Stage
from cai.stages import dpo, ppo, preferences


def test_importing_the_pipeline_loads_no_heavy_library():
    code = ("import sys, cai.pipeline, cai.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'ray', 'vllm', 'trl', 'datasets', 'peft', "
            "'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class Sampler:
    """A scripted model whose pairs differ; every instance is tracked, to see which are alive."""

    name = "sampler"
    made: list[weakref.ref] = []
    alive_at_birth: list[int] = []

    def __init__(self):
        gc.collect()
        Sampler.alive_at_birth.append(sum(r() is not None for r in Sampler.made))
        Sampler.made.append(weakref.ref(self))

    def generate(self, conversations, sampling, n=1, seeds=None):
        return [[Completion(f"answer {s % 97} #{j}", "stop", 3) for j in range(n)] for s in seeds]

    def score_options(self, contexts, options):
        return [[-0.1, -3.0] for _ in options]


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "prompts.red_team=[{path: 'builtin:red_team', limit: 4}]",
                              "pairs.sampling.max_new_tokens=8", "feedback.few_shot=0",
                              "preferences.human_fraction=0", *extra])


def test_one_generating_model_is_held_at_a_time(tmp_path, monkeypatch):
    Sampler.made, Sampler.alive_at_birth = [], []
    alive_later = []
    real = preferences.run

    def preferences_run(*a, **k):
        gc.collect()
        alive_later.append(sum(r() is not None for r in Sampler.made))
        return real(*a, **k)

    monkeypatch.setattr(preferences, "run", preferences_run)
    cfg = _cfg(tmp_path, "pairs.model=policy", "feedback.model=judge")
    pipeline.run(cfg, stop="prompts")
    pipeline.run(cfg, start="pairs", stop="preferences", lm_factory=Sampler)
    # pairs and feedback use different models: the judge is built after the policy was let go
    assert Sampler.alive_at_birth == [0, 0] and alive_later == [0]

    Sampler.made, Sampler.alive_at_birth = [], []
    cfg = _cfg(tmp_path / "same", "pairs.model=judge", "feedback.model=judge")
    pipeline.run(cfg, stop="prompts")
    pipeline.run(cfg, start="pairs", stop="feedback", lm_factory=Sampler)
    assert Sampler.alive_at_birth == [0]  # one model for both stages, built once


def _finished(run_dir, name, fp, model=False):
    st = Stage(run_dir, name, fp, {})
    st.append([{"record_id": f"{name}-1", "kind": "red_team", "prompt": "p", "status": "ok"}])
    st.write_manifest("complete", {})
    if model:
        (st.dir / "model").mkdir()
        (st.dir / "model" / "config.json").write_text("{}")
    return st


def test_trained_models_join_the_inputs_fingerprint(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "run"
    for name in ("prompts", "preferences"):
        _finished(run_dir, name, f"fp-{name}")
    _finished(run_dir, "sft", "fp-sft", model=True)
    _finished(run_dir, "pm", "fp-pm", model=True)
    got = {}
    monkeypatch.setattr(ppo, "run", lambda cfg, rows, fp, policy, reward, allow: got.update(ppo=(fp, policy, reward)))
    monkeypatch.setattr(dpo, "run", lambda cfg, rows, fp, policy, allow: got.update(dpo=(fp, policy)))
    pipeline.run(cfg, start="ppo", stop="ppo")
    pipeline.run(load_config(None, [f"run_dir={run_dir}", "rl.method=dpo"]), start="dpo", stop="dpo")
    prompts_hash = Stage.view(run_dir, "prompts").content_hash()
    prefs_hash = Stage.view(run_dir, "preferences").content_hash()
    sft_dir, pm_dir = str(run_dir / "sft" / "model"), str(run_dir / "pm" / "model")
    assert got == {"ppo": (f"{prompts_hash}:fp-sft:fp-pm", sft_dir, pm_dir), "dpo": (f"{prefs_hash}:fp-sft", sft_dir)}


def test_the_judge_of_the_commands_is_the_feedback_model_and_sft_means_the_run_s_model(tmp_path):
    import pytest

    cfg = load_config("configs/quickstart.yaml", [f"run_dir={tmp_path}", "feedback.model=some/judge", "model.dtype=float32"])
    mc = pipeline.judge_config(cfg)
    assert mc.name == "some/judge" and mc.dtype == "float32" and mc.backend == cfg.model.backend
    sft_cfg = load_config("configs/quickstart.yaml", [f"run_dir={tmp_path}", "feedback.model=sft"])
    with pytest.raises(pipeline.PipelineError, match="stage 'sft' has no finished model"):
        pipeline.judge_config(sft_cfg)
    _finished(tmp_path, "sft", "fp-sft", model=True)
    assert pipeline.judge_config(sft_cfg).name == str(tmp_path / "sft" / "model")
