"""The model protocol shared by every back-end.

Two verbs, both batched:

- `generate(conversations, sampling, n=1, seeds=None)`: for each un-templated chat conversation,
  `n` completions of the next assistant message. `seeds` gives one integer per conversation so a
  record's samples do not depend on which other records share its batch.
- `score_options(contexts, options)`: for each context (a conversation whose last message may be a
  partial assistant message that the options continue), the total log-probability of each option's
  tokens. `normalize` turns them into log-probabilities over the options.

A prompt is either a conversation or a string (`Prompt`). A string is raw text that the back-end
tokenises as it stands, with no chat template: the paper's `Human:`/`Assistant:` format for a
feedback model (`feedback.format: raw`), and the only kind a model without a chat template takes.

The back-end applies the chat template; stages never do. An OpenAI-compatible server or vLLM can
sit behind the same two verbs (chat completions with `n`/`seed`; prompt log-probabilities).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from cai.config import Sampling

if TYPE_CHECKING:
    from cai.journal import Journal

# A chat message {"role": "system" | "user" | "assistant", "content": text}; the one definition.
Message = dict[str, str]
Conversation = list[Message]
# What `generate` and `score_options` take per request: a conversation, or raw text (no template).
Prompt = Sequence[Message] | str
ROLES = ("system", "user", "assistant")


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
        conversations: Sequence[Prompt],
        sampling: Sampling,
        n: int = 1,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]: ...

    def score_options(
        self, contexts: Sequence[Prompt], options: Sequence[Sequence[str]]
    ) -> list[list[float]]: ...


# A multi-step job on one record: it yields (conversation, sampling, seed) requests and is sent each
# request's Completion back. SL-CAI's answer -> critique -> revision chain is one program per prompt.
Request = tuple[Sequence[Message], Sampling, int]
Program = Generator[Request, Completion, Any]


# Called after each finished model call with the tokens it generated; `replayed` when the call's
# completion came from a journal (cai/journal.py) rather than the model. `run_programs` also calls it
# with `ended=True` (and no tokens) when a program has ended: its record is finished.
OnCall = Callable[..., None]


@runtime_checkable
class RunsPrograms(Protocol):
    """A back-end that can interleave programs itself, sending a program's next request as soon
    as its previous one finishes (a concurrent HTTP back-end, say). The transformers back-end
    does not: lockstep steps decode as fast here, since most requests of a step run to the same
    token limit. An interleaved version, measured on 2026-12-03, was no faster on the benchmark,
    slower on the quickstart's critique-revision, and its answers changed with the batch a
    request ran in, so a resumed chunk's rows would no longer be an uninterrupted run's."""

    def run_programs(self, programs: Sequence[Program], on_done: OnCall | None = None) -> None: ...


def run_programs(lm: LM, programs: Sequence[Program], on_done: OnCall | None = None,
                 journal: Journal | None = None) -> None:
    """Run programs to completion: interleaved by the back-end when it can, else in lockstep, one
    `generate` call per step for all programs that wait with the same sampling settings.

    With a `journal`, requests it holds are answered from it and every finished call is written to
    it (one line per lockstep step, or per call where the back-end interleaves), so a killed run
    resumes at its last finished call or step. `on_done` follows each call, and each program's end
    (`ended=True`)."""
    if journal is not None:
        from cai.journal import journaled

        replay = None if on_done is None else (lambda c: on_done(0, replayed=True))
        programs = journaled(programs, journal, replay)
    if on_done is not None:
        programs = [_ending(p, on_done) for p in programs]
    if isinstance(lm, RunsPrograms):
        lm.run_programs(programs, on_done)
        return
    if journal is not None:
        journal.batched = True
    try:
        _lockstep(lm, programs, on_done, journal)
    finally:
        if journal is not None:  # a step cut short by an error is not kept: steps land whole
            journal.discard()
            journal.batched = False


def _ending(program: Program, on_done: OnCall) -> Program:
    """`program`, followed by `on_done(ended=True)` once it returns."""
    result = yield from program
    on_done(ended=True)
    return result


def _lockstep(lm: LM, programs: Sequence[Program], on_done: OnCall | None, journal: Journal | None) -> None:
    waiting: dict[int, Request] = {}
    for i, prog in enumerate(programs):
        with contextlib.suppress(StopIteration):  # a program may need no model at all
            waiting[i] = next(prog)
    while waiting:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (_, sampling, _) in waiting.items():
            groups[repr(sampling)].append(i)
        for ids in groups.values():
            sampling = waiting[ids[0]][1]
            comps = lm.generate([waiting[i][0] for i in ids], sampling, seeds=[waiting[i][2] for i in ids])
            for i, c in zip(ids, comps):
                if on_done is not None:
                    on_done(c[0].num_tokens)
                try:
                    waiting[i] = programs[i].send(c[0])
                except StopIteration:
                    del waiting[i]
            if journal is not None:
                journal.commit()


def normalize(logprobs: Sequence[float]) -> list[float]:
    """Log-probabilities renormalised over the given options (a log-softmax)."""
    m = max(logprobs)
    z = m + math.log(sum(math.exp(x - m) for x in logprobs))
    return [x - z for x in logprobs]


class BackendError(RuntimeError):
    """A back-end that cannot do what a stage asked (a server without a capability, a request
    that failed for good); the message names the server or model and the request."""


class BudgetExhausted(BackendError):
    """The configured request budget is spent. Raised before a request is sent, so every record
    written so far stands and the stage resumes where it stopped when run again."""

