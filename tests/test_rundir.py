"""Tests for `cai.rundir` (rows, torn tails, resume checks, atomic writes) and `sl_export.export_rows`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cai.config import PipelineConfig
from cai.rundir import ResumeError, Stage, atomic_write, read_jsonl, write_json
from cai.stages import sl_export
from cai.stages.sl_export import COLUMNS, export_rows

SETTINGS = {"sl": {"rounds": 2, "few_shot": 1}, "model": "m"}


def _stage(run: Path, fp: str = "fp-1", settings: dict[str, Any] | None = None, **kw: Any) -> Stage:
    return Stage(run, "sl_generate", fp, settings if settings is not None else SETTINGS, **kw)


def _rows(*ids: str) -> list[dict[str, Any]]:
    return [{"record_id": i, "text": f"row {i} ünïcode"} for i in ids]


# ---- rows -----------------------------------------------------------------------------------


def test_new_stage_is_empty(tmp_path):
    st = _stage(tmp_path)
    assert st.dir == tmp_path / "sl_generate" and st.dir.is_dir()
    assert st.rows() == [] and st.done_ids() == set()
    assert st.manifest() is None and not st.complete()


def test_append_rows_done_ids(tmp_path):
    st = _stage(tmp_path)
    st.append(_rows("a", "b"))
    st.append([])  # nothing to write is fine
    st.append(_rows("c"))
    assert st.rows() == _rows("a", "b", "c")
    assert st.done_ids() == {"a", "b", "c"}
    text = st.rows_path.read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count("\n") == 3


def test_rows_survive_reopen(tmp_path):
    _stage(tmp_path).append(_rows("a", "b"))
    assert _stage(tmp_path).rows() == _rows("a", "b")


def test_append_accepts_a_generator(tmp_path):
    st = _stage(tmp_path)
    st.append(r for r in _rows("x", "y"))
    assert st.done_ids() == {"x", "y"}


def test_torn_last_line_is_cut_on_reopen(tmp_path):
    st = _stage(tmp_path)
    st.append(_rows("a", "b"))
    whole = st.rows_path.read_bytes()
    torn = json.dumps({"record_id": "c", "text": "half"}).encode()[:-7]
    with open(st.rows_path, "ab") as f:
        f.write(torn)
    # even before a reopen, readers skip the torn line
    assert st.done_ids() == {"a", "b"}
    again = _stage(tmp_path)
    assert again.rows_path.read_bytes() == whole
    assert again.done_ids() == {"a", "b"}
    # and appending after the repair gives whole lines
    again.append(_rows("c"))
    assert again.rows() == _rows("a", "b", "c")


def test_torn_complete_json_without_newline_is_not_counted(tmp_path):
    # a whole JSON object whose newline never landed is still an unfinished write
    st = _stage(tmp_path)
    st.append(_rows("a"))
    with open(st.rows_path, "ab") as f:
        f.write(json.dumps({"record_id": "b"}).encode())
    assert _stage(tmp_path).done_ids() == {"a"}


def test_torn_only_line_leaves_empty_file(tmp_path):
    st = _stage(tmp_path)
    st.rows_path.write_bytes(b'{"record_id": "a", "te')
    again = _stage(tmp_path)
    assert again.rows_path.read_bytes() == b""
    assert again.rows() == []


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    st = _stage(tmp_path)
    st.append(_rows("a"))
    with open(st.rows_path, "a", encoding="utf-8") as f:
        f.write("{not json}\n")
    st.append(_rows("c"))
    with pytest.raises(ValueError) as e:
        st.rows()
    assert f"{st.rows_path}:2" in str(e.value)


def test_read_jsonl_skips_blank_lines(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(read_jsonl(p)) == [{"a": 1}, {"a": 2}]


# ---- manifest and resume --------------------------------------------------------------------


def test_manifest_and_complete(tmp_path):
    st = _stage(tmp_path)
    st.write_manifest("running", {"done": 1})
    assert not st.complete()
    st.write_manifest("complete", {"done": 2}, constitution_hash="abc")
    m = st.manifest()
    assert m["status"] == "complete" and m["counts"] == {"done": 2}
    assert m["fingerprint"] == "fp-1" and m["settings"] == SETTINGS
    assert m["constitution_hash"] == "abc" and m["stage"] == "sl_generate"
    assert "python" in m["versions"]
    assert st.complete()
    assert _stage(tmp_path).complete()


def test_manifest_records_when_the_stage_was_opened_and_its_wall_time(tmp_path, monkeypatch):
    import time

    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    st = _stage(tmp_path)
    clock[0] += 12.34
    st.write_manifest("complete", {})
    m = st.manifest()
    assert m["wall_s"] == 12.3
    assert m["started"] == time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(1_000_000.0))


def test_same_fingerprint_resumes(tmp_path):
    st = _stage(tmp_path)
    st.append(_rows("a"))
    st.write_manifest("running", {})
    assert _stage(tmp_path).done_ids() == {"a"}


def test_changed_fingerprint_raises_listing_the_setting(tmp_path):
    st = _stage(tmp_path)
    st.append(_rows("a"))
    st.write_manifest("running", {})
    new = {"sl": {"rounds": 3, "few_shot": 1}, "model": "m"}
    with pytest.raises(ResumeError) as e:
        _stage(tmp_path, fp="fp-2", settings=new)
    msg = str(e.value)
    assert "sl.rounds: 2 -> 3" in msg
    assert "few_shot" not in msg and "model" not in msg  # unchanged settings are not listed
    assert "sl_generate" in msg


def test_changed_fingerprint_with_added_and_removed_keys(tmp_path):
    _stage(tmp_path).write_manifest("running", {})
    with pytest.raises(ResumeError) as e:
        _stage(tmp_path, fp="fp-2", settings={"sl": {"rounds": 2}, "seed": 4})
    msg = str(e.value)
    assert "sl.few_shot: 1 -> None" in msg and "seed: None -> 4" in msg and "model: 'm' -> None" in msg


def test_changed_inputs_only(tmp_path):
    _stage(tmp_path).write_manifest("running", {})
    with pytest.raises(ResumeError, match="inputs changed"):
        _stage(tmp_path, fp="fp-2")


def test_allow_changed_proceeds_and_keeps_rows(tmp_path):
    st = _stage(tmp_path)
    st.append(_rows("a", "b"))
    st.write_manifest("complete", {})
    again = _stage(tmp_path, fp="fp-2", settings={"x": 1}, allow_changed=True)
    assert again.done_ids() == {"a", "b"}
    assert not again.complete()  # the manifest still holds the old fingerprint
    again.write_manifest("complete", {})
    assert _stage(tmp_path, fp="fp-2", settings={"x": 1}).complete()


def test_no_manifest_means_no_check(tmp_path):
    st = _stage(tmp_path)
    st.append(_rows("a"))
    assert _stage(tmp_path, fp="other").done_ids() == {"a"}


def test_view_does_not_create_or_check(tmp_path):
    v = Stage.view(tmp_path / "run", "prompts")
    assert not v.dir.exists()
    assert v.manifest() is None
    st = Stage(tmp_path / "run", "prompts", "fp", {})
    st.write_manifest("complete", {})
    assert Stage.view(tmp_path / "run", "prompts").manifest()["fingerprint"] == "fp"
    assert Stage.view(tmp_path / "run", "prompts").complete()  # whatever its fingerprint
    st.write_manifest("running", {})
    assert not Stage.view(tmp_path / "run", "prompts").complete()


# ---- atomic writes and content hash ---------------------------------------------------------


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "file.json"
    atomic_write(target, "one")
    atomic_write(target, "two")
    write_json(tmp_path / "sub" / "m.json", {"k": "ü"})
    assert target.read_text() == "two"
    assert json.loads((tmp_path / "sub" / "m.json").read_text(encoding="utf-8")) == {"k": "ü"}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["file.json", "m.json"]


def test_content_hash(tmp_path):
    st = _stage(tmp_path)
    empty = st.content_hash()
    st.append(_rows("a"))
    h1 = st.content_hash()
    assert h1 != empty
    assert h1 == st.content_hash() == _stage(tmp_path).content_hash()
    st.append(_rows("b"))
    h2 = st.content_hash()
    assert h2 != h1
    # same content in another run directory hashes the same
    other = _stage(tmp_path / "other")
    other.append(_rows("a", "b"))
    assert other.content_hash() == h2
    # one changed byte changes it
    data = st.rows_path.read_bytes()
    st.rows_path.write_bytes(data.replace(b"row a", b"row A"))
    assert st.content_hash() != h2


# ---- sl_export ------------------------------------------------------------------------------


def _sl_row(rid: str, kind: str, status: str = "ok", reason: str | None = None) -> dict[str, Any]:
    return {
        "record_id": rid, "kind": kind, "prompt": f"prompt {rid}", "category": "c", "source": "s",
        "init_response": "init", "init_finish": "stop", "rounds": [], "final_round": 0,
        "status": status, "reason": reason,
        "messages": [{"role": "user", "content": f"prompt {rid}"}, {"role": "assistant", "content": "ans"}],
        "constitution_hash": "h", "model": "m", "seed": 0,
    }


def test_export_rows_counts():
    rows = [
        _sl_row("r1", "red_team"), _sl_row("r2", "red_team"), _sl_row("r3", "red_team"),
        _sl_row("r4", "red_team", "dropped", "truncated"),
        _sl_row("r5", "red_team", "dropped", "echoes_critique"),
        _sl_row("r6", "red_team", "dropped", "truncated"),
        _sl_row("h1", "helpful"), _sl_row("h2", "helpful", "dropped", "empty"),
    ]
    kept, counts = export_rows(rows)
    assert [r["record_id"] for r in kept] == ["r1", "r2", "r3", "h1"]
    assert counts["exported"] == 4
    assert counts["red_team"] == 3 and counts["helpful"] == 1
    assert counts["helpful_share"] == 0.25
    assert counts["dropped"] == 4
    assert counts["dropped_by_reason"] == {"echoes_critique": 1, "empty": 1, "truncated": 2}
    assert list(counts["dropped_by_reason"]) == sorted(counts["dropped_by_reason"])


def test_export_rows_columns():
    row = _sl_row("r1", "red_team")
    row["extra_debug"] = "x"
    kept, _ = export_rows([row])
    assert list(kept[0]) == list(COLUMNS)
    assert "status" not in kept[0] and "extra_debug" not in kept[0] and "init_finish" not in kept[0]
    assert kept[0]["messages"] == row["messages"]


def test_export_rows_share_is_rounded():
    rows = [_sl_row("h1", "helpful"), _sl_row("r1", "red_team"), _sl_row("r2", "red_team")]
    _, counts = export_rows(rows)
    assert counts["helpful_share"] == round(1 / 3, 4)


def test_export_rows_empty_and_all_dropped():
    kept, counts = export_rows([])
    assert kept == [] and counts["exported"] == 0 and counts["helpful_share"] == 0.0
    kept, counts = export_rows([_sl_row("r1", "red_team", "dropped", "unchanged")])
    assert kept == [] and counts["dropped"] == 1 and counts["helpful_share"] == 0.0


def test_sl_export_run(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"))
    rows = [_sl_row("r1", "red_team"), _sl_row("h1", "helpful"), _sl_row("r2", "red_team", "dropped", "empty")]
    st = sl_export.run(cfg, rows, "inputs-1")
    assert [r["record_id"] for r in st.rows()] == ["r1", "h1"]
    assert st.manifest()["counts"]["dropped_by_reason"] == {"empty": 1}
    # a second run rewrites the file rather than appending
    assert len(sl_export.run(cfg, rows, "inputs-1").rows()) == 2
    with pytest.raises(ResumeError):
        sl_export.run(cfg, rows, "inputs-2")


def test_sl_export_run_all_dropped(tmp_path):
    cfg = PipelineConfig(run_dir=str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="every row was dropped"):
        sl_export.run(cfg, [_sl_row("r1", "red_team", "dropped", "empty")], "in")


def test_restore_order_moves_lines_into_input_order(tmp_path):
    st = Stage(tmp_path, "s", "fp", {})
    rows = [{"record_id": f"r{i}", "text": "a\u2028b é"} for i in range(4)]
    st.append([rows[2], rows[0], {"record_id": "other"}, rows[3], rows[1]])
    st.restore_order([r["record_id"] for r in rows])
    assert [r["record_id"] for r in st.rows()] == ["r0", "r1", "r2", "r3", "other"]
    assert st.rows()[:4] == rows
    before = st.rows_path.stat().st_ino
    st.restore_order([r["record_id"] for r in rows])
    assert st.rows_path.stat().st_ino == before  # already in order: not rewritten
