"""Tests for `cai.config`: defaults, YAML files, dotted overrides, schedules, errors, fingerprints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cai.config import (
    ConfigError,
    PipelineConfig,
    PMConfig,
    PromptSource,
    Sampling,
    SLConfig,
    fingerprint,
    load_config,
    plain,
    to_dict,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _write(tmp_path: Path, data: object, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


# ---- defaults and files --------------------------------------------------------------------


def test_defaults_build_and_match_dataclass_defaults():
    cfg = load_config(None)
    assert isinstance(cfg, PipelineConfig)
    assert cfg == PipelineConfig()
    assert isinstance(cfg.sl.revision, Sampling)
    assert [s.path for s in cfg.prompts.red_team] == ["builtin:red_team"]


def test_yaml_file_values_are_loaded(tmp_path):
    p = _write(tmp_path, {
        "run_dir": "runs/x",
        "seed": 7,
        "model": {"batch_size": 4, "dtype": "float32"},
        "prompts": {"red_team": [{"path": "a.jsonl", "limit": 5}, {"path": "b.jsonl", "field": "q"}]},
        "sl": {"rounds": 2, "helpful_fraction": 0.25},
    })
    cfg = load_config(p)
    assert cfg.run_dir == "runs/x"
    assert cfg.seed == 7
    assert cfg.model.batch_size == 4 and cfg.model.dtype == "float32"
    assert cfg.prompts.red_team == [PromptSource("a.jsonl", limit=5), PromptSource("b.jsonl", field="q")]
    # sections the file leaves out keep their defaults
    assert cfg.prompts.helpful == PipelineConfig().prompts.helpful
    assert cfg.sft == PipelineConfig().sft
    assert cfg.sl.rounds == 2 and cfg.sl.helpful_fraction == 0.25


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing here\n")) == PipelineConfig()


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    cfg = load_config(_write(tmp_path, {"sft": {"epochs": 2}}))
    assert cfg.sft.epochs == 2.0 and isinstance(cfg.sft.epochs, float)


# ---- overrides ------------------------------------------------------------------------------


def test_scalar_override_on_defaults():
    cfg = load_config(None, ["sl.rounds=2", "model.batch_size=8", "run_dir=runs/other"])
    assert cfg.sl.rounds == 2
    assert cfg.model.batch_size == 8
    assert cfg.run_dir == "runs/other"


def test_nested_override_sets_value():
    cfg = load_config(None, ["sl.critique.temperature=0.5"])
    assert cfg.sl.critique.temperature == 0.5
    cfg = load_config(None, ["sl.critique.temperature=0"])
    assert cfg.sl.critique.temperature == 0.0 and isinstance(cfg.sl.critique.temperature, float)


def test_exponent_without_a_dot_is_a_number_in_overrides_and_files(tmp_path):
    # YAML 1.1 reads 2e-5 as a string; the README's `pm.learning_rate=2e-5` must still work.
    cfg = load_config(None, ["pm.learning_rate=2e-5", "sft.learning_rate=3.5e-6"])
    assert (cfg.pm.learning_rate, cfg.sft.learning_rate) == (2e-5, 3.5e-6)
    assert isinstance(cfg.pm.learning_rate, float)
    cfg = load_config(_write(tmp_path, {"rl": {"dpo": {"learning_rate": "5e-7"}}}))
    assert cfg.rl.dpo.learning_rate == 5e-7
    with pytest.raises(ConfigError, match="expected a number, got 'fast'"):
        load_config(None, ["pm.learning_rate=fast"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["sl.rounds=1e3"])  # an int field does not take a float spelling


def test_nested_override_keeps_sibling_defaults():
    default = SLConfig().critique
    cfg = load_config(None, ["sl.critique.temperature=0"])
    assert cfg.sl.critique == dataclasses.replace(default, temperature=0.0)


def test_partial_yaml_section_keeps_field_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, {"sl": {"revision": {"top_p": 0.5}}}))
    assert cfg.sl.revision == dataclasses.replace(SLConfig().revision, top_p=0.5)


def test_override_list_index_in_file(tmp_path):
    p = _write(tmp_path, {"prompts": {"red_team": [{"path": "a.jsonl"}, {"path": "b.jsonl", "limit": 9}]}})
    cfg = load_config(p, ["prompts.red_team.0.limit=3"])
    assert cfg.prompts.red_team[0] == PromptSource("a.jsonl", limit=3)
    assert cfg.prompts.red_team[1] == PromptSource("b.jsonl", limit=9)


def test_override_list_index_on_shipped_config():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["prompts.red_team.0.limit=3"])
    assert cfg.prompts.red_team[0].limit == 3
    assert cfg.prompts.red_team[0].path == "builtin:red_team"


def test_override_list_index_on_defaults():
    cfg = load_config(None, ["prompts.red_team.0.limit=3"])
    assert cfg.prompts.red_team[0] == PromptSource("builtin:red_team", limit=3)


def test_override_index_out_of_range(tmp_path):
    p = _write(tmp_path, {"prompts": {"red_team": [{"path": "a.jsonl"}]}})
    with pytest.raises(ConfigError, match="not an index of a 1-item list"):
        load_config(p, ["prompts.red_team.1.limit=3"])


def test_override_whole_list_value():
    cfg = load_config(None, ["sl.revision.temperature=[1.0,0.5]"])
    assert cfg.sl.revision.temperature == [1.0, 0.5]
    assert cfg.sl.revision.at_round(0).temperature == 1.0
    assert cfg.sl.revision.at_round(3).temperature == 0.5


def test_override_list_of_mappings():
    cfg = load_config(None, ["prompts.helpful=[{path: h.jsonl, field: question}]"])
    assert cfg.prompts.helpful == [PromptSource("h.jsonl", field="question")]


def test_override_beats_file(tmp_path):
    p = _write(tmp_path, {"sl": {"rounds": 3}})
    assert load_config(p, ["sl.rounds=1"]).sl.rounds == 1


def test_override_without_equals_is_error():
    with pytest.raises(ConfigError, match="sl.rounds"):
        load_config(None, ["sl.rounds"])


def test_override_through_a_scalar_is_error():
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        load_config(None, ["seed=1", "seed.x=1"])
    # overrides are laid onto the defaults, so the scalar is known even without a file
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        load_config(None, ["seed.x=1"])


def test_override_does_not_mutate_file_data(tmp_path):
    p = _write(tmp_path, {"sl": {"rounds": 3}})
    load_config(p, ["sl.rounds=1"])
    assert load_config(p).sl.rounds == 3


# ---- Sampling schedule ----------------------------------------------------------------------


def test_at_round_schedule_last_entry_repeats():
    s = Sampling(temperature=[1.0, 0.8, 0.6], top_p=0.9, max_new_tokens=7, stop=["x"])
    temps = [s.at_round(k).temperature for k in range(6)]
    assert temps == [1.0, 0.8, 0.6, 0.6, 0.6, 0.6]
    r = s.at_round(1)
    assert (r.top_p, r.max_new_tokens, r.stop) == (0.9, 7, ["x"])
    # the original is untouched (frozen; at_round returns a copy)
    assert s.temperature == [1.0, 0.8, 0.6]


def test_at_round_scalar_temperature():
    s = Sampling(temperature=0.3)
    assert all(s.at_round(k).temperature == 0.3 for k in range(4))
    assert isinstance(Sampling(temperature=1).at_round(0).temperature, float)


def test_default_revision_schedule_cools_then_holds():
    rev = PipelineConfig().sl.revision
    temps = [rev.at_round(k).temperature for k in range(8)]
    assert temps == sorted(temps, reverse=True)
    assert temps[-1] == temps[-2] == rev.temperature[-1]


# ---- errors ---------------------------------------------------------------------------------


def test_unknown_nested_key_names_file_and_suggests(tmp_path):
    p = _write(tmp_path, {"sl": {"round": 2}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg
    assert "'round'" in msg
    assert "did you mean 'rounds'" in msg


def test_unknown_top_level_key_suggests(tmp_path):
    p = _write(tmp_path, {"sede": 1})
    with pytest.raises(ConfigError, match=r"did you mean 'seed'") as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    p = _write(tmp_path, {"model": {"zzzzzz": 1}})
    with pytest.raises(ConfigError, match="valid keys") as e:
        load_config(p)
    assert "batch_size" in str(e.value)


def test_unknown_key_in_list_item_names_index(tmp_path):
    p = _write(tmp_path, {"prompts": {"red_team": [{"path": "a"}, {"path": "b", "limt": 2}]}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "prompts.red_team[1]" in msg and "did you mean 'limit'" in msg


def test_unknown_override_key_names_source():
    with pytest.raises(ConfigError, match=r"defaults.*'round'.*did you mean 'rounds'"):
        load_config(None, ["sl.round=2"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("sl.rounds=abc", "sl.rounds"),
        ("sl.rounds=1.5", "sl.rounds"),
        ("sl.rounds=true", "sl.rounds"),
        ("model.trust_remote_code=1", "model.trust_remote_code"),
        ("sl.revision.temperature=hot", "sl.revision.temperature"),
        ("sl.revision.temperature=[1.0,hot]", "sl.revision.temperature"),
        ("model.dtype=int8", "model.dtype"),
        ("sl.critique=3", "sl.critique"),
        ("prompts.red_team=builtin:red_team", "prompts.red_team"),
        ("sft.report_to=[1]", "sft.report_to[0]"),
    ],
)
def test_type_errors_name_dotted_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"{key}:" in str(e.value)


def test_type_error_in_file_names_file_and_key(tmp_path):
    p = _write(tmp_path, {"prompts": {"helpful": [{"path": "h", "limit": "ten"}]}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    assert "prompts.helpful[0].limit" in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("sl.helpful_fraction=1.0", "sl.helpful_fraction"),
        ("sl.helpful_fraction=-0.1", "sl.helpful_fraction"),
        ("sl.revision.top_p=0", "sl.revision.top_p"),
        ("sl.response.top_p=1.5", "sl.response.top_p"),
        ("sl.critique.temperature=-1", "sl.critique.temperature"),
        ("sl.revision.temperature=[1.0,-0.5]", "sl.revision.temperature"),
        ("sl.revision.temperature=[]", "sl.revision.temperature"),
        ("sl.critique.max_new_tokens=0", "sl.critique.max_new_tokens"),
        ("sl.rounds=-1", "sl.rounds"),
        ("sl.chunk_size=0", "sl.chunk_size"),
        ("model.batch_size=0", "model.batch_size"),
        ("sft.learning_rate=0", "sft.learning_rate"),
    ],
)
def test_range_checks(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


@pytest.mark.parametrize("override", ["sl.helpful_fraction=0", "sl.helpful_fraction=0.99",
                                      "sl.revision.top_p=1", "sl.rounds=0", "sl.critique.temperature=0"])
def test_range_boundaries_that_are_allowed(override):
    load_config(None, [override])


def test_malformed_yaml_names_file(tmp_path):
    p = _write(tmp_path, "sl: {rounds: 2\nseed: [\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "YAML" in str(e.value)


def test_top_level_not_mapping_names_file(tmp_path):
    p = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping") as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---- fingerprint ----------------------------------------------------------------------------


def test_fingerprint_stable_across_loads(tmp_path):
    p = _write(tmp_path, {"seed": 3, "sl": {"rounds": 2}})
    a, b = load_config(p), load_config(p)
    assert a is not b
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a.sl, "x") == fingerprint(b.sl, "x")


def test_fingerprint_same_for_same_values_reached_differently(tmp_path):
    p = _write(tmp_path, {"sl": {"rounds": 2}})
    assert fingerprint(load_config(p)) == fingerprint(load_config(None, ["sl.rounds=2"]))
    # dict key order does not matter
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


@pytest.mark.parametrize("override", ["seed=1", "sl.rounds=3", "sl.revision.temperature=[1.0]",
                                      "prompts.helpful=[]", "model.name=other"])
def test_fingerprint_changes_when_a_value_changes(override):
    base = load_config(None)
    assert fingerprint(base) != fingerprint(load_config(None, [override]))


def test_fingerprint_is_short_hex():
    fp = fingerprint(PipelineConfig())
    assert len(fp) == 16
    int(fp, 16)


def test_to_dict_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["sl.rounds=2", "prompts.red_team=[{path: a.jsonl, limit: 4}]"])
    p = _write(tmp_path, to_dict(cfg))
    again = load_config(p)
    assert again == cfg
    assert fingerprint(again) == fingerprint(cfg)


# ---- shipped configs ------------------------------------------------------------------------


def test_there_are_shipped_configs():
    assert CONFIGS, f"no configs/*.yaml found under {ROOT}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    # and is a faithful reading of the file: every top-level key in it is used
    data = yaml.safe_load(path.read_text()) or {}
    assert set(data) <= set(to_dict(cfg))


def test_model_identity_leaves_out_how_requests_are_sent_but_keeps_what_decides_outputs():
    from cai.config import model_identity

    base = load_config(None, ["model.backend=openai"])
    budget = load_config(None, ["model.backend=openai", "model.openai.request_budget=10",
                                "model.openai.max_concurrency=2", "model.openai.base_url=http://10.0.0.2:9000/v1"])
    assert fingerprint(model_identity(base.model)) == fingerprint(model_identity(budget.model))
    for change in ("model.name=other", "model.openai.scoring=prompt_logprobs", "model.dtype=float32"):
        other = load_config(None, ["model.backend=openai", change])
        assert fingerprint(model_identity(other.model)) != fingerprint(model_identity(base.model)), change
    # packed weights change how the products are computed, not what a run asks for: runs resume across it
    packed = load_config(None, ["model.pack_weights=false"])
    assert fingerprint(model_identity(packed.model)) == fingerprint(model_identity(load_config(None).model))
    # added after runs existed: left out at its default, so fingerprints that hash the whole section stay
    assert "pack_weights" not in plain(load_config(None).model) and plain(packed.model)["pack_weights"] is False
    # the hf back-end's identity does not depend on the unused openai/vllm sections
    hf = load_config(None, ["model.openai.scoring=prompt_logprobs", "model.vllm.max_model_len=99"])
    assert model_identity(hf.model) == model_identity(load_config(None).model)


@pytest.mark.parametrize("override,field", [
    ("model.openai.max_concurrency=0", "model.openai.max_concurrency"),
    ("model.openai.base_url=localhost:8000", "model.openai.base_url"),
    ("model.openai.request_budget=0", "model.openai.request_budget"),
    ("model.vllm.gpu_memory_utilization=1.5", "model.vllm.gpu_memory_utilization"),
    ("ray.num_workers=0", "ray.num_workers"),
    ("model.backend=vllm model.vllm.data_parallel_size=2", "ray.num_workers=N"),
    ("model.backend=tgi", "model.backend"),
])
def test_scale_out_settings_are_validated(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, override.split())


# ---- range checks beside their fields -------------------------------------------------------

TRAINING = ["sft", "pm", "rl.dpo", "rl.ppo"]  # every training loop: the fields of TrainingConfig
EPOCH_TRAINING = ["sft", "pm", "rl.dpo"]  # loops over a fixed set of rows: EpochTrainingConfig
LORA_TRAINING = ["sft", "rl.dpo"]  # full or LoRA: LoRATrainingConfig


def _refused(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(f"defaults: {key} "), str(e.value)


@pytest.mark.parametrize("section", TRAINING)
@pytest.mark.parametrize("field, bad", [("batch_size", "0"), ("learning_rate", "0"), ("learning_rate", "-1.0e-5"),
                                        ("max_length", "0"), ("save_steps", "0")])
def test_every_training_section_refuses_the_same_bad_values(section, field, bad):
    _refused([f"{section}.{field}={bad}"], f"{section}.{field}")


@pytest.mark.parametrize("section", EPOCH_TRAINING)
@pytest.mark.parametrize("field, bad", [("epochs", "0"), ("max_steps", "0"), ("max_steps", "-2"), ("grad_accum", "0"),
                                        ("warmup_ratio", "-0.1"), ("warmup_ratio", "1.5")])
def test_every_epoch_training_section_refuses_the_same_bad_values(section, field, bad):
    _refused([f"{section}.{field}={bad}"], f"{section}.{field}")


@pytest.mark.parametrize("section", EPOCH_TRAINING)
@pytest.mark.parametrize("override", ["max_steps=-1", "max_steps=1", "warmup_ratio=0", "warmup_ratio=1", "grad_accum=1",
                                      "epochs=0.5", "batch_size=1", "save_steps=1"])
def test_every_epoch_training_section_allows_the_same_boundaries(section, override):
    load_config(None, [f"{section}.{override}"])


@pytest.mark.parametrize("section", LORA_TRAINING)
@pytest.mark.parametrize("field, bad", [("lora_r", "0"), ("lora_dropout", "1.0"), ("lora_dropout", "-0.1")])
def test_lora_fields_are_checked_with_method_lora_only(section, field, bad):
    _refused([f"{section}.method=lora", f"{section}.{field}={bad}"], f"{section}.{field}")
    assert load_config(None, [f"{section}.method=full", f"{section}.{field}={bad}"])


@pytest.mark.parametrize("section, bad, allowed", [("pm", "0", "0.5"), ("rl.dpo", "0", "0.5"), ("rl.ppo", "-1.0", "0")])
def test_max_grad_norm_is_checked_as_each_loop_uses_it(section, bad, allowed):
    # pm and dpo always clip; ppo skips clipping at 0
    _refused([f"{section}.max_grad_norm={bad}"], f"{section}.max_grad_norm")
    load_config(None, [f"{section}.max_grad_norm={allowed}"])


@pytest.mark.parametrize("key", ["sl.response", "sl.critique", "sl.revision", "pairs.sampling", "feedback.cot",
                                 "rl.ppo.response"])
@pytest.mark.parametrize("field, bad", [("top_p", "0"), ("temperature", "-1"), ("max_new_tokens", "0")])
def test_one_sampling_check_serves_every_place_a_sampling_sits(key, field, bad):
    _refused([f"{key}.{field}={bad}"], f"{key}.{field}")


@pytest.mark.parametrize("overrides, message", [
    (["rl.ppo.mini_batch_size=3"], "rl.ppo.batch_size must be a positive multiple of rl.ppo.mini_batch_size"),
    (["rl.ppo.mini_batch_size=0"], "rl.ppo.batch_size must be a positive multiple of rl.ppo.mini_batch_size"),
    (["rl.ppo.max_length=64"], "rl.ppo.max_length must exceed rl.ppo.response.max_new_tokens"),
    (["model.openai.backoff_s=60"], "model.openai.backoff_s must be > 0 and <= model.openai.max_backoff_s"),
    (["feedback.clamp=[0.6, 0.4]"], "feedback.clamp must be [low, high]"),
    (["pairs.kinds=[]"], "pairs.kinds must list"),
    (["pm.weight_decay=-0.1"], "pm.weight_decay must be >= 0"),
])
def test_cross_field_checks_name_their_section(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(f"defaults: {message}"), str(e.value)


def test_a_section_checks_itself_wherever_it_sits():
    failed = [msg for ok, msg in PMConfig(batch_size=0, max_grad_norm=0).checks("elsewhere.pm") if not ok]
    assert failed == ["elsewhere.pm.batch_size must be >= 1", "elsewhere.pm.max_grad_norm must be > 0"]


def test_validate_names_the_source_and_the_dotted_key():
    cfg = dataclasses.replace(PipelineConfig(), sl=dataclasses.replace(SLConfig(), chunk_size=0))
    with pytest.raises(ConfigError, match=r"^cai eval labeller: sl\.chunk_size must be >= 1$"):
        validate(cfg, "cai eval labeller")


@pytest.mark.parametrize("path", [None, *CONFIGS], ids=["defaults", *(p.name for p in CONFIGS)])
@pytest.mark.parametrize("methods", [[], ["rl.method=dpo"], ["rl.method=ppo"], ["sft.method=lora"],
                                     ["rl.dpo.method=lora"], ["rl.dpo.method=full", "sft.method=full"]])
def test_defaults_and_every_shipped_config_pass_with_either_method(path, methods):
    assert isinstance(load_config(path, methods), PipelineConfig)


def test_training_section_defaults_keep_their_fingerprints():
    # Stage fingerprints hash these sections: a renamed field or a changed default would make every
    # existing run directory refuse to resume.
    cfg = PipelineConfig()
    got = {k: fingerprint(plain(s)) for k, s in (("sft", cfg.sft), ("pm", cfg.pm), ("rl.dpo", cfg.rl.dpo),
                                                 ("rl.ppo", cfg.rl.ppo))}
    assert got == {"sft": "fb785920c1817656", "pm": "2a38c9eae4132829", "rl.dpo": "a42abe0b6355ced0",
                   "rl.ppo": "79214aadb62c3749"}


@pytest.mark.parametrize("key", ["pm.micro_tokens", "rl.dpo.micro_tokens"])
def test_a_field_added_later_is_hashed_only_once_it_leaves_its_default(key):
    # micro_tokens came after runs existed: at 0 it must not move the section's fingerprint (above),
    # set it must, or a run would resume with micro-batches it was not trained with.
    section = key.rsplit(".", 1)[0]

    def section_of(cfg):
        return cfg.pm if section == "pm" else cfg.rl.dpo

    default = load_config(None, [f"{key}=0"])
    changed = load_config(None, [f"{key}=512"])
    assert "micro_tokens" not in plain(section_of(default))
    assert plain(section_of(changed))["micro_tokens"] == 512
    assert fingerprint(plain(section_of(default))) == fingerprint(plain(section_of(PipelineConfig())))
    assert fingerprint(plain(section_of(changed))) != fingerprint(plain(section_of(default)))


def test_extra_body_is_a_mapping_that_leaves_the_fingerprints_alone_until_set():
    from cai.config import model_identity

    base = load_config(None, ["model.backend=openai"])
    assert "extra_body" not in model_identity(base.model)["openai"]
    cfg = load_config(None, ["model.backend=openai", "model.openai.extra_body.top_k=20"])
    assert cfg.model.openai.extra_body == {"top_k": 20}
    assert model_identity(cfg.model)["openai"]["extra_body"] == {"top_k": 20}
    with pytest.raises(ConfigError, match=r"model\.openai\.extra_body may not set seed, temperature"):
        load_config(None, ["model.openai.extra_body.seed=1", "model.openai.extra_body.temperature=0"])
    with pytest.raises(ConfigError, match=r"model\.openai\.extra_body: expected a mapping"):
        load_config(None, ["model.openai.extra_body=5"])
