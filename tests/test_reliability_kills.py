"""The kill harness (reliability/kills.py): its quick variant kills the data stages three times and
finds the killed run equal to an uninterrupted one; its comparison notices a lost, a duplicated or
a changed row, and its work-lost count sees calls made again."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kills():
    spec = importlib.util.spec_from_file_location("reliability_kills", ROOT / "reliability" / "kills.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_quick_variant_survives_its_kills(kills, tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert kills.main(["--quick", "--seed", "1", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    f = json.loads(out.read_text())
    assert f["kills"] == 3 and not f["errors"] and f["ok"]
    c = f["compare"]
    assert (c["lost"], c["duplicated"], c["bytes_differing"], c["manifests_differ"]) == (0, 0, 0, [])
    assert set(c["stages"]) >= {"prompts", "sl_generate", "sl_export", "pairs", "feedback", "preferences"}
    assert all(s["rows"] > 0 for s in c["stages"].values())
    assert len(f["work_lost"]["per_restart"]) == 3  # one restart follows each kill
    assert "records lost: 0, duplicated: 0, bytes differing: 0" in capsys.readouterr().out


def _stage(run: Path, name: str, ids: list[str], text: str = "x") -> None:
    d = run / name
    d.mkdir(parents=True)
    (d / "rows.jsonl").write_text("".join(json.dumps({"record_id": i, "t": text}) + "\n" for i in ids))
    (d / "manifest.json").write_text(json.dumps({"status": "complete", "counts": {"rows": len(ids)},
                                                 "fingerprint": "f"}))


def test_the_comparison_counts_lost_duplicated_and_changed_rows(kills, tmp_path):
    _stage(tmp_path / "a", "pairs", ["r1", "r2", "r3"])
    _stage(tmp_path / "b", "pairs", ["r1", "r1", "r3"])
    c = kills.compare(tmp_path / "a", tmp_path / "b")
    assert (c["lost"], c["duplicated"]) == (1, 1) and c["bytes_differing"] > 0
    _stage(tmp_path / "c", "pairs", ["r1", "r2", "r3"], text="y")
    c = kills.compare(tmp_path / "a", tmp_path / "c")
    assert (c["lost"], c["duplicated"], c["bytes_differing"]) == (0, 0, 3)
    same = kills.compare(tmp_path / "a", tmp_path / "a")
    assert (same["lost"], same["duplicated"], same["bytes_differing"]) == (0, 0, 0)


def test_work_lost_counts_what_each_restart_makes_again(kills):
    ev = [{"pid": 1, "stage": "pairs", "site": "call", "key": "k1"},
          {"pid": 1, "stage": "pairs", "site": "call", "key": "k2"},
          {"pid": 1, "stage": "pairs", "site": "append", "ids": ["r1"]},
          {"pid": 1, "stage": "pairs", "site": "call", "kill": "before"},
          {"pid": 2, "stage": "pairs", "site": "call", "key": "k2"},
          {"pid": 2, "stage": "pairs", "site": "call", "key": "k3"},
          {"pid": 2, "stage": "pairs", "site": "append", "ids": ["r1", "r2"]},
          {"pid": 3, "stage": "pm", "site": "step", "step": 1},
          {"pid": 4, "stage": "pm", "site": "step", "step": 1}]
    w = kills.work_lost(ev)
    assert w["per_restart"] == [{"calls": 1, "rows": 1, "steps": 0}, {"calls": 0, "rows": 0, "steps": 0},
                                {"calls": 0, "rows": 0, "steps": 1}]
    assert (w["calls_max"], w["rows_max"], w["steps_max"]) == (1, 1, 1)


def test_the_plan_spreads_its_kills_over_the_stages(kills):
    clean = [{"pid": 1, "stage": s, "site": site} for s in ("prompts", "pairs", "feedback")
             for site in ("append", "manifest", "call") for _ in range(4)]
    plan = kills.make_plan(clean, 6, seed=3)
    assert [p["stage"] for p in plan] == ["prompts", "prompts", "pairs", "pairs", "feedback", "feedback"]
    assert all(1 <= p["nth"] <= 4 and p["mode"] in kills.MODES[p["site"]] for p in plan)
    assert plan == kills.make_plan(clean, 6, seed=3)  # seeded
