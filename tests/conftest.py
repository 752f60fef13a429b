"""Shared fixtures: the real tiny model (the embedded SmolLM2-135M, fetched and cached once) and a
scripted model for checking exactly what stages send."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from cai.config import Sampling
from cai.lm.base import Completion

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class ScriptedLM:
    """An LM that answers from a function of the conversation and records every call."""

    name = "scripted"

    def __init__(self, reply=None):
        self.calls: list[tuple[list[list[dict[str, str]]], Sampling, int, list[int] | None]] = []
        self.reply = reply or (lambda conv, seed: f"reply to: {conv[-1]['content'][:40]} #{seed % 1000}")

    def generate(self, conversations, sampling: Sampling, n: int = 1, seeds: Sequence[int] | None = None):
        convs = [[dict(m) for m in c] for c in conversations]
        self.calls.append((convs, sampling, n, list(seeds) if seeds is not None else None))
        out = []
        for i, c in enumerate(convs):
            seed = seeds[i] if seeds is not None else i
            res = self.reply(c, seed)
            comp = res if isinstance(res, Completion) else Completion(res, "stop", len(res.split()))
            out.append([comp] * n)
        return out

    def score_options(self, contexts, options):
        return [[-float(len(o)) for o in opts] for opts in options]


@pytest.fixture
def scripted():
    return ScriptedLM


@pytest.fixture(scope="session")
def model_dir() -> str:
    from cai.models import ensure_embedded

    return str(ensure_embedded("smollm2-135m"))


@pytest.fixture(scope="session")
def lm32(model_dir):
    """The real tiny model in fp32 (for exact comparisons against a direct forward pass)."""
    from cai.config import ModelConfig
    from cai.lm.hf import HFModel

    return HFModel.from_config(ModelConfig(name=model_dir, dtype="float32", batch_size=3))


@pytest.fixture(scope="session")
def lm(model_dir):
    """The real tiny model as the pipeline runs it (bf16 where the CPU has it)."""
    from cai.config import ModelConfig
    from cai.lm.hf import HFModel

    return HFModel.from_config(ModelConfig(name=model_dir, batch_size=8))


@pytest.fixture(scope="session")
def tiny_model_dir(model_dir, tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama with the embedded model's tokenizer and chat template:
    fast enough for training-loop tests, real enough to tokenise, template and save like any model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    return str(out)
