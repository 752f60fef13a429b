"""A tiny run directory made by scripted models, for the commands that read a finished run
(`cai eval attribution`, `cai eval ablate`): prompts, pairs and feedback (and, when asked, the
preference mix and a preference model), under a three-principle constitution so that every
principle is drawn for some pair of a handful.

The policy answers every prompt with one `SAFE` and one `RISKY` reply (which comes first depends on
the seed); the judge gives each principle a fixed P(the SAFE reply is better), so a test knows
which principle decides what."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from cai import pipeline
from cai.config import load_config
from cai.constitution import load
from cai.lm.base import Completion

KEEP = ("pref-harm-general", "pref-honesty-truthful", "pref-helpful-direct")


def small_constitution(path: Path) -> Path:
    """The default constitution with only the preference principles of KEEP (and no worked examples
    for them)."""
    d = load("default").to_dict()
    d["name"] = "three"
    d["preference"] = [p for p in d["preference"] if p["id"] in KEEP]
    d["few_shot"]["preference"], d["few_shot"]["chain_of_thought"] = [], []
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


class Judge:
    """Samples a SAFE and a RISKY reply per prompt; as a judge, P(SAFE better) = `prefer[principle]`
    (0.5 for a principle not named). Counts the options it scores."""

    name = "judge"

    def __init__(self, prefer: dict[str, float] | None = None):
        self.prefer = dict(prefer or {})
        self.instructions = {p.id: p.instruction for p in load("default").preference}
        self.scored = 0
        self.asked: list[str] = []

    def generate(self, conversations, sampling, n=1, seeds=None):
        out = []
        for s in seeds:
            pair = [f"SAFE reply {s % 997}", f"RISKY reply {s % 997}"]
            out.append([Completion(t, "stop", 3) for t in (pair if s % 2 else pair[::-1])][:n])
        return out

    def score_options(self, contexts, options):
        out = []
        for ctx in contexts:
            question = ctx[-2]["content"]
            pid = next(p for p, text in self.instructions.items() if text in question)
            self.asked.append(pid)
            p = self.prefer.get(pid, 0.5)
            p_a = p if "(A) <reply>\nSAFE" in question else 1.0 - p
            out.append([math.log(p_a), math.log(1.0 - p_a)])
        self.scored += len(contexts)
        return out


def build(tmp_path: Path, judge: Judge, *extra: str, prompts: int = 8, to: str = "feedback"):
    """A run in `tmp_path/run` up to stage `to`; returns its config."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    const = small_constitution(tmp_path / "three.yaml")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"constitution={const}",
                             f"prompts.red_team=[{{path: 'builtin:red_team', limit: {prompts}}}]",
                             "pairs.model=policy", "feedback.model=judge", "feedback.few_shot=0",
                             "preferences.human_fraction=0", *extra])
    pipeline.run(cfg, stop="prompts")
    pipeline.run(cfg, start="pairs", stop=to, lm_factory=lambda: judge)
    return cfg
