"""Stage `preferences`: the preference-model training mix of AI and human labels.

RL-CAI trains its preference model on AI harmlessness labels (stage `feedback`) mixed with human
helpfulness labels. This stage reads the human pairs, keeps the AI rows whose label is usable
(`status == "ok"`; abstentions and failures are counted by reason), adds human rows until they are
`preferences.human_fraction` of the mix, and holds out `preferences.eval_fraction` of each kind as
the `eval` split. Which human rows join and which rows are held out depend only on the seed and the
record ids, never on input order.

Human pair sources (`preferences.human`, see `PairSource`):
  - hh-rlhf transcripts: `chosen` / `rejected` strings holding `\\n\\nHuman: ...\\n\\nAssistant: ...`;
    the shared history becomes the prompt messages, the last assistant turns the two answers;
  - TRL preference rows: `prompt` / `chosen` / `rejected`, each a string or a list of messages
    (also the implicit-prompt form, where `chosen` and `rejected` are whole conversations);
  - a directory saved by `datasets`, or a hub dataset id with `split`;
  - `builtin:helpful_pairs`: 48 everyday helpfulness pairs (cooking, coding, maths, health basics,
    writing, travel, personal finance, science). The project authors wrote and labelled them
    themselves for this toolkit; they are our own human labels, not taken from any dataset.

Files may be `.jsonl` or `.jsonl.gz`. A malformed row is an error naming the file, line and field;
a pair that is not a comparison (histories differ, identical answers, a repeat) is skipped and
counted, never turned into a label.

The output (`<run>/preferences/rows.jsonl`) is TRL's conversational preference format with
`p_chosen`, `label_source`, `split` and the AI audit columns beside it:

    cai run configs/quickstart.yaml --from preferences --to preferences
    from datasets import load_dataset
    ds = load_dataset("json", data_files="runs/quickstart/preferences/rows.jsonl", split="train")
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from cai.config import PairSource, PipelineConfig, fingerprint, plain
from cai.lm.base import Conversation
from cai.records import STATUS_OK, hh_pair, iter_jsonl, parse_hh, record_id_for, stable_seed
from cai.rundir import Stage, StageError

NAME = "preferences"
BUILTIN = ("helpful_pairs",)
ROLES = ("system", "user", "assistant")
COLUMNS = ("prompt", "chosen", "rejected", "p_chosen", "label_source", "record_id", "source", "split")
# Present on AI rows only; human rows carry them as null so every row has one schema.
AI_COLUMNS = ("p_first", "principle_ids", "orders", "feedback_model", "constitution_hash")



class PreferenceDataError(ValueError):
    """A human preference source that cannot be read; the message names the file, row and field."""


# ---- reading human pairs ---------------------------------------------------------------------


def _builtin(name: str) -> Path:
    path = Path(str(resources.files("cai") / "resources" / "prompts" / f"{name}.jsonl"))
    if name not in BUILTIN or not path.is_file():
        raise PreferenceDataError(f"builtin:{name}: no such shipped pair set (have: {', '.join(BUILTIN)})")
    return path


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    return ((f"{path}:{n}", row) for n, row in iter_jsonl(path, PreferenceDataError))


def _dataset_rows(src: PairSource) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    path = Path(src.path)
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            raise PreferenceDataError(f"{src.path}: a directory, but not one saved by datasets (save_to_disk)")
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise PreferenceDataError(f"{src.path}: no split '{src.split}' (have {list(ds)})")
            ds = ds[src.split]
    else:
        ds = datasets.load_dataset(src.path, data_dir=src.data_dir, split=src.split)
    for i, row in enumerate(ds):
        yield f"{src.path}[{src.split}][{i}]", row


def _source_rows(src: PairSource) -> Iterator[tuple[str, dict[str, Any]]]:
    if src.path.startswith("builtin:"):
        return _jsonl_rows(_builtin(src.path.split(":", 1)[1]))
    path = Path(src.path)
    if path.is_file():
        return _jsonl_rows(path)
    if path.is_dir():
        return _dataset_rows(src)
    # Not on disk: a hub id, unless it is spelled like a local path (then it is a typo, not a download).
    local = src.path.startswith((".", "/", "~")) or src.path.endswith((".jsonl", ".json", ".gz"))
    if local or src.format not in ("auto", "datasets"):
        raise PreferenceDataError(f"{src.path}: no such file")
    return _dataset_rows(src)


def _messages(where: str, name: str, value: Any) -> Conversation:
    """A list of {role, content} messages, checked field by field."""
    if not isinstance(value, list) or not value:
        raise PreferenceDataError(f"{where}: '{name}' must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise PreferenceDataError(f"{where}: '{name}'[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise PreferenceDataError(f"{where}: '{name}'[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise PreferenceDataError(f"{where}: '{name}'[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(where: str, name: str, value: Any, prompt: Conversation) -> str:
    """The single assistant answer of `chosen`/`rejected` given as a string or as messages."""
    if isinstance(value, str):
        return value
    msgs = _messages(where, name, value)
    # Some datasets repeat the prompt inside chosen/rejected (e.g. [user, assistant]); drop it.
    if len(msgs) > 1 and msgs[:-1] == prompt:
        msgs = msgs[-1:]
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise PreferenceDataError(f"{where}: '{name}' must be one assistant message (after the prompt)")
    return msgs[0]["content"]


def _need(where: str, row: dict[str, Any], fields: tuple[str, ...]) -> None:
    for k in fields:
        if row.get(k) is None:
            raise PreferenceDataError(f"{where}: missing field '{k}' (have {sorted(row)})")


def _from_hh(where: str, row: dict[str, Any]) -> tuple[Conversation, str, str] | str:
    _need(where, row, ("chosen", "rejected"))
    for k in ("chosen", "rejected"):
        turns = parse_hh(row[k]) if isinstance(row[k], str) else []
        if not any(t["role"] == "user" for t in turns):
            raise PreferenceDataError(f"{where}: '{k}' is not an hh-rlhf transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    pair = hh_pair(row["chosen"], row["rejected"])
    return pair if pair is not None else "mismatched_history"


def _from_preference(where: str, row: dict[str, Any]) -> tuple[Conversation, str, str] | str:
    _need(where, row, ("chosen", "rejected"))
    if row.get("prompt") is not None:
        p = row["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(where, "prompt", p)
        return prompt, _answer(where, "chosen", row["chosen"], prompt), _answer(where, "rejected", row["rejected"], prompt)
    # Implicit prompt: chosen and rejected are whole conversations sharing all but the last turn.
    if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
        raise PreferenceDataError(f"{where}: missing field 'prompt' (string answers need a prompt column)")
    c, r = _messages(where, "chosen", row["chosen"]), _messages(where, "rejected", row["rejected"])
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise PreferenceDataError(f"{where}: 'chosen' and 'rejected' must end with an assistant message")
    if c[:-1] != r[:-1]:
        return "mismatched_history"
    return c[:-1], c[-1]["content"], r[-1]["content"]


def _is_hh(row: dict[str, Any], fmt: str) -> bool:
    if fmt == "hh":
        return True
    if fmt == "preference":
        return False
    # auto / datasets: no prompt column and transcript strings in chosen/rejected
    return row.get("prompt") is None and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str)


def _parse(where: str, row: dict[str, Any], fmt: str) -> tuple[Conversation, str, str] | str:
    """(prompt messages, chosen text, rejected text), or the reason the pair is skipped."""
    parsed = _from_hh(where, row) if _is_hh(row, fmt) else _from_preference(where, row)
    if isinstance(parsed, str):
        return parsed
    prompt, chosen, rejected = parsed
    if not prompt or prompt[-1]["role"] != "user":
        raise PreferenceDataError(f"{where}: 'prompt' must end with a user message")
    if not prompt[-1]["content"].strip():
        raise PreferenceDataError(f"{where}: 'prompt' has an empty user message")
    if chosen.strip() == rejected.strip():
        return "identical"
    return prompt, chosen, rejected


def read_pairs(src: PairSource, skipped: Counter[str] | None = None) -> list[dict[str, Any]]:
    """Human preference rows (records.py "Preference rows") from one source, in source order.

    Pairs that are not a comparison are left out and counted by reason in `skipped` when given:
    `mismatched_history` (the two transcripts differ before the last answer), `identical` (both
    answers the same), `duplicate` (the same pair again). `limit` keeps the first N pairs read.
    """
    out: list[dict[str, Any]] = []
    if src.limit == 0:
        return out
    skipped = skipped if skipped is not None else Counter()
    seen: set[str] = set()
    for where, row in _source_rows(src):
        parsed = _parse(where, row, src.format)
        if isinstance(parsed, str):
            skipped[parsed] += 1
            continue
        prompt, chosen, rejected = parsed
        text = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
        rid = row["id"] if isinstance(row.get("id"), str) and row["id"] else record_id_for(src.path, text)
        if rid in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(rid)
        out.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "p_chosen": 1.0,
            "label_source": "human",
            "record_id": rid,
            "source": src.path,
        })
        if src.limit is not None and len(out) >= src.limit:
            break
    return out


def read_all(sources: list[PairSource], skipped: Counter[str] | None = None) -> list[dict[str, Any]]:
    """Rows of every source in order; a record id used by two sources is an error."""
    rows: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    for src in sources:
        for r in read_pairs(src, skipped):
            if r["record_id"] in owner:
                raise PreferenceDataError(f"{src.path}: record id '{r['record_id']}' also used by {owner[r['record_id']]}")
            owner[r["record_id"]] = src.path
            rows.append(r)
    return rows


# ---- the mix ---------------------------------------------------------------------------------


def human_needed(n_ai: int, fraction: float) -> int:
    """How many human rows make them `fraction` of a mix with `n_ai` AI rows (half rounds up)."""
    if fraction <= 0:
        return 0
    # Rounded first so float noise (e.g. 3 * 0.4 / 0.6) cannot tip a half-way case.
    return math.floor(round(n_ai * fraction / (1 - fraction), 9) + 0.5)


def _by_hash(rows: list[dict[str, Any]], seed: int, salt: str) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (stable_seed(seed, salt, r["record_id"]), r["record_id"]))


def _eval_ids(rows: list[dict[str, Any]], fraction: float, seed: int) -> set[str]:
    """The held-out ids of one kind: a seeded `fraction` of them, at least one from 5 rows on,
    never all of them."""
    n = len(rows)
    k = math.floor(round(n * fraction, 9) + 0.5) if fraction > 0 else 0
    if fraction > 0 and n >= 5:
        k = max(k, 1)
    k = min(k, n - 1) if n > 1 else 0
    return {r["record_id"] for r in _by_hash(rows, seed, "eval")[:k]}


def _out_row(r: dict[str, Any], split: str, label_source: str) -> dict[str, Any]:
    row = {k: r.get(k) for k in COLUMNS}
    row.update(label_source=label_source, split=split)
    for k in AI_COLUMNS:
        row[k] = r.get(k) if label_source == "ai" else None
    return row


def mix(
    ai_rows: list[dict[str, Any]],
    human_rows: list[dict[str, Any]],
    human_fraction: float,
    eval_fraction: float,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The training mix and its counts.

    AI rows with status "ok" all join; human rows are drawn (by a seeded hash of their record ids,
    so the draw does not depend on input order) until they are `human_fraction` of the mix, or
    all of them when there are no usable AI rows and the fraction is above 0. Each kind holds out
    `eval_fraction` of its rows as split "eval". AI rows come first in the output so that
    `datasets` infers the AI audit columns' types from the first block it reads.
    """
    if not 0.0 <= human_fraction < 1.0:
        raise ValueError(f"human_fraction must be in [0, 1), got {human_fraction}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    ai = [r for r in ai_rows if r.get("status") == STATUS_OK]
    not_ok: dict[str, Counter[str]] = {}
    for r in ai_rows:
        if r.get("status") != STATUS_OK:
            not_ok.setdefault(str(r.get("status")), Counter())[str(r.get("reason"))] += 1
    # Without usable AI labels the mix is the human pairs alone (a helpfulness-only model).
    wanted = human_needed(len(ai), human_fraction) if ai else (len(human_rows) if human_fraction > 0 else 0)
    human = _by_hash(human_rows, seed, "human")[:wanted]
    ids = Counter(r["record_id"] for r in ai + human)
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        raise ValueError(f"record ids used by more than one preference row: {sorted(dup)[:5]}")

    held_ai, held_human = _eval_ids(ai, eval_fraction, seed), _eval_ids(human, eval_fraction, seed)
    rows = [_out_row(r, "eval" if r["record_id"] in held_ai else "train", "ai") for r in ai]
    rows += [_out_row(r, "eval" if r["record_id"] in held_human else "train", "human") for r in human]
    counts: dict[str, Any] = {
        "total": len(rows),
        "ai": len(ai),
        "human": len(human),
        "human_wanted": wanted,
        "human_available": len(human_rows),
        "human_share": round(len(human) / len(rows), 4) if rows else 0.0,
        "train": len(rows) - len(held_ai) - len(held_human),
        "eval": len(held_ai) + len(held_human),
        "eval_ai": len(held_ai),
        "eval_human": len(held_human),
        "ai_set_aside": sum(sum(c.values()) for c in not_ok.values()),
    }
    for status, by_reason in sorted(not_ok.items()):
        counts[f"ai_{status}_by_reason"] = dict(sorted(by_reason.items()))
    return rows, counts


def run(cfg: PipelineConfig, ai_rows: list[dict[str, Any]], inputs_fp: str, allow_changed: bool = False) -> Stage:
    p = cfg.preferences
    settings = plain({"preferences": p, "seed": cfg.seed, "inputs": inputs_fp})
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)
    skipped: Counter[str] = Counter()
    # With human_fraction 0 no human row can join, so the sources (perhaps a hub id) are not read.
    human = read_all(p.human, skipped) if p.human_fraction > 0 else []
    rows, counts = mix(ai_rows, human, p.human_fraction, p.eval_fraction, cfg.seed)
    counts["human_skipped_by_reason"] = dict(sorted(skipped.items()))
    if not rows:
        raise StageError(
            f"{NAME}: the mix is empty: {counts['ai']} usable AI labels of {len(ai_rows)} "
            f"(set aside: {counts['ai_set_aside']}), {len(human)} human pairs read with "
            f"human_fraction {p.human_fraction}. Check the feedback stage's manifest with `cai show`, "
            "or add human pairs (preferences.human) with a human_fraction above 0."
        )
    # Rewritten whole each time (cheap, deterministic): the rows file always equals its inputs.
    stage.rows_path.unlink(missing_ok=True)
    stage.append(rows)
    stage.write_manifest("complete", counts)
    return stage
