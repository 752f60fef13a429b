"""Model names: the embedded default (verified and cached), local directories, and hub ids (the real
hub code path, served here from a local hub cache because these machines reach no hub)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cai.models import EMBEDDED, ModelError, ensure_embedded, resolve, sha256_file


def test_embedded_model_is_cached_as_safetensors_with_provenance(model_dir):
    spec = EMBEDDED["smollm2-135m"]
    d = Path(model_dir)
    assert d == ensure_embedded("smollm2-135m")  # second call: the cache, no work
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["gguf_sha256"] == spec.gguf_sha256 and prov["license"] == "Apache-2.0"
    assert (d / "model.safetensors").exists() and not list(d.glob("*.bin"))
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg


def test_bad_local_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelError, match="no such model directory"):
        resolve("./does/not/exist")
    assert resolve("some-org/some-model") == "some-org/some-model"  # a hub id is passed on as is


def test_sha256_file(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_hub_id_loads_through_the_hub_cache(tmp_path, model_dir):
    """Lay the model out as the hub cache does, then load it by id with the hub offline."""
    repo = tmp_path / "hub" / "models--cai-test--smol"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in Path(model_dir).iterdir():
        if f.is_file():
            shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    code = ("from cai.models import load_model; m, t = load_model('cai-test/smol', dtype='float32'); "
            "print(type(m).__name__, t.chat_template is not None)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["LlamaForCausalLM", "True"]


def test_remote_code_stays_off_by_default(model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    from cai.models import load_model

    load_model(model_dir)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


def test_auto_dtype_on_a_cpu_takes_bf16_only_where_it_measures_faster(monkeypatch, tmp_path):
    import torch

    from cai import models

    monkeypatch.setenv("CAI_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    measured = []
    monkeypatch.setattr(models, "_bf16_speed_ratio", lambda: measured.append(1) or 0.65)
    assert models.pick_dtype("auto", "cpu") == torch.float32
    assert models.pick_dtype("auto", "cpu") == torch.float32 and len(measured) == 1  # kept, not measured again
    (tmp_path / "cpu-dtype.json").unlink()
    monkeypatch.setattr(models, "_bf16_speed_ratio", lambda: 4.7)
    assert models.pick_dtype("auto", "cpu") == torch.bfloat16
    assert models.pick_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)  # emulated bf16 is never picked
    assert models.pick_dtype("auto", "cpu") == torch.float32
    (tmp_path / "cpu-dtype.json").write_text("{not json")  # a damaged file is measured again
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.pick_dtype("auto", "cpu") == torch.bfloat16
