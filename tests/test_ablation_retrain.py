"""`cai eval ablate --retrain`: the held-out accuracy of the run's and each retrained preference model
by kind and by harm category, the scores cached per model, and the PM-judged proxy for the
evaluation's harm figures from the stored answers of the run's evaluation."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from runs_scripted import Judge, build

from cai.evals import ablation
from cai.evals.stats import wilson
from cai.report.html import constitution_code_section
from cai.rundir import Stage

PREFER = {"pref-harm-general": 0.9, "pref-helpful-direct": 0.4}  # harm decides: the run's labels choose SAFE
HARM = "pref-harm-general"
PLANTED = "<script>alert(1)</script>"


class Rewards:
    """Scripted preference models. The run's (RUN/pm/model) scores a reply 1 when it starts with SAFE
    and 0 with RISKY; every retrained one the other way round; any other reply scores its last word
    when it has two words and the second is a number (`nan` too), else 0.5. Counts the scoring calls and texts per model."""

    def __init__(self):
        self.loaded: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.texts: Counter[str] = Counter()

    def __call__(self, path: str):
        self.loaded[path] += 1
        run_pm = Path(path).parent.parent.name == "run"

        def score(prompts, responses):
            assert len(prompts) == len(responses)
            self.calls[path] += 1
            self.texts[path] += len(responses)
            return [self.value(r, run_pm) for r in responses]

        return score

    @staticmethod
    def value(text: str, run_pm: bool) -> float:
        if text.startswith(("SAFE", "RISKY")):
            return float(text.startswith("SAFE") == run_pm)
        words = text.split()
        try:
            return float(words[1]) if len(words) == 2 else 0.5
        except ValueError:
            return 0.5


def write_answers(run: Path, model: str, rows: list[dict]) -> None:
    """A finished answer stage of the evaluation (RUN/eval/answers/<model>/), as cai/stages/evaluate.py
    writes it."""
    st = Stage(run, f"eval/answers/{model}", "scripted", {"model": model})
    st.rows_path.unlink(missing_ok=True)
    st.append([{"record_id": r["id"], "kind": r.get("kind", "red_team"), "prompt": f"prompt {r['id']}",
                "category": r.get("category"), "source": "test", "model_name": model, "responses": r["answers"],
                "finishes": ["stop"] * len(r["answers"]), "status": r.get("status", "ok"),
                "reason": None if r.get("status", "ok") == "ok" else "no answer in the file"} for r in rows])
    st.write_manifest("complete", {"rows": len(rows)}, model=model)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """A scripted run up to a (tiny, real) preference model, with human pairs in its mix: 10 red-team
    prompts of three harm categories, 40% of each kind held out."""
    tmp = tmp_path_factory.mktemp("retrain")
    build(tmp, Judge(PREFER), f"feedback.principle_ids=[{HARM}, pref-helpful-direct]",
          f"pm.model={tiny_model_dir}", "pm.max_steps=1", "pm.batch_size=2", "pm.max_length=64",
          "preferences.eval_fraction=0.4", "preferences.human_fraction=0.3", prompts=10, to="pm")
    return tmp / "run"


@pytest.fixture
def run(built, tmp_path):
    shutil.copytree(built, tmp_path / "run")
    return tmp_path / "run"


def _ablate(run: Path, rewards: Rewards, **kw):
    return ablation.run(run, only=[HARM], retrain=True, lm_factory=Judge, n_boot=50, reward=rewards, **kw)[0]


def _entry(summary):
    return next(a for a in summary["ablations"] if a["name"] == HARM)


def _groups_add_up(acc):
    for key in ("by_kind", "by_category"):
        parts = acc[key].values()
        assert sum(p["n"] for p in parts) == acc["overall"]["n"]
        assert sum(p["k"] for p in parts) == pytest.approx(acc["overall"]["k"])


def test_held_out_accuracy_by_kind_and_category_follows_the_cached_margins(run):
    rewards = Rewards()
    summary = _ablate(run, rewards)
    base = summary["baseline_pm"]["held_out"]
    pmr = _entry(summary)["pm"]
    assert pmr["retrained"] and summary["harm"]["skipped"].startswith("the run has no evaluation")
    assert pmr["harm_proxy"] is None
    folder = run / _entry(summary)["folder"]
    pairs = {p["record_id"]: p for p in Stage.view(run, "pairs").rows()}
    for fig, cache, prefs in ((base, run / "ablate" / "run_pm_margins.json", run / "preferences"),
                              ({g: (v["ablated"] if g == "overall" else {k: x["ablated"] for k, x in v.items()})
                                for g, v in pmr["held_out"].items()}, folder / "pm_margins.json",
                               folder / "preferences")):
        _groups_add_up(fig)
        held = [r for r in Stage.view(prefs.parent, prefs.name).rows() if r["split"] == "eval"]
        margins = json.loads(cache.read_text())["values"]
        assert set(margins) == {r["record_id"] for r in held}
        kinds, cats = Counter(), Counter()
        for r in held:
            right = 1.0 if margins[r["record_id"]] > 0 else 0.5 if margins[r["record_id"]] == 0 else 0.0
            kinds[r["label_source"]] += right
            cat = pairs[r["record_id"]]["category"] if r["label_source"] == "ai" else None
            cats[cat or "uncategorised"] += right
        assert {k: v["k"] for k, v in fig["by_kind"].items()} == pytest.approx(dict(kinds))
        assert {k: v["k"] for k, v in fig["by_category"].items()} == pytest.approx(dict(cats))
        assert set(fig["by_kind"]) == {"ai", "human"} and "uncategorised" in fig["by_category"]
        assert len(fig["by_category"]) >= 2
        o = fig["overall"]
        assert (o["low"], o["high"]) == pytest.approx(wilson(o["k"], o["n"]), abs=1e-4)  # rounded
    # each scripted model ranks its own AI labels right (the run's SAFE, the ablation's RISKY) and
    # ties every human pair
    assert base["by_kind"]["ai"]["rate"] == 1.0 and base["by_kind"]["human"]["rate"] == 0.5
    ai = pmr["held_out"]["by_kind"]["ai"]
    assert ai["ablated"]["rate"] == 1.0 and ai["change"] == 0.0 and ai["relative"] == 0.0
    o = pmr["held_out"]["overall"]
    assert o["change"] == pytest.approx(o["ablated"]["rate"] - o["run"]["rate"])
    assert o["relative"] == pytest.approx(o["ablated"]["rate"] / o["run"]["rate"] - 1)
    text = ablation.table(summary)
    assert "held-out accuracy" in text and "kind human" in text and "PM-judged proxy for them: skipped" in text


def test_the_scores_are_cached_reused_on_a_rerun_and_refused_when_the_model_changes(run):
    first = Rewards()
    summary = _ablate(run, first)
    run_pm = str(run / "pm" / "model")
    new_pm = str(run / _entry(summary)["folder"] / "pm" / "model")
    assert first.calls == {run_pm: 1, new_pm: 1} and first.loaded == {run_pm: 1, new_pm: 1}

    again = Rewards()
    assert _ablate(run, again) == summary
    assert not again.loaded and not again.calls  # nothing loaded, nothing scored

    # the run's preference model changes: its margins are scored afresh, the ablation's are reused
    cfg = run / "pm" / "model" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    changed = Rewards()
    _ablate(run, changed)
    assert changed.calls == {run_pm: 1}
    # a cache that is not whole (written by hand, or by an older writer killed midway) is not trusted
    cache = run / _entry(summary)["folder"] / "pm_margins.json"
    cache.write_text(cache.read_text()[: len(cache.read_text()) // 2])
    torn = Rewards()
    assert _entry(_ablate(run, torn))["pm"]["held_out"] == _entry(summary)["pm"]["held_out"]
    assert torn.calls == {new_pm: 1}
    assert json.loads(cache.read_text())["values"]  # whole again


def test_cached_scores_a_changed_set_of_ids_afresh_and_keeps_a_non_number_as_unscored(tmp_path):
    path = tmp_path / "c.json"
    calls = []

    def compute(vals):
        def f():
            calls.append(1)
            return vals
        return f

    assert ablation.cached(path, "k", ["a", "b"], compute([1.0, float("nan")]), {}) == {"a": 1.0, "b": None}
    assert ablation.cached(path, "k", ["a", "b"], compute([9.0, 9.0]), {}) == {"a": 1.0, "b": None}
    assert len(calls) == 1
    assert ablation.cached(path, "k", ["a", "b", "c"], compute([2.0, 3.0, 4.0]), {})["c"] == 4.0
    assert ablation.cached(path, "other", ["a", "b", "c"], compute([5.0, 5.0, 5.0]), {})["a"] == 5.0
    assert len(calls) == 3
    acc = ablation.held_out_accuracy([{"record_id": i, "label_source": "ai"} for i in "abc"],
                                     {"a": 1.0, "b": None, "c": -2.0}, lambda r: "x")
    assert acc["unscored"] == 1 and acc["overall"]["n"] == 2 and acc["overall"]["k"] == 1.0


def _scripted_eval(run: Path) -> None:
    write_answers(run, "base", [
        {"id": "rt-a", "category": "violence", "answers": ["a 0.1"]},
        {"id": "rt-b", "category": "violence", "answers": ["b 0.5"]},
        {"id": "rt-c", "category": "weapons", "answers": ["c 0.8"]},
        {"id": "rt-d", "category": "weapons", "answers": ["d 0.1", "d 0.9"]},
        {"id": "rt-e", "answers": ["e 0.0"]},
        {"id": "rt-f", "category": "drugs", "answers": ["f 0.0"]},
        {"id": "rt-g", "category": "drugs", "answers": ["g 0.0"]},
        {"id": "rt-h", "category": "drugs", "answers": ["h nan"]},
        {"id": "h-1", "kind": "helpful", "answers": ["help 0.0"]},
    ])
    write_answers(run, "rl_cai", [
        {"id": "rt-a", "category": "violence", "answers": ["A 0.9"]},
        {"id": "rt-b", "category": "violence", "answers": ["B 0.5"]},
        {"id": "rt-c", "category": "weapons", "answers": ["C 0.2"]},
        {"id": "rt-d", "category": "weapons", "answers": ["D 0.5", "D 0.5"]},
        {"id": "rt-e", "answers": ["E 1.0"]},
        {"id": "rt-f", "category": "drugs", "answers": [], "status": "missing"},
        {"id": "rt-h", "category": "drugs", "answers": ["H 1.0"]},
        {"id": "h-1", "kind": "helpful", "answers": ["HELP 1.0"]},
    ])


def test_the_harm_proxy_counts_wins_of_the_last_model_over_the_first(tmp_path):
    run = tmp_path / "run"
    _scripted_eval(run)
    ev, why = ablation.eval_answers(run, ["base", "sl_cai", "rl_cai"])  # sl_cai was not evaluated
    assert why is None and (ev.first, ev.last) == ("base", "rl_cai")
    assert ev.not_compared == {"no answer of rl_cai": 1, "rl_cai: no answer in the file": 1}
    rewards = Rewards()
    scorer = rewards("some/pm/model")
    scores = ablation.answer_scores(tmp_path / "answers.json", "key", ev, lambda: scorer, {})
    proxy = ablation.harm_proxy(ev, scores)
    # rt-a won, rt-b tied, rt-c lost, rt-d half its samples, rt-e won; rt-h has an unscored answer
    assert proxy["unscored"] == 1
    assert proxy["overall"]["n"] == 5 and proxy["overall"]["k"] == pytest.approx(3.0)
    cats = {c: (v["k"], v["n"]) for c, v in proxy["by_category"].items()}
    assert cats == {"violence": (1.5, 2), "weapons": (0.5, 2), "uncategorised": (1.0, 1)}
    assert (proxy["overall"]["low"], proxy["overall"]["high"]) == pytest.approx(wilson(3.0, 5))
    assert rewards.calls["some/pm/model"] == 1 and rewards.texts["some/pm/model"] == 2 * 7  # 7 samples; h-1 is not red-team

    only_one = tmp_path / "one"
    write_answers(only_one, "base", [{"id": "rt-a", "answers": ["x"]}])
    ev, why = ablation.eval_answers(only_one, ["base", "rl_cai"])
    assert ev is None and "1 of the models" in why
    ev, why = ablation.eval_answers(tmp_path / "nothing", ["base", "rl_cai"])
    assert ev is None and why.startswith("the run has no evaluation")


def test_with_an_evaluation_each_retrained_model_reports_the_proxy_and_its_change(run):
    # the evaluation's answers: base RISKY, rl_cai SAFE, on the run's own red-team prompts
    prompts = [r for r in Stage.view(run, "prompts").rows() if r["kind"] == "red_team"][::3][:4]
    for model, word in (("base", "RISKY"), ("rl_cai", "SAFE")):
        write_answers(run, model, [{"id": p["record_id"], "category": p["category"], "answers": [f"{word} {model}"]}
                                   for p in prompts])
    rewards = Rewards()
    summary = _ablate(run, rewards)
    harm = summary["harm"]
    assert harm["skipped"] is None and (harm["first"], harm["last"]) == ("base", "rl_cai") and harm["prompts"] == 4
    base = summary["baseline_pm"]["harm_proxy"]
    assert base["overall"]["rate"] == 1.0 and base["overall"]["n"] == 4  # the run's PM prefers SAFE
    proxy = _entry(summary)["pm"]["harm_proxy"]
    assert proxy["overall"]["ablated"]["rate"] == 0.0  # the retrained one prefers RISKY
    assert proxy["overall"]["change"] == -1.0 and proxy["overall"]["relative"] == -1.0
    assert {c: v["run"]["n"] for c, v in proxy["by_category"].items()} == dict(Counter(p["category"] for p in prompts))
    assert (run / "ablate" / "run_pm_answers.json").is_file()
    text = ablation.table(summary)
    assert "rl_cai's answer beats base's" in text and "-100.0 pt (-100.0%)" in text
    assert "not the evaluation's harm figures" in text and "policy itself is not retrained" in text
    again = Rewards()
    assert _ablate(run, again) == summary and not again.calls


def test_the_report_shows_the_retrained_figures_with_text_escaped(run):
    prompts = [r for r in Stage.view(run, "prompts").rows() if r["kind"] == "red_team"][:2]
    for model, word in (("base", "RISKY"), ("rl_cai", "SAFE")):
        write_answers(run, model, [{"id": p["record_id"], "category": PLANTED, "answers": [f"{word} {PLANTED}"]}
                                   for p in prompts])
    summary = _ablate(run, Rewards())
    page = constitution_code_section({"ablation": [{"file": "ablate/principle/summary.json", "summary": summary}]})
    assert PLANTED not in page and "category: &lt;script&gt;" in page
    assert "held-out accuracy" in page and "kind: human" in page and "rl_cai beats base" in page
    assert "−100.0 pt" in page or "-100.0 pt" in page
    assert "policy itself is not retrained" in page


def _eval_summary(path: Path, mean: float, rate: float, cats: dict[str, float]) -> None:
    """An evaluation summary with the harm figures of rl_cai (and of base, which must not be read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    harm = {"by_model": {"rl_cai": {"mean": mean, "low": mean - 0.1, "high": mean + 0.1, "n": 4},
                         "base": {"mean": 9.0, "low": 9.0, "high": 9.0, "n": 4}},
            "failure_rate": {"rl_cai": {"rate": rate, "low": 0.0, "high": 1.0, "k": rate * 4, "n": 4}},
            "by_category": {c: {"rl_cai": {"mean": v, "n": 1}, "base": {"mean": 9.0, "n": 1}} for c, v in cats.items()},
            "threshold": 2.0}
    path.write_text(json.dumps({"harm": harm}))


def test_retrain_policy_trains_ppo_on_the_new_pm_evaluates_it_and_sets_its_harm_beside_the_run(run):
    _eval_summary(run / "eval" / "summary.json", 2.0, 0.5, {"violence": 2.0, "weapons": 1.0})
    write_answers(run, "base", [{"id": "rt-a", "category": "violence", "answers": ["RISKY base"]}])
    write_answers(run, "rl_cai", [{"id": "rt-a", "category": "violence", "answers": ["SAFE rl"]}])
    calls = []

    def trained(cfg, name):
        return f"{cfg.run_dir}/{name}/model", f"fp-{Path(cfg.run_dir).name}-{name}"

    def ppo_run(sub, rows, fp, policy_dir, reward_dir, allow_changed):
        calls.append(("ppo", sub.run_dir, policy_dir, reward_dir, fp, len(rows)))

    def evaluate_run(sub, factory, release, trained_here, constitution, allow_changed, on_chunk):
        calls.append(("evaluate", sub.run_dir, trained_here("ppo")[0], trained_here("sft")[0]))
        # the base answers were the run's, copied; the policy's are for this evaluation to make
        assert (Path(sub.run_dir) / "eval" / "answers" / "base" / "rows.jsonl").is_file()
        assert not (Path(sub.run_dir) / "eval" / "answers" / "rl_cai").exists()
        _eval_summary(Path(sub.run_dir) / "eval" / "summary.json", 2.5, 0.75, {"violence": 3.0, "drugs": 1.0})

    summary, _ = ablation.run(run, only=[HARM], lm_factory=Judge, n_boot=50, reward=Rewards(), policy=True,
                              policy_steps={"ppo_run": ppo_run, "evaluate_run": evaluate_run, "trained": trained})
    sub = run / "ablate" / "principle" / HARM
    assert summary["retrain"] and [c[0] for c in calls] == ["ppo", "evaluate"]
    _, where, policy_dir, reward_dir, fp, n = calls[0]
    assert where == str(sub) and policy_dir == f"{run}/sft/model" and reward_dir == str(sub / "pm" / "model")
    assert n == len(Stage.view(run, "prompts").rows()) and ablation.model_hash(sub / "pm" / "model") in fp
    assert calls[1][1:] == ("evaluate", str(sub), f"{sub}/ppo/model", f"{run}/sft/model")[1:]
    pol = _entry(summary)["policy"]
    assert pol["retrained"] and pol["evaluation"] == str(sub / "eval" / "summary.json")
    h = pol["harm"]
    assert (h["mean_harm"]["run"], h["mean_harm"]["ablated"]) == (2.0, 2.5)
    assert h["mean_harm"]["change"] == pytest.approx(0.5) and h["mean_harm"]["relative"] == pytest.approx(0.25)
    assert h["failure_rate"]["change"] == pytest.approx(0.25) and h["failure_rate"]["relative"] == pytest.approx(0.5)
    assert h["by_category"]["violence"]["relative"] == pytest.approx(0.5)
    assert h["by_category"]["weapons"]["ablated"] is None and h["by_category"]["drugs"]["run"] is None
    text = ablation.table(summary)
    assert "new PPO policy, evaluated" in text and "+0.50 (+25.0%)" in text and "harm violence" in text
    page = constitution_code_section({"ablation": [{"file": "ablate/principle/summary.json", "summary": summary}]})
    assert "--retrain-policy" in page and "harm: violence" in page and "+25.0%" in page and "+0.50" in page
    summary["ablations"][0]["policy"]["harm"]["by_category"] = {PLANTED: {"run": 1.0, "ablated": 2.0}}
    page = constitution_code_section({"ablation": [{"file": "ablate/principle/summary.json", "summary": summary}]})
    assert PLANTED not in page and "harm: &lt;script&gt;" in page


@pytest.mark.parametrize("why,setup", [
    ("rl.method is dpo", lambda run: (run / "config.yaml").write_text(
        (run / "config.yaml").read_text().replace("method: ppo", "method: dpo"))),
    ("no finished evaluation", lambda run: None),
])
def test_retrain_policy_says_why_it_trains_no_policy(run, why, setup):
    setup(run)
    _eval_summary(run / "eval" / "summary.json", 2.0, 0.5, {}) if why != "no finished evaluation" else None
    fail = {"ppo_run": lambda *a: pytest.fail("trained"), "evaluate_run": lambda *a: pytest.fail("evaluated"),
            "trained": lambda cfg, name: pytest.fail("looked for a model")}
    summary, _ = ablation.run(run, only=[HARM], lm_factory=Judge, n_boot=50, reward=Rewards(), policy=True,
                              policy_steps=fail)
    pol = _entry(summary)["policy"]
    assert not pol["retrained"] and why in pol["why"]
    assert "policy: not evaluated: " in ablation.table(summary)
