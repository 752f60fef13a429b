"""Tests for the `prompts` stage: prompt sources, de-duplication, limits, errors and the stage run."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest

from cai.config import PipelineConfig, PromptsConfig, PromptSource, SLConfig
from cai.records import record_id_for
from cai.rundir import ResumeError, Stage
from cai.stages import prompts as P
from cai.stages.prompts import PromptError, collect, helpful_needed, read_source

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf"
HARMLESS_TEST = HH / "harmless-base" / "test.jsonl.gz"


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _hh(human: str, assistant: str = "Sure.", more: str = "") -> str:
    return f"\n\nHuman: {human}\n\nAssistant: {assistant}{more}"


# ---- builtin sets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["red_team", "helpful"])
def test_builtin_sets(name):
    rows = read_source(PromptSource(f"builtin:{name}"))
    assert len(rows) >= 50
    ids = [r["record_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert len({r["prompt"] for r in rows}) == len(rows)
    cats = {r["category"] for r in rows}
    assert None not in cats and len(cats) >= 4
    assert all(r["prompt"].strip() == r["prompt"] and r["prompt"] for r in rows)
    assert all(r["source"] == f"builtin:{name}" for r in rows)


def test_builtin_sets_do_not_share_ids_or_prompts():
    red = collect([PromptSource("builtin:red_team")], "red_team")
    helpful = collect([PromptSource("builtin:helpful")], "helpful")
    assert not {r["record_id"] for r in red} & {r["record_id"] for r in helpful}
    assert not {r["prompt"] for r in red} & {r["prompt"] for r in helpful}
    assert {r["kind"] for r in red} == {"red_team"} and {r["kind"] for r in helpful} == {"helpful"}


def test_unknown_builtin():
    with pytest.raises(PromptError, match="builtin:nope"):
        read_source(PromptSource("builtin:nope"))


def test_builtin_limit():
    full = read_source(PromptSource("builtin:red_team"))
    assert read_source(PromptSource("builtin:red_team", limit=5)) == full[:5]


# ---- JSONL ----------------------------------------------------------------------------------


def test_jsonl_prompt_column(tmp_path):
    p = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "  first question  ", "category": "a"},
        {"prompt": "second question", "id": "my-2"},
        {"prompt": "third", "id": 7},
    ])
    rows = read_source(PromptSource(str(p)))
    assert [r["prompt"] for r in rows] == ["first question", "second question", "third"]
    assert [r["category"] for r in rows] == ["a", None, None]
    assert rows[0]["record_id"] == record_id_for(str(p), "first question")
    assert rows[1]["record_id"] == "my-2"  # a string id is kept
    assert rows[2]["record_id"] == record_id_for(str(p), "third")  # a non-string id is not
    assert all(r["source"] == str(p) for r in rows)


def test_jsonl_blank_lines_skipped(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b"}\n')
    assert [r["prompt"] for r in read_source(PromptSource(str(p)))] == ["a", "b"]


def test_jsonl_custom_field(tmp_path):
    p = _jsonl(tmp_path / "q.jsonl", [{"question": "Why is the sky blue?", "prompt": "not this"},
                                      {"question": "How do tides work?"}])
    rows = read_source(PromptSource(str(p), field="question"))
    assert [r["prompt"] for r in rows] == ["Why is the sky blue?", "How do tides work?"]


def test_custom_field_missing_names_line(tmp_path):
    p = _jsonl(tmp_path / "q.jsonl", [{"question": "ok?"}, {"other": "x"}])
    with pytest.raises(PromptError, match=rf"{p}:2: no field 'question'"):
        read_source(PromptSource(str(p), field="question"))


def test_custom_field_with_hh_format(tmp_path):
    p = _jsonl(tmp_path / "h.jsonl", [{"dialog": _hh("Is it going to rain?")}])
    rows = read_source(PromptSource(str(p), field="dialog", format="hh"))
    assert rows[0]["prompt"] == "Is it going to rain?"


# ---- hh-rlhf transcripts --------------------------------------------------------------------


HH_ROWS = [
    {"chosen": _hh("How do I bake bread?", "Mix flour, water and yeast.", _hh("How long?", "An hour.")),
     "rejected": _hh("How do I bake bread?", "No.")},
    {"chosen": _hh("What is a good name for a cat?"), "rejected": _hh("What is a good name for a cat?", "Rex")},
    {"chosen": _hh("How do I bake bread?", "Different answer."), "rejected": _hh("How do I bake bread?")},
]


def test_hh_jsonl(tmp_path):
    p = _jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    rows = read_source(PromptSource(str(p)))
    # the first human turn only, duplicates (same first turn) dropped
    assert [r["prompt"] for r in rows] == ["How do I bake bread?", "What is a good name for a cat?"]


def test_hh_jsonl_gz(tmp_path):
    p = tmp_path / "hh.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        for r in HH_ROWS:
            f.write(json.dumps(r) + "\n")
    rows = read_source(PromptSource(str(p)))
    assert [r["prompt"] for r in rows] == ["How do I bake bread?", "What is a good name for a cat?"]
    assert rows[0]["record_id"] == record_id_for(str(p), "How do I bake bread?")


def test_hh_transcript_field(tmp_path):
    p = _jsonl(tmp_path / "t.jsonl", [{"transcript": _hh("Can you help me move?")}])
    assert read_source(PromptSource(str(p)))[0]["prompt"] == "Can you help me move?"


def test_hh_without_human_turn_names_line(tmp_path):
    p = _jsonl(tmp_path / "hh.jsonl", [HH_ROWS[0], {"chosen": "\n\nAssistant: nobody asked"}])
    with pytest.raises(PromptError, match=rf"{p}:2: .*Human"):
        read_source(PromptSource(str(p)))


def test_forced_hh_format_without_transcript_field(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [{"prompt": "plain"}])
    with pytest.raises(PromptError, match=rf"{p}:1: no hh-rlhf transcript field"):
        read_source(PromptSource(str(p), format="hh"))


# ---- chat rows ------------------------------------------------------------------------------


def test_messages_rows(tmp_path):
    p = _jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hello?"},
                      {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Later turn"}]},
        {"messages": [{"role": "user", "content": "  Second  "}]},
    ])
    assert [r["prompt"] for r in read_source(PromptSource(str(p)))] == ["Hello?", "Second"]


def test_messages_without_user_turn(tmp_path):
    p = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "assistant", "content": "only me"}]}])
    with pytest.raises(PromptError, match=rf"{p}:1: the prompt is empty"):
        read_source(PromptSource(str(p)))


# ---- datasets -------------------------------------------------------------------------------


def test_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["alpha?", "beta?", "alpha?"], "category": ["x", "y", "x"]})
    path = tmp_path / "ds"
    ds.save_to_disk(str(path))
    rows = read_source(PromptSource(str(path)))
    assert [r["prompt"] for r in rows] == ["alpha?", "beta?"]
    assert [r["category"] for r in rows] == ["x", "y"]
    assert rows[0]["record_id"] == record_id_for(str(path), "alpha?")


def test_datasets_dict_split_and_hh(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"chosen": [_hh("train q")]}),
        "test": datasets.Dataset.from_dict({"chosen": [_hh("test q1"), _hh("test q2")]}),
    })
    path = tmp_path / "dd"
    dd.save_to_disk(str(path))
    assert [r["prompt"] for r in read_source(PromptSource(str(path), split="test"))] == ["test q1", "test q2"]
    assert [r["prompt"] for r in read_source(PromptSource(str(path)))] == ["train q"]
    with pytest.raises(PromptError, match="no split 'validation'"):
        read_source(PromptSource(str(path), split="validation"))


# ---- de-duplication and limit ---------------------------------------------------------------


def test_dedup_keeps_first_in_file_order(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [
        {"prompt": "b", "category": "first"}, {"prompt": "a"}, {"prompt": " b ", "category": "second"},
        {"prompt": "c"}, {"prompt": "a"},
    ])
    rows = read_source(PromptSource(str(p)))
    assert [r["prompt"] for r in rows] == ["b", "a", "c"]
    assert rows[0]["category"] == "first"


def test_limit_counts_unique_prompts(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    assert [r["prompt"] for r in read_source(PromptSource(str(p), limit=2))] == ["a", "b"]
    assert [r["prompt"] for r in read_source(PromptSource(str(p), limit=1))] == ["a"]
    assert len(read_source(PromptSource(str(p), limit=10))) == 3


def test_limit_zero_reads_nothing(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert read_source(PromptSource(str(p), limit=0)) == []


def test_limit_stops_before_bad_rows(tmp_path):
    # rows past the limit are never read, so a bad line after it does not matter
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "b"}, "{not json"])
    assert len(read_source(PromptSource(str(p), limit=2))) == 2


# ---- errors ---------------------------------------------------------------------------------


def test_bad_json_line_names_file_and_line(tmp_path):
    p = _jsonl(tmp_path / "e.jsonl", [{"prompt": "ok"}, {"prompt": "ok2"}, '{"prompt": "broken'])
    with pytest.raises(PromptError, match=rf"{p}:3: not valid JSON"):
        read_source(PromptSource(str(p)))


def test_row_without_prompt_names_line(tmp_path):
    p = _jsonl(tmp_path / "e.jsonl", [{"prompt": "ok"}, {"question": "where is the prompt?"}])
    with pytest.raises(PromptError, match=rf"{p}:2: no prompt found"):
        read_source(PromptSource(str(p)))


@pytest.mark.parametrize("value", ["", "   \n", None, 42, ["a list"]])
def test_empty_or_non_string_prompt_names_line(tmp_path, value):
    p = _jsonl(tmp_path / "e.jsonl", [{"prompt": "ok"}, {"prompt": "ok2"}, {"prompt": value}])
    with pytest.raises(PromptError, match=rf"{p}:3: the prompt is empty or not a string"):
        read_source(PromptSource(str(p)))


@pytest.mark.parametrize("line", ['["a", "b"]', '"just a string"', "17", "null"])
def test_non_object_line_names_line(tmp_path, line):
    p = _jsonl(tmp_path / "e.jsonl", [{"prompt": "ok"}, line])
    with pytest.raises(PromptError, match=rf"{p}:2: expected a JSON object"):
        read_source(PromptSource(str(p)))


def test_line_numbers_count_blank_lines(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text('{"prompt": "ok"}\n\n\n{oops}\n')
    with pytest.raises(PromptError, match=rf"{p}:4:"):
        read_source(PromptSource(str(p)))


def test_gz_errors_name_line(tmp_path):
    p = tmp_path / "e.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"chosen": _hh("fine")}) + "\n" + json.dumps({"nothing": 1}) + "\n")
    with pytest.raises(PromptError, match=rf"{p}:2:"):
        read_source(PromptSource(str(p)))


def test_missing_file_with_explicit_format(tmp_path):
    p = tmp_path / "missing.jsonl"
    with pytest.raises(PromptError, match="no such file") as e:
        read_source(PromptSource(str(p), format="jsonl"))
    assert str(p) in str(e.value)


def test_missing_file_with_auto_format(tmp_path):
    p = tmp_path / "missing.jsonl"
    with pytest.raises(PromptError, match="missing.jsonl"):
        read_source(PromptSource(str(p)))


def test_duplicate_record_ids_across_sources(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"id": "x-1", "prompt": "one"}, {"id": "shared", "prompt": "two"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"id": "shared", "prompt": "three"}])
    with pytest.raises(PromptError) as e:
        collect([PromptSource(str(a)), PromptSource(str(b))], "red_team")
    msg = str(e.value)
    assert "'shared'" in msg and str(a) in msg and str(b) in msg


def test_same_file_twice_is_a_duplicate(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "one"}])
    with pytest.raises(PromptError, match="also used by"):
        collect([PromptSource(str(a)), PromptSource(str(a))], "helpful")


def test_same_text_in_two_files_gets_two_ids(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "same"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "same"}])
    rows = collect([PromptSource(str(a)), PromptSource(str(b))], "red_team")
    assert len(rows) == 2 and rows[0]["record_id"] != rows[1]["record_id"]
    assert [r["source"] for r in rows] == [str(a), str(b)]
    assert set(rows[0]) == {"record_id", "kind", "prompt", "category", "source"}


# ---- the real hh-rlhf test split ------------------------------------------------------------


@pytest.mark.skipif(not HARMLESS_TEST.is_file(), reason=f"hh-rlhf data not found at {HH}")
def test_real_hh_rlhf_harmless_base():
    rows = read_source(PromptSource(str(HARMLESS_TEST), limit=20))
    assert len(rows) == 20
    assert len({r["record_id"] for r in rows}) == 20
    assert len({r["prompt"] for r in rows}) == 20
    for r in rows:
        assert r["prompt"] and r["prompt"] == r["prompt"].strip()
        assert "Human:" not in r["prompt"] and "Assistant:" not in r["prompt"]
    # each prompt is the first human turn of a row of the file
    with gzip.open(HARMLESS_TEST, "rt", encoding="utf-8") as f:
        firsts = set()
        for _, line in zip(range(200), f):
            chosen = json.loads(line)["chosen"]
            firsts.add(chosen.split("\n\nHuman:", 1)[1].split("\n\nAssistant:", 1)[0].strip())
    assert {r["prompt"] for r in rows} <= firsts


# ---- helpful_needed -------------------------------------------------------------------------


def _minimal_helpful(n_red: int, fraction: float) -> int:
    """The least h whose share h / (n_red + h) reaches `fraction` (as Python compares them)."""
    h = max(0, math.floor(n_red * fraction / (1 - fraction)) - 2)
    while n_red + h and h / (n_red + h) < fraction:
        h += 1
    return h


@pytest.mark.parametrize("n_red, fraction", [(48, 0.33), (10, 0.5), (7, 0.5), (64, 0.25), (5, 0.1), (100, 0.75)])
def test_helpful_needed_reaches_the_fraction_minimally(n_red, fraction):
    h = helpful_needed(n_red, fraction)
    assert h / (n_red + h) >= fraction
    assert h == 0 or (h - 1) / (n_red + h - 1) < fraction
    assert h == _minimal_helpful(n_red, fraction)


def test_helpful_needed_edges():
    assert helpful_needed(10, 0.0) == 0
    assert helpful_needed(0, 0.5) == 0
    assert helpful_needed(10, 0.5) == 10


def test_helpful_needed_exact_fractions():
    bad = []
    for n_red in range(0, 60):
        for pct in range(1, 100):
            want = _minimal_helpful(n_red, pct / 100)
            got = helpful_needed(n_red, pct / 100)
            if got != want:
                bad.append((n_red, pct / 100, got, want))
    assert not bad, bad[:5]


# ---- stage run ------------------------------------------------------------------------------


def _cfg(tmp_path: Path, red_limit: int = 10, fraction: float = 0.5) -> PipelineConfig:
    return PipelineConfig(
        run_dir=str(tmp_path / "run"),
        prompts=PromptsConfig(red_team=[PromptSource("builtin:red_team", limit=red_limit)],
                              helpful=[PromptSource("builtin:helpful")]),
        sl=SLConfig(helpful_fraction=fraction),
    )


def test_run_writes_rows_and_manifest(tmp_path):
    cfg = _cfg(tmp_path, red_limit=10, fraction=0.25)
    stage = P.run(cfg)
    want = helpful_needed(10, 0.25)
    m = stage.manifest()
    assert m["status"] == "complete"
    assert m["counts"] == {"red_team": 10, "helpful": want, "helpful_wanted": want, "total": 10 + want}
    rows = stage.rows()
    assert len(rows) == 10 + want
    assert [r["kind"] for r in rows] == ["red_team"] * 10 + ["helpful"] * want
    assert rows[:10] == collect(cfg.prompts.red_team, "red_team")
    assert rows[10:] == collect(cfg.prompts.helpful, "helpful")[:want]
    assert stage.rows_path == Path(cfg.run_dir) / "prompts" / "rows.jsonl"
    assert stage.complete()


def test_run_caps_helpful_at_what_exists(tmp_path):
    cfg = _cfg(tmp_path, red_limit=64, fraction=0.9)
    m = P.run(cfg).manifest()
    n_helpful = len(read_source(PromptSource("builtin:helpful")))
    assert m["counts"]["helpful_wanted"] == helpful_needed(m["counts"]["red_team"], 0.9)
    assert m["counts"]["helpful"] == min(n_helpful, m["counts"]["helpful_wanted"])


def test_run_again_same_config_rewrites_not_appends(tmp_path):
    cfg = _cfg(tmp_path)
    first = P.run(cfg).rows()
    again = P.run(cfg)
    assert again.rows() == first


def test_run_changed_config_needs_allow(tmp_path):
    P.run(_cfg(tmp_path, red_limit=10))
    changed = _cfg(tmp_path, red_limit=12)
    with pytest.raises(ResumeError) as e:
        P.run(changed)
    assert "prompts.red_team" in str(e.value)
    # nothing was rewritten by the refused run
    assert Stage.view(changed.run_dir, "prompts").manifest()["counts"]["red_team"] == 10
    stage = P.run(changed, allow_changed=True)
    assert stage.manifest()["counts"]["red_team"] == 12
    assert len([r for r in stage.rows() if r["kind"] == "red_team"]) == 12
    # the manifest now records the new config, so a plain re-run goes through
    assert P.run(changed).manifest()["counts"]["red_team"] == 12


def test_run_helpful_fraction_is_part_of_fingerprint(tmp_path):
    cfg = _cfg(tmp_path, fraction=0.5)
    P.run(cfg)
    with pytest.raises(ResumeError, match="helpful_fraction"):
        P.run(dataclasses.replace(cfg, sl=SLConfig(helpful_fraction=0.2)))
