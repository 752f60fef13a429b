"""A journal of finished model calls, so a killed chunk resumes at its last finished step.

The data stages write rows a chunk at a time, and one chunk of SL-CAI prompts is many model calls:
an answer, then a critique and a revision per round, advancing in lockstep. Without a journal a
kill threw all of a chunk's calls away. A record's program is deterministic given the answers it
is sent (its seeds are per record and call), so replaying the answers it got before brings it back
to where it stopped. The journal keeps each finished call's completion under a key of its request
(the conversation, the sampling settings and the seed), and a resumed chunk's programs are sent
those completions without a model call. The calls of one lockstep step are written as one line, so
a resumed chunk's next step batches the same requests together as an uninterrupted run would, and
its rows are the same. A kill loses at most the step in flight: one answer, critique or revision
per prompt of one chunk. Back-ends that interleave programs themselves (`RunsPrograms`) write each
completion on its own line as it arrives.

The file sits in the stage folder (`calls.jsonl`), starts with the stage's fingerprint (a journal of
other settings is ignored and replaced), is flushed after each line (a killed process loses nothing
written; a torn last line is dropped), and is deleted when the stage is complete. Runs on Ray do not
keep one (workers need not share the run directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cai.lm.base import Completion, Program, Request
from cai.rundir import write_failed

FILE = "calls.jsonl"


def request_key(request: Request) -> str:
    """A stable key of a (conversation, sampling, seed) request."""
    conversation, sampling, seed = request
    blob = json.dumps([list(conversation), repr(sampling), seed], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


class Journal:
    """The finished calls of a stage's chunks (see the module docstring). Picklable; it reads its
    file once per process, when first asked."""

    def __init__(self, path: str | Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._done: dict[str, Completion] | None = None
        self._pending: list[list[Any]] = []
        self.batched = False  # True while a lockstep loop commits each step itself

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["fingerprint"])  # type: ignore[misc]

    def _load(self) -> dict[str, Completion]:
        if self._done is not None:
            return self._done
        self._done = {}
        lines = self.path.read_bytes().split(b"\n") if self.path.exists() else []
        header = None
        with contextlib.suppress(ValueError):
            header = json.loads(lines[0]) if lines else None
        if not isinstance(header, dict) or header.get("fingerprint") != self.fingerprint:
            self._start()  # absent, or written under other settings
            return self._done
        if lines[-1]:  # a torn last line, cut by a kill in the middle of a write
            lines = lines[:-1]
            with open(self.path, "r+b") as f:
                f.truncate(sum(len(line) + 1 for line in lines))
        try:
            for line in lines[1:]:
                if line.strip():
                    for key, text, finish, num in json.loads(line):
                        self._done[key] = Completion(text, finish, num)
        except (ValueError, TypeError):  # damaged by hand or by a disk: start again, the rows stand
            warnings.warn(f"{self.path}: not a journal this version can read; its calls will be made again",
                          stacklevel=2)
            self._done = {}
            self._start()
        return self._done

    def _start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
        except OSError as e:
            self._failed(e)

    def get(self, request: Request) -> Completion | None:
        return self._load().get(request_key(request))

    def add(self, request: Request, completion: Completion) -> None:
        """Keep a finished call; written at once, or with its step at `commit` while `batched`."""
        self._load()
        self._pending.append([request_key(request), completion.text, completion.finish_reason, completion.num_tokens])
        if not self.batched:
            self.commit()

    def commit(self) -> None:
        """Write the calls kept since the last commit as one line."""
        if not self._pending:
            return
        line = json.dumps(self._pending, ensure_ascii=False) + "\n"
        done = self._load()
        for key, text, finish, num in self._pending:  # replayed from now on, in this process too
            done[key] = Completion(text, finish, num)
        self._pending = []
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        """Raise `RunDirError` for a failed journal write (a torn line it left is cut on the next load)."""
        raise write_failed(self.path, e, "the stage's rows and the calls journalled before are intact") from None

    def discard(self) -> None:
        """Forget the calls kept since the last commit."""
        self._pending = []

    def replaying(self, program: Program, on_replay: Callable[[Completion], None] | None = None) -> Program:
        """`program`, sent the journal's completion for each request it has one for (the request
        is then not yielded), and journalling the completions of the requests it yields."""
        try:
            request = next(program)
        except StopIteration as stop:
            return stop.value
        while True:
            completion = self.get(request)
            if completion is not None:
                if on_replay is not None:
                    on_replay(completion)
            else:
                completion = yield request
                self.add(request, completion)
            try:
                request = program.send(completion)
            except StopIteration as stop:
                return stop.value

    def remove(self) -> None:
        """Delete the file (the stage is complete; its rows hold everything)."""
        self.path.unlink(missing_ok=True)


def journaled(programs: Sequence[Program], journal: Journal | None,
              on_replay: Callable[[Completion], None] | None = None) -> list[Program]:
    return list(programs) if journal is None else [journal.replaying(p, on_replay) for p in programs]
