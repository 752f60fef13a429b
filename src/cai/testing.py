"""Helpers for tests, benchmarks and harnesses that need a real model folder but not a real model."""

from __future__ import annotations

from pathlib import Path


def tiny_llama(out: str | Path, tokenizer_from: str | Path | None = None, *, max_positions: int = 1024,
               initializer_range: float = 0.02, seed: int = 0) -> str:
    """Write a randomly initialised 2-layer Llama (hidden size 32) with the tokenizer and chat
    template of `tokenizer_from` (default: the embedded model) to `out`, as safetensors, and return
    the folder. It tokenises, templates, generates, trains, saves and serves like any model, in a
    fraction of the time; what it says is noise. For a fixed seed the weights are the same."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    if tokenizer_from is None:
        from cai.models import ensure_embedded

        tokenizer_from = ensure_embedded("smollm2-135m")
    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      initializer_range=initializer_range, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out)
    return str(out)
