"""Tests for `cai.convert`: the paper's prompt folder, llm-swarm JSON, format detection and errors.

The paper's files carry no license, so they are read from the shared data folder at test time (and
the tests that need them are skipped when it is absent). Every fixture below is invented text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cai.constitution import ConstitutionError, load
from cai.convert import convert, from_llm_swarm, from_paper

PAPER = Path(__file__).resolve().parents[2] / "shared" / "data" / "cai-paper"
needs_paper = pytest.mark.skipif(not PAPER.is_dir(), reason=f"paper prompts not found at {PAPER}")

SCAFFOLD = ("CritiqueRequest", "RevisionRequest", "Options:", "[[[", "]]]")


def _texts(c: Any) -> list[str]:
    """Every text field of a constitution."""
    out = [p.critique for p in c.critique_revision] + [p.revision for p in c.critique_revision]
    out += [p.instruction for p in c.preference]
    for ex in c.critique_examples:
        out += [m["content"] for m in ex.conversation] + [ex.critique, ex.revision]
        out += [t for t in (ex.critique_request, ex.revision_request) if t]
    for ex in (*c.preference_examples, *c.cot_examples):
        out += [m["content"] for m in ex.conversation] + list(ex.options)
        out += [ex.reasoning] if ex.reasoning else []
    return out


# ---- a small invented folder in the paper's format ------------------------------------------


def _write_paper(folder: Path, **override: Any) -> Path:
    files: dict[str, Any] = {
        "CritiqueRevisionInstructions.json": {
            "kind0": {"prompt": ["\n\nCritiqueRequest: Say what is unkind in the last reply.\n\nCritique:"],
                      "edit_request": "\n\nRevisionRequest: Make the last reply kinder.\n\nRevision:"},
            "kind1": {"prompt": ["\n\nCritiqueRequest: Note anything rude.\n\nCritique:"],
                      "edit_request": "\n\nRevisionRequest: Remove the rudeness.\n\nRevision:"},
        },
        "RLMadisonInstructions.json": ["\nPick the kinder reply. Options:",
                                       "\nPick the politer reply. Options:"],
        "CritiqueRevisionFewShotPrompts.json": [
            "\n\nHuman: What colour is the sky?\n\nAssistant: Obviously blue, silly."
            "\n\nCritiqueRequest: Say what is unkind in the last reply.\n\nCritique: It calls the user silly."
            "\n\nRevisionRequest: Make the last reply kinder."
            "\n\nRevision: On a clear day it looks blue.\n\nHuman:",
            "Human: Hi there.\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: Ugh, an apple."
            "\n\nCritiqueRequest: Point out any sighing.\n\nCritique: It sighs."
            "\n\nRevisionRequest: Stop sighing."
            "\n\nRevision: An apple.",
        ],
        "RLMadisonFewShotPrompts.json": [
            {"prompt": "\n\nHuman: Tell me a number.\n\nAssistant:",
             "corrects": ["Seven."], "incorrects": ["No."]},
            {"prompt": "\nHuman: Greet me.\n\nAssistant:",
             "corrects": ["Hello!"], "incorrects": ["Go away."]},
        ],
        "RLMadisonPrecogFewShotPrompts.json": [
            {"prompt": "\nHuman: Consider the following conversation between two speakers (H and A):"
                       "\n\nH: Can I borrow a pen?\n\nA: Sure.\n\nH:  Thanks, what colour is it?\n\n{}"
                       "\n (A) [[[Blue.]]]\n (B) [[[Why do you care?]]]"
                       "\n\nAssistant: Let's think step by step:"
                       " (A) answers politely.\n(B) is curt.\n\nHuman:\nSo the answer is: (A)"},
            {"prompt": "Human: Consider the following conversation, please:"
                       "\n\nH: Say hi.\nPlease.\n\n{}\n (A) [[[No.]]]\n (B) [[[Hi!]]]"
                       "\n\nAssistant: Let's think step by step: (B) does what was asked.\n\nHuman:"
                       "\nSo the answer is: (B)"},
        ],
    }
    files.update(override)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is not None:
            (folder / name).write_text(json.dumps(data))
    return folder


def test_invented_paper_folder(tmp_path: Path) -> None:
    c = from_paper(_write_paper(tmp_path / "p"), name="tiny", category="meta")
    assert c.name == "tiny"
    assert [(p.id, p.category, p.critique, p.revision) for p in c.critique_revision] == [
        ("kind0", "meta", "Say what is unkind in the last reply.", "Make the last reply kinder."),
        ("kind1", "meta", "Note anything rude.", "Remove the rudeness."),
    ]
    assert [(p.id, p.instruction) for p in c.preference] == [("rl0", "Pick the kinder reply."),
                                                             ("rl1", "Pick the politer reply.")]
    first, second = c.critique_examples
    assert first.principle == "kind0" and first.critique_request is None
    assert first.revision == "On a clear day it looks blue."  # the trailing "Human:" is dropped
    assert [m["role"] for m in first.conversation] == ["user", "assistant"]
    assert second.principle is None
    assert (second.critique_request, second.revision_request) == ("Point out any sighing.", "Stop sighing.")
    assert [m["role"] for m in second.conversation] == ["user", "assistant", "user", "assistant"]
    assert second.conversation[0]["content"] == "Hi there."

    a, b = c.preference_examples
    assert a.conversation == ({"role": "user", "content": "Tell me a number."},)
    assert (a.options, a.answer) == (("Seven.", "No."), "A")
    assert (b.options, b.answer) == (("Go away.", "Hello!"), "B")
    assert a.principle is None and b.principle is None

    x, y = c.cot_examples
    assert [m["content"] for m in x.conversation] == [
        "Can I borrow a pen?", "Sure.", "Thanks, what colour is it?"]
    assert (x.options, x.answer, x.principle) == (("Blue.", "Why do you care?"), "A", None)
    assert x.reasoning == "(A) answers politely.\n(B) is curt."
    assert y.conversation == ({"role": "user", "content": "Say hi.\nPlease."},)
    assert (y.options, y.answer, y.reasoning) == (("No.", "Hi!"), "B", "(B) does what was asked.")
    assert not any(s in t for t in _texts(c) for s in SCAFFOLD)


# ---- the real paper folder ------------------------------------------------------------------


@needs_paper
def test_paper_counts_and_clean_text() -> None:
    c = from_paper(PAPER)
    assert (len(c.critique_revision), len(c.preference)) == (16, 16)
    assert (len(c.critique_examples), len(c.preference_examples), len(c.cot_examples)) == (5, 5, 6)
    assert [p.id for p in c.critique_revision] == [f"harmful{i}" for i in range(16)]
    assert [p.id for p in c.preference] == [f"rl{i}" for i in range(16)]
    assert {p.category for p in (*c.critique_revision, *c.preference)} == {"harm"}
    for t in _texts(c):
        assert t and t == t.strip()
        for s in SCAFFOLD:
            assert s not in t, f"scaffold {s!r} left in {t[:80]!r}"
        assert not t.endswith(("Critique:", "Revision:", "Human:", "Assistant:"))
    for ex in c.critique_examples:
        assert ex.conversation[-1]["role"] == "assistant"
        assert ex.principle is not None or (ex.critique_request and ex.revision_request)
    for ex in (*c.preference_examples, *c.cot_examples):
        assert ex.conversation[-1]["role"] == "user"
        assert ex.answer in ("A", "B") and ex.principle is None
        assert "{}" not in "".join(m["content"] for m in ex.conversation)
    assert [ex.answer for ex in c.preference_examples] == ["A", "B", "A", "B", "A"]
    assert all(ex.reasoning for ex in c.cot_examples)
    assert c.critique_few_shot(5)  # the examples render as chat turns


@needs_paper
def test_paper_round_trip(tmp_path: Path) -> None:
    c = convert(PAPER)  # auto-detected
    out = tmp_path / "paper.yaml"
    c.save(out)
    again = load(out)
    assert again.hash == c.hash
    assert again == c


@needs_paper
def test_paper_name_and_category() -> None:
    c = convert(PAPER, fmt="paper", name="p2", category="honesty")
    assert c.name == "p2"
    assert {p.category for p in (*c.critique_revision, *c.preference)} == {"honesty"}


# ---- llm-swarm ------------------------------------------------------------------------------

SWARM = {
    "constitutions": [
        {"critic": "Does the reply waste the reader's time?", "revision": "Make the reply shorter."},
        {"critic": "Is the reply impolite?", "revision": "Make the reply polite."},
    ],
    "system_chat": [
        [
            {"role": "user", "content": "How do I boil an egg?"},
            {"role": "assistant", "content": "Well, eggs have a long history. Anyway, boil it nine minutes."},
            {"role": "user", "content": "Does the reply waste the reader's time?"},
            {"role": "assistant", "content": "Yes, the history is not needed."},
            {"role": "user", "content": "Make the reply shorter."},
            {"role": "assistant", "content": "Boil it for nine minutes."},
        ],
        [
            {"role": "system", "content": "You are a gardening helper."},
            {"role": "user", "content": "My tomato leaves are yellow."},
            {"role": "assistant", "content": "Could be too much water."},
            {"role": "user", "content": "What should I do then?"},
            {"role": "assistant", "content": "Figure it out yourself."},
            {"role": "user", "content": "Is the reply rude in any way?"},
            {"role": "assistant", "content": "It is dismissive."},
            {"role": "user", "content": "Rewrite it kindly."},
            {"role": "assistant", "content": "Water less often and let the soil dry between waterings."},
        ],
    ],
}


def _write_swarm(tmp_path: Path, data: Any, name: str = "constitution.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_llm_swarm(tmp_path: Path) -> None:
    path = _write_swarm(tmp_path, SWARM)
    c = from_llm_swarm(path)
    assert c.name == "constitution"
    assert [(p.id, p.critique, p.revision) for p in c.critique_revision] == [
        ("swarm0", "Does the reply waste the reader's time?", "Make the reply shorter."),
        ("swarm1", "Is the reply impolite?", "Make the reply polite."),
    ]
    assert [p.id for p in c.preference] == ["swarm-pref0", "swarm-pref1"]
    assert c.preference[1].instruction.endswith("Is the reply impolite?")
    assert {p.category for p in (*c.critique_revision, *c.preference)} == {"harm"}

    one, multi = c.critique_examples
    assert one.principle == "swarm0" and one.critique_request is None
    assert [m["role"] for m in one.conversation] == ["user", "assistant"]
    assert one.revision == "Boil it for nine minutes."
    assert multi.principle is None
    assert multi.critique_request == "Is the reply rude in any way?"
    assert multi.revision_request == "Rewrite it kindly."
    assert [m["role"] for m in multi.conversation] == ["system", "user", "assistant", "user", "assistant"]
    assert multi.critique == "It is dismissive."

    c.save(tmp_path / "mine.yaml")
    assert load(tmp_path / "mine.yaml").hash == c.hash


def test_llm_swarm_auto_and_options(tmp_path: Path) -> None:
    path = _write_swarm(tmp_path, SWARM)
    c = convert(path, name="mine", category="helpfulness")
    assert c.name == "mine"
    assert {p.category for p in c.critique_revision} == {"helpfulness"}
    assert convert(path, fmt="llm-swarm").hash == from_llm_swarm(path).hash
    # no system_chat at all is fine: no examples
    bare = _write_swarm(tmp_path, {"constitutions": SWARM["constitutions"]}, "bare.json")
    assert from_llm_swarm(bare).critique_examples == ()


# ---- errors ---------------------------------------------------------------------------------


def test_paper_missing_file(tmp_path: Path) -> None:
    folder = _write_paper(tmp_path / "p", **{"RLMadisonFewShotPrompts.json": None})
    with pytest.raises(ConstitutionError) as e:
        from_paper(folder)
    assert str(folder) in str(e.value) and "RLMadisonFewShotPrompts.json" in str(e.value)


def test_paper_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConstitutionError, match="not a folder"):
        from_paper(tmp_path / "nowhere")


@pytest.mark.parametrize("fname, data, where", [
    ("CritiqueRevisionInstructions.json", {"kind0": {"prompt": ["\n\nCritiqueRequest: x\n\nCritique:"]}},
     "entry 'kind0'"),
    ("CritiqueRevisionInstructions.json",
     {"kind0": {"prompt": ["\n\nCritiqueRequest:\n\nCritique:"], "edit_request": "Revise."}},
     "entry 'kind0'"),
    ("RLMadisonInstructions.json", ["\nPick one. Options:", 3], "entry 1"),
    ("CritiqueRevisionFewShotPrompts.json", ["\n\nHuman: Hi.\n\nAssistant: Hello.\n\nCritique: no request"],
     "entry 0"),
    ("CritiqueRevisionFewShotPrompts.json",
     ["\n\nHuman: Hi.\n\nCritiqueRequest: a\n\nCritique: b\n\nRevisionRequest: c\n\nRevision: d"], "entry 0"),
    ("RLMadisonFewShotPrompts.json", [{"prompt": "\n\nHuman: Hi.\n\nAssistant:", "corrects": ["Hello."]}],
     "entry 0"),
    ("RLMadisonPrecogFewShotPrompts.json",
     [{"prompt": "\n\nHuman: Consider the following conversation:\n\nH: Hi.\n\n (A) [[[a]]]\n (B) [[[b]]]"}],
     "entry 0"),
    ("RLMadisonPrecogFewShotPrompts.json",
     [{"prompt": "\n\nHuman: Consider the following conversation:\n\nH: Hi.\n\n{}\n (A) [[[a]]]\n (B) [[[b]]]"
                 "\n\nAssistant: Let's think step by step: a is better.\n\nHuman:\nSo the answer is: maybe"}],
     "entry 0"),
])
def test_paper_malformed_entry(tmp_path: Path, fname: str, data: Any, where: str) -> None:
    folder = _write_paper(tmp_path / "p", **{fname: data})
    with pytest.raises(ConstitutionError) as e:
        from_paper(folder)
    msg = str(e.value)
    assert fname in msg and where in msg


def test_paper_invalid_json(tmp_path: Path) -> None:
    folder = _write_paper(tmp_path / "p")
    (folder / "RLMadisonInstructions.json").write_text("[not json")
    with pytest.raises(ConstitutionError, match="RLMadisonInstructions.json: not valid JSON"):
        from_paper(folder)


def test_paper_bad_category(tmp_path: Path) -> None:
    with pytest.raises(ConstitutionError, match="category"):
        from_paper(_write_paper(tmp_path / "p"), category="nonsense")


def test_llm_swarm_example_too_short(tmp_path: Path) -> None:
    chats = [SWARM["system_chat"][0], SWARM["system_chat"][0][2:]]  # the second has only the four tail turns
    data = {"constitutions": SWARM["constitutions"], "system_chat": chats}
    path = _write_swarm(tmp_path, data, "short.json")
    with pytest.raises(ConstitutionError) as e:
        from_llm_swarm(path)
    assert "short.json" in str(e.value) and "system_chat[1]" in str(e.value) and "too short" in str(e.value)


@pytest.mark.parametrize("data, where", [
    ({"constitutions": []}, "constitutions"),
    ({"constitutions": [{"critic": "Check it."}]}, "constitutions[0]"),
    ({"constitutions": SWARM["constitutions"], "system_chat": [[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"},
    ]]}, "system_chat[0]"),
    ({"constitutions": SWARM["constitutions"], "system_chat": [[
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "a"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"},
    ]]}, "system_chat[0]"),
])
def test_llm_swarm_malformed(tmp_path: Path, data: Any, where: str) -> None:
    path = _write_swarm(tmp_path, data, "bad.json")
    with pytest.raises(ConstitutionError) as e:
        from_llm_swarm(path)
    assert "bad.json" in str(e.value) and where in str(e.value)


def test_convert_unsupported(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    plain = _write_swarm(tmp_path, {"principles": []}, "plain.json")
    for src in (other, empty, plain, tmp_path / "missing.json"):
        with pytest.raises(ConstitutionError, match="supported formats"):
            convert(src)
    with pytest.raises(ConstitutionError, match="supported formats"):
        convert(plain, fmt="anthropic-hh")
