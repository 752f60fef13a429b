"""The transformers back-end: the LM seam (`generate`, `score_options`) over a model in this process.

`HFModel` templates conversations (message text stays text, see `cai.templating`), hands token ids
to its `HFEngine` (`cai.lm.hf_engine`: shared-prefix cache, continuous batching, seeded sampling)
and turns the tokens that come back into text. `cai serve` uses the same engine at token level.

    python -c "from cai.lm.hf import HFModel; from cai.config import ModelConfig, Sampling; \
      lm = HFModel.from_config(ModelConfig()); \
      print(lm.generate([[{'role': 'user', 'content': 'Hi!'}]], Sampling(temperature=0))[0][0].text)"
"""

from __future__ import annotations

from collections.abc import Sequence

from cai.config import ModelConfig, Sampling
from cai.lm.base import Completion, Message
from cai.lm.hf_engine import HFEngine
from cai.models import load_model
from cai.templating import encode_prompt


class HFModel:
    """`LM` over a transformers causal LM. Use `from_config` or `HFModel(model, tokenizer, name)`;
    the other arguments tune its `engine` (see `HFEngine`)."""

    def __init__(self, model, tokenizer, name: str, batch_size: int = 32, max_length: int = 4096,
                 min_prefix: int = 16, prefix_cache_size: int = 8, prefill_rows: int = 8,
                 pack_weights: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.engine = HFEngine(model, tokenizer, batch_size=batch_size, max_length=max_length, min_prefix=min_prefix,
                               prefix_cache_size=prefix_cache_size, prefill_rows=prefill_rows,
                               pack_weights=pack_weights)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = self.engine.device
        self.eos_ids = self.engine.eos_ids

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> HFModel:
        model, tok = load_model(cfg.name, cfg.dtype, cfg.device, cfg.revision, cfg.trust_remote_code, chat=False)
        return cls(model, tok, cfg.name, batch_size=cfg.batch_size, max_length=cfg.max_length,
                   pack_weights=None if cfg.pack_weights else False)

    @property
    def stats(self) -> dict[str, float]:
        """The engine's running counters: prompt tokens, prefix tokens reused, generated tokens,
        prefill and decode seconds, decode steps."""
        return self.engine.stats

    def encode(self, conversation: Sequence[Message]) -> list[int]:
        """Template a conversation. If it ends with an assistant message, that message is left open
        to be continued (used for option scoring); otherwise a generation prompt is added."""
        # Message text is tokenised as text: special-token strings inside it cannot forge a turn.
        return encode_prompt(self.tokenizer, conversation)

    def generate(self, conversations: Sequence[Sequence[Message]], sampling: Sampling, n: int = 1,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """`n` completions per conversation. `seeds[i]` fixes conversation i's samples."""
        if seeds is not None and len(seeds) != len(conversations):
            raise ValueError("generate: need one seed per conversation")
        sampling = sampling.at_round(0)
        encoded = [self.encode(c) for c in conversations]
        for i, e in enumerate(encoded):
            self.engine.check_length(e, sampling, f"conversation {i}")
        done = self.engine.generate_ids(encoded, sampling, n, seeds)
        return [[self.engine.completion(tc, sampling) for tc in row] for row in done]

    def score_options(self, contexts: Sequence[Sequence[Message]], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """Sum of log-probabilities of each option's tokens after its context."""
        if len(contexts) != len(options):
            raise ValueError("score_options: need one list of options per context")
        context_ids, option_ids = [], []
        for ci, (ctx, opts) in enumerate(zip(contexts, options)):
            context_ids.append(self.encode(ctx))
            oids_all = [self.tokenizer(opt, add_special_tokens=False)["input_ids"] for opt in opts]
            for oi, oids in enumerate(oids_all):
                if not oids:
                    raise ValueError(f"score_options: option {oi} of context {ci} is empty")
            option_ids.append(oids_all)
        return self.engine.option_logprobs(context_ids, option_ids)
