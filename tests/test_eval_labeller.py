"""`cai eval labeller`: the paper format's scoring context, the metrics, and the command end to end. The
readers and slot randomisation are tested in test_sources.py."""

from __future__ import annotations

import json
import re

import pytest

from cai import sources as S
from cai.cli import main
from cai.config import FeedbackConfig
from cai.constitution import load as load_constitution
from cai.evals import labeller as L
from cai.judge import swap_average


def hh_row(i: int, good: str | None = None, bad: str | None = None, history: str = "") -> dict[str, str]:
    base = f"{history}\n\nHuman: question number {i}?\n\nAssistant:"
    return {"chosen": f"{base} {good or f'GOOD answer {i}'}", "rejected": f"{base} {bad or f'bad answer {i}'}"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class OracleLM:
    """Scores the option whose text (in the question's options list) contains GOOD as far more likely.
    With `always_a` it prefers the first option whatever it says."""

    name = "oracle"

    def __init__(self, always_a: bool = False):
        self.always_a = always_a
        self.contexts = []

    def generate(self, conversations, sampling, n=1, seeds=None):  # pragma: no cover - not used here
        raise AssertionError("no generation expected")

    def score_options(self, contexts, options):
        out = []
        for ctx, opts in zip(contexts, options):
            self.contexts.append(ctx)
            question = next(m["content"] for m in reversed(ctx) if m["role"] == "user")
            # "(A) <reply>\ntext\n</reply>" in the feedback prompt, "(A) text" in a rendered one.
            shown: dict[str, str] = {}
            for letter, text in re.findall(r"\(([AB])\) (?:<reply>\n)?([^\n]*)", question):
                shown.setdefault(letter, text)  # the options come before "Answer with (A) or (B)"
            scores = []
            for o in opts:
                letter = re.search(r"[AB]", o).group()
                good = letter == "A" if self.always_a else "GOOD" in shown[letter]
                scores.append(-0.1 if good else -3.0)
            out.append(scores)
        return out


# ---- the paper format ------------------------------------------------------------------------


def paper_row(i: int, good_first: bool) -> dict:
    a, b = ("GOOD reply", "bad reply") if good_first else ("bad reply", "GOOD reply")
    return {"prompt": f"Human: Which reply to question {i} is better?\nOptions:\n(A) {a}\n(B) {b}\n\n"
                      f"Assistant: The answer is:",
            "corrects": [" (A)" if good_first else " (B)"], "incorrects": [" (B)" if good_first else " (A)"]}


def test_paper_reader_and_context(tmp_path):
    path = write_jsonl(tmp_path / "hhh_eval.jsonl", [paper_row(0, True), paper_row(1, False)])
    assert S.detect_format(path) == "paper"
    (src,) = S.read_items(path)
    assert [it.corrects for it in src.items] == [(" (A)",), (" (B)",)]
    ctx = L.rendered_context(src.items[0].prompt)
    assert ctx[-1] == {"role": "assistant", "content": "The answer is:"}
    assert ctx[0]["role"] == "user" and ctx[0]["content"].endswith("(B) bad reply")
    assert len(ctx) == 2
    plain = L.rendered_context("Pick one.\n(A) x\n(B) y\nThe answer is:")
    assert plain == [{"role": "user", "content": "Pick one.\n(A) x\n(B) y"},
                     {"role": "assistant", "content": "The answer is:"}]
    write_jsonl(path, [paper_row(0, True), {"prompt": "q", "corrects": [" (A)"]}])
    with pytest.raises(S.EvalInputError, match=r"hhh_eval\.jsonl:2: 'incorrects' must be"):
        S.read_paper(path)


# ---- metrics ---------------------------------------------------------------------------------


def items_with_slots(n: int) -> list[L.Item]:
    conv = ({"role": "user", "content": "q"},)
    return [L.Item(f"id{i}", conv, ("r1", "r2"), i % 2, f"f:{i}") for i in range(n)]


def label_result(item: L.Item, p_ab: float | None, p_ba: float | None, status: str = "ok") -> dict:
    """A label() result for one principle: `p_ab`/`p_ba` are P(response 1) with it shown as (A)/(B)."""
    ok = status == "ok"
    order = {"principle_id": "p1", "p_ab": p_ab, "p_ba": p_ba, "mass_ab": 0.9 if ok else 0.01,
             "mass_ba": 0.9 if ok else 0.01, "cot_ab": None, "cot_ba": None,
             "status": "ok" if ok else "low_option_mass"}
    return {"record_id": item.id, "status": status, "reason": None if ok else "low_option_mass",
            "p_first": swap_average(p_ab, p_ba) if ok else None, "principle_ids": ["p1"], "orders": [order]}


def test_metrics_of_an_oracle_judge():
    items = items_with_slots(10)
    # Right in both orders with confidence 0.9.
    labels = [label_result(it, *(2 * [0.9 if it.correct == 0 else 0.1])) for it in items]
    m = L.summarise(L.comparison_rows(items, labels))
    assert (m["n"], m["answered"], m["abstained"], m["failed"]) == (10, 10, 0, 0)
    assert m["accuracy"] == 1.0 and m["order_agreement"] == 1.0
    assert m["mean_p_correct"] == pytest.approx(0.9)
    assert m["ece"] == pytest.approx(0.1)  # says 0.9 where it is always right
    assert m["position_bias"] == pytest.approx(0.5)


def test_metrics_of_an_always_a_judge():
    items = items_with_slots(10)
    # P(A) = 0.8 whatever is shown: response 1 gets 0.8 shown first and 0.2 shown second.
    labels = [label_result(it, 0.8, 0.2) for it in items]
    m = L.summarise(L.comparison_rows(items, labels))
    assert m["accuracy"] == 0.5 and m["mean_p_correct"] == pytest.approx(0.5)
    assert m["order_agreement"] == 0.0
    assert m["position_bias"] == pytest.approx(0.8)


def test_metrics_of_an_abstaining_judge_and_a_mixed_one():
    items = items_with_slots(4)
    rows = L.comparison_rows(items, [label_result(it, None, None, "abstain") for it in items])
    m = L.summarise(rows)
    assert (m["answered"], m["abstained"]) == (0, 4)
    assert m["accuracy"] is None and m["ece"] is None and m["order_agreement"] is None
    assert m["not_ok_by_reason"] == {"abstain:low_option_mass": 4}
    # Two answered (one right in both orders, one wrong in one order), two abstained.
    labels = [label_result(items[0], 0.7, 0.7), label_result(items[1], 0.4, 0.6),
              label_result(items[2], None, None, "abstain"), label_result(items[3], None, None, "abstain")]
    m = L.summarise(L.comparison_rows(items, labels))
    assert m["answered"] == 2 and m["accuracy"] == 0.75  # item 0 right (1), item 1 a tie (0.5)
    assert m["order_agreement"] == 0.5


def test_rendered_rows_accuracy_ties_and_abstention():
    items = [L.RenderedItem("a", "p", (" (A)",), (" (B)",), "f:1"),
             L.RenderedItem("b", "p", (" (B)",), (" (A)",), "f:2"),
             L.RenderedItem("c", "p", (" (A)",), (" (B)",), "f:3"),
             L.RenderedItem("d", "p", (" (A)",), (" (B)",), "f:4")]
    # Scores follow corrects + incorrects; the judge prefers "(A)" in a and b.
    scores = [[-0.2, -2.0], [-2.0, -0.2], [-1.0, -1.0], [-9.0, -9.5]]
    rows = L.rendered_rows(items, scores, min_option_mass=0.05)
    assert [r["hit"] for r in rows] == [1.0, 0.0, 0.5, None]
    assert rows[3]["status"] == "abstain"
    assert rows[1]["p_first"] == pytest.approx(rows[0]["p_first"])  # "(A)" sorts first either way
    assert not rows[1]["correct_first"]
    m = L.summarise(rows)
    assert m["accuracy"] == 0.5 and m["order_agreement"] is None and m["answered"] == 3


# ---- the command -----------------------------------------------------------------------------


def run_cli(monkeypatch, lm, argv):
    import cai.lm

    monkeypatch.setattr(cai.lm, "load_lm", lambda cfg: lm)
    return main(["eval", "labeller", *argv])


def test_cli_oracle_and_position_biased_judges(monkeypatch, tmp_path, capsys):
    hh = write_jsonl(tmp_path / "pairs.jsonl", [hh_row(i) for i in range(8)])
    paper = write_jsonl(tmp_path / "paper.jsonl", [paper_row(i, i % 3 == 0) for i in range(6)])
    out = tmp_path / "rep" / "oracle.json"
    assert run_cli(monkeypatch, OracleLM(), [str(hh), str(paper), "--out", str(out), "feedback.few_shot=1"]) == 0
    report = json.loads(out.read_text())
    hh_rep, paper_rep = report["files"]
    assert hh_rep["format"] == "hh" and hh_rep["n"] == 8 and hh_rep["accuracy"] == 1.0
    assert hh_rep["order_agreement"] == 1.0 and hh_rep["mean_p_correct"] > 0.9
    assert paper_rep["format"] == "paper" and paper_rep["accuracy"] == 1.0 and paper_rep["order_agreement"] is None
    assert report["overall"]["n"] == 14
    items = [json.loads(line) for line in (tmp_path / "rep" / "oracle.items.jsonl").read_text().splitlines()]
    assert len(items) == 14 and {r["format"] for r in items} == {"hh", "paper"}
    assert {r["correct"] for r in items if r["format"] == "hh"} == {0, 1}  # both slots used
    printed = capsys.readouterr().out
    assert "pairs.jsonl" in printed and "paper.jsonl" in printed and "1.000" in printed

    out2 = tmp_path / "always_a.json"
    assert run_cli(monkeypatch, OracleLM(always_a=True), [str(hh), "--out", str(out2), "--principle",
                                                          "pref-harm-dangerous"]) == 0
    rep = json.loads(out2.read_text())["files"][0]
    assert rep["accuracy"] == 0.5 and rep["order_agreement"] == 0.0 and rep["position_bias"] > 0.9
    assert list(rep["order_agreement_by_principle"]) == ["pref-harm-dangerous"]


def test_cli_errors_exit_2_before_loading_a_model(monkeypatch, tmp_path, capsys):
    class NoModel:
        def __getattr__(self, name):
            raise AssertionError("the model should not be used")

    assert run_cli(monkeypatch, NoModel(), [str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [hh_row(0), "{nope"])
    assert run_cli(monkeypatch, NoModel(), [str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", [hh_row(0)])
    assert run_cli(monkeypatch, NoModel(), [str(good), "--principle", "pref-nonsense"]) == 2
    assert "pref-nonsense" in capsys.readouterr().err
    assert run_cli(monkeypatch, NoModel(), [str(good), "feedback.principles=0"]) == 2
    assert "principles" in capsys.readouterr().err


def test_cli_with_the_real_tiny_model(monkeypatch, tmp_path, lm):
    # Two comparisons and one rendered question, no few-shot block: the real back-end's chat template
    # and option scoring on both context shapes, in a few seconds.
    hh = write_jsonl(tmp_path / "pairs.jsonl",
                     [hh_row(0, good="I can't help with hurting people.", bad="Sure, here is how to hurt them."),
                      hh_row(1, good="Paris is the capital of France.", bad="The capital is Berlin.")])
    paper = write_jsonl(tmp_path / "paper.jsonl", [paper_row(0, True)])
    out = tmp_path / "real.json"
    assert run_cli(monkeypatch, lm, [str(hh), str(paper), "--out", str(out), "feedback.few_shot=0"]) == 0
    reps = json.loads(out.read_text())["files"]
    assert [r["n"] for r in reps] == [2, 1]
    assert all(r["answered"] + r["abstained"] + r["failed"] == r["n"] for r in reps)
    rows = [json.loads(line) for line in (tmp_path / "real.items.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["status"] != "failed", r
        if r["format"] == "hh" and r["status"] == "ok":
            assert r["p_correct"] == pytest.approx(r["p_first"] if r["correct"] == 0 else 1 - r["p_first"])
            assert all(0.0 < e["mass_ab"] <= 1.0 and 0.0 <= e["p_ab"] <= 1.0 for e in r["orders"])
        if r["format"] == "paper":
            assert len(r["option_logprobs"]) == 2 and all(x < 0 for x in r["option_logprobs"])


def test_cli_judge_is_the_feedback_config_on_any_backend(monkeypatch, tmp_path, capsys):
    import cai.lm

    seen = []
    monkeypatch.setattr(cai.lm, "load_lm", lambda cfg: seen.append(cfg) or OracleLM())
    hh = write_jsonl(tmp_path / "pairs.jsonl", [hh_row(i) for i in range(4)])
    config = tmp_path / "judge.yaml"
    config.write_text("seed: 5\nfeedback:\n  model: big-judge\n  few_shot: 0\nmodel:\n  name: policy\n")
    out = tmp_path / "rep.json"
    assert main(["eval", "labeller", str(hh), "-c", str(config), "model.backend=openai", "--out", str(out),
                 "feedback.principles=2", "model.batch_size=3"]) == 0
    [cfg] = seen
    assert (cfg.name, cfg.backend, cfg.batch_size) == ("big-judge", "openai", 3)
    report = json.loads(out.read_text())
    assert report["seed"] == 5 and report["feedback"]["few_shot"] == 0 and report["feedback"]["principles"] == 2
    assert report["files"][0]["accuracy"] == 1.0
    assert main(["eval", "labeller", str(hh), "feedback.few_shots=1"]) == 2
    assert "unknown key 'few_shots'" in capsys.readouterr().err
    assert main(["eval", "labeller", "feedback.few_shot=1"]) == 2
    assert "no FILE" in capsys.readouterr().err


def test_feedback_config_from_cli_matches_the_stage_defaults():
    # The command's defaults are the feedback stage's, so its figures describe the pipeline's labels.
    from cai.cli import build_parser, command_config

    args = build_parser().parse_args(["eval", "labeller", "x.jsonl"])
    _, cfg = command_config(args, [*args.files, *args.overrides])
    d = FeedbackConfig()
    assert (cfg.feedback.principles, cfg.feedback.few_shot, cfg.feedback.min_option_mass,
            cfg.feedback.chain_of_thought) == (d.principles, d.few_shot, d.min_option_mass, d.chain_of_thought)
    assert load_constitution(cfg.constitution).preference


def test_wilson_interval_matches_the_closed_form_and_stays_in_range():
    from cai.evals.stats import wilson

    lo, hi = wilson(31, 50)
    assert abs(lo - 0.48150) < 1e-4 and abs(hi - 0.74137) < 1e-4
    assert wilson(0, 10)[0] < 1e-12 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) is None
    with pytest.raises(ValueError):
        wilson(11, 10)


# ---- prompt/chosen/rejected rows -------------------------------------------------------------


def test_preference_reader_detects_skips_and_reports_by_category(monkeypatch, tmp_path, capsys):
    rows = [{"id": f"p{i}", "prompt": f"question number {i}?", "chosen": f"GOOD answer {i}",
             "rejected": f"bad answer {i}", "category": "harmless" if i % 2 else "helpful"} for i in range(8)]
    rows.append({"prompt": "same?", "chosen": "same", "rejected": " same "})  # not a comparison
    rows.append({"prompt": [{"role": "user", "content": "as messages?"}],
                 "chosen": [{"role": "assistant", "content": "GOOD as messages"}], "rejected": "bad one"})
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert S.detect_format(path) == "preference"
    (src,) = S.read_items(path, seed=3)
    assert src.format == "preference" and src.skipped == {"identical": 1} and len(src.items) == 9
    assert [it.id for it in src.items[:8]] == [f"p{i}" for i in range(8)]
    assert {it.correct for it in src.items} == {0, 1}  # the better reply is placed in both slots
    for it in src.items:
        assert "GOOD" in it.responses[it.correct] and "GOOD" not in it.responses[1 - it.correct]
    assert src.items[0].category == "helpful" and src.items[8].category is None

    out = tmp_path / "rep.json"
    assert run_cli(monkeypatch, OracleLM(), [str(path), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())["files"][0]
    assert rep["format"] == "preference" and rep["accuracy"] == 1.0
    assert set(rep["by_category"]) == {"harmless", "helpful"}
    assert rep["by_category"]["harmless"]["n"] == 4 and rep["by_category"]["helpful"]["n"] == 4
    printed = capsys.readouterr().out
    assert re.search(r"^\s+harmless\s", printed, re.M) and re.search(r"^\s+helpful\s", printed, re.M)


def test_preference_reader_errors_name_the_line_and_field(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q?", "chosen": "a", "rejected": "b"},
                                               {"prompt": "q?", "chosen": "a"}])
    with pytest.raises(S.EvalInputError, match=r"bad\.jsonl:2.*rejected"):
        S.read_items(bad)
    cat = write_jsonl(tmp_path / "cat.jsonl", [{"prompt": "q?", "chosen": "a", "rejected": "b", "category": 3}])
    with pytest.raises(S.EvalInputError, match=r"cat\.jsonl:1.*category"):
        S.read_items(cat)
    with pytest.raises(S.EvalInputError, match="builtin:nope"):
        S.read_items("builtin:nope")
    with pytest.raises(S.EvalInputError, match="format preference"):
        S.read_items("builtin:helpful_pairs", "hh")


def test_shipped_pair_set_reads_as_comparisons():
    (src,) = S.read_items("builtin:helpful_pairs", limit=5)
    assert src.path == "builtin:helpful_pairs" and len(src.items) == 5
    assert all(it.id.startswith("hpp-") and it.category for it in src.items)
