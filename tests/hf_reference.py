"""The transformers back-end as a reference for the real-engine vLLM tests, in process or in another
Python.

vLLM's CPU build pins a transformers older than the one the transformers back-end needs, so in the
vLLM venv (.venv-vllm) the reference runs in the project's main venv instead: this file, run as a
script there, loads `HFModel` and answers one JSON request per line on stdin with one JSON line on
stdout. `HFReference` (in process) and `SubprocessReference` (over that pipe) have the same methods,
so the tests read the same either way.

    python tests/hf_reference.py MODEL_DIR [DEVICE]
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Conv = Sequence[dict[str, str]]


class HFReference:
    """The transformers back-end in fp32 with the few raw forwards the tests compare against."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from cai.config import ModelConfig
        from cai.lm.hf import HFModel

        self.hf = HFModel.from_config(ModelConfig(name=model_dir, dtype="float32", device=device, batch_size=8))

    def encode(self, conv: Conv) -> list[int]:
        return self.hf.encode(conv)

    def generate(self, convs: Sequence[Conv], sampling: Any) -> list[list[dict[str, Any]]]:
        from cai.config import Sampling

        s = sampling if isinstance(sampling, Sampling) else Sampling(**sampling)
        return [[dataclasses.asdict(c) for c in x] for x in self.hf.generate(convs, s)]

    def score_options(self, contexts: Sequence[Conv], options: Sequence[Sequence[str]]) -> list[list[float]]:
        return self.hf.score_options(contexts, options)

    def greedy_ids(self, conv: Conv, max_tokens: int) -> list[int]:
        """Plain `model.generate` greedy ids, ending with the EOS token when one came."""
        import torch

        hf = self.hf
        hf.model.set_attn_implementation("sdpa")  # plain attention, as transformers ships it
        try:
            with torch.no_grad():
                x = torch.tensor([hf.encode(conv)], device=hf.device)
                gen = hf.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                        do_sample=False)[0, x.shape[1]:].tolist()
        finally:
            hf.model.set_attn_implementation("cai_prefix")
        for k, t in enumerate(gen):
            if t in hf.eos_ids:
                return gen[: k + 1]
        return gen

    def logit_gap(self, conv: Conv, prefix: list[int], a: int, b: int) -> float:
        """|logit(a) - logit(b)| for the token after the conversation's prompt and `prefix`."""
        import torch

        hf = self.hf
        hf.model.set_attn_implementation("sdpa")
        try:
            with torch.no_grad():
                x = torch.tensor([hf.encode(conv) + list(prefix)], device=hf.device)
                logits = hf.model(x).logits[0, -1].float()
        finally:
            hf.model.set_attn_implementation("cai_prefix")
        return abs(float(logits[a] - logits[b]))


class SubprocessReference:
    """`HFReference` run by another Python (one with the transformers the back-end needs)."""

    def __init__(self, python: str, model_dir: str, src: str):
        env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        self.proc = subprocess.Popen([python, __file__, model_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def _call(self, op: str, *args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference process exited ({self.proc.poll()}); its stderr has the reason")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"reference {op}: {reply['error']}")
        return reply["result"]

    def encode(self, conv):
        return self._call("encode", conv)

    def generate(self, convs, sampling):
        return self._call("generate", convs, dataclasses.asdict(sampling))

    def score_options(self, contexts, options):
        return self._call("score_options", contexts, options)

    def greedy_ids(self, conv, max_tokens):
        return self._call("greedy_ids", conv, max_tokens)

    def logit_gap(self, conv, prefix, a, b):
        return self._call("logit_gap", conv, prefix, a, b)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _serve(model_dir: str, device: str) -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the replies
    ref = HFReference(model_dir, device)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = {"result": getattr(ref, req["op"])(*req["args"])}
        except Exception as e:  # reported to the caller, which raises it there
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    _serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu")
