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
from swalab.lab.rundir import RESULT_FIELDS
from swalab.report import build_report
from swalab.report.claims import Claim, evaluate_claims, paired_verdict, seeds_to_decide
from swalab.report.geometry import landscapes_of_run

SEEDS = [0, 1, 2]
T975_2 = 4.302652729911275  # t_{0.975, 2}: scipy.stats.t.ppf(0.975, 2)
METHODS = (
    "[{method: sgd}, {method: swa}, {method: sgd, label: sgd-const, options: {schedule: constant}},"
    " {method: swa, label: swa-const, baseline: sgd-const, options: {schedule: constant}}]"
)


def make_run(
    path: Path, metric: dict[str, list[float]], preset: str = "mnist1d", methods: str = METHODS
) -> Path:
    """config.yaml and results.csv with ``metric[label][seed]`` (accuracy, or MSE for a regression preset)."""
    return write_run(path, load_config(preset, [f"seeds={SEEDS}", f"methods={methods}"]), metric)


def write_run(path: Path, cfg: ExperimentConfig, metric: dict[str, list[float]]) -> Path:
    """A finished run directory of ``cfg`` as ``swalab claims`` reads it: config.yaml, and a done
    row of results.csv for every method in ``metric`` and seed of ``SEEDS`` (``metric[label][i]``:
    test accuracy, or test MSE for a regression task)."""
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
    if line is not None:
        ts = np.linspace(-0.5, 1.5, 21)
        np.savez(where / "line.npz", t=ts, train_loss=line(ts))
        pieces["line"] = {}
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
    for key in "2346":
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
            "mnist1d", [f"seeds={SEEDS}", f"methods={METHODS}", "landscape.pieces=[]", trajectory]
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
    assert claims["2"].statistic.startswith("protocol: filter-normalised rays")
    # raw: medians of [-0.5 - e, -0.5, -0.5]
    assert claims["2 (raw rays)"].values == pytest.approx({s: -0.5 for s in SEEDS})
    assert claims["2 (raw rays)"].statistic.startswith("protocol: raw rays (the paper's Fig. 4")
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
            ensemble={"average": 4.0, "ensemble": 4.0},
            bn={"carried": {"test_error": 4.0}, "recomputed": {"test_error": 4.0}},
        )
    claims = by_id(evaluate_claims(run))
    for key in ("1", "2", "3", "6"):
        assert claims[key].values == {0: 0.0, 1: 0.0, 2: 0.0}, key
        assert claims[key].verdict == "undecided", key
        assert claims[key].seeds_needed is None  # no number of seeds decides a zero difference
    assert claims["4"].verdict == "supported"  # identical predictions: equivalent within any margin
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
            line_loss=lambda t, a=a: a * np.maximum(t - 1.0, 0.0) ** 2 + 0.01,  # flat towards SWA
            ensemble={"average": 5.0 + 0.1 * seed, "ensemble": 5.0},
            bn={"carried": {"test_error": 50.0 + seed}, "recomputed": {"test_error": 4.0}},
        )
    claims = by_id(evaluate_claims(run))
    assert claims["2"].values == pytest.approx(
        {s: 2.0 + 0.1 * s for s in SEEDS}
    )  # medians of [2+, 2+, 5]
    assert claims["3"].values == pytest.approx(
        {s: 0.25 * a for s, a in slopes.items()}
    )  # a (0.5)^2 - 0
    assert claims["4"].values == pytest.approx({0: 0.0, 1: 0.1, 2: 0.2})
    assert claims["6"].values == pytest.approx({0: 46.0, 1: 47.0, 2: 48.0})
    assert [claims[k].verdict for k in "2346"] == [
        "supported",
        "supported",
        "supported",
        "supported",
    ]
    # the opposite geometry: SGD wider, loss rising towards SWA, SWA far from the ensemble, BN better carried
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
            line_loss=lambda t: (t - 1.6) ** 2,
            ensemble={"average": 9.0 + 0.1 * seed, "ensemble": 5.0},
            bn={"carried": {"test_error": 3.0}, "recomputed": {"test_error": 4.0 + 0.1 * seed}},
        )
    claims = by_id(evaluate_claims(run))
    assert [claims[k].verdict for k in "2346"] == ["contradicted"] * 4


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
            ensemble={"average": 0.22, "ensemble": 0.20},
            skipped={"bn": "mlp has no BatchNorm: nothing to recompute"},
        )
    claims = by_id(evaluate_claims(run))
    assert claims["1"].values == pytest.approx({0: 0.02, 1: 0.021, 2: 0.019})  # MSE: SGD minus SWA
    assert claims["1"].verdict == "supported"
    assert claims["4"].values == pytest.approx(
        {s: 10.0 for s in SEEDS}
    )  # +10% of the ensemble's MSE
    assert claims["4"].verdict == "contradicted"  # beyond the 5% margin on every seed
    assert "no BatchNorm" in claims["6"].note and not claims["6"].values
    assert (
        "no fixed-LR ablation" in claims["5"].note and "swa-const" in claims["5"].note
    )  # not configured


# --- the run's landscape section -------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, message",
    [
        (["landscape.pieces=[line, lines]"], r"landscape.pieces must be a list of line, rays, "),
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
    none = load_config("mnist1d", ["train.save_trajectory=false", "landscape.pieces=[line]"]).train
    assert not none.saves_trajectory("swa")


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
        "landscape pieces line, rays, ensemble, bn: nothing left to compute",
    ]


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
    assert [line.split(".")[0] for line in out.splitlines() if line[:1].isdigit()] == list(
        "1234567"
    )
    assert out.count("verdict: ") == 7 and "verdict: SUPPORTED" in out
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
        "methods=[{method: sgd}, {method: swa, options: {swa_lr: 0.05, swa_start: 2}},"
        " {method: sgd, label: sgd-const, options: {schedule: constant}},"
        " {method: swa, label: swa-const, baseline: sgd-const,"
        " options: {schedule: constant, swa_start: 2}}]",
        "landscape.rays=2",
        "landscape.ray_points=3",
        "landscape.line_points=5",
    ]
    argv = ["run", "mnist1d", "--out", str(run), "--jobs", "2"]
    argv += [arg for item in tiny for arg in ("--set", item)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "landscape pieces line, rays, ensemble, bn of 2 seed(s), 2 at a time" in out
    for where in (run / "landscape", run / "landscape" / "seed1"):
        summary = json.loads((where / "landscape.json").read_text())
        assert set(summary["settings"]) == {"line", "rays", "ensemble", "bn"}
        assert summary["rays"]["rays"] == 2 and not summary["rays"]["tails"]
    # the SWA run alone kept its snapshots (train.save_trajectory: [swa] in the preset)
    assert (run / "swa" / "seed1" / "trajectory").is_dir()
    assert not (run / "sgd" / "seed1" / "trajectory").exists()
    assert main(argv) == 0  # resumed: nothing left to train or to compute
    assert "nothing left to compute" in capsys.readouterr().out
    assert main(["claims", str(run)]) == 0
    out = capsys.readouterr().out
    ids = [line.split(".")[0] for line in out.splitlines() if line[:1].isdigit()]
    assert ids == ["1", "2", "2 (raw rays)", "3", "4", "5", "6", "7"]  # claim 2: filter, then raw
    assert "protocol: filter-normalised rays (Li et al. 2018), width on the train NLL" in out
    assert out.count("verdict: ") == 8 and out.count("95% CI [") == 7, out


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
    assert [c.id.split(" ")[0] for c in claims if c.id[0] != "1" or c.id == "1"] == list("1234567")
    for c in claims:
        assert c.values or c.note, c.id  # a verdict's inputs, or a line saying what is missing
        if c.id.startswith("1") and c.values:
            assert c.values == {s: 0.0 for s in SEEDS} and c.verdict == "undecided"
