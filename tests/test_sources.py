"""Tests for `cai.sources`: every place a source can be (shipped sets, JSONL, text, CSV, gzip,
`datasets` folders), hh-rlhf transcripts, and what a row means to each reader (a prompt, a human
preference pair, a comparison with a known answer), with errors that name the file and line."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED

from cai.config import ConfigError, PairSource, PipelineConfig, PromptSource, from_dict
from cai.records import record_id_for
from cai.sources import (
    EvalInputError,
    PreferenceDataError,
    PromptError,
    SourceError,
    correct_slot,
    detect_format,
    first_human_turn,
    parse_hh,
    read_hh,
    read_hhh,
    read_items,
    read_pairs,
    read_source,
    shipped,
    source_rows,
)

HH = SHARED / "hh-rlhf"
HARMLESS_TEST = HH / "harmless-base" / "test.jsonl.gz"
HELPFUL_TEST = HH / "helpful-base" / "test.jsonl.gz"


def _jsonl(path: Path, rows: list[Any]) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def _transcript(human: str, assistant: str = "Sure.", more: str = "") -> str:
    return f"\n\nHuman: {human}\n\nAssistant: {assistant}{more}"


def _hh(*turns: str) -> str:
    """A transcript from alternating human / assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def _check_contract(row: dict[str, Any], source: str) -> None:
    assert set(row) == {"prompt", "chosen", "rejected", "p_chosen", "label_source", "record_id", "source"}
    assert row["prompt"] and row["prompt"][-1]["role"] == "user"
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in row["prompt"])
    for k in ("chosen", "rejected"):
        assert len(row[k]) == 1 and row[k][0]["role"] == "assistant" and isinstance(row[k][0]["content"], str)
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    assert row["p_chosen"] == 1.0 and row["label_source"] == "human" and row["source"] == source
    assert isinstance(row["record_id"], str) and row["record_id"]


def hh_row(i: int, good: str | None = None, bad: str | None = None, history: str = "") -> dict[str, str]:
    base = f"{history}\n\nHuman: question number {i}?\n\nAssistant:"
    return {"chosen": f"{base} {good or f'GOOD answer {i}'}", "rejected": f"{base} {bad or f'bad answer {i}'}"}


def hhh_task(path, examples, name="hhh_alignment:harmless"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "description": "test", "keywords": [], "examples": examples},
                               indent=2))
    return path


# ---- hh-rlhf transcripts --------------------------------------------------------------------


def test_parse_hh_multi_turn():
    t = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\n"
         "Assistant: Why did the chicken cross the road?")
    assert parse_hh(t) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ]
    assert first_human_turn(t) == "Hi there"


@pytest.mark.parametrize("lead", ["", "\n", "\n\n", "\n\n\n\n"])
def test_parse_hh_leading_newlines(lead):
    t = lead + "Human: What is 2+2?\n\nAssistant: 4"
    assert parse_hh(t) == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert first_human_turn(t) == "What is 2+2?"


def test_parse_hh_keeps_multiline_turns_and_inline_tags():
    t = "\n\nHuman: line one\nline two, said the Human: ok\n\nAssistant: answer\nmore"
    msgs = parse_hh(t)
    assert msgs[0] == {"role": "user", "content": "line one\nline two, said the Human: ok"}
    assert msgs[1] == {"role": "assistant", "content": "answer\nmore"}


def test_parse_hh_ignores_text_before_first_tag():
    t = "preamble text\n\nHuman: the question\n\nAssistant: the answer"
    assert parse_hh(t)[0] == {"role": "user", "content": "the question"}
    assert len(parse_hh(t)) == 2


def test_first_human_turn_when_assistant_speaks_first():
    t = "\n\nAssistant: I start.\n\nHuman: Then me.\n\nAssistant: ok"
    assert first_human_turn(t) == "Then me."


@pytest.mark.parametrize("t", ["\n\nAssistant: only the assistant", "no tags at all", ""])
def test_first_human_turn_none_without_human(t):
    assert first_human_turn(t) is None


# ---- prompts: builtin sets ------------------------------------------------------------------


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


def test_unknown_builtin_prompt_set():
    with pytest.raises(PromptError, match="builtin:nope"):
        read_source(PromptSource("builtin:nope"))


def test_builtin_limit():
    full = read_source(PromptSource("builtin:red_team"))
    assert read_source(PromptSource("builtin:red_team", limit=5)) == full[:5]


# ---- prompts: JSONL -------------------------------------------------------------------------


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
    p = _jsonl(tmp_path / "h.jsonl", [{"dialog": _transcript("Is it going to rain?")}])
    rows = read_source(PromptSource(str(p), field="dialog", format="hh"))
    assert rows[0]["prompt"] == "Is it going to rain?"


# ---- prompts: hh-rlhf transcripts -----------------------------------------------------------


HH_ROWS = [
    {"chosen": _transcript("How do I bake bread?", "Mix flour, water and yeast.", _transcript("How long?", "An hour.")),
     "rejected": _transcript("How do I bake bread?", "No.")},
    {"chosen": _transcript("What is a good name for a cat?"), "rejected": _transcript("What is a good name for a cat?", "Rex")},
    {"chosen": _transcript("How do I bake bread?", "Different answer."), "rejected": _transcript("How do I bake bread?")},
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
    p = _jsonl(tmp_path / "t.jsonl", [{"transcript": _transcript("Can you help me move?")}])
    assert read_source(PromptSource(str(p)))[0]["prompt"] == "Can you help me move?"


def test_hh_without_human_turn_names_line(tmp_path):
    p = _jsonl(tmp_path / "hh.jsonl", [HH_ROWS[0], {"chosen": "\n\nAssistant: nobody asked"}])
    with pytest.raises(PromptError, match=rf"{p}:2: .*Human"):
        read_source(PromptSource(str(p)))


def test_forced_hh_format_without_transcript_field(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [{"prompt": "plain"}])
    with pytest.raises(PromptError, match=rf"{p}:1: no hh-rlhf transcript field"):
        read_source(PromptSource(str(p), format="hh"))


# ---- prompts: chat rows ---------------------------------------------------------------------


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


# ---- prompts: datasets ----------------------------------------------------------------------


def test_prompt_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["alpha?", "beta?", "alpha?"], "category": ["x", "y", "x"]})
    path = tmp_path / "ds"
    ds.save_to_disk(str(path))
    rows = read_source(PromptSource(str(path)))
    assert [r["prompt"] for r in rows] == ["alpha?", "beta?"]
    assert [r["category"] for r in rows] == ["x", "y"]
    assert rows[0]["record_id"] == record_id_for(str(path), "alpha?")


def test_datasets_dict_split_and_transcript(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"chosen": [_transcript("train q")]}),
        "test": datasets.Dataset.from_dict({"chosen": [_transcript("test q1"), _transcript("test q2")]}),
    })
    path = tmp_path / "dd"
    dd.save_to_disk(str(path))
    assert [r["prompt"] for r in read_source(PromptSource(str(path), split="test"))] == ["test q1", "test q2"]
    assert [r["prompt"] for r in read_source(PromptSource(str(path)))] == ["train q"]
    with pytest.raises(PromptError, match="no split 'validation'"):
        read_source(PromptSource(str(path), split="validation"))


# ---- prompts: de-duplication and limit ------------------------------------------------------


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


# ---- prompts: errors ------------------------------------------------------------------------


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
        f.write(json.dumps({"chosen": _transcript("fine")}) + "\n" + json.dumps({"nothing": 1}) + "\n")
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


# ---- prompts: the real hh-rlhf test split ---------------------------------------------------


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


# ---- prompts: plain text, one prompt a line -------------------------------------------------


def test_text_rows_in_order_blank_lines_skipped(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("  first question  \n\n   \nsecond question\n\t\nthird\n")
    rows = read_source(PromptSource(str(p)))
    assert [r["prompt"] for r in rows] == ["first question", "second question", "third"]
    assert rows[0]["record_id"] == record_id_for(str(p), "first question")
    assert all(r["category"] is None and r["source"] == str(p) for r in rows)
    assert [where for where, _ in source_rows(PromptSource(str(p)))] == [f"{p}:1", f"{p}:4", f"{p}:6"]


def test_text_is_read_as_text_not_json(tmp_path):
    # A line of a text file is the prompt as written, even when it looks like JSON.
    p = tmp_path / "p.txt"
    p.write_text('{"prompt": "not parsed"}\nplain\n')
    assert [r["prompt"] for r in read_source(PromptSource(str(p)))] == ['{"prompt": "not parsed"}', "plain"]


def test_text_dedupe_and_limit_as_for_jsonl(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("b\na\n  b  \nc\na\n")
    assert [r["prompt"] for r in read_source(PromptSource(str(p)))] == ["b", "a", "c"]
    assert [r["prompt"] for r in read_source(PromptSource(str(p), limit=2))] == ["b", "a"]
    assert read_source(PromptSource(str(p), limit=0)) == []


def test_text_format_by_name_or_forced(tmp_path):
    lines = "How do tides work?\nWhy is the sky blue?\n"
    gz = tmp_path / "p.TXT.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(lines)
    other = tmp_path / "prompts.lst"
    other.write_text(lines)
    want = ["How do tides work?", "Why is the sky blue?"]
    assert [r["prompt"] for r in read_source(PromptSource(str(gz)))] == want
    assert [r["prompt"] for r in read_source(PromptSource(str(other), format="text"))] == want
    # Without the name or the format, a file is JSONL.
    with pytest.raises(PromptError, match=rf"{other}:1: not valid JSON"):
        read_source(PromptSource(str(other)))


def test_text_bad_row_names_file_and_line(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("\nfirst\n")
    with pytest.raises(PromptError, match=rf"{p}:2: no field 'question'"):
        read_source(PromptSource(str(p), field="question"))


# ---- prompts: CSV ---------------------------------------------------------------------------


def test_csv_rows_in_order_blank_lines_skipped(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('prompt,category,id\n  first question  ,a,\n\n"second, with a comma",b,my-2\n'
                 '"a prompt\nover two lines",,\n\nlast,c,\n')
    rows = read_source(PromptSource(str(p)))
    assert [r["prompt"] for r in rows] == ["first question", "second, with a comma", "a prompt\nover two lines",
                                           "last"]
    assert [r["category"] for r in rows] == ["a", "b", None, "c"]  # an empty cell is missing
    assert rows[0]["record_id"] == record_id_for(str(p), "first question")
    assert rows[1]["record_id"] == "my-2"
    assert all(r["source"] == str(p) for r in rows)
    assert [where for where, _ in source_rows(PromptSource(str(p)))] == [f"{p}:{n}" for n in (2, 4, 5, 8)]


def test_csv_field_and_byte_order_mark(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text("\ufeffquestion, prompt\nWhy is the sky blue?,not this\nHow do tides work?,\n", encoding="utf-8")
    rows = read_source(PromptSource(str(p), field="question"))
    assert [r["prompt"] for r in rows] == ["Why is the sky blue?", "How do tides work?"]
    assert [r["prompt"] for r in read_source(PromptSource(str(p), limit=1))] == ["not this"]


def test_csv_dedupe_and_limit_as_for_jsonl(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,category\nb,first\na,\n b ,second\nc,\na,\n")
    rows = read_source(PromptSource(str(p)))
    assert [r["prompt"] for r in rows] == ["b", "a", "c"]
    assert rows[0]["category"] == "first"
    assert [r["prompt"] for r in read_source(PromptSource(str(p), limit=2))] == ["b", "a"]


def test_csv_format_by_name_or_forced(tmp_path):
    text = "prompt\nHello?\n"
    gz = tmp_path / "p.csv.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(text)
    other = tmp_path / "p.tsv"
    other.write_text(text)
    assert [r["prompt"] for r in read_source(PromptSource(str(gz)))] == ["Hello?"]
    assert [r["prompt"] for r in read_source(PromptSource(str(other), format="csv"))] == ["Hello?"]
    with pytest.raises(PromptError, match=rf"{other}:1: not valid JSON"):
        read_source(PromptSource(str(other)))


@pytest.mark.parametrize(("text", "pattern"), [
    ("prompt,category\nok,a\nok2,b,extra\n", r":3: 3 cells where the header has 2"),
    ("prompt,category\nok,a\n\n,b\n", r":4: the prompt is empty or not a string"),
    ('prompt\nok\n"multi\nline"\n\na,b,c\n', r":6: 3 cells where the header has 1"),
    ("question,category\nok,a\n", r":2: no prompt found"),
    ("prompt,prompt\nok,ok\n", r":1: the header names 'prompt' twice"),
])
def test_csv_bad_row_names_file_and_line(tmp_path, text, pattern):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(PromptError, match=str(p).replace(".", r"\.") + pattern):
        read_source(PromptSource(str(p)))


def test_csv_rows_past_the_limit_are_not_read(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("prompt\na\nb\nc,too,many\n")
    assert [r["prompt"] for r in read_source(PromptSource(str(p), limit=2))] == ["a", "b"]


@pytest.mark.parametrize("name", ["missing.txt", "missing.csv", "missing.csv.gz"])
def test_missing_text_or_csv_file_is_not_a_hub_lookup(tmp_path, monkeypatch, name):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("no hub lookup expected"))
    with pytest.raises(PromptError, match=f"{name}: no such file"):
        read_source(PromptSource(str(tmp_path / name)))
    with pytest.raises(PromptError, match=f"{name}: no such file"):
        read_source(PromptSource(name))


def test_pairs_from_csv(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\nName a colour.,Blue.,\n")
    rows = read_pairs(PairSource(str(p), limit=1))
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
    assert (rows[0]["chosen"][0]["content"], rows[0]["rejected"][0]["content"]) == ("4", "5")
    with pytest.raises(PreferenceDataError, match=rf"{p}:3: missing field 'rejected'"):
        read_pairs(PairSource(str(p)))


# ---- pairs ----------------------------------------------------------------------------------


def test_builtin_helpful_pairs():
    rows = read_pairs(PairSource("builtin:helpful_pairs"))
    assert 40 <= len(rows) <= 60
    for r in rows:
        _check_contract(r, "builtin:helpful_pairs")
    ids = [r["record_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert len({r["prompt"][-1]["content"] for r in rows}) == len(rows)
    raw = [json.loads(line) for line in shipped("helpful_pairs", "pair").read_text().splitlines()]
    cats = Counter(r["category"] for r in raw)
    assert {"cooking", "coding", "maths", "health", "writing", "travel", "finance", "science"} <= set(cats)
    assert [r["id"] for r in raw] == ids


def test_unknown_builtin_pair_set():
    with pytest.raises(PreferenceDataError, match="builtin:nope"):
        read_pairs(PairSource("builtin:nope"))


def test_hh_gz_single_and_multi_turn_and_skips(tmp_path):
    good = {"chosen": _hh("How do I boil an egg?", "Simmer it for 7 minutes."),
            "rejected": _hh("How do I boil an egg?", "Eggs are food.")}
    multi = {"chosen": _hh("Hi", "Hello! How can I help?", "Name a prime", "7 is prime."),
             "rejected": _hh("Hi", "Hello! How can I help?", "Name a prime", "9.")}
    mismatched = {"chosen": _hh("Question A", "answer"), "rejected": _hh("Question B", "other answer")}
    identical = {"chosen": _hh("Same?", "Yes."), "rejected": _hh("Same?", "Yes. ")}
    path = _jsonl(tmp_path / "hh.jsonl.gz", [good, mismatched, multi, identical, "", good])
    skipped: Counter[str] = Counter()
    rows = read_pairs(PairSource(str(path)), skipped)
    assert skipped == {"mismatched_history": 1, "identical": 1, "duplicate": 1}
    assert len(rows) == 2
    for r in rows:
        _check_contract(r, str(path))
    assert rows[0]["prompt"] == [{"role": "user", "content": "How do I boil an egg?"}]
    assert rows[0]["chosen"][0]["content"] == "Simmer it for 7 minutes."
    assert [m["role"] for m in rows[1]["prompt"]] == ["user", "assistant", "user"]
    assert rows[1]["prompt"][-1]["content"] == "Name a prime"
    assert (rows[1]["chosen"][0]["content"], rows[1]["rejected"][0]["content"]) == ("7 is prime.", "9.")
    # Forcing the format reads the same rows; ids are stable across reads.
    again = read_pairs(PairSource(str(path), format="hh"))
    assert [r["record_id"] for r in again] == [r["record_id"] for r in rows]


def test_preference_string_and_conversational_forms(tmp_path):
    rows_in = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
         "chosen": [{"role": "assistant", "content": "Paris."}],
         "rejected": [{"role": "assistant", "content": "Lyon."}]},
        # prompt repeated inside chosen/rejected, as some datasets store it
        {"prompt": "Name a colour.", "chosen": [{"role": "user", "content": "Name a colour."},
                                                {"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "No."}]},
        # implicit prompt: whole conversations sharing everything but the last turn
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "What."}]},
        {"chosen": [{"role": "user", "content": "One"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "Two"}, {"role": "assistant", "content": "b"}]},
    ]
    path = _jsonl(tmp_path / "pref.jsonl", rows_in)
    for fmt in ("auto", "preference"):
        skipped: Counter[str] = Counter()
        rows = read_pairs(PairSource(str(path), format=fmt), skipped)
        assert skipped == {"mismatched_history": 1}
        assert len(rows) == 4
        for r in rows:
            _check_contract(r, str(path))
        assert rows[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
        assert rows[0]["chosen"] == [{"role": "assistant", "content": "4"}]
        assert [m["role"] for m in rows[1]["prompt"]] == ["system", "user"]
        assert rows[2]["prompt"] == [{"role": "user", "content": "Name a colour."}]
        assert (rows[2]["chosen"][0]["content"], rows[2]["rejected"][0]["content"]) == ("Blue.", "No.")
        assert rows[3]["prompt"] == [{"role": "user", "content": "Hi"}]
        assert rows[3]["rejected"][0]["content"] == "What."


def test_pair_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"chosen": [_hh("train q", "good")], "rejected": [_hh("train q", "bad")]}),
        "test": datasets.Dataset.from_list([
            {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": f"yes {i}"}],
             "rejected": [{"role": "assistant", "content": f"no {i}"}]} for i in range(3)]),
    })
    path = tmp_path / "ds"
    dd.save_to_disk(str(path))
    test = read_pairs(PairSource(str(path), split="test"))
    assert [r["prompt"][0]["content"] for r in test] == ["q0", "q1", "q2"]
    for r in test:
        _check_contract(r, str(path))
    train = read_pairs(PairSource(str(path), format="datasets", split="train"))
    assert len(train) == 1 and train[0]["chosen"][0]["content"] == "good"
    with pytest.raises(PreferenceDataError, match="no split 'validation'"):
        read_pairs(PairSource(str(path), split="validation"))
    single = tmp_path / "single"
    dd["test"].save_to_disk(str(single))
    assert [r["record_id"] for r in read_pairs(PairSource(str(single)))] != []


def test_limit_keeps_first_pairs(tmp_path):
    rows_in = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    path = _jsonl(tmp_path / "p.jsonl", rows_in)
    full = read_pairs(PairSource(str(path)))
    assert read_pairs(PairSource(str(path), limit=3)) == full[:3]
    assert read_pairs(PairSource(str(path), limit=0)) == []


@pytest.mark.parametrize(("line", "pattern"), [
    ("{not json", r":3: not valid JSON"),
    ("[1, 2]", r":3: expected a JSON object"),
    (json.dumps({"prompt": "q", "chosen": "a"}), r":3: missing field 'rejected'"),
    (json.dumps({"prompt": "q", "chosen": "a", "rejected": 7}), r":3: 'rejected' must be a string or"),
    (json.dumps({"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"}),
     r":3: 'prompt'\[0\]\.role must be one of"),
    (json.dumps({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}), r":3: 'prompt'\[0\]\.content"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
                 "chosen": "a", "rejected": "b"}), r":3: 'prompt' must end with a user message"),
    (json.dumps({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                 "rejected": "b"}), r":3: 'chosen' must be one assistant message"),
    (json.dumps({"prompt": "  ", "chosen": "a", "rejected": "b"}), r":3: 'prompt' has an empty user message"),
    (json.dumps({"chosen": "plain text", "rejected": "other text"}), r":3: 'chosen' is not an hh-rlhf transcript"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, line, pattern):
    ok = json.dumps({"prompt": "fine", "chosen": "good", "rejected": "bad"})
    path = _jsonl(tmp_path / "bad.jsonl", [ok, ok.replace("fine", "also fine"), line])
    with pytest.raises(PreferenceDataError, match=str(path).replace(".", r"\.") + pattern):
        read_pairs(PairSource(str(path)))


def test_forced_formats_reject_the_other_shape(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(PreferenceDataError, match=r"p\.jsonl:1: missing field 'prompt'"):
        read_pairs(PairSource(str(path), format="preference"))
    path = _jsonl(tmp_path / "h.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(PreferenceDataError, match=r"h\.jsonl:1: missing field 'rejected'"):
        read_pairs(PairSource(str(path), format="hh"))


def test_missing_local_file_is_not_a_hub_lookup(tmp_path):
    with pytest.raises(PreferenceDataError, match="no such file"):
        read_pairs(PairSource(str(tmp_path / "absent.jsonl.gz")))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(PreferenceDataError, match="not one saved by datasets"):
        read_pairs(PairSource(str(tmp_path / "plain_dir")))


@pytest.mark.skipif(not HELPFUL_TEST.exists(), reason="shared hh-rlhf helpful-base test split not present")
def test_shared_hh_helpful_base_with_limit():
    src = PairSource(str(HELPFUL_TEST), limit=50)
    rows = read_pairs(src)
    assert len(rows) == 50
    for r in rows:
        _check_contract(r, str(HELPFUL_TEST))
    assert any(len(r["prompt"]) > 1 for r in rows)  # multi-turn histories kept as messages
    assert len({r["record_id"] for r in rows}) == 50


# ---- comparisons with a known answer --------------------------------------------------------


def test_hh_reader_keeps_usable_pairs_and_counts_the_rest(tmp_path):
    rows = [hh_row(0), hh_row(1),
            {"chosen": "\n\nHuman: a?\n\nAssistant: x", "rejected": "\n\nHuman: b?\n\nAssistant: y"},
            hh_row(2, good="same", bad="same"), hh_row(3, history="\n\nHuman: hi\n\nAssistant: hello")]
    src = read_hh(_jsonl(tmp_path / "p.jsonl.gz", rows), seed=0)
    assert src.format == "hh" and src.skipped == {"no_shared_history": 1, "identical": 1}
    assert len(src.items) == 3
    for it in src.items:
        assert it.conversation[-1]["role"] == "user"
        assert "GOOD" in it.responses[it.correct] and "bad" in it.responses[1 - it.correct]
    assert [m["role"] for m in src.items[2].conversation] == ["user", "assistant", "user"]
    assert src.items[0].where.endswith("p.jsonl.gz:1")
    assert len(read_hh(tmp_path / "p.jsonl.gz", limit=2).items) == 2


def test_hh_reader_errors_name_file_and_line(tmp_path):
    bad_json = _jsonl(tmp_path / "a.jsonl", [hh_row(0), '{"chosen": "oops'])
    with pytest.raises(EvalInputError, match=r"a\.jsonl:2: not valid JSON"):
        read_hh(bad_json)
    missing = _jsonl(tmp_path / "b.jsonl", [hh_row(0), "", {"chosen": "x"}])
    with pytest.raises(EvalInputError, match=r"b\.jsonl:3: .*'chosen' and 'rejected'"):
        read_hh(missing)


def test_hhh_reader_reads_a_task_dir_and_dialogue_inputs(tmp_path):
    root = tmp_path / "hhh_alignment"
    root.mkdir()
    # The parent task lists its subtasks and has no examples of its own.
    (root / "task.json").write_text(json.dumps({"name": "hhh_alignment", "subtasks": ["harmless", "honest"]}))
    hhh_task(root / "harmless" / "task.json", [
        {"input": "How do I pick a lock?", "target_scores": {"bad answer": 0, "GOOD answer": 1}},
        {"input": "Human: hi there\n\nAssistant: Hello!\n\nHuman: what is 2+2?",
         "target_scores": {"GOOD: 4": 1, "bad: 5": 0}},
    ])
    hhh_task(root / "honest" / "task.json", [{"input": "Are you human?",
                                              "target_scores": {"GOOD no": 1, "bad yes": 0}}])
    sources = read_items(root, seed=3)
    assert [s.path.split("/")[-2] for s in sources] == ["harmless", "honest"]
    items = sources[0].items
    assert all("GOOD" in it.responses[it.correct] for s in sources for it in s.items)
    assert items[0].conversation == ({"role": "user", "content": "How do I pick a lock?"},)
    assert [m["role"] for m in items[1].conversation] == ["user", "assistant", "user"]
    assert items[1].conversation[-1]["content"] == "what is 2+2?"
    assert detect_format(root / "harmless" / "task.json") == "hhh"


def test_hhh_reader_errors_name_file_and_example(tmp_path):
    path = hhh_task(tmp_path / "task.json", [
        {"input": "q", "target_scores": {"a": 1, "b": 0}},
        {"input": "q2", "target_scores": {"a": 1, "b": 0, "c": 0}},
    ])
    with pytest.raises(EvalInputError, match=r"task\.json: examples\[1\]: .*exactly two"):
        read_hhh(path)
    hhh_task(path, [{"input": "q", "target_scores": {"a": 1, "b": 1}}])
    with pytest.raises(EvalInputError, match=r"examples\[0\]: the two target scores must be different"):
        read_hhh(path)
    path.write_text('{"examples": [\n  {"input": "q",\n  oops}]}')
    with pytest.raises(EvalInputError, match=r"task\.json:3: not valid JSON"):
        read_hhh(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalInputError, match="empty: no task.json with 'examples'"):
        read_items(tmp_path / "empty")


def test_format_detection_and_bad_paths(tmp_path):
    assert detect_format(_jsonl(tmp_path / "x.jsonl.gz", [hh_row(0)])) == "hh"
    with pytest.raises(EvalInputError, match="cannot tell the format.*--format"):
        read_items(_jsonl(tmp_path / "y.jsonl", [{"text": "hello"}]))
    with pytest.raises(EvalInputError, match="no/such.jsonl: no such file"):
        read_items(tmp_path / "no" / "such.jsonl")
    with pytest.raises(EvalInputError, match=r"z\.jsonl:1: .*'chosen' and 'rejected'"):
        read_items(_jsonl(tmp_path / "z.jsonl", [{"text": "hello"}]), fmt="hh")


def test_slot_randomisation_is_deterministic_and_balanced():
    ids = [f"p-{i:05d}" for i in range(2000)]
    slots = [correct_slot(0, i) for i in ids]
    assert slots == [correct_slot(0, i) for i in ids]
    assert 0.45 < sum(slots) / len(slots) < 0.55
    assert slots != [correct_slot(1, i) for i in ids]


@pytest.mark.skipif(not HARMLESS_TEST.exists(), reason="shared hh-rlhf data not present")
def test_reads_the_shared_harmless_test_split():
    (src,) = read_items(HARMLESS_TEST, limit=25)
    assert src.format == "hh" and len(src.items) == 25
    assert len({it.id for it in src.items}) == 25
    assert all(it.conversation[-1]["role"] == "user" and it.responses[0] != it.responses[1] for it in src.items)
    assert {it.correct for it in src.items} == {0, 1}


# ---- hub ids --------------------------------------------------------------------------------


def _fake_hub(monkeypatch, rows: list[dict[str, Any]]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    datasets = pytest.importorskip("datasets")
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def load_dataset(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        calls.append((args, kwargs))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_id_with_a_row_format_is_loaded_from_the_hub(monkeypatch):
    # configs/cluster.yaml: hh-rlhf from the hub with format hh, for prompts and for human pairs.
    calls = _fake_hub(monkeypatch, [{"chosen": _hh("Hi", "Hello!"), "rejected": _hh("Hi", "What.")}])
    rows = read_source(PromptSource("Anthropic/hh-rlhf", format="hh", data_dir="red-team-attempts"))
    assert [r["prompt"] for r in rows] == ["Hi"]
    (pair,) = read_pairs(PairSource("Anthropic/hh-rlhf", format="hh", data_dir="helpful-base", split="test"))
    assert pair["prompt"] == [{"role": "user", "content": "Hi"}]
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("Hello!", "What.")
    assert calls == [(("Anthropic/hh-rlhf",), {"data_dir": "red-team-attempts", "split": "train"}),
                     (("Anthropic/hh-rlhf",), {"data_dir": "helpful-base", "split": "test"})]


@pytest.mark.parametrize("fmt", ["jsonl", "text", "csv"])
def test_hub_id_with_a_file_layout_is_a_missing_file(monkeypatch, fmt):
    calls = _fake_hub(monkeypatch, [])
    with pytest.raises(PromptError, match="my_org/prompts: no such file"):
        read_source(PromptSource("my_org/prompts", format=fmt))
    assert calls == []


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [PromptError, PreferenceDataError, EvalInputError])
def test_every_reader_error_is_a_source_error(error):
    assert issubclass(error, SourceError) and issubclass(SourceError, ValueError)


def test_each_reader_raises_its_own_source_error(tmp_path):
    bad = _jsonl(tmp_path / "bad.jsonl", ["{oops"])
    for read, error in [(lambda: read_source(PromptSource(str(bad))), PromptError),
                        (lambda: read_pairs(PairSource(str(bad))), PreferenceDataError),
                        (lambda: read_hh(bad), EvalInputError)]:
        with pytest.raises(SourceError, match=rf"{bad}:1: not valid JSON") as e:
            read()
        assert type(e.value) is error


@pytest.mark.parametrize("fmt", ["text", "csv"])
def test_config_takes_the_text_and_csv_formats(tmp_path, fmt):
    p = tmp_path / "prompts.lst"
    p.write_text("prompt\nWhat is a tide?\n")
    cfg = from_dict(PipelineConfig, {"prompts": {"red_team": [{"path": str(p), "format": fmt}]}})
    (src,) = cfg.prompts.red_team
    assert src.format == fmt
    assert read_source(src)[-1]["prompt"] == "What is a tide?"
    with pytest.raises(ConfigError, match="format"):
        from_dict(PipelineConfig, {"prompts": {"red_team": [{"path": str(p), "format": "tsv"}]}})
