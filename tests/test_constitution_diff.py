"""`cai constitution diff A B --pairs RUN`: a run's stored pairs relabelled under two constitutions
by a scripted judge; a constitution diffed with itself flips nothing, one whose harm principles are
inverted flips exactly the pairs they decide, missing labels are counted, never imputed, and a killed
diff resumes to the rows of an uninterrupted one, starting afresh when a constitution changed."""

from __future__ import annotations

import json
import math

import pytest

from cai import constitution as C
from cai.cli import main
from cai.config import load_config
from cai.evals import behaviour as B
from cai.lm.base import Completion

DEFAULT = C.load("default")
HARM = {p.id for p in DEFAULT.preference if p.category == "harm"}
INVERTED = "Which of these assistant replies is more harmful? Pick the one a careless person would give."


class PairPolicy:
    """Two answers per prompt, one marked SAFE and one UNSAFE, in an order set by the seed."""

    name = "pair-policy"

    def generate(self, conversations, sampling, n=1, seeds=None):
        out = []
        for c, s in zip(conversations, seeds):
            texts = [f"SAFE answer to: {c[-1]['content'][:40]}", f"UNSAFE answer to: {c[-1]['content'][:40]}"]
            if s % 2:
                texts.reverse()
            out.append([Completion(t, "stop", 6) for t in texts][:n])
        return out

    def score_options(self, contexts, options):  # pragma: no cover - the policy is never a judge
        raise AssertionError("the policy does not judge")


class HarmJudge:
    """Reads the instruction of each multiple-choice question: a harm principle's instruction makes
    it prefer the SAFE reply (0.8), the inverted one the UNSAFE reply; any other principle prefers
    the reply that sorts first (0.6). `low_mass_for` instructions get 1% of the probability."""

    name = "harm-judge"

    def __init__(self, harm_instructions, low_mass_for=()):
        self.harm = set(harm_instructions)
        self.low = set(low_mass_for)
        self.asked = 0

    def generate(self, conversations, sampling, n=1, seeds=None):  # pragma: no cover - no chain of thought
        raise AssertionError("no chain of thought here")

    def score_options(self, contexts, options):
        out = []
        for ctx in contexts:
            self.asked += 1
            q = ctx[-2]["content"] if isinstance(ctx, list) else ctx
            instr = q.split("</conversation>\n\n", 1)[1].split("\n\nOptions:", 1)[0]
            a = q.split("(A) <reply>\n", 1)[1].split("\n</reply>", 1)[0]
            b = q.split("(B) <reply>\n", 1)[1].split("\n</reply>", 1)[0]
            if instr in self.harm:
                p = 0.8 if a.startswith("SAFE") else 0.2
            elif instr == INVERTED:
                p = 0.2 if a.startswith("SAFE") else 0.8
            else:
                p = 0.6 if a < b else 0.4
            mass = 0.01 if instr in self.low else 0.9
            out.append([math.log(mass * p), math.log(mass * (1 - p))])
        return out


def harm_judge(**kw) -> HarmJudge:
    return HarmJudge({p.instruction for p in DEFAULT.preference if p.category == "harm"}, **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run whose prompts and pairs stages finished (24 red-team prompts, pairs from PairPolicy)."""
    from cai import pipeline

    d = tmp_path_factory.mktemp("run") / "r"
    cfg = load_config(None, [f"run_dir={d}", "prompts.red_team.0.limit=24", "pairs.model=policy",
                             "feedback.format=chat"])
    pipeline.run(cfg, start="prompts", stop="prompts", lm_factory=PairPolicy)
    pipeline.run(cfg, start="pairs", stop="pairs", lm_factory=PairPolicy)
    return d


def _constitution(tmp_path, name, invert=()):
    d = DEFAULT.to_dict()
    for p in d["preference"]:
        if p["id"] in invert:
            p["instruction"] = INVERTED
    path = tmp_path / name
    path.write_text(__import__("yaml").safe_dump(d, sort_keys=False))
    return C.load(path)


@pytest.fixture
def judge_as_model(monkeypatch):
    import cai.lm

    seen, holder = [], {}
    monkeypatch.setattr(cai.lm, "load_lm", lambda mc: seen.append(mc) or holder["lm"])

    def use(lm):
        holder["lm"] = lm
        return seen

    return use


def test_the_fixture_run_has_pairs_with_categories(run_dir):
    pairs = B.run_pairs(run_dir)
    assert len(pairs) == 24 and all(p["category"] for p in pairs)
    assert len(B.run_pairs(run_dir, limit=5)) == 5


def test_a_constitution_diffed_with_itself_flips_nothing(run_dir, judge_as_model, capsys, tmp_path):
    judge = harm_judge()
    judge_as_model(judge)
    out = tmp_path / "self.json"
    assert main(["constitution", "diff", "default", "default", "--pairs", str(run_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no differences" in text and "behavioural diff: 24 pairs" in text
    report = json.loads(out.read_text())
    assert report["compared"] == 24 and report["not_labelled"] == {"a": {}, "b": {}}
    assert report["overall"]["soft"] == 0.0 and report["overall"]["hard"] == 0.0 and report["overall"]["hard_flips"] == 0
    assert report["overall"]["hard_ci"][0] == 0.0 and report["overall"]["hard_ci"][1] > 0  # an interval, not a point
    # every pair was labelled under A in both orders; under B each question was the same, so none was asked again
    assert judge.asked == 2 * 24
    assert report["questions"] == {"a": 48, "b_new": 0, "b_unchanged": 48}
    rows = [json.loads(line) for line in (tmp_path / "self.pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["p_a"] == r["p_b"] and r["hard"] is False for r in rows)
    assert report["top"] == [] and "moved most" not in text  # nothing moved, so nothing is listed


def test_inverting_the_harm_principles_flips_exactly_the_pairs_they_decide(run_dir, tmp_path):
    inverted = _constitution(tmp_path, "inverted.yaml", invert=HARM)
    cfg = B.run_config(run_dir)
    pairs = B.run_pairs(run_dir)
    report, rows = B.behavioural_diff(harm_judge(), DEFAULT, inverted, pairs, cfg.feedback, cfg.seed, top=3)
    decided = {r["record_id"] for r in rows if set(r["principle_ids_a"]) <= HARM}
    assert decided and len(decided) < len(rows)  # some pairs drew a harm principle, some did not
    flipped = {r["record_id"] for r in rows if r["hard"]}
    assert flipped == decided
    for r in rows:
        assert r["principle_ids_a"] == r["principle_ids_b"]  # the same draw under both
        if r["record_id"] in decided:
            assert r["p_a"] == pytest.approx(1 - r["p_b"]) and r["soft"] == pytest.approx(0.6)
            assert (r["p_a"] > 0.5) == r["responses"][0].startswith("SAFE")
        else:
            assert r["soft"] == 0.0
    # under B only the questions of the harm principles were new
    assert report["questions"] == {"a": 48, "b_new": 2 * len(decided), "b_unchanged": 48 - 2 * len(decided)}
    by_cat = report["by_principle_category"]
    assert by_cat["harm"]["hard"] == 1.0 and by_cat["harm"]["n"] == len(decided)
    assert all(e["hard"] == 0.0 and e["soft"] == 0.0 for c, e in by_cat.items() if c != "harm")
    assert report["overall"]["hard_flips"] == len(decided)
    assert report["overall"]["hard"] == pytest.approx(round(len(decided) / 24, 4))
    assert report["by_harm_category"].keys() == {p["category"] for p in pairs}
    assert sum(e["n"] for e in report["by_harm_category"].values()) == 24
    assert [t["record_id"] for t in report["top"]] == sorted(decided)[:3]  # equal moves: by record id
    text = B.table(report)
    assert "by principle category:" in text and "FLIP" in text and "by harm category:" in text


def test_overrides_set_the_judge_and_fixed_principles_make_every_pair_flip(run_dir, tmp_path, judge_as_model,
                                                                           capsys):
    inverted = _constitution(tmp_path, "one.yaml", invert={"pref-harm-general"})
    seen = judge_as_model(harm_judge())
    out = tmp_path / "d.json"
    assert main(["constitution", "diff", "default", inverted.source, "--pairs", str(run_dir), "--limit", "6",
                 "feedback.model=another-judge", "feedback.principle_ids=[pref-harm-general,pref-helpful-direct]",
                 "--out", str(out), "--top", "2"]) == 1  # the textual diff is not empty
    text = capsys.readouterr().out
    assert "~ preference/pref-harm-general" in text
    assert seen[0].name == "another-judge"
    report = json.loads(out.read_text())
    assert report["pairs"] == 6 and report["feedback"]["principle_ids"] == ["pref-harm-general", "pref-helpful-direct"]
    # averaged with a principle that does not move, the harm principle still decides every pair
    assert report["overall"]["hard"] == 1.0 and report["overall"]["soft"] == pytest.approx(0.3)
    assert len(report["top"]) == 2 and text.count("FLIP") == 2


def test_labels_missing_under_either_side_are_counted_never_imputed(run_dir, tmp_path):
    inverted = _constitution(tmp_path, "inv.yaml", invert=HARM)
    cfg = B.run_config(run_dir)
    pairs = B.run_pairs(run_dir)
    judge = harm_judge(low_mass_for={INVERTED})  # abstains on every inverted question
    report, rows = B.behavioural_diff(judge, DEFAULT, inverted, pairs, cfg.feedback, cfg.seed)
    decided = [r for r in rows if set(r["principle_ids_a"]) <= HARM]
    assert decided
    assert report["not_labelled"] == {"a": {}, "b": {"abstain:low_option_mass": len(decided)}}
    assert report["compared"] == 24 - len(decided) and report["overall"]["n"] == report["compared"]
    assert report["overall"]["hard_flips"] == 0  # the abstentions are not counted as flips
    assert all(r["soft"] is None and r["hard"] is None and r["p_b"] is None for r in decided)
    assert "no label under" in B.table(report)


def test_diff_errors(run_dir, tmp_path, capsys, judge_as_model):
    judge_as_model(harm_judge())
    assert main(["constitution", "diff", "default", "default", "feedback.model=x"]) == 2
    assert "need --pairs RUN" in capsys.readouterr().err
    assert main(["constitution", "diff", "default", "default", "--limit", "3"]) == 2
    assert main(["constitution", "diff", "default", "default", "--pairs", str(tmp_path)]) == 2
    assert "config.yaml: no such file" in capsys.readouterr().err
    assert main(["constitution", "diff", "default", "default", "--pairs", str(run_dir), "--limit", "0"]) == 2
    assert main(["constitution", "diff", "default", "default", "--pairs", str(run_dir), "feedback.modl=x"]) == 2
    assert "unknown key 'modl'" in capsys.readouterr().err
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main(["constitution", "diff", "default", "default", "--pairs", str(half)]) == 2
    assert "the pairs stage has not completed" in capsys.readouterr().err


def test_the_flip_figures_by_hand():
    rows = [{"soft": 0.4, "hard": True}, {"soft": 0.0, "hard": False}, {"soft": 0.2, "hard": False},
            {"soft": 0.6, "hard": True}]
    s = B.flip_stats(rows, seed=1)
    assert (s["n"], s["soft"], s["hard_flips"], s["hard"]) == (4, 0.3, 2, 0.5)
    assert s["soft_ci"][0] <= 0.3 <= s["soft_ci"][1] and s["soft_ci"] == B.flip_stats(rows, seed=1)["soft_ci"]
    assert B.side(0.5) == 0 and B.side(0.5 + 1e-12) == 0 and B.side(0.51) == 1 and B.side(0.2) == -1
    assert B.flip_stats([], seed=0) == {"n": 0, "soft": None, "soft_ci": None, "hard_flips": 0, "hard": None,
                                        "hard_ci": None}


def test_the_memo_asks_each_question_once_and_answers_repeats_as_the_first_time():
    class Counting:
        name = "counting"

        def __init__(self):
            self.calls = []
            self.n = 0

        def score_options(self, contexts, options):
            self.calls.append(list(contexts))
            self.n += 1
            return [[-1.0 * self.n, -2.0] for _ in contexts]

        def generate(self, conversations, sampling, n=1, seeds=None):
            self.calls.append(list(conversations))
            return [[Completion(f"{c}:{s}", "stop", 1)] for c, s in zip(conversations, seeds)]

    inner = Counting()
    memo = B.Memo(inner)
    assert memo.name == "counting" and memo.tokenizer is None
    first = memo.score_options(["q1", "q2", "q1"], [["A", "B"]] * 3)
    assert inner.calls == [["q1", "q2"]] and first[0] == first[2]
    again = memo.score_options(["q2", "q3", "q1"], [["A", "B"], ["A", "B"], ["Yes", "No"]])
    assert inner.calls[-1] == ["q3", "q1"]  # q1 with other options is another question
    assert again[0] == first[1]  # answered from memory, not by the second call
    assert (memo.asked, memo.reused) == (4, 2)
    from cai.config import Sampling

    s = Sampling()
    out = memo.generate(["p", "p"], s, seeds=[1, 2])
    assert [o[0].text for o in out] == ["p:1", "p:2"]
    assert memo.generate(["p"], s, seeds=[2])[0][0].text == "p:2" and inner.calls[-1] == ["p", "p"]


# ---- resuming after a kill --------------------------------------------------------------------


class Killed(BaseException):
    pass


class DyingJudge(HarmJudge):
    """A HarmJudge killed when asked for its `dies_at`+1-th batch (None: never)."""

    def __init__(self, *args, dies_at=None, **kw):
        super().__init__(*args, **kw)
        self.dies_at, self.calls = dies_at, 0

    def score_options(self, contexts, options):
        if self.calls == self.dies_at:
            raise Killed
        self.calls += 1
        return super().score_options(contexts, options)


def _dying(dies_at=None) -> DyingJudge:
    return DyingJudge({p.instruction for p in DEFAULT.preference if p.category == "harm"}, dies_at=dies_at)


CHUNK = ["feedback.chunk_size=5"]  # 24 pairs: chunks of 5, 5, 5, 5, 4


@pytest.mark.parametrize("kill", ["judge:4", "judge:5", "interrupt:2"])  # chunk 3 before its A call; at its B call
def test_a_killed_diff_resumes_to_the_rows_of_an_uninterrupted_one(run_dir, tmp_path, kill):
    inverted = _constitution(tmp_path, "inverted.yaml", invert=HARM)
    whole_judge = _dying()
    whole, whole_rows, st, _ = B.run(run_dir, DEFAULT, inverted, CHUNK, folder=tmp_path / "whole",
                                     lm_factory=lambda: whole_judge)
    per_chunk = [2 * len(r["principle_ids_a"]) + 2 * len(r["principle_ids_b"]) for r in whole_rows]
    assert whole["pairs"] == 24 and whole_judge.calls > 5  # more than one call for some chunks

    how, at = kill.split(":")
    first = _dying(int(at) if how == "judge" else None)
    written = []

    def stop(i):
        written.append(i)
        if how == "interrupt" and len(written) == int(at):
            raise KeyboardInterrupt

    with pytest.raises(Killed if how == "judge" else KeyboardInterrupt):
        B.run(run_dir, DEFAULT, inverted, CHUNK, folder=tmp_path / "killed", lm_factory=lambda: first, on_chunk=stop)
    folder = tmp_path / "killed"
    kept = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    assert 0 < len(kept) < 24 and len(kept) % 5 == 0 and len(kept) == 5 * len(written)  # whole chunks only
    if how == "interrupt":
        with open(folder / "rows.jsonl", "a") as f:
            f.write('{"record_id": "torn')  # a kill inside a write: cut off on reopen
    second = _dying()
    resumed, rows, _, changed = B.run(run_dir, DEFAULT, inverted, CHUNK, folder=folder, lm_factory=lambda: second)
    assert changed == []
    assert (folder / "rows.jsonl").read_bytes() == (tmp_path / "whole" / "rows.jsonl").read_bytes()
    assert len({r["record_id"] for r in rows}) == 24 and rows == whole_rows
    assert {k: v for k, v in resumed.items() if k != "folder"} == {k: v for k, v in whole.items() if k != "folder"}
    # the work done again is at most what the killed run asked of the chunk it was in
    redone = first.asked + second.asked - whole_judge.asked
    chunk_in_flight = sum(per_chunk[len(kept):len(kept) + 5])
    assert 0 <= redone <= chunk_in_flight
    in_flight = whole_rows[len(kept):len(kept) + 5]
    if kill == "judge:5":  # killed asking the chunk's B questions: its A questions are asked again
        assert redone == sum(r["questions"]["a"] for r in in_flight) > 0
    else:  # killed before the chunk's first call, or between chunks: nothing is asked twice
        assert redone == 0
    assert second.asked == sum(r["questions"]["a"] + r["questions"]["b_new"] for r in whole_rows[len(kept):])


def test_a_changed_constitution_starts_the_diff_afresh_and_an_unchanged_one_asks_nothing(run_dir, tmp_path,
                                                                                         judge_as_model, capsys):
    mine = _constitution(tmp_path, "mine.yaml", invert={"pref-harm-general"})
    folder = run_dir / "constitution_diff" / "default__mine"
    args = ["constitution", "diff", "default", mine.source, "--pairs", str(run_dir), *CHUNK]
    judge = _dying()
    judge_as_model(judge)
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"rows and report in {folder}" in out
    before = (folder / "rows.jsonl").read_bytes()
    report = json.loads((folder / "report.json").read_text())
    assert report["b"]["hash"] == mine.hash and report["pairs"] == 24 and judge.asked > 0

    again = _dying()
    judge_as_model(again)
    assert main(args) == 1
    assert again.asked == 0 and (folder / "rows.jsonl").read_bytes() == before  # finished: nothing asked again
    assert "started afresh" not in capsys.readouterr().err

    edited = _constitution(tmp_path, "mine.yaml", invert=HARM)  # the same file, other text
    assert edited.hash != mine.hash
    third = _dying()
    judge_as_model(third)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "started afresh" in err and mine.hash in err and edited.hash in err
    fresh = _dying()
    _, fresh_rows, _, _ = B.run(run_dir, DEFAULT, edited, CHUNK, folder=tmp_path / "fresh", lm_factory=lambda: fresh)
    assert third.asked == fresh.asked > 0  # no old row was reused
    assert (folder / "rows.jsonl").read_bytes() == (tmp_path / "fresh" / "rows.jsonl").read_bytes() != before
    assert json.loads((folder / "report.json").read_text())["b"]["hash"] == edited.hash


def test_a_smaller_limit_reuses_the_pairs_it_shares(run_dir, tmp_path):
    first = _dying()
    _, rows6, _, _ = B.run(run_dir, DEFAULT, DEFAULT, CHUNK, limit=10, folder=tmp_path / "d", lm_factory=lambda: first)
    second = _dying()
    report, rows, _, changed = B.run(run_dir, DEFAULT, DEFAULT, CHUNK, folder=tmp_path / "d",
                                     lm_factory=lambda: second)
    assert changed == [] and rows[:10] == rows6 and report["pairs"] == 24
    assert second.asked == 2 * 14 and first.asked == 2 * 10  # only the 14 pairs not done before
