"""Stage `sl_export`: the SL-CAI fine-tuning set.

Keeps rows whose final answer is usable (`status == "ok"`), red-team revisions and helpfulness
answers together, as TRL `messages` rows with the audit columns beside them (`init_response`,
every round's principle, critique and revision, the constitution hash). Dropped rows are counted
by reason in the manifest. The file loads with `datasets` and trains with TRL as it is:

    from datasets import load_dataset
    ds = load_dataset("json", data_files="runs/quickstart/sl_export/rows.jsonl", split="train")
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from cai.config import PipelineConfig, fingerprint
from cai.records import STATUS_OK
from cai.rundir import Stage, StageError

NAME = "sl_export"
COLUMNS = ("messages", "record_id", "kind", "prompt", "category", "source", "init_response", "rounds",
           "final_round", "constitution_hash", "model", "seed")


def export_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The training rows and the counts (kept, dropped by reason, the helpfulness share)."""
    kept = [{k: r.get(k) for k in COLUMNS} for r in rows if r["status"] == STATUS_OK]
    dropped = Counter(r["reason"] for r in rows if r["status"] != STATUS_OK)
    n_help = sum(r["kind"] == "helpful" for r in kept)
    return kept, {
        "exported": len(kept),
        "red_team": len(kept) - n_help,
        "helpful": n_help,
        "helpful_share": round(n_help / len(kept), 4) if kept else 0.0,
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dict(sorted(dropped.items())),
    }


def run(cfg: PipelineConfig, inputs: list[dict[str, Any]], inputs_fp: str, allow_changed: bool = False) -> Stage:
    settings = {"inputs": inputs_fp}
    stage = Stage(cfg.run_dir, NAME, fingerprint(settings), settings, allow_changed)
    kept, counts = export_rows(inputs)
    if not kept:
        raise StageError(f"{NAME}: every row was dropped ({counts['dropped_by_reason']}); nothing to train on. "
                         "Raise the sl.*.max_new_tokens limits or check the model's answers with `cai show`.")
    stage.rows_path.unlink(missing_ok=True)
    stage.append(kept)
    stage.write_manifest("complete", counts)
    return stage
