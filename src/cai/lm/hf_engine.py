"""The token-level engine behind the transformers back-end: batched decoding and scoring of token ids.

Stages send many prompts that begin with the same long few-shot block. The engine finds the
longest token prefix shared by a batch, computes its key/value cache once (and keeps it for later
batches), and attends to it from every row without copying it per row: the prefix keys are read
once per layer for the whole batch (a "cascade" split of attention into a shared part and a
per-row part, merged exactly through their log-sum-exps). Rows are left-padded after the prefix;
finished rows leave the batch and waiting requests take their slots (continuous batching).
Sampling runs here, one generator per request, so a request's tokens depend on its seed, not on
its neighbours.
In fp32 on a CPU the model's linear layers multiply by weights packed for oneDNN while the engine
runs them (`_PackedWeights`; plain `nn.Linear` everywhere else).

Its entry points take and give token ids: `generate_ids`, `run_requests` (requests joining a
running batch, as `cai serve` feeds it), `option_logprobs` and `prompt_logprobs_detail`. `HFModel`
(`cai.lm.hf`) puts the LM seam over it (chat templates, text in and out); `cai serve` uses it
directly.

    python -c "from cai.lm.hf_engine import HFEngine; from cai.models import load_model; \
      from cai.config import Sampling; model, tok = load_model('smollm2-135m'); e = HFEngine(model, tok); \
      out = e.generate_ids([tok('Once upon a time')['input_ids']], Sampling(temperature=0)); \
      print(e.decode_text(out[0][0].tokens))"
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from cai.config import Sampling
from cai.lm.base import Completion
from cai.lm.sampling import sample_next
from cai.models import eos_token_ids

ATTN_NAME = "cai_prefix"
# Most logits (rows x positions x vocabulary) one prompt-scoring pass may hold at once.
_LOGIT_BUDGET = 1 << 26
# The shared prefix's per-layer (key, value), each (1, kv_heads, P, head_dim), while a batch runs.
_PREFIX: contextvars.ContextVar[list[tuple[torch.Tensor, torch.Tensor]] | None] = contextvars.ContextVar(
    "cai_prefix", default=None
)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """Attention output and its log-sum-exp per query (needed to merge two key sets exactly)."""
    if q.device.type == "cpu":
        # The fused CPU kernel behind SDPA, which also returns the log-sum-exp; the unfused
        # elementwise softmax below is several times slower on a CPU.
        add = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                              attn_mask=add, scale=scale)
        return out.float(), lse
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v).float(), lse


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over [shared prefix] + [per-row keys], exact, without expanding the prefix per row.

    query: (B, H, q, D); key/value: (B, Hkv, S, D) for the per-row part; attention_mask: a boolean
    (B, 1, q, S) mask for the per-row part (True = attend). Every query sees the whole prefix. The
    two parts are attended separately and merged with their log-sum-exps (as in cascade attention).
    """
    prefix = _PREFIX.get()
    b, h, q, d = query.shape
    if not prefix and (torch.is_grad_enabled() or query.device.type != "cpu"
                       or (attention_mask is None and q > 1)):
        # Training, other devices, and implicit causal masks take the library's attention.
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    hkv = key.shape[1]
    g = h // hkv
    scale = scaling if scaling is not None else d ** -0.5
    # Per-row part: each kv head's g query heads folded into its query axis, so the keys and values
    # are read where the cache holds them (expanding them per query head copied the cache g times
    # per layer and step). Query row j*q + i is head j of the group at position i: the mask repeats.
    qr = query.reshape(b, hkv, g * q, d)
    mask = attention_mask if attention_mask is None or q == 1 else attention_mask.repeat(1, 1, g, 1)
    out_r, lse_r = _attend(qr, key, value, mask, scale)
    out_r, lse_r = out_r.reshape(b, h, q, d), lse_r.reshape(b, h, q)
    if not prefix:
        return out_r.to(query.dtype).transpose(1, 2).contiguous(), None
    pk, pv = prefix[module.layer_idx]
    # Shared part: fold (batch, group, q) into one query axis, so each kv head's prefix is read once.
    qf = query.reshape(b, hkv, g * q, d).transpose(0, 1).reshape(1, hkv, b * g * q, d)
    out_p, lse_p = _attend(qf, pk, pv, None, scale)
    out_p = out_p.reshape(hkv, b, g * q, d).transpose(0, 1).reshape(b, h, q, d)
    lse_p = lse_p.reshape(hkv, b, g * q).transpose(0, 1).reshape(b, h, q)
    m = torch.maximum(lse_p, lse_r)
    w_p = torch.exp(lse_p - m)[..., None]
    w_r = torch.exp(lse_r - m)[..., None]
    out = (out_p * w_p + out_r * w_r) / (w_p + w_r)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, prefix_attention)
# Outside our own calls (which pass ready 4D masks) the model builds masks as it would for sdpa.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def can_pack(model) -> bool:
    """Whether packed linear weights (`_EngineLinear`) serve `model`: fp32 on a CPU with oneDNN."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()


# Sibling layers that read the same input one right after the other in the model families the engine
# serves (Llama, Mistral, Qwen, SmolLM, ...): one product with their weights stacked serves them all.
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _PackedWeights:
    """An engine's linear weights in oneDNN's packed (blocked) layout, the one `torch.compile` gives CPU
    linear layers once weights are frozen. `F.linear` re-arranges the weight for the matrix kernel on
    every call, which at the few rows of a decoding step costs more than the product itself.

    Sibling layers (`_SIBLINGS`: the attention's query, key and value projections, the MLP's gate and
    up projections) are multiplied together by their stacked weights: the first of them computes all
    and hands each later one its columns, if that one is then called on the same input tensor (else
    it computes its own). A packed weight is made on first use and again whenever a weight it holds
    changes (its version counter or storage), so it cannot go stale."""

    def __init__(self, model, fuse: bool = True):
        self.weights: dict = {}  # layers multiplied together (one, or siblings) -> (their versions, packed weight)
        self.groups: dict = {}  # layer -> (its siblings, its place among them)
        self.pending: dict = {}  # a later sibling -> (the input, its columns of the first one's product)
        for m in model.modules():
            if type(m) is torch.nn.Linear:  # subclasses (quantised layers, adapters) are left alone
                m.__class__ = _EngineLinear
        if fuse:
            for parent in model.modules():
                for names in _SIBLINGS:
                    group = tuple(parent._modules.get(n) for n in names)
                    if (all(isinstance(m, _EngineLinear) for m in group)
                            and len({(m.in_features, m.bias is None) for m in group}) == 1):
                        for i, m in enumerate(group):
                            self.groups[m] = (group, i)

    def _packed(self, layers: tuple[torch.nn.Linear, ...]) -> torch.Tensor:
        version = tuple((m.weight._version, m.weight.data_ptr()) for m in layers)
        got = self.weights.get(layers)
        if got is None or got[0] != version:
            w = torch.cat([m.weight.detach() for m in layers]) if len(layers) > 1 else layers[0].weight.detach()
            got = self.weights[layers] = (version, torch.ops.mkldnn._reorder_linear_weight(w, None))
        return got[1]

    @staticmethod
    def _product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def linear(self, m: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        hit = self.pending.pop(m, None)
        if hit is not None and hit[0] is x:
            return hit[1]
        group, i = self.groups.get(m, ((m,), 0))
        if i > 0:  # not called right after its first sibling on the same input: on its own
            group = (m,)
        bias = None if m.bias is None else torch.cat([s.bias.detach() for s in group])
        y = self._product(x, self._packed(group), bias)
        if len(group) == 1:
            return y
        parts = y.split([s.out_features for s in group], -1)
        for s, part in zip(group[1:], parts[1:]):
            self.pending[s] = (x, part)
        return parts[0]


# Inside an engine's model calls: its packed linear weights, or None when the engine does not pack.
_PACKED: contextvars.ContextVar[_PackedWeights | None] = contextvars.ContextVar("cai_packed", default=None)


class _EngineLinear(torch.nn.Linear):
    """An `nn.Linear` that, inside an engine's inference calls on a CPU in fp32, multiplies by the
    engine's packed weights (`_PackedWeights`). Outside those calls (training, gradients, other code
    using the same model, copies of it) it is exactly `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = _PACKED.get()
        if (packed is None or torch.is_grad_enabled() or x.dtype != torch.float32
                or self.weight.dtype != torch.float32 or x.device.type != "cpu"):
            return F.linear(x, self.weight, self.bias)
        return packed.linear(self, x)


@contextlib.contextmanager
def _use_prefix(kv: list[tuple[torch.Tensor, torch.Tensor]], packed: _PackedWeights | None = None) -> Iterator[None]:
    token = _PREFIX.set(kv)
    ptoken = _PACKED.set(packed)
    try:
        yield
    finally:
        _PACKED.reset(ptoken)
        _PREFIX.reset(token)
        if packed is not None:
            packed.pending.clear()


def prefix_groups(rows: Sequence[Sequence[int]], min_prefix: int = 16, group: int = 2) -> list[list[int]]:
    """Rows to batch apart: groups of rows that share a long prefix (a prompt's fixed head, such as
    the judge's worked examples, which differ between comparisons only in the order of their
    options), each by length, then the rest by length. A batch cut from one group shares its head.

    Groups are runs of the lexicographically sorted rows whose neighbours share at least half the
    median prefix that neighbours share (and at least `min_prefix` tokens), so two heads that part
    after a few tokens fall into different groups and each batch can share its own head. Runs of
    fewer than `group` rows are not worth a batch of their own and join the rest."""
    n = len(rows)
    if n < 2:
        return [list(range(n))] if n else []
    lex = sorted(range(n), key=lambda k: (list(rows[k]), k))
    shared = [common_prefix([rows[a], rows[b]]) for a, b in zip(lex, lex[1:])]
    threshold = max(min_prefix, sorted(shared)[len(shared) // 2] // 2 + 1)
    runs: list[list[int]] = [[lex[0]]]
    for k, lcp in zip(lex[1:], shared):
        if lcp >= threshold:
            runs[-1].append(k)
        else:
            runs.append([k])
    heads = sorted((r for r in runs if len(r) >= max(2, group)), key=min)
    rest = [k for r in runs if len(r) < max(2, group) for k in r]
    by_len = lambda ks: sorted(ks, key=lambda k: (len(rows[k]), k))  # noqa: E731
    return [by_len(r) for r in [*heads, rest] if r]


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of `seqs` share."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


@dataclass
class _Prefix:
    tokens: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TokenCompletion:
    """One sampled continuation as token ids (the end-of-sequence token left out) and why it ended."""

    tokens: list[int]
    finish_reason: Literal["stop", "length"]


@dataclass
class TokenRequest:
    """`n` continuations of a tokenised prompt; sample j draws from a generator seeded by (seed, j),
    so its tokens do not depend on the other rows of its batch. `results` is filled in sample order."""

    prompt: list[int]
    sampling: Sampling
    n: int = 1
    seed: int = 0
    results: list[TokenCompletion] = field(default_factory=list)


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of a token sequence, each token given the ones before it.

    `logprobs[i]`, `ranks[i]` (1 = the most likely token) and `top[i]` (the most likely
    (token id, log-prob) pairs, best first) describe position i; position 0 has None, None, [].
    `next_token` is the greedy choice after the whole sequence, `next_logprob` its log-probability
    and `next_top` the most likely tokens there (at least one)."""

    logprobs: list[float | None]
    ranks: list[int | None]
    top: list[list[tuple[int, float]]]
    next_token: int
    next_logprob: float
    next_top: list[tuple[int, float]]


@dataclass
class _Request:
    owner: TokenRequest
    sample: int  # which of the owner's n samples
    prompt: list[int]
    gen: torch.Generator
    sampling: Sampling
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None


class _BufferLayer(DynamicLayer):
    """A layer's keys and values in a buffer with room to grow, written in place.

    transformers' dynamic cache concatenates the whole cache with each new token, copying every
    layer's keys and values at every decode step; here a step writes one column. The live columns
    are `buf[:, :, start:end]`: `start` moves right when leading columns are padding in every row
    (`trim`), so dropping them copies nothing. When the buffer is full it is copied once into one
    with half as much room again."""

    def set(self, kbuf: torch.Tensor, vbuf: torch.Tensor, end: int) -> _BufferLayer:
        """Take buffers whose first `end` columns are live."""
        self._k, self._v, self.start, self.end = kbuf, vbuf, 0, end
        self.device, self.dtype, self.is_initialized = kbuf.device, kbuf.dtype, True
        self._views()
        return self

    def _fill(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        b, h, n, d = keys.shape
        kbuf, vbuf = keys.new_empty(b, h, n + room, d), values.new_empty(b, h, n + room, d)
        kbuf[:, :, :n] = keys
        vbuf[:, :, :n] = values
        self.set(kbuf, vbuf, n)

    def _views(self) -> None:
        self.keys = self._k[:, :, self.start : self.end]
        self.values = self._v[:, :, self.start : self.end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[2]
        if not self.is_initialized:
            self._fill(key_states, value_states, max(64, n // 2))
            return self.keys, self.values
        if self.end + n > self._k.shape[2]:
            live = self.end + n - self.start
            self._fill(self.keys, self.values, max(64, live // 2) + n)
        self._k[:, :, self.end : self.end + n] = key_states
        self._v[:, :, self.end : self.end + n] = value_states
        self.end += n
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()

    def trim(self, start: int) -> None:
        self.start += start
        self._views()


def _cache(layers: Sequence[_BufferLayer] | None = None) -> Cache:
    if layers is None:
        return Cache(layer_class_to_replicate=_BufferLayer)
    return Cache(layers=list(layers))


def _trim(cache: Cache, valid: torch.Tensor):
    """Drop leading cache columns that are padding in every row (left by rows that have finished),
    so attention does not pay for them."""
    start = int(valid.any(0).long().argmax())
    if start == 0:
        return cache, valid
    for layer in cache.layers:
        layer.trim(start)
    return cache, valid[:, start:]


def _merge(cache: Cache, valid: torch.Tensor, other: Cache, other_valid: torch.Tensor):
    """Join two running batches: left-pad the shorter cache (padding is masked out, and zero, since
    a masked NaN would still poison the weighted sum) and stack them into one buffer with room."""
    la, lb = valid.shape[1], other_valid.shape[1]
    width = max(la, lb)
    rows = valid.shape[0]
    layers = []
    for a, b in zip(cache.layers, other.layers):
        pair = []
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            buf = x.new_empty(rows + y.shape[0], x.shape[1], width + max(64, width // 2), x.shape[3])
            for r0, part in ((0, x), (rows, y)):
                r1, pad = r0 + part.shape[0], width - part.shape[2]
                buf[r0:r1, :, :pad] = 0
                buf[r0:r1, :, pad:width] = part
            pair.append(buf)
        layers.append(_BufferLayer().set(*pair, width))
    mask = torch.cat([F.pad(valid, (width - la, 0), value=False), F.pad(other_valid, (width - lb, 0), value=False)])
    return _cache(layers), mask


class HFEngine:
    """Batched decoding and scoring of token ids over a transformers causal LM (and its tokenizer,
    for padding, stop strings and decoding). It switches the model to the shared-prefix attention.
    `batch_size` rows decode together; prompt plus continuation stay within `max_length` tokens.
    `pack_weights` (default: where `can_pack`, that is fp32 on a CPU) multiplies by linear weights
    packed for oneDNN (`_PackedWeights`): a copy of those weights beside the model's, for faster decoding."""

    def __init__(self, model, tokenizer, batch_size: int = 32, max_length: int = 4096,
                 min_prefix: int = 16, prefix_cache_size: int = 8, prefill_rows: int = 8,
                 pack_weights: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.min_prefix = min_prefix
        self.device = next(model.parameters()).device
        self._prefixes: OrderedDict[tuple[int, ...], _Prefix] = OrderedDict()
        self._prefix_cache_size = prefix_cache_size
        self._prefix_scores: OrderedDict[tuple, tuple] = OrderedDict()  # see _prefix_logprobs
        model.set_attn_implementation(ATTN_NAME)
        if pack_weights is None:
            pack_weights = can_pack(model)
        self._packed = _PackedWeights(model) if pack_weights else None
        self.eos_ids = eos_token_ids(tokenizer, model.generation_config.eos_token_id)
        self.prefill_rows = prefill_rows
        self.stats: dict[str, float] = {"prompt_tokens": 0, "prefix_tokens_reused": 0, "generated_tokens": 0,
                                        "prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        # The shared-prefix attention assumes every layer attends to all earlier tokens.
        layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
        self.prefix_sharing = all(t == "full_attention" for t in layer_types)

    # ---- the shared prefix ----------------------------------------------------------------

    def _cached_match(self, tokens: Sequence[int]) -> tuple[_Prefix | None, int]:
        """The cached prefix sharing the most leading tokens with `tokens`, and how many it shares."""
        best, best_n = None, 0
        for p in self._prefixes.values():
            n = common_prefix([p.tokens, tokens])
            if n > best_n:
                best, best_n = p, n
        return best, best_n

    @torch.no_grad()
    def _prefix_kv(self, tokens: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """KV cache of `tokens` (batch 1), reusing (a slice of) the best cached prefix."""
        if tokens in self._prefixes:
            self._prefixes.move_to_end(tokens)
            return self._prefixes[tokens].kv
        base, start = self._cached_match(tokens)
        if start < self.min_prefix:
            base, start = None, 0
        kv_prev = [(k[:, :, :start], v[:, :, :start]) for k, v in base.kv] if base else None
        if start < len(tokens):
            new = torch.tensor([tokens[start:]], device=self.device)
            with _use_prefix(kv_prev or [], self._packed):
                out = self.model(
                    input_ids=new,
                    position_ids=torch.arange(start, len(tokens), device=self.device)[None],
                    attention_mask=self._causal(torch.ones(1, new.shape[1], dtype=torch.bool, device=self.device)),
                    cache=_cache(), use_cache=True, logits_to_keep=1,
                )
            kv = [(layer.keys, layer.values) for layer in out.cache.layers]
            if kv_prev:
                kv = [(torch.cat([pk, k], 2), torch.cat([pv, v], 2)) for (pk, pv), (k, v) in zip(kv_prev, kv)]
        else:
            assert kv_prev is not None
            kv = kv_prev
        self._prefixes[tokens] = _Prefix(tokens, kv)
        while len(self._prefixes) > self._prefix_cache_size:
            self._prefixes.popitem(last=False)
        return kv

    @staticmethod
    def _causal(valid: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) boolean mask: causal, keys must be valid (not padding). A padding query sees
        itself only, so no row of the mask is empty (an empty row would put NaN into the values)."""
        s = valid.shape[1]
        tri = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
        eye = torch.eye(s, dtype=torch.bool, device=valid.device)
        return ((tri[None] & valid[:, None, :]) | eye[None])[:, None]

    def _shared_prefix(self, rows: Sequence[Sequence[int]], keep: int) -> int:
        """How many leading tokens all rows share and can take from the prefix cache.

        The prefix must end before the first position whose logits are needed (`keep` from the end).
        A single row shares nothing with a batch but can still reuse a prefix cached earlier.
        """
        if not self.prefix_sharing:
            return 0
        lcp = common_prefix(rows) if len(rows) > 1 else self._cached_match(rows[0])[1]
        lcp = min(lcp, min(len(r) for r in rows) - keep)
        return lcp if lcp >= self.min_prefix else 0

    def _prefill(self, rows: list[list[int]], keep: int, lcp: int | None = None):
        """Run rows through the model after their shared prefix (the first `lcp` tokens).

        Returns (logits of the last `keep` positions per row, cache, valid mask, next positions,
        prefix key/values).
        """
        if lcp is None:
            lcp = self._shared_prefix(rows, keep)
        prefix = self._prefix_kv(tuple(rows[0][:lcp])) if lcp else []
        tails = [r[lcp:] for r in rows]
        width = max(len(t) for t in tails)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(t)) + t for t in tails], device=self.device)
        valid = torch.tensor([[False] * (width - len(t)) + [True] * len(t) for t in tails], device=self.device)
        pos = (valid.long().cumsum(1) - 1).clamp(min=0) + lcp
        with _use_prefix(prefix, self._packed):
            out = self.model(input_ids=ids, attention_mask=self._causal(valid), position_ids=pos,
                             cache=_cache(), use_cache=True, logits_to_keep=keep)
        self.stats["prompt_tokens"] += sum(len(r) for r in rows)
        self.stats["prefix_tokens_reused"] += lcp * (len(rows) - 1)
        return out.logits, out.cache, valid, pos[:, -1] + 1, prefix

    def _batches(self, order: list[int]) -> Iterator[list[int]]:
        for i in range(0, len(order), self.batch_size):
            yield order[i : i + self.batch_size]

    # ---- generation -----------------------------------------------------------------------

    def check_length(self, ids: Sequence[int], sampling: Sampling, what: str) -> None:
        """A ValueError naming `what` when the prompt and its longest continuation exceed max_length."""
        if len(ids) + sampling.max_new_tokens > self.max_length:
            raise ValueError(
                f"generate: {what} has {len(ids)} prompt tokens; with max_new_tokens="
                f"{sampling.max_new_tokens} it exceeds model.max_length={self.max_length}"
            )

    def decode_text(self, tokens: Sequence[int], stop: Sequence[str] = ()) -> str:
        """The text of sampled tokens, cut before the first stop string it contains."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = [text.find(s) for s in stop if s in text]
        return text[: min(cut)] if cut else text

    def completion(self, tc: TokenCompletion, sampling: Sampling) -> Completion:
        """A token-level completion as the LM seam's `generate` returns it (stop strings cut, whitespace
        trimmed)."""
        return Completion(text=self.decode_text(tc.tokens, sampling.stop).strip(), finish_reason=tc.finish_reason,
                          num_tokens=len(tc.tokens))

    @staticmethod
    def _generator(seed: int, sample: int) -> torch.Generator:
        return torch.Generator().manual_seed((seed * 1_000_003 + sample) % (2**63))

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: Sampling, n: int = 1,
                     seeds: Sequence[int] | None = None) -> list[list[TokenCompletion]]:
        """`HFModel.generate` on token ids: `n` continuations of each prompt. `seeds[i]` (default i) fixes
        prompt i's samples."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError("generate_ids: need one seed per prompt")
        sampling = sampling.at_round(0)
        for i, p in enumerate(prompts):
            self.check_length(p, sampling, f"prompt {i}")
        requests = [TokenRequest(list(p), sampling, n, seeds[i] if seeds is not None else i)
                    for i, p in enumerate(prompts)]
        self.run_requests(requests)
        return [r.results for r in requests]

    @torch.no_grad()
    def run_requests(self, requests: Sequence[TokenRequest],
                     admit: Callable[[Sequence[int]], Sequence[TokenRequest]] | None = None,
                     on_done: Callable[[TokenRequest], None] | None = None) -> None:
        """Decode token requests together with continuous batching, filling each one's `results`.

        `admit(prefix)`, when given, is asked for more work whenever the running batch has free
        slots: it returns further requests (each prompt starting with `prefix`, the tokens the
        running rows share, and longer than it), which join the batch at once; the call returns
        when nothing is running or waiting and `admit` has nothing more. `on_done(request)` is
        called as soon as all of a request's samples have finished. Prompt lengths are the
        caller's to check (`check_length`)."""
        if not requests:
            return

        def expand(reqs: Sequence[TokenRequest]) -> list[_Request]:
            # Shorter prompts first, so rows that start together have similar padding; the order
            # is fixed by the input, so results are repeatable.
            rows = [_Request(r, j, r.prompt, self._generator(r.seed, j), r.sampling.at_round(0))
                    for r in reqs for j in range(r.n)]
            for r in reqs:
                r.results = []
            return sorted(rows, key=lambda q: len(q.prompt))

        finished: dict[int, dict[int, TokenCompletion]] = {}

        def finish(q: _Request) -> None:
            self.stats["generated_tokens"] += len(q.tokens)
            got = finished.setdefault(id(q.owner), {})
            got[q.sample] = TokenCompletion(q.tokens, q.finish or "length")  # type: ignore[arg-type]
            if len(got) == q.owner.n:
                q.owner.results = [got[j] for j in range(q.owner.n)]
                del finished[id(q.owner)]
                if on_done is not None:
                    on_done(q.owner)

        more = None
        if admit is not None:
            more = lambda prefix: expand(admit(prefix))  # noqa: E731
        self._run(expand(requests), more, finish)

    def _accept(self, r: _Request, token: int) -> bool:
        """Add a sampled token to a request; True when the request is finished."""
        if token in self.eos_ids:
            r.finish = "stop"
            return True
        r.tokens.append(token)
        if r.sampling.stop and self._hit_stop(r.tokens, r.sampling.stop):
            r.finish = "stop"
        elif len(r.tokens) >= r.sampling.max_new_tokens:
            r.finish = "length"
        return r.finish is not None

    def _run(self, requests: list[_Request], admit: Callable[[Sequence[int]], list[_Request]] | None = None,
             on_finish: Callable[[_Request], None] | None = None) -> None:
        """Decode requests with continuous batching: when half the slots are free, waiting requests
        (and those `admit` brings from outside) are prefilled and join the running batch; joining in
        groups keeps prefill efficient and the batch's caches are merged less often. All rows share
        the prefix common to the first requests."""
        pending = deque(requests)
        active: list[_Request] = []
        cache = valid = next_pos = logits = None
        prefix: list[tuple[torch.Tensor, torch.Tensor]] = []
        prompts = [r.prompt for r in requests]
        if admit is not None:  # n samples of one prompt would share all of it and keep everyone else out
            prompts = list({tuple(p): p for p in prompts}.values())
        lcp = self._shared_prefix(prompts, keep=1)
        shared = requests[0].prompt[:lcp]
        while True:
            if admit is not None and len(active) + len(pending) < self.batch_size:
                pending.extend(admit(shared))
            if pending and len(active) <= self.batch_size // 2:
                t0 = time.perf_counter()
                new = [pending.popleft() for _ in range(min(len(pending), self.batch_size - len(active)))]
                # Prefill in small groups of similar length (requests are sorted by length), so short
                # prompts are not padded to the longest one; the groups' caches are then joined.
                for g in range(0, len(new), self.prefill_rows):
                    group = new[g : g + self.prefill_rows]
                    n_logits, n_cache, n_valid, n_pos, prefix = self._prefill([r.prompt for r in group], 1, lcp)
                    if active:
                        cache, valid = _merge(cache, valid, n_cache, n_valid)
                        next_pos = torch.cat([next_pos, n_pos])
                        logits = torch.cat([logits, n_logits[:, -1]])
                    else:
                        cache, valid, next_pos, logits = n_cache, n_valid, n_pos, n_logits[:, -1]
                    active += group
                self.stats["prefill_s"] += time.perf_counter() - t0
            if not active:
                return
            toks = sample_next(logits, [float(r.sampling.temperature) for r in active],  # type: ignore[arg-type]
                               [r.sampling.top_p for r in active], [r.gen for r in active])
            keep = []
            for s, r in enumerate(active):
                if not self._accept(r, int(toks[s])):
                    keep.append(s)
                elif on_finish is not None:
                    on_finish(r)
            if len(keep) < len(active):
                active = [active[s] for s in keep]
                if not active:
                    continue
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                valid, next_pos, toks = valid[idx], next_pos[idx], toks[idx]
                cache, valid = _trim(cache, valid)
            t0 = time.perf_counter()
            valid = torch.cat([valid, torch.ones(len(active), 1, dtype=torch.bool, device=self.device)], 1)
            with _use_prefix(prefix, self._packed):
                out = self.model(input_ids=toks[:, None], attention_mask=valid[:, None, None, :],
                                 position_ids=next_pos[:, None], cache=cache, use_cache=True)
            next_pos = next_pos + 1
            logits = out.logits[:, -1]
            self.stats["decode_s"] += time.perf_counter() - t0
            self.stats["decode_steps"] += 1

    def _hit_stop(self, toks: list[int], stop: list[str]) -> bool:
        tail = self.tokenizer.decode(toks[-16:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    # ---- option scoring -------------------------------------------------------------------

    @torch.no_grad()
    def option_logprobs(self, contexts: Sequence[Sequence[int]],
                        options: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
        """For each context's token ids, the summed log-probability of each option's tokens (each
        option non-empty) after it. Contexts whose options are one token each take one pass."""
        items = []  # (context index, option index, context ids, option ids)
        scores: list[list[float]] = [[0.0] * len(o) for o in options]
        single: list[tuple[int, list[int], list[int]]] = []  # contexts whose options are one token each
        for ci, (context, opts) in enumerate(zip(contexts, options)):
            cids, oids_all = list(context), [list(o) for o in opts]
            if oids_all and all(len(o) == 1 for o in oids_all):
                # One pass serves every option: they are all read off the context's last logits.
                single.append((ci, cids, [o[0] for o in oids_all]))
            else:
                items.extend((ci, oi, cids, oids) for oi, oids in enumerate(oids_all))
        groups = prefix_groups([single[k][1] for k in range(len(single))], self.min_prefix, self.batch_size // 2)
        for batch in (b for g in groups for b in self._batches(g)):
            logits, *_ = self._prefill([single[k][1] for k in batch], keep=1)
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
            for slot, k in enumerate(batch):
                ci, _, toks = single[k]
                scores[ci] = [float(logp[slot, t]) for t in toks]
        groups = prefix_groups([items[k][2] for k in range(len(items))], self.min_prefix, self.batch_size // 2)
        for batch in (b for g in groups for b in self._batches(g)):
            rows = [items[k][2] + items[k][3] for k in batch]
            # Keep the logits from the last context token on; the prefix ends before it.
            keep = max(len(items[k][3]) for k in batch) + 1
            logits, *_ = self._prefill(rows, keep=keep)
            logp = torch.log_softmax(logits.float(), dim=-1)
            for slot, k in enumerate(batch):
                ci, oi, _, oids = items[k]
                m = len(oids)
                # logits position j of the kept window predicts the token at window position j+1.
                lp = logp[slot, keep - m - 1 : keep - 1]
                tgt = torch.tensor(oids, device=lp.device)
                scores[ci][oi] = float(lp.gather(-1, tgt[:, None]).sum())
        return scores

    # ---- token-level scoring --------------------------------------------------------------

    def prompt_logprobs(self, token_id_lists: Sequence[Sequence[int]]) -> list[list[float | None]]:
        """Log-probability of each token given the tokens before it (None for the first), batched."""
        return [p.logprobs for p in self.prompt_logprobs_detail(token_id_lists)]

    @torch.no_grad()
    def prompt_logprobs_detail(self, token_id_lists: Sequence[Sequence[int]], top: int = 0) -> list[PromptLogprobs]:
        """`prompt_logprobs` with each token's rank, the `top` most likely tokens at each position
        and the distribution after the last token (see PromptLogprobs).

        Rows are batched by length and share their common prefix as generation does; the prefix's
        own positions are scored once per distinct prefix. Logits are kept for every position of a
        row's tail, so a batch is split to keep rows x positions x vocabulary within a budget."""
        rows = [list(r) for r in token_id_lists]
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"prompt_logprobs: sequence {i} is empty")
        out: list[PromptLogprobs | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda k: (len(rows[k]), k))
        vocab = self.model.get_output_embeddings().weight.shape[0]
        for batch in self._batches(order):
            lcp = self._shared_prefix([rows[k] for k in batch], keep=1)
            head = self._prefix_logprobs(tuple(rows[batch[0]][:lcp]), top) if lcp else None
            start = 0
            while start < len(batch):
                # Rows are sorted by length, so the widest row of a sub-batch is its last.
                stop = start + 1
                while (stop < len(batch) and
                       (stop + 1 - start) * (len(rows[batch[stop]]) - lcp) * vocab <= _LOGIT_BUDGET):
                    stop += 1
                sub = batch[start:stop]
                width = len(rows[sub[-1]]) - lcp
                logits, *_ = self._prefill([rows[k] for k in sub], keep=width, lcp=lcp)
                for slot, k in enumerate(sub):
                    out[k] = self._row_logprobs(rows[k], lcp, logits[slot], head, top)
                start = stop
        return out  # type: ignore[return-value]

    def _prefix_logprobs(self, tokens: tuple[int, ...], top: int):
        """(PromptLogprobs of the prefix itself, log-softmax after its last token), cached."""
        key = (tokens, top)
        if key not in self._prefix_scores:
            logits, *_ = self._prefill([list(tokens)], keep=len(tokens), lcp=0)
            lp = logits[0].float().log_softmax(-1)
            self._prefix_scores[key] = (self._position_stats(list(tokens), lp[:-1], top), lp[-1])
            while len(self._prefix_scores) > 4:
                self._prefix_scores.popitem(last=False)
        self._prefix_scores.move_to_end(key)
        return self._prefix_scores[key]

    def _row_logprobs(self, row: list[int], lcp: int, logits: torch.Tensor, head, top: int) -> PromptLogprobs:
        """One row's PromptLogprobs from its tail logits (left-padded, last position last) and the
        shared prefix's scores."""
        tail = len(row) - lcp
        lp = logits[logits.shape[0] - tail:].float().log_softmax(-1)  # position lcp + j predicts token lcp + j + 1
        if head is None:
            first = PromptLogprobs([None], [None], [[]], 0, 0.0, [])
            body = self._position_stats(row, lp[:-1], top)
        else:
            first, before = head  # `before` predicts token lcp
            body = self._position_stats(row[lcp - 1:], torch.cat([before[None], lp[:-1]]), top)
        last = lp[-1]
        nxt = int(logits[-1].float().argmax())
        k = max(top, 1)
        vals, ids = last.topk(k)
        return PromptLogprobs(first.logprobs + body.logprobs[1:], first.ranks + body.ranks[1:], first.top + body.top[1:],
                              nxt, float(last[nxt]), list(zip(ids.tolist(), vals.tolist())))

    @staticmethod
    def _position_stats(tokens: list[int], lp: torch.Tensor, top: int) -> PromptLogprobs:
        """PromptLogprobs of `tokens` where lp[j] (a log-softmax row) predicts tokens[j + 1]."""
        if len(tokens) < 2:
            return PromptLogprobs([None], [None], [[]], 0, 0.0, [])
        tgt = torch.tensor(tokens[1:], device=lp.device)
        got = lp.gather(-1, tgt[:, None]).squeeze(-1)
        ranks = (lp > got[:, None]).sum(-1) + 1
        tops: list[list[tuple[int, float]]] = [[] for _ in tokens[1:]]
        if top:
            vals, ids = lp.topk(top, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
        return PromptLogprobs([None, *got.tolist()], [None, *ranks.tolist()], [[], *tops], 0, 0.0, [])
