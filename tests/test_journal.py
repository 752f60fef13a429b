"""The journal of finished model calls: a kill inside a chunk loses at most the step in flight."""

from __future__ import annotations

import contextlib
import json

import pytest

from cai import pipeline
from cai.config import Sampling, load_config
from cai.journal import FILE, Journal
from cai.lm.base import Completion, run_programs
from cai.stages.chunked import _CallProgress


class Killed(Exception):
    pass


def _cfg(tmp_path, name, *extra):
    # one chunk of 4 red-team prompts and 2 helpful ones, 3 rounds: 7 lockstep steps
    return load_config(None, [f"run_dir={tmp_path / name}", "prompts.red_team=[{path: 'builtin:red_team', limit: 4}]",
                              "sl.rounds=3", "sl.few_shot=1", "sl.chunk_size=48", "sl.helpful_fraction=0.34", *extra])


def _dying(base, after_calls):
    """A model that is killed when asked for its `after_calls`+1-th batch."""

    class Dying(base):
        def generate(self, conversations, sampling, n=1, seeds=None):
            if len(self.calls) == after_calls:
                raise Killed
            return super().generate(conversations, sampling, n, seeds)

    return Dying


def test_a_kill_inside_a_chunk_resumes_at_the_step_it_was_in(tmp_path, scripted):
    whole = _cfg(tmp_path, "whole")
    full = scripted()
    pipeline.run(whole, stop="sl_generate", lm_factory=lambda: full)
    expected = (tmp_path / "whole" / "sl_generate" / "rows.jsonl").read_bytes()
    assert len(full.calls) == 7 and not (tmp_path / "whole" / "sl_generate" / FILE).exists()

    broken = _cfg(tmp_path, "broken")
    dying = _dying(scripted, 4)()
    with pytest.raises(Killed):
        pipeline.run(broken, stop="sl_generate", lm_factory=lambda: dying)
    folder = tmp_path / "broken" / "sl_generate"
    assert not (folder / "rows.jsonl").exists() or not (folder / "rows.jsonl").read_text()
    steps = (folder / FILE).read_text().splitlines()[1:]
    assert [len(json.loads(s)) for s in steps] == [len(full.calls[k][0]) for k in range(4)]

    resumed = scripted()
    pipeline.run(broken, stop="sl_generate", lm_factory=lambda: resumed)
    # only the three steps the kill cut off are asked again, each with the whole chunk's requests
    assert [c[0] for c in resumed.calls] == [c[0] for c in full.calls[4:]]
    assert (folder / "rows.jsonl").read_bytes() == expected
    assert not (folder / FILE).exists()


def test_a_kill_inside_a_chunk_of_the_real_model_resumes_to_the_same_rows(tmp_path, lm):
    tiny = ("sl.rounds=2", "sl.response.max_new_tokens=10", "sl.critique.max_new_tokens=8",
            "sl.revision.max_new_tokens=10", "sl.helpful_fraction=0")
    pipeline.run(_cfg(tmp_path, "whole", *tiny), stop="sl_generate", lm_factory=lambda: lm)
    expected = (tmp_path / "whole" / "sl_generate" / "rows.jsonl").read_bytes()

    calls = []

    class Dying:
        name = lm.name

        def generate(self, conversations, sampling, n=1, seeds=None):
            if len(calls) == 3:
                raise Killed
            calls.append(len(conversations))
            return lm.generate(conversations, sampling, n, seeds)

        def score_options(self, contexts, options):
            return lm.score_options(contexts, options)

    broken = _cfg(tmp_path, "broken", *tiny)
    with pytest.raises(Killed):
        pipeline.run(broken, stop="sl_generate", lm_factory=Dying)
    pipeline.run(broken, stop="sl_generate", lm_factory=lambda: lm)
    assert (tmp_path / "broken" / "sl_generate" / "rows.jsonl").read_bytes() == expected


def _program(prompt, steps=3):
    text = prompt
    for k in range(steps):
        c = yield [{"role": "user", "content": text}], Sampling(max_new_tokens=5), k
        text = c.text


def test_a_torn_last_line_is_dropped_and_another_fingerprint_is_ignored(tmp_path, scripted):
    path = tmp_path / FILE
    journal = Journal(path, "fp1")
    first = scripted()
    run_programs(first, [_program("a"), _program("b")], journal=journal)
    assert len(first.calls) == 3 and len(path.read_text().splitlines()) == 4
    with open(path, "a") as f:
        f.write('[["abc", "cut')  # a kill in the middle of a write

    again = scripted()
    replayed = []
    run_programs(again, [_program("a"), _program("b"), _program("c")], lambda *a, **kw: replayed.append(kw),
                 journal=Journal(path, "fp1"))
    # a and b are answered from the journal (6 calls); only c reaches the model
    assert len(again.calls) == 3 and all(len(c[0]) == 1 for c in again.calls)
    assert sum(1 for r in replayed if r.get("replayed")) == 6
    assert path.read_text().endswith("\n")

    other = scripted()
    run_programs(other, [_program("a")], journal=Journal(path, "fp2"))
    assert len(other.calls) == 3
    assert json.loads(path.read_text().splitlines()[0]) == {"fingerprint": "fp2"}


def test_a_step_cut_short_by_an_error_is_not_kept(tmp_path, scripted):
    path = tmp_path / FILE

    def prog():
        c = yield [{"role": "user", "content": "x"}], Sampling(max_new_tokens=5), 0
        raise ValueError(c.text)

    journal = Journal(path, "fp")
    with pytest.raises(ValueError):
        run_programs(scripted(), [_program("a"), prog()], journal=journal)
    assert path.read_text().splitlines()[1:] == []
    again = scripted()  # the same journal object, in the same process: nothing of that step is replayed
    run_programs(again, [_program("a")], journal=journal)
    assert len(again.calls) == 3


def test_progress_shows_calls_tokens_per_second_and_time_left():
    class Bar:
        text = ""

        def set_postfix_str(self, s):
            self.text = s

    bar = Bar()
    tick = _CallProgress(bar, [4, 4])
    tick(0, 0, replayed=True)
    assert "left" not in bar.text  # nothing measured yet
    for _ in range(3):
        tick(0, 20)
    assert bar.text.startswith("chunk 1/2: 4/4 calls") and "tok/s" in bar.text and "left" in bar.text


def test_completions_round_trip_through_the_file(tmp_path):
    j = Journal(tmp_path / FILE, "fp")
    req = ([{"role": "user", "content": "é"}], Sampling(), 7)
    j.add(req, Completion("réponse", "length", 3))
    assert Journal(tmp_path / FILE, "fp").get(req) == Completion("réponse", "length", 3)
    assert Journal(tmp_path / FILE, "fp").get((req[0], Sampling(), 8)) is None


def test_a_damaged_journal_is_started_again_with_a_warning(tmp_path, scripted):
    path = tmp_path / FILE
    path.write_text(json.dumps({"fingerprint": "fp"}) + "\n" + '{"not": "a step"}\n')
    lm = scripted()
    with pytest.warns(UserWarning, match="calls will be made again"):
        run_programs(lm, [_program("a")], journal=Journal(path, "fp"))
    assert len(lm.calls) == 3 and len(path.read_text().splitlines()) == 4


def test_a_back_end_that_interleaves_programs_journals_each_call_as_it_comes(tmp_path, scripted):
    class Interleaving:
        """Advances one program at a time, one request at a time, as a concurrent HTTP back-end may."""

        name = "interleaving"

        def __init__(self):
            self.inner = scripted()

        def generate(self, conversations, sampling, n=1, seeds=None):
            return self.inner.generate(conversations, sampling, n, seeds)

        def score_options(self, contexts, options):
            return self.inner.score_options(contexts, options)

        def run_programs(self, programs, on_done=None):
            for p in programs:
                try:
                    req = next(p)
                    while True:
                        c = self.generate([req[0]], req[1], seeds=[req[2]])[0][0]
                        if on_done is not None:
                            on_done(c.num_tokens)
                        req = p.send(c)
                except StopIteration:
                    pass

    path = tmp_path / FILE
    first = Interleaving()
    with pytest.raises(Killed):
        def dying():
            yield from _program("b", 2)
            raise Killed

        run_programs(first, [_program("a"), dying()], journal=Journal(path, "fp"))
    assert [len(json.loads(s)) for s in path.read_text().splitlines()[1:]] == [1] * 5
    again = Interleaving()
    run_programs(again, [_program("a"), _program("b")], journal=Journal(path, "fp"))
    assert len(again.inner.calls) == 1  # only b's third call was never made


def test_the_bar_counts_each_record_as_it_ends_before_its_chunk_is_written(tmp_path, scripted, monkeypatch):
    import cai.stages.chunked as chunked

    rows = tmp_path / "run" / "sl_generate" / "rows.jsonl"
    seen = []

    class Bar(chunked.tqdm):
        def update(self, n=1):
            out = super().update(n)
            if self.desc == "sl_generate":
                seen.append((self.n, len(rows.read_text().splitlines()) if rows.exists() else 0))
            return out

    class OneAtATime(scripted):
        """A back-end that interleaves programs itself (as a server back-end does): here it runs
        each program to its end before the next."""

        def run_programs(self, programs, on_done=None):
            for program in programs:
                with contextlib.suppress(StopIteration):
                    request = next(program)
                    while True:
                        conversation, sampling, seed = request
                        completion = self.generate([conversation], sampling, seeds=[seed])[0][0]
                        if on_done is not None:
                            on_done(completion.num_tokens)
                        request = program.send(completion)

    monkeypatch.setattr(chunked, "tqdm", Bar)
    lm = OneAtATime()
    pipeline.run(_cfg(tmp_path, "run"), stop="sl_generate", lm_factory=lambda: lm)
    total = len(rows.read_text().splitlines())
    assert total == 7 and len(lm.calls) == 4 * 7 + 3  # 4 red-team prompts of 7 calls, 3 helpful ones of 1
    # one chunk: each record counted as its program ended, all before the chunk's rows were written;
    # the write then counts none twice
    assert seen == [(k, 0) for k in range(1, total + 1)] + [(total, total)]
