"""Reliability harness: an API key in the environment must end up nowhere the run writes.

A fresh random key is put in an environment variable, `cai serve` is started on loopback with the
key required (`--api-key-env`), and the pipeline runs through the OpenAI back-end against it
(`model.backend=openai`, `model.openai.api_key_env`): every stage, `prompts` to `evaluate`, with
tiny settings on a small random model built from the embedded model's tokenizer (the data stages
and the evaluation over HTTP; the training stages train that model here). Then `cai show` and
`cai report` run on the result. Afterwards every byte the run left is scanned for the key: each
file under the run directory (rows, manifests, journals, configs, checkpoints, models, the report),
the server's and the commands' logs, and the bodies the server sent back to requests with the
wrong key, no key, and the right key but a broken body. The key is searched for as it is, in
base64, and percent-encoded. A control file holding the key is scanned too, and must be found.

The quick variant (`--quick`) serves the model in this process and runs the stages `prompts` to
`feedback` (no training), capturing this process's output and log records as the logs.

    python reliability/secret_scan.py            # every stage, as three commands; a few minutes
    python reliability/secret_scan.py --quick    # the variant tests/test_reliability.py runs
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any
from unittest import mock

from cai.models import cpu_description

KEY_ENV = "CAI_RELIABILITY_API_KEY"
SRC = Path(__file__).resolve().parents[1] / "src"


def tiny_model(out: Path) -> str:
    """A 2-layer random Llama with the embedded model's tokenizer and chat template (cai.testing):
    cheap to serve and to train, real enough to template and save. Larger initial weights than the
    default make its random answers vary more."""
    from cai.testing import tiny_llama

    return tiny_llama(out, max_positions=4096, initializer_range=0.2)


def overrides(run_dir: Path, model: str, url: str, answers: Path, quick: bool) -> list[str]:
    """The `cai run` settings: every model call over HTTP with the key, tiny everywhere."""
    # A random model seldom ends its answer, and a cut-off answer is dropped as a training target:
    # stopping at the letter "e" ends most of them early (tiny.stop), so that some rows reach training.
    stop = '["e"]'
    tiny = [f"run_dir={run_dir}", "model.backend=openai", f"model.name={model}", f"model.openai.base_url={url}",
            f"model.openai.api_key_env={KEY_ENV}", "model.openai.max_retries=0", "model.dtype=float32",
            "prompts.red_team.0.limit=3", "sl.helpful_fraction=0.25", "sl.rounds=1", "sl.few_shot=1",
            *(f"sl.{k}.{v}" for k in ("response", "critique", "revision") for v in ("max_new_tokens=12", f"stop={stop}")),
            f"pairs.model={model}", "pairs.sampling.max_new_tokens=12", f"pairs.sampling.stop={stop}",
            f"feedback.model={model}", "feedback.min_option_mass=0.0"]
    if quick:  # the judge's reasoning too (in the full run its failures would leave nothing to train on)
        return tiny + ["feedback.chain_of_thought=true", "feedback.cot.max_new_tokens=6"]
    return tiny + [
        "sft.max_steps=2", "sft.batch_size=2", "sft.bf16=false", f"pm.model={model}", "pm.max_steps=2",
        "pm.batch_size=2", "pm.bf16=false", "rl.ppo.steps=1", "rl.ppo.batch_size=2", "rl.ppo.mini_batch_size=2",
        "rl.ppo.response.max_new_tokens=4", "rl.ppo.bf16=false", "eval.enabled=true",
        f"eval.models=[base, {answers}]", "eval.per_category=null", "eval.red_team.0.limit=2",
        "eval.helpful.0.limit=1", "eval.sampling.max_new_tokens=12", f"eval.sampling.stop={stop}", "eval.bootstrap=100",
        "eval.judge_check=[builtin:helpful_pairs]", "eval.judge_check_limit=3"]


def forms(key: str) -> dict[str, bytes]:
    """The spellings of the key a leak could take."""
    raw = key.encode()
    return {"raw": raw, "base64": base64.b64encode(raw).rstrip(b"="), "percent": urllib.parse.quote(key).encode(),
            "bearer": b"Bearer " + raw}


def scan(paths: list[Path], blobs: dict[str, bytes], *keys: str) -> dict[str, Any]:
    """Hits of every form of each of `keys` in the files under `paths` and in the named `blobs`."""
    needles = {f"key {i + 1}, {name}": needle for i, key in enumerate(keys) for name, needle in forms(key).items()}
    files = [p for root in paths for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    hits: list[str] = []
    size = 0
    for where, data in [*((str(p), p.read_bytes()) for p in files), *blobs.items()]:
        size += len(data)
        hits += [f"{where} ({name})" for name, needle in needles.items() if needle in data]
    return {"files": len(files), "blobs": len(blobs), "bytes": size, "hits": hits}


def probe(url: str, key: str) -> dict[str, bytes]:
    """The server's answers to a request without the key, with a wrong one, and with the right one
    but a body that is not JSON (an error path that could echo what it was sent)."""
    wrong = "sk-wrong-" + secrets.token_hex(8)
    out = {}
    for name, headers, body in (("no_key", {}, b"{}"), ("wrong_key", {"Authorization": f"Bearer {wrong}"}, b"{}"),
                                ("bad_body", {"Authorization": f"Bearer {key}"}, b"{not json")):
        req = urllib.request.Request(f"{url}/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                out[f"reply:{name}"] = f"{resp.status} ".encode() + resp.read()
        except urllib.error.HTTPError as e:
            out[f"reply:{name}"] = f"{e.code} ".encode() + e.read()
    out["reply:wrong_key"] += b" | wrong key echoed: " + str(wrong.encode() in out["reply:wrong_key"]).encode()
    return out


def _statuses(run_dir: Path) -> dict[str, str]:
    out = {}
    for m in sorted(run_dir.rglob("manifest.json")):
        data = json.loads(m.read_text())
        out[str(m.parent.relative_to(run_dir))] = data.get("status")
    return out


def run_quick(root: Path, key: str, wrong_key: str, model: str | None = None) -> dict[str, Any]:
    """In this process: the server on a thread, `prompts` to `feedback`, then `prompts` to
    `sl_generate` once with `wrong_key` and once with no server; output, log records and the
    errors captured."""
    from cai import pipeline
    from cai.config import ModelConfig, load_config
    from cai.lm.hf import HFModel
    from cai.serve import Server

    model = model or tiny_model(root / "model")
    lm = HFModel.from_config(ModelConfig(name=model, dtype="float32", batch_size=8))
    run_dir = root / "run"
    out, logs = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.captureWarnings(True)
    try:
        write_report = pipeline.write_report
        with Server(lm, model, port=0, api_key=key) as srv, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(out), mock.patch.object(pipeline, "write_report", lambda run_dir: None):
            cfg = load_config(None, overrides(run_dir, model, srv.url, root / "none.jsonl", quick=True))
            pipeline.run(cfg, stop="sl_generate")
            pipeline.run(cfg, start="pairs", stop="feedback")
            write_report(run_dir)  # once, at the end (drawing its plots is the slow part)
            replies = probe(srv.url, key)
            failures = {}
            for name, url, client_key in (("wrong key", srv.url, wrong_key), ("no server", _closed_url(), key)):
                os.environ[KEY_ENV] = client_key
                try:
                    pipeline.run(load_config(None, overrides(root / name.replace(" ", "_"), model, url,
                                                             root / "none.jsonl", quick=True)), stop="sl_generate")
                    failures[name] = "no error"
                except Exception as e:  # noqa: BLE001 - the message is what is scanned
                    failures[name] = f"{type(e).__name__}: {e}"
                finally:
                    os.environ[KEY_ENV] = key
    finally:
        logging.getLogger().removeHandler(handler)
        logging.captureWarnings(False)
    return {"run_dirs": [run_dir, root / "wrong_key", root / "no_server"],
            "logs": {"output": out.getvalue().encode(), "log records": logs.getvalue().encode(),
                     **{f"error ({k})": v.encode() for k, v in failures.items()}},
            "replies": replies, "failures": failures,
            "commands": ["pipeline.run --to sl_generate", "pipeline.run --from pairs --to feedback",
                         "pipeline.run --to sl_generate with a wrong key", "pipeline.run --to sl_generate, no server"]}


def _closed_url() -> str:
    """The URL of a loopback port that nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _cai(args: list[str], log: Path, env: dict[str, str], timeout: float = 1800) -> int:
    cmd = [sys.executable, "-c", "import sys; from cai.cli import main; sys.exit(main())", *args]
    with open(log, "ab") as f:
        f.write(f"$ cai {' '.join(args)}\n".encode())
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode


def run_full(root: Path, key: str, wrong_key: str, model: str | None = None) -> dict[str, Any]:
    """`cai serve` and `cai run` (every stage), `cai show` and `cai report`, each its own process;
    then `cai run --to sl_generate` once with `wrong_key` and once with no server."""
    model = model or tiny_model(root / "model")
    env = {**os.environ, KEY_ENV: key, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1"}
    logs = root / "logs"
    logs.mkdir()
    serve_log = logs / "serve.log"
    cmd = [sys.executable, "-c", "import sys; from cai.cli import main; sys.exit(main())", "serve", model,
           "--port", "0", "--api-key-env", KEY_ENV, "model.dtype=float32", "model.batch_size=8"]
    with open(serve_log, "wb") as serve_out:
        server = subprocess.Popen(cmd, stdout=serve_out, stderr=subprocess.STDOUT, env=env)
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.5)
            found = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", serve_log.read_text(errors="replace"))
            url = found.group(1) if found else None
        if url is None:
            raise RuntimeError(f"cai serve did not start: {serve_log.read_text(errors='replace')[-2000:]}")
        run_dir = root / "run"
        answers = root / "stored_answers.jsonl"
        from cai.config import load_config
        from cai.stages.evaluate import eval_prompts

        cfg = load_config(None, overrides(run_dir, model, url, answers, quick=False))
        answers.write_text("".join(json.dumps({"prompt": p["prompt"], "response": "I would rather not say."}) + "\n"
                                   for p in eval_prompts(cfg.eval)))
        run_log = logs / "run.log"
        codes = {"run": _cai(["run", *overrides(run_dir, model, url, answers, quick=False)], run_log, env)}
        codes["show"] = _cai(["show", str(run_dir)], logs / "show.log", env)
        codes["report"] = _cai(["report", str(run_dir), "-o", str(run_dir / "report.html")], logs / "report.log", env)
        failed = {name: (logs / f"{name}.log").read_text(errors="replace")[-1500:] for name, code in codes.items() if code}
        replies = probe(url, key)
        # Two runs that must fail: the client sends a key the server does not take; nothing listens.
        failures = {}
        for name, base, client_key in (("wrong_key", url, wrong_key), ("no_server", _closed_url(), key)):
            code = _cai(["run", *overrides(root / name, model, base, answers, quick=False), "--to", "sl_generate"],
                        logs / f"{name}.log", {**env, KEY_ENV: client_key})
            failures[name] = f"exit {code}: " + (logs / f"{name}.log").read_text(errors="replace").splitlines()[-1]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"run_dirs": [run_dir, root / "wrong_key", root / "no_server"], "log_dir": logs, "replies": replies,
            "codes": codes, "failed": failed, "failures": failures,
            "commands": ["cai serve", "cai run (every stage)", "cai show", "cai report",
                         "cai run --to sl_generate with a wrong key", "cai run --to sl_generate, no server"]}


def run(quick: bool = False, workdir: str | Path | None = None, model: str | None = None) -> dict[str, Any]:
    """Run the stages with a fresh key and scan everything they left; returns the figures. `model`
    is a small model folder to serve (default: one built here by `tiny_model`)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    key = "sk-cai-" + secrets.token_urlsafe(24)
    wrong_key = "sk-cai-wrong-" + secrets.token_urlsafe(24)
    previous = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = key
    try:
        with tempfile.TemporaryDirectory(prefix="cai-secrets-", dir=workdir) as tmp:
            root = Path(tmp)
            t0 = time.perf_counter()
            got = (run_quick if quick else run_full)(root, key, wrong_key, model)
            seconds = time.perf_counter() - t0
            blobs = {**got.get("logs", {}), **got["replies"]}
            paths = [d for d in got["run_dirs"] if d.exists()] + ([got["log_dir"]] if "log_dir" in got else [])
            found = scan(paths, blobs, key, wrong_key)
            control = root / "control.txt"
            control.write_text(f"a planted copy: {key}\n")
            res = {"quick": quick, "seconds": round(seconds, 1), "stages": _statuses(got["run_dirs"][0]),
                   "failures": got["failures"],
                   "commands": got["commands"], "codes": got.get("codes", {}), "failed": got.get("failed", {}),
                   **found,
                   "control_found": bool(scan([control], {}, key)["hits"]),
                   "report_scanned": (got["run_dirs"][0] / "report.html").is_file(),
                   "replies": {k: v.decode(errors="replace")[:300] for k, v in got["replies"].items()},
                   "requests_without_key_refused": got["replies"]["reply:no_key"].startswith(b"401")
                   and got["replies"]["reply:wrong_key"].startswith(b"401")}
    finally:
        if previous is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = previous
    return res


def render(res: dict[str, Any]) -> str:
    lines = [f"{'quick: prompts to feedback, in process' if res['quick'] else 'every stage, as commands'}; "
             f"{res['seconds']} s; commands: {', '.join(res['commands'])}"
             + (f" (exit codes {res['codes']})" if res["codes"] else ""),
             "stages: " + ", ".join(f"{k} {v}" for k, v in res["stages"].items()),
             "runs that must fail: " + "; ".join(f"{k}: {v[:160]}" for k, v in res["failures"].items()),
             f"scanned {res['files']} files (run directories{'' if res['quick'] else ', command logs'}) and "
             f"{res['blobs']} captured outputs, errors and server replies, {res['bytes']:,} bytes, for the server's "
             "key and the wrong one (raw, base64, percent-encoded, as a Bearer header)",
             f"hits: {len(res['hits'])}" + "".join(f"\n  {h}" for h in res["hits"]),
             f"control (the key planted in a file): {'found' if res['control_found'] else 'NOT FOUND'}; "
             f"the run report was {'' if res['report_scanned'] else 'NOT '}among the files",
             f"requests without the key or with a wrong one refused (401): {res['requests_without_key_refused']}"]
    for name, body in res["replies"].items():
        lines.append(f"  {name}: {body}")
    for name, tail in res.get("failed", {}).items():
        lines.append(f"`cai {name}` failed; the end of its log:\n{tail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="in process, stages prompts to feedback only")
    ap.add_argument("--model", help="a small model folder to serve (default: a 2-layer random Llama built here)")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    args = ap.parse_args(argv)
    print(f"CPU: {cpu_description()}; Python {sys.version.split()[0]}")
    res = run(args.quick, model=args.model)
    print(render(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    complete = all(v == "complete" for v in res["stages"].values()) and not any(res["codes"].values())
    good = res["control_found"] and res["report_scanned"] and res["requests_without_key_refused"]
    return 0 if complete and good and not res["hits"] else 1


if __name__ == "__main__":
    sys.exit(main())
