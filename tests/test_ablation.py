"""`cai eval ablate`: relabelling a run's pairs with a principle (or category) removed, resumably,
and training the preference model again on the result."""

from __future__ import annotations

import json

import pytest
from runs_scripted import KEEP, Judge, build

from cai.cli import main
from cai.config import ConfigError
from cai.constitution import load
from cai.evals import ablation
from cai.evals.ablation import ablated_draw
from cai.judge import Comparison, label
from cai.rundir import Stage


class Killed(Exception):
    pass


def _rows(run, name="feedback"):
    return Stage.view(run, name).rows()


def _by_name(summary):
    return {a["name"]: a for a in summary["ablations"]}


def test_the_ablated_draw_is_the_record_s_own_draw_with_the_removed_ids_skipped():
    c = load("default")
    for rid in ("r1", "r2", "r3", "p-abc"):
        for k in (1, 3, 30):
            full = c.draw(7, rid, k, kind="preference")
            assert ablated_draw(c, 7, rid, k, []) == full
            for gone in [p.id for p in c.preference if p.id not in full]:  # none when k draws every id
                assert ablated_draw(c, 7, rid, k, [gone]) == full
            x = full[0]
            got = ablated_draw(c, 7, rid, k, [x])
            assert len(got) == k and x not in got
            assert [p for p in full if p != x] == got[: len([p for p in full if p != x])]
    assert ablated_draw(c, 7, "r1", 2, [p.id for p in c.preference]) == []


def test_ablating_a_principle_no_pair_drew_changes_nothing_and_asks_the_judge_nothing(tmp_path):
    judge = Judge({"pref-harm-general": 0.9})
    build(tmp_path, judge, prompts=6)
    run = tmp_path / "run"
    drawn = {p for r in _rows(run) for p in r["principle_ids"]}
    never = [p for p in KEEP if p not in drawn]
    assert never  # the draw is seeded: these six pairs never draw one of the three
    fresh = Judge({"pref-harm-general": 0.9})
    summary, path = ablation.run(run, only=never, lm_factory=lambda: fresh, n_boot=50)
    a = _by_name(summary)[never[0]]
    assert a["relabelled"] == 0 and a["compared"] == len(_rows(run))
    assert a["mean_abs_dp"]["mean"] == 0.0 and a["flips"]["rate"] == 0.0
    assert fresh.scored == 0 and _rows(run, f"{a['folder']}/relabel") == []
    assert path == run / "ablate" / "principle" / "summary.json"


def test_with_fixed_principles_removing_the_deciding_one_flips_its_pairs(tmp_path):
    # harm prefers SAFE strongly, helpful prefers RISKY weakly: harm decides every pair
    judge = Judge({"pref-harm-general": 0.9, "pref-helpful-direct": 0.4})
    build(tmp_path, judge, "feedback.principle_ids=[pref-harm-general, pref-helpful-direct]", prompts=6)
    run = tmp_path / "run"
    stored = {r["record_id"]: r for r in _rows(run)}
    assert all(r["chosen"][0]["content"].startswith("SAFE") for r in stored.values())
    fresh = Judge(judge.prefer)
    summary, _ = ablation.run(run, lm_factory=lambda: fresh, n_boot=50)
    by = _by_name(summary)
    harm, helpful, honesty = by["pref-harm-general"], by["pref-helpful-direct"], by["pref-honesty-truthful"]
    assert harm["relabelled"] == harm["compared"] == 6 and harm["flips"]["rate"] == 1.0
    assert harm["mean_abs_dp"]["mean"] == pytest.approx(0.65 - 0.4)
    assert helpful["flips"]["rate"] == 0.0 and helpful["mean_abs_dp"]["mean"] == pytest.approx(0.9 - 0.65)
    assert honesty["relabelled"] == 0  # not in the list: removing it changes no pair
    # nothing was asked again: each pair keeps the stored entry of the principle it keeps
    assert fresh.scored == 0
    for r in _rows(run, "ablate/principle/pref-harm-general/relabel"):
        assert r["principle_ids"] == ["pref-helpful-direct"] and r["asked"] == []
        assert r["orders"] == [e for e in stored[r["record_id"]]["orders"] if e["principle_id"] == "pref-helpful-direct"]
    # by category: the harm category is that one principle here
    summary, _ = ablation.run(run, by="category", lm_factory=lambda: fresh, n_boot=50)
    assert _by_name(summary)["harm"]["flips"]["rate"] == 1.0


def test_with_drawn_principles_the_pairs_that_drew_the_removed_one_get_their_next_draw(tmp_path):
    judge = Judge({"pref-harm-general": 0.9})
    cfg = build(tmp_path, judge, prompts=10)
    run = tmp_path / "run"
    stored = {r["record_id"]: r for r in _rows(run)}
    drew = {rid for rid, r in stored.items() if r["principle_ids"] == ["pref-harm-general"]}
    assert 0 < len(drew) < len(stored)
    fresh = Judge(judge.prefer)
    summary, _ = ablation.run(run, only=["pref-harm-general"], lm_factory=lambda: fresh, n_boot=50)
    a = _by_name(summary)["pref-harm-general"]
    rows = {r["record_id"]: r for r in _rows(run, "ablate/principle/pref-harm-general/relabel")}
    assert set(rows) == drew and a["relabelled"] == len(drew)
    c = load(tmp_path / "three.yaml")
    for rid, r in rows.items():
        assert r["principle_ids"] == ablated_draw(c, cfg.seed, rid, 1, ["pref-harm-general"]) == r["asked"]
        assert r["p_first"] == pytest.approx(0.5)  # the others are indifferent
    assert fresh.scored == 2 * len(drew)  # one question, both orders, per relabelled pair
    assert a["relabelled_mean_abs_dp"]["mean"] == pytest.approx(0.4)
    # a SAFE-second pair labelled 0.1 becomes a tie, which the feedback stage gives to response 1: a flip
    flips = sum(stored[rid]["p_first"] < 0.5 for rid in drew)
    assert a["flips"]["k"] == flips and a["compared"] == len(stored)


def test_reusing_the_kept_entries_equals_asking_every_principle_afresh(tmp_path):
    judge = Judge({"pref-harm-general": 0.9, "pref-honesty-truthful": 0.3, "pref-helpful-direct": 0.45})
    cfg = build(tmp_path, judge, "feedback.principles=2", prompts=8)
    run = tmp_path / "run"
    ablation.run(run, only=["pref-honesty-truthful"], lm_factory=lambda: Judge(judge.prefer), n_boot=50)
    rows = _rows(run, "ablate/principle/pref-honesty-truthful/relabel")
    assert rows and all(len(r["asked"]) == 1 for r in rows)
    pairs = {p["record_id"]: p for p in _rows(run, "pairs")}
    comps = [Comparison(r["record_id"], ({"role": "user", "content": pairs[r["record_id"]]["prompt"]},),
                        tuple(pairs[r["record_id"]]["responses"])) for r in rows]
    again = label(Judge(judge.prefer), load(tmp_path / "three.yaml"), comps, cfg.feedback, cfg.seed,
                  draws=[r["principle_ids"] for r in rows])
    assert [a["p_first"] for a in again] == pytest.approx([r["p_first"] for r in rows], abs=1e-12)
    assert [a["principle_ids"] for a in again] == [r["principle_ids"] for r in rows]


def test_a_killed_ablation_resumes_with_nothing_lost_or_duplicated(tmp_path):
    judge = Judge({"pref-harm-general": 0.9})
    build(tmp_path / "a", judge, "feedback.principle_ids=[pref-harm-general, pref-helpful-direct]",
          "feedback.chunk_size=2", prompts=7)
    build(tmp_path / "b", judge, "feedback.principle_ids=[pref-harm-general, pref-helpful-direct]",
          "feedback.chunk_size=2", prompts=7)
    whole, _ = ablation.run(tmp_path / "b" / "run", only=["pref-helpful-direct"], lm_factory=Judge, n_boot=50)

    def die(i):
        if i == 1:
            raise Killed

    run = tmp_path / "a" / "run"
    with pytest.raises(Killed):
        ablation.run(run, only=["pref-helpful-direct"], lm_factory=Judge, on_chunk=die, n_boot=50)
    folder = "ablate/principle/pref-helpful-direct/relabel"
    assert len(_rows(run, folder)) == 4 and Stage.view(run, folder).manifest()["status"] == "running"
    summary, _ = ablation.run(run, only=["pref-helpful-direct"], lm_factory=Judge, n_boot=50)
    rows = _rows(run, folder)
    assert [r["record_id"] for r in rows] == [r["record_id"] for r in _rows(run)]  # all 7, once, in order
    assert rows == _rows(tmp_path / "b" / "run", folder)
    assert Stage.view(run, folder).manifest()["status"] == "complete"
    strip = ("run", "folder")
    assert [{k: v for k, v in a.items() if k not in strip} for a in summary["ablations"]] == \
        [{k: v for k, v in a.items() if k not in strip} for a in whole["ablations"]]


def test_an_ablation_refuses_a_changed_judge_and_a_category_that_leaves_no_principle(tmp_path, capsys):
    judge = Judge({"pref-harm-general": 0.9})
    build(tmp_path, judge, "feedback.principle_ids=[pref-harm-general]", prompts=4)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="feedback cannot be overridden"):
        ablation.run(run, overrides=["feedback.few_shot=2"], lm_factory=Judge)
    summary, _ = ablation.run(run, overrides=["model.batch_size=4"], by="category", lm_factory=Judge, n_boot=50)
    by = _by_name(summary)
    assert by["harm"]["skipped"] == "removes every principle the judge could ask under"
    assert by["honesty"]["relabelled"] == 0
    assert main(["eval", "ablate", str(run), "--only", "nosuch"]) == 2
    assert "'nosuch' not a principle" in capsys.readouterr().err
    assert main(["eval", "ablate", str(run), "--only", "pref-helpful-direct", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "pref-helpful-direct" in out and "wrote" in out


def test_retrain_trains_a_preference_model_on_the_ablated_labels_once(tmp_path, tiny_model_dir, monkeypatch):
    judge = Judge({"pref-harm-general": 0.9, "pref-helpful-direct": 0.4})
    build(tmp_path, judge, "feedback.principle_ids=[pref-harm-general, pref-helpful-direct]",
          f"pm.model={tiny_model_dir}", "pm.max_steps=2", "pm.batch_size=2", "pm.max_length=64",
          "preferences.eval_fraction=0.4", prompts=6, to="pm")
    run = tmp_path / "run"
    summary, _ = ablation.run(run, only=["pref-harm-general", "pref-honesty-truthful"], retrain=True,
                              lm_factory=Judge, n_boot=50)
    by = _by_name(summary)
    harm = by["pref-harm-general"]
    acc = harm["pm"]["held_out"]["by_kind"]
    assert harm["pm"]["retrained"] and acc["ai"]["run"]["n"] == acc["ai"]["ablated"]["n"] >= 2
    assert acc["ai"]["change"] == pytest.approx(acc["ai"]["ablated"]["rate"] - acc["ai"]["run"]["rate"])
    folder = run / "ablate" / "principle" / "pref-harm-general"
    assert (folder / "pm" / "model" / "config.json").is_file()
    # the mix holds the ablated labels: every AI row now prefers the RISKY reply
    mix = _rows(folder, "preferences")
    assert mix and all(r["chosen"][0]["content"].startswith("RISKY") for r in mix if r["label_source"] == "ai")
    assert by["pref-honesty-truthful"]["pm"] == {"retrained": False,
                                                 "why": "no pair's principles changed: the labels are the run's"}
    assert "not retrained" in summary["harm"]["note"] and "no evaluation" in summary["harm"]["skipped"]

    from cai.stages import pm

    monkeypatch.setattr(pm, "train", lambda *a, **k: pytest.fail("trained again"))
    again, _ = ablation.run(run, only=["pref-harm-general"], retrain=True, lm_factory=Judge, n_boot=50)
    assert _by_name(again)["pref-harm-general"]["pm"] == harm["pm"]
    assert json.loads((run / "ablate" / "principle" / "summary.json").read_text()) == again
    # an --only run keeps the other ablations of the same labels in the summary
    assert [a["name"] for a in again["ablations"]] == ["pref-harm-general", "pref-honesty-truthful"]
    assert _by_name(again)["pref-honesty-truthful"] == by["pref-honesty-truthful"]
