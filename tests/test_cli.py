"""The `cai` command as a user runs it: clear errors with exit code 2, `show`, `chat`, and the config form
(`-c CONFIG` and key=value overrides) of every command that uses a model."""

from __future__ import annotations

from cai import pipeline
from cai.cli import main
from cai.config import load_config


def test_unknown_config_key_is_a_clear_error(capsys, tmp_path):
    assert main(["run", f"run_dir={tmp_path}", "sl.round=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'round'" in err and "rounds" in err


def test_missing_config_file(capsys):
    assert main(["run", "no/such/config.yaml"]) == 2
    assert "no/such/config.yaml" in capsys.readouterr().err


def test_from_a_stage_whose_input_is_missing(capsys, tmp_path):
    assert main(["run", f"run_dir={tmp_path / 'r'}", "--from", "sft"]) == 2
    assert "sl_export" in capsys.readouterr().err


def test_unknown_stage(capsys, tmp_path):
    assert main(["run", f"run_dir={tmp_path}", "--to", "rlhf"]) == 2
    assert "sl_generate" in capsys.readouterr().err


def test_show_prints_stages_counts_and_samples(capsys, tmp_path, scripted):
    cfg = load_config(None, [f"run_dir={tmp_path / 'r'}", "prompts.red_team.0.limit=3", "sl.rounds=2"])
    pipeline.run(cfg, stop="sl_export", lm_factory=lambda: scripted())
    assert main(["show", str(tmp_path / "r"), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    for stage in ("prompts", "sl_generate", "sl_export"):
        assert f"== {stage}: complete" in out
    assert "round 2 (" in out and "critique:" in out
    assert main(["show", str(tmp_path / "nothing")]) == 2


def test_chat_answers_one_prompt(capsys, model_dir):
    assert main(["chat", model_dir, "-p", "What is the capital of France?", "--temperature", "0",
                 "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_model_fetch_names_the_embedded_models(capsys):
    assert main(["model", "fetch", "gpt-17"]) == 2
    assert "smollm2-135m" in capsys.readouterr().err


def test_nothing_left_to_train_on_is_a_stage_error_not_a_crash(tmp_path, scripted):
    import pytest

    from cai.lm.base import Completion
    from cai.rundir import StageError

    cfg = load_config(None, [f"run_dir={tmp_path / 'r'}", "prompts.red_team.0.limit=2", "sl.rounds=1"])
    cut = scripted(lambda conv, seed: Completion("cut off mid", "length", 128))
    with pytest.raises(StageError, match="truncated"):
        pipeline.run(cfg, stop="sl_export", lm_factory=lambda: cut)


def test_overrides_may_follow_the_flags(tmp_path):
    assert main(["run", f"run_dir={tmp_path / 'r'}", "--to", "prompts", "prompts.red_team.0.limit=2",
                 "prompts.helpful.0.limit=1"]) == 0
    from cai.rundir import Stage

    assert Stage.view(tmp_path / "r", "prompts").manifest()["counts"]["red_team"] == 2


def test_overrides_and_paths_mix_a_word_with_equals_that_is_a_path_stays_positional(tmp_path):
    from cai.cli import split_overrides

    odd = tmp_path / "a=b.jsonl"
    odd.write_text("")
    assert split_overrides(["x.jsonl", "seed=3", str(odd), "model.dtype=float32", "y.jsonl"]) == (
        ["x.jsonl", str(odd), "y.jsonl"], ["seed=3", "model.dtype=float32"])


def test_run_takes_one_config(capsys, tmp_path):
    assert main(["run", "configs/quickstart.yaml", "configs/one_gpu.yaml", f"run_dir={tmp_path}"]) == 2
    assert "one_gpu.yaml" in capsys.readouterr().err


def test_chat_takes_the_model_config_and_its_overrides(monkeypatch, capsys, tmp_path, scripted):
    import cai.lm

    seen = []
    lm = scripted(lambda conv, seed: "hello")
    monkeypatch.setattr(cai.lm, "load_lm", lambda cfg: seen.append(cfg) or lm)
    config = tmp_path / "c.yaml"
    config.write_text("seed: 11\nmodel:\n  dtype: float32\n")
    assert main(["chat", "my-model", "-c", str(config), "model.backend=openai", "-p", "hi",
                 "model.openai.base_url=http://127.0.0.1:9/v1"]) == 0
    assert capsys.readouterr().out.strip() == "hello"
    [cfg] = seen
    assert (cfg.name, cfg.backend, cfg.dtype, cfg.openai.base_url) == ("my-model", "openai", "float32",
                                                                      "http://127.0.0.1:9/v1")
    assert lm.calls[0][3] == [11]  # the config's seed
    assert main(["chat", "my-model", "model.dtyp=float32", "-p", "hi"]) == 2
    assert "unknown key 'dtyp'" in capsys.readouterr().err


def test_serve_takes_model_keys_and_refuses_another_backend(monkeypatch, capsys):
    import cai.serve

    calls = []
    monkeypatch.setattr(cai.serve, "serve", lambda *a, **k: calls.append((a, k)))
    assert main(["serve", "some/dir", "model.backend=openai"]) == 2
    assert "model.backend" in capsys.readouterr().err and not calls
    assert main(["serve", "some/dir", "--port", "0", "model.dtype=float32", "model.batch_size=4",
                 "model.max_length=512", "model.device=cpu"]) == 0
    [(a, k)] = calls
    assert a == ("some/dir", "127.0.0.1", 0, "float32", "cpu", 4, None) and k["max_length"] == 512
