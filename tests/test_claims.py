"""Oracle tests for ``swalab claims``: verdicts on run directories built by hand with known answers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from swalab.cli import main
from swalab.lab.config import (
    ConfigError,
    ExperimentConfig,
    load_config,
    preset_names,
    to_dict,
)
from swalab.lab.power import t_test_power
from swalab.lab.rundir import RESULT_FIELDS
from swalab.report import build_report, geometry
from swalab.report.claims import (
    Claim,
    evaluate_claims,
    fieller_interval,
    paired_verdict,
    seeds_to_decide,
)
from swalab.report.geometry import landscapes_of_run

SEEDS = [0, 1, 2]
IDS = ["1", "2", "3a", "3b", "3c", "4a", "4b", "5", "6", "6b", "7"]
# with the rays of both protocols (a run whose landscape has them): claim 2 has its raw-ray line too
IDS_WITH_RAYS = [*IDS[:2], "2 (raw rays)", *IDS[2:]]
T975_2 = 4.302652729911275  # t_{0.975, 2}: scipy.stats.t.ppf(0.975, 2)
METHODS = (
    "[{method: sgd}, {method: swa}, {method: sgd, label: sgd-const, options: {schedule: constant}},"
    " {method: swa, label: swa-const, baseline: sgd-const, options: {schedule: constant}}]"
)


def make_run(
    path: Path,
    metric: dict[str, list[float]],
    preset: str = "mnist1d",
    methods: str = METHODS,
    large: dict[str, list[float]] | None = None,
) -> Path:
    """config.yaml and results.csv with ``metric[label][seed]`` (accuracy, or MSE for a regression
    preset), and ``large[label][seed]`` on the large test set."""
    cfg = load_config(preset, [f"seeds={SEEDS}", f"methods={methods}"])
    return write_run(path, cfg, metric, large)


def write_run(
    path: Path,
    cfg: ExperimentConfig,
    metric: dict[str, list[float]],
    large: dict[str, list[float]] | None = None,
) -> Path:
    """A finished run directory of ``cfg`` as ``swalab claims`` reads it: config.yaml, and a done
    row of results.csv for every method in ``metric`` and seed of ``SEEDS`` (``metric[label][i]``:
    test accuracy, or test MSE for a regression task; ``large[label][i]``: the same on the large
    test set)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    regression = cfg.data.name.startswith(("friedman", "toy2d"))
    key = "test_mse" if regression else "test_accuracy"
    rows = [
        {
            "method": m.label,
            "method_name": m.method,
            "baseline": m.baseline,
            "seed": s,
            "budget": m.budget,
            "epochs": 1,
            "status": "done",
            key: metric[m.label][i],
            **({f"large_{key}": large[m.label][i]} if large else {}),
            "test_loss": 0.1,
        }
        for i, s in enumerate(SEEDS)
        for m in cfg.methods
        if m.label in metric
    ]
    with (path / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_landscape(run: Path, seed: int, **pieces) -> Path:
    """``landscape.json`` of one seed (first seed: landscape/, others: landscape/seed<k>/)."""
    where = run / "landscape" if seed == SEEDS[0] else run / "landscape" / f"seed{seed}"
    where.mkdir(parents=True, exist_ok=True)
    line = pieces.pop("line_loss", None)
    l2 = pieces.pop("line_l2", 0.0)  # the L2 term, a constant added to the NLL along the line
    if line is not None:
        ts = np.linspace(-0.5, 1.5, 21)
        np.savez(where / "line.npz", t=ts, train_loss=line(ts) + l2, train_nll=line(ts))
        pieces["line"] = {
            "swa": {"train_nll": float(line(np.array([0.0]))[0])},
            "sgd": {"train_nll": float(line(np.array([1.0]))[0])},
        }
    (where / "landscape.json").write_text(
        json.dumps({"seed": seed, "sgd": "sgd", "swa": "swa", **pieces})
    )
    return where


def by_id(claims: list[Claim]) -> dict[str, Claim]:
    return {c.id: c for c in claims}


def expected_interval(d: list[float]) -> tuple[float, float, float]:
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    return mean, mean - T975_2 * sd / math.sqrt(3), mean + T975_2 * sd / math.sqrt(3)


# --- the rule -----------------------------------------------------------------------------------


def test_interval_and_verdicts_by_hand():
    d = [1.0, 2.0, 4.0]  # mean 7/3, sd 1.5275
    c = paired_verdict(Claim("x", "t", "s", "d"), dict(zip(SEEDS, d)))
    mean, low, high = expected_interval(d)
    assert (c.mean, c.low, c.high) == pytest.approx((mean, low, high))
    assert low < 0 < high and c.verdict == "undecided"
    assert (
        paired_verdict(Claim("x", "t", "s", "d"), {0: 2.0, 1: 2.1, 2: 1.9}).verdict == "supported"
    )
    assert (
        paired_verdict(Claim("x", "t", "s", "d"), {0: -2.0, 1: -2.1, 2: -1.9}).verdict
        == "contradicted"
    )
    one = paired_verdict(Claim("x", "t", "s", "d"), {0: 5.0})
    assert one.verdict == "undecided" and one.low is None and "at least 2 seeds" in one.note

    # equivalence: inside the margin supported, outside contradicted, straddling undecided
    def eq(d):
        return paired_verdict(Claim("x", "t", "s", "d", margin=1.0), dict(zip(SEEDS, d))).verdict

    assert (eq([0.1, -0.1, 0.0]), eq([3.0, 3.1, 2.9]), eq([0.5, 1.5, 1.0])) == (
        "supported",
        "contradicted",
        "undecided",
    )


def test_seeds_to_decide_matches_power_tables():
    # one-sample / paired t-test, two-sided alpha 0.05, power 0.8 (G*Power): effect 1 -> 10, 0.5 -> 34
    assert seeds_to_decide(1.0, 1.0) == 10
    assert seeds_to_decide(0.5, 1.0) == 34
    assert seeds_to_decide(-0.5, 1.0) == 34  # the sign does not matter
    assert seeds_to_decide(0.0, 1.0) is None  # no difference: nothing decides it
    assert seeds_to_decide(0.0, 0.0) is None
    n = seeds_to_decide(0.3, 1.0)
    crit = scipy_stats.t.ppf(0.975, n - 1)

    def power(k):
        return scipy_stats.nct.sf(scipy_stats.t.ppf(0.975, k - 1), k - 1, 0.3 * math.sqrt(k))

    assert power(n) >= 0.8 > power(n - 1) and crit > 0
    # equivalence within ±1 at mean 0, sd 1: sqrt(n) >= t_{.975,n-1} + t_{.8,n-1}:
    # n = 9: 3.000 < 2.306 + 0.889 = 3.195; n = 10: 3.162 >= 2.262 + 0.883 = 3.145
    assert seeds_to_decide(0.0, 1.0, margin=1.0) == 10
    assert seeds_to_decide(1.5, 1.0, margin=1.0) is None  # beyond the margin


# --- each claim on a constructed run ------------------------------------------------------------


def test_claims_1_and_5_from_results(tmp_path):
    run = make_run(
        tmp_path / "run",
        {
            "sgd": [90.0, 91.0, 92.0],
            "swa": [91.0, 93.0, 96.0],
            "sgd-const": [80.0, 81.0, 82.0],
            "swa-const": [79.0, 80.1, 80.9],
        },
    )
    claims = by_id(evaluate_claims(run))
    assert claims["1"].values == {0: 1.0, 1: 2.0, 2: 4.0}
    assert (claims["1"].low, claims["1"].high) == pytest.approx(
        expected_interval([1.0, 2.0, 4.0])[1:]
    )
    assert claims["1"].verdict == "undecided" and claims["1"].seeds_needed == seeds_to_decide(
        7 / 3, np.std([1.0, 2.0, 4.0], ddof=1)
    )
    assert claims["5"].values == pytest.approx({0: -1.0, 1: -0.9, 2: -1.1})
    assert claims["5"].verdict == "contradicted"
    # the landscape claims name the command that produces their inputs
    for key in ("2", "3a", "3b", "4a", "6", "6b"):
        assert claims[key].verdict == "undecided" and not claims[key].values
        # the preset computes them in the run: resuming it computes what is missing
        assert f"`swalab run {run}/config.yaml --out {run}`" in claims[key].note


def test_missing_landscape_names_the_run_that_produces_it(tmp_path):
    """Without a landscape section the command adds it; without the SWA run's snapshots (the
    ensemble piece) it trains anew into another directory (a changed train section cannot resume)."""
    metric = {"sgd": [90.0, 91.0, 92.0], "swa": [91.0, 93.0, 96.0]}
    pieces = "--set 'landscape.pieces=[line,rays,ensemble,bn]'"
    cases = {
        "traj": ("train.save_trajectory=[swa]", f"--out {tmp_path}/traj {pieces}"),
        "none": ("train.save_trajectory=false", f"--out {tmp_path}/none-claims {pieces}"),
    }
    for name, (trajectory, expected) in cases.items():
        cfg = load_config(
            "mnist1d",
            [
                f"seeds={SEEDS}",
                f"methods={METHODS}",
                "landscape.pieces=[]",
                trajectory,
            ],
        )
        run = write_run(tmp_path / name, cfg, metric)
        note = by_id(evaluate_claims(run))["2"].note
        assert note.endswith(f"`swalab run {run}/config.yaml {expected}`"), note


def test_claim2_protocols_and_curvature_by_hand(tmp_path):
    """Claim 2's primary line reads the filter-normalised rays (the run's primary protocol), the
    raw rays follow as a labelled line, both on the train-NLL widths; the curvature piece adds
    the Hessian's top eigenvalue and trace, d = SGD − SWA."""
    run = make_run(tmp_path / "run", {"sgd": [90.0, 91.0, 92.0], "swa": [91.0, 92.0, 93.0]})

    def protocol(swa, sgd, cap):
        return {
            "max_distance": cap,
            "width": {"swa": {"per_ray": swa}, "sgd": {"per_ray": sgd}},
            # the objective's widths are not what claim 2 reads
            "width_objective": {"swa": {"per_ray": [0.0] * 3}, "sgd": {"per_ray": [9.0] * 3}},
        }

    for seed in SEEDS:
        e = 0.01 * seed
        rays = {
            "rays": 3,
            "rise": 0.1,
            "primary": "filter",
            "directions": ["filter", "raw"],
            "by_direction": {
                "filter": protocol([0.2 + e, 0.3, None], [0.2, 0.25, 0.3], 0.25),
                "raw": protocol([4.0, 4.5, 5.0], [4.5 + e, 5.0, 5.5], 10.0),
            },
        }
        curvature = {
            "swa": {"top_eigenvalue": 2.0, "trace": 20.0 + seed},
            "sgd": {"top_eigenvalue": 2.5 + e, "trace": 20.0},
        }
        write_landscape(run, seed, rays=rays, curvature=curvature)
    claims = by_id(evaluate_claims(run))
    # filter: medians of [e, 0.05, 0.25 - 0.3 = -0.05] = e (None counts as the range 0.25)
    assert claims["2"].values == pytest.approx({s: 0.01 * s for s in SEEDS})
    assert claims["2"].protocol.startswith("filter-normalised rays")
    # raw: medians of [-0.5 - e, -0.5, -0.5]
    assert claims["2 (raw rays)"].values == pytest.approx({s: -0.5 for s in SEEDS})
    assert claims["2 (raw rays)"].protocol.startswith("raw rays (the paper's Fig. 4")
    assert claims["2 (Hessian top eigenvalue)"].values == pytest.approx(
        {s: 0.5 + 0.01 * s for s in SEEDS}
    )
    assert claims["2 (Hessian top eigenvalue)"].verdict == "supported"
    assert claims["2 (Hessian trace)"].values == pytest.approx({s: -float(s) for s in SEEDS})
    ids = [c.id for c in evaluate_claims(run)]
    assert ids.index("2") + 1 == ids.index("2 (raw rays)")


def test_swa_identical_to_sgd_is_undecided_not_supported(tmp_path):
    run = make_run(tmp_path / "run", {"sgd": [90.0, 91.0, 92.0], "swa": [90.0, 91.0, 92.0]})
    ray = {
        "max_distance": 10.0,
        "rise": 0.1,
        "rays": 3,
        "width": {k: {"per_ray": [1.0, 2.0, None]} for k in ("swa", "sgd")},
    }
    for seed in SEEDS:
        write_landscape(
            run,
            seed,
            rays=ray,
            line_loss=lambda t: np.full_like(t, 0.3),  # one point
            ensemble={"average": 4.0, "ensemble": 4.0, "snapshots_mean": 4.0},
            bn={k: {"test_error": 4.0} for k in ("carried", "recomputed", "fresh", "averaged")},
        )
    claims = by_id(evaluate_claims(run))
    for key in ("1", "2", "3a", "3b", "3c", "4a", "6", "6b"):
        assert claims[key].values == {0: 0.0, 1: 0.0, 2: 0.0}, key
        assert claims[key].verdict == "undecided", key
        assert claims[key].seeds_needed is None  # no number of seeds decides a zero difference
    assert "no fge method" in claims["4b"].note and not claims["4b"].values
    # the ablation pair is configured but never ran: the note names the command that runs it
    assert (
        "no finished swa-const/sgd-const pair" in claims["5"].note
        and f"--out {run}" in claims["5"].note
    )


def test_landscape_claims_by_hand(tmp_path):
    run = make_run(tmp_path / "run", {"sgd": [90.0, 91.0, 92.0], "swa": [91.0, 92.0, 93.0]})
    slopes = {0: 1.0, 1: 1.1, 2: 1.2}
    for seed in SEEDS:
        a = slopes[seed]
        # widths: SWA wider by 2 + 0.1 seed on two rays, one SWA ray beyond the range (counts as 10)
        ray = {
            "max_distance": 10.0,
            "rise": 0.1,
            "rays": 3,
            "width": {
                "swa": {"per_ray": [4.0 + 0.1 * seed, 5.0 + 0.1 * seed, None]},
                "sgd": {"per_ray": [2.0, 3.0, 5.0]},
            },
        }
        write_landscape(
            run,
            seed,
            rays=ray,
            # flat towards SWA, NLL 0.02 at SWA (t = 0) and 0.01 at SGD (t = 1); L2 0.05 on top
            line_loss=lambda t, a=a: a * np.maximum(t - 1.0, 0.0) ** 2 + 0.02 - 0.01 * t,
            line_l2=0.05,
            # members 8 points, ensemble 5 (gain 3), SWA 5.5 + 0.1 seed (gain 2.5 - 0.1 seed)
            ensemble={"average": 5.5 + 0.1 * seed, "ensemble": 5.0, "snapshots_mean": 8.0},
            bn={
                "recomputed": {"test_error": 4.0},
                "fresh": {"test_error": 50.0 + seed},
                "carried": {"test_error": 4.5},
                "averaged": {"test_error": 6.0 + 0.1 * seed},
            },
        )
    claims = by_id(evaluate_claims(run))
    assert claims["2"].values == pytest.approx(
        {s: 2.0 + 0.1 * s for s in SEEDS}
    )  # medians of [2+, 2+, 5]
    # NLL(1.5) - NLL(0.5) = a (0.5)^2 - 0.01 (the constant L2 term cancels: 0% of the difference)
    assert claims["3a"].values == pytest.approx({s: 0.25 * a - 0.01 for s, a in slopes.items()})
    assert "the L2 term is 0% of it" in claims["3a"].secondary[0]
    assert claims["3b"].values == pytest.approx({s: 0.01 for s in SEEDS})  # NLL(SWA) - NLL(SGD)
    assert claims["3c"].values == claims["1"].values  # claim 1's statistic
    assert claims["4a"].values == pytest.approx({s: 1.0 - 0.1 * s for s in SEEDS})
    # the ensemble's gain has no spread: Fieller's interval is g_SWA's t-interval over 3
    _, low, high = expected_interval([2.5, 2.4, 2.3])
    assert f"0.80 (Fieller 95% [{low / 3:.2f}, {high / 3:.2f}])" in claims["4a"].secondary[0]
    assert claims["6"].values == pytest.approx({0: 46.0, 1: 47.0, 2: 48.0})  # fresh buffers
    assert "former claim 6" in claims["6"].secondary[0] and "+0.5" in claims["6"].secondary[0]
    assert claims["6b"].values == pytest.approx({0: 2.0, 1: 2.1, 2: 2.2})  # averaged buffers
    assert [claims[k].verdict for k in ("2", "3a", "3b", "3c", "4a", "6", "6b")] == [
        "supported"
    ] * 7
    # the train-split claims have no test sampling; the others say how theirs was estimated
    assert claims["3a"].sampling_share is None and claims["3a"].sampling.startswith("none")
    # the opposite geometry: SGD wider, loss rising towards SWA, SWA far from the ensemble, BN better kept
    for seed in SEEDS:
        ray = {
            "max_distance": 10.0,
            "rise": 0.1,
            "rays": 1,
            "width": {"swa": {"per_ray": [1.0]}, "sgd": {"per_ray": [2.0 + 0.1 * seed]}},
        }
        write_landscape(
            run,
            seed,
            rays=ray,
            line_loss=lambda t: (t + 0.5) ** 2,  # SWA (t = 0) lower than SGD (t = 1)
            ensemble={"average": 9.0 + 0.1 * seed, "ensemble": 5.0, "snapshots_mean": 8.0},
            bn={
                k: {"test_error": 3.0 if k != "recomputed" else 4.0 + 0.1 * seed}
                for k in ("recomputed", "fresh", "carried", "averaged")
            },
        )
    claims = by_id(evaluate_claims(run))
    assert [claims[k].verdict for k in ("2", "3b", "4a", "6", "6b")] == ["contradicted"] * 5
    assert claims["3a"].values == pytest.approx({s: 3.0 for s in SEEDS})  # 2² − 1²


def test_fieller_interval_by_hand():
    # the denominator with no spread: (mean(num) -+ t sd(num)/sqrt(n)) / mean(den)
    num, den = [2.5, 2.4, 2.3], [3.0, 3.0, 3.0]
    ratio, low, high = fieller_interval(num, den)
    _, lo, hi = expected_interval(num)
    assert (ratio, low, high) == pytest.approx((0.8, lo / 3, hi / 3))
    # the quadratic (a - R b)^2 = t^2 (vaa - 2 R vab + R^2 vbb) solved at the ends
    num, den = [1.0, 2.0, 1.5, 2.2], [2.0, 3.1, 2.4, 3.5]
    ratio, low, high = fieller_interval(num, den)
    a, b, n = np.mean(num), np.mean(den), 4
    cov = np.cov(num, den, ddof=1) / n
    t2 = scipy_stats.t.ppf(0.975, n - 1) ** 2
    for r in (low, high):
        lhs = (a - r * b) ** 2
        rhs = t2 * (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1])
        assert lhs == pytest.approx(rhs)
    assert low < ratio < high and ratio == pytest.approx(a / b)
    # a denominator indistinguishable from 0: unbounded
    assert fieller_interval([1.0, 2.0, 1.5], [0.5, -0.4, 0.1])[1:] == (-math.inf, math.inf)


def test_large_test_set_and_sampling_share_by_hand(tmp_path):
    """With large_test_* columns the claims read them and keep the published split on a labelled
    line; the sampling share is the binomial variance of the paired difference from the
    disagreement counts, over the variance of d across seeds (docs/claims.md)."""
    run = make_run(
        tmp_path / "run",
        {"sgd": [90.0, 91.0, 92.0], "swa": [91.0, 93.0, 96.0]},
        large={"sgd": [80.0, 80.0, 80.0], "swa": [80.5, 80.7, 80.3]},
    )
    n = 1000
    counts = {0: (30, 25), 1: (40, 33), 2: (20, 17)}  # (b: SWA alone right, c: SGD alone right)
    for seed, (b, c) in counts.items():
        both = 700  # right by both; the rest wrong by both
        sgd = np.zeros(n, np.float32)
        swa = np.zeros(n, np.float32)
        sgd[:both] = swa[:both] = 1
        swa[both : both + b] = 1
        sgd[both + b : both + b + c] = 1
        for label, scores in (("sgd", sgd), ("swa", swa)):
            where = run / label / f"seed{seed}"
            where.mkdir(parents=True)
            np.savez(where / "per_sample.npz", test=scores[:100], large_test=scores)
    claim = by_id(evaluate_claims(run))["1"]
    assert claim.values == pytest.approx({0: 0.5, 1: 0.7, 2: 0.3})  # the large test set
    assert "large test set" in claim.protocol
    assert claim.secondary[0].startswith("published test split: mean d +2.33")
    v = {s: 100**2 * ((b + c) / n - ((b - c) / n) ** 2) / n for s, (b, c) in counts.items()}
    expected = np.mean(list(v.values())) / np.var([0.5, 0.7, 0.3], ddof=1)
    assert claim.sampling_share == pytest.approx(expected)
    assert "1,000 test samples" in claim.sampling
    # minimum detectable effect at n = 3 and the observed sd, power 0.8
    sd = float(np.std([0.5, 0.7, 0.3], ddof=1))
    assert t_test_power(claim.mde / sd, 3) == pytest.approx(0.8)


def test_landscape_of_other_labels_is_not_used(tmp_path):
    run = make_run(tmp_path / "run", {"sgd": [90.0, 91.0, 92.0], "swa": [91.0, 92.0, 93.0]})
    where = write_landscape(
        run, 0, bn={"carried": {"test_error": 9.0}, "recomputed": {"test_error": 4.0}}
    )
    summary = json.loads((where / "landscape.json").read_text())
    (where / "landscape.json").write_text(json.dumps({**summary, "swa": "swa-const"}))
    claims = by_id(evaluate_claims(run))
    assert not claims["6"].values and "other labels" in claims["6"].note


def test_regression_preset(tmp_path):
    methods = "[{method: sgd}, {method: swa}]"
    run = make_run(
        tmp_path / "run",
        {"sgd": [0.20, 0.30, 0.25], "swa": [0.18, 0.279, 0.231]},
        "friedman1",
        methods,
    )
    for seed in SEEDS:
        write_landscape(
            run,
            seed,
            ensemble={"average": 0.22, "ensemble": 0.20, "snapshots_mean": 0.25},
            skipped={"bn": "mlp has no BatchNorm: nothing to recompute"},
        )
    claims = by_id(evaluate_claims(run))
    assert claims["1"].values == pytest.approx({0: 0.02, 1: 0.021, 2: 0.019})  # MSE: SGD minus SWA
    assert claims["1"].verdict == "supported"
    # gains in MSE: SWA 0.03, ensemble 0.05; d = 0.03 - 0.5 * 0.05
    assert claims["4a"].values == pytest.approx({s: 0.005 for s in SEEDS})
    assert claims["4a"].verdict == "supported"
    assert "no BatchNorm" in claims["6"].note and not claims["6"].values
    assert "no BatchNorm" in claims["6b"].note and not claims["6b"].values
    assert (
        "no fixed-LR ablation" in claims["5"].note and "swa-const" in claims["5"].note
    )  # not configured


# --- the run's landscape section -------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, message",
    [
        (["landscape.pieces=[line, lines]"], r"landscape.pieces must be a list of line, rays, "),
        (["landscape.first_seed=[cube]"], r"landscape.first_seed must be a list of line, "),
        (["landscape.rays=0"], r"landscape.rays must be >= 1, got 0"),
        (["landscape.ray_points=1"], r"landscape.ray_points must be >= 2, got 1"),
        (["landscape.rise=-0.1"], r"landscape.rise must be > 0, got -0.1"),
        (["landscape.ray_tails=maybe"], r"landscape.ray_tails must be bool, got 'maybe'"),
        (
            ["landscape.directions=[filter, unit]"],
            r"landscape.directions must be a non-empty list of distinct filter, layer, raw",
        ),
        (["landscape.curvature_probes=0"], r"landscape.curvature_probes must be >= 1, got 0"),
        (["train.bn_weighting=size"], r"train.bn_weighting must be batches or samples, got 'size'"),
        (["train.save_trajectory=[swa, swq]"], r"labels \(sgd, swa, .*\), got 'swq'"),
    ],
)
def test_landscape_section_errors(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("mnist1d", sets)


def test_save_trajectory_of_some_runs():
    """A list of labels keeps those runs' snapshots; the pieces that read the SWA run's snapshots
    add its label, whatever it is called (a preset's section survives ``--set methods=...``)."""
    cfg = load_config("mnist1d")  # the preset: the SWA run alone, for the ensemble piece
    assert cfg.train.save_trajectory == ["swa"]
    assert [m.label for m in cfg.methods if cfg.train.saves_trajectory(m.label)] == ["swa"]
    renamed = load_config("mnist1d", ["methods=[{method: sgd}, {method: swa, label: wild}]"])
    assert renamed.train.save_trajectory == ["wild"]
    assert load_config("mnist1d", ["train.save_trajectory=[sgd]"]).train.save_trajectory == [
        "sgd",
        "swa",
    ]
    every = load_config("mnist1d", ["train.save_trajectory=true"]).train
    assert every.saves_trajectory("sgd") and every.saves_trajectory("swa")
    no_pair = load_config("mnist1d", ["methods=[{method: sgd}, {method: ema}]"]).train
    assert no_pair.save_trajectory is False  # nothing to compare: the run skips the pieces
    none = load_config(
        "mnist1d",
        ["train.save_trajectory=false", "landscape.pieces=[line]", "landscape.first_seed=[]"],
    ).train
    assert not none.saves_trajectory("swa")
    off = load_config("mnist1d", ["train.save_trajectory=false", "landscape.pieces=[]"]).train
    assert not off.saves_trajectory("swa")  # no landscape step: the first seed's plane neither
    # the paper's plane starts at an iterate of the SWA run: that run keeps its snapshots
    plane = load_config(
        "mnist1d",
        ["train.save_trajectory=false", "landscape.pieces=[line]", "landscape.first_seed=[plane]"],
    ).train
    assert plane.save_trajectory == ["swa"]


def test_run_landscape_skips_seeds_without_a_finished_pair(tmp_path):
    """A diverged or unfinished SGD/SWA run of a seed: its landscape is skipped with a line (the
    claims then name the command), not an error after the training."""
    run = write_run(tmp_path / "run", load_config("mnist1d", [f"seeds={SEEDS}"]), {})
    # seed 0: SWA diverged; seed 1: SWA not finished; seed 2: nothing ran
    for label, seed, status in (("sgd", 0, "done"), ("swa", 0, "diverged"), ("sgd", 1, "done")):
        where = run / label / f"seed{seed}"
        where.mkdir(parents=True)
        (where / "result.json").write_text(json.dumps({"status": status}))
    lines: list[str] = []
    assert landscapes_of_run(run, log=lines.append) == []
    assert lines == [
        "landscape seed 0 skipped: sgd done, swa diverged",
        "landscape seed 1 skipped: sgd done, swa not finished",
        "landscape seed 2 skipped: sgd not finished, swa not finished",
        "landscape pieces line, rays, ensemble, bn, plane, predictions: nothing left to compute",
    ]


def test_first_seed_pieces_go_to_the_first_seed_alone(tmp_path, monkeypatch):
    """``landscape.first_seed`` (the preset: the paper's Fig. 1 plane and the final predictions) is
    computed for the first seed only, the other pieces for every seed."""
    run = write_run(tmp_path / "run", load_config("mnist1d", [f"seeds={SEEDS}"]), {})
    for label in ("sgd", "swa"):
        for seed in SEEDS:
            where = run / label / f"seed{seed}"
            where.mkdir(parents=True)
            (where / "result.json").write_text(json.dumps({"status": "done"}))
    asked = {}
    monkeypatch.setattr(
        geometry, "_landscape_job", lambda path, opts: asked.setdefault(opts.seed, opts.what)
    )
    assert landscapes_of_run(run, log=lambda _: None) == SEEDS
    assert asked[SEEDS[0]] == ["line", "rays", "ensemble", "bn", "plane", "predictions"]
    assert all(asked[s] == ["line", "rays", "ensemble", "bn"] for s in SEEDS[1:])


# --- command line and report --------------------------------------------------------------------


def test_cli_prints_six_verdicts(tmp_path, capsys):
    run = make_run(
        tmp_path / "run",
        {
            "sgd": [90.0, 91.0, 92.0],
            "swa": [91.0, 92.5, 93.0],
            "sgd-const": [80.0, 81.0, 82.0],
            "swa-const": [85.0, 86.0, 87.5],
        },
    )
    assert main(["claims", str(run)]) == 0
    out = capsys.readouterr().out
    assert [line.split(".")[0] for line in out.splitlines() if line[:1].isdigit()] == IDS
    assert out.count("verdict: ") == len(IDS) and "verdict: SUPPORTED" in out
    # every claim: its verdict, the primary protocol, the interval, the minimum detectable effect
    # and the test-sampling share
    assert out.count("primary protocol: ") == len(IDS)
    assert out.count(", minimum detectable effect ") == len(IDS)
    assert out.count("\n  test-sampling share: ") == len(IDS)
    assert main(["claims", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_run_then_claims_end_to_end(tmp_path, capsys):
    """``swalab run`` computes the landscape pieces of every seed (two at once under --jobs 2,
    in spawned processes) and ``swalab claims`` reads them: six verdicts with intervals."""
    run = tmp_path / "run"
    tiny = [
        "seeds=[0, 1]",
        "train.epochs=4",
        "data.train_size=400",
        "data.test_size=200",
        "data.options.large_test=200",
        "methods=[{method: sgd}, {method: swa, options: {swa_lr: 0.05, swa_start: 2}},"
        " {method: sgd, label: sgd-const, options: {schedule: constant}},"
        " {method: swa, label: swa-const, baseline: sgd-const,"
        " options: {schedule: constant, swa_start: 2}}]",
        "landscape.rays=2",
        "landscape.ray_points=3",
        "landscape.line_points=5",
        "landscape.grid=3",
    ]
    argv = ["run", "mnist1d", "--out", str(run), "--jobs", "2"]
    argv += [arg for item in tiny for arg in ("--set", item)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "landscape pieces line, rays, ensemble, bn, plane, predictions of 2 seed(s), 2 at a time"
        in out
    )
    first = {"plane", "predictions"}
    for where, plane in ((run / "landscape", first), (run / "landscape" / "seed1", set())):
        summary = json.loads((where / "landscape.json").read_text())
        # the paper's Fig. 1 plane and the calibration for the first seed alone (the preset's first_seed)
        assert set(summary["settings"]) == {"line", "rays", "ensemble", "bn"} | plane
        assert summary["rays"]["rays"] == 2 and not summary["rays"]["tails"]
    # the SWA run alone kept its snapshots (train.save_trajectory: [swa] in the preset)
    assert (run / "swa" / "seed1" / "trajectory").is_dir()
    assert not (run / "sgd" / "seed1" / "trajectory").exists()
    assert main(argv) == 0  # resumed: nothing left to train or to compute
    assert "nothing left to compute" in capsys.readouterr().out
    assert main(["claims", str(run)]) == 0
    out = capsys.readouterr().out
    ids = [line.split(".")[0] for line in out.splitlines() if line[:1].isdigit()]
    assert ids == IDS_WITH_RAYS
    assert out.count("verdict: ") == len(ids) and out.count("95% CI [") >= len(ids) - 1, out
    # the large test set was evaluated and the runs kept their per-sample scores
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert all(float(r["large_test_accuracy"]) > 0 for r in rows)
    assert np.load(run / "swa" / "seed1" / "per_sample.npz")["large_test"].shape == (200,)
    blocks = {b.split(".")[0]: b for b in out.split("\n\n")[1:]}
    for key in ("1", "4a", "5", "6", "6b"):  # test-set statistics with per-sample scores
        share = blocks[key].split("test-sampling share: ")[1].split(" ")[0]
        assert share.endswith("%") or share == "∞", blocks[key]
    assert "filter-normalised rays (Li et al. 2018), width on the train NLL" in out


def test_report_opens_with_the_claims(tmp_path):
    run = make_run(
        tmp_path / "run",
        {
            "sgd": [90.0, 91.0, 92.0],
            "swa": [91.0, 93.0, 96.0],
            "sgd-const": [80.0, 81.0, 82.0],
            "swa-const": [79.0, 80.1, 80.9],
        },
    )
    report = build_report(run, log=lambda _: None)
    markdown = report["markdown"].read_text()
    assert markdown.index("## Claims") < markdown.index("## Results")
    assert "| 5. Averaging at a constant learning rate beats the constant-LR iterate |" in markdown
    assert "contradicts the paper on: claim 5" in markdown


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_gets_six_claims(tmp_path, preset):
    """Table 1 presets included: the claims read the preset's own methods, whatever the task."""
    cfg = load_config(preset, [f"seeds={SEEDS}"])
    regression = cfg.data.name.startswith(("friedman", "toy2d"))
    metric = {
        m.label: [0.5 + 0.01 * s if regression else 90.0 + s for s in SEEDS] for m in cfg.methods
    }
    write_run(tmp_path / "run", cfg, metric)
    claims = evaluate_claims(tmp_path / "run")
    assert [c.id for c in claims if c.id[0] != "1" or c.id == "1"] == IDS
    for c in claims:
        assert c.values or c.note, c.id  # a verdict's inputs, or a line saying what is missing
        if c.id.startswith("1") and c.values:
            assert c.values == {s: 0.0 for s in SEEDS} and c.verdict == "undecided"
