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

    cai show runs/quickstart
"""

from __future__ import annotations

import contextlib
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


def atomic_write(path: Path, text: str) -> None:
    """Write a file so readers see the old or the new content, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            with open(self.rows_path, "r+b") as f:
                f.truncate(cut)

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
        """Append rows with one write and an fsync (a chunk lands whole or, at worst, torn at the end)."""
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not blob:
            return
        with open(self.rows_path, "a", encoding="utf-8") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

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
