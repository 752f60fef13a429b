"""Run directories: per-stage rows, manifests, atomic writes and resume by record id.

    runs/<name>/
      config.yaml                 the resolved pipeline config
      constitution.yaml           the constitution as used (its hash is in every row)
      <stage>/rows.jsonl          one JSON row per line, appended a chunk at a time
      <stage>/manifest.json       counts, failures by reason, fingerprint, constitution hash, versions,
                                  when the stage was opened and its wall time (`started`, `wall_s`)

A chunk of rows is appended with one write and an fsync, so a killed run leaves whole chunks; a
torn last line (a kill inside the write) is cut off on reopen and its records are redone. A stage
whose fingerprint (its config, inputs and constitution) changed refuses to resume unless told to.
A write that fails (a full disk, a folder made read-only, no permission) is a `RunDirError`
naming the file and what is intact: a chunk that could not be appended whole is cut back off the
rows file, and a half-written replacement file is removed, so the same command resumes cleanly
once the cause is fixed.

    cai show runs/quickstart
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


class ResumeError(RuntimeError):
    """A stage's saved state does not match the current config; the message says what differs."""


class StageError(RuntimeError):
    """A stage cannot go on (for example, nothing is left to train on); the message says why."""


class RunDirError(StageError):
    """A file of the run directory could not be written (no space left, a read-only folder, no
    permission); the message names the file, the cause, and what is intact."""


# Causes that go away when the user frees space or fixes the folder: the same command then resumes.
_FIXABLE = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (the disk quota is full)",
            errno.EROFS: "make the folder writable", errno.EACCES: "make the folder writable",
            errno.EPERM: "make the folder writable"}


def write_failed(path: Path, e: OSError, intact: str) -> RunDirError:
    """The error for a failed write of `path`: what happened, what is `intact`, and what to do."""
    cause = e.strerror or str(e)
    todo = _FIXABLE.get(e.errno or 0, "fix the cause")
    return RunDirError(f"{path}: cannot write: {cause} ({errno.errorcode.get(e.errno or 0, 'error')}); "
                       f"{intact}; {todo} and run the same command again to resume")


# Temporary files of `atomic_write` are named `.{name}.tmp-{pid}@{host}-{random}`, so a later write
# can tell one left by a process that died (or a write that failed) from one still being written.
_TMP = ".tmp-"
_WRITING: set[str] = set()  # this process's temporary files being written now


def _stale(tmp: Path) -> bool:
    """Whether a temporary file of `atomic_write` belongs to no write in progress on this host."""
    owner = tmp.name.rsplit(_TMP, 1)[-1].rsplit("-", 1)[0]
    pid_s, _, host = owner.partition("@")
    if host != platform.node() or not pid_s.isdigit():
        return False  # another machine's (on a shared file system): not ours to judge
    pid = int(pid_s)
    if pid == os.getpid():
        return str(tmp) not in _WRITING
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _remove_stale(path: Path) -> None:
    """Remove the temporary files of earlier writes of `path` that no process is writing any more
    (left by a kill, or by a write that failed where nothing could be removed)."""
    with contextlib.suppress(OSError):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}{_TMP}*"):
            if _stale(tmp):
                with contextlib.suppress(OSError):
                    tmp.unlink()


def atomic_write(path: Path, text: str) -> None:
    """Write a file so readers see the old or the new content, never a half-written one. A failed
    write leaves the old content and, where it can be removed, no temporary file (one that cannot
    be is removed by the next write of the same file), and raises `RunDirError`."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP}{os.getpid()}@{platform.node()}-")
        _WRITING.add(tmp)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise write_failed(path, e, "its previous content, if any, is unchanged") from None
    finally:
        if tmp is not None:
            _WRITING.discard(tmp)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file; a torn final line (no newline) is skipped, any other bad line is an error."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                return  # torn by a kill mid-write; the stage redoes these records
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("constitutional-ai", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


class Stage:
    """One stage's folder in a run: its rows, manifest and resume state."""

    def __init__(self, run_dir: str | Path, name: str, fingerprint: str, settings: dict[str, Any],
                 allow_changed: bool = False):
        self._locate(run_dir, name)
        self.fingerprint = fingerprint
        self.settings = settings
        self.opened: float | None = time.time()  # the manifest's `started` and `wall_s` count from here
        old = self.manifest()
        if old and old.get("fingerprint") != fingerprint and not allow_changed:
            changes = _diff_keys(old.get("settings", {}), settings) or ["its inputs changed"]
            raise ResumeError(
                f"stage '{name}' in {self.dir.parent} was run with a different config:\n  "
                + "\n  ".join(changes)
                + "\nRe-run with --allow-config-change to keep its rows and go on, or use a new run_dir."
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self._repair_tail()

    def _locate(self, run_dir: str | Path, name: str) -> None:
        self.dir = Path(run_dir) / name
        self.name = name
        self.rows_path = self.dir / "rows.jsonl"
        self.manifest_path = self.dir / "manifest.json"

    @classmethod
    def view(cls, run_dir: str | Path, name: str) -> Stage:
        """A read-only look at a stage's folder (no fingerprint check, nothing written)."""
        st = cls.__new__(cls)
        st._locate(run_dir, name)
        st.fingerprint = None  # a view accepts whatever fingerprint the folder has
        st.settings = {}
        st.opened = None
        return st

    def content_hash(self) -> str:
        """Hash of the rows file, so downstream stages notice when their input changed."""
        h = hashlib.sha256()
        if self.rows_path.exists():
            with open(self.rows_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()[:16]

    def _repair_tail(self) -> None:
        """Cut a torn last line left by a kill in the middle of a write."""
        if not self.rows_path.exists():
            return
        data = self.rows_path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            try:
                with open(self.rows_path, "r+b") as f:
                    f.truncate(cut)
            except OSError as e:
                raise write_failed(self.rows_path, e, "no row has been written since; nothing is lost") from None

    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())

    def rows(self) -> list[dict[str, Any]]:
        return list(read_jsonl(self.rows_path)) if self.rows_path.exists() else []

    def done_ids(self) -> set[str]:
        """The record ids whose rows are written (a resumed stage skips them)."""
        return {r["record_id"] for r in self.rows()}

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append rows with one write and an fsync (a chunk lands whole or, at worst, torn at the end).

        A write that fails is cut back off the file, so the file holds the rows it held before, and
        raises `RunDirError`; where the cut fails too (a folder made read-only), the torn tail is cut
        when the stage is next opened."""
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
        if not lines:
            return
        size = self.rows_path.stat().st_size if self.rows_path.exists() else 0
        try:
            with open(self.rows_path, "a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            cut = False
            with contextlib.suppress(OSError):
                with open(self.rows_path, "r+b") as f:
                    f.truncate(size)
                cut = True
            kept = sum(1 for _ in read_jsonl(self.rows_path)) if self.rows_path.exists() else 0
            intact = (f"the {kept} rows written before are intact" if kept else "no row was written before") + (
                "" if cut else " (a torn tail after them is cut when the stage is next opened)")
            raise write_failed(self.rows_path, e, f"{intact}; the {len(lines)} rows of this chunk were not kept") \
                from None

    def restore_order(self, record_ids: Sequence[str]) -> None:
        """Rewrite the rows file in `record_ids` order (rows of other ids last, as they are) when
        chunks landed out of order, as they do on Ray. The file, and with it the content hash that
        downstream stages are fingerprinted with and the order they train in, is then the same as a
        single-process run's. Lines are moved, never re-serialised; the rewrite is atomic."""
        if not self.rows_path.exists():
            return
        lines = [line for line in self.rows_path.read_bytes().split(b"\n") if line.strip()]
        pos = {rid: k for k, rid in enumerate(record_ids)}
        ordered = sorted(lines, key=lambda line: pos.get(json.loads(line)["record_id"], len(pos)))
        if ordered != lines:
            atomic_write(self.rows_path, b"".join(line + b"\n" for line in ordered).decode("utf-8"))

    def write_manifest(self, status: str, counts: dict[str, Any], **extra: Any) -> None:
        """The manifest: status, fingerprint, settings, counts, `extra`, versions, and the time the
        stage was opened in this process with the seconds since (`started`, `wall_s`; a resumed
        stage counts its last invocation only)."""
        timing = {} if self.opened is None else {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.opened)),
            "wall_s": round(time.time() - self.opened, 1)}
        write_json(self.manifest_path, {
            "stage": self.name,
            "status": status,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "counts": counts,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **timing,
            "versions": versions(),
            **extra,
        })

    def complete(self) -> bool:
        """Finished, and (unless this is a view) finished under this stage's fingerprint."""
        m = self.manifest()
        return bool(m and m.get("status") == "complete"
                    and (self.fingerprint is None or m.get("fingerprint") == self.fingerprint))
