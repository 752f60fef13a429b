"""`cai redteam generate`: new red-team prompts written by a model, few-shot prompted from seed
prompts per harm category (Perez et al. 2022; the CAI paper made 140,335 of its 182,831 red-team
prompts this way).

1. Candidates. For every category of the seeds (`redteam.seeds`, narrowed by `redteam.categories`),
   `redteam.per_category` candidates. Candidate i of a category is shown `redteam.few_shot` seeds of
   that category, drawn by an RNG seeded with (seed, category, i), as a numbered list the model
   continues (`constitution.redteam_messages`), and is sampled with a seed of its own id, so a
   candidate is the same whatever else is generated with it. The raw completions land a chunk at a
   time in `RUN/redteam/candidates/` (the resumable chunk loop, cai/stages/chunked.py).
2. Parsing (`parse_candidate`): a candidate is one line. One that is empty, cut off at the token
   limit, several lines, an echo of the prompt's own text, an answer instead of a request, a line that
   asks for nothing (a story, a statement; with `redteam.requests_only`), or shorter than
   `redteam.min_words` words is rejected with that reason.
3. Deduplication (`decide`), in candidate order: a candidate whose word n-gram Jaccard overlap
   (cai/evals/diversity.py) with a prompt of `redteam.exclude` (the evaluation sets), a seed, or an
   earlier kept candidate reaches `redteam.max_overlap` is rejected: `copies_*` / `duplicate` when
   its normalised text is the same, `near_*` otherwise. The evaluation sets are checked first, so
   nothing an evaluation asks can come out.
4. Multi-turn probes (`redteam.multi_turn`): for every seed, a conversation of `redteam.turns` user
   messages, rapport first and the seed's own request last, written one message at a time
   (`constitution.probe_turn_messages`), with the model's replies between them, so the probe can be
   sent to a model as it stands and its answer compared with the answer to the seed alone (the
   no-attack baseline). A message is parsed as in step 2; one that already asks the request
   (overlap with it of `max_overlap` or more) is rejected as `asks_early`, and an empty reply as
   `empty_reply`. Rows in `RUN/redteam/probes/`, resumable the same way; a chunk's probes advance
   in lockstep, one batched call per step (a message or a reply for each probe), and each finished
   step goes to a journal (cai/journal.py, `probes/calls.jsonl`), so a kill inside a chunk loses at
   most the step in flight and the resumed chunk's rows are those of an uninterrupted run.

Steps 2 and 3 are recomputed from the stored completions on every run (cheap and deterministic), so
changing `min_words`, `requests_only`, `ngram`, `max_overlap` or `exclude` generates nothing again, and
`per_category` and `categories` only choose which candidates exist: raising `per_category` adds
candidates and redoes none. What lands in `RUN/redteam/`:

    prompts.jsonl    the kept prompts, a `prompts` source as it stands: id, category, prompt, and
                     the generator, seed, seed prompts shown and closest earlier prompt
    rejected.jsonl   every rejected candidate with its reason (and the prompt it overlaps)
    probes.jsonl     the multi-turn probes (id, category, prompt = the final request, messages)
    summary.json     counts kept and rejected by reason and by category, and the diversity
                     (distinct-1/2/3, self-similarity of word sets and 3-grams) of the kept
                     prompts and of the seeds

    cai redteam generate redteam.categories=[violence,fraud] redteam.per_category=4
    cai redteam generate configs/quickstart.yaml redteam.multi_turn=true
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cai.config import PipelineConfig, RedTeamConfig, fingerprint, model_identity, plain
from cai.constitution import probe_turn_messages, redteam_messages
from cai.evals.diversity import OverlapIndex, diversity, jaccard, normalise, shingles
from cai.evals.stats import wilson
from cai.journal import FILE as JOURNAL
from cai.journal import Journal
from cai.judge import as_format
from cai.lm.base import LM, Completion, OnCall, Program, run_programs
from cai.records import SCAFFOLD_MARKERS, STATUS_OK, stable_seed
from cai.rundir import Stage, atomic_write, write_json
from cai.sources import PromptError, read_prompts
from cai.stages.chunked import run_chunks

FOLDER = "redteam"
STATUS_REJECTED = "rejected"
# Why a completion is not a prompt (step 2), in the order they are checked.
PARSE_REASONS = ("empty", "truncated", "multi_line", "echoes_template", "answer", "not_a_request", "too_short")
# Why a parsed prompt is not kept (step 3): (same normalised text, overlap at the threshold) per
# set it is checked against, in the order they are checked.
OVERLAP_REASONS = (("copies_eval", "near_eval"), ("copies_seed", "near_seed"), ("duplicate", "near_duplicate"))
# Why a multi-turn probe was not finished (step 4), beside the parse reasons of its messages.
PROBE_REASONS = ("asks_early", "empty_reply")

Row = dict[str, Any]

# A list number or bullet the model wrote again before its item ("5. ", "- ").
_MARKER = re.compile(r"^(?:\d{1,4}\s*[.):]|[-*•])\s*")
# The model's own labels, from the prompt's format or a chat habit.
_LABEL = re.compile(r"^(?:message\s*\d*|new message|request|prompt|user|human|assistant)\s*:", re.I)
# The start of an answer rather than a request: a refusal, a compliance opener, an assistant's
# preamble. Anchored at the start, so a request that quotes a refusal later still counts as one.
_ANSWER = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry\b|i apologi[sz]e|as an ai\b|as a language model\b"
    r"|i (?:can'?t|cannot|won'?t|will not|am unable to|'m unable to|am not able to|'m not able to)"
    r" (?:help(?! but)|assist|provide|do|comply|answer|write|create|give|share|fulfil)"
    r"|sure\b|certainly\b|of course\b|absolutely\b|here(?:'s| is| are)\b|i'?d be (?:happy|glad)\b"
    r"|i would be (?:happy|glad)\b|great question\b)", re.I)
# A request: a question (a question mark, or a question word opening the line), or a clause that
# opens with an imperative or a want. Every prompt of the shipped sets (human-written) is one
# (tests/test_redteam.py); a story or a statement is not.
_REQUEST = re.compile(
    r"\?|^(?:how|what|why|where|when|which|who|whose|is|are|do|does|did|can|could|would|will|should)\b"
    r"|(?:^|[.,:;!]\s+)(?:please\s+|now\s+|so\s+|and\s+)?(?:write|give|tell|help|make|find|teach|describe|"
    r"pretend|explain|role-?play|create|invent|be|suggest|talk|discuss|offer|try|convert|recommend|solve|list|"
    r"show|walk|generate|draft|compose|plan|name|provide|send|share|build|design|translate|summari[sz]e|rewrite|"
    r"imagine|act|play|say|get|let'?s|i(?:'d| would)? (?:want|need|like|wish)|i'?m (?:looking|trying) (?:for|to))\b",
    re.I)
_QUOTES = {'"': '"', "“": "”", "'": "'", "‘": "’"}


# ---- step 2: one completion, one prompt -----------------------------------------------------


def scaffold_sentences(messages: Sequence[dict[str, str]]) -> list[str]:
    """The sentences of a generation prompt's instruction (its user turn), normalised: a completion
    that contains one is echoing the prompt."""
    text = " ".join(m["content"] for m in messages if m["role"] == "user")
    return [s for s in (normalise(p) for p in re.split(r"(?<=[.:])\s+", text)) if len(s) > 20]


def parse_candidate(c: Completion, min_words: int, scaffold: Sequence[str] = (),
                    requests_only: bool = True) -> tuple[str | None, str | None]:
    """(the prompt, None) from a completion, or (None, the reason it is none; `PARSE_REASONS`).

    The completion must be one non-empty line that the model finished. A list number, bullet or
    pair of quotes around it is taken off (the prompt's list invites them); text that belongs to
    the prompt's scaffold (`scaffold`, chat markers, a `Message 2:` label), a reply that answers
    (a refusal, "Sure, ...", "Here is ..."), with `requests_only` a line that asks nothing (no
    question, no clause opening with an imperative or a want: a story or a statement), and one of
    fewer than `min_words` words are rejected."""
    text = c.text.replace("\r", "\n").strip()
    if not text:
        return None, "empty"
    if c.finish_reason == "length":
        return None, "truncated"
    if sum(1 for line in text.split("\n") if line.strip()) > 1:
        return None, "multi_line"
    text = _MARKER.sub("", text, count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    if not text:
        return None, "empty"
    norm = normalise(text)
    if (_LABEL.match(text) or any(m.strip() in text for m in SCAFFOLD_MARKERS)
            or any(s in norm for s in scaffold)):
        return None, "echoes_template"
    plain_text = text.replace("’", "'")
    if _ANSWER.match(plain_text):
        return None, "answer"
    if requests_only and not _REQUEST.search(plain_text):
        return None, "not_a_request"
    if len(norm.split()) < min_words:
        return None, "too_short"
    return text, None


# ---- step 1: candidates -------------------------------------------------------------------


def read_seeds(rt: RedTeamConfig) -> tuple[list[Row], dict[str, list[Row]]]:
    """(every seed row, the seeds of each chosen category in source order). A seed without a
    category, or a chosen category no seed has, is an error naming it."""
    seeds = read_prompts(rt.seeds)
    pools: dict[str, list[Row]] = {}
    for r in seeds:
        if not r["category"]:
            raise PromptError(f"{r['source']}: seed '{r['record_id']}' has no category; give the rows a "
                              "'category' column or the source a category (redteam.seeds.N.category=NAME)")
        pools.setdefault(r["category"], []).append(r)
    if not pools:
        raise PromptError(f"redteam.seeds: no seed prompts in {', '.join(s.path for s in rt.seeds)}")
    missing = [c for c in rt.categories if c not in pools]
    if missing:
        raise ValueError(f"redteam.categories: {', '.join(map(repr, missing))} not a category of the seeds "
                         f"(have: {', '.join(pools)})")
    chosen = rt.categories or list(pools)
    return seeds, {c: pools[c] for c in chosen}


def slug(category: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-") or "x"


def candidate_records(categories: Sequence[str], per_category: int, prefix: str) -> list[Row]:
    """The candidates to generate, category by category: `{prefix}-{category}-{i:04d}`."""
    by_slug: dict[str, str] = {}
    for c in categories:
        if by_slug.setdefault(slug(c), c) != c:
            raise ValueError(f"redteam: categories {by_slug[slug(c)]!r} and {c!r} give the same id part "
                             f"{slug(c)!r}; rename one in the seeds")
    return [{"record_id": f"{prefix}-{slug(c)}-{i:04d}", "category": c, "index": i}
            for c in categories for i in range(per_category)]


def draw_shots(pool: Sequence[Row], k: int, seed: int, category: str, index: int) -> list[Row]:
    """The seeds candidate `index` of `category` is shown: `k` (or all, when fewer) drawn without
    repeats by an RNG of (seed, category, index) alone."""
    rng = random.Random(stable_seed(seed, "redteam-shots", category, index))
    return rng.sample(list(pool), min(k, len(pool)))


def candidate_chunk(lm: LM, rows: list[Row], on_call: OnCall | None, *, pools: dict[str, list[Row]],
                    cfg: RedTeamConfig, seed: int) -> list[Row]:
    """One chunk of candidates: the raw completions with what produced them (one batched call)."""
    shots = [draw_shots(pools[r["category"]], cfg.few_shot, seed, r["category"], r["index"]) for r in rows]
    prompts = [as_format(redteam_messages(r["category"], [s["prompt"] for s in sh]), cfg.format)
               for r, sh in zip(rows, shots)]
    seeds = [stable_seed(seed, r["record_id"], "redteam") for r in rows]
    out = lm.generate(prompts, cfg.sampling, seeds=seeds)
    if on_call is not None:
        on_call(sum(c[0].num_tokens for c in out))
    return [{**r, "few_shot_ids": [s["record_id"] for s in sh], "text": c[0].text, "finish": c[0].finish_reason,
             "generator": lm.name, "seed": seed}
            for r, sh, c in zip(rows, shots, out)]


def _count_candidates(rows: list[Row]) -> dict[str, Any]:
    return {"candidates": len(rows), "cut_off": sum(r["finish"] == "length" for r in rows)}


# ---- step 3: what is kept ------------------------------------------------------------------


def decide(candidates: Sequence[Row], seeds: Sequence[Row], excluded: Sequence[Row], cfg: RedTeamConfig,
           ) -> tuple[list[Row], list[Row]]:
    """(kept prompt rows, rejected rows), both in candidate order. Pure: the same candidates and
    settings give the same rows."""
    indexes = [OverlapIndex(cfg.ngram) for _ in OVERLAP_REASONS]
    for index, rows in zip(indexes, (excluded, seeds)):
        for r in rows:
            index.add(r["record_id"], r["prompt"])
    scaffolds: dict[str, list[str]] = {}
    kept: list[Row] = []
    rejected: list[Row] = []
    for c in candidates:
        if c["category"] not in scaffolds:
            scaffolds[c["category"]] = scaffold_sentences(redteam_messages(c["category"], []))
        text, reason = parse_candidate(Completion(c["text"], c["finish"], 0), cfg.min_words, scaffolds[c["category"]],
                                       cfg.requests_only)
        closest: tuple[Any, float] = (None, 0.0)
        if text is not None:
            for index, (same, near) in zip(indexes, OVERLAP_REASONS):
                key, overlap = index.nearest(text)
                if key is not None and overlap >= cfg.max_overlap:
                    reason, closest = (same if index.exact(text) is not None else near), (key, overlap)
                    break
                if overlap > closest[1]:
                    closest = (key, overlap)
        base = {"id": c["record_id"], "category": c["category"]}
        if reason is None:
            assert text is not None
            indexes[-1].add(c["record_id"], text)
            kept.append({**base, "prompt": text, "generator": c["generator"], "seed": c["seed"],
                         "few_shot_ids": c["few_shot_ids"], "closest": closest[0],
                         "closest_overlap": round(closest[1], 4)})
        else:
            rejected.append({**base, "reason": reason, "text": c["text"], "finish": c["finish"],
                             **({"prompt": text, "match": closest[0], "overlap": round(closest[1], 4)}
                                if text is not None else {})})
    return kept, rejected


# ---- step 4: multi-turn probes --------------------------------------------------------------


def probe_program(row: Row, cfg: RedTeamConfig, seed: int) -> Program:
    """One seed's probe as a program: for each message before the request, the message (a line the
    model adds to the list of the user's messages) and then the model's reply to the conversation so
    far; fills in `row` as the answers come back."""
    rid, request = row["record_id"], row["prompt"]
    asked = shingles(request, cfg.ngram)
    written: list[str] = []
    messages: list[dict[str, str]] = []
    finishes: list[str] = []
    # The instruction's own sentences, without the request: a message that repeats the request is
    # `asks_early`, not an echo of the instruction.
    scaffold = scaffold_sentences(probe_turn_messages(row["category"], "", [], cfg.turns))
    row.update(status=STATUS_OK, reason=None)
    for t in range(cfg.turns - 1):
        ask = probe_turn_messages(row["category"], request, written, cfg.turns)
        c = yield as_format(ask, cfg.format), cfg.sampling, stable_seed(seed, rid, "probe-turn", t)
        text, reason = parse_candidate(c, 1, scaffold, requests_only=False)  # small talk is no request
        if text is not None and jaccard(shingles(text, cfg.ngram), asked) >= cfg.max_overlap:
            reason = "asks_early"
        if reason is not None:
            row.update(status=STATUS_REJECTED, reason=reason, failed_turn=t + 1, text=c.text)
            break
        assert text is not None
        written.append(text)
        messages.append({"role": "user", "content": text})
        r = yield as_format(messages, cfg.format), cfg.reply, stable_seed(seed, rid, "probe-reply", t)
        if not r.text.strip():
            row.update(status=STATUS_REJECTED, reason="empty_reply", failed_turn=t + 1, text=r.text)
            break
        messages.append({"role": "assistant", "content": r.text.strip()})
        finishes.append(r.finish_reason)
    if row["status"] == STATUS_OK:
        messages.append({"role": "user", "content": request})
    row.update(messages=messages, reply_finishes=finishes)


def probe_chunk(lm: LM, rows: list[Row], on_call: OnCall | None, *, cfg: RedTeamConfig, seed: int,
                journal: Journal | None = None) -> list[Row]:
    """One chunk of probes, their programs advancing in lockstep (one batched call per step). With a
    `journal`, each finished step is kept and a resumed chunk starts after its last finished step."""
    out = [dict(r) for r in rows]
    run_programs(lm, [probe_program(o, cfg, seed) for o in out], on_call, journal)
    return [{**o, "generator": lm.name, "seed": seed} for o in out]


def _count_probes(rows: list[Row]) -> dict[str, Any]:
    bad = Counter(r["reason"] for r in rows if r["status"] != STATUS_OK)
    return {"probes": len(rows), "ok": sum(r["status"] == STATUS_OK for r in rows),
            "rejected_by_reason": dict(sorted(bad.items()))}


# ---- the summary ----------------------------------------------------------------------------


def summarise(candidates: Sequence[Row], kept: Sequence[Row], rejected: Sequence[Row],
              pools: dict[str, list[Row]], cfg: RedTeamConfig, probes: Sequence[Row] | None) -> dict[str, Any]:
    """Counts kept and rejected (overall with a Wilson interval, by reason, by category) and the
    diversity of the kept prompts beside that of the seeds they were written from."""
    n, k = len(candidates), len(kept)
    interval = wilson(k, n)
    by_category = {}
    for cat in pools:
        reasons = Counter(r["reason"] for r in rejected if r["category"] == cat)
        by_category[cat] = {"seeds": len(pools[cat]), "candidates": sum(c["category"] == cat for c in candidates),
                            "kept": sum(r["category"] == cat for r in kept),
                            "rejected_by_reason": dict(sorted(reasons.items()))}
    seed_texts = [r["prompt"] for rows in pools.values() for r in rows]
    out: dict[str, Any] = {
        "generator": candidates[0]["generator"] if candidates else None,
        "candidates": n, "kept": k, "kept_rate": k / n if n else None,
        "kept_interval": list(interval) if interval else None,
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejected).most_common()),
        "by_category": by_category,
        "diversity": {"generated": diversity([r["prompt"] for r in kept]), "seeds": diversity(seed_texts)},
        "overlap": {"ngram": cfg.ngram, "max_overlap": cfg.max_overlap,
                    "against": [s.path for s in cfg.exclude] + [s.path for s in cfg.seeds]},
    }
    if probes is not None:
        out["probes"] = {**_count_probes(list(probes)),
                         "replies_cut_off": sum(f == "length" for r in probes for f in r.get("reply_finishes", []))}
    return out


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def render(summary: dict[str, Any], examples: Sequence[Row] = ()) -> str:
    """The summary as the command prints it."""
    s = summary
    lo, hi = s["kept_interval"] or (None, None)
    lines = [f"red-team generation by {s['generator']}: {s['candidates']} candidates in "
             f"{len(s['by_category'])} categories",
             f"kept {s['kept']} ({_fmt(s['kept_rate'], '.1%')}, 95% interval {_fmt(lo, '.1%')} to {_fmt(hi, '.1%')})"]
    if s["rejected_by_reason"]:
        lines.append("rejected: " + ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items()))
    lines.append(f"\n{'category':<22}{'seeds':>6}{'tried':>7}{'kept':>6}  rejected")
    for cat, c in s["by_category"].items():
        why = ", ".join(f"{k} {v}" for k, v in c["rejected_by_reason"].items())
        lines.append(f"{cat:<22}{c['seeds']:>6}{c['candidates']:>7}{c['kept']:>6}  {why}")
    lines.append(f"\n{'diversity':<12}{'prompts':>8}{'words':>7}{'dist-1':>8}{'dist-2':>8}{'dist-3':>8}"
                 f"{'sim-1':>8}{'sim-3':>8}")
    for name, d in s["diversity"].items():
        lines.append(f"{name:<12}{d['prompts']:>8}{_fmt(d['mean_words'], '.1f'):>7}{_fmt(d['distinct_1']):>8}"
                     f"{_fmt(d['distinct_2']):>8}{_fmt(d['distinct_3']):>8}{_fmt(d['self_similarity_1']):>8}"
                     f"{_fmt(d['self_similarity_3']):>8}")
    if "probes" in s:
        p = s["probes"]
        why = ", ".join(f"{k} {v}" for k, v in p["rejected_by_reason"].items()) or "none"
        lines.append(f"\nmulti-turn probes: {p['ok']} of {p['probes']} written (rejected: {why}; "
                     f"replies cut off: {p['replies_cut_off']})")
    if examples:
        lines.append("")
        lines += [f"[{r['category']}] {r['prompt']}" for r in examples]
    return "\n".join(lines)


# ---- run ----------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: Sequence[Row]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _mine(stage_rows: list[Row], records: Sequence[Row]) -> list[Row]:
    """The stage's rows of `records`, in their order (rows of candidates no longer asked for, after
    `per_category` was lowered, stay in the folder but out of the results)."""
    by_id = {r["record_id"]: r for r in stage_rows}
    return [by_id[r["record_id"]] for r in records if r["record_id"] in by_id]


def run(cfg: PipelineConfig, lm_factory: Callable[[], LM], allow_changed: bool = False,
        on_chunk: Callable[[int], None] | None = None) -> Stage:
    """Generate, parse and deduplicate red-team prompts (and probes) into `RUN/redteam/`; the returned
    umbrella stage's folder holds `summary.json`. `lm_factory` builds the generator."""
    rt = cfg.redteam
    seeds, pools = read_seeds(rt)
    excluded = read_prompts(rt.exclude) if rt.exclude else []
    generator = rt.model or cfg.model.name
    shared = {"model": model_identity(dataclasses.replace(cfg.model, name=generator)),
              "seed": cfg.seed, "format": rt.format, "id_prefix": rt.id_prefix,
              "seeds": fingerprint([[r["record_id"], r["category"], r["prompt"]] for r in seeds])}

    settings = plain({**shared, "few_shot": rt.few_shot, "sampling": rt.sampling})
    stage = Stage(cfg.run_dir, f"{FOLDER}/candidates", fingerprint(settings), settings, allow_changed)
    records = candidate_records(list(pools), rt.per_category, rt.id_prefix)
    work = functools.partial(candidate_chunk, pools=pools, cfg=rt, seed=cfg.seed)
    rows = run_chunks(stage, records, work, lm_factory, cfg.ray, chunk_size=rt.chunk_size, count=_count_candidates,
                      unit="candidate", desc="redteam candidates", stable_chunks=True,
                      calls=lambda chunk: 1, on_chunk=on_chunk)
    candidates = _mine(rows, records)
    kept, rejected = decide(candidates, seeds, excluded, rt)

    root = Path(cfg.run_dir) / FOLDER
    probes = None
    if rt.multi_turn:
        psettings = plain({**shared, "turns": rt.turns, "sampling": rt.sampling, "reply": rt.reply,
                           "ngram": rt.ngram, "max_overlap": rt.max_overlap})
        pstage = Stage(cfg.run_dir, f"{FOLDER}/probes", fingerprint(psettings), psettings, allow_changed)
        precords = [{"record_id": f"{rt.id_prefix}p-{r['record_id']}", "category": cat, "seed_id": r["record_id"],
                     "prompt": r["prompt"]} for cat, pool in pools.items() for r in pool]
        # A probe is 2 * (turns - 1) calls, so a chunk is many: the journal keeps each finished step
        # (not on Ray, whose workers need not share the run directory: there a kill loses the
        # chunks in flight).
        journal = None if cfg.ray.enabled else Journal(pstage.dir / JOURNAL, pstage.fingerprint)
        work = functools.partial(probe_chunk, cfg=rt, seed=cfg.seed, journal=journal)
        probes = _mine(run_chunks(pstage, precords, work, lm_factory, cfg.ray, chunk_size=rt.chunk_size,
                                  count=_count_probes, unit="probe", desc="redteam probes", stable_chunks=True,
                                  calls=lambda chunk: 2 * (rt.turns - 1) * len(chunk), on_chunk=on_chunk),
                       precords)
        if journal is not None:
            journal.remove()
        _write_jsonl(root / "probes.jsonl", [
            {"id": p["record_id"], "category": p["category"], "prompt": p["prompt"], "messages": p["messages"],
             "seed_id": p["seed_id"], "generator": p["generator"], "seed": p["seed"]}
            for p in probes if p["status"] == STATUS_OK])

    _write_jsonl(root / "prompts.jsonl", kept)
    _write_jsonl(root / "rejected.jsonl", rejected)
    summary = summarise(candidates, kept, rejected, pools, rt, probes)
    write_json(root / "summary.json", summary)
    top_settings = plain({"redteam": rt, **shared})
    top = Stage(cfg.run_dir, FOLDER, fingerprint(top_settings), top_settings, allow_changed=True)
    counts = {"candidates": summary["candidates"], "kept": summary["kept"],
              "rejected_by_reason": summary["rejected_by_reason"]}
    if probes is not None:
        counts["probes"] = summary["probes"]["ok"]
    top.write_manifest("complete", counts, prompts=str(root / "prompts.jsonl"), summary=str(root / "summary.json"))
    return top
