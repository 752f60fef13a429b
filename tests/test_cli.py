"""The `cai` command as a user runs it: clear errors with exit code 2, `show`, `chat`."""

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
