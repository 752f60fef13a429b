"""`cai.evals.ratings`: Bradley-Terry Elo from soft judgements, length control, the group bootstrap,
degenerate data and validation. Synthetic outcomes are Beta-distributed around the true win
probability (a noisy but unbiased soft judge), so the fit's target is the truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cai.evals.ratings import ELO, fit, win_probability
from cai.judge import swap_average

TRUE = {"base": 0.0, "better": 100.0, "worse": -150.0}


def synthetic(
    rng: np.random.Generator,
    n_prompts: int,
    elo: dict[str, float],
    *,
    concentration: float = 4.0,
    log_len: dict[str, float] | None = None,
    length_logit: float = 0.0,
) -> list[dict]:
    """Every pair of models on every prompt, in a random order, with p ~ Beta around the true
    P(a beats b) (mean exactly that probability). With `log_len`, each model's answer length is
    lognormal around exp(log_len[model]) and the true logit gains `length_logit` per unit of
    log length ratio."""
    names = list(elo)
    rows = []
    for g in range(n_prompts):
        lens = {m: float(np.exp(rng.normal(log_len[m], 0.5))) if log_len else 100.0 for m in names}
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                a, b = (names[i], names[j]) if rng.random() < 0.5 else (names[j], names[i])
                x = math.log1p(lens[a]) - math.log1p(lens[b])
                q = 1 / (1 + math.exp(-((elo[a] - elo[b]) / ELO + length_logit * x)))
                p = float(rng.beta(concentration * q, concentration * (1 - q)))
                rows.append({"group": f"prompt-{g}", "a": a, "b": b, "p": p, "len_a": lens[a], "len_b": lens[b]})
    return rows


def test_win_probability_is_the_elo_curve():
    assert win_probability(0) == 0.5
    assert win_probability(400) == pytest.approx(10 / 11)
    assert win_probability(-400) == pytest.approx(1 / 11)
    assert win_probability(1e6) == 1.0 and win_probability(-1e6) == 0.0  # no overflow


@pytest.mark.parametrize("length_control", [False, True])
def test_recovers_known_ratings(length_control):
    """300 prompts × 3 pairs; the standard error is about 8 Elo, the tolerance 30. With length
    control on data whose lengths carry no signal, β comes out near 0 and the ratings stay put."""
    rng = np.random.default_rng(7)
    log_len = {"base": 6.0, "better": 6.0, "worse": 6.0}
    rows = synthetic(rng, 300, TRUE, log_len=log_len)
    r = fit(rows, list(TRUE), "base", length_control=length_control, n_boot=0)
    for m, elo in TRUE.items():
        assert r["models"][m]["elo"] == pytest.approx(elo, abs=30), m
        assert r["models"][m]["n"] == 600
        assert r["models"][m]["low"] is None and r["models"][m]["high"] is None  # n_boot=0
    assert r["models"]["base"]["elo"] == 0.0
    assert (r["n_comparisons"], r["n_groups"], r["n_boot"], r["length_control"]) == (900, 300, 0, length_control)
    wp = r["win_prob"]
    assert set(wp) == set(TRUE) and all(set(v) == set(TRUE) - {k} for k, v in wp.items())
    assert wp["better"]["worse"] == pytest.approx(
        win_probability(r["models"]["better"]["elo"] - r["models"]["worse"]["elo"])
    )
    assert wp["better"]["worse"] + wp["worse"]["better"] == pytest.approx(1.0)
    if length_control:
        assert abs(r["length_coef"]) < 40
    else:
        assert r["length_coef"] is None


def test_intervals_cover_the_truth():
    """200 seeded data sets of 100 prompts, 200 bootstrap replicates each: the 95% intervals of the
    two free models cover their true ratings in at least 90% of all 400 cases (each model at least
    87%), and are not trivially wide (their half-width is about 2 standard errors, ~28 Elo)."""
    covered = {m: 0 for m in ("better", "worse")}
    widths = []
    trials = 200
    for s in range(trials):
        rows = synthetic(np.random.default_rng(1000 + s), 100, TRUE)
        r = fit(rows, list(TRUE), "base", n_boot=200, seed=s)
        for m in covered:
            lo, hi = r["models"][m]["low"], r["models"][m]["high"]
            assert lo <= r["models"][m]["elo"] <= hi
            covered[m] += lo <= TRUE[m] <= hi
            widths.append(hi - lo)
    assert sum(covered.values()) >= 0.90 * 2 * trials, covered
    assert min(covered.values()) >= 0.87 * trials, covered
    assert 30 < float(np.mean(widths)) < 90


@pytest.mark.parametrize("length_control", [False, True])
def test_first_slot_judge_after_swap_averaging_is_flat(length_control):
    """A judge that always prefers whichever answer is shown first: averaged over both orders every
    p is exactly 0.5, so every rating (and interval) is 0 and every win probability 0.5."""

    def first_slot_judge(first: str, second: str) -> float:  # P(the answer shown first is better)
        return 1.0

    rng = np.random.default_rng(3)
    models = ["m0", "m1", "m2", "m3"]
    rows = []
    for g in range(40):
        for _ in range(3):
            a, b = rng.choice(models, size=2, replace=False).tolist()
            p_ab = first_slot_judge(a, b)  # a shown as (A): P(A)
            p_ba = 1.0 - first_slot_judge(b, a)  # a shown as (B): P(B)
            p = swap_average(p_ab, p_ba)
            rows.append({"group": g, "a": a, "b": b, "p": p, "len_a": 10.0 * (g + 1), "len_b": 35.0})
    assert {row["p"] for row in rows} == {0.5}
    r = fit(rows, models, "m2", length_control=length_control, n_boot=50)
    for m in models:
        assert r["models"][m]["elo"] == pytest.approx(0.0, abs=1e-9)
        assert r["models"][m]["low"] == pytest.approx(0.0, abs=1e-9)
        assert r["models"][m]["high"] == pytest.approx(0.0, abs=1e-9)
    assert all(v == pytest.approx(0.5, abs=1e-12) for row in r["win_prob"].values() for v in row.values())
    if length_control:
        assert r["length_coef"] == pytest.approx(0.0, abs=1e-9)


def test_length_control_removes_a_planted_length_bias():
    """Equal true ratings; outcomes depend only on the length difference (1 logit per unit log
    ratio, ~174 Elo), and "long" writes ~2.7x longer answers than "short". The plain fit rates long
    far above short; the length-controlled fit puts all three near 0 and finds β."""
    rng = np.random.default_rng(11)
    equal = {"mid": 0.0, "long": 0.0, "short": 0.0}
    log_len = {"mid": 6.0, "long": 6.5, "short": 5.5}
    rows = synthetic(rng, 300, equal, log_len=log_len, length_logit=1.0)
    plain = fit(rows, list(equal), "mid", n_boot=100)
    controlled = fit(rows, list(equal), "mid", length_control=True, n_boot=100)
    assert plain["models"]["long"]["elo"] > 60 and plain["models"]["long"]["low"] > 0
    assert plain["models"]["short"]["elo"] < -60 and plain["models"]["short"]["high"] < 0
    assert plain["win_prob"]["long"]["short"] > 0.65
    for m in equal:
        assert abs(controlled["models"][m]["elo"]) < 30, m
        assert controlled["models"][m]["low"] < 0 < controlled["models"][m]["high"] or m == "mid"
    assert abs(controlled["win_prob"]["long"]["short"] - 0.5) < 0.05
    assert controlled["length_coef"] == pytest.approx(ELO, rel=0.25)
    assert controlled["length_coef"] > 100


def test_separable_data_gives_large_finite_ratings():
    """The model "top" wins every comparison with p = 1 and "bottom" loses every one with p = 0: without the
    ridge both would be infinite. They come out finite, far apart, and the bootstrap stays finite."""
    rng = np.random.default_rng(5)
    rows = []
    for g in range(30):
        rows.append({"group": g, "a": "top", "b": "mid", "p": 1.0})
        rows.append({"group": g, "a": "bottom", "b": "mid", "p": 0.0})
        rows.append({"group": g, "a": "mid", "b": "ref", "p": float(rng.uniform(0.3, 0.7))})
    r = fit(rows, ["ref", "mid", "top", "bottom"], "ref", n_boot=100)
    ms = r["models"]
    for m in ms:
        for k in ("elo", "low", "high"):
            assert ms[m][k] is not None and math.isfinite(ms[m][k]), (m, k)
    assert ms["top"]["elo"] - ms["mid"]["elo"] > 1000
    assert ms["mid"]["elo"] - ms["bottom"]["elo"] > 1000
    assert abs(ms["mid"]["elo"]) < 200
    assert r["win_prob"]["top"]["mid"] > 0.99 and r["win_prob"]["bottom"]["mid"] < 0.01


def test_absent_and_disconnected_models_get_none():
    rows = [
        {"group": 0, "a": "x", "b": "y", "p": 0.7},
        {"group": 1, "a": "y", "b": "x", "p": 0.4},
        {"group": 1, "a": "z", "b": "w", "p": 0.9},  # z-w is an island: not connected to the anchor x
    ]
    r = fit(rows, ["x", "y", "z", "w", "absent"], "x", n_boot=20)
    ms = r["models"]
    assert ms["x"] == {"elo": 0.0, "low": 0.0, "high": 0.0, "n": 2}
    assert ms["y"]["elo"] is not None and ms["y"]["n"] == 2
    for m, n in (("z", 1), ("w", 1), ("absent", 0)):
        assert ms[m] == {"elo": None, "low": None, "high": None, "n": n}
        assert all(v is None for v in r["win_prob"][m].values())
        assert r["win_prob"]["x"][m] is None
    assert r["win_prob"]["x"]["y"] is not None
    assert r["n_comparisons"] == 3 and r["n_groups"] == 2
    # An anchor with no comparisons leaves nothing rated.
    r = fit(rows, ["x", "y", "z", "w", "absent"], "absent", n_boot=20)
    assert all(v["elo"] is None for v in r["models"].values())


def test_bootstrap_replicates_missing_a_model_are_left_out():
    """The model "rare" is compared on 2 of 50 prompts only; in replicates that draw neither it has no rating
    (not the ridge's 0), so its interval comes from the replicates that saw it and sits above 0."""
    rows = [{"group": g, "a": "p", "b": "q", "p": 0.6} for g in range(50)]
    rows += [{"group": g, "a": "rare", "b": "p", "p": 0.9} for g in (0, 1)]
    r = fit(rows, ["p", "q", "rare"], "p", n_boot=300)
    rare = r["models"]["rare"]
    # Every replicate that saw "rare" sees p = 0.9 only, so all agree up to the ridge's tiny pull.
    assert rare["low"] == pytest.approx(rare["elo"], abs=0.01)
    assert rare["high"] == pytest.approx(rare["elo"], abs=0.01)
    assert rare["elo"] == pytest.approx(400 * math.log10(9), abs=0.01)


def test_seeded_and_deterministic():
    rows = synthetic(np.random.default_rng(2), 60, TRUE, log_len={m: 5.0 for m in TRUE})
    for lc in (False, True):
        one = fit(rows, list(TRUE), "base", length_control=lc, n_boot=200, seed=4)
        assert fit(rows, list(TRUE), "base", length_control=lc, n_boot=200, seed=4) == one
        other = fit(rows, list(TRUE), "base", length_control=lc, n_boot=200, seed=5)
        assert other["seed"] == 5
        for m in ("better", "worse"):
            assert other["models"][m]["elo"] == one["models"][m]["elo"]  # the point fit has no randomness
            assert (other["models"][m]["low"], other["models"][m]["high"]) != (
                one["models"][m]["low"],
                one["models"][m]["high"],
            )


def test_level_changes_the_interval_width():
    rows = synthetic(np.random.default_rng(9), 80, TRUE)
    wide = fit(rows, list(TRUE), "base", n_boot=300, level=0.95)["models"]["better"]
    narrow = fit(rows, list(TRUE), "base", n_boot=300, level=0.5)["models"]["better"]
    assert wide["low"] < narrow["low"] < narrow["elo"] < narrow["high"] < wide["high"]


GOOD = {"group": "g", "a": "x", "b": "y", "p": 0.5, "len_a": 3, "len_b": 4}


@pytest.mark.parametrize(
    ("change", "length_control", "field"),
    [
        ({"p": 1.5}, False, "'p'"),
        ({"p": -0.1}, False, "'p'"),
        ({"p": float("nan")}, False, "'p'"),
        ({"p": float("inf")}, False, "'p'"),
        ({"p": None}, False, "'p'"),
        ({"p": "0.5"}, False, "'p'"),
        ({"a": "nobody"}, False, "'a'"),
        ({"b": "nobody"}, False, "'b'"),
        ({"b": "x"}, False, "'b'"),  # a == b
        ({"len_a": -1}, True, "'len_a'"),
        ({"len_b": float("nan")}, True, "'len_b'"),
        ({"group": None, "p": 0.5}, False, None),  # None is a valid (hashable) group
    ],
)
def test_validation_names_the_comparison_and_field(change, length_control, field):
    rows = [dict(GOOD) for _ in range(4)]
    rows[2].update(change)
    if field is None:
        fit(rows, ["x", "y"], "x", length_control=length_control, n_boot=0)
        return
    with pytest.raises(ValueError, match=rf"comparisons\[2\].*{field}"):
        fit(rows, ["x", "y"], "x", length_control=length_control, n_boot=0)


def test_validation_of_missing_fields_and_arguments():
    rows = [dict(GOOD) for _ in range(3)]
    del rows[1]["p"]
    with pytest.raises(ValueError, match=r"comparisons\[1\].*'p' is missing"):
        fit(rows, ["x", "y"], "x")
    rows = [{k: v for k, v in GOOD.items() if k != "len_b"}]
    fit(rows, ["x", "y"], "x", n_boot=0)  # lengths are needed only with length control
    with pytest.raises(ValueError, match=r"comparisons\[0\].*'len_b' is missing"):
        fit(rows, ["x", "y"], "x", length_control=True)
    with pytest.raises(ValueError, match="empty"):
        fit([], ["x", "y"], "x")
    with pytest.raises(ValueError, match="anchor 'z'"):
        fit([GOOD], ["x", "y"], "z")
    with pytest.raises(ValueError, match="duplicates"):
        fit([GOOD], ["x", "y", "x"], "x")
    with pytest.raises(ValueError, match="n_boot"):
        fit([GOOD], ["x", "y"], "x", n_boot=-1)
    with pytest.raises(ValueError, match="level"):
        fit([GOOD], ["x", "y"], "x", level=1.0)
