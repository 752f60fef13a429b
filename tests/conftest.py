"""Shared fixtures: the real tiny model (the embedded SmolLM2-135M, fetched and cached once) and a
scripted model for checking exactly what stages send."""

from __future__ import annotations

import contextlib
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
    """The real tiny model as the pipeline runs it (bf16 where the CPU runs it fast, else fp32)."""
    from cai.config import ModelConfig
    from cai.lm.hf import HFModel

    return HFModel.from_config(ModelConfig(name=model_dir, batch_size=8))


@pytest.fixture(scope="session")
def tiny_model_dir(model_dir, tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama with the embedded model's tokenizer and chat template:
    fast enough for training-loop tests, real enough to tokenise, template and save like any model."""
    from cai.testing import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), model_dir)


@pytest.fixture(scope="session")
def tiny_hf(tiny_model_dir):
    """The tiny random model behind the transformers back-end, in fp32: for tests of what a stage
    does with a model's answers (resume, order, counts), not of what the answers say."""
    from cai.config import ModelConfig
    from cai.lm.hf import HFModel

    return HFModel.from_config(ModelConfig(name=tiny_model_dir, dtype="float32", batch_size=8))


# ---- a real vLLM engine and the transformers reference (tests marked gpu / vllm_cpu) -------------


def _transformers_fits_the_project() -> bool:
    """Whether the installed transformers is one the project's transformers back-end runs on (not
    so in vLLM's CPU venv, whose vllm-cpu pins an older one)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    try:
        reqs = [Requirement(r) for r in importlib.metadata.requires("constitutional-ai") or []]
    except importlib.metadata.PackageNotFoundError:
        return True
    spec = next((r.specifier for r in reqs if r.name == "transformers"), None)
    return spec is None or spec.contains(importlib.metadata.version("transformers"), prereleases=True)


@pytest.fixture(scope="session")
def vllm_lm(model_dir):
    """The vLLM back-end on a real engine in fp32: on a CUDA GPU, or on vLLM's CPU build.
    `startup_s` holds the seconds `load_lm` took."""
    import time

    pytest.importorskip("vllm")
    import torch
    from vllm.platforms import current_platform

    from cai.config import ModelConfig, VLLMConfig
    from cai.lm import load_lm

    if torch.cuda.is_available():
        v = VLLMConfig(gpu_memory_utilization=0.3, max_model_len=4096, enforce_eager=True)
    elif current_platform.is_cpu():
        # 1 GiB of KV cache holds ~23k tokens of this model; the engine's default is larger.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        v = VLLMConfig(max_model_len=2048, enforce_eager=True)
    else:
        pytest.skip(f"needs a CUDA GPU or vLLM's CPU build (vLLM's platform here: {current_platform})")
    t0 = time.perf_counter()
    lm = load_lm(ModelConfig(name=model_dir, backend="vllm", dtype="float32", vllm=v))
    lm.startup_s = time.perf_counter() - t0
    yield lm
    with contextlib.suppress(Exception):  # the engine process; left alone, vLLM ends it at exit
        lm.llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def hf_ref(model_dir):
    """The transformers back-end in fp32 as a reference (tests/hf_reference.py): in process where
    its transformers fits, else in the Python named by CAI_HF_PYTHON (default: the project's main
    venv, .venv/bin/python)."""
    import torch
    from hf_reference import HFReference, SubprocessReference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if _transformers_fits_the_project():
        yield HFReference(model_dir, device)
        return
    python = os.environ.get("CAI_HF_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
    if not Path(python).is_file():
        pytest.skip(f"the transformers back-end needs transformers >= 5.24 (here an older one, pinned by vLLM): "
                    f"set CAI_HF_PYTHON to the main venv's python (no {python})")
    ref = SubprocessReference(python, model_dir, str(ROOT / "src"))
    yield ref
    ref.close()
