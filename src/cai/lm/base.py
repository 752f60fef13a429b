"""The model protocol shared by every back-end.

Two verbs, both batched:

- `generate(conversations, sampling, n=1, seeds=None)`: for each un-templated chat conversation,
  `n` completions of the next assistant message. `seeds` gives one integer per conversation so a
  record's samples do not depend on which other records share its batch.
- `score_options(contexts, options)`: for each context (a conversation whose last message may be a
  partial assistant message that the options continue), the total log-probability of each option's
  tokens. `normalize` turns them into log-probabilities over the options.

The back-end applies the chat template; stages never do. An OpenAI-compatible server or vLLM can
sit behind the same two verbs (chat completions with `n`/`seed`; prompt log-probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from cai.config import ModelConfig, Sampling

Message = dict[str, str]


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: Literal["stop", "length"]
    num_tokens: int


@runtime_checkable
class LM(Protocol):
    name: str

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: Sampling,
        n: int = 1,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]: ...

    def score_options(
        self, contexts: Sequence[Sequence[Message]], options: Sequence[Sequence[str]]
    ) -> list[list[float]]: ...


def normalize(logprobs: Sequence[float]) -> list[float]:
    """Log-probabilities renormalised over the given options (a log-softmax)."""
    m = max(logprobs)
    z = m + math.log(sum(math.exp(x - m) for x in logprobs))
    return [x - z for x in logprobs]


def load_lm(cfg: ModelConfig) -> LM:
    """Build the back-end named by `cfg.backend`; heavy imports happen here, not at package import."""
    if cfg.backend == "hf":
        from cai.lm.hf import HFModel

        return HFModel.from_config(cfg)
    raise ValueError(f"model.backend: unknown back-end '{cfg.backend}'")  # pragma: no cover - config validates
