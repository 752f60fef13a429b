"""`cai eval attribution`: per-principle figures from a run's stored labels add up to those labels."""

from __future__ import annotations

import json

import pytest
from runs_scripted import KEEP, Judge, build

from cai.cli import main
from cai.config import FeedbackConfig
from cai.constitution import load
from cai.evals import attribution
from cai.judge import combine, swap_average
from cai.records import STATUS_OK


def _entry(pid, p_ab, p_ba, status=STATUS_OK):
    return {"principle_id": pid, "p_ab": p_ab, "p_ba": p_ba, "mass_ab": 1.0, "mass_ba": 1.0, "cot_ab": None,
            "cot_ba": None, "status": status}


def _row(rid, *entries, cfg=None):
    status, reason, p = combine(list(entries), cfg or FeedbackConfig())
    return {"record_id": rid, "principle_ids": [e["principle_id"] for e in entries], "orders": list(entries),
            "status": status, "reason": reason, "p_first": p}


def test_an_ensemble_run_s_stored_labels_are_the_mean_of_its_principles_swap_averages(tmp_path):
    judge = Judge({"pref-harm-general": 0.9, "pref-honesty-truthful": 0.3})
    build(tmp_path, judge, "feedback.principles=2")
    run = tmp_path / "run"
    summary, path = attribution.run(run, n_boot=200)
    rows = [json.loads(line) for line in (run / "feedback" / "rows.jsonl").read_text().splitlines()]
    assert path == run / "eval" / "attribution.json" and json.loads(path.read_text()) == summary

    # the judge's own rule, recomputed here by hand: the mean of the usable principles' swap averages
    for r in rows:
        usable = [swap_average(e["p_ab"], e["p_ba"]) for e in r["orders"] if e["status"] == STATUS_OK]
        assert r["p_first"] == pytest.approx(sum(usable) / len(usable), abs=1e-12)
    assert summary["consistency"] == {"checked": len(rows), "mismatched": 0, "mismatched_ids": []}

    # every draw is counted once, under its principle
    by = {p["principle_id"]: p for p in summary["principles"]}
    assert set(by) == set(KEEP)
    assert sum(p["drawn"] for p in by.values()) == sum(len(r["principle_ids"]) for r in rows) == 2 * len(rows)
    for pid in KEEP:
        assert by[pid]["drawn"] == sum(pid in r["principle_ids"] for r in rows)
    assert summary["ensemble_sizes"] == {"2": len(rows)}
    # the scripted principles: harm is sure (|p - .5| = .4), honesty half as sure the other way, helpful indifferent
    assert by["pref-harm-general"]["decisiveness"]["mean"] == pytest.approx(0.4)
    assert by["pref-honesty-truthful"]["decisiveness"]["mean"] == pytest.approx(0.2)
    assert by["pref-helpful-direct"]["decisiveness"]["mean"] == pytest.approx(0.0)
    assert by["pref-helpful-direct"]["decisive"]["rate"] == 0.0 and by["pref-harm-general"]["decisive"]["rate"] == 1.0
    # harm outvotes honesty wherever both are asked; helpful ties (half) against anything
    assert by["pref-harm-general"]["agree_label"]["rate"] == 1.0
    assert by["pref-helpful-direct"]["agree_label"]["rate"] == 0.5
    top = summary["disagreeing_pairs"][0]
    assert top["principles"] == ["pref-harm-general", "pref-honesty-truthful"] and top["disagree"]["rate"] == 1.0
    assert top["mean_gap"] == pytest.approx(0.6)


def test_a_stored_label_its_entries_do_not_give_is_counted_as_a_mismatch():
    cfg = FeedbackConfig()
    rows = [_row("a", _entry("x", 0.8, 0.6)), _row("b", _entry("x", 0.2, 0.4), _entry("y", 0.5, 0.5))]
    assert attribution.consistency(rows, cfg)["mismatched"] == 0
    rows[1] = {**rows[1], "p_first": 0.5}  # an edited label
    assert attribution.consistency(rows, cfg) == {"checked": 2, "mismatched": 1, "mismatched_ids": ["b"]}


def test_under_chain_of_thought_the_clamped_label_is_what_the_entries_give():
    cfg = FeedbackConfig(chain_of_thought=True, clamp=[0.4, 0.6])
    row = _row("a", _entry("x", 0.9, 0.9), _entry("y", 0.8, 0.8), cfg=cfg)
    assert row["p_first"] == 0.6
    assert attribution.consistency([row], cfg)["mismatched"] == 0
    assert attribution.consistency([row], FeedbackConfig())["mismatched"] == 1  # the unclamped mean is 0.85


def test_failed_entries_and_rows_are_counted_never_figures():
    c = load("default")
    rows = [_row("a", _entry("pref-harm-general", 0.9, 0.9), _entry("pref-harm-self", None, None, "invalid_scores")),
            _row("b", _entry("pref-harm-self", None, None, "low_option_mass"))]
    s = attribution.attribute(rows, c, FeedbackConfig(), n_boot=50)
    by = {p["principle_id"]: p for p in s["principles"]}
    assert by["pref-harm-self"]["drawn"] == 2 and by["pref-harm-self"]["usable"] == 0
    assert by["pref-harm-self"]["not_ok_by_reason"] == {"invalid_scores": 1, "low_option_mass": 1}
    assert by["pref-harm-self"]["decisiveness"]["mean"] is None
    assert s["ok"] == 1 and s["not_ok_by_reason"] == {"abstain:low_option_mass": 1}
    assert "pref-harm-general" not in s["never_drawn"] and "pref-helpful-direct" in s["never_drawn"]


def test_the_command_prints_the_table_and_names_a_missing_stage(tmp_path, capsys):
    build(tmp_path, Judge({"pref-harm-general": 0.8}))
    assert main(["eval", "attribution", str(tmp_path / "run"), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "pref-harm-general" in out and "8/8 agree" in out and "feedback.principles is 1" in out
    assert (tmp_path / "run" / "eval" / "attribution.json").is_file()

    (tmp_path / "run" / "feedback" / "manifest.json").unlink()
    assert main(["eval", "attribution", str(tmp_path / "run")]) == 2
    assert "feedback stage has not completed" in capsys.readouterr().err


def test_a_row_without_its_entries_is_an_error_naming_the_file_and_line(tmp_path):
    build(tmp_path, Judge())
    rows_path = tmp_path / "run" / "feedback" / "rows.jsonl"
    lines = rows_path.read_text().splitlines()
    second = json.loads(lines[1])
    del second["orders"]
    lines[1] = json.dumps(second)
    rows_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(attribution.RunError, match=r"feedback/rows.jsonl:2: .* needs orders"):
        attribution.run(tmp_path / "run")
    assert not (tmp_path / "run" / "eval" / "attribution.json").exists()
