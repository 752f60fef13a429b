"""Convert constitutions written in other formats into a `cai.constitution/v1` constitution.

Two formats are read:

- `paper`: the prompt folder of the Constitutional AI paper (Bai et al. 2022, arXiv:2212.08073; the
  `prompts/` folder of anthropics/ConstitutionalHarmlessnessPaper): five JSON files holding the
  critique/revision principles, the preference (RL) principles and three sets of few-shot examples.
- `llm-swarm`: the JSON file used by huggingface/llm-swarm's Constitutional AI example,
  `{"constitutions": [{"critic", "revision"}, ...], "system_chat": [[{role, content}, ...], ...]}`.

The result is an ordinary `Constitution`, built through `cai.constitution.from_dict`, so it passes the
same validation as a hand-written YAML file and can be saved with `Constitution.save`:

    cai constitution convert ../shared/data/cai-paper -o paper.yaml
    cai constitution convert constitution.json -o mine.yaml
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cai.constitution import Constitution, ConstitutionError, from_dict
from cai.lm.base import Message

PAPER_FILES = (
    "CritiqueRevisionInstructions.json",
    "RLMadisonInstructions.json",
    "CritiqueRevisionFewShotPrompts.json",
    "RLMadisonFewShotPrompts.json",
    "RLMadisonPrecogFewShotPrompts.json",
)
FORMATS = ("paper", "llm-swarm")

# A turn marker at the start of a line (or of the text): "Human:", "Assistant:", "H:", "A:".
_PAPER_TURN = re.compile(r"(?:^|\n)[ \t]*(Human|Assistant):", re.MULTILINE)
_COT_TURN = re.compile(r"(?:^|\n)[ \t]*(H|A):", re.MULTILINE)
_ROLE = {"Human": "user", "H": "user", "Assistant": "assistant", "A": "assistant"}
_TRAILING_HUMAN = re.compile(r"\n[ \t]*Human:\s*$")
_FEW_SHOT_PARTS = re.compile(
    r"^(?P<conv>.*?)\n[ \t]*CritiqueRequest:(?P<creq>.*?)\n[ \t]*Critique:(?P<crit>.*?)"
    r"\n[ \t]*RevisionRequest:(?P<rreq>.*?)\n[ \t]*Revision:(?P<rev>.*)$",
    re.DOTALL,
)
_OPTIONS = re.compile(r"\(A\)\s*\[\[\[(?P<a>.*?)\]\]\]\s*\(B\)\s*\[\[\[(?P<b>.*?)\]\]\]", re.DOTALL)
_REASONING = re.compile(r"Let['\u2019]s think step by step:(?P<r>.*)\n[ \t]*Human:", re.DOTALL)
_ANSWER = re.compile(r"So the answer is:\s*\(?([AB])\)?")


def _err(file: str | Path, where: str, problem: str) -> ConstitutionError:
    return ConstitutionError(f"{file}: {where}: {problem}" if where else f"{file}: {problem}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _err(path, "", f"not valid JSON: {e}") from None
    except OSError as e:
        raise _err(path, "", f"cannot read: {e}") from None


def _strip_request(text: Any, head: str, tail: str, file: Path, where: str) -> str:
    """`"\\n\\nCritiqueRequest: X\\n\\nCritique:"` -> `"X"` (the scaffolding is optional)."""
    if not isinstance(text, str):
        raise _err(file, where, f"expected a string, got {type(text).__name__}")
    text = text.strip()
    if text.startswith(head + ":"):
        text = text[len(head) + 1:]
    text = re.sub(rf"\n?[ \t]*{tail}:\s*$", "", text.strip()).strip()
    if not text:
        raise _err(file, where, "empty request text")
    return text


def _turns(text: str, pattern: re.Pattern[str], file: Path, where: str) -> list[Message]:
    """Split `Human:`/`Assistant:` (or `H:`/`A:`) text into chat messages, keeping empty turns."""
    parts = pattern.split(text)
    if parts[0].strip():
        raise _err(file, where, f"text before the first turn marker: {parts[0].strip()[:60]!r}")
    return [{"role": _ROLE[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _check_conversation(conv: list[Message], last: str, file: Path, where: str) -> list[Message]:
    if not conv:
        raise _err(file, where, "no conversation turns found")
    for i, m in enumerate(conv):
        if not m["content"]:
            raise _err(file, where, f"turn {i} ({m['role']}) is empty")
    if conv[-1]["role"] != last:
        raise _err(file, where, f"the conversation must end with a {last} turn, got {conv[-1]['role']}")
    return conv


# ---- the paper's prompt folder -------------------------------------------------------------


def _paper_principles(path: Path, category: str) -> list[dict[str, str]]:
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise _err(path, "", "expected a non-empty object of {key: {prompt, edit_request}}")
    out = []
    for key, entry in data.items():
        where = f"entry '{key}'"
        if not isinstance(entry, dict) or "prompt" not in entry or "edit_request" not in entry:
            raise _err(path, where, "expected an object with 'prompt' and 'edit_request'")
        prompt = entry["prompt"]
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise _err(path, where, f"'prompt' must hold exactly one critique request, got {len(prompt)}")
            prompt = prompt[0]
        out.append({
            "id": str(key),
            "category": category,
            "critique": _strip_request(prompt, "CritiqueRequest", "Critique", path, f"{where}.prompt"),
            "revision": _strip_request(entry["edit_request"], "RevisionRequest", "Revision", path,
                                       f"{where}.edit_request"),
        })
    return out


def _paper_preference(path: Path, category: str) -> list[dict[str, str]]:
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise _err(path, "", "expected a non-empty list of instruction strings")
    out = []
    for i, text in enumerate(data):
        if not isinstance(text, str):
            raise _err(path, f"entry {i}", f"expected a string, got {type(text).__name__}")
        text = re.sub(r"\s*Options:\s*$", "", text.strip()).strip()
        if not text:
            raise _err(path, f"entry {i}", "empty instruction")
        out.append({"id": f"rl{i}", "category": category, "instruction": text})
    return out


def _paper_critique_examples(path: Path, principles: list[dict[str, str]]) -> list[dict[str, Any]]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise _err(path, "", "expected a list of example strings")
    by_text = {(p["critique"], p["revision"]): p["id"] for p in principles}
    out = []
    for i, text in enumerate(data):
        where = f"entry {i}"
        if not isinstance(text, str):
            raise _err(path, where, f"expected a string, got {type(text).__name__}")
        m = _FEW_SHOT_PARTS.match(text)
        if not m:
            raise _err(path, where, "expected a conversation followed by CritiqueRequest:, Critique:, "
                                    "RevisionRequest: and Revision:")
        turns = _turns(m["conv"].strip(), _PAPER_TURN, path, where)
        conv = _check_conversation(turns, "assistant", path, where)
        creq, rreq = m["creq"].strip(), m["rreq"].strip()
        critique = m["crit"].strip()
        revision = _TRAILING_HUMAN.sub("", m["rev"]).strip()
        for label, value in (("CritiqueRequest", creq), ("Critique", critique),
                             ("RevisionRequest", rreq), ("Revision", revision)):
            if not value:
                raise _err(path, where, f"empty {label}")
        ex: dict[str, Any] = {"conversation": conv, "critique": critique, "revision": revision}
        pid = by_text.get((creq, rreq))
        if pid is not None:
            ex["principle"] = pid
        else:
            ex["critique_request"], ex["revision_request"] = creq, rreq
        out.append(ex)
    return out


def _prompt_entries(path: Path, shape: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(index, location, entry) for a JSON list of objects that each hold a string 'prompt'."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise _err(path, "", f"expected a list of {shape}")
    for i, entry in enumerate(data):
        where = f"entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise _err(path, where, "expected an object with a string 'prompt'")
        yield i, where, entry


def _paper_preference_examples(path: Path) -> list[dict[str, Any]]:
    out = []
    for i, where, entry in _prompt_entries(path, "{prompt, corrects, incorrects}"):
        options = []
        for key in ("corrects", "incorrects"):
            v = entry.get(key)
            if not (isinstance(v, list) and v and isinstance(v[0], str) and v[0].strip()):
                raise _err(path, where, f"'{key}' must be a list holding a non-empty string")
            options.append(v[0].strip())
        conv = _turns(entry["prompt"].strip(), _PAPER_TURN, path, where)
        if conv and conv[-1]["role"] == "assistant" and not conv[-1]["content"]:
            conv = conv[:-1]  # the open "Assistant:" turn the options complete
        conv = _check_conversation(conv, "user", path, where)
        correct, incorrect = options
        # Alternate the position of the better reply so the examples teach no position bias.
        if i % 2 == 0:
            ex = {"conversation": conv, "options": [correct, incorrect], "answer": "A"}
        else:
            ex = {"conversation": conv, "options": [incorrect, correct], "answer": "B"}
        out.append(ex)
    return out


def _paper_cot_examples(path: Path) -> list[dict[str, Any]]:
    out = []
    for _, where, entry in _prompt_entries(path, "{prompt}"):
        text = entry["prompt"]
        if text.count("{}") != 1:
            n = text.count("{}")
            raise _err(path, where, f"expected exactly one '{{}}' principle placeholder, got {n}")
        head, tail = text.split("{}")
        intro = re.search(r"Consider the following conversation[^\n]*\n", head)
        if not intro:
            raise _err(path, where, "no 'Consider the following conversation' line")
        conv = _check_conversation(_turns(head[intro.end():].strip(), _COT_TURN, path, where), "user",
                                   path, where)
        opts = _OPTIONS.search(tail)
        if not opts:
            raise _err(path, where, "options ' (A) [[[...]]]' and ' (B) [[[...]]]' not found")
        reasoning = _REASONING.search(tail, opts.end())
        if not reasoning or not reasoning["r"].strip():
            raise _err(path, where, "no reasoning after \"Let's think step by step:\" "
                                    "before the final 'Human:'")
        answers = _ANSWER.findall(tail[reasoning.end():])
        if not answers:
            raise _err(path, where, "no final 'So the answer is: (A|B)'")
        out.append({
            "conversation": conv,
            "options": [opts["a"].strip(), opts["b"].strip()],
            "reasoning": reasoning["r"].strip(),
            "answer": answers[-1],
        })
    return out


def from_paper(directory: str | Path, name: str = "paper", category: str = "harm") -> Constitution:
    """Read the Constitutional AI paper's prompt folder (five JSON files) as a constitution.

    Critique/revision principles keep the file's keys (`harmful0`...) as ids; preference principles
    are `rl0`, `rl1`, ... in file order. The plain preference examples put the better reply in (A) for
    even indices and in (B) for odd ones. The chain-of-thought examples store no principle: the `{}`
    placeholder in the paper is filled with the instruction of the comparison being labelled.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise ConstitutionError(f"{folder}: not a folder (expected the paper's prompt folder)")
    for fname in PAPER_FILES:
        if not (folder / fname).is_file():
            raise ConstitutionError(f"{folder}: missing {fname} (the paper's prompt folder needs "
                                    f"{', '.join(PAPER_FILES)})")
    cr = _paper_principles(folder / PAPER_FILES[0], category)
    data = {
        "name": name,
        "version": "1.0.0",
        "description": "Converted from the prompts of the Constitutional AI paper (Bai et al. 2022, "
                       "arXiv:2212.08073; anthropics/ConstitutionalHarmlessnessPaper).",
        "critique_revision": cr,
        "preference": _paper_preference(folder / PAPER_FILES[1], category),
        "few_shot": {
            "critique_revision": _paper_critique_examples(folder / PAPER_FILES[2], cr),
            "preference": _paper_preference_examples(folder / PAPER_FILES[3]),
            "chain_of_thought": _paper_cot_examples(folder / PAPER_FILES[4]),
        },
    }
    return from_dict(data, source=str(directory))


# ---- llm-swarm -----------------------------------------------------------------------------


def from_llm_swarm(path: str | Path, name: str | None = None, category: str = "harm") -> Constitution:
    """Read an llm-swarm constitution JSON file.

    Each `constitutions` entry becomes a critique/revision principle `swarm{i}`. Each `system_chat`
    conversation becomes a worked example: its last four messages are user (critique request),
    assistant (critique), user (revision request), assistant (revision), and the messages before them
    (ending with an assistant reply) are the conversation. The example names its principle when both
    requests equal a principle's texts, else it carries the requests inline.

    llm-swarm has no preference principles, but the schema needs at least one, so one is derived per
    critique principle: id `swarm-pref{i}`, instruction
    `"Which of these assistant replies does better on the following? {critic}"`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConstitutionError(f"{path}: no such file")
    data = _read_json(path)
    if not isinstance(data, dict):
        raise _err(path, "", "expected an object with 'constitutions' and 'system_chat'")
    items = data.get("constitutions")
    if not isinstance(items, list) or not items:
        raise _err(path, "constitutions", "must be a non-empty list of {critic, revision}")
    cr, pref = [], []
    for i, item in enumerate(items):
        where = f"constitutions[{i}]"
        if not isinstance(item, dict):
            raise _err(path, where, "expected an object with 'critic' and 'revision'")
        texts = []
        for key in ("critic", "revision"):
            v = item.get(key)
            if not isinstance(v, str) or not v.strip():
                raise _err(path, where, f"'{key}' must be a non-empty string")
            texts.append(v.strip())
        critic, revision = texts
        cr.append({"id": f"swarm{i}", "category": category, "critique": critic, "revision": revision})
        pref.append({
            "id": f"swarm-pref{i}",
            "category": category,
            "instruction": f"Which of these assistant replies does better on the following? {critic}",
        })
    by_text = {(p["critique"], p["revision"]): p["id"] for p in cr}

    chats = data.get("system_chat") or []
    if not isinstance(chats, list):
        raise _err(path, "system_chat", "must be a list of conversations")
    examples = []
    tail_roles = ("user", "assistant", "user", "assistant")
    for i, chat in enumerate(chats):
        where = f"system_chat[{i}]"
        if not isinstance(chat, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in chat
        ):
            raise _err(path, where, "expected a list of {role, content} messages")
        if len(chat) < 5:
            raise _err(path, where, f"too short ({len(chat)} messages): needs a conversation ending with "
                                    "an assistant reply, then critique request, critique, revision request, "
                                    "revision")
        roles = tuple(m["role"] for m in chat[-4:])
        if roles != tail_roles:
            raise _err(path, where,
                       f"the last four messages must have roles {list(tail_roles)}, got {list(roles)}")
        conv = [{"role": m["role"], "content": m["content"].strip()} for m in chat[:-4]]
        if conv[-1]["role"] != "assistant":
            raise _err(path, where,
                       "the conversation before the critique request must end with an assistant reply")
        creq, critique, rreq, revision = (m["content"].strip() for m in chat[-4:])
        ex: dict[str, Any] = {"conversation": conv, "critique": critique, "revision": revision}
        pid = by_text.get((creq, rreq))
        if pid is not None:
            ex["principle"] = pid
        else:
            ex["critique_request"], ex["revision_request"] = creq, rreq
        examples.append(ex)

    return from_dict({
        "name": name or path.stem,
        "version": "1.0.0",
        "description": f"Converted from the llm-swarm constitution {path.name}.",
        "critique_revision": cr,
        "preference": pref,
        "few_shot": {"critique_revision": examples},
    }, source=str(path))


# ---- dispatch ------------------------------------------------------------------------------


def detect(src: str | Path) -> str:
    """The format of `src`: `paper` or `llm-swarm`; a `ConstitutionError` otherwise."""
    path = Path(src)
    supported = ("supported formats: 'paper' (a folder holding CritiqueRevisionInstructions.json and the "
                 "other prompt files of the Constitutional AI paper) and 'llm-swarm' (a .json file with a "
                 "'constitutions' key)")
    if path.is_dir():
        if (path / PAPER_FILES[0]).is_file():
            return "paper"
        raise ConstitutionError(f"{path}: a folder without {PAPER_FILES[0]}; {supported}")
    if path.is_file() and path.suffix.lower() == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and "constitutions" in data:
            return "llm-swarm"
        raise ConstitutionError(f"{path}: a JSON file without a 'constitutions' key; {supported}")
    if not path.exists():
        raise ConstitutionError(f"{path}: no such file or folder; {supported}")
    raise ConstitutionError(f"{path}: unrecognised format; {supported}")


def convert(src: str | Path, fmt: str = "auto", **kw: Any) -> Constitution:
    """Convert `src` from `fmt` (`auto`, `paper` or `llm-swarm`); `kw` goes to the format's reader."""
    if fmt == "auto":
        fmt = detect(src)
    if fmt == "paper":
        return from_paper(src, **kw)
    if fmt in ("llm-swarm", "llm_swarm"):
        return from_llm_swarm(src, **kw)
    raise ConstitutionError(f"unknown format {fmt!r}; supported formats: auto, {', '.join(FORMATS)}")
