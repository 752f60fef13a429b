"""Every command the README shows exists, the quickstart script runs end to end (tiny here, whole
under `-m slow`), and CI runs the README's test command."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_quickstart_is_two_self_contained_commands_and_ci_runs_the_second():
    quick = README.split("## Quickstart", 1)[1]
    first_block = re.search(r"```bash\n(.*?)```", quick, flags=re.S).group(1)
    cmds = [ln.split("#")[0].strip() for ln in first_block.splitlines() if ln.strip()]
    assert cmds == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for script in ("quickstart.sh", "test.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "scripts/setup.sh" in text  # each one installs what it needs
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "torch==2.13.0" in setup and "pip install" in setup


def test_every_cai_command_in_the_readme_parses():
    cai_lines = [ln for ln in _commands() if ln.startswith("cai ")]
    assert len(cai_lines) >= 8
    parser = build_parser()
    for line in cai_lines:
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit as e:  # argparse exits on an unknown command or flag
            pytest.fail(f"README command does not parse: {line} ({e})")


def test_every_accelerate_launch_in_the_readme_names_a_shipped_config_and_a_valid_cai_command():
    launches = [ln for ln in _commands() if ln.startswith("accelerate launch")]
    assert launches
    parser = build_parser()
    for line in launches:
        args = shlex.split(line)
        assert (ROOT / args[args.index("--config_file") + 1]).is_file(), line
        rest = args[args.index("cai.cli") + 1:]
        parser.parse_args(rest)
        assert (ROOT / rest[1]).is_file(), line


def _cai_run_lines() -> list[list[str]]:
    """The argument lists of every `cai run` in the README, also those inside `accelerate launch`."""
    out = []
    for line in _commands():
        args = shlex.split(line)
        if args[:2] == ["cai", "run"]:
            out.append(args[1:])
        elif args[:2] == ["accelerate", "launch"] and "cai.cli" in args:
            out.append(args[args.index("cai.cli") + 1:])
    return out


def test_every_cai_run_in_the_readme_loads_its_config_and_names_real_stages(monkeypatch):
    # Through the config loader, not just argparse: a renamed or mistyped key fails here.
    from cai.cli import parse_args, run_config
    from cai.pipeline import select

    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository
    runs = _cai_run_lines()
    assert len(runs) >= 9
    for argv in runs:
        args = parse_args(argv)
        cfg = run_config(args)
        assert select(args.start, args.stop, cfg.rl.method), argv


def test_a_mistyped_key_in_a_cai_run_line_would_fail_that_check(monkeypatch):
    from cai.cli import parse_args, run_config
    from cai.config import ConfigError

    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="unknown key 'round'"):
        run_config(parse_args(["run", "configs/quickstart.yaml", "sl.round=2", "--to", "sl_export"]))


def test_every_python_bench_line_names_a_script_and_its_flags():
    lines = [shlex.split(ln) for ln in _commands() if ln.startswith(("python bench/", "python reliability/"))]
    assert len(lines) >= 3
    for args in lines:
        assert (ROOT / args[1]).is_file(), args
    # every script's --help at once (each imports torch and the project: seconds apiece)
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / name), "--help"], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in dict.fromkeys(args[1] for args in lines)}
    helps: dict[str, str] = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-2000:])
        helps[name] = out
    for args in lines:
        for flag in (a.split("=")[0] for a in args[2:] if a.startswith("--")):
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,=\]]|$)", helps[args[1]], re.M), (args, flag)


def test_readme_model_commands_name_real_config_keys():
    # chat, serve and eval take their settings as config overrides: a renamed key must fail here.
    from cai.cli import split_overrides
    from cai.config import load_config

    lines = [ln for ln in _commands() if ln.startswith(("cai chat", "cai serve", "cai eval"))]
    assert any("=" in ln for ln in lines)
    for line in lines:
        load_config(None, split_overrides(shlex.split(line)[1:])[1])


def test_readme_constitution_commands_run(capsys):
    assert main(["constitution", "validate", "default"]) == 0
    assert main(["constitution", "show", "default"]) == 0
    out = capsys.readouterr().out
    assert "harm-general" in out or "[harm]" in out


def test_readme_python_snippet_names_real_columns():
    from cai.stages.sl_export import COLUMNS

    for col in re.findall(r'ds\[0\]\["(\w+)"\]', README):
        assert col in COLUMNS


def _quickstart(tmp_path, model_dir, *extra, size="full") -> subprocess.CompletedProcess:
    args = [f"run_dir={tmp_path / 'qs'}", f"model.name={model_dir}", *extra]
    env = {**os.environ, "CAI_QUICKSTART_SIZE": size}
    return subprocess.run(["bash", "scripts/quickstart.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600, env=env)


def test_quickstart_size_is_checked_before_anything_runs(tmp_path, model_dir):
    proc = _quickstart(tmp_path, model_dir, size="small")
    assert proc.returncode == 2
    assert "CAI_QUICKSTART_SIZE=small: expected auto, full or reduced" in proc.stderr
    assert not (tmp_path / "qs").exists()


def test_quickstart_reduced_size_is_said_and_your_arguments_win(tmp_path, model_dir):
    proc = _quickstart(tmp_path, model_dir, "sl.rounds=3", "--to", "prompts", size="reduced")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runs at a reduced size: prompts.red_team.0.limit=24 sl.rounds=2" in proc.stdout
    assert "CAI_QUICKSTART_SIZE=full" in proc.stdout  # how to run the full size
    cfg = yaml.safe_load((tmp_path / "qs" / "config.yaml").read_text())
    assert cfg["prompts"]["red_team"][0]["limit"] == 24
    assert cfg["rl"]["ppo"]["steps"] == 4
    assert cfg["eval"]["models"] == ["base", "rl_cai"]
    assert cfg["sl"]["rounds"] == 3  # given after the reduction, so it wins
    assert "== prompts: complete" in proc.stdout  # `--to` reached cai run, and cai show found the run


@pytest.mark.slow  # 3.6 min on an AVX2-only 2-core CPU; the script's own logic is checked above in seconds
def test_quickstart_script_runs_end_to_end_small(tmp_path, model_dir):
    proc = _quickstart(tmp_path, model_dir, "prompts.red_team.0.limit=3", "sl.helpful_fraction=0.5", "sl.rounds=1",
                       "sl.few_shot=1", "sl.response.max_new_tokens=160", "sl.critique.max_new_tokens=48",
                       "sl.revision.max_new_tokens=160", "sft.max_steps=2", "sft.batch_size=2",
                       "pairs.sampling.max_new_tokens=16", "feedback.few_shot=1", "pm.max_steps=2", "pm.batch_size=2",
                       "rl.ppo.steps=2", "rl.ppo.batch_size=2", "rl.ppo.mini_batch_size=2",
                       "rl.ppo.response.max_new_tokens=8", "eval.per_category=null", "eval.red_team.0.limit=3",
                       "eval.helpful.0.limit=2",
                       "eval.sampling.max_new_tokens=8", "eval.bootstrap=100")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("sft", "pm", "ppo"):
        assert (tmp_path / "qs" / stage / "model" / "model.safetensors").exists()
    for stage in ("sl_generate", "pairs", "feedback", "preferences", "pm", "ppo", "evaluate"):
        assert f"== {stage}: complete" in proc.stdout
    # the evaluation of base, SL-CAI and RL-CAI models, printed by `cai show`
    summary = json.loads((tmp_path / "qs" / "eval" / "summary.json").read_text())
    assert summary["models"] == ["base", "sl_cai", "rl_cai"]
    assert summary["ratings"]["harmless"]["judgements"] == 3 * 3  # 3 pairs of models x 3 red-team prompts
    assert summary["preference_model"]["revision_curve"][0]["round"] == 0
    assert "harmlessness Elo" in proc.stdout and "judge card" in proc.stdout


@pytest.mark.slow
def test_quickstart_script_whole(tmp_path, model_dir):
    proc = _quickstart(tmp_path, model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("sft", "pm", "ppo"):
        assert (tmp_path / "qs" / stage / "model" / "model.safetensors").exists()
