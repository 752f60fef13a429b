"""Which principles the labeller actually applies: per-principle figures from a run's stored AI labels.

The feedback stage keeps, for every labelled pair, each drawn principle's probabilities in both
option orders (`orders` in the preference rows, cai/records.py); the pair's label is their
combination (`cai.judge.combine`: the mean of the usable principles' swap averages, clamped under
chain of thought). Nothing here calls a model: from the rows of `RUN/feedback/` it reports, per
preference principle of the run's constitution,

- **drawn**: how many pairs were asked under it, and how many of those gave a usable answer;
- **decisiveness**: the mean |p - 0.5| of its swap-averaged P(response 1 is better), with a
  seeded bootstrap interval, and the share of its answers beyond `margin` (Wilson interval); a
  principle the small judge answers at 0.5 every time is nominally given but not applied;
- **order agreement**: the share of its answers whose two orders favour the same response;
- **agreement with the label**: the share of its answers on the same side of 0.5 as the pair's
  label (a tie on either side counts half). With one principle per pair this is 1 by
  construction; with an ensemble (`feedback.principles` > 1) `agree_others` compares it with the
  mean of the pair's other usable principles instead, which is the informative figure;
- **disagreeing pairs**: for principles asked about the same pair, how often two of them fall on
  opposite sides of 0.5, most disagreeing first.

It also recombines every stored label from its stored entries with the judge's own rule and
counts the rows where that does not give the stored `p_first` and status (`consistency`): 0
mismatches means the figures above describe exactly the labels the preference model trains on.
Rows that abstained or failed are counted by reason and never enter a figure.

    cai eval attribution runs/quickstart          # prints the table, writes runs/quickstart/eval/attribution.json
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cai.config import FeedbackConfig, PipelineConfig, load_config, plain
from cai.constitution import Constitution, ConstitutionError
from cai.constitution import load as load_constitution
from cai.evals.suite import mean_ci, rate, rounded
from cai.judge import combine, swap_average
from cai.records import STATUS_OK
from cai.rundir import Stage, write_json

OUT = Path("eval") / "attribution.json"
TOL = 1e-9  # a recombined p_first equal to the stored one up to float rounding
TIE = 1e-12


class RunError(ValueError):
    """A run directory that cannot be read for this; the message names the file and what is missing."""


# ---- reading a run ----------------------------------------------------------------------------


def run_config(run: str | Path) -> PipelineConfig:
    """The resolved config a run saved (`RUN/config.yaml`)."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{path}: no such file; is {run} the run_dir of a `cai run`?")
    return load_config(path)


def run_constitution(run: str | Path) -> Constitution:
    """The constitution a run saved (`RUN/constitution.yaml`)."""
    path = Path(run) / "constitution.yaml"
    if not path.is_file():
        raise RunError(f"{path}: no such file; is {run} the run_dir of a `cai run`?")
    try:
        return load_constitution(path)
    except ConstitutionError as e:
        raise RunError(str(e)) from None


def feedback_rows(run: str | Path) -> tuple[list[dict[str, Any]], Stage]:
    """The rows of the run's finished feedback stage (and the stage), each checked for the fields
    the figures read; an error names the file and line."""
    st = Stage.view(run, "feedback")
    m = st.manifest()
    if not m or m.get("status") != "complete":
        raise RunError(f"{st.manifest_path}: the feedback stage has not completed in {run} "
                       f"(run `cai run CONFIG --to feedback` first)")
    rows = st.rows()
    for n, r in enumerate(rows, 1):
        missing = [k for k in ("record_id", "status", "p_first", "principle_ids", "orders") if k not in r]
        if missing:
            raise RunError(f"{st.rows_path}:{n}: an AI preference row needs {', '.join(missing)}")
        for e in r["orders"]:
            if not {"principle_id", "p_ab", "p_ba", "status"} <= set(e):
                raise RunError(f"{st.rows_path}:{n}: an entry of 'orders' needs principle_id, p_ab, p_ba, status")
    return rows, st


# ---- the figures (pure) -------------------------------------------------------------------


def _side(p: float) -> int:
    return 0 if abs(p - 0.5) <= TIE else (1 if p > 0.5 else -1)


def same_side(p: float, q: float) -> float:
    """1 when `p` and `q` favour the same response, 0 when opposite ones, 0.5 when either is a tie."""
    a, b = _side(p), _side(q)
    return 0.5 if a == 0 or b == 0 else float(a == b)


def recombined(row: Mapping[str, Any], cfg: FeedbackConfig) -> tuple[str, str | None, float | None]:
    """The row's label recombined from its stored entries by the judge's own rule."""
    return combine(row["orders"], cfg)


def consistency(rows: Sequence[Mapping[str, Any]], cfg: FeedbackConfig) -> dict[str, Any]:
    """How many rows' stored status and p_first their stored entries reproduce under `combine`."""
    bad = []
    for r in rows:
        status, _, p = recombined(r, cfg)
        stored = r["p_first"]
        same = status == r["status"] and ((p is None and stored is None) or
                                          (p is not None and stored is not None and abs(p - stored) <= TOL))
        if not same:
            bad.append(r["record_id"])
    return {"checked": len(rows), "mismatched": len(bad), "mismatched_ids": bad[:20]}


def attribute(rows: Sequence[Mapping[str, Any]], constitution: Constitution, cfg: FeedbackConfig, *,
              margin: float = 0.1, top: int = 5, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-principle figures of the stored AI labels `rows` (see the module docstring). Every
    preference principle of `constitution` gets an entry, drawn or not; ids in the rows that the
    constitution lacks get one too (category None)."""
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    cat = {p.id: p.category for p in constitution.preference}
    ids = [p.id for p in constitution.preference]
    ids += sorted({e["principle_id"] for r in rows for e in r["orders"]} - set(ids))
    drawn: Counter[str] = Counter()
    not_ok: dict[str, Counter[str]] = defaultdict(Counter)
    swap: dict[str, list[float]] = defaultdict(list)
    orders_agree: dict[str, list[float]] = defaultdict(list)
    agree_label: dict[str, list[float]] = defaultdict(list)
    agree_others: dict[str, list[float]] = defaultdict(list)
    pair_p: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    sizes: Counter[int] = Counter()
    for r in rows:
        sizes[len(r["orders"])] += 1
        usable = []
        for e in r["orders"]:
            pid = e["principle_id"]
            drawn[pid] += 1
            if e["status"] != STATUS_OK:
                not_ok[pid][e["status"]] += 1
                continue
            p = swap_average(e["p_ab"], e["p_ba"])
            usable.append((pid, p))
            swap[pid].append(p)
            # p_ab is P(response 1) shown as (A), p_ba shown as (B): agreeing orders favour one response.
            orders_agree[pid].append(float(_side(e["p_ab"]) == _side(e["p_ba"])))
        if r["status"] != STATUS_OK:
            continue
        for k, (pid, p) in enumerate(usable):
            agree_label[pid].append(same_side(p, r["p_first"]))
            others = [q for j, (_, q) in enumerate(usable) if j != k]
            if others:
                agree_others[pid].append(same_side(p, sum(others) / len(others)))
        for (a, pa), (b, pb) in itertools.combinations(usable, 2):
            if a == b:
                continue
            key, val = ((a, b), (pa, pb)) if a < b else ((b, a), (pb, pa))
            pair_p[key].append(val)

    principles = []
    for pid in ids:
        ps = swap[pid]
        dec = [abs(p - 0.5) for p in ps]
        principles.append({
            "principle_id": pid, "category": cat.get(pid), "drawn": drawn[pid], "usable": len(ps),
            "not_ok_by_reason": dict(sorted(not_ok[pid].items())),
            "decisiveness": mean_ci(dec, n_boot, seed),
            "decisive": rate(sum(d > margin for d in dec), len(dec)),
            "mean_p_first": sum(ps) / len(ps) if ps else None,
            "orders_agree": rate(sum(orders_agree[pid]), len(orders_agree[pid])),
            "agree_label": rate(sum(agree_label[pid]), len(agree_label[pid])),
            "agree_others": rate(sum(agree_others[pid]), len(agree_others[pid])),
        })
    pairs = []
    for (a, b), vals in pair_p.items():
        dis = [1.0 - same_side(pa, pb) for pa, pb in vals]
        pairs.append({"principles": [a, b], "n": len(vals), "disagree": rate(sum(dis), len(dis)),
                      "mean_gap": sum(abs(pa - pb) for pa, pb in vals) / len(vals)})
    pairs.sort(key=lambda d: (-d["disagree"]["rate"], -d["n"], -d["mean_gap"], d["principles"]))
    ok = [r for r in rows if r["status"] == STATUS_OK]
    return rounded({
        "rows": len(rows), "ok": len(ok),
        "not_ok_by_reason": dict(sorted(Counter(f"{r['status']}:{r.get('reason')}" for r in rows
                                                if r["status"] != STATUS_OK).items())),
        "ensemble_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "margin": margin, "bootstrap": n_boot, "seed": seed,
        "feedback": plain(cfg),
        "consistency": consistency(rows, cfg),
        "principles": principles,
        "never_drawn": [p["principle_id"] for p in principles if p["drawn"] == 0],
        "disagreeing_pairs": pairs[:top],
        "co_labelled_pairs": len(pairs),
    })


def run(run_dir: str | Path, margin: float = 0.1, top: int = 5, n_boot: int = 1000) -> tuple[dict[str, Any], Path]:
    """Attribution of a run's stored labels, written atomically to `RUN/eval/attribution.json`."""
    cfg = run_config(run_dir)
    constitution = run_constitution(run_dir)
    rows, st = feedback_rows(run_dir)
    summary = attribute(rows, constitution, cfg.feedback, margin=margin, top=top, n_boot=n_boot, seed=cfg.seed)
    labelled_with = sorted({r.get("constitution_hash") for r in rows if r.get("constitution_hash")})
    summary = {"run": str(run_dir), "constitution": constitution.name, "constitution_hash": constitution.hash,
               "constitution_matches": labelled_with in ([], [constitution.hash]),
               "feedback_fingerprint": (st.manifest() or {}).get("fingerprint"),
               "feedback_rows_hash": st.content_hash(), **summary}
    out = Path(run_dir) / OUT
    write_json(out, summary)
    return summary, out


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _rate(d: Mapping[str, Any] | None) -> str:
    if not d or d.get("rate") is None:
        return "-"
    return f"{d['rate']:.2f} [{d['low']:.2f},{d['high']:.2f}]"


def table(s: Mapping[str, Any]) -> str:
    """The summary as plain text: one line per principle, then the most disagreeing pairs."""
    sizes = ", ".join(f"{v} with {k}" for k, v in s["ensemble_sizes"].items())
    c = s["consistency"]
    lines = [f"{s['rows']} labelled pairs ({s['ok']} ok; principles per pair: {sizes or 'none'}), "
             f"constitution {s.get('constitution', '?')} ({s.get('constitution_hash', '?')})",
             f"stored labels recombined from their entries: {c['checked'] - c['mismatched']}/{c['checked']} agree"]
    if s.get("constitution_matches") is False:
        lines.append("note: RUN/constitution.yaml is not the constitution these rows were labelled with; "
                     "categories and the never-drawn list come from it")
    w = max([len(p["principle_id"]) for p in s["principles"]] + [9])
    lines.append(f"{'principle':<{w}} {'category':<11} {'drawn':>5} {'usable':>6} {'mean|p-.5| [95%]':>22} "
                 f"{'>' + str(s['margin']) + ' [95%]':>18} {'orders agree':>18} {'agree label':>18} "
                 f"{'agree others':>18}")
    for p in s["principles"]:
        if p["drawn"] == 0:
            continue
        d = p["decisiveness"]
        dec = "-" if d["mean"] is None else f"{d['mean']:.3f} [{d['low']:.3f},{d['high']:.3f}]"
        lines.append(f"{p['principle_id']:<{w}} {p['category'] or '?':<11} {p['drawn']:>5} {p['usable']:>6} "
                     f"{dec:>22} {_rate(p['decisive']):>18} {_rate(p['orders_agree']):>18} "
                     f"{_rate(p['agree_label']):>18} {_rate(p['agree_others']):>18}")
    if s["never_drawn"]:
        lines.append(f"never drawn ({len(s['never_drawn'])}): {', '.join(s['never_drawn'])}")
    if s["disagreeing_pairs"]:
        lines.append("most disagreeing principles on the same pair (share on opposite sides of 0.5):")
        for d in s["disagreeing_pairs"]:
            lines.append(f"  {d['principles'][0]} vs {d['principles'][1]}: {_rate(d['disagree'])} over {d['n']} "
                         f"pairs, mean gap {_f(d['mean_gap'])}")
    else:
        lines.append("no pair was labelled by two different principles (feedback.principles is 1), so none can "
                     "disagree")
    if s["not_ok_by_reason"]:
        lines.append("not labelled: " + ", ".join(f"{k} {v}" for k, v in s["not_ok_by_reason"].items()))
    return "\n".join(lines)
