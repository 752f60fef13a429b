"""Stage `prompts`: read red-team and helpfulness prompts into rows with stable record ids.

Sources: JSONL files (a `prompt` column, or `field`), hh-rlhf transcripts (`chosen`, `rejected`,
`transcript` or `text` holding `\\n\\nHuman: ...\\n\\nAssistant: ...`: the first human turn),
chat rows (`messages`: the first user message), a `datasets` dataset saved to disk or on the hub,
and the sets shipped with the toolkit (`builtin:red_team`, `builtin:helpful`).

    cai run configs/quickstart.yaml --to prompts
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from cai.config import PipelineConfig, PromptSource, fingerprint, plain
from cai.records import first_human_turn, iter_jsonl, record_id_for
from cai.rundir import Stage

NAME = "prompts"
HH_FIELDS = ("chosen", "transcript", "rejected", "text")


class PromptError(ValueError):
    """A prompt source that cannot be read; the message names the source and the row."""


def _builtin(name: str) -> Path:
    path = Path(str(resources.files("cai") / "resources" / "prompts" / f"{name}.jsonl"))
    if not path.is_file():
        raise PromptError(f"builtin:{name}: no such shipped prompt set (have: red_team, helpful)")
    return path


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    return ((f"{path}:{n}", row) for n, row in iter_jsonl(path, PromptError))


def _dataset_rows(src: PromptSource) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    path = Path(src.path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise PromptError(f"{src.path}: no split '{src.split}' (have {list(ds)})")
            ds = ds[src.split]
    else:
        ds = datasets.load_dataset(src.path, data_dir=src.data_dir, split=src.split)
    for i, row in enumerate(ds):
        yield f"{src.path}[{src.split}][{i}]", row


def _extract(where: str, row: dict[str, Any], src: PromptSource) -> str:
    fmt = src.format
    if src.field:
        value = row.get(src.field)
        if value is None:
            raise PromptError(f"{where}: no field '{src.field}' (have {sorted(row)})")
        if fmt == "hh":
            value = first_human_turn(str(value))
    elif fmt == "hh" or (fmt in ("auto", "datasets") and "prompt" not in row and any(k in row for k in HH_FIELDS)):
        key = next((k for k in HH_FIELDS if k in row), None)
        if key is None:
            raise PromptError(f"{where}: no hh-rlhf transcript field ({', '.join(HH_FIELDS)})")
        value = first_human_turn(str(row[key]))
        if value is None:
            raise PromptError(f"{where}: '{key}' has no '\\n\\nHuman:' turn")
    elif "prompt" in row:
        value = row["prompt"]
    elif "messages" in row and isinstance(row["messages"], list):
        value = next((m.get("content") for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"), None)
    else:
        raise PromptError(f"{where}: no prompt found: give a 'prompt' column, set 'field', or use format: hh")
    if not isinstance(value, str) or not value.strip():
        raise PromptError(f"{where}: the prompt is empty or not a string")
    return value.strip()


def read_source(src: PromptSource) -> list[dict[str, Any]]:
    """Rows {record_id, prompt, category, source} from one source, de-duplicated, in file order."""
    if src.path.startswith("builtin:"):
        rows: Iterator[tuple[str, dict[str, Any]]] = _jsonl_rows(_builtin(src.path.split(":", 1)[1]))
    elif src.format == "datasets" or not Path(src.path).is_file():
        local = src.path.startswith((".", "/", "~")) or src.path.endswith((".jsonl", ".json", ".gz"))
        if not Path(src.path).exists() and (src.format not in ("auto", "datasets") or local):
            raise PromptError(f"{src.path}: no such file")
        rows = _dataset_rows(src)
    else:
        rows = _jsonl_rows(Path(src.path))
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    if src.limit == 0:
        return out
    for where, row in rows:
        text = _extract(where, row, src)
        if text in seen:
            continue
        seen.add(text)
        rid = row.get("id") if isinstance(row.get("id"), str) else record_id_for(src.path, text)
        out.append({"record_id": rid, "prompt": text, "category": row.get("category"), "source": src.path})
        if src.limit is not None and len(out) >= src.limit:
            break
    return out


def collect(sources: list[PromptSource], kind: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    ids: dict[str, str] = {}
    for src in sources:
        for r in read_source(src):
            if r["record_id"] in ids:
                raise PromptError(f"{src.path}: record id '{r['record_id']}' also used by {ids[r['record_id']]}")
            ids[r["record_id"]] = src.path
            rows.append({"record_id": r["record_id"], "kind": kind, **{k: r[k] for k in ("prompt", "category", "source")}})
    return rows


def helpful_needed(n_red: int, fraction: float) -> int:
    """How many helpfulness rows make them `fraction` of the export."""
    # Rounded before the ceiling so that float noise (3 * 0.4 / 0.6 = 2.0000000000000004) does
    # not ask for one prompt more than the fraction needs.
    return math.ceil(round(n_red * fraction / (1 - fraction), 9)) if fraction > 0 else 0


def run(cfg: PipelineConfig, allow_changed: bool = False) -> Stage:
    settings = plain({"prompts": cfg.prompts, "helpful_fraction": cfg.sl.helpful_fraction})
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)
    red = collect(cfg.prompts.red_team, "red_team")
    helpful = collect(cfg.prompts.helpful, "helpful")
    want = helpful_needed(len(red), cfg.sl.helpful_fraction)
    helpful = helpful[:want]
    rows = red + helpful
    # Rewritten whole each time (cheap, deterministic): the rows file always equals the sources.
    stage.rows_path.unlink(missing_ok=True)
    stage.append(rows)
    stage.write_manifest("complete", {"red_team": len(red), "helpful": len(helpful),
                                      "helpful_wanted": want, "total": len(rows)})
    return stage
