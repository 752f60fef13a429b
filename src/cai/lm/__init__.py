"""The LM seam: every stage talks to models only through `generate` and `score_options`.

`base` declares the protocol; `hf` (transformers, in process), `openai` (an OpenAI-compatible
server) and `vllm` (vLLM's offline engine) implement it. `load_lm` picks one by the config's
`model.backend`, importing it (and its heavy dependencies) only then:

    python -c "from cai.lm import load_lm; from cai.config import ModelConfig; print(load_lm(ModelConfig()).name)"
"""

from __future__ import annotations

from cai.config import ModelConfig
from cai.lm.base import LM

__all__ = ["load_lm"]


def load_lm(cfg: ModelConfig) -> LM:
    """Build the back-end named by `cfg.backend`; heavy imports happen here, not at package import."""
    if cfg.backend == "hf":
        from cai.lm.hf import HFModel

        return HFModel.from_config(cfg)
    if cfg.backend == "openai":
        from cai.lm.openai import OpenAIModel

        return OpenAIModel.from_config(cfg)
    if cfg.backend == "vllm":
        from cai.lm.vllm import VLLMModel

        return VLLMModel.from_config(cfg)
    raise ValueError(f"model.backend: unknown back-end '{cfg.backend}'")  # pragma: no cover - config validates
