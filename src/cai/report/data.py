"""What the run report shows, read from a run directory into plain dicts (no HTML, no plotting).

`load_run(run_dir)` reads every stage's manifest and the rows and logs the report draws from:
`sl_generate/rows.jsonl` (critique traces), `feedback/rows.jsonl` (AI labels), `preferences/`,
`pm/` and `dpo/` (`eval.json`, `metrics.jsonl`), `sft/train_log.json`, `ppo/metrics.jsonl` and
`eval/summary.json`, and the summaries of the constitution-as-code commands (`CODE_RESULTS`). A
part the run has not produced is None, and the page leaves its section out.
Figures are computed here, so they can be tested without a browser:

    python -c "from cai.report.data import load_run; print(load_run('runs/quickstart')['sl']['draws'])"
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cai.records import STATUS_OK, stable_seed
from cai.rundir import read_jsonl

# Traces beyond these are sampled (a seeded draw by record id), so a large run's page stays small
# enough to mail; the page says how many it shows.
MAX_TRACES = 400
MAX_TRACE_CHARS = 2_500_000
# Sample comparisons shown side by side in the AI-feedback section, and the most points its
# scatter of the two orders draws (a seeded sample beyond that; every point is one SVG element).
FEEDBACK_SAMPLES = 6
MAX_POINTS = 2000
# Per-step metrics drawn for each training stage, in this order, where the log has them.
CURVES = {
    "sft": ("loss", "mean_token_accuracy", "entropy"),
    "pm": ("loss", "accuracy", "margin"),
    "ppo": ("reward", "kl", "entropy", "response_length", "policy_loss", "value_loss"),
    "dpo": ("loss", "margin", "reward_accuracy", "chosen_reward", "rejected_reward", "grad_norm"),
}


class ReportError(ValueError):
    """The report cannot be made from this folder; the message says why."""


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _rows(path: Path) -> list[dict[str, Any]]:
    return list(read_jsonl(path)) if path.is_file() else []


def _num(x: Any) -> float | None:
    """`x` as a finite float, or None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


# ---- overview -------------------------------------------------------------------------------


def _stage_entry(name: str, m: dict[str, Any], folder: str) -> dict[str, Any]:
    counts = m.get("counts") or {}
    return {
        "name": name, "folder": folder, "status": m.get("status", "?"),
        "counts": {k: v for k, v in counts.items() if not isinstance(v, (dict, list))},
        # every "... by reason" table of the counts (dropped, degenerate, set aside, not ok, skipped)
        "failures": {k: v for k, v in counts.items() if isinstance(v, dict) and v},
        "updated": m.get("updated"), "started": m.get("started"), "wall_s": _num(m.get("wall_s")),
        "fingerprint": m.get("fingerprint"), "versions": m.get("versions") or {},
    }


def stages(run: Path) -> list[dict[str, Any]]:
    """Every stage with a manifest, in pipeline order; the evaluation's parts (answers per model,
    judgements, scores, preference-model view) as `parts` of its entry, its wall time their sum."""
    from cai.pipeline import FOLDERS, STAGES

    out = []
    for name in STAGES:
        folder = FOLDERS.get(name, name)
        m = _json(run / folder / "manifest.json")
        if m is None:
            continue
        entry = _stage_entry(name, m, folder)
        if name == "evaluate":
            parts = []
            for sub in [*sorted(p.parent for p in (run / folder / "answers").glob("*/manifest.json")),
                        run / folder / "judgements", run / folder / "scores", run / folder / "pm"]:
                sm = _json(sub / "manifest.json")
                if sm:
                    parts.append(_stage_entry(str(sub.relative_to(run)), sm, str(sub.relative_to(run))))
            entry["parts"] = parts
            walls = [p["wall_s"] for p in parts if p["wall_s"] is not None]
            if walls:
                entry["wall_s"] = round(sum(walls) + (entry["wall_s"] or 0.0), 1)
        out.append(entry)
    return out


def constitution(run: Path) -> dict[str, Any] | None:
    """Name, version, hash and principles by category of the run's constitution."""
    from cai.constitution import ConstitutionError, load

    path = run / "constitution.yaml"
    if not path.is_file():
        return None
    try:
        c = load(path)
    except ConstitutionError as e:
        return {"error": str(e)}
    cats: dict[str, dict[str, list[dict[str, str]]]] = defaultdict(lambda: {"critique_revision": [], "preference": []})
    for p in c.critique_revision:
        cats[p.category]["critique_revision"].append({"id": p.id, "text": p.critique})
    for q in c.preference:
        cats[q.category]["preference"].append({"id": q.id, "text": q.instruction})
    return {"name": c.name, "version": c.version, "hash": c.hash, "description": c.description,
            "categories": dict(cats), "n_critique": len(c.critique_revision), "n_preference": len(c.preference),
            "category_of": {p.id: p.category for p in (*c.critique_revision, *c.preference)}}


# ---- SL-CAI ---------------------------------------------------------------------------------


def _sample(rows: list[dict[str, Any]], size: Callable[[dict[str, Any]], int], max_rows: int,
            max_size: int) -> list[dict[str, Any]]:
    """The rows themselves, or a seeded draw of them (by record id, else position) of at most
    `max_rows` rows and `max_size` in all (`size(row)`: characters of text), in their original order."""
    total = sum(size(r) for r in rows)
    if len(rows) <= max_rows and total <= max_size:
        return rows
    keep: set[int] = set()
    used = 0
    for i in sorted(range(len(rows)), key=lambda i: stable_seed("report", rows[i].get("record_id", i))):
        if len(keep) >= max_rows or used + size(rows[i]) > max_size:
            break
        keep.add(i)
        used += size(rows[i])
    return [r for i, r in enumerate(rows) if i in keep]


def _trace_chars(row: dict[str, Any]) -> int:
    return len(str(row.get("prompt", ""))) + len(str(row.get("init_response", ""))) + sum(
        len(str(rd.get("critique", ""))) + len(str(rd.get("revision", ""))) for rd in row.get("rounds") or [])


def sl(run: Path, max_traces: int = MAX_TRACES, max_chars: int = MAX_TRACE_CHARS) -> dict[str, Any] | None:
    """The critique-revision rows: counts, principle draws, degenerate revisions by reason and by
    round, and the traces (all, or a seeded sample of a large run)."""
    rows = _rows(run / "sl_generate" / "rows.jsonl")
    if not rows:
        return None
    rounds = [rd for r in rows for rd in r.get("rounds") or []]
    n_rounds = max((rd.get("round", 0) for rd in rounds), default=0)
    by_round = []
    for k in range(1, n_rounds + 1):
        these = [rd for rd in rounds if rd.get("round") == k]
        by_round.append({"round": k, "n": len(these), "ok": sum(rd.get("status") == STATUS_OK for rd in these),
                         "by_reason": dict(Counter(rd.get("reason") for rd in these if rd.get("status") != STATUS_OK))})
    degenerate = Counter(str(rd.get("reason")) for rd in rounds if rd.get("status") != STATUS_OK)
    draws = Counter(str(rd.get("principle_id")) for rd in rounds)
    bad_by_principle = Counter(str(rd.get("principle_id")) for rd in rounds if rd.get("status") != STATUS_OK)
    traces = _sample(rows, _trace_chars, max_traces, max_chars)
    return {
        "rows": len(rows),
        "kinds": dict(Counter(str(r.get("kind")) for r in rows)),
        "status": dict(Counter(str(r.get("status")) for r in rows)),
        "dropped_by_reason": dict(Counter(str(r.get("reason")) for r in rows if r.get("status") != STATUS_OK)),
        "rounds": len(rounds),
        "max_round": n_rounds,
        "by_round": by_round,
        "degenerate_by_reason": dict(degenerate.most_common()),
        "draws": dict(sorted(draws.items(), key=lambda kv: (-kv[1], kv[0]))),
        "degenerate_by_principle": dict(bad_by_principle),
        "traces": traces,
        "traces_sampled": len(traces) < len(rows),
    }


# ---- AI feedback ----------------------------------------------------------------------------


def _last_content(messages: Any) -> str:
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return "" if messages is None else str(messages)


def feedback(run: Path, n_samples: int = FEEDBACK_SAMPLES) -> dict[str, Any] | None:
    """The AI labels: soft labels, the two orders' agreement, abstentions and failures, labels per
    principle, and a few comparisons (the most and least decisive labels, and one that is not ok)."""
    rows = _rows(run / "feedback" / "rows.jsonl")
    if not rows:
        return None
    ok = [r for r in rows if r.get("status") == STATUS_OK and _num(r.get("p_first")) is not None]
    orders = [o for r in rows for o in r.get("orders") or []
              if _num(o.get("p_ab")) is not None and _num(o.get("p_ba")) is not None]
    agree = sum((o["p_ab"] > 0.5) == (o["p_ba"] > 0.5) for o in orders)
    # the share of scored orders whose slot (A) answer got more than half: 0.5 is no position bias
    first_slot = sum((o["p_ab"] > 0.5) + ((1.0 - o["p_ba"]) > 0.5) for o in orders)
    per_principle: dict[str, dict[str, Any]] = {}
    for r in rows:
        for pid in r.get("principle_ids") or ["(none)"]:
            e = per_principle.setdefault(str(pid), {"rows": 0, "ok": 0, "abstain": 0, "failed": 0, "p": []})
            e["rows"] += 1
            status = r.get("status")
            e[status if status in ("ok", "abstain", "failed") else "failed"] += 1
            if status == STATUS_OK and _num(r.get("p_chosen")) is not None:
                e["p"].append(r["p_chosen"])
    for e in per_principle.values():
        ps = e.pop("p")
        e["mean_p_chosen"] = sum(ps) / len(ps) if ps else None
    not_ok = [r for r in rows if r.get("status") != STATUS_OK]
    wanted = n_samples - (1 if not_ok else 0)
    by_decision = sorted(range(len(ok)), key=lambda i: (-abs(ok[i]["p_first"] - 0.5), i))
    take = by_decision[: (wanted + 1) // 2]  # the most decisive labels, then the least decisive
    take += [i for i in reversed(by_decision) if i not in take][: wanted - len(take)]
    picks = [ok[i] for i in take] + not_ok[:1]
    samples = []
    for r in picks:
        o = (r.get("orders") or [{}])[0]
        samples.append({"record_id": r.get("record_id"), "prompt": _last_content(r.get("prompt")),
                        "chosen": _last_content(r.get("chosen")), "rejected": _last_content(r.get("rejected")),
                        "p_chosen": _num(r.get("p_chosen")), "status": r.get("status"), "reason": r.get("reason"),
                        "principle_ids": r.get("principle_ids") or [], "model": r.get("feedback_model"),
                        "cot": [c for c in (o.get("cot_ab"), o.get("cot_ba")) if c]})
    return {
        "rows": len(rows),
        "status": dict(Counter(str(r.get("status")) for r in rows)),
        "not_ok_by_reason": dict(Counter(f"{r.get('status')}: {r.get('reason')}" for r in not_ok)),
        "p_first": [r["p_first"] for r in ok],
        "p_chosen": [r["p_chosen"] for r in ok if _num(r.get("p_chosen")) is not None],
        "orders": [(o["p_ab"], o["p_ba"]) for o in _sample(orders, lambda o: 1, MAX_POINTS, MAX_POINTS)],
        "orders_total": len(orders),
        "orders_agree": {"k": agree, "n": len(orders)},
        "first_slot_wins": {"k": first_slot, "n": 2 * len(orders)},
        "per_principle": dict(sorted(per_principle.items(), key=lambda kv: (-kv[1]["rows"], kv[0]))),
        "chain_of_thought": any(o.get("cot_ab") or o.get("cot_ba") for r in rows for o in r.get("orders") or []),
        "models": sorted({str(r.get("feedback_model")) for r in rows if r.get("feedback_model")}),
        "samples": samples,
    }


# ---- training stages ------------------------------------------------------------------------


def _series(log: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, list[tuple[float, float]]]:
    """Per metric, the (step, value) points of the log entries that have it (in `keys` order)."""
    out = {}
    for k in keys:
        pts = [(float(e.get("step", i + 1)), e[k]) for i, e in enumerate(log) if _num(e.get(k)) is not None]
        if pts:
            out[k] = pts
    return out


def training(run: Path, name: str) -> dict[str, Any] | None:
    """A training stage's per-step curves, held-out evaluation (pm, dpo) and manifest counts."""
    folder = run / name
    m = _json(folder / "manifest.json")
    log = (_json(folder / "train_log.json") or []) if name == "sft" else _rows(folder / "metrics.jsonl")
    held_out = _json(folder / "eval.json") if name in ("pm", "dpo") else None
    if not log and not held_out and m is None:
        return None
    return {"name": name, "curves": _series(log, CURVES[name]), "steps": len(log), "eval": held_out,
            "status": (m or {}).get("status"), "counts": (m or {}).get("counts") or {}}


# ---- the constitution as code ---------------------------------------------------------------

# Where the report finds the results of the constitution-as-code commands, under the run directory.
# The commands tied to a run write there by default; the others write there when --out (or
# run_dir) points into the run:
#   cases/<name>.summary.json        cai constitution test C [CASES] --out RUN/cases/<name>.jsonl
#                                    (its per-case rows, <name>.jsonl beside it, give the failing cases)
#   constitution_diff/*/report.json  cai constitution diff A B --pairs RUN (per-pair rows.jsonl beside it)
#   eval/attribution.json            cai eval attribution RUN
#   ablate/<by>/summary.json         cai eval ablate RUN [--by category]
#   audit/<name>/summary.json        cai audit FILE --out RUN/audit/<name>
#   redteam/summary.json             cai redteam generate run_dir=RUN
CODE_RESULTS = {
    "cases": "cases/*.summary.json",
    "diff": "constitution_diff/*/report.json",
    "attribution": "eval/attribution.json",
    "ablation": "ablate/*/summary.json",
    "audit": "audit/*/summary.json",
    "redteam": "redteam/summary.json",
}
MAX_FAILING_CASES = 50  # failing cases listed per cases file; the page says when there are more
MAX_REPLY_CHARS = 400  # each response of a diff's pairs that moved most, cut here


def _summary_file(run: Path, path: Path) -> dict[str, Any]:
    """{file, summary} of one results file, or {file, error} when it is not a JSON object (a
    malformed file is a note on the page, never a failed report)."""
    name = str(path.relative_to(run))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return {"file": name, "error": f"cannot be read ({e})"}
    except json.JSONDecodeError as e:
        return {"file": name, "error": f"not valid JSON ({e.msg}, line {e.lineno})"}
    if not isinstance(data, dict):
        return {"file": name, "error": f"not a JSON object (a {type(data).__name__})"}
    return {"file": name, "summary": data}


def _failing_cases(entry: dict[str, Any], rows_path: Path, limit: int) -> None:
    """Add the failing cases of a cases summary from its rows file beside it (`failing`, `failing_total`),
    or say why they cannot be listed (`rows_error`)."""
    if not rows_path.is_file():
        entry["rows_error"] = f"{rows_path.name} (the per-case rows) is not beside it"
        return
    try:
        rows = list(read_jsonl(rows_path))
    except (OSError, ValueError) as e:
        entry["rows_error"] = str(e)
        return
    failing = [r for r in rows if isinstance(r, dict) and not r.get("passed")]
    entry["failing"], entry["failing_total"] = failing[:limit], len(failing)


def _moved_replies(entry: dict[str, Any], rows_path: Path, width: int = MAX_REPLY_CHARS) -> None:
    """Add the two responses of a diff's pairs that moved most (`replies`: record id -> [r1, r2], each
    cut at `width` characters) from the per-pair rows beside it, or say why not (`rows_error`)."""
    top = entry["summary"].get("top")
    want = {t.get("record_id") for t in top if isinstance(t, dict)} if isinstance(top, list) else set()
    if not want:
        return
    if not rows_path.is_file():
        entry["rows_error"] = f"{rows_path.name} (the per-pair rows) is not beside it"
        return
    try:
        rows = list(read_jsonl(rows_path))
    except (OSError, ValueError) as e:
        entry["rows_error"] = str(e)
        return
    replies = {}
    for r in rows:
        if isinstance(r, dict) and r.get("record_id") in want and isinstance(r.get("responses"), list):
            replies[r["record_id"]] = [t if len(t := str(x)) <= width else t[: width - 1] + "…"
                                       for x in r["responses"][:2]]
    entry["replies"] = replies


def constitution_code(run: Path, max_failing: int = MAX_FAILING_CASES) -> dict[str, list[dict[str, Any]]] | None:
    """The results of the constitution-as-code commands found in the run (`CODE_RESULTS`): per kind,
    one entry per file, {file, summary} or {file, error}; None when there are none."""
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, pattern in CODE_RESULTS.items():
        entries = []
        for path in sorted(run.glob(pattern)):
            if not path.is_file():
                continue
            entry = _summary_file(run, path)
            if kind == "cases" and "summary" in entry:
                _failing_cases(entry, path.with_name(path.name[: -len(".summary.json")] + ".jsonl"), max_failing)
            if kind == "diff" and "summary" in entry:
                _moved_replies(entry, path.with_name("rows.jsonl"))
            entries.append(entry)
        if entries:
            out[kind] = entries
    return out or None


# ---- the whole run --------------------------------------------------------------------------


def load_run(run_dir: str | Path, max_traces: int = MAX_TRACES, max_chars: int = MAX_TRACE_CHARS) -> dict[str, Any]:
    """Everything the report shows, as plain data; a part the run has not produced is None."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"{run}: no such run directory")
    config_path = run / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    st = stages(run)
    if not st and config_text is None:
        raise ReportError(f"{run}: not a run directory (no config.yaml and no stage manifest); "
                          "give the run_dir of a `cai run`")
    prefs = _json(run / "preferences" / "manifest.json")
    summary = _json(run / "eval" / "summary.json")
    try:
        config = yaml.safe_load(config_text) if config_text else None
    except yaml.YAMLError as e:
        raise ReportError(f"{config_path}: not valid YAML: {e}") from None
    return {
        "run_dir": str(run),
        "name": run.resolve().name,
        "config_text": config_text,
        "config": config if isinstance(config, dict) else None,
        "constitution": constitution(run),
        "stages": st,
        "sl": sl(run, max_traces, max_chars),
        "feedback": feedback(run),
        "preferences": {"counts": prefs.get("counts") or {}, "status": prefs.get("status")} if prefs else None,
        "training": {n: t for n in ("sft", "pm", "ppo", "dpo") if (t := training(run, n)) is not None},
        "eval": summary,
        "constitution_code": constitution_code(run),
    }
