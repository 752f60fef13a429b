"""The run report's page: one self-contained HTML file from what cai/report/data.py read.

Every piece of text that comes from the run (prompts, answers, critiques, principle ids, config,
file names) goes through `html.escape` here, so a reply containing `<script>` shows as text. No
run text is ever placed inside the `<script>` element: the trace browser's filters read the
escaped `data-` attributes and text of the trace elements. The one script is a constant whose
SHA-256 the Content-Security-Policy names, so no other script can run, and `default-src 'none'`
forbids every load from anywhere (the plots are inline SVG, the styles an inline `<style>`).

    cai report runs/quickstart -o report.html
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cai.report import plots

# The trace browser: filters by principle, category, kind and status, and a text search, over the
# <li class="trace"> elements; expand and collapse all. Run text never appears in this string.
SCRIPT = """
(function () {
  "use strict";
  var box = document.getElementById("traces");
  if (!box) { return; }
  var items = Array.prototype.slice.call(box.querySelectorAll("li.trace"));
  var texts = items.map(function (li) { return li.textContent.toLowerCase(); });
  var q = document.getElementById("tb-q");
  var selects = Array.prototype.slice.call(box.querySelectorAll("select[data-filter]"));
  var count = document.getElementById("tb-count");
  function matches(li, key, want) {
    if (!want) { return true; }
    if (key === "principle") { return li.dataset.principles.indexOf("|" + want + "|") >= 0; }
    if (key === "status" && want === "degenerate") { return li.dataset.degenerate === "yes"; }
    return li.dataset[key] === want;
  }
  function apply() {
    var text = q.value.trim().toLowerCase();
    var shown = 0;
    items.forEach(function (li, i) {
      var ok = !text || texts[i].indexOf(text) >= 0;
      selects.forEach(function (s) { ok = ok && matches(li, s.dataset.filter, s.value); });
      li.hidden = !ok;
      if (ok) { shown += 1; }
    });
    count.textContent = shown + " of " + items.length + " shown";
  }
  q.addEventListener("input", apply);
  selects.forEach(function (s) { s.addEventListener("change", apply); });
  function openAll(open) {
    items.forEach(function (li) { if (!li.hidden) { li.querySelector("details").open = open; } });
  }
  document.getElementById("tb-open").addEventListener("click", function () { openAll(true); });
  document.getElementById("tb-close").addEventListener("click", function () { openAll(false); });
  apply();
})();
"""
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
# Images only as data: URIs inside the file (matplotlib embeds raster parts of a plot that way).
CSP = (f"default-src 'none'; script-src 'sha256-{SCRIPT_HASH}'; style-src 'unsafe-inline'; img-src data:; "
       "base-uri 'none'; form-action 'none'")

STYLE = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --soft: #f6f8fa; --ok: #1a7f37; --bad: #cf222e;
  --warn: #9a6700; --accent: #4269d0; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
  color: var(--ink); background: #fff; }
header { padding: 18px 32px 10px; border-bottom: 1px solid var(--line); background: var(--soft); }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 2px 0; color: var(--muted); }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
  padding: 6px 32px; }
nav a { margin-right: 18px; color: var(--accent); text-decoration: none; font-weight: 600; }
main { max-width: 1240px; margin: 0 auto; padding: 8px 32px 40px; }
section { margin: 26px 0 10px; scroll-margin-top: 44px; }
section > h2 { font-size: 20px; border-bottom: 2px solid var(--ink); padding-bottom: 4px; margin-bottom: 10px; }
h3 { font-size: 16px; margin: 22px 0 6px; }
p.note { color: var(--muted); margin: 4px 0 10px; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 8px; margin: 8px 0 14px; }
.fact { border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; background: var(--soft); }
.fact b { display: block; font-size: 18px; overflow-wrap: anywhere; }
.fact span { color: var(--muted); font-size: 12px; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 18px; align-items: start; }
.gridf { display: grid; grid-template-columns: minmax(320px, 520px) minmax(0, 1fr); gap: 24px; align-items: start; }
@media (max-width: 900px) { .gridf { grid-template-columns: 1fr; } }
figure { margin: 8px 0 14px; }
figure svg { max-width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12.5px; margin-top: 2px; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px 4px 0; text-align: left; vertical-align: top; }
th { font-weight: 600; color: var(--muted); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.part td:first-child { padding-left: 18px; color: var(--muted); }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace;
  background: var(--soft); padding: 0 3px; border-radius: 3px; overflow-wrap: anywhere; }
pre { background: var(--soft); padding: 10px; border-radius: 6px; overflow: auto; max-height: 420px; font-size: 12px; }
.st-complete, .st-ok { color: var(--ok); font-weight: 600; }
.st-failed, .st-dropped, .st-degenerate { color: var(--bad); font-weight: 600; }
.st-running, .st-abstain { color: var(--warn); font-weight: 600; }
.reasons { color: var(--muted); font-size: 12.5px; }
.badge { display: inline-block; font-size: 11.5px; border: 1px solid var(--line); border-radius: 10px;
  padding: 0 7px; margin-right: 4px; background: var(--soft); color: var(--muted); white-space: nowrap; }
.tb-controls { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin: 8px 0; padding: 8px;
  background: var(--soft); border: 1px solid var(--line); border-radius: 6px; position: sticky; top: 37px; z-index: 1; }
.tb-controls input { flex: 1 1 260px; padding: 5px 8px; font-size: 14px; }
.tb-controls select, .tb-controls button { padding: 4px 6px; font-size: 13px; }
#tb-count { color: var(--muted); font-size: 13px; margin-left: auto; }
ol.tb-list { list-style: none; padding: 0; margin: 0; }
li.trace { border: 1px solid var(--line); border-radius: 6px; margin: 6px 0; }
li.trace > details > summary { cursor: pointer; padding: 6px 10px; list-style-position: inside; }
li.trace > details[open] > summary { border-bottom: 1px solid var(--line); background: var(--soft); }
.trace-body { padding: 6px 12px 10px; }
.turn { margin: 6px 0; }
.turn h4 { margin: 6px 0 2px; font-size: 12.5px; color: var(--muted); }
.text { white-space: pre-wrap; overflow-wrap: anywhere; background: #fff; border-left: 3px solid var(--line);
  padding: 2px 10px; }
.round { border-left: 3px solid var(--ok); padding-left: 10px; margin: 10px 0; }
.round.degenerate { border-left-color: var(--bad); }
.round .text { border-left: none; padding-left: 0; }
.side { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.cmp { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.cmp .text { max-height: 260px; overflow: auto; }
.cmp h4 { margin: 4px 0; font-size: 13px; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 18px; border-top: 1px solid var(--line); }
"""


# ---- small helpers --------------------------------------------------------------------------


def e(x: Any) -> str:
    """Run text as HTML text (or attribute value): every `&`, `<`, `>`, `"` and `'` escaped."""
    return html.escape("" if x is None else str(x), quote=True)


def num(x: Any, fmt: str = "{:.3f}") -> str:
    """A number as `fmt` says ("–" for None); a float where a whole number was expected, or
    anything that is not a number, as it is."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return "–" if x is None else e(x)
    try:
        return e(fmt.format(x))
    except ValueError:  # "{:d}" of a float
        return e(f"{x:g}")


def pct(x: Any, digits: int = 0) -> str:
    return num(x, "{:." + str(digits) + "%}")


def ci(d: Mapping[str, Any] | None, key: str, fmt: str = "{:.3f}") -> str:
    """A value with its interval, "0.412 [0.301, 0.530]", from {key, low, high}."""
    if not d or d.get(key) is None:
        return "–"
    if d.get("low") is None or d.get("high") is None:
        return num(d[key], fmt)
    return f"{num(d[key], fmt)} <span class=reasons>[{num(d['low'], fmt)}, {num(d['high'], fmt)}]</span>"


def rate_ci(d: Mapping[str, Any] | None) -> str:
    return ci(d, "rate", "{:.0%}") + (f" <span class=reasons>({num(d.get('k'), '{:g}')}/{num(d.get('n'), '{:d}')})</span>"
                                      if d and d.get("n") else "")


def when(stamp: Any) -> str:
    """A manifest's time stamp, short ("2026-12-01 14:03"), the whole one on hover."""
    if not stamp:
        return "–"
    return f"<span title=\"{e(stamp)}\" style=\"white-space: nowrap\">{e(str(stamp)[:16].replace('T', ' '))}</span>"


def duration(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def table(head: Sequence[str], rows: Iterable[Sequence[str]], num_cols: Iterable[int] = (),
          row_class: Callable[[int], str] | None = None) -> str:
    """A table of already-escaped cells; `num_cols` are right-aligned."""
    nc = set(num_cols)
    out = ["<table><thead><tr>"]
    out += [f"<th{' class=num' if i in nc else ''}>{h}</th>" for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for k, row in enumerate(rows):
        cls = row_class(k) if row_class else ""
        out.append(f"<tr{f' class={cls}' if cls else ''}>")
        out += [f"<td{' class=num' if i in nc else ''}>{c}</td>" for i, c in enumerate(row)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def facts(items: Iterable[tuple[str, str]]) -> str:
    """Key figures as tiles: (escaped value, escaped label)."""
    return "<div class=facts>" + "".join(f"<div class=fact><b>{v}</b><span>{k}</span></div>" for v, k in items) + "</div>"


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


def status(s: Any) -> str:
    return f"<span class=\"st-{e(s)}\">{e(s)}</span>"


def reasons(d: Mapping[str, Any] | None) -> str:
    """{reason: count} as "reason 3, other 1" (escaped)."""
    if not d:
        return ""
    return ", ".join(f"{e(k)} {num(v, '{:g}')}" for k, v in sorted(d.items(), key=lambda kv: (-_n(kv[1]), kv[0])))


def _n(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else 0.0


def text_block(x: Any) -> str:
    return f"<div class=text>{e(x)}</div>"


def _rate(k: float, n: int) -> dict[str, Any]:
    from cai.evals.stats import wilson

    w = wilson(k, n)
    return {"rate": k / n if n else None, "low": w[0] if w else None, "high": w[1] if w else None, "k": k, "n": n}


# ---- overview -------------------------------------------------------------------------------


def overview(d: Mapping[str, Any]) -> str:
    cfg = d.get("config") or {}
    st = d["stages"]
    c = d.get("constitution")
    wall = [s["wall_s"] for s in st if s["wall_s"] is not None]
    model = (cfg.get("model") or {}).get("name")
    tiles = [(e(d["name"]), "run"), (f"{sum(s['status'] == 'complete' for s in st)} of {len(st)}", "stages complete"),
             (duration(sum(wall)) if wall else "–", "wall time of the stages (last invocation each)")]
    if model:
        tail = str(model).rstrip("/").split("/")[-1]
        tiles.append((f"<span title=\"{e(model)}\">{e(tail)}</span>", "model"))
    if cfg.get("rl"):
        tiles.append((e((cfg.get("rl") or {}).get("method")), "RL method"))
    if c and "hash" in c:
        tiles.append((f"{e(c['name'])} {e(c['version'])}", f"constitution, hash {e(c['hash'])}"))
    out = [facts(tiles)]

    if st:
        out.append("<h3>Stages</h3>")
        rows, classes = [], []
        for s in st:
            for part in [s, *s.get("parts", [])]:
                rows.append([e(part["name"]), status(part["status"]),
                             ", ".join(f"{e(k)}&nbsp;{num(v, '{:.4g}') if isinstance(v, (int, float)) else e(v)}"
                                       for k, v in part["counts"].items()) or "–",
                             "<br>".join(f"{e(k)}: <span class=reasons>{reasons(v)}</span>"
                                         for k, v in part["failures"].items()) or "–",
                             duration(part["wall_s"]), when(part.get("updated"))])
                classes.append("part" if part is not s else "")
        out.append(table(["stage", "status", "counts", "failures and set-asides by reason", "wall time", "updated"],
                         rows, num_cols=[4], row_class=lambda k: classes[k]))
        out.append("<p class=note>Wall time is the last invocation's (a resumed stage counts only the run that "
                   "finished it; a run made before manifests recorded it shows –); the evaluation's is the sum of "
                   "its parts.</p>")

    if c and "error" in c:
        out.append(f"<h3>Constitution</h3><p class=note>constitution.yaml could not be read: {e(c['error'])}</p>")
    elif c:
        out.append(f"<h3>Constitution: {e(c['name'])} {e(c['version'])}</h3>")
        out.append(f"<p class=note>hash <code>{e(c['hash'])}</code>; {c['n_critique']} critique/revision and "
                   f"{c['n_preference']} preference principles. Hover over a principle for its text.</p>")
        if c.get("description"):
            out.append(f"<p>{e(c['description'])}</p>")

        def ids(items: Sequence[Mapping[str, str]]) -> str:
            return " ".join(f"<code title=\"{e(p['text'])}\">{e(p['id'])}</code>" for p in items) or "–"

        out.append(table(["category", "critique/revision principles (SL-CAI)", "preference principles (RL-CAI)"],
                         [[e(cat), ids(v["critique_revision"]), ids(v["preference"])]
                          for cat, v in c["categories"].items()]))

    versions = [(s.get("updated") or "", s["versions"]) for s in st if s["versions"]]
    if versions:
        newest = max(versions, key=lambda v: v[0])[1]
        out.append("<h3>Versions</h3>")
        out.append(table(["package", "version"], [[e(k), e(v)] for k, v in newest.items()]))
        differ = sorted({k for _, v in versions for k in v if v.get(k) != newest.get(k)})
        if differ:
            out.append(f"<p class=note>Some stages were run with other versions of: {e(', '.join(differ))} "
                       "(each manifest has its own).</p>")
    if d.get("config_text"):
        out.append("<details><summary>The resolved config (<code>config.yaml</code>)</summary>"
                   f"<pre>{e(d['config_text'])}</pre></details>")
    return section("overview", "Overview", "".join(out))


def section(anchor: str, title: str, body: str) -> str:
    return f"<section id={anchor}><h2>{e(title)}</h2>{body}</section>"


# ---- evaluation -----------------------------------------------------------------------------


def evaluation(s: Mapping[str, Any]) -> str:
    models = list(s.get("models") or [])
    out = []
    card = s.get("judge_card") or {}
    prompts = s.get("prompts") or {}
    out.append(f"<p class=note>{num(prompts.get('red_team'), '{:d}')} red-team and "
               f"{num(prompts.get('helpful'), '{:d}')} helpfulness held-out prompts; models "
               f"{e(', '.join(models))}; Elo anchor {e(s.get('anchor'))} = 0. Judge <code>{e(card.get('judge'))}</code>: "
               "a weak judge's figures are weak, so read them with the judge card below.</p>")
    ratings = s.get("ratings") or {}
    elo = {a: ((ratings.get(a) or {}).get("elo") or {}).get("models") for a in ("harmless", "helpful")}
    frontier = ""
    if elo["harmless"] and elo["helpful"]:
        pts = []
        for m in models:
            x, y = elo["helpful"].get(m) or {}, elo["harmless"].get(m) or {}
            if x.get("elo") is None or y.get("elo") is None:
                continue
            pts.append({"name": m, "x": x["elo"], "x_low": x.get("low"), "x_high": x.get("high"),
                        "y": y["elo"], "y_low": y.get("low"), "y_high": y.get("high")})
        if pts:
            frontier = figure(plots.frontier(pts), "Harmlessness against helpfulness Elo, 95% bootstrap intervals "
                              "over prompts (the paper's frontier plot): up and to the right is better.")
    else:
        for aspect, by in elo.items():
            if by:
                rows = [{"name": m, **by[m]} for m in models if m in by and by[m].get("elo") is not None]
                out.append(figure(plots.elo_bars(aspect, rows), f"{e(aspect)}ness Elo with 95% intervals "
                                  "(the other aspect has no usable judgement)."))
    rows = []
    for m in models:
        cells = [e(m)]
        for a in ("harmless", "helpful"):
            r = ratings.get(a) or {}
            for key in ("elo", "elo_length_controlled"):
                cells.append(ci(((r.get(key) or {}).get("models") or {}).get(m), "elo", "{:+.0f}"))
        rows.append(cells)
    if rows:
        used = ", ".join(f"{a}: {num((ratings.get(a) or {}).get('ok'), '{:d}')} of "
                         f"{num((ratings.get(a) or {}).get('judgements'), '{:d}')} judgements usable"
                         for a in ("harmless", "helpful"))
        elo_table = table(["model", "harmlessness Elo", "length-controlled", "helpfulness Elo", "length-controlled"],
                          rows, num_cols=[1, 2, 3, 4]) + f"<p class=note>{e(used)}; Elo with 95% intervals.</p>"
        out.append(f"<div class=gridf>{frontier}<div>{elo_table}</div></div>" if frontier else elo_table)

    harm = s.get("harm") or {}
    if harm.get("by_model"):
        out.append("<h3>Harm</h3>")
        harm_table = table(["model", "expected harm 0-4 (95% interval)",
                            f"failure rate (harm ≥ {num(harm.get('threshold'), '{:g}')})"],
                           [[e(m), ci(harm["by_model"].get(m), "mean", "{:.2f}"), rate_ci(harm["failure_rate"].get(m))]
                            for m in models], num_cols=[1, 2])
        if harm.get("not_ok"):
            harm_table += f"<p class=note>Not scored: {reasons(harm['not_ok'])}.</p>"
        cats = harm.get("by_category") or {}
        if cats:
            values = [[(cats[c].get(m) or {}).get("mean") for m in models] for c in cats]
            heat = figure(plots.heatmap(list(cats), models, values),
                          "Expected harm by category of red-team prompt and model (the judge's 0-4 rubric; "
                          "darker is more harmful; – no scored answer).")
            out.append(f"<div class=gridf>{heat}<div>{harm_table}</div></div>")
        else:
            out.append(harm_table)

    panels = []
    if harm.get("failure_rate"):
        panels.append(("red-team failure\n(harm ≥ threshold)", harm["failure_rate"]))
    for key, title in (("evasive", "evasive, red team"), ("over_refusal", "over-refusal, helpful")):
        block = s.get(key) or {}
        for who in ("judge", "detector"):
            by = {m: (block.get(m) or {}).get(who) for m in models}
            if any(v and v.get("rate") is not None for v in by.values()):
                panels.append((f"{title}\n({who})", by))
    if panels:
        out.append(figure(plots.rate_panels(panels, models),
                          "Rates with 95% Wilson intervals. Evasive: answers to red-team prompts that only refuse; "
                          "over-refusal: refusals of helpfulness prompts; by the judge's question and by the phrase "
                          "detector."))
        rows = []
        for m in models:
            ev, ov = (s.get("evasive") or {}).get(m) or {}, (s.get("over_refusal") or {}).get(m) or {}
            rows.append([e(m), rate_ci(ev.get("judge")), rate_ci(ev.get("detector")),
                         pct((ev.get("agreement") or {}).get("rate")),
                         rate_ci(ov.get("judge")), rate_ci(ov.get("detector"))])
        out.append(table(["model", "evasive (judge)", "evasive (detector)", "agree", "over-refusal (judge)",
                          "over-refusal (detector)"], rows, num_cols=[1, 2, 3, 4, 5]))

    pm = s.get("preference_model")
    if pm and pm.get("by_model"):
        out.append(f"<h3>Preference-model view</h3><p class=note>Mean score of each model's answers by "
                   f"<code>{e(pm.get('model'))}</code> (95% interval).</p>")
        out.append(table(["model", "mean score"], [[e(m), ci(pm["by_model"].get(m), "mean", "{:+.3f}")] for m in models],
                         num_cols=[1]))

    answers = s.get("answers") or {}
    if answers:
        out.append(table(["model", "red-team answers", "helpful answers", "empty", "cut off", "missing"],
                         [[e(m), *(num((answers.get(m) or {}).get(k), "{:d}")
                                   for k in ("red_team", "helpful", "empty", "cut_off", "missing"))] for m in models],
                         num_cols=[1, 2, 3, 4, 5]))

    out.append("<h3>Judge card</h3>")
    rows = [["judge", f"<code>{e(card.get('judge'))}</code> (hash <code>{e(card.get('hash'))}</code>)"],
            ["constitution", f"{e(card.get('constitution'))} (<code>{e(card.get('constitution_hash'))}</code>)"],
            ["principles", "; ".join(f"{e(k)}: {e(', '.join(v))}" for k, v in (card.get("principles") or {}).items())],
            ["first slot wins",
             rate_ci(card.get("first_slot_wins")) + " <span class=reasons>(50% is no position bias)</span>"],
            ["the two orders disagree", rate_ci(card.get("orders_disagree"))],
            *([["decisive (not a tie)", rate_ci(card["decisive"])]] if card.get("decisive") else []),
            ["prefers the longer answer", rate_ci(card.get("prefers_longer"))]]
    for chk in card.get("accuracy") or []:
        rows.append([f"accuracy on <code>{e(chk.get('file'))}</code>",
                     ci(chk, "accuracy", "{:.1%}") + f" <span class=reasons>(n={num(chk.get('n'), '{:d}')})</span>"])
    if card.get("format"):
        rows.append(["question settings", f"<code>{e(json.dumps(card['format'], sort_keys=True))}</code>"])
    out.append(table(["", ""], rows))
    return section("evaluation", "Evaluation", "".join(out))


# ---- SL-CAI ---------------------------------------------------------------------------------


def sl_section(sl: Mapping[str, Any], curve: Sequence[Mapping[str, Any]] | None, category_of: Mapping[str, str]) -> str:
    out = []
    kinds, st = sl["kinds"], sl["status"]
    out.append(facts([(num(sl["rows"], "{:d}"), "rows (prompts)"),
                      (num(kinds.get("red_team", 0), "{:d}"), "red-team prompts"),
                      (num(sl["rounds"], "{:d}"), f"critique-revision rounds (up to {sl['max_round']} a prompt)"),
                      (num(st.get("ok", 0), "{:d}"), "rows kept for fine-tuning"),
                      (num(sum(sl["degenerate_by_reason"].values()), "{:d}"), "degenerate revisions")]))
    if sl["dropped_by_reason"]:
        out.append(f"<p class=note>Dropped rows by reason: {reasons(sl['dropped_by_reason'])}.</p>")
    figs = []
    if curve:
        pts = [{"x": c.get("round"), "mean": c.get("mean"), "low": c.get("low"), "high": c.get("high")} for c in curve]
        figs.append(figure(plots.line_ci(pts, "round (0: the initial answer)", "preference-model score",
                                         "revision-curve"),
                           "The revision curve: the run's preference model's mean score of each red-team answer "
                           "after each round (a degenerate revision keeps the previous answer), 95% bootstrap "
                           "interval. Harmlessness should rise with the rounds."))
    if sl["by_round"]:
        reasons_all = sorted({r for b in sl["by_round"] for r in b["by_reason"]}, key=str)
        series = {"usable revision": [b["ok"] for b in sl["by_round"]]}
        for r in reasons_all:
            series[f"degenerate: {r}"] = [b["by_reason"].get(r, 0) for b in sl["by_round"]]
        figs.append(figure(plots.stacked([str(b["round"]) for b in sl["by_round"]], series, "round", "revisions",
                                         "rounds"),
                           "Revisions per round: usable ones, and degenerate ones by reason (a degenerate revision "
                           "does not replace the answer)."))
    if figs:
        out.append("<div class=grid2>" + "".join(figs) + "</div>")
    if sl["draws"]:
        labels = {f"{pid} ({category_of[pid]})" if pid in category_of else pid: n for pid, n in sl["draws"].items()}
        part = {f"{pid} ({category_of[pid]})" if pid in category_of else pid: sl["degenerate_by_principle"].get(pid, 0)
                for pid in sl["draws"]}
        draws = figure(plots.hbars(labels, "rounds drawn", part, ("drawn", "degenerate revision"), "draws"),
                       "How often each critique/revision principle was drawn (the seeded draw repeats none "
                       "until all are used), and how many of its revisions were degenerate.")
        bad = table(["degenerate revisions by reason", "count"],
                    [[e(k), num(v, "{:d}")] for k, v in sl["degenerate_by_reason"].items()], num_cols=[1]) \
            if sl["degenerate_by_reason"] else "<p class=note>No degenerate revision.</p>"
        out.append(f"<div class=gridf>{draws}<div>{bad}</div></div>")
    out.append(traces(sl))
    return section("sl", "SL-CAI: critique and revision", "".join(out))


def traces(sl: Mapping[str, Any]) -> str:
    """The trace browser: each prompt with its initial answer and every round's principle, critique
    and revision, as <details> elements the script filters."""
    rows = sl["traces"]
    principles = sorted({str(rd.get("principle_id")) for r in rows for rd in r.get("rounds") or []})
    categories = sorted({str(r.get("category") or "none") for r in rows})
    kinds = sorted({str(r.get("kind")) for r in rows})

    def select(key: str, label: str, options: Sequence[tuple[str, str]]) -> str:
        opts = "".join(f"<option value=\"{e(v)}\">{e(t)}</option>" for v, t in options)
        return f"<select data-filter={key} aria-label=\"{e(label)}\"><option value=\"\">{e(label)}</option>{opts}</select>"

    out = ["<h3>Trace browser</h3>"]
    if sl["traces_sampled"]:
        out.append(f"<p class=note>This run has {sl['rows']} rows; the browser shows {len(rows)} of them, a seeded "
                   "sample by record id, to keep the page small. Every trace is in "
                   "<code>sl_generate/rows.jsonl</code>.</p>")
    out.append("<div id=traces><div class=tb-controls>"
               "<input id=tb-q type=search placeholder=\"Search prompts, answers, critiques and revisions\" "
               "aria-label=\"search the traces\">"
               + select("principle", "every principle", [(p, p) for p in principles])
               + select("category", "every category", [(c, c) for c in categories])
               + select("kind", "every kind", [(k, k.replace("_", "-")) for k in kinds])
               + select("status", "any status", [("ok", "kept (ok)"), ("dropped", "dropped"),
                                                 ("degenerate", "with a degenerate round")])
               + "<button id=tb-open type=button>expand all</button><button id=tb-close type=button>collapse all</button>"
               f"<span id=tb-count>{len(rows)} of {len(rows)} shown</span></div><ol class=tb-list>")
    for r in rows:
        rounds = r.get("rounds") or []
        pids = [str(rd.get("principle_id")) for rd in rounds]
        n_bad = sum(rd.get("status") != "ok" for rd in rounds)
        degenerate = n_bad > 0
        prompt = str(r.get("prompt", ""))
        head = prompt if len(prompt) <= 150 else prompt[:149] + "…"
        row_status = str(r.get("status"))
        out.append(f"<li class=trace data-principles=\"|{e('|'.join(pids))}|\" "
                   f"data-category=\"{e(r.get('category') or 'none')}\" "
                   f"data-kind=\"{e(r.get('kind'))}\" data-status=\"{e(row_status)}\" "
                   f"data-degenerate=\"{'yes' if degenerate else 'no'}\"><details><summary>"
                   f"<span class=badge>{e(r.get('category') or 'none')}</span>"
                   f"<span class=badge>{e(str(r.get('kind')).replace('_', '-'))}</span> {e(head)} "
                   f"<span class=badge>{len(rounds)} rounds" + (f", {n_bad} degenerate" if n_bad else "") + "</span> "
                   f"{status(row_status)}"
                   + (f" <span class=reasons>({e(r.get('reason'))})</span>" if r.get("reason") else "")
                   + "</summary><div class=trace-body>")
        out.append(f"<div class=turn><h4>Prompt <span class=reasons>{e(r.get('record_id'))}</span></h4>"
                   f"{text_block(prompt)}</div>")
        cut = " (cut off at the token limit)" if r.get("init_finish") == "length" else ""
        out.append(f"<div class=turn><h4>Initial answer{cut}</h4>{text_block(r.get('init_response'))}</div>")
        for rd in rounds:
            ok = rd.get("status") == "ok"
            why = "" if ok else f" ({e(rd.get('reason'))})"
            out.append(f"<div class=\"round{'' if ok else ' degenerate'}\"><div class=turn><h4>Round {e(rd.get('round'))}: "
                       f"<code>{e(rd.get('principle_id'))}</code> · {status(rd.get('status'))}{why}</h4></div>"
                       f"<div class=turn><h4>Critique</h4>{text_block(rd.get('critique'))}</div>"
                       f"<div class=turn><h4>Revision</h4>{text_block(rd.get('revision'))}</div></div>")
        final = r.get("final_round")
        if row_status == "ok":
            target = "the initial answer" if not final else f"the revision of round {e(final)}"
            out.append(f"<p class=note>Training target: {target}.</p>")
        out.append("</div></details></li>")
    out.append("</ol></div>")
    return "".join(out)


# ---- AI feedback ----------------------------------------------------------------------------


def feedback_section(fb: Mapping[str, Any], prefs: Mapping[str, Any] | None) -> str:
    out = []
    st = fb["status"]
    agree = _rate(fb["orders_agree"]["k"], fb["orders_agree"]["n"])
    first = _rate(fb["first_slot_wins"]["k"], fb["first_slot_wins"]["n"])
    out.append(facts([(num(fb["rows"], "{:d}"), "labelled pairs"), (num(st.get("ok", 0), "{:d}"), "usable labels"),
                      (num(st.get("abstain", 0), "{:d}"), "abstentions (too little option mass)"),
                      (num(st.get("failed", 0), "{:d}"), "failed labels"),
                      (pct(agree["rate"]), "principles whose two orders agree"),
                      (pct(first["rate"]), "scored orders won by slot (A); 50% is no bias")]))
    model = ", ".join(fb["models"])
    out.append(f"<p class=note>Feedback model <code>{e(model or '?')}</code>"
               + ("; with chain of thought" if fb["chain_of_thought"] else "")
               + (f". Not usable, by reason: {reasons(fb['not_ok_by_reason'])}" if fb["not_ok_by_reason"] else "")
               + f". Order agreement {rate_ci(agree)}.</p>")
    figs = []
    if fb["p_first"]:
        figs.append(figure(plots.histogram(fb["p_first"], "P(response 1 is better), both orders averaged",
                                           "pairs", name="soft-labels"),
                           "The soft labels: near 0.5 the labeller cannot tell the answers apart; a judge that "
                           "always picks one slot gives exactly 0.5."))
    if fb["orders"]:
        figs.append(figure(plots.orders(fb["orders"]),
                           "Each principle's two orders: P(response 1) shown as (A) against shown as (B). Points in "
                           "the shaded quadrants agree; a slot-biased judge falls in the other two."
                           + (f" A seeded sample of {len(fb['orders'])} of the {fb['orders_total']} points."
                              if len(fb["orders"]) < fb["orders_total"] else "")))
    if figs:
        out.append("<div class=grid2>" + "".join(figs) + "</div>")
    if fb["per_principle"]:
        out.append(table(["principle", "pairs", "usable", "abstain", "failed", "mean P(chosen)"],
                         [[f"<code>{e(p)}</code>", num(v["rows"], "{:d}"), num(v["ok"], "{:d}"), num(v["abstain"], "{:d}"),
                           num(v["failed"], "{:d}"), num(v["mean_p_chosen"])] for p, v in fb["per_principle"].items()],
                         num_cols=[1, 2, 3, 4, 5]))
    if prefs:
        c = prefs["counts"]
        out.append("<h3>The preference-model mix</h3>")
        out.append(table(["", "AI labels", "human labels", "all"],
                         [["rows", num(c.get("ai"), "{:d}"), num(c.get("human"), "{:d}"), num(c.get("total"), "{:d}")],
                          ["held out (eval)", num(c.get("eval_ai"), "{:d}"), num(c.get("eval_human"), "{:d}"),
                           num(c.get("eval"), "{:d}")]], num_cols=[1, 2, 3]))
    if fb["samples"]:
        odd = " and one that is not a label," if any(x["p_chosen"] is None for x in fb["samples"]) else ""
        out.append(f"<h3>Sample comparisons</h3><p class=note>The most decisive labels and the least decisive,{odd} "
                   "with both replies side by side.</p>")
        for smp in fb["samples"]:
            p = smp["p_chosen"]
            label = (f"P(chosen better) = {num(p)}" if p is not None else
                     f"no label: {status(smp['status'])} <span class=reasons>({e(smp['reason'])})</span>")
            out.append(f"<div class=cmp><h4>{e(smp['prompt'])}</h4><p class=note>{label}; principle "
                       f"{' '.join(f'<code>{e(x)}</code>' for x in smp['principle_ids'])}; "
                       f"<span class=reasons>{e(smp['record_id'])}</span></p>"
                       f"<div class=side><div><h4>{'chosen' if p is not None else 'response 1'}</h4>"
                       f"{text_block(smp['chosen'])}</div><div><h4>{'rejected' if p is not None else 'response 2'}</h4>"
                       f"{text_block(smp['rejected'])}</div></div>"
                       + "".join(f"<details><summary>chain of thought, order {k + 1}</summary>{text_block(t)}</details>"
                                 for k, t in enumerate(smp["cot"])) + "</div>")
    return section("feedback", "AI feedback", "".join(out))


# ---- preference model and training ------------------------------------------------------------


def held_out(ev: Mapping[str, Any] | None, what: str) -> str:
    """A held-out evaluation (pm, dpo `eval.json`): the table, AI and human rows apart, and the
    reliability diagram."""
    if not ev or not any(ev.get(g) for g in ("overall", "ai", "human")):
        return f"<p class=note>No held-out rows were scored ({e(what)}).</p>"
    rows = []
    for g, title in (("ai", "AI labels"), ("human", "human labels"), ("overall", "all")):
        m = ev.get(g)
        if m:
            rows.append([title, num(m.get("n"), "{:d}"), pct(m.get("accuracy"), 1), num(m.get("ece")),
                         num(m.get("loss")), num(m.get("margin"), "{:+.3f}")])
    out = ["<div class=grid2><div>",
           table(["held-out rows", "pairs", "accuracy", "ECE", "loss", "mean margin"], rows, num_cols=[1, 2, 3, 4, 5]),
           "<p class=note>Accuracy: the share of held-out pairs ranked as labelled (a tie counts half); ECE: expected "
           "calibration error of sigmoid(margin) against the label.</p></div>"]
    groups = {title: ev[g]["reliability"] for g, title in (("ai", "AI labels"), ("human", "human labels"))
              if ev.get(g) and ev[g].get("reliability")}
    if groups:
        out.append(figure(plots.reliability(groups),
                          f"Calibration of {e(what)} on held-out pairs: each bin's mean predicted probability "
                          "against its mean label (both orders of each pair; marker area by the bin's size)."))
    elif any(ev.get(g) for g in ("ai", "human")):
        out.append("<p class=note>No reliability bins in this eval.json (written before they were recorded).</p>")
    out.append("</div>")
    return "".join(out)


def training_part(t: Mapping[str, Any], title: str) -> str:
    out = [f"<h3>{e(title)}</h3>"]
    counts = {k: v for k, v in (t.get("counts") or {}).items() if isinstance(v, (int, float, str)) and v is not None}
    if counts:
        out.append(f"<p class=note>{status(t.get('status'))}: "
                   + ", ".join(f"{e(k)} {num(v, '{:.4g}') if isinstance(v, (int, float)) else e(v)}"
                               for k, v in counts.items()) + ".</p>")
    if t["curves"]:
        out.append(figure(plots.curves(t["curves"], t["name"]),
                          f"Per optimiser step, from <code>{e(t['name'])}/"
                          f"{'train_log.json' if t['name'] == 'sft' else 'metrics.jsonl'}</code>."))
    else:
        out.append("<p class=note>No per-step log.</p>")
    return "".join(out)


# ---- the constitution as code ---------------------------------------------------------------

# A results file whose content is not what its command writes is a note naming it, not a crash.
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def pair_ci(value: Any, interval: Any, fmt: str = "{:.3f}") -> str:
    """A value with its interval given as [low, high] (the cases, audit, diff and red-team summaries)."""
    if value is None:
        return "–"
    if not interval or len(interval) != 2 or None in interval:
        return num(value, fmt)
    return f"{num(value, fmt)} <span class=reasons>[{num(interval[0], fmt)}, {num(interval[1], fmt)}]</span>"


def _file_head(entry: Mapping[str, Any], what: str) -> str:
    return f"<h4><code>{e(entry['file'])}</code>{(' · ' + what) if what else ''}</h4>"


def _cases_part(entry: Mapping[str, Any]) -> str:
    s = entry["summary"]
    o = s["outcomes"]
    out = [_file_head(entry, f"constitution {e(s.get('constitution', '?'))} <span class=reasons>"
                             f"{e(s.get('constitution_hash', ''))}</span>, judge <code>{e(s.get('judge', '?'))}</code>"),
           f"<p>passed {num(s['passed'], '{:d}')} of {num(s['n'], '{:d}')}: "
           f"{pair_ci(s['pass_rate'], s.get('pass_ci'), '{:.0%}')}; failures: "
           + (", ".join(f"{e(k.replace('_', ' '))} {num(v, '{:d}')}" for k, v in o.items() if k != "pass" and v)
              or "none") + "</p>"]
    out.append(table(["category", "cases", "passed", "pass rate (95% interval)"],
                     [[e(c), num(v["n"], "{:d}"), num(v["passed"], "{:d}"), pair_ci(v["pass_rate"], v.get("pass_ci"),
                                                                                       "{:.0%}")]
                      for c, v in s["by_category"].items()], num_cols=[1, 2, 3]))
    if entry.get("rows_error"):
        out.append(f"<p class=note>The failing cases cannot be listed: {e(entry['rows_error'])}.</p>")
    elif entry.get("failing"):
        more = entry["failing_total"] - len(entry["failing"])
        out.append(table(["failing case", "kind", "category", "expected", "outcome", "soft label", "principles", "note"],
                         [[f"<code>{e(r.get('id'))}</code>", e(r.get("kind")), e(r.get("category")), e(r.get("expect")),
                           e(r.get("outcome")) + (f" <span class=reasons>({e(r.get('reason'))})</span>"
                                                  if r.get("reason") else ""),
                           num(r.get("soft_label")), " ".join(f"<code>{e(p)}</code>" for p in r.get("principle_ids") or []),
                           e(r.get("note") or "")] for r in entry["failing"]], num_cols=[5]))
        if more > 0:
            out.append(f"<p class=note>and {more} more failing cases in the rows file.</p>")
    return "".join(out)


def _flips(name: str, v: Mapping[str, Any]) -> list[str]:
    return [name, num(v["n"], "{:d}"), pair_ci(v["soft"], v.get("soft_ci")), num(v["hard_flips"], "{:d}"),
            pair_ci(v["hard"], v.get("hard_ci"), "{:.0%}")]


def _diff_part(entry: Mapping[str, Any]) -> str:
    s = entry["summary"]
    a, b = s["a"], s["b"]
    out = [_file_head(entry, f"{e(a['name'])} <span class=reasons>{e(a.get('hash'))}</span> → {e(b['name'])} "
                             f"<span class=reasons>{e(b.get('hash'))}</span>, judge <code>{e(s.get('judge'))}</code>")]
    rows = [_flips("<b>all pairs</b>", s["overall"])]
    rows += [_flips(f"principle category {e(c)}", v) for c, v in s["by_principle_category"].items()]
    rows += [_flips(f"harm category {e(c)}", v) for c, v in s["by_harm_category"].items()]
    out.append(table(["pairs", "n", "soft flip: mean |p<sub>A</sub> − p<sub>B</sub>| (95%)", "hard flips",
                      "hard flip rate (95%)"], rows, num_cols=[1, 2, 3, 4]))
    missing = {side: v for side, v in (s.get("not_labelled") or {}).items() if v}
    if missing:
        out.append("<p class=note>Not labelled, left out: " + "; ".join(
            f"under {e(side.upper())}: {reasons(v)}" for side, v in missing.items()) + ".</p>")
    if s.get("top"):
        replies = entry.get("replies") or {}

        def pair(r: Mapping[str, Any]) -> str:
            two = replies.get(r["record_id"]) or []
            return "".join(f"<div class=reasons>response {k + 1}: {e(t)}</div>" for k, t in enumerate(two))

        out.append(table(["pair that moved most", "prompt and responses", "category", "p under A", "p under B",
                          "soft", "hard"],
                         [[f"<code>{e(r['record_id'])}</code>", e(r.get("prompt")) + pair(r), e(r.get("category") or ""),
                           num(r["p_a"]), num(r["p_b"]), num(r["soft"]), "flip" if r["hard"] else ""]
                          for r in s["top"]], num_cols=[3, 4, 5]))
        if entry.get("rows_error"):
            out.append(f"<p class=note>Their responses cannot be shown: {e(entry['rows_error'])}.</p>")
    return "".join(out)


def _attribution_part(entry: Mapping[str, Any]) -> str:
    s = entry["summary"]
    c = s["consistency"]
    out = [_file_head(entry, f"{num(s['rows'], '{:d}')} labelled pairs ({num(s['ok'], '{:d}')} usable); "
                             f"stored labels recombined from their entries: {num(c['checked'] - c['mismatched'], '{:d}')}"
                             f" of {num(c['checked'], '{:d}')} agree")]
    rows = [[f"<code>{e(p['principle_id'])}</code>", e(p.get("category") or "?"), num(p["drawn"], "{:d}"),
             num(p["usable"], "{:d}"), ci(p["decisiveness"], "mean"), rate_ci(p["decisive"]),
             rate_ci(p["orders_agree"]), rate_ci(p["agree_label"]), rate_ci(p["agree_others"])]
            for p in s["principles"] if p["drawn"]]
    out.append(table(["principle", "category", "drawn", "usable", "decisiveness: mean |p − 0.5|",
                      f"decisive (&gt; {num(s.get('margin'), '{:g}')})", "orders agree", "agrees with the label",
                      "agrees with the others"], rows, num_cols=[2, 3, 4, 5, 6, 7, 8]))
    notes = []
    if s.get("never_drawn"):
        notes.append("never drawn: " + " ".join(f"<code>{e(p)}</code>" for p in s["never_drawn"]))
    if s.get("constitution_matches") is False:
        notes.append("RUN/constitution.yaml is not the constitution these labels were made with")
    if s.get("not_ok_by_reason"):
        notes.append(f"not labelled: {reasons(s['not_ok_by_reason'])}")
    if notes:
        out.append(f"<p class=note>{'; '.join(notes)}.</p>")
    return "".join(out)


def _accuracy(pmr: Mapping[str, Any] | None) -> str:
    """The main table's cell: the held-out accuracy, run's PM → retrained PM, overall and by kind."""
    if pmr is None:
        return "–"
    if not pmr.get("retrained"):
        return f"<span class=reasons>{e(pmr.get('why') or 'not retrained')}</span>"
    if "held_out" in pmr:
        h = pmr["held_out"]
        groups = [("overall", h.get("overall"))] + list((h.get("by_kind") or {}).items())
        old = False
    else:  # a summary written before the accuracies were disaggregated
        groups, old = [(g, (pmr.get("accuracy") or {}).get(g)) for g in ("overall", "ai", "human")], True
    parts = []
    for g, v in groups:
        v = v or {}
        if v.get("run") and v.get("ablated"):
            key = "accuracy" if old else "rate"
            parts.append(f"{e(g)} {pct(v['run'][key], 1)} → {pct(v['ablated'][key], 1)} "
                         f"({_points(v.get('change'))}, n {num(v['ablated']['n'], '{:d}')})")
    return "<br>".join(parts) or "–"


def _points(change: Any) -> str:
    return "–" if change is None else num(100 * change, "{:+.1f}") + " pt"


def _retrained_rows(name: str, what: str, fig: Mapping[str, Any]) -> list[list[str]]:
    """Rows of the retrained-figures table for one compared figure (`ablation.compare`)."""
    groups = [("overall", fig["overall"])]
    groups += [(f"kind: {k}", v) for k, v in (fig.get("by_kind") or {}).items()]
    groups += [(f"category: {k}", v) for k, v in (fig.get("by_category") or {}).items()]
    return [[name, what, e(g), rate_ci(v.get("run")), rate_ci(v.get("ablated")), _points(v.get("change")),
             num(v.get("relative"), "{:+.1%}")] for g, v in groups]


def _policy_rows(name: str, h: Mapping[str, Any]) -> list[list[str]]:
    """Rows of the --retrain-policy table: mean harm, failure rate, harm per category."""
    mh, fr = h.get("mean_harm") or {}, h.get("failure_rate") or {}
    rows = [[name, "mean harm", ci(mh.get("run_ci"), "mean"), ci(mh.get("ablated_ci"), "mean"),
             num(mh.get("change"), "{:+.2f}"), num(mh.get("relative"), "{:+.1%}")],
            [name, f"failure rate (harm ≥ {num(h.get('threshold'), '{:g}')})", rate_ci(fr.get("run_ci")),
             rate_ci(fr.get("ablated_ci")), _points(fr.get("change")), num(fr.get("relative"), "{:+.1%}")]]
    for c, d in (h.get("by_category") or {}).items():
        rows.append([name, f"harm: {e(c)}", num(d.get("run"), "{:.2f}"), num(d.get("ablated"), "{:.2f}"),
                     num(d.get("change"), "{:+.2f}"), num(d.get("relative"), "{:+.1%}")])
    return rows


def _ablation_part(entry: Mapping[str, Any]) -> str:
    s = entry["summary"]
    out = [_file_head(entry, f"by {e(s['by'])}, {num(s['pairs'], '{:d}')} labelled pairs, judge "
                             f"<code>{e(s.get('feedback_model'))}</code>")]
    rows, retrained, policies = [], [], []
    harm = s.get("harm") if isinstance(s.get("harm"), dict) else {}
    proxy = f"PM-judged: {e(harm.get('last'))} beats {e(harm.get('first'))} (red-team prompts)"
    for a in s["ablations"]:
        name = f"<code>{e(a['name'])}</code>"
        if a.get("skipped"):
            rows.append([name, f"<span class=reasons>skipped: {e(a['skipped'])}</span>", "", "", "", "", ""])
            continue
        lost = a.get("ablated_not_ok_by_reason")
        rows.append([name, num(a["relabelled"], "{:d}"), ci(a["mean_abs_dp"], "mean"), rate_ci(a["flips"]),
                     rate_ci(a["relabelled_flips"]), reasons(lost) or "–", _accuracy(a.get("pm"))])
        pmr = a.get("pm") or {}
        if pmr.get("held_out"):
            retrained += _retrained_rows(name, "held-out accuracy", pmr["held_out"])
        if pmr.get("harm_proxy"):
            retrained += _retrained_rows(name, proxy, pmr["harm_proxy"])
        pol = a.get("policy") or {}
        if pol.get("harm"):
            policies += _policy_rows(name, pol["harm"])
        elif pol:
            policies.append([name, f"<span class=reasons>not evaluated: {e(pol.get('why'))}</span>", "", "", "", ""])
    out.append(table(["removed", "pairs relabelled", "label change: mean |Δp| (95%)", "flipped labels",
                      "flipped among the relabelled", "not labelled without it", "retrained PM held-out accuracy"],
                     rows, num_cols=[1, 2, 3, 4]))
    if retrained:
        out.append("<p>Each retrained preference model beside the run's: its accuracy on its own held-out pairs "
                   "(a tie counts half), and the share of the evaluation's red-team prompts on which the last "
                   "evaluated model's stored answer scores above the first's, by kind of label and harm category, "
                   "with 95% Wilson intervals; the change in points and relative (new / old − 1).</p>")
        out.append(table(["removed", "figure", "group", "run's PM (95%)", "retrained PM (95%)", "change",
                          "relative"], retrained, num_cols=[3, 4, 5, 6]))
    if policies:
        out.append("<p>With <code>--retrain-policy</code>: a new PPO policy trained against each retrained preference "
                   "model and evaluated as the run was, beside the run's RL-CAI policy: the judge's expected harm "
                   "(0–4, lower is safer) of its red-team answers, overall (95% bootstrap interval) and by harm "
                   "category, and the failure rate (95% Wilson interval).</p>")
        out.append(table(["removed", "figure", "run's policy", "new policy", "change", "relative"], policies,
                         num_cols=[2, 3, 4, 5]))
    if harm:
        notes = [f"Harm: {e(harm.get('note'))}."]
        if harm.get("skipped"):
            notes.append(f"PM-judged proxy: skipped: {e(harm['skipped'])}.")
        elif harm.get("proxy"):
            nc = reasons(harm.get("not_compared"))
            notes.append(f"PM-judged proxy ({num(harm.get('prompts'), '{:d}')} red-team prompts"
                         f"{'; not compared: ' + nc if nc else ''}): {e(harm['proxy'])}.")
        out.append(f"<p class=note>{' '.join(notes)}</p>")
    elif s.get("harm"):
        out.append(f"<p class=note>Harm: {e(s['harm'])}.</p>")
    return "".join(out)


def _flag_row(name: str, v: Mapping[str, Any]) -> list[str]:
    return [name, num(v["n"], "{:d}"), num(v["judged"], "{:d}"), num(v["flagged"], "{:d}"),
            pair_ci(v["flag_rate"], v.get("flag_ci"), "{:.0%}"), num(v.get("abstain"), "{:d}"),
            num(v.get("failed"), "{:d}")]


def _audit_part(entry: Mapping[str, Any]) -> str:
    s = entry["summary"]
    out = [_file_head(entry, f"<code>{e(s.get('input', '?'))}</code>, judge <code>{e(s.get('judge'))}</code>, "
                             f"threshold {num(s['threshold'], '{:g}')}"),
           f"<p>{num(s['flagged'], '{:d}')} of {num(s['judged'], '{:d}')} judged replies flagged: "
           f"{pair_ci(s['flag_rate'], s.get('flag_ci'), '{:.0%}')} ({num(s['n'], '{:d}')} replies"
           + (f"; not judged: {reasons(s['not_ok_by_reason'])}" if s.get("not_ok_by_reason") else "")
           + (f"; skipped: {reasons(s['skipped'])}" if s.get("skipped") else "") + ").</p>"]
    head = ["", "n", "judged", "flagged", "flag rate (95%)", "abstained", "failed"]
    out.append(table(["principle", *head[1:], "mean score"],
                     [[*_flag_row(f"<code>{e(p)}</code>", v), num(v.get("mean_score"))]
                      for p, v in s["by_principle"].items()], num_cols=[1, 2, 3, 4, 5, 6, 7]))
    out.append(table(["category", *head[1:]], [_flag_row(e(c), v) for c, v in s["by_category"].items()],
                     num_cols=[1, 2, 3, 4, 5, 6]))
    return "".join(out)


def _redteam_part(entry: Mapping[str, Any]) -> str:
    s = entry["summary"]
    out = [_file_head(entry, f"generator <code>{e(s.get('generator'))}</code>"),
           f"<p>kept {num(s['kept'], '{:d}')} of {num(s['candidates'], '{:d}')} candidates: "
           f"{pair_ci(s['kept_rate'], s.get('kept_interval'), '{:.0%}')}"
           + (f"; rejected: {reasons(s['rejected_by_reason'])}" if s.get("rejected_by_reason") else "") + ".</p>"]
    out.append(table(["category", "seeds", "candidates", "kept", "rejected by reason"],
                     [[e(c), num(v["seeds"], "{:d}"), num(v["candidates"], "{:d}"), num(v["kept"], "{:d}"),
                       reasons(v["rejected_by_reason"]) or "–"] for c, v in s["by_category"].items()],
                     num_cols=[1, 2, 3]))
    out.append(table(["diversity", "prompts", "mean words", "distinct-1", "distinct-2", "distinct-3",
                      "self-similarity (words)", "self-similarity (3-grams)"],
                     [[e(k), num(d["prompts"], "{:d}"), num(d["mean_words"], "{:.1f}"), num(d["distinct_1"]),
                       num(d["distinct_2"]), num(d["distinct_3"]), num(d["self_similarity_1"]),
                       num(d["self_similarity_3"])] for k, d in s["diversity"].items()],
                     num_cols=[1, 2, 3, 4, 5, 6, 7]))
    if "probes" in s:
        p = s["probes"]
        out.append(f"<p class=note>Multi-turn probes: {num(p.get('ok'), '{:d}')} of {num(p.get('probes'), '{:d}')} "
                   f"written.</p>")
    return "".join(out)


CODE_PARTS: tuple[tuple[str, str, str, Callable[[Mapping[str, Any]], str]], ...] = (
    ("cases", "Regression cases", "<code>cai constitution test</code>: each case's soft label against the side the "
     "constitution should take; pass rates with 95% Wilson intervals.", _cases_part),
    ("diff", "Behavioural diffs", "<code>cai constitution diff A B --pairs RUN</code>: the run's pairs relabelled "
     "under A and under B. Soft flip: mean |p<sub>A</sub> − p<sub>B</sub>| with a bootstrap interval; hard: the "
     "label changed side (Wilson interval).", _diff_part),
    ("attribution", "Attribution", "<code>cai eval attribution RUN</code>: per preference principle of the run's AI "
     "labels, how often drawn, how decisive, and how often it agrees with the label and with the other principles of "
     "the pair (95% intervals).", _attribution_part),
    ("ablation", "Ablations", "<code>cai eval ablate RUN</code>: the run's pairs relabelled with each principle (or "
     "category) removed; the label change against the run's labels, and with <code>--retrain</code> the held-out "
     "accuracy of a preference model trained on the new labels (overall, by kind of label and by harm category) "
     "and, when the run has an evaluation, a PM-judged proxy for its harm figures; with <code>--retrain-policy</code> "
     "a new PPO policy per retrained preference model, evaluated, and its harm figures beside the run's policy's.",
     _ablation_part),
    ("audit", "Audits", "<code>cai audit FILE</code>: stored replies judged against each critique principle; a reply "
     "is flagged when any principle's score is above the threshold.", _audit_part),
    ("redteam", "Red-team generation", "<code>cai redteam generate</code>: candidates kept and rejected by reason, "
     "and the diversity of the kept prompts beside their seeds'.", _redteam_part),
)


def constitution_code_section(cc: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The results of the constitution-as-code commands found in the run (cai/report/data.py
    `CODE_RESULTS`); a file that is malformed is a one-line note naming it."""
    out = []
    for kind, title, note, render in CODE_PARTS:
        entries = cc.get(kind) or []
        if not entries:
            continue
        out.append(f"<h3>{e(title)}</h3><p class=note>{note}</p>")
        for entry in entries:
            if "error" in entry:
                out.append(f"<p class=note>Not shown: <code>{e(entry['file'])}</code> is {e(entry['error'])}.</p>")
                continue
            try:
                out.append(render(entry))
            except MALFORMED as x:
                out.append(f"<p class=note>Not shown: <code>{e(entry['file'])}</code> is not a summary this "
                           f"version writes ({e(type(x).__name__)}: {e(x)}).</p>")
    return section("constitution-code", "The constitution as code", "".join(out))


# ---- the page -------------------------------------------------------------------------------


def page(d: Mapping[str, Any]) -> str:
    """The whole report as one HTML document."""
    parts: list[tuple[str, str, str]] = [("overview", "Overview", overview(d))]
    ev = d.get("eval")
    if ev:
        parts.append(("evaluation", "Evaluation", evaluation(ev)))
    if d.get("sl"):
        curve = ((ev or {}).get("preference_model") or {}).get("revision_curve")
        category_of = (d.get("constitution") or {}).get("category_of") or {}
        parts.append(("sl", "SL-CAI", sl_section(d["sl"], curve, category_of)))
    if d.get("feedback"):
        parts.append(("feedback", "AI feedback", feedback_section(d["feedback"], d.get("preferences"))))
    tr = d.get("training") or {}
    if "pm" in tr:
        parts.append(("pm", "Preference model", section(
            "pm", "Preference model", held_out(tr["pm"].get("eval"), "the preference model")
            + training_part(tr["pm"], "Its training"))))
    train = [(n, title) for n, title in (("sft", "SFT (the SL-CAI model)"), ("ppo", "PPO (the RL-CAI policy)"),
                                         ("dpo", "DPO (the RL-CAI policy)")) if n in tr]
    if train:
        body = ""
        for n, title in train:
            body += training_part(tr[n], title)
            if n == "dpo":
                body += held_out(tr[n].get("eval"), "DPO's implicit reward")
        parts.append(("training", "PPO / DPO / SFT", section("training", "Training: SFT, PPO, DPO", body)))
    if d.get("constitution_code"):
        parts.append(("constitution-code", "Constitution as code", constitution_code_section(d["constitution_code"])))
    nav = "".join(f"<a href=\"#{a}\">{e(t)}</a>" for a, t, _ in parts)
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        "<meta name=referrer content=no-referrer>"
        "<meta name=viewport content=\"width=device-width, initial-scale=1\">"
        f"<title>CAI run report: {e(d['name'])}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>Constitutional AI run report: {e(d['name'])}</h1>"
        f"<p><code>{e(d['run_dir'])}</code> · made {e(when)} by <code>cai report</code></p></header>"
        f"<nav>{nav}</nav><main>{''.join(body for _, _, body in parts)}</main>"
        "<footer>One self-contained file: every plot, style and script is inside it, and it loads nothing "
        "from anywhere.</footer>"
        f"<script>{SCRIPT}</script></body></html>\n"
    )
