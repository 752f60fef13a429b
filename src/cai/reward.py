"""A preference model as a scorer of (prompt, response): one scalar per response, higher is preferred.

The `pm` stage trains it (stages/pm.py) and saves a standard one-label transformers
sequence-classification model; `RewardModel` loads that and scores responses, for PPO's rewards
(`load_reward`), `cai serve`'s `/pooling` route and the benchmarks. The score is the head applied
to the hidden state of the sequence's last real token, the response's end-of-turn token
(`last_token_scores`, the same function the stage trains through); it is read there by position,
because this tokenizer's pad token is that same end-of-turn token and padding-based pooling would
miss it. torch and transformers are imported when a model is loaded or scored.

    cai run configs/quickstart.yaml --from ppo       # PPO's rewards from <run>/pm/model
    cai serve runs/quickstart/pm/model --port 8001   # its scores at /pooling
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cai.lm.base import Message

RewardFn = Callable[[list[list[Message]], list[str]], list[float]]


def last_token_scores(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """The scalar head of a sequence-classification model applied to each row's last real token
    (found from the attention mask, so rows may be padded on either side); float32, shape (B,)."""
    import torch

    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask * pos).argmax(-1)
    picked = hidden[torch.arange(len(last), device=hidden.device), last]
    return model.score(picked).squeeze(-1).float()


class RewardModel:
    """A trained preference model: one scalar per (prompt, response), higher is preferred."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, path: str, device: str = "auto", dtype: str = "auto") -> RewardModel:
        """Load a model saved by the `pm` stage (or any one-label sequence-classification model)."""
        from transformers import AutoModelForSequenceClassification

        from cai.models import ModelError, load_model

        model, tok = load_model(path, dtype, device, model_class=AutoModelForSequenceClassification)
        if model.config.num_labels != 1:
            raise ModelError(f"{path}: not a preference model (num_labels={model.config.num_labels}, expected 1)")
        return cls(model, tok)

    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
        """Scores of already tokenised sequences, batched by length to keep padding small."""
        import torch

        from cai.batches import pad_batch

        device = next(self.model.parameters()).device
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        with torch.no_grad():
            for k in range(0, len(order), batch_size):
                idx = order[k: k + batch_size]
                batch = pad_batch([seqs[i] for i in idx], self.tokenizer.pad_token_id)
                scores = last_token_scores(self.model, batch["input_ids"].to(device),
                                           batch["attention_mask"].to(device))
                for i, s in zip(idx, scores.tolist()):
                    out[i] = s
        return out

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str], batch_size: int = 8,
              max_length: int = 512) -> list[float]:
        """The reward of each response to its prompt (a conversation ending with a user turn)."""
        from cai.batches import encode_pair

        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        seqs = [encode_pair(self.tokenizer, p, r, max_length)[0] for p, r in zip(prompts, responses)]
        return self.score_ids(seqs, batch_size)


def load_reward(reward_dir: str, device: str = "auto", max_length: int = 512) -> RewardFn:
    """The trained preference model in `reward_dir` as a reward function."""
    pm = RewardModel.from_dir(reward_dir, device=device)
    return lambda prompts, responses: pm.score(prompts, responses, max_length=max_length)
