"""Tests for the `prompts` stage: collecting sources by kind, record ids across sources, the helpful
share and the stage run. Reading one source is tested in test_sources.py."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from cai.config import PipelineConfig, PromptsConfig, PromptSource, SLConfig
from cai.rundir import ResumeError, Stage
from cai.sources import PromptError, read_source
from cai.stages import prompts as P
from cai.stages.prompts import collect, helpful_needed


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- collect --------------------------------------------------------------------------------


def test_builtin_sets_do_not_share_ids_or_prompts():
    red = collect([PromptSource("builtin:red_team")], "red_team")
    helpful = collect([PromptSource("builtin:helpful")], "helpful")
    assert not {r["record_id"] for r in red} & {r["record_id"] for r in helpful}
    assert not {r["prompt"] for r in red} & {r["prompt"] for r in helpful}
    assert {r["kind"] for r in red} == {"red_team"} and {r["kind"] for r in helpful} == {"helpful"}


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
