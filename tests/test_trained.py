"""The run of a training stage, written once (cai/stages/trained.py)."""

from __future__ import annotations

import json

import pytest

from cai.rundir import Stage
from cai.stages.trained import model_saved, run_training


def _stage(tmp_path, fp: str = "fp-1") -> Stage:
    return Stage(tmp_path, "toy", fp, {"lr": 1})


def test_trains_once_writing_running_then_complete(tmp_path):
    st = _stage(tmp_path)
    seen = []

    def train() -> dict:
        seen.append(json.loads(st.manifest_path.read_text())["status"])  # what a reader sees meanwhile
        (st.dir / "model").mkdir()
        (st.dir / "model" / "config.json").write_text("{}")
        (st.dir / "checkpoints").mkdir()
        return {"steps": 3}

    run_training(st, "cpu", {"rows": 5}, train, lambda r: ({"rows": 5, "steps": r["steps"]}, {"note": "x"}),
                 drop_checkpoints=True)
    m = st.manifest()
    assert seen == ["running"]
    assert (m["status"], m["counts"], m["note"]) == ("complete", {"rows": 5, "steps": 3}, "x")
    assert model_saved(st) and not (st.dir / "checkpoints").exists()
    # Finished with its model: not trained again.
    run_training(_stage(tmp_path), "cpu", {}, lambda: seen.append("again"), lambda r: ({}, {}))
    assert seen == ["running"]


def test_a_stage_without_its_model_or_under_another_fingerprint_trains_again(tmp_path):
    st = _stage(tmp_path)
    st.write_manifest("complete", {})
    assert not model_saved(st)  # complete, but no model saved
    calls = []
    run_training(st, "cpu", {}, lambda: calls.append(1) or {}, lambda r: ({}, {}))
    assert calls == [1]
    (st.dir / "model").mkdir()
    (st.dir / "model" / "config.json").write_text("{}")
    assert model_saved(st)
    other = Stage(tmp_path, "toy", "fp-2", {"lr": 2}, allow_changed=True)
    assert not model_saved(other)


def test_checkpoints_stay_until_the_manifest_says_complete(tmp_path):
    st = _stage(tmp_path)
    (st.dir / "checkpoints").mkdir()

    def finish(result: dict) -> tuple[dict, dict]:
        assert (st.dir / "checkpoints").exists()  # not removed before the complete manifest
        raise KeyboardInterrupt  # a kill here

    with pytest.raises(KeyboardInterrupt):
        run_training(st, "cpu", {}, lambda: {}, finish, drop_checkpoints=True)
    assert (st.dir / "checkpoints").exists() and st.manifest()["status"] == "running"
