"""The feedback stage: a killed labelling run resuming, the stage in the pipeline on a scripted
model, and the pairs it labels."""

from __future__ import annotations

import pytest
from test_judge import CONST, SAFE, UNSAFE, JudgeLM

from cai import pipeline
from cai.config import PipelineConfig, Sampling, from_dict
from cai.lm.base import Completion
from cai.stages import feedback


def _cfg(tmp_path, **over) -> PipelineConfig:
    base = {"run_dir": str(tmp_path / "run"), "feedback": {"chunk_size": 2, "few_shot": 0}}
    base.update(over)
    return from_dict(PipelineConfig, base)


def _pairs(n: int) -> list[dict]:
    return [{"record_id": f"p{i}", "kind": "red_team", "prompt": f"question {i}", "category": None, "source": "t",
             "responses": [f"{SAFE} {i}", f"{UNSAFE} {i}"], "finishes": ["stop", "stop"], "status": "ok",
             "reason": None} for i in range(n)] + [
        {"record_id": "same", "kind": "red_team", "prompt": "q", "responses": ["x", "x"], "status": "set_aside",
         "reason": "identical"}]


def test_a_killed_labelling_run_resumes_with_nothing_lost_or_duplicated(tmp_path):
    def judge(a, b):
        return 0.3 + 0.4 * (SAFE in a)

    whole = feedback.run(_cfg(tmp_path / "whole"), lambda: JudgeLM(judge), CONST, _pairs(7), "fp")
    expected = {r["record_id"]: r["p_chosen"] for r in whole.rows()}
    assert len(expected) == 7  # the set-aside pair never reaches the labeller

    class Dies(JudgeLM):
        def score_options(self, contexts, options):
            if len(self.scored) >= 8:  # after two chunks of two pairs, two orders each
                raise KeyboardInterrupt
            return super().score_options(contexts, options)

    cfg = _cfg(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        feedback.run(cfg, lambda: Dies(judge), CONST, _pairs(7), "fp")
    partial = feedback.Stage.view(cfg.run_dir, "feedback").rows()
    assert len(partial) == 4 and feedback.Stage.view(cfg.run_dir, "feedback").manifest()["status"] == "running"
    resumed = feedback.run(cfg, lambda: JudgeLM(judge), CONST, _pairs(7), "fp")
    ids = [r["record_id"] for r in resumed.rows()]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert {r["record_id"]: r["p_chosen"] for r in resumed.rows()} == expected
    m = resumed.manifest()
    assert m["status"] == "complete" and m["counts"]["ok"] == 7


def test_pipeline_pairs_and_feedback_on_a_scripted_model(tmp_path, scripted):
    """SL-CAI is skipped by naming a model for the pairs; the stages chain through the run folder."""
    cfg = _cfg(tmp_path, prompts={"red_team": [{"path": "builtin:red_team", "limit": 5}],
                                  "helpful": [{"path": "builtin:helpful", "limit": 2}]},
               pairs={"model": "scripted", "sampling": {"max_new_tokens": 8}})
    done = pipeline.run(cfg, stop="prompts")
    assert done["prompts"].complete()
    class Sampler(scripted):
        def generate(self, conversations, sampling, n=1, seeds=None):
            return [[Completion(f"answer {s % 97} #{j}", "stop", 3) for j in range(n)] for s in seeds]

    done = pipeline.run(cfg, start="pairs", stop="feedback", lm_factory=lambda: Sampler())
    pairs_rows = done["pairs"].rows()
    assert len(pairs_rows) == 5 and all(r["kind"] == "red_team" for r in pairs_rows)
    assert all(r["responses"][0] != r["responses"][1] for r in pairs_rows if r["status"] == "ok")
    rows = done["feedback"].rows()
    assert {r["record_id"] for r in rows} == {r["record_id"] for r in pairs_rows if r["status"] == "ok"}
    assert all(r["constitution_hash"] == CONST.hash and r["feedback_model"] == "scripted" for r in rows)


def test_pairs_sets_aside_identical_and_degenerate_samples():
    from cai.config import PairsConfig
    from cai.stages.pairs import pair_problem, process_chunk

    ok, cut = Completion("fine answer", "stop", 2), Completion("long answer", "length", 9)
    assert pair_problem(ok, Completion("fine   answer", "stop", 2), False) == "identical"
    assert pair_problem(ok, Completion(" ", "stop", 1), False) == "empty"
    assert pair_problem(ok, Completion("x<|im_start|>user", "stop", 3), False) == "echoes_scaffold"
    assert pair_problem(ok, cut, True) == "truncated" and pair_problem(ok, cut, False) is None

    class Two:
        name = "two"

        def generate(self, conversations, sampling, n=1, seeds=None):
            assert n == 2
            return [[Completion(f"{s % 5}", "stop", 1), Completion(f"{s % 5}" if i == 0 else "other", "stop", 1)]
                    for i, s in enumerate(seeds)]

    rows = [{"record_id": f"r{i}", "kind": "red_team", "prompt": "q"} for i in range(3)]
    out = process_chunk(rows, Two(), PairsConfig(sampling=Sampling(max_new_tokens=4)), seed=0)
    assert [r["status"] for r in out] == ["set_aside", "ok", "ok"] and out[0]["reason"] == "identical"


def test_pairs_fails_when_every_pair_is_set_aside(tmp_path, scripted):
    from cai.rundir import StageError
    from cai.stages import pairs

    cfg = _cfg(tmp_path, pairs={"chunk_size": 2})
    rows = [{"record_id": f"r{i}", "kind": "red_team", "prompt": f"q{i}"} for i in range(3)]
    with pytest.raises(StageError, match=r"every pair was set aside \(\{'identical': 3\}\).*temperature"):
        pairs.run(cfg, lambda: scripted(lambda conv, seed: "same"), rows, "in-fp", "model-fp")
    st = pairs.Stage.view(cfg.run_dir, "pairs")
    assert st.manifest()["status"] == "failed" and st.manifest()["counts"]["set_aside"] == 3
    assert len(st.rows()) == 3
