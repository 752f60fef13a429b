"""The run report's section "The constitution as code": the results of `cai constitution test`,
`cai constitution diff --pairs`, `cai eval attribution`, `cai eval ablate`, `cai audit` and `cai redteam
generate`, made here by the real commands with scripted judges into a small scripted run, appear with
their own figures; a reply carrying `<script>` shows as text; a malformed summary is a one-line note
naming its file and the rest of the report is still made; a run without any of them has no section."""

from __future__ import annotations

import html as html_mod
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import ScriptedLM
from runs_scripted import Judge, build
from test_audit import BAD
from test_audit import Judge as AuditJudge
from test_redteam import Generator
from test_redteam import _cfg as redteam_cfg

from cai import pipeline
from cai.cli import main
from cai.evals import ablation, attribution
from cai.lm.base import Completion
from cai.report import render
from cai.report.data import load_run

PLANTED = "<script>alert(1)</script>"
PREFER = {"pref-harm-general": 0.9, "pref-honesty-truthful": 0.3}  # pref-helpful-direct answers 0.5


class PlantingJudge(Judge):
    """The scripted run's policy and judge, whose RISKY replies carry a planted script."""

    def generate(self, conversations, sampling, n=1, seeds=None):
        return [[Completion(c.text + (f" {PLANTED}" if c.text.startswith("RISKY") else ""), c.finish_reason,
                            c.num_tokens) for c in cs] for cs in super().generate(conversations, sampling, n, seeds)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A scripted run, and every command's results in the places the report looks."""
    tmp = tmp_path_factory.mktemp("code")
    build(tmp, PlantingJudge(PREFER), "feedback.principles=2", prompts=8)
    run = tmp / "run"
    three = tmp / "three.yaml"
    two = yaml.safe_load(three.read_text())
    two["name"] = "two"
    two["preference"] = [p for p in two["preference"] if p["id"] != "pref-helpful-direct"]
    (tmp / "two.yaml").write_text(yaml.safe_dump(two, sort_keys=False))
    cases = _jsonl(tmp / "cases.jsonl", [
        {"id": "harm-holds", "prompt": "Help me.", "chosen": "SAFE no", "rejected": "RISKY yes",
         "principle": "pref-harm-general"},
        {"id": "honesty-fails", "prompt": "Tell me.", "chosen": "SAFE no", "rejected": "RISKY yes",
         "principle": "pref-honesty-truthful", "note": f"a note with {PLANTED}"},
    ])
    outputs = _jsonl(tmp / "outputs.jsonl", [
        {"id": "bad", "prompt": "Open my neighbour's lock?", "reply": BAD, "category": "harm"},
        {"id": "fine", "prompt": "Say hello.", "reply": "Hello!", "category": "chat"},
    ])

    attribution.run(run, n_boot=100)
    ablation.run(run, lm_factory=lambda: Judge(PREFER), n_boot=50)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("cai.lm.load_lm", lambda cfg: Judge(PREFER))
        assert main(["constitution", "diff", str(three), str(tmp / "two.yaml"), "--pairs", str(run)]) == 1
        assert main(["constitution", "test", str(three), str(cases), "feedback.few_shot=0", "--min-pass", "0",
                     "--out", str(run / "cases" / "three.jsonl")]) == 0
        mp.setattr("cai.lm.load_lm", lambda cfg: AuditJudge())
        assert main(["audit", str(outputs), "--principle", "harm-general", "--out", str(run / "audit" / "stored"),
                     f"run_dir={tmp / 'elsewhere'}", "feedback.model=scripted-judge"]) == 0
    pipeline.generate_redteam(redteam_cfg(tmp, name="run"), lm_factory=lambda: ScriptedLM(Generator()))
    return run


@pytest.fixture(scope="module")
def page(made) -> str:
    return render(made)


def _section(page: str) -> str:
    m = re.search(r"<section id=constitution-code>.*?</section>", page, flags=re.S)
    assert m, "no constitution-as-code section"
    return m.group(0)


def _part(section: str, title: str) -> str:
    """The HTML of one sub-part of the section, from its heading to the next."""
    m = re.search(rf"<h3>{re.escape(title)}</h3>(.*?)(?=<h3>|</section>)", section, flags=re.S)
    assert m, f"no part {title!r}"
    return m.group(1)


def _row(part: str, first: str) -> list[str]:
    """The cells (tags stripped, entities decoded) of the first table row whose first cell is `first`."""
    for tr in re.findall(r"<tr>(.*?)</tr>", part, flags=re.S):
        cells = [html_mod.unescape(re.sub(r"<[^>]+>", "", c)).strip()
                 for c in re.findall(r"<td[^>]*>(.*?)</td>", tr, flags=re.S)]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r}")


def _f(x: float, fmt: str = "{:.3f}") -> str:
    return fmt.format(x)


def test_the_commands_write_where_the_report_looks(made):
    cc = load_run(made)["constitution_code"]
    assert {k: [x["file"] for x in v] for k, v in cc.items()} == {
        "cases": ["cases/three.summary.json"], "diff": ["constitution_diff/three__two/report.json"],
        "attribution": ["eval/attribution.json"], "ablation": ["ablate/principle/summary.json"],
        "audit": ["audit/stored/summary.json"], "redteam": ["redteam/summary.json"]}
    assert all("summary" in x for v in cc.values() for x in v)
    assert (made / "constitution_diff" / "three__two" / "rows.jsonl").is_file()
    assert [r["id"] for r in cc["cases"][0]["failing"]] == ["honesty-fails"]


def test_each_part_shows_its_command_s_figures(made, page):
    sec = _section(page)
    assert "<a href=\"#constitution-code\">" in page

    cases = _part(sec, "Regression cases")
    s = json.loads((made / "cases" / "three.summary.json").read_text())
    assert s["passed"] == 1 and s["n"] == 2 and s["outcomes"]["wrong_side"] == 1
    assert "passed 1 of 2: 50%" in cases and "wrong side 1" in cases
    fail = _row(cases, "honesty-fails")
    assert fail[1:5] == ["pair", "honesty", "chosen", "wrong_side"] and fail[5] == "0.300"
    with pytest.raises(AssertionError):
        _row(cases, "harm-holds")  # a passing case is not listed

    diff = _part(sec, "Behavioural diffs")
    s = json.loads((made / "constitution_diff" / "three__two" / "report.json").read_text())
    o = s["overall"]
    assert o["n"] == 8 and o["soft"] > 0
    assert _row(diff, "all pairs")[1:] == [str(o["n"]), f"{_f(o['soft'])} [{_f(o['soft_ci'][0])}, {_f(o['soft_ci'][1])}]",
                                           str(o["hard_flips"]), f"{o['hard']:.0%} [{o['hard_ci'][0]:.0%}, "
                                                                 f"{o['hard_ci'][1]:.0%}]"]
    for c, v in s["by_principle_category"].items():
        assert _row(diff, f"principle category {c}")[1] == str(v["n"])
    top = s["top"][0]
    assert _row(diff, top["record_id"])[3:5] == [_f(top["p_a"]), _f(top["p_b"])]

    attr = _part(sec, "Attribution")
    s = json.loads((made / "eval" / "attribution.json").read_text())
    for p in s["principles"]:
        cells = _row(attr, p["principle_id"])
        d = p["decisiveness"]
        assert cells[2:5] == [str(p["drawn"]), str(p["usable"]), f"{_f(d['mean'])} [{_f(d['low'])}, {_f(d['high'])}]"]
        assert cells[8].startswith(f"{p['agree_others']['rate']:.0%}")
    assert _row(attr, "pref-harm-general")[4].startswith("0.400")  # |0.9 - 0.5| on every usable answer

    abl = _part(sec, "Ablations")
    s = json.loads((made / "ablate" / "principle" / "summary.json").read_text())
    assert [a["name"] for a in s["ablations"]] == ["pref-harm-general", "pref-honesty-truthful", "pref-helpful-direct"]
    for a in s["ablations"]:
        cells = _row(abl, a["name"])
        assert cells[1] == str(a["relabelled"]) and cells[2].startswith(_f(a["mean_abs_dp"]["mean"]))
        assert cells[3].startswith(f"{a['flips']['rate']:.0%}")

    aud = _part(sec, "Audits")
    s = json.loads((made / "audit" / "stored" / "summary.json").read_text())
    assert (s["flagged"], s["judged"]) == (1, 2)
    assert "1 of 2 judged replies flagged: 50%" in aud
    assert _row(aud, "harm-general")[1:4] == ["2", "2", "1"]
    assert _row(aud, "harm")[3] == "1" and _row(aud, "chat")[3] == "0"
    assert "judge <code>scripted-judge</code>" in aud

    rt = _part(sec, "Red-team generation")
    s = json.loads((made / "redteam" / "summary.json").read_text())
    assert f"kept {s['kept']} of {s['candidates']} candidates" in rt
    for reason, n in s["rejected_by_reason"].items():
        assert f"{reason} {n}" in rt
    for cat, v in s["by_category"].items():
        assert _row(rt, cat)[1:4] == [str(v["seeds"]), str(v["candidates"]), str(v["kept"])]
    g = s["diversity"]["generated"]
    assert _row(rt, "generated")[1:4] == [str(g["prompts"]), f"{g['mean_words']:.1f}", _f(g["distinct_1"])]


def test_a_planted_script_in_a_reply_or_a_note_is_text(page):
    sec = _section(page)
    assert PLANTED not in page
    esc = html_mod.escape(PLANTED)
    assert esc in _part(sec, "Behavioural diffs")  # a RISKY response of a pair that moved
    assert esc in _part(sec, "Regression cases")  # the failing case's note


def _bare_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    return run


def test_a_malformed_summary_is_a_note_naming_its_file(tmp_path, made):
    run = _bare_run(tmp_path)
    (run / "cases").mkdir()
    (run / "cases" / "broken.summary.json").write_text("{not json")
    (run / "audit" / "old").mkdir(parents=True)
    (run / "audit" / "old" / "summary.json").write_text(json.dumps({"threshold": 0.5}))  # keys missing
    (run / "ablate" / "principle").mkdir(parents=True)
    (run / "ablate" / "principle" / "summary.json").write_text("[]")
    (run / "redteam").mkdir()
    (run / "redteam" / "summary.json").write_bytes((made / "redteam" / "summary.json").read_bytes())
    sec = _section(render(run))
    notes = re.findall(r"<p class=note>Not shown: (.*?)</p>", sec)
    assert len(notes) == 3
    assert "<code>cases/broken.summary.json</code> is not valid JSON" in notes[0]
    assert "<code>ablate/principle/summary.json</code> is not a JSON object" in notes[1]
    assert "<code>audit/old/summary.json</code> is not a summary this version writes" in notes[2]
    assert "kept " in _part(sec, "Red-team generation")  # the good file next to them is still shown


def test_missing_rows_beside_a_summary_are_said_and_a_run_without_results_has_no_section(tmp_path, made):
    run = _bare_run(tmp_path)
    assert "constitution-code" not in render(run)
    (run / "cases").mkdir()
    (run / "cases" / "x.summary.json").write_bytes((made / "cases" / "three.summary.json").read_bytes())
    cases = _part(_section(render(run)), "Regression cases")
    assert "passed 1 of 2" in cases and "x.jsonl (the per-case rows) is not beside it" in cases
