"""The `cai` command: argparse sub-commands, each one hop to the code that does the work.

    cai run configs/quickstart.yaml [key=value ...] [--from STAGE] [--to STAGE]
    cai show runs/quickstart
    cai report runs/quickstart [-o report.html]
    cai constitution validate|show|diff|convert ...
    cai constitution diff A B [--pairs RUN [key=value ...] [--limit N]]
    cai constitution test CONSTITUTION [CASES] [-c CONFIG] [key=value ...] [--min-pass R] [--out FILE]
    cai chat MODEL [-c CONFIG] [key=value ...] [-p PROMPT]
    cai serve MODEL [-c CONFIG] [key=value ...] [--host 127.0.0.1] [--port 8000] [--api-key-env NAME]
              [--request-timeout S]
    cai model fetch smollm2-135m
    cai eval labeller FILE [FILE ...] [-c CONFIG] [key=value ...] [--limit N]
    cai eval models [CONFIG] [key=value ...]
    cai eval attribution RUN [--margin 0.1]
    cai eval ablate RUN [--by principle|category] [--only NAME] [--retrain | --retrain-policy] [key=value ...]
    cai redteam generate [CONFIG] [key=value ...]
    cai audit FILE [-c CONFIG] [key=value ...] [--threshold 0.5] [--principle ID] [--out DIR]
    cai audit serve --upstream URL [-c CONFIG] [key=value ...] [--port 8100] [--enforce] [--queue-size N]

Every command that uses a model takes the config form of `cai run`: a YAML config (`-c`, or the
defaults) with dotted `key=value` overrides laid over it, e.g. `model.backend=openai`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai.config import ConfigError, PipelineConfig, load_config
from cai.constitution import ConstitutionError


def _short(text: Any, width: int = 160) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= width else s[: width - 1] + "…"


# ---- the config form -----------------------------------------------------------------------


def split_overrides(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the other words, the key=value overrides), each in command-line order: a word containing
    "=" that is not an existing path is an override, so paths and overrides may mix."""
    rest: list[str] = []
    overrides: list[str] = []
    for w in words:
        (overrides if "=" in w and not Path(w).exists() else rest).append(w)
    return rest, overrides


def command_config(args: argparse.Namespace, words: Sequence[str]) -> tuple[list[str], PipelineConfig]:
    """A model command's positional words and its config: `-c CONFIG` (or the defaults) with the
    key=value ones among `words` laid over it, unknown keys rejected."""
    rest, overrides = split_overrides(words)
    return rest, load_config(args.config, overrides)


def _one_model(rest: list[str], command: str) -> str:
    if len(rest) != 1:
        raise ValueError(f"{command} takes one MODEL and key=value overrides, got {' '.join(rest) or 'no MODEL'}")
    return rest[0]


def _add_overrides(p: argparse.ArgumentParser, config_flag: bool = True) -> None:
    """The key=value words of a command that uses a model (they may mix with its positional words
    and follow its flags), and `-c/--config` unless the config is positional."""
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the config, e.g. model.backend=openai")
    if config_flag:
        p.add_argument("-c", "--config", help="YAML config (the defaults when omitted)")


# ---- run / show ----------------------------------------------------------------------------


def run_config(args: argparse.Namespace) -> PipelineConfig:
    """The config of a parsed `cai run`: its CONFIG file (or the defaults, as in `cai run
    sl.rounds=2`) with its key=value overrides laid over it."""
    rest, overrides = split_overrides([*([args.config] if args.config else []), *args.overrides])
    if len(rest) > 1:
        raise ConfigError(f"cai run takes one config file and key=value overrides; '{rest[1]}' is neither")
    return load_config(rest[0] if rest else None, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from cai import pipeline

    cfg = run_config(args)
    done = pipeline.run(cfg, start=args.start, stop=args.stop, allow_changed=args.allow_config_change)
    if os.environ.get("RANK", "0") != "0":  # under `accelerate launch` the main process reports
        return 0
    print(f"\nrun directory: {cfg.run_dir}")
    for name, st in done.items():
        m = st.manifest() or {}
        print(f"  {name:<12} {m.get('status', '?'):<9} {json.dumps(m.get('counts', {}))}")
    report = Path(cfg.run_dir) / "report.html"
    if report.exists():
        print(f"\nrun report: {report}")
    if "sft" in done:
        print(f"\nfine-tuned model: {done['sft'].dir / 'model'}\ntry it: cai chat {done['sft'].dir / 'model'}")
    return 0


def _sample(stage: str, row: dict[str, Any]) -> list[str]:
    lines = []
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, list):  # conversational: show the last human turn
            prompt = prompt[-1]["content"] if prompt else ""
        lines.append(f"prompt:   {_short(prompt)}")
    if stage == "sl_generate":
        lines.append(f"initial:  {_short(row.get('init_response', ''))}")
        for rd in row.get("rounds", []):
            flag = "" if rd["status"] == "ok" else f"  [{rd['reason']}]"
            lines.append(f"round {rd['round']} ({rd['principle_id']}){flag}")
            lines.append(f"  critique: {_short(rd['critique'])}")
            lines.append(f"  revision: {_short(rd['revision'])}")
        lines.append(f"status:   {row.get('status')}" + (f" ({row['reason']})" if row.get("reason") else ""))
    elif stage == "pairs":
        for k, (text, finish) in enumerate(zip(row["responses"], row.get("finishes", ["", ""]))):
            lines.append(f"sample {k + 1}: {_short(text)}" + ("  [cut off]" if finish == "length" else ""))
        if row.get("status") != "ok":
            lines.append(f"set aside: {row.get('reason')}")
    elif "chosen" in row:
        p = row.get("p_chosen")
        label = f"{row.get('label_source', '?')} label, P(chosen better) = {p:.3f}" if p is not None else \
            f"no label: {row.get('status')} ({row.get('reason')})"
        if row.get("principle_ids"):
            label += f", principle {', '.join(row['principle_ids'])}"
        lines.append(label)
        lines.append(f"chosen:   {_short(row['chosen'][-1]['content'])}")
        lines.append(f"rejected: {_short(row['rejected'][-1]['content'])}")
    elif "messages" in row:
        lines.append(f"answer:   {_short(row['messages'][-1]['content'])}")
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    from cai.evals.suite import render
    from cai.pipeline import FOLDERS, STAGES
    from cai.rundir import Stage

    run = Path(args.run)
    if not run.is_dir():
        print(f"error: {run}: no such run directory", file=sys.stderr)
        return 2
    print(f"run: {run}")
    cfg_path = run / "config.yaml"
    if cfg_path.exists():
        print(f"config: {cfg_path}")
    for name in STAGES:
        st = Stage.view(run, FOLDERS.get(name, name))
        m = st.manifest()
        if m is None:
            continue
        print(f"\n== {name}: {m['status']}  (fingerprint {m['fingerprint']}, updated {m.get('updated')})")
        for k, v in m.get("counts", {}).items():
            print(f"   {k}: {v}")
        for k in ("constitution_hash", "model_dir"):
            if k in m:
                print(f"   {k}: {m[k]}")
        for kind, ev in (m.get("eval") or {}).items():  # held-out figures of a trained model
            if ev:
                print(f"   eval {kind}: " + ", ".join(f"{a} {b:.3f}" if isinstance(b, float) else f"{a} {b}"
                                                     for a, b in ev.items() if not isinstance(b, (list, dict))))
        rows = st.rows() if st.rows_path.exists() else []
        for row in rows[: args.rows]:
            print(f"   -- {row.get('record_id')} ({row.get('kind', '')})")
            for line in _sample(name, row):
                print(textwrap.indent(line, "      "))
    summary = run / "eval" / "summary.json"
    if summary.exists():
        print("\n" + render(json.loads(summary.read_text())))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cai.report import write_report

    path = write_report(args.run, args.output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


# ---- constitution --------------------------------------------------------------------------


def cmd_constitution(args: argparse.Namespace) -> int:
    from cai import constitution as C

    if args.action == "validate":
        bad = 0
        for path in args.paths:
            try:
                c = C.load(path)
                print(f"ok  {path}: {len(c.critique_revision)} critique/revision principles, "
                      f"{len(c.preference)} preference principles, hash {c.hash}")
            except ConstitutionError as e:
                bad += 1
                print(f"ERR {e}", file=sys.stderr)
        return 1 if bad else 0
    if args.action == "show":
        c = C.load(args.path)
        print(f"{c.name} {c.version}  hash {c.hash}  ({c.source})")
        if c.description:
            print(textwrap.fill(c.description, 100))
        for title, items in (("critique/revision", c.critique_revision), ("preference", c.preference)):
            print(f"\n{title} principles ({len(items)}):")
            for p in items:
                print(f"  [{p.category}] {p.id}")
                for field in ("critique", "revision", "instruction"):
                    if hasattr(p, field):
                        print(textwrap.fill(getattr(p, field), 100, initial_indent=f"      {field}: ",
                                            subsequent_indent=" " * 8))
        print(f"\nfew-shot: {len(c.critique_examples)} critique/revision, {len(c.preference_examples)} "
              f"multiple-choice, {len(c.cot_examples)} chain-of-thought")
        return 0
    if args.action == "diff":
        if args.overrides and not args.pairs:
            raise ValueError(f"cai constitution diff: key=value overrides ({' '.join(args.overrides)}) set the judge of "
                             "the behavioural diff and need --pairs RUN")
        if args.pairs is None and (args.limit is not None or args.out):
            raise ValueError("cai constitution diff: --limit and --out belong to the behavioural diff; give --pairs RUN")
        a, b = C.load(args.a), C.load(args.b)
        d = C.diff(a, b)
        print(f"--- {a.source} ({a.hash})\n+++ {b.source} ({b.hash})")
        print(d.render())
        if args.pairs is not None:
            behavioural_diff(args, a, b)
        return 0 if d.empty else 1
    if args.action == "test":
        return constitution_test(args)
    if args.action == "convert":
        from cai.convert import convert

        c = convert(args.src, args.format)
        c.save(args.output)
        print(f"wrote {args.output}: {len(c.critique_revision)} critique/revision and {len(c.preference)} "
              f"preference principles, hash {c.hash}")
        return 0
    raise AssertionError(args.action)


def behavioural_diff(args: argparse.Namespace, a: Any, b: Any) -> None:
    """`cai constitution diff A B --pairs RUN`: relabel the run's pairs under A and B with the run's
    feedback settings (and the key=value overrides), resumably under RUN/constitution_diff/, and print
    the flip rates (cai/evals/behaviour.py)."""
    from cai.evals import behaviour

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.top < 0:
        raise ValueError("--top must be >= 0")
    report, rows, stage, changed = behaviour.run(args.pairs, a, b, args.overrides, args.limit, args.top)
    if changed:
        print(f"note: {stage.dir} held a diff made with other inputs ({'; '.join(changed)}); started afresh",
              file=sys.stderr)
    print("\n" + behaviour.table(report))
    print(f"\nrows and report in {stage.dir}")
    if args.out:
        rows_path = behaviour.write(args.out, report, rows)
        print(f"wrote {args.out} and {rows_path}")


def constitution_test(args: argparse.Namespace) -> int:
    """`cai constitution test CONSTITUTION [CASES] [key=value ...]`: run the regression cases
    (cai/evals/cases.py); exit 1 when the pass rate is under --min-pass."""
    from tqdm import tqdm

    from cai import constitution as C
    from cai.evals import cases as cases_mod
    from cai.lm import load_lm
    from cai.pipeline import judge_config

    if not 0.0 <= args.min_pass <= 1.0:
        raise ValueError(f"--min-pass must be in [0, 1], got {args.min_pass}")
    rest, cfg = command_config(args, args.overrides)
    if len(rest) > 1:
        raise ValueError(f"cai constitution test takes CONSTITUTION, at most one CASES file and key=value overrides; "
                         f"got {' '.join(rest)}")
    constitution = C.load(args.constitution)
    path = rest[0] if rest else cases_mod.cases_path_for(constitution)
    cases = cases_mod.read_cases(path, constitution)  # every case is checked before the model loads
    lm = load_lm(judge_config(cfg))
    with tqdm(total=len(cases), desc="cases", unit="case") as bar:
        rows = cases_mod.run_cases(lm, constitution, cases, cfg.feedback, cfg.seed, bar.update)
    summary = cases_mod.summarise(rows)
    summary.update(constitution=constitution.name, constitution_hash=constitution.hash, cases=str(path),
                   judge=lm.name, seed=cfg.seed, min_pass=args.min_pass)
    print(f"{len(cases)} cases from {path}, constitution {constitution.name} ({constitution.hash}), judge {lm.name}")
    for r in rows:
        print(cases_mod.case_line(r))
    print("\n" + cases_mod.table(summary))
    if args.out:
        summary_path = cases_mod.write(args.out, rows, summary)
        print(f"\nwrote {args.out} and {summary_path}")
    below = summary["pass_rate"] < args.min_pass
    if below:
        print(f"\npass rate {summary['pass_rate']:.3f} is under --min-pass {args.min_pass}", file=sys.stderr)
    return 1 if below else 0


# ---- chat / model --------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    from cai.config import Sampling
    from cai.lm import load_lm

    rest, cfg = command_config(args, [args.model, *args.overrides])
    lm = load_lm(dataclasses.replace(cfg.model, name=_one_model(rest, "cai chat")))
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    history: list[dict[str, str]] = []
    prompts = [args.prompt] if args.prompt else None
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            text = prompts.pop(0)
        else:
            try:
                text = input("you> ")
            except EOFError:
                return 0
            if text.strip() in ("/exit", "/quit"):
                return 0
        history.append({"role": "user", "content": text})
        reply = lm.generate([history], sampling, seeds=[cfg.seed])[0][0].text
        history.append({"role": "assistant", "content": reply})
        print(reply if prompts is not None else f"model> {reply}", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from cai.serve import serve

    rest, cfg = command_config(args, [args.model, *args.overrides])
    model, mc = _one_model(rest, "cai serve"), cfg.model
    if mc.backend != "hf":
        raise ConfigError(f"model.backend: cai serve serves a transformers model in this process (hf), not "
                          f"'{mc.backend}'; a {mc.backend} back-end is already a server or engine of its own")

    def ready(server) -> None:
        print(f"serving {model} at {server.url} (Ctrl-C to stop)", flush=True)

    serve(model, args.host, args.port, mc.dtype, mc.device, mc.batch_size, args.api_key_env,
          max_length=mc.max_length, ready=ready, request_timeout_s=args.request_timeout)
    print("stopped", file=sys.stderr)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from cai.models import EMBEDDED, ensure_embedded

    if args.name not in EMBEDDED:
        print(f"error: '{args.name}' is not an embedded model (have: {', '.join(EMBEDDED)})", file=sys.stderr)
        return 2
    print(ensure_embedded(args.name))
    return 0


# ---- eval ----------------------------------------------------------------------------------


def cmd_eval_models(args: argparse.Namespace) -> int:
    from cai import pipeline
    from cai.evals.suite import render

    cfg = run_config(args)
    pipeline.evaluate_models(cfg, allow_changed=args.allow_config_change)
    summary = Path(cfg.run_dir) / "eval" / "summary.json"
    print("\n" + render(json.loads(summary.read_text())))
    print(f"\nwrote {summary}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cai.constitution import load as load_constitution
    from cai.evals import labeller
    from cai.lm import load_lm
    from cai.pipeline import judge_config
    from cai.sources import read_items

    files, cfg = command_config(args, [*args.files, *args.overrides])
    if not files:
        raise ValueError("cai eval labeller: no FILE given (only key=value overrides)")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    constitution = load_constitution(cfg.constitution)
    labeller.check_principles(constitution, args.principle)
    # Every file is read (and any error reported) before the model loads.
    sources = [s for path in files for s in read_items(path, args.format, cfg.seed, args.limit)]
    if not any(s.items for s in sources):
        raise ValueError(f"no usable items in {', '.join(files)}")
    # The judge is the feedback stage's: its settings, and the model config under its model name.
    lm = load_lm(judge_config(cfg))
    report = labeller.run(sources, lm, constitution, cfg.feedback, cfg.seed, args.principle, args.out)
    print(labeller.table(report))
    if args.out:
        print(f"\nwrote {args.out} and {report['items_path']}")
    return 0


def cmd_eval_attribution(args: argparse.Namespace) -> int:
    from cai.evals import attribution

    summary, path = attribution.run(args.run, margin=args.margin, top=args.top, n_boot=args.bootstrap)
    print(attribution.table(summary))
    print(f"\nwrote {path}")
    return 0


def cmd_eval_ablate(args: argparse.Namespace) -> int:
    from cai.evals import ablation

    rest, overrides = split_overrides([args.run, *args.overrides])
    if len(rest) != 1:
        raise ValueError(f"cai eval ablate takes one RUN directory and key=value overrides, got {' '.join(rest)}")
    summary, path = ablation.run(rest[0], args.by, overrides, args.only, args.retrain, args.allow_config_change,
                                 n_boot=args.bootstrap, policy=args.retrain_policy)
    print(ablation.table(summary))
    print(f"\nwrote {path}")
    return 0


# ---- redteam -------------------------------------------------------------------------------


def cmd_redteam(args: argparse.Namespace) -> int:
    from cai import pipeline
    from cai.stages.redteam import render

    cfg = run_config(args)
    top = pipeline.generate_redteam(cfg, allow_changed=args.allow_config_change)
    summary = json.loads((top.dir / "summary.json").read_text())
    kept = [json.loads(line) for line in (top.dir / "prompts.jsonl").read_text().splitlines() if line.strip()]
    sample, shown = [], set()  # the first kept prompt of each category, as a sample of what came out
    for r in kept:
        if r["category"] not in shown and len(sample) < args.examples:
            shown.add(r["category"])
            sample.append(r)
    print("\n" + render(summary, sample))
    print(f"\nwrote {top.dir / 'prompts.jsonl'} ({len(kept)} prompts; a prompt source as it stands, e.g. "
          f"prompts.red_team.0.path={top.dir / 'prompts.jsonl'}), rejected.jsonl and summary.json")
    if cfg.redteam.multi_turn:
        print(f"wrote {top.dir / 'probes.jsonl'} (multi-turn probes: messages end with the seed's request)")
    return 0


# ---- audit ---------------------------------------------------------------------------------

SERVE_ONLY = ("upstream", "port", "enforce", "queue_size", "api_key_env")


def cmd_audit(args: argparse.Namespace) -> int:
    """`cai audit FILE` (cai/evals/audit.py) or `cai audit serve --upstream URL` (cai/serve/proxy.py)."""
    from cai import constitution as C
    from cai.evals import audit
    from cai.lm import load_lm
    from cai.pipeline import judge_config

    if not 0.0 <= args.threshold < 1.0:
        raise ValueError(f"--threshold must be in [0, 1), got {args.threshold}")
    rest, cfg = command_config(args, [args.target, *args.overrides])
    serving = rest[:1] == ["serve"] and not Path("serve").is_file()
    if len(rest) != 1:
        raise ValueError(f"cai audit takes one FILE (or serve) and key=value overrides; got {' '.join(rest) or 'none'}")
    if not serving:
        given = [f"--{k.replace('_', '-')}" for k in SERVE_ONLY if getattr(args, k) not in (None, False)]
        if given:
            raise ValueError(f"cai audit FILE: {', '.join(given)} belong to `cai audit serve`")
    constitution = C.load(cfg.constitution)
    pids = audit.principles_to_check(constitution, args.principle)

    def judge_lm():
        return load_lm(judge_config(cfg))

    if serving:
        return audit_serve(args, cfg, constitution, pids, judge_lm)
    out = args.out or str(Path("runs") / "audit" / Path(rest[0]).name.split(".")[0])
    summary, rows = audit.audit_file(rest[0], cfg, constitution, judge_lm, out, args.threshold, pids,
                                     allow_changed=args.allow_config_change)
    print(f"audited {len(rows)} replies of {rest[0]} against {len(pids)} principles of {constitution.name} "
          f"({constitution.hash}), judge {cfg.feedback.model}\n")
    print(audit.table(summary))
    queued = len((Path(out) / "queue.jsonl").read_text(encoding="utf-8").splitlines())
    print(f"\nwrote {Path(out) / 'rows.jsonl'}, {Path(out) / 'queue.jsonl'} ({queued} to review) and "
          f"{Path(out) / 'summary.json'}")
    return 0


def audit_serve(args: argparse.Namespace, cfg: PipelineConfig, constitution: Any, pids: list[str],
                judge_lm: Any) -> int:
    """`cai audit serve`: the proxy in front of --upstream until interrupted (Ctrl-C or SIGTERM)."""
    import signal
    import threading

    from cai.evals import audit
    from cai.serve import is_loopback
    from cai.serve.proxy import AuditLog, AuditProxy, judge_for

    if not args.upstream:
        raise ValueError("cai audit serve needs --upstream URL (the OpenAI-compatible server to put the proxy in front of)")
    queue_size = 64 if args.queue_size is None else args.queue_size
    out = args.out or str(Path("runs") / "audit" / "serve")
    stage = audit.open_stage(out, cfg, constitution, pids, args.allow_config_change)
    log = AuditLog(stage, args.threshold, {"judge": cfg.feedback.model, "constitution": constitution.name,
                                           "constitution_hash": constitution.hash, "seed": cfg.seed,
                                           "principle_ids": pids, "upstream": args.upstream,
                                           "enforce": bool(args.enforce)})
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}, not a loopback address: anyone who can reach this port can use "
              "the upstream through the proxy (and its key)", file=sys.stderr, flush=True)
    proxy = AuditProxy(args.upstream, judge_for(judge_lm, constitution, cfg, pids), log,
                       judge_name=cfg.feedback.model, constitution=constitution, host=args.host,
                       port=8100 if args.port is None else args.port, enforce=bool(args.enforce),
                       queue_size=queue_size, api_key_env=args.api_key_env or "OPENAI_API_KEY")
    print(f"auditing {proxy.url} -> {args.upstream} ({'enforce' if args.enforce else 'monitor'} mode, queue "
          f"{queue_size}, {len(pids)} principles, judge {cfg.feedback.model}); writing {out} (Ctrl-C to stop)",
          flush=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        proxy.close(wait=False)
    print(f"stopped; {json.dumps(log.counters)}", file=sys.stderr)
    return 0


# ---- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cai", description="Constitutional AI end to end.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the pipeline from a config")
    r.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config (defaults when omitted)")
    _add_overrides(r, config_flag=False)
    r.add_argument("--from", dest="start", help="first stage to run")
    r.add_argument("--to", dest="stop", help="last stage to run")
    r.add_argument("--allow-config-change", action="store_true",
                   help="resume a stage even though its config or inputs changed")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("show", help="print what a run directory holds, with sample rows")
    s.add_argument("run")
    s.add_argument("--rows", type=int, default=2, help="sample rows per stage")
    s.set_defaults(func=cmd_show)

    rp = sub.add_parser("report", help="write the run's report: one self-contained HTML page with its plots and "
                                       "critique traces")
    rp.add_argument("run", metavar="RUN", help="a run directory (the run_dir of a `cai run`)")
    rp.add_argument("-o", "--output", metavar="FILE", help="where to write it (default RUN/report.html)")
    rp.set_defaults(func=cmd_report)

    c = sub.add_parser("constitution", help="validate, show, diff, test or convert constitutions")
    csub = c.add_subparsers(dest="action", required=True)
    v = csub.add_parser("validate")
    v.add_argument("paths", nargs="+")
    sh = csub.add_parser("show")
    sh.add_argument("path")
    d = csub.add_parser("diff", help="added, removed and changed principles; with --pairs RUN also the behavioural "
                                     "diff: the run's pairs relabelled under both, and how many labels flip",
                        description="The textual diff of A and B (exit 1 when they differ). With --pairs RUN, the "
                                    "run's usable pairs are relabelled under A and under B by its feedback model "
                                    "with its feedback settings and seed (RUN/config.yaml; key=value overrides such "
                                    "as feedback.model=... or model.backend=openai apply), and the soft and hard "
                                    "flip rates are printed overall, by principle category and by harm category, "
                                    "with the pairs that move most. The relabelled pairs are written a chunk "
                                    "(feedback.chunk_size pairs) at a time, with the report, to "
                                    "RUN/constitution_diff/<a-stem>__<b-stem>/, so a killed diff loses at most the "
                                    "chunk in flight and the same command resumes it; a rerun with either "
                                    "constitution's text, the judge's settings or the run's pairs changed starts "
                                    "that folder afresh.")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("overrides", nargs="*", metavar="key=value",
                   help="with --pairs: dotted overrides of the run's config, e.g. feedback.model=smollm2-135m")
    d.add_argument("--pairs", metavar="RUN", help="a run directory whose pairs stage has finished")
    d.add_argument("--limit", type=int, help="relabel only the first N usable pairs")
    d.add_argument("--top", type=int, default=5, help="how many of the pairs that move most to print (default 5)")
    d.add_argument("--out", metavar="FILE", help="also write the report here as JSON, and the per-pair rows beside it "
                                                 "(they are always in RUN/constitution_diff/<a-stem>__<b-stem>/)")
    t = csub.add_parser("test", help="run a constitution's regression cases against a judge; exit 1 under --min-pass",
                        description="Cases (JSONL): pair cases {id, prompt, chosen, rejected, category, principle?, "
                                    "note?}, where the constitution should prefer chosen, and flag cases {id, "
                                    "prompt, reply, flag, category, principle?}, where the reply should (or should "
                                    "not) be flagged. Without CASES, the constitution's own <name>.cases.jsonl "
                                    "beside it is used. The judge is the feedback stage's, set by -c CONFIG and "
                                    "key=value overrides: feedback.model, feedback.format, feedback.few_shot, "
                                    "feedback.principles, feedback.chain_of_thought, model.*, seed.")
    t.add_argument("constitution", metavar="CONSTITUTION", help="a constitution YAML file or a shipped name (default)")
    t.add_argument("overrides", nargs="*", metavar="CASES|key=value",
                   help="the cases file (JSONL; default: the constitution's own), and dotted overrides of the config, "
                        "e.g. feedback.model=smollm2-135m")
    t.add_argument("-c", "--config", help="YAML config (the defaults when omitted)")
    t.add_argument("--min-pass", type=float, default=1.0,
                   help="the pass rate under which the command exits 1 (default 1.0: every case must pass)")
    t.add_argument("--out", metavar="FILE", help="write the per-case rows here (JSONL), and the summary beside it; "
                                                 "RUN/cases/<name>.jsonl puts them in RUN's report")
    cv = csub.add_parser("convert", help="from the paper's prompt folder or llm-swarm JSON")
    cv.add_argument("src")
    cv.add_argument("-o", "--output", required=True)
    cv.add_argument("--format", default="auto", choices=["auto", "paper", "llm-swarm"])
    c.set_defaults(func=cmd_constitution)

    ch = sub.add_parser("chat", help="talk to a model (a name, a directory, or a run's sft/model)")
    ch.add_argument("model", metavar="MODEL",
                    help="a name, a directory or a hub id; model.dtype, model.backend and the other model.* keys "
                         "apply, and seed seeds the sampling")
    _add_overrides(ch)
    ch.add_argument("-p", "--prompt", help="one prompt, print the answer and exit")
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-p", type=float, default=0.9)
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (a preference model: /pooling)")
    sv.add_argument("model", metavar="MODEL",
                    help="a name, a directory (a run's sft/model or pm/model) or a hub id; model.dtype, "
                         "model.device, model.batch_size (rows decoded together) and model.max_length apply")
    _add_overrides(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    sv.add_argument("--api-key-env", metavar="NAME", help="require 'Authorization: Bearer $NAME' on every route "
                                                          "but /health")
    sv.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                    help="seconds a client has to send a whole request; idle connections close after it (default 30)")
    sv.set_defaults(func=cmd_serve)

    m = sub.add_parser("model", help="fetch and cache the embedded model")
    msub = m.add_subparsers(dest="action", required=True)
    f = msub.add_parser("fetch")
    f.add_argument("name", nargs="?", default="smollm2-135m")
    m.set_defaults(func=cmd_model)

    e = sub.add_parser("eval", help="evaluate models")
    esub = e.add_subparsers(dest="action", required=True)
    el = esub.add_parser("labeller", help="score a feedback model on multiple-choice comparison files: accuracy, "
                                          "agreement between the two orders, calibration",
                         description="The judge is the feedback stage's, set by its config keys: feedback.model, "
                                     "feedback.principles (drawn per item), feedback.few_shot, "
                                     "feedback.chain_of_thought, feedback.min_option_mass, model.* "
                                     "(model.backend, model.batch_size), seed (slot placement and principle "
                                     "draws) and constitution.")
    el.add_argument("files", nargs="+", metavar="FILE",
                    help="hh-rlhf pairs (JSONL[.gz]), prompt/chosen/rejected rows (a file such as a constitution's "
                         "cases, or a shipped set: builtin:judge_pairs, builtin:helpful_pairs), BIG-bench hhh "
                         "task.json files or folders, or the paper's prompt/corrects/incorrects JSONL")
    _add_overrides(el)
    el.add_argument("--format", default="auto", choices=["auto", "hh", "hhh", "paper", "preference"])
    el.add_argument("--limit", type=int, help="items per file")
    el.add_argument("--principle", action="append", metavar="ID",
                    help="use this preference principle for every item (repeat for an ensemble); "
                         "default: feedback.principles drawn per item")
    el.add_argument("--out", help="write the report here as JSON, and the per-item rows beside it")
    el.set_defaults(func=cmd_eval)
    em = esub.add_parser("models", help="evaluate the models of eval.models on held-out prompts: Elo with "
                                        "intervals, harm by category, failure, evasiveness, the judge card",
                         description="The run's evaluate stage on its own (eval.enabled need not be true): "
                                     "eval.models (base, sl_cai, rl_cai, model names or folders, files of "
                                     "answers), eval.judge (default feedback.model), eval.per_category, "
                                     "eval.samples; results in RUN_DIR/eval/summary.json.")
    em.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config (defaults when omitted)")
    _add_overrides(em, config_flag=False)
    em.add_argument("--allow-config-change", action="store_true",
                    help="resume even though the evaluation's config or inputs changed")
    em.set_defaults(func=cmd_eval_models)
    ea = esub.add_parser("attribution", help="which principles the labeller applies: per principle of a run's AI "
                                             "labels, how often drawn, how decisive, how often it agrees with "
                                             "the label and with the others",
                         description="Reads RUN/feedback (no model is run) and writes RUN/eval/attribution.json.")
    ea.add_argument("run", metavar="RUN", help="a run directory with a finished feedback stage")
    ea.add_argument("--margin", type=float, default=0.1,
                    help="a principle's answer is decisive when |p - 0.5| is above this (default 0.1)")
    ea.add_argument("--top", type=int, default=5, help="how many disagreeing principle pairs to list")
    ea.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each interval")
    ea.set_defaults(func=cmd_eval_attribution)
    eb = esub.add_parser("ablate", help="relabel a run's pairs with each principle (or category) removed and report "
                                        "the label change; --retrain trains the preference model again",
                         description="The run's judge (feedback.* of RUN/config.yaml) relabels the pairs whose "
                                     "principles the removal changes; model.* and ray.* overrides apply. Resumable "
                                     "work and the summary go to RUN/ablate/<by>/.")
    eb.add_argument("run", metavar="RUN", help="a run directory with finished pairs and feedback stages")
    _add_overrides(eb, config_flag=False)
    eb.add_argument("--by", choices=["principle", "category"], default="principle",
                    help="remove one preference principle at a time, or one category's (default principle)")
    eb.add_argument("--only", action="append", metavar="NAME",
                    help="ablate only this principle id or category (repeat for more)")
    eb.add_argument("--retrain", action="store_true",
                    help="train the preference model again on each ablation's labels at the run's pm settings and "
                         "report, beside the run's, its held-out accuracy overall, by kind of label and by harm "
                         "category, and (when the run has an evaluation) a PM-judged proxy for the evaluation's harm "
                         "figures: how often the last evaluated model's red-team answers score above the first's")
    eb.add_argument("--retrain-policy", action="store_true",
                    help="--retrain, then for each new preference model train a new PPO policy at the run's settings "
                         "and evaluate it as the run was evaluated: its harm figures (mean harm, failure rate, harm "
                         "by category) beside the run's RL-CAI policy's")
    eb.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each interval")
    eb.add_argument("--allow-config-change", action="store_true",
                    help="resume an ablation even though its inputs changed")
    eb.set_defaults(func=cmd_eval_ablate)

    rt = sub.add_parser("redteam", help="write new red-team prompts with a model")
    rtsub = rt.add_subparsers(dest="action", required=True)
    rg = rtsub.add_parser("generate", help="few-shot prompt a model with seed prompts per harm category; keep "
                                           "new, one-line requests unlike the seeds and the evaluation sets",
                          description="Settings are the redteam.* config keys: redteam.seeds (prompt sources "
                                      "with categories), redteam.categories, redteam.per_category, "
                                      "redteam.few_shot, redteam.model (default model.name), redteam.sampling, "
                                      "redteam.max_overlap (word n-gram Jaccard), redteam.exclude (default the "
                                      "evaluation sets), redteam.multi_turn; seed seeds every draw. Results in "
                                      "RUN_DIR/redteam/: prompts.jsonl, rejected.jsonl, summary.json.")
    rg.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config (defaults when omitted)")
    _add_overrides(rg, config_flag=False)
    rg.add_argument("--allow-config-change", action="store_true",
                    help="keep the candidates already generated even though their settings changed")
    rg.add_argument("--examples", type=int, default=8, metavar="N",
                    help="print up to N kept prompts, one per category (default 8)")
    rg.set_defaults(func=cmd_redteam)

    au = sub.add_parser("audit", help="audit stored outputs (or, with `serve`, live traffic through a proxy) "
                                      "against the constitution: per reply and principle a soft violation score, "
                                      "a review queue and flag rates",
                        description="cai audit FILE: FILE is JSONL of {id?, messages: [... assistant reply], "
                                    "category?}, {id?, prompt, reply, category?} or OpenAI chat-completions log rows "
                                    "{request: {messages}, response: {choices: [{message: {content}}]}}. "
                                    "cai audit serve --upstream URL: an OpenAI-compatible proxy that forwards every "
                                    "request unchanged and audits chat completions in the background. The judge "
                                    "is the feedback stage's: feedback.model, feedback.format, "
                                    "feedback.chain_of_thought, feedback.min_option_mass, feedback.chunk_size, "
                                    "model.*, seed, constitution. DIR gets rows.jsonl, queue.jsonl, summary.json.")
    au.add_argument("target", metavar="FILE|serve", help="a JSONL file of stored outputs, or `serve` for the proxy")
    _add_overrides(au)
    au.add_argument("--threshold", type=float, default=0.5,
                    help="a principle's score above this flags the reply (default 0.5)")
    au.add_argument("--principle", action="append", metavar="ID",
                    help="check this critique/revision principle (repeat); default: all of them")
    au.add_argument("--out", metavar="DIR", help="default runs/audit/<FILE's stem>, or runs/audit/serve; "
                                                "RUN/audit/<name> puts the results in RUN's report")
    au.add_argument("--allow-config-change", action="store_true",
                    help="keep the judgements already in DIR even though the judge's settings changed")
    au.add_argument("--upstream", metavar="URL", help="serve: the server to forward to, e.g. http://127.0.0.1:8000")
    au.add_argument("--host", default="127.0.0.1", help="serve: address to bind (default loopback only)")
    au.add_argument("--port", type=int, help="serve: port to listen on (default 8100; 0 picks a free one)")
    au.add_argument("--enforce", action="store_true",
                    help="serve: judge before answering and replace a flagged reply with a refusal (status 200)")
    au.add_argument("--queue-size", type=int, help="serve: replies waiting for the judge at most (default 64); "
                                                   "more are dropped and counted")
    au.add_argument("--api-key-env", metavar="NAME",
                    help="serve: the environment variable holding the upstream's key (default OPENAI_API_KEY)")
    au.set_defaults(func=cmd_audit)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line as `main` reads it (argparse exits on an unknown command or flag)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = getattr(args, "overrides", None)  # None for the commands that use no model
    # `cai run CONFIG --from pm rl.method=dpo`: overrides (and positional words) may follow the flags;
    # each command tells them apart with split_overrides.
    if extra and overrides is not None and not any(e.startswith("-") for e in extra):
        overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cai.lm.base import BackendError, BudgetExhausted
    from cai.models import ModelError
    from cai.pipeline import PipelineError
    from cai.rundir import ResumeError, StageError

    try:
        return args.func(args)
    except BudgetExhausted as e:
        print(f"stopped: {e}\nfinished records are kept; run the same command again (with a larger "
              "model.openai.request_budget) to resume", file=sys.stderr)
        return 3
    except (ConfigError, ConstitutionError, ResumeError, StageError, PipelineError, ModelError, BackendError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written, outside the run directory's own writes
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
