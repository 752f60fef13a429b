"""Stage `prompts`: red-team and helpfulness prompts as rows with stable record ids.

Every source is read by `cai.sources`: JSONL (a `prompt` column, or `field`), plain text (one prompt
a line), CSV (a `prompt` column, or `field`), hh-rlhf transcripts (the first human turn), chat rows
(`messages`: the first user message), a `datasets` dataset saved to disk or on the hub, and the sets
shipped with the toolkit (`builtin:red_team`, `builtin:helpful`). This stage tags each row with its
kind and keeps as many helpfulness prompts as `sl.helpful_fraction` asks for.

    cai run configs/quickstart.yaml --to prompts
"""

from __future__ import annotations

import math
from typing import Any

from cai.config import PipelineConfig, PromptSource, fingerprint, plain
from cai.rundir import Stage
from cai.sources import read_prompts

NAME = "prompts"


def collect(sources: list[PromptSource], kind: str) -> list[dict[str, Any]]:
    """Prompt rows of `kind` from every source in order (`cai.sources.read_prompts`)."""
    return [{"record_id": r["record_id"], "kind": kind, **{k: r[k] for k in ("prompt", "category", "source")}}
            for r in read_prompts(sources)]


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
