"""The data stages' chunk loop on its own: resume after a kill between chunks with nothing lost or
written twice, chunk boundaries, input order restored, running / complete / failed manifests."""

from __future__ import annotations

import functools
import json

import pytest

from cai.config import RayConfig
from cai.rundir import Stage, StageError
from cai.stages.chunked import run_chunks

RECORDS = [{"record_id": f"r{i}", "x": i} for i in range(7)]


class Killed(Exception):
    pass


class NamedLM:
    name = "named"


def square(lm, rows, on_call, *, seen=None):
    """The work: one row per record; `seen` gets the record ids of every chunk it is given."""
    if seen is not None:
        seen.append([r["record_id"] for r in rows])
    if on_call is not None:
        on_call()
    return [{"record_id": r["record_id"], "y": r["x"] ** 2, "model": lm.name} for r in rows]


def count(rows):
    return {"rows": len(rows), "sum": sum(r["y"] for r in rows)}


def _run(tmp_path, records=RECORDS, seen=None, **kw):
    stage = Stage(tmp_path / "run", "s", "fp", {"k": 1})
    kw.setdefault("chunk_size", 2)
    return stage, run_chunks(stage, records, functools.partial(square, seen=seen), NamedLM, RayConfig(),
                             count=count, unit="record", **kw)


def _manifest(tmp_path):
    return json.loads((tmp_path / "run" / "s" / "manifest.json").read_text())


def test_a_run_killed_between_chunks_resumes_with_nothing_lost_or_duplicated(tmp_path):
    _, whole = _run(tmp_path / "whole")
    assert [r["record_id"] for r in whole] == [r["record_id"] for r in RECORDS]

    def die(i):
        if i == 1:
            raise Killed

    with pytest.raises(Killed):
        _run(tmp_path, on_chunk=die, manifest={"extra": "x"})
    m = _manifest(tmp_path)
    assert m["status"] == "running" and m["extra"] == "x" and m["counts"] == {"rows": 0, "sum": 0}
    assert len(Stage.view(tmp_path / "run", "s").rows()) == 4  # two whole chunks

    seen: list[list[str]] = []
    stage, rows = _run(tmp_path, seen=seen, manifest={"extra": "x"})
    assert seen == [["r4", "r5"], ["r6"]]  # only what was left
    assert rows == whole == stage.rows()
    m = _manifest(tmp_path)
    assert m["status"] == "complete" and m["extra"] == "x" and m["counts"] == count(whole)
    assert m["fingerprint"] == "fp" and m["settings"] == {"k": 1}


def test_a_finished_stage_runs_nothing_again(tmp_path):
    _run(tmp_path)
    before = (tmp_path / "run" / "s" / "rows.jsonl").read_bytes()

    def no_model():
        raise AssertionError("a model was built with nothing left to do")

    stage = Stage(tmp_path / "run", "s", "fp", {"k": 1})
    rows = run_chunks(stage, RECORDS, square, no_model, RayConfig(), chunk_size=2, count=count, unit="record")
    assert len(rows) == len(RECORDS) and stage.rows_path.read_bytes() == before
    assert _manifest(tmp_path)["status"] == "complete"


@pytest.mark.parametrize("stable, chunks", [
    (True, [["r0"], ["r2", "r3"], ["r4"], ["r6"]]),  # the chunks of an uninterrupted run, less what is done
    (False, [["r0", "r2"], ["r3", "r4"], ["r6"]]),  # what is left, cut afresh
])
def test_stable_chunks_keep_their_boundaries_on_resume(tmp_path, stable, chunks):
    stage = Stage(tmp_path / "run", "s", "fp", {"k": 1})
    stage.append(square(NamedLM, [RECORDS[5], RECORDS[1]], None))  # done earlier, out of order
    seen: list[list[str]] = []
    _, rows = _run(tmp_path, seen=seen, stable_chunks=stable)
    assert seen == chunks
    assert [r["record_id"] for r in rows] == [r["record_id"] for r in RECORDS]  # input order restored
    assert rows == square(NamedLM, RECORDS, None)


def test_the_manifest_says_running_while_chunks_are_worked_on(tmp_path):
    states = []

    def look(lm, rows, on_call):
        states.append((_manifest(tmp_path)["status"], on_call is not None))
        return square(lm, rows, on_call)

    stage = Stage(tmp_path / "run", "s", "fp", {})
    calls = []
    run_chunks(stage, RECORDS[:3], look, NamedLM, RayConfig(), chunk_size=2, count=count, unit="record",
               calls=lambda chunk: calls.append(len(chunk)) or len(chunk))
    assert states == [("running", True), ("running", True)] and calls == [2, 1]
    assert _manifest(tmp_path)["status"] == "complete"


def test_rows_the_stage_refuses_fail_it_and_are_kept(tmp_path):
    def refuse(rows):
        return None if any(r["y"] > 100 for r in rows) else f"no square above 100 in {len(rows)} rows"

    with pytest.raises(StageError, match="no square above 100 in 7 rows"):
        _run(tmp_path, refuse=refuse, manifest={"extra": 1})
    m = _manifest(tmp_path)
    assert m["status"] == "failed" and m["counts"] == count(square(NamedLM, RECORDS, None)) and m["extra"] == 1
    assert len(Stage.view(tmp_path / "run", "s").rows()) == 7
    _, rows = _run(tmp_path, refuse=lambda rows: None)
    assert len(rows) == 7 and _manifest(tmp_path)["status"] == "complete"
