"""Stage `preferences`: the preference-model training mix of AI and human labels.

RL-CAI trains its preference model on AI harmlessness labels (stage `feedback`) mixed with human
helpfulness labels. This stage reads the human pairs, keeps the AI rows whose label is usable
(`status == "ok"`; abstentions and failures are counted by reason), adds human rows until they are
`preferences.human_fraction` of the mix, and holds out `preferences.eval_fraction` of each kind as
the `eval` split. Which human rows join and which rows are held out depend only on the seed and the
record ids, never on input order.

Human pair sources (`preferences.human`, see `PairSource`) are read by `cai.sources`: hh-rlhf
transcripts, TRL preference rows (`prompt` / `chosen` / `rejected`, strings or messages), a
directory saved by `datasets` or a hub dataset id, and `builtin:helpful_pairs`: 48 everyday
helpfulness pairs (cooking, coding, maths, health basics, writing, travel, personal finance,
science). The project authors wrote and labelled them themselves for this toolkit; they are our own
human labels, not taken from any dataset. A malformed row is an error naming the file, line and
field; a pair that is not a comparison (histories differ, identical answers, a repeat) is skipped
and counted, never turned into a label.

The output (`<run>/preferences/rows.jsonl`) is TRL's conversational preference format with
`p_chosen`, `label_source`, `split` and the AI audit columns beside it:

    cai run configs/quickstart.yaml --from preferences --to preferences
    from datasets import load_dataset
    ds = load_dataset("json", data_files="runs/quickstart/preferences/rows.jsonl", split="train")
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from cai.config import PipelineConfig, fingerprint, plain
from cai.records import STATUS_OK, stable_seed
from cai.rundir import Stage, StageError
from cai.sources import read_all_pairs

NAME = "preferences"
COLUMNS = ("prompt", "chosen", "rejected", "p_chosen", "label_source", "record_id", "source", "split")
# Present on AI rows only; human rows carry them as null so every row has one schema.
AI_COLUMNS = ("p_first", "principle_ids", "orders", "feedback_model", "constitution_hash")


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
    human = read_all_pairs(p.human, skipped) if p.human_fraction > 0 else []
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
