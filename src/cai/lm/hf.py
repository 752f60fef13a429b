"""The transformers back-end: the LM seam (`generate`, `score_options`) over a model in this process.

`HFModel` templates conversations (message text stays text, see `cai.templating`), hands token ids
to its `HFEngine` (`cai.lm.hf_engine`: shared-prefix cache, continuous batching, seeded sampling)
and turns the tokens that come back into text. `cai serve` uses the same engine at token level.

    python -c "from cai.lm.hf import HFModel; from cai.config import ModelConfig, Sampling; \
      lm = HFModel.from_config(ModelConfig()); \
      print(lm.generate([[{'role': 'user', 'content': 'Hi!'}]], Sampling(temperature=0))[0][0].text)"
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from cai.config import ModelConfig, Sampling
from cai.lm.base import Completion, Message, OnCall, Program, Request
from cai.lm.hf_engine import HFEngine, TokenRequest
from cai.models import load_model
from cai.templating import encode_prompt


class HFModel:
    """`LM` over a transformers causal LM. Use `from_config` or `HFModel(model, tokenizer, name)`;
    the other arguments tune its `engine` (see `HFEngine`)."""

    def __init__(self, model, tokenizer, name: str, batch_size: int = 32, max_length: int = 4096,
                 min_prefix: int = 16, prefix_cache_size: int = 8, prefill_rows: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.engine = HFEngine(model, tokenizer, batch_size=batch_size, max_length=max_length, min_prefix=min_prefix,
                               prefix_cache_size=prefix_cache_size, prefill_rows=prefill_rows)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = self.engine.device
        self.eos_ids = self.engine.eos_ids

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> HFModel:
        model, tok = load_model(cfg.name, cfg.dtype, cfg.device, cfg.revision, cfg.trust_remote_code, chat=False)
        return cls(model, tok, cfg.name, batch_size=cfg.batch_size, max_length=cfg.max_length)

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

    def run_programs(self, programs: Sequence[Program], on_done: OnCall | None = None) -> None:
        """Run programs interleaved: a program's next request joins the running batch as soon as
        its last one is answered, so the batch stays full while programs have work, instead of
        draining at the end of each lockstep step (and records finish one by one).

        A request joins a running batch only if its prompt starts with the prefix the batch's rows
        share (their keys and values are held once) and that prefix is a good part of it: SL-CAI's
        critiques and revisions all start with the same few-shot examples and run together, but
        they do not join the batch of first answers, which share only the chat template's header.
        Those wait, in order, for the next batch. A request's samples are seeded by its own seed,
        so what it gets does not depend on which batch it ran in (up to float rounding)."""
        ready: list[TokenRequest] = []
        owner: dict[int, int] = {}  # id(request) -> its program

        def push(i: int, request: Request) -> None:
            conversation, sampling, seed = request
            sampling = sampling.at_round(0)
            ids = self.encode(conversation)
            self.engine.check_length(ids, sampling, f"program {i}")
            req = TokenRequest(ids, sampling, 1, seed)
            owner[id(req)] = i
            ready.append(req)

        def done(req: TokenRequest) -> None:
            i = owner.pop(id(req))
            completion = self.engine.completion(req.results[0], req.sampling)
            if on_done is not None:
                on_done(completion.num_tokens)
            with contextlib.suppress(StopIteration):
                push(i, programs[i].send(completion))

        def admit(prefix: Sequence[int]) -> list[TokenRequest]:
            head = list(prefix)
            fit, wait = [], []
            for r in ready:
                joins = (len(r.prompt) > len(head) >= max(64, len(r.prompt) // 4)
                         and r.prompt[: len(head)] == head)
                (fit if joins else wait).append(r)
            ready[:] = wait
            return fit

        for i, program in enumerate(programs):
            with contextlib.suppress(StopIteration):  # a program may need no model at all
                push(i, next(program))
        while ready:
            batch, ready[:] = list(ready), []
            self.engine.run_requests(batch, admit, done)

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
