"""Kill harness: a small pipeline is SIGKILLed at seeded moments, restarted each time, and compared
with an uninterrupted run of the same config.

    python reliability/kills.py                 # every stage through PPO, 20 kills (a few minutes on 2 cores)
    python reliability/kills.py --quick         # the data stages (prompts .. preferences), 3 kills, seconds

Each run of the pipeline is a child process (this file with `--child`) on a scripted model (answers
are a hash of the conversation and seed, so they are the same however often a call is repeated)
and, for the training stages, a randomly initialised 2-layer Llama with the embedded model's
tokenizer. The child hooks the places where a run writes or works and logs each as an event:

    call        a model call (the kill lands between the calls of a chunk)
    journal     a journal line of finished calls (cai/journal.py)
    append      a chunk of rows appended to rows.jsonl
    manifest    a manifest.json write (cai/rundir.py)
    checkpoint  a training checkpoint (pm, ppo: cai/checkpoints.py; sft: TRL's Trainer)
    model       the saved model
    step        a training step

An uninterrupted run gives each stage's events. The plan spreads K kills over the stages that have
events (seeded): each picks a site of its stage, an occurrence of it, and a mode: `before` the event,
`torn` (half of the bytes written, or the temporary file written but not renamed into place) or
`after` it. The child kills itself with SIGKILL there (the same signal a scheduler sends; no handler
runs). If a restarted run passes its stage without meeting the occurrence, it is killed at the first
event of a later stage instead (counted as such). After the K kills the run is finished without one.

Compared with the uninterrupted run: every stage's rows.jsonl byte for byte (bytes differing),
records lost and duplicated, every manifest `complete` with equal counts, and every saved model's
weights (max abs difference; tolerance 1e-6, fp32 on the CPU). Work lost per kill: the model calls
(one conversation scored or generated), rows and training steps made again after each restart,
found by the keys the events log (a call's key is a hash of its request).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cai.lm.base import Completion  # noqa: E402

TOLERANCE = 1e-6
# The quick variant trains nothing: the SL-CAI data stages, then RL-CAI's up to the preference mix
# (its pairs sampled by the scripted model in place of the fine-tuned one).
QUICK = [[None, "sl_export"], ["pairs", "preferences"]]
FULL = [[None, "ppo"]]
GENERATING = ("sl_generate", "pairs", "feedback")
MODES = {"call": ("before",), "step": ("before", "after"), "journal": ("before", "torn", "after"),
         "append": ("before", "torn", "after"), "manifest": ("before", "torn", "after"),
         "checkpoint": ("before", "torn", "after"), "model": ("before", "torn", "after")}


def _h(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---- the child: one run of the pipeline with its events hooked -------------------------------


class _Child:
    """The hooks' state in a child process: the stage running, the event log, the kill plan."""

    stage = "-"
    log: Any = None
    plan: dict[str, Any] | None = None
    seen = 0
    armed = False  # a `torn` checkpoint kill: die after the next file torch writes

    @classmethod
    def event(cls, site: str, **info: Any) -> str | None:
        """Log an event; returns the kill mode if the plan kills here (the caller carries it out)."""
        cls.log.write(json.dumps({"pid": os.getpid(), "stage": cls.stage, "site": site, **info}) + "\n")
        cls.log.flush()
        plan = cls.plan
        if plan is None:
            return None
        from cai.pipeline import STAGES

        later = STAGES.index(cls.stage) > STAGES.index(plan["stage"]) if cls.stage in STAGES else False
        if cls.stage == plan["stage"] and site == plan["site"]:
            cls.seen += 1
            if cls.seen == plan["nth"]:
                return plan["mode"]
        if later:
            return "before"
        return None

    @classmethod
    def die(cls, mode: str, site: str) -> None:
        cls.log.write(json.dumps({"pid": os.getpid(), "stage": cls.stage, "site": site, "kill": mode}) + "\n")
        cls.log.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class ScriptedLM:
    """Answers that are a hash of the request (so a repeated call gives the same text); every
    conversation it is sent is a `call` event, keyed by its request."""

    name = "scripted"

    def generate(self, conversations, sampling, n=1, seeds=None):
        out = []
        for i, conv in enumerate(conversations):
            seed = seeds[i] if seeds is not None else i
            key = _h(conv, repr(sampling), seed)[:16]
            if _Child.log is not None and (mode := _Child.event("call", key=key)):
                _Child.die(mode, "call")
            words = ["yes", "no", "maybe", "rather", "kindly", "never", "always", "perhaps"]
            text = " ".join(words[int(key[k], 16) % len(words)] for k in range(6))
            out.append([Completion(f"{text} {key[:6]}-{j}", "stop", 7) for j in range(n)])
        return out

    def score_options(self, contexts, options):
        out = []
        for ctx, opts in zip(contexts, options):
            key = _h(ctx, opts)[:16]
            if _Child.log is not None and (mode := _Child.event("call", key=key)):
                _Child.die(mode, "call")
            out.append([-0.2 - int(key[k], 16) / 10 for k in range(len(opts))])
        return out


def _hook() -> None:
    """Wrap the writers of a run so each is an event (and a possible kill)."""
    from cai import checkpoints, journal, pipeline, rundir

    run_stage = pipeline._run_stage

    def _run_stage(name, *a, **k):
        _Child.stage = name
        return run_stage(name, *a, **k)

    pipeline._run_stage = _run_stage

    append = rundir.Stage.append

    def stage_append(self, rows):
        rows = list(rows)
        mode = _Child.event("append", ids=[r["record_id"] for r in rows])
        if mode == "torn":
            blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
            with open(self.rows_path, "ab") as f:
                f.write(blob[: max(1, len(blob) // 2)])
            _Child.die(mode, "append")
        if mode == "before":
            _Child.die(mode, "append")
        append(self, rows)
        if mode == "after":
            _Child.die(mode, "append")

    rundir.Stage.append = stage_append

    atomic = rundir.atomic_write

    def atomic_write(path, text):
        path = Path(path)
        mode = _Child.event("manifest") if path.name == "manifest.json" else None
        if mode == "torn":  # the temporary file is written, the rename never happens
            fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            os.write(fd, text.encode())
            os.fsync(fd)
            _Child.die(mode, "manifest")
        if mode == "before":
            _Child.die(mode, "manifest")
        atomic(path, text)
        if mode == "after":
            _Child.die(mode, "manifest")

    rundir.atomic_write = atomic_write

    commit = journal.Journal.commit

    def journal_commit(self):
        if not self._pending:
            return commit(self)
        mode = _Child.event("journal")
        if mode == "torn":
            line = (json.dumps(self._pending, ensure_ascii=False) + "\n").encode()
            self._load()
            with open(self.path, "ab") as f:
                f.write(line[: max(1, len(line) // 2)])
            _Child.die(mode, "journal")
        if mode == "before":
            _Child.die(mode, "journal")
        commit(self)
        if mode == "after":
            _Child.die(mode, "journal")

    journal.Journal.commit = journal_commit

    if os.environ.get("KILLS_TRAINING") != "1":
        return  # the quick variant trains nothing: torch stays unloaded
    import torch

    save = torch.save

    def torch_save(*a, **k):
        save(*a, **k)
        if _Child.armed:
            _Child.die("torn", "checkpoint")

    torch.save = torch_save

    def checkpoint_site(orig):
        def wrapped(*a, **k):
            mode = _Child.event("checkpoint")
            if mode == "before":
                _Child.die(mode, "checkpoint")
            _Child.armed = mode == "torn"
            out = orig(*a, **k)
            if mode == "after":
                _Child.die(mode, "checkpoint")
            return out
        return wrapped

    checkpoints.save_checkpoint = checkpoint_site(checkpoints.save_checkpoint)
    save_model = checkpoints.save_model

    def model_save(model, tokenizer, out, state_dict=None):
        mode = _Child.event("model")
        if mode == "torn":
            model.save_pretrained(out.parent / f".{out.name}.tmp", safe_serialization=True, state_dict=state_dict)
            _Child.die(mode, "model")
        if mode == "before":
            _Child.die(mode, "model")
        save_model(model, tokenizer, out, state_dict)
        if mode == "after":
            _Child.die(mode, "model")

    checkpoints.save_model = model_save
    metrics_log = checkpoints.MetricsLog.log

    def log_step(self, step, metrics):
        mode = _Child.event("step", step=step)
        if mode == "before":
            _Child.die(mode, "step")
        metrics_log(self, step, metrics)
        if mode == "after":
            _Child.die(mode, "step")

    checkpoints.MetricsLog.log = log_step

    from transformers import Trainer

    trainer_save = Trainer._save_checkpoint
    Trainer._save_checkpoint = checkpoint_site(trainer_save)
    training_step = Trainer.training_step

    def sft_step(self, *a, **k):
        mode = _Child.event("step", step=self.state.global_step + 1)
        if mode == "before":
            _Child.die(mode, "step")
        return training_step(self, *a, **k)

    Trainer.training_step = sft_step


def child(overrides: list[str], ranges: list[list[str | None]], events: str, plan: str | None) -> int:
    from cai import pipeline
    from cai.config import load_config

    _Child.log = open(events, "a", encoding="utf-8")  # noqa: SIM115 - open for the life of the process
    _Child.plan = json.loads(plan) if plan else None
    _hook()
    cfg = load_config(None, overrides)
    for start, stop in ranges:
        pipeline.run(cfg, start=start, stop=stop, lm_factory=ScriptedLM)
    return 0


# ---- the parent: plan, kill, restart, compare --------------------------------------------------


def _overrides(run_dir: Path, tiny: str | None) -> list[str]:
    out = [f"run_dir={run_dir}", "prompts.red_team=[{path: 'builtin:red_team', limit: 7}]",
           "prompts.helpful=[{path: 'builtin:helpful', limit: 3}]", "sl.rounds=2", "sl.few_shot=1",
           "sl.chunk_size=3", "pairs.chunk_size=3", "feedback.chunk_size=3", "feedback.few_shot=0",
           "preferences.human_fraction=0.3", "preferences.eval_fraction=0.25", "pairs.sampling.max_new_tokens=8"]
    if not tiny:
        out += ["pairs.model=policy"]
    if tiny:
        out += [f"model.name={tiny}", "model.dtype=float32", f"pm.model={tiny}", "sft.max_steps=4",
                "sft.batch_size=2", "sft.save_steps=2", "sft.bf16=false", "pm.max_steps=4", "pm.batch_size=2",
                "pm.save_steps=2", "pm.bf16=false", "pm.max_length=96", "rl.ppo.steps=4", "rl.ppo.batch_size=2",
                "rl.ppo.mini_batch_size=2", "rl.ppo.save_steps=2", "rl.ppo.response.max_new_tokens=6",
                "rl.ppo.bf16=false"]
    return out


def _tiny_model(out: Path) -> str:
    """A random 2-layer Llama with the embedded model's tokenizer (cai.testing, as tests/conftest.py builds)."""
    from cai.testing import tiny_llama

    return tiny_llama(out)


def _launch(overrides: list[str], ranges: list[list[str | None]], events: Path, plan: dict[str, Any] | None,
            training: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "KILLS_TRAINING": "1" if training else "0"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--ranges", json.dumps(ranges), "--events", str(events),
           "--overrides", json.dumps(overrides)]
    if plan is not None:
        cmd += ["--plan", json.dumps(plan)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def make_plan(clean: list[dict[str, Any]], kills: int, seed: int) -> list[dict[str, Any]]:
    """K kills spread over the stages that have events, in stage order; each a (site, occurrence,
    mode) drawn from that stage's events in the uninterrupted run."""
    from cai.pipeline import STAGES

    rng = random.Random(seed)
    count: dict[str, Counter[str]] = defaultdict(Counter)
    for e in clean:
        if "kill" not in e:
            count[e["stage"]][e["site"]] += 1
    stages = [s for s in STAGES if count[s]]
    plan = []
    per_stage = Counter(stages[i * len(stages) // kills] for i in range(kills)) if kills >= len(stages) else \
        Counter(rng.sample(stages, kills))
    for s in stages:
        sites = sorted(count[s])
        rng.shuffle(sites)
        for j in range(per_stage[s]):
            site = sites[j % len(sites)]
            n = count[s][site]
            # later kills in a stage aim early: a restarted stage has fewer events left
            nth = rng.randint(1, max(1, n // (1 + (j > 0))))
            plan.append({"stage": s, "site": site, "nth": nth, "mode": rng.choice(MODES[site])})
    return plan


def _weights(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {str(p.relative_to(run)): load_file(str(p)) for p in sorted(run.glob("*/model/*.safetensors"))}


def compare(clean: Path, killed: Path) -> dict[str, Any]:
    """Rows byte for byte, record ids lost and duplicated, manifests, and saved weights."""
    out: dict[str, Any] = {"bytes_differing": 0, "lost": 0, "duplicated": 0, "stages": {}, "manifests_differ": [],
                           "max_abs_diff": 0.0, "weights_missing": []}
    for rows in sorted(clean.glob("*/rows.jsonl")):
        name = rows.parent.name
        a, b = rows.read_bytes(), (killed / name / "rows.jsonl").read_bytes() if (
            killed / name / "rows.jsonl").exists() else b""
        diff = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        ids_a = [json.loads(x)["record_id"] for x in a.splitlines() if x.strip()]
        ids_b = [json.loads(x)["record_id"] for x in b.splitlines() if x.strip()]
        lost = len(set(ids_a) - set(ids_b))
        dup = len(ids_b) - len(set(ids_b))
        out["stages"][name] = {"rows": len(ids_a), "bytes_differing": diff, "lost": lost, "duplicated": dup}
        out["bytes_differing"] += diff
        out["lost"] += lost
        out["duplicated"] += dup
    for m in sorted(clean.glob("*/manifest.json")):
        mk = killed / m.parent.name / "manifest.json"
        ma = json.loads(m.read_text())
        mb = json.loads(mk.read_text()) if mk.exists() else {}
        # Fingerprints are not compared: a training stage's holds the folders of the models it
        # builds on, which are in each run's own directory.
        if mb.get("status") != "complete" or ma.get("counts") != mb.get("counts"):
            out["manifests_differ"].append(m.parent.name)
    if any(clean.glob("*/model/*.safetensors")):
        wa, wb = _weights(clean), _weights(killed)
        for f, tensors in wa.items():
            if f not in wb:
                out["weights_missing"].append(f)
                continue
            for k, t in tensors.items():
                other = wb[f].get(k)
                if other is None or other.shape != t.shape:
                    out["weights_missing"].append(f"{f}:{k}")
                    continue
                out["max_abs_diff"] = max(out["max_abs_diff"], float((t.float() - other.float()).abs().max()))
    leftovers = [str(p.relative_to(killed)) for p in killed.rglob(".*") if p.name.startswith(".")]
    out["leftovers"] = leftovers
    return out


def work_lost(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kill: model calls, rows and training steps made again after the restart that followed it."""
    seen_calls: set[str] = set()
    seen_rows: set[tuple[str, str]] = set()
    seen_steps: set[tuple[str, int]] = set()
    per_kill: list[dict[str, int]] = []
    current = {"calls": 0, "rows": 0, "steps": 0}
    pid = None
    for e in events:
        if e["pid"] != pid:
            if pid is not None:
                per_kill.append(current)
            pid, current = e["pid"], {"calls": 0, "rows": 0, "steps": 0}
        if "kill" in e:
            continue
        if e["site"] == "call":
            current["calls"] += e["key"] in seen_calls
            seen_calls.add(e["key"])
        elif e["site"] == "append":
            for rid in e["ids"] if e["stage"] in GENERATING else ():  # other stages only copy rows
                current["rows"] += (e["stage"], rid) in seen_rows
                seen_rows.add((e["stage"], rid))
        elif e["site"] == "step":
            current["steps"] += (e["stage"], e["step"]) in seen_steps
            seen_steps.add((e["stage"], e["step"]))
    per_kill.append(current)
    redone = per_kill[1:]  # the first process redoes nothing; each later one follows a kill
    return {"per_restart": redone,
            **{f"{k}_mean": (sum(r[k] for r in redone) / len(redone) if redone else 0.0) for k in current},
            **{f"{k}_max": max((r[k] for r in redone), default=0) for k in current}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=None, help="number of kills (default 20; --quick: 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the data stages only, 3 kills, a scripted model")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder, removed)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ranges", help=argparse.SUPPRESS)
    ap.add_argument("--events", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.overrides), json.loads(args.ranges), args.events, args.plan)
    kills = args.kills if args.kills is not None else (3 if args.quick else 20)
    ranges = QUICK if args.quick else FULL
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cai-kills-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures = _harness(work, kills, args.seed, ranges, training=not args.quick)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if figures["ok"] else 1


def _harness(work: Path, kills: int, seed: int, ranges: list[list[str | None]], training: bool) -> dict[str, Any]:
    tiny = _tiny_model(work / "tiny-llama") if training else None
    t0 = time.monotonic()
    clean_events = work / "clean.events.jsonl"
    done = _launch(_overrides(work / "clean", tiny), ranges, clean_events, None, training)
    if done.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{done.stderr[-3000:]}")
    clean_s = time.monotonic() - t0
    plan = make_plan(_events(clean_events), kills, seed)
    killed_events = work / "killed.events.jsonl"
    overrides = _overrides(work / "killed", tiny)
    hits: list[dict[str, Any]] = []
    errors: list[str] = []
    for i, p in enumerate(plan):
        before = len(_events(killed_events))
        res = _launch(overrides, ranges, killed_events, p, training)
        new = _events(killed_events)[before:]
        hit = next((e for e in new if "kill" in e), None)
        if res.returncode == -signal.SIGKILL and hit is not None:
            hits.append({"planned": p, "stage": hit["stage"], "site": hit["site"], "mode": hit["kill"],
                         "fallback": hit["stage"] != p["stage"] or hit["site"] != p["site"]})
            print(f"kill {i + 1}/{len(plan)}: {hit['stage']}/{hit['site']} ({hit['kill']})"
                  + ("  [planned occurrence not reached: killed at the next stage]" if hits[-1]["fallback"] else ""),
                  flush=True)
        elif res.returncode == 0:
            print(f"kill {i + 1}/{len(plan)}: missed, the run finished ({p})", flush=True)
            break
        else:
            errors.append(f"restart {i + 1} ended with code {res.returncode}:\n{res.stderr[-3000:]}")
            print(errors[-1], flush=True)
            break
    final = _launch(overrides, ranges, killed_events, None, training)
    if final.returncode != 0:
        errors.append(f"the final restart ended with code {final.returncode}:\n{final.stderr[-3000:]}")
    cmp = compare(work / "clean", work / "killed") if not errors else {}
    lost = work_lost(_events(killed_events))
    from cai.pipeline import STAGES

    stages_hit = sorted({h["stage"] for h in hits}, key=STAGES.index)
    sites_hit = Counter(f"{h['site']}:{h['mode']}" for h in hits)
    figures = {"kills": len(hits), "planned": len(plan), "stages_hit": stages_hit, "sites_hit": dict(sites_hit),
               "fallbacks": sum(h["fallback"] for h in hits), "errors": errors, "clean_run_s": round(clean_s, 1),
               "compare": cmp, "work_lost": lost, "tolerance": TOLERANCE, "training": training}
    figures["ok"] = bool(not errors and cmp and cmp["bytes_differing"] == 0 and cmp["lost"] == 0
                         and cmp["duplicated"] == 0 and not cmp["manifests_differ"] and not cmp["weights_missing"]
                         and cmp["max_abs_diff"] <= TOLERANCE)
    _print(figures)
    return figures


def _print(f: dict[str, Any]) -> None:
    c = f["compare"]
    print(f"\nkills: {f['kills']} of {f['planned']} planned ({f['fallbacks']} at a later stage than planned)")
    print(f"stages hit: {len(f['stages_hit'])} ({', '.join(f['stages_hit'])})")
    print("sites hit: " + ", ".join(f"{k} {v}" for k, v in sorted(f["sites_hit"].items())))
    if f["errors"]:
        print("ERRORS:\n" + "\n".join(f["errors"]))
        return
    print(f"records lost: {c['lost']}, duplicated: {c['duplicated']}, bytes differing: {c['bytes_differing']} "
          f"(over {sum(s['rows'] for s in c['stages'].values())} rows in {len(c['stages'])} stages)")
    print(f"manifests not complete or with other counts: {len(c['manifests_differ'])} {c['manifests_differ'] or ''}")
    if f["training"]:
        print(f"weights: max abs difference {c['max_abs_diff']:.3g} (tolerance {f['tolerance']:g}); "
              f"missing: {len(c['weights_missing'])}")
    print(f"leftover temporary files: {len(c['leftovers'])} {c['leftovers'] or ''}")
    w = f["work_lost"]
    print(f"work lost per kill: model calls redone mean {w['calls_mean']:.1f} / max {w['calls_max']}, "
          f"generated rows redone mean {w['rows_mean']:.1f} / max {w['rows_max']}, "
          f"training steps redone mean {w['steps_mean']:.1f} / max {w['steps_max']}")
    print("OK" if f["ok"] else "FAILED")


if __name__ == "__main__":
    sys.exit(main())
