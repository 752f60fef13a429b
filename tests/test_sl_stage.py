"""SL-CAI critique-revision: what each step sends, how degenerate revisions are handled, and that a
killed run resumes with exactly the records of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai import pipeline
from cai.config import load_config
from cai.constitution import load
from cai.lm.base import Completion
from cai.rundir import ResumeError
from cai.stages.sl_generate import process_chunk

C = load("default")


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "prompts.red_team=[{path: 'builtin:red_team', limit: 5}]",
                              "sl.rounds=3", "sl.few_shot=2", "sl.chunk_size=2", "sl.helpful_fraction=0.25", *extra])


def _rows(n=3):
    return [{"record_id": f"r{i}", "kind": "red_team", "prompt": f"harmful question {i}?", "category": None,
             "source": "test"} for i in range(n)] + [
        {"record_id": "h0", "kind": "helpful", "prompt": "What is rain?", "category": None, "source": "test"}]


def test_each_step_sends_exactly_what_the_constitution_renders(tmp_path, scripted):
    cfg = _cfg(tmp_path)
    lm = scripted()
    out = process_chunk(_rows(), lm, C, cfg.sl, seed=7)
    # 1 response call, then a critique call and a revision call per round
    assert len(lm.calls) == 1 + 2 * cfg.sl.rounds
    convs, sampling, _, seeds = lm.calls[0]
    assert convs == [[{"role": "user", "content": r["prompt"]}] for r in _rows()]
    assert sampling.temperature == cfg.sl.response.at_round(0).temperature
    by_id = {o["record_id"]: o for o in out}
    for k in range(cfg.sl.rounds):
        crit_convs, crit_sampling, _, _ = lm.calls[1 + 2 * k]
        rev_convs, rev_sampling, _, _ = lm.calls[2 + 2 * k]
        assert len(crit_convs) == 3  # helpfulness rows get no rounds
        assert rev_sampling.temperature == cfg.sl.revision.at_round(k).temperature
        for i, conv in enumerate(crit_convs):
            o = by_id[f"r{i}"]
            rd = o["rounds"][k]
            prev = o["init_response"] if k == 0 else o["rounds"][k - 1]["revision"]
            expected = C.critique_messages([{"role": "user", "content": o["prompt"]}], prev, rd["principle_id"], 2)
            assert conv == expected
            assert rev_convs[i] == C.revision_messages(expected, rd["critique"], rd["principle_id"])
        assert [o["rounds"][k]["principle_id"] for o in out if o["kind"] == "red_team"] == [
            C.draw(7, f"r{i}", cfg.sl.rounds)[k] for i in range(3)]
    for o in out:
        assert o["messages"][0] == {"role": "user", "content": o["prompt"]}
        if o["kind"] == "red_team":
            assert o["messages"][1]["content"] == o["rounds"][-1]["revision"] and o["final_round"] == 3
        else:
            assert o["rounds"] == [] and o["messages"][1]["content"] == o["init_response"]


def test_degenerate_revisions_do_not_replace_the_answer_and_are_counted(tmp_path, scripted):
    cfg = _cfg(tmp_path, "sl.rounds=2")
    critique_text = "The reply gives dangerous instructions and should decline that part politely."

    def reply(conv, seed):
        last = conv[-1]["content"]
        if len(conv) == 1:
            return "initial answer"
        if any(last == p.critique for p in C.critique_revision):
            return critique_text
        prompt = conv[-5]["content"]  # revision request: [..., prompt, answer, critique req, critique, revision req]
        if "0" in prompt:
            return critique_text  # echoes the critique
        if "1" in prompt:
            return Completion("a long answer that was cut", "length", 128)  # truncated
        return "A careful, helpful rewrite."

    out = process_chunk(_rows(), scripted(reply), C, cfg.sl, seed=0)
    by_id = {o["record_id"]: o for o in out}
    assert [rd["reason"] for rd in by_id["r0"]["rounds"]] == ["echoes_critique", "echoes_critique"]
    assert by_id["r0"]["status"] == "dropped" and by_id["r0"]["reason"] == "echoes_critique"
    assert by_id["r1"]["status"] == "dropped" and by_id["r1"]["reason"] == "truncated"
    assert by_id["r2"]["status"] == "ok"
    # round 2 of r2 rewrites the same text again: unchanged, so round 1 stays the answer
    assert by_id["r2"]["rounds"][1]["reason"] == "unchanged" and by_id["r2"]["final_round"] == 1
    assert by_id["r2"]["messages"][1]["content"] == "A careful, helpful rewrite."


def test_pipeline_counts_failures_and_refuses_changed_config(tmp_path, scripted):
    cfg = _cfg(tmp_path)
    pipeline.run(cfg, stop="sl_export", lm_factory=lambda: scripted())
    m = json.loads((tmp_path / "run" / "sl_generate" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["counts"]["rows"] == 7  # 5 red-team + ceil(5 * 0.25 / 0.75)
    assert m["constitution_hash"] == C.hash
    export = json.loads((tmp_path / "run" / "sl_export" / "manifest.json").read_text())
    assert export["counts"]["exported"] + export["counts"]["dropped"] == 7
    rows = [json.loads(x) for x in (tmp_path / "run" / "sl_generate" / "rows.jsonl").read_text().splitlines()]
    assert all(r["constitution_hash"] == C.hash for r in rows)
    changed = _cfg(tmp_path, "sl.critique.max_new_tokens=7")
    with pytest.raises(ResumeError, match="sl.critique.max_new_tokens: 80 -> 7|critique"):
        pipeline.run(changed, start="sl_generate", stop="sl_generate", lm_factory=lambda: scripted())
    pipeline.run(changed, start="sl_generate", stop="sl_generate", lm_factory=lambda: scripted(), allow_changed=True)


def _tiny(tmp_path, name):
    return _cfg(tmp_path, f"run_dir={tmp_path / name}", "sl.rounds=1", "sl.few_shot=1",
                "sl.response.max_new_tokens=12", "sl.critique.max_new_tokens=10", "sl.revision.max_new_tokens=12",
                "prompts.red_team=[{path: 'builtin:red_team', limit: 4}]", "sl.helpful_fraction=0.34")


def test_kill_and_resume_gives_the_same_records(tmp_path, tiny_hf):
    # A chunk-level resume on the tiny model (tests/test_journal.py kills the real one inside a chunk).
    lm = tiny_hf
    whole = _tiny(tmp_path, "whole")
    pipeline.run(whole, stop="sl_generate", lm_factory=lambda: lm)
    expected = (tmp_path / "whole" / "sl_generate" / "rows.jsonl").read_text()

    broken = _tiny(tmp_path, "broken")

    class Killed(Exception):
        pass

    def die(i):
        if i == 0:
            raise Killed

    with pytest.raises(Killed):
        pipeline.run(broken, stop="sl_generate", lm_factory=lambda: lm, on_chunk=die)
    rows_path = tmp_path / "broken" / "sl_generate" / "rows.jsonl"
    assert 0 < len(rows_path.read_text().splitlines()) < len(expected.splitlines())
    with open(rows_path, "a") as f:  # a kill in the middle of the next write
        f.write('{"record_id": "rt-00')
    pipeline.run(broken, stop="sl_generate", lm_factory=lambda: lm)
    assert rows_path.read_text() == expected


def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(tmp_path, model_dir):
    args = [f"run_dir={tmp_path / 'k'}", f"model.name={model_dir}", "sl.rounds=1", "sl.few_shot=1",
            "sl.chunk_size=1", "sl.response.max_new_tokens=8", "sl.critique.max_new_tokens=8",
            "sl.revision.max_new_tokens=8", "prompts.red_team=[{path: 'builtin:red_team', limit: 6}]",
            "sl.helpful_fraction=0"]
    cmd = [sys.executable, "-m", "cai.cli", "run", *args, "--to", "sl_generate"]
    rows = tmp_path / "k" / "sl_generate" / "rows.jsonl"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if rows.exists() and len(rows.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(rows.read_text().splitlines()) if rows.exists() else 0
    assert before < 6, "the run finished before it could be killed"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ids = [json.loads(x)["record_id"] for x in rows.read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6
    assert Path(tmp_path / "k" / "config.yaml").exists()
