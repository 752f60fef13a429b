"""Reliability harness: a run directory that fills up, or turns read-only, in the middle of a stage.

The stage is `sl_generate` (critique and revision) with a scripted model, on the quickstart's
prompts cut to `--prompts`, in chunks of 4, behind the `prompts` stage, run as `cai run --to
sl_generate` runs it (`cai.pipeline.run`). Everything the run writes under its run directory goes
through a simulated disk (`Disk`): Python's `open` and `os.fdopen`, and for a read-only folder
`os.open`, `os.replace`, `os.unlink`, `os.truncate` and `os.mkdir` too. After a seeded number of
bytes the disk is full (a write stores what fits, then fails with ENOSPC, as a real one does) or the
folder turns read-only (every write, rename, removal or truncation fails with EROFS).

Each trial runs the stage until the fault stops it, then checks:

- the error: one of the project's own (`cai run` prints it as `error: ...`, no traceback), naming
  the file and the cause;
- what is on disk: every line of the rows file is a whole row, byte for byte the row an
  uninterrupted run writes for that record, none twice, no torn tail, and (on a full disk) no
  temporary file left; a folder that turned read-only in the middle of a write keeps it;
- the resume: with the disk back to normal, the same run finishes, its rows file is byte for byte
  the uninterrupted run's (no record lost or duplicated), and no temporary file is left.

The run report is left out of these runs (a report that cannot be written is a warning, never a
failed run, and is tested as such). A real size-limited folder needs root to mount; this harness
needs none.

    python reliability/disk.py                      # 20 trials of each fault, about a minute
    python reliability/disk.py --trials 3 --prompts 8   # the quick variant tests/test_reliability.py runs
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import errno
import io
import json
import os
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from cai.config import load_config
from cai.lm.base import Completion
from cai.models import cpu_description
from cai.rundir import StageError

FAULTS = ("full", "read_only")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class ScriptedLM:
    """A model whose answer is a function of the conversation and the seed (tests/conftest.py's kind)."""

    name = "scripted"

    def generate(self, conversations, sampling, n=1, seeds=None):
        out = []
        for i, conv in enumerate(conversations):
            seed = seeds[i] if seeds is not None else i
            text = f"Reply {seed % 9973} to: {conv[-1]['content'][:60]} " + "and some more words " * (seed % 7)
            out.append([Completion(text, "stop", len(text.split()))] * n)
        return out

    def score_options(self, contexts, options):
        return [[-float(len(o)) for o in opts] for opts in options]


class Disk:
    """Writes under `root` counted against `budget` bytes; past it, the `fault` ("full" or
    "read_only") strikes. `budget` None only counts (`written`)."""

    def __init__(self, root: Path, fault: str = "full", budget: int | None = None):
        self.root = str(root.resolve())
        self.fault, self.budget = fault, budget
        self.written = 0
        self.struck = False

    def under(self, path: Any) -> bool:
        if isinstance(path, int):
            try:
                path = os.readlink(f"/proc/self/fd/{path}")
            except OSError:
                return False
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(self.root + os.sep)
        except TypeError:
            return False

    def error(self, path: Any) -> OSError:
        self.struck = True
        code = errno.ENOSPC if self.fault == "full" else errno.EROFS
        return OSError(code, os.strerror(code), os.fsdecode(path) if not isinstance(path, int) else None)

    def read_only(self) -> bool:
        return self.fault == "read_only" and self.budget is not None and self.written >= self.budget

    def room(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.written)

    @contextlib.contextmanager
    def mounted(self) -> Iterator[Disk]:
        real_open, real_os = io.open, {n: getattr(os, n) for n in ("open", "replace", "rename", "unlink",
                                                                    "remove", "truncate", "mkdir")}
        disk = self

        def fake_open(file, mode="r", *args, **kwargs):
            writing = any(c in mode for c in "wax+")
            if not writing or not disk.under(file):
                return real_open(file, mode, *args, **kwargs)
            if disk.read_only():
                raise disk.error(file)
            return _File(real_open(file, mode, *args, **kwargs), disk, file)

        def guard(name):
            real = real_os[name]

            def call(path, *args, **kwargs):
                if disk.read_only() and disk.under(path):
                    if name == "open" and not (args and args[0] & _WRITE_FLAGS):
                        return real(path, *args, **kwargs)
                    if name == "mkdir" and os.path.exists(path):
                        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
                    raise disk.error(path)
                return real(path, *args, **kwargs)
            return call

        patches = [mock.patch.object(io, "open", fake_open), mock.patch.object(builtins, "open", fake_open)]
        patches += [mock.patch.object(os, name, guard(name)) for name in real_os]
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            yield self


class _File:
    """A file opened for writing under the disk's root: writes count, and fail past the budget."""

    def __init__(self, f: Any, disk: Disk, path: Any):
        self._f, self._disk, self._path = f, disk, path

    def write(self, data: Any) -> int:
        disk = self._disk
        if disk.read_only():
            raise disk.error(self._path)
        blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        room = disk.room()
        if room is not None and len(blob) > room and disk.fault == "full":
            part = blob[:room]  # what fits is stored, then the write fails
            if part:
                self._f.write(part.decode("utf-8", "ignore") if isinstance(data, str) else part)
                self._f.flush()
            disk.written += len(part)
            raise disk.error(self._path)
        disk.written += len(blob)
        return self._f.write(data)

    def truncate(self, size: int | None = None) -> int:
        if self._disk.read_only():
            raise self._disk.error(self._path)
        return self._f.truncate(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def _config(run_dir: Path, prompts: int) -> Any:
    return load_config(None, [f"run_dir={run_dir}", f"prompts.red_team.0.limit={prompts}", "sl.helpful_fraction=0.25",
                              "sl.rounds=1", "sl.few_shot=1", "sl.chunk_size=4"])


def _run(run_dir: Path, prompts: int) -> None:
    from cai import pipeline

    with mock.patch.object(pipeline, "write_report", lambda run_dir: None):
        pipeline.run(_config(run_dir, prompts), stop="sl_generate", lm_factory=ScriptedLM)


def _project_error(e: BaseException) -> bool:
    """Whether `cai run` prints `e` as `error: ...` rather than a traceback (cai/cli.py `main`)."""
    from cai.cli import ConfigError, ConstitutionError
    from cai.lm.base import BackendError
    from cai.pipeline import PipelineError

    return isinstance(e, (StageError, ConfigError, ConstitutionError, PipelineError, BackendError, ValueError,
                          OSError))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n") if path.exists() else []


def trial(fault: str, budget: int, run_dir: Path, prompts: int, want: dict[str, bytes]) -> dict[str, Any]:
    """One run stopped by `fault` after `budget` bytes, checked, then resumed and checked."""
    rows_path = run_dir / "sl_generate" / "rows.jsonl"
    out: dict[str, Any] = {"fault": fault, "budget": budget}
    disk = Disk(run_dir, fault, budget)
    try:
        with disk.mounted():
            _run(run_dir, prompts)
        out["error"] = None
    except Exception as e:  # noqa: BLE001 - judged below
        out["error"] = f"{type(e).__name__}: {e}"
        out["clear"] = _project_error(e) and (os.strerror(errno.ENOSPC if fault == "full" else errno.EROFS) in str(e))
        out["names_file"] = str(run_dir) in str(e)
    out["struck"] = disk.struck
    lines = _lines(rows_path)
    out["torn_tail"] = bool(lines and lines[-1])
    whole = [ln for ln in lines if ln]
    ids = [json.loads(ln)["record_id"] for ln in whole if ln.startswith(b"{") and ln.endswith(b"}")]
    out["rows_kept"] = len(whole)
    out["rows_wrong"] = sum(1 for ln, rid in zip(whole, ids) if want.get(rid) != ln) + (len(whole) - len(ids))
    out["duplicated"] = len(ids) - len(set(ids))
    out["temp_files"] = sorted(p.name for p in run_dir.rglob(".*") if p.is_file())
    # the disk is back: the same run again
    try:
        _run(run_dir, prompts)
        out["resumed"] = True
    except Exception as e:  # noqa: BLE001
        out["resumed"] = False
        out["resume_error"] = f"{type(e).__name__}: {e}"
    out["temp_files_after"] = sorted(p.name for p in run_dir.rglob(".*") if p.is_file())
    final = [ln for ln in _lines(rows_path) if ln]
    final_ids = [json.loads(ln)["record_id"] for ln in final]
    out["lost"] = len(set(want) - set(final_ids))
    out["duplicated_after"] = len(final_ids) - len(set(final_ids))
    out["identical"] = rows_path.exists() and rows_path.read_bytes() == b"".join(want[r] + b"\n" for r in want)
    manifest = json.loads((run_dir / "sl_generate" / "manifest.json").read_text()) if out["resumed"] else {}
    out["complete"] = manifest.get("status") == "complete"
    out["journal_left"] = (run_dir / "sl_generate" / "calls.jsonl").exists()
    return out


def ok(t: dict[str, Any]) -> bool:
    """Whether a trial met every expectation."""
    stopped_well = t["error"] is None and not t["struck"] or bool(t["error"] and t["clear"] and t["names_file"])
    # A folder that turns read-only mid-write keeps the temporary file it could not remove; the
    # resumed run's next write of that file removes it.
    return (stopped_well and not t["torn_tail"] and t["rows_wrong"] == 0 and t["duplicated"] == 0
            and not (t["temp_files"] and t["fault"] == "full") and not t["temp_files_after"] and t["resumed"] and t["lost"] == 0 and t["duplicated_after"] == 0
            and t["identical"] and t["complete"] and not t["journal_left"])


def run(trials: int = 20, prompts: int = 24, seed: int = 0, faults: tuple[str, ...] = FAULTS,
        workdir: str | Path | None = None) -> dict[str, Any]:
    """A clean run for reference, then `trials` seeded trials of each fault."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory(prefix="cai-disk-", dir=workdir) as tmp:
        root = Path(tmp)
        ref = root / "reference"
        counter = Disk(ref)
        with counter.mounted():
            _run(ref, prompts)
        want = {json.loads(ln)["record_id"]: ln for ln in _lines(ref / "sl_generate" / "rows.jsonl") if ln}
        rng = random.Random(f"{seed}:disk")
        results = []
        for fault in faults:
            for k in range(trials):
                budget = rng.randrange(counter.written)
                results.append(trial(fault, budget, root / f"{fault}-{k}", prompts, want))
    return {"prompts": prompts, "records": len(want), "bytes": counter.written, "seed": seed, "trials": results}


def summary(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for fault in FAULTS:
        ts = [t for t in res["trials"] if t["fault"] == fault]
        if not ts:
            continue
        out[fault] = {
            "trials": len(ts), "stopped": sum(t["struck"] for t in ts),
            "clear_errors": sum(bool(t["error"]) and t["clear"] and t["names_file"] for t in ts),
            "other_errors": sum(bool(t["error"]) and not (t["clear"] and t["names_file"]) for t in ts),
            "rows_kept": sum(t["rows_kept"] for t in ts), "rows_wrong": sum(t["rows_wrong"] for t in ts),
            "torn_tails": sum(t["torn_tail"] for t in ts), "temp_files": sum(len(t["temp_files"]) for t in ts),
            "temp_after": sum(len(t["temp_files_after"]) for t in ts),
            "resumed": sum(t["resumed"] and t["complete"] for t in ts), "lost": sum(t["lost"] for t in ts),
            "duplicated": sum(t["duplicated"] + t["duplicated_after"] for t in ts),
            "identical": sum(t["identical"] for t in ts), "all_ok": sum(ok(t) for t in ts)}
    return out


def render(res: dict[str, Any]) -> str:
    s = summary(res)
    cols = ["trials", "stopped", "clear_errors", "other_errors", "rows_kept", "rows_wrong", "torn_tails",
            "temp_files", "resumed", "temp_after", "lost", "duplicated", "identical", "all_ok"]
    lines = [f"sl_generate on {res['prompts']} red-team prompts ({res['records']} records, {res['bytes']:,} bytes "
             f"written by a clean run); the fault strikes after a seeded number of bytes",
             f"{'fault':<11}" + "".join(f"{c:>14}" for c in cols)]
    for fault, c in s.items():
        lines.append(f"{fault:<11}" + "".join(f"{c[k]:>14}" for k in cols))
    errors = Counter(t["error"].split(":")[0] for t in res["trials"] if t["error"])
    lines.append("\nerror types: " + ", ".join(f"{k} {v}" for k, v in errors.most_common()))
    for fault in FAULTS:
        example = next((t for t in res["trials"] if t["fault"] == fault and t["error"]), None)
        if example:
            lines.append(f"example ({fault}): {example['error'][:400]}")
    bad = [t for t in res["trials"] if not ok(t)]
    for t in bad[:5]:
        lines.append(f"FAILED: {json.dumps(t)[:600]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="trials of each fault (default 20)")
    ap.add_argument("--prompts", type=int, default=24, help="red-team prompts (default 24)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="also write every trial here")
    args = ap.parse_args(argv)
    print(f"CPU: {cpu_description()}; Python {sys.version.split()[0]}; seed {args.seed}")
    res = run(args.trials, args.prompts, args.seed)
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if all(ok(t) for t in res["trials"]) else 1


if __name__ == "__main__":
    sys.exit(main())
