"""``swalab claims RUN_DIR``: the SWA paper's claims checked on a run, one verdict each.

Izmailov et al. (2018) claim, and source documents 002 and 004 repeat:

1. SWA generalises better than SGD at the same budget, and at 1.25B / 1.5B (Table 1);
2. SWA finds wider solutions: along random rays the train loss rises more slowly from w_SWA
   than from w_SGD (Fig. 4, the paper's width figure);
3. SGD ends at the periphery of a flat region whose interior lies towards w_SWA (Fig. 5): (a) the
   loss rises faster beyond SGD than towards SWA, (b) SGD has the lower train loss, (c) SWA the
   lower test error;
4. SWA approximates the ensemble of the snapshots it averages (§3.4): (a) it recovers the
   ensemble's gain over its members, (b) it is comparable to FGE;
5. averaging with a constant learning rate works where the constant-LR iterate does not (the
   fixed-LR ablation of §5);
6. BatchNorm statistics must be recomputed for the averaged weights (§3.2); (b) recomputing them
   beats averaging the BN buffers like the weights.

For each claim a per-seed statistic ``d`` (oriented so that ``d > 0`` agrees with the paper) is
paired over the seeds, its 95% t-interval computed, and a verdict given: **supported** when the
interval lies on the paper's side, **contradicted** when it lies on the other side, **undecided**
otherwise (claim 4b is an equivalence claim: supported when the interval lies inside
``[-margin, +margin]``). Each verdict carries the minimum detectable effect at the current number
of seeds and the seeds needed to decide (``lab.power``: paired t-test, two-sided, alpha 0.05,
power 0.8), and, for a test-set statistic, the share of the seed-to-seed variance of ``d`` that
the test set's sampling alone explains. Where the dataset has a large generated test set the
claims read it, with the published split's numbers on a second, labelled line. Statistics,
thresholds and margins are written down in ``docs/claims.md``; nothing here depends on the outcome.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from ..lab.files import load_npz, read_json
from ..lab.power import MAX_SEEDS, minimum_detectable_effect, seeds_to_decide
from ..lab.runschema import check_landscape
from ..lab.stats import primary_metric
from ..lab.task import TASKS
from .geometry import landscape_dir, ray_protocols
from .rundir import RunDir

__all__ = [
    "ALPHA",
    "MAX_SEEDS",
    "POWER",
    "RECOVERED",
    "Claim",
    "claim_rows",
    "evaluate_claims",
    "fieller_interval",
    "format_claims",
    "paired_verdict",
    "sampling_share",
    "seeds_to_decide",
]

ALPHA, POWER = 0.05, 0.8
EQUIVALENCE_MARGIN = {"accuracy": 1.0, "mse": 5.0}  # claim 4b, by the task's primary metric: error
# points / MSE percent
RECOVERED = 0.5  # claim 4a: the share of the ensemble's gain SWA must recover (docs/claims.md)
CLAIM_PIECES = ("line", "rays", "ensemble", "bn")  # the landscape pieces claims 2, 3, 4, 6 read
TRAIN_ONLY = "none: a train-split statistic"


@dataclass
class Claim:
    """One claim's verdict; ``values`` holds the per-seed statistic ``d`` (``d > 0``: the paper's side)."""

    id: str
    title: str
    source: str
    statistic: str
    values: dict[int, float] = field(default_factory=dict)
    mean: float | None = None
    low: float | None = None
    high: float | None = None
    verdict: str = "undecided"
    seeds_needed: int | None = None
    margin: float | None = None  # equivalence claims only
    note: str = ""  # why there is no verdict (missing input, does not apply) or a remark
    protocol: str = ""  # the primary protocol's name
    mde: float | None = None  # minimum detectable effect at the current number of seeds
    sampling_share: float | None = (
        None  # mean test-sampling variance of d / its variance over seeds
    )
    sampling: str = TRAIN_ONLY  # how the share was estimated, or why there is none
    secondary: list[str] = field(default_factory=list)  # labelled second lines


# --- statistics ---------------------------------------------------------------------------------


def _interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = (
        scipy_stats.t.ppf(1 - ALPHA / 2, len(values) - 1)
        * statistics.stdev(values)
        / math.sqrt(len(values))
    )
    return mean, mean - half, mean + half


def paired_verdict(claim: Claim, values: dict[int, float]) -> Claim:
    """Fill ``claim`` from per-seed values: mean, 95% interval, verdict, minimum detectable effect,
    seeds needed."""
    claim.values = dict(sorted(values.items()))
    data = list(claim.values.values())
    if not data:
        return claim
    claim.mean, low, high = _interval(data)
    if len(data) < 2:
        claim.note = claim.note or "one seed: no interval; a verdict needs at least 2 seeds"
        return claim
    claim.low, claim.high = low, high
    sd = statistics.stdev(data)
    if claim.margin is not None:
        if -claim.margin < low and high < claim.margin:
            claim.verdict = "supported"
        elif low > claim.margin or high < -claim.margin:
            claim.verdict = "contradicted"
    elif low > 0:
        claim.verdict = "supported"
    elif high < 0:
        claim.verdict = "contradicted"
    claim.seeds_needed = seeds_to_decide(claim.mean, sd, claim.margin, alpha=ALPHA, power=POWER)
    claim.mde = minimum_detectable_effect(sd, len(data), claim.margin, alpha=ALPHA, power=POWER)
    return claim


def sampling_share(claim: Claim, variances: dict[int, float], how: str) -> Claim:
    """``claim.sampling_share``: the mean over seeds of ``variances`` (each seed's sampling variance
    of ``d`` caused by the finite test set) over the sample variance of ``d`` across seeds
    (docs/claims.md). ``how`` says how the variances were estimated, or why there are none."""
    claim.sampling = how
    seeds = [s for s in claim.values if s in variances]
    if len(claim.values) < 2 or not seeds:
        return claim
    observed = statistics.variance(list(claim.values.values()))
    sampled = statistics.fmean(variances[s] for s in seeds)
    claim.sampling_share = sampled / observed if observed > 0 else math.inf
    return claim


def _mean_variance(scores: np.ndarray) -> float:
    """The sampling variance of the mean of per-sample ``scores``: ``var(scores) / N`` (the
    binomial ``((b + c)/N - ((b - c)/N)^2) / N`` for differences of 0/1 scores)."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(scores.var() / len(scores))


def fieller_interval(
    num: list[float], den: list[float], alpha: float = ALPHA
) -> tuple[float, float, float]:
    """``mean(num) / mean(den)`` and its Fieller interval over paired per-seed values: the ``R``
    with ``(mean(num) - R mean(den))^2 <= t^2 var(mean(num) - R mean(den))``. ``(-inf, inf)`` when
    ``mean(den)`` is not itself distinguishable from 0 at ``alpha`` (the set is unbounded)."""
    n = len(num)
    a, b = np.asarray(num, float), np.asarray(den, float)
    ratio = float(a.mean() / b.mean()) if b.mean() != 0 else math.nan
    if n < 2:
        return ratio, math.nan, math.nan
    t2 = float(scipy_stats.t.ppf(1 - alpha / 2, n - 1)) ** 2
    cov = np.cov(a, b, ddof=1) / n
    qa = b.mean() ** 2 - t2 * cov[1, 1]
    qb = a.mean() * b.mean() - t2 * cov[0, 1]
    qc = a.mean() ** 2 - t2 * cov[0, 0]
    disc = qb * qb - qa * qc
    if qa <= 0 or disc < 0:
        return ratio, -math.inf, math.inf
    root = math.sqrt(disc)
    return ratio, float((qb - root) / qa), float((qb + root) / qa)


# --- inputs -------------------------------------------------------------------------------------


class _Inputs:
    """What the claims read from a run directory: results.csv, the runs' per-sample test scores
    and the per-seed landscape summaries."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.rows = run.results()
        published = primary_metric(self.rows)
        self.task = next(t for t in TASKS.values() if f"test_{t.primary}" == published)
        large = f"large_test_{self.task.primary}"
        self.large = any(r.get(large) not in (None, "") for r in self.rows)
        self.split = "large_test" if self.large else "test"
        self.metric = large if self.large else published
        self.done = self._done(self.metric)
        self.done_published = self._done(published)
        self.sgd, self.swa = run.default_label("baseline"), run.default_label("average")
        self.landscapes: dict[int, tuple[dict[str, Any], Path]] = {}
        self.other_labels: list[int] = []
        for seed in run.cfg.seeds:
            path = landscape_dir(run, seed) / "landscape.json"
            if not path.exists() and not path.is_symlink():
                continue
            summary = check_landscape(path, read_json(path, root=run.path))
            if summary.get("seed") != seed:
                continue
            if (summary.get("sgd"), summary.get("swa")) != (self.sgd, self.swa):
                self.other_labels.append(seed)
                continue
            self.landscapes[seed] = (summary, path.parent)

    def _done(self, metric: str) -> dict[tuple[str, int], float]:
        return {
            (r["method"], int(r["seed"])): float(r[metric])
            for r in self.rows
            if r["status"] == "done" and r.get(metric) not in (None, "")
        }

    @property
    def test_set(self) -> str:
        """The primary protocol's test set, in words."""
        if not self.large:
            return (
                "the published test split"
                if self.run.cfg.data.name == "mnist1d"
                else "the test split"
            )
        size = self.run.cfg.data.options.get("large_test")
        return (
            f"the large test set ({size:,} generated, seed 2018)" if size else "the large test set"
        )

    @property
    def scale(self) -> float:
        """Per-sample scores (fractions for classification) in the unit of ``d`` (points)."""
        return 100.0 if self.task.probabilistic else 1.0

    def gain(self, label: str, base: str, published: bool = False) -> dict[int, float]:
        """Per seed ``metric(label) - metric(base)``, sign flipped for MSE so that > 0 favours ``label``."""
        done = self.done_published if published else self.done
        sign = -1.0 if not self.task.probabilistic else 1.0
        return {
            s: sign * (v - done[(base, s)])
            for (lab, s), v in done.items()
            if lab == label and (base, s) in done
        }

    def pair_variances(
        self, label: str, base: str, scale: Callable[[int], float] | None = None
    ) -> tuple[dict[int, float], str]:
        """Per seed the test-sampling variance of ``metric(label) - metric(base)`` from the two
        runs' per-sample scores on the primary test set (``per_sample.npz``); ``scale(seed)``
        converts a score difference to the unit of ``d`` (default: points, or MSE)."""
        out: dict[int, float] = {}
        sizes = set()
        for seed in self.run.cfg.seeds:
            a = self.run.run(label, seed).per_sample().get(self.split)
            b = self.run.run(base, seed).per_sample().get(self.split)
            if a is None or b is None or len(a) != len(b) or not len(a):
                continue
            k = scale(seed) if scale is not None else self.scale
            out[seed] = k * k * _mean_variance(np.asarray(a, float) - np.asarray(b, float))
            sizes.add(len(a))
        if not out:
            return out, (
                "– (no per-sample test scores: runs trained before swalab saved per_sample.npz)"
            )
        n = ", ".join(f"{s:,}" for s in sorted(sizes))
        return (
            out,
            f"sampling variance of the paired difference on {n} test samples vs seed-to-seed",
        )

    def published_line(self, claim: Claim, values: dict[int, float]) -> None:
        """The published split's verdict of the same statistic, as a labelled second line."""
        if not self.large or not values:
            return
        c = paired_verdict(Claim("", "", "", "", margin=claim.margin), values)
        ci = "–" if c.low is None else f"[{_num(c.low)}, {_num(c.high)}]"
        claim.secondary.append(
            f"published test split: mean d {_num(c.mean)}, 95% CI {ci}, {c.verdict} "
            f"(seeds {len(c.values)})"
        )

    @property
    def landscape_command(self) -> str:
        """``swalab run`` with the run's config and the pieces: it computes the missing ones for
        every seed after training (resuming), into a new directory when the SWA run kept no
        snapshots."""
        cfg, run = self.run.cfg, self.run
        sets = []
        if not set(CLAIM_PIECES) <= set(cfg.landscape.pieces):
            sets.append(f"--set 'landscape.pieces=[{','.join(CLAIM_PIECES)}]'")
        out = run.path
        if self.swa is not None and not cfg.train.saves_trajectory(self.swa):
            # the ensemble piece makes the SWA run keep its snapshots: a changed train section,
            # which cannot resume the runs that have started
            out = run.path.with_name(run.path.name + "-claims")
        return " ".join([f"swalab run {run.config_path} --out {out}", *sets])

    def recompute_command(self, piece: str) -> str:
        return f"swalab landscape {self.run.path} --seed all --what {piece}"

    def piece(self, name: str) -> tuple[dict[int, tuple[dict[str, Any], Path]], str]:
        """Seeds whose landscape has ``name``, and why the others have not (the command to run)."""
        have = {
            s: (summary, where)
            for s, (summary, where) in self.landscapes.items()
            if name in summary
        }
        if have:
            return have, ""
        skipped = [
            summary["skipped"][name]
            for summary, _ in self.landscapes.values()
            if name in summary.get("skipped", {})
        ]
        if skipped:
            return {}, f"the landscape skipped {name}: {skipped[0]}"
        extra = (
            f" (landscapes of seeds {self.other_labels} compare other labels)"
            if self.other_labels
            else ""
        )
        return {}, (
            f"no {name} landscape piece under {self.run.path / 'landscape'}{extra}; "
            f"compute it with `{self.landscape_command}`"
        )


# --- the claims ---------------------------------------------------------------------------------


def _test_claim(inp: _Inputs, claim: Claim, label: str, base: str) -> Claim:
    """``claim`` decided on ``metric(label) - metric(base)`` from results.csv on the primary test
    set, with its test-sampling share and the published split's line."""
    claim.protocol = claim.protocol or f"paired over seeds on {inp.test_set}"
    values = inp.gain(label, base)
    if not values:
        claim.note = claim.note or (
            f"no finished {label}/{base} pair in results.csv; `{inp.run.resume_command}`"
        )
    paired_verdict(claim, values)
    sampling_share(claim, *inp.pair_variances(label, base))
    inp.published_line(claim, inp.gain(label, base, published=True))
    return claim


def _swa_methods(inp: _Inputs) -> list[Any]:
    return [
        m
        for m in inp.run.cfg.methods
        if m.method == "swa" and not m.baseline and m.options.get("schedule", "swa") != "constant"
    ]


def _claim1(inp: _Inputs) -> list[Claim]:
    unit = "points of test accuracy" if inp.task.probabilistic else "test MSE, SGD minus SWA"
    swas = _swa_methods(inp)
    if inp.sgd is None or not swas:
        missing = "an sgd method" if inp.sgd is None else "an swa method"
        return [
            Claim(
                "1",
                "SWA generalises better than SGD at the same budget",
                "Table 1",
                f"SWA − SGD, {unit}",
                note=f"the run has no {missing}; add one to the config and `swalab run` it",
                sampling="–",
            )
        ]
    out = []
    for m in sorted(swas, key=lambda m: m.budget):
        budget = "the same budget" if m.budget == 1.0 else f"{m.budget:g}B"
        claim = Claim(
            "1" if m.budget == 1.0 else f"1 ({m.budget:g}B)",
            f"SWA ({m.label}) generalises better than SGD at {budget}",
            "Table 1",
            f"{m.label} − {inp.sgd}, {unit}, per seed",
        )
        out.append(_test_claim(inp, claim, m.label, inp.sgd))
    out.sort(key=lambda c: c.id != "1")
    return out


_PROTOCOL_NAMES = {
    "filter": "filter-normalised rays (Li et al. 2018), width on the train NLL",
    "layer": "layer-normalised rays, width on the train NLL",
    "raw": "raw rays (the paper's Fig. 4: unit Gaussian directions, Euclidean distance)",
}


def _claim2(inp: _Inputs) -> list[Claim]:
    """Claim 2 under each scaling of the rays' directions: the primary line is the run's primary
    protocol (``landscape.directions[0]``, filter-normalised by default: invariant to rescaling a
    layer followed by BatchNorm), the others follow as labelled lines; with the ``curvature``
    piece, the Hessian's top eigenvalue and trace add two more."""
    have, why = inp.piece("rays")
    protocols: dict[int, dict[str, dict[str, Any]]] = {
        seed: ray_protocols(summary["rays"]) for seed, (summary, _) in have.items()
    }
    primary = next(
        (
            summary["rays"].get("primary") or next(iter(protocols[seed]))
            for seed, (summary, _) in have.items()
        ),
        "filter",
    )
    order = [primary] + sorted({h for p in protocols.values() for h in p} - {primary})
    claims = []
    for how in order:
        first = how == primary
        unit = "t, in units of each filter's own norm" if how != "raw" else "Euclidean distance"
        claim = Claim(
            "2" if first else f"2 ({how} rays)",
            "SWA finds wider solutions than SGD",  # the id names a second protocol
            "Fig. 4 (widths along random rays)",
            f"median over rays of width(w_SWA) − width(w_SGD), the same directions from both; "
            f"width = {unit} at which the train NLL has risen by `rise` (a ray that stays below "
            "counts as the largest distance)",
            protocol=_PROTOCOL_NAMES[how],
        )
        values, missing = {}, []
        for seed, by in protocols.items():
            if how not in by:
                missing.append(seed)
                continue
            p = by[how]
            widths = p.get("width")
            if widths is None:  # an older summary: the width on the objective (NLL + L2)
                widths = p["width_objective"]
                claim.statistic = claim.statistic.replace("train NLL", "train loss (NLL + L2)")
            cap = float(p["max_distance"])
            swa, sgd = (
                [cap if w is None else float(w) for w in widths[k]["per_ray"]]
                for k in ("swa", "sgd")
            )
            values[seed] = float(np.median(np.array(swa) - np.array(sgd)))
        claim.note = why or (
            f"seeds {missing} have no {how} rays; recompute them with "
            f"`swalab landscape {inp.run.path} --seed all --what rays`"
            if missing
            else ""
        )
        claims.append(paired_verdict(claim, values))
    curvature, _ = inp.piece("curvature")
    for key, name in (("top_eigenvalue", "top eigenvalue"), ("trace", "trace")):
        if not curvature:
            break
        claim = Claim(
            f"2 (Hessian {name})",
            "SWA finds flatter solutions than SGD",
            "§3 (flatness; a second measure)",
            f"d = {name}(w_SGD) − {name}(w_SWA), > 0: SWA flatter. Not scale-invariant: a layer "
            "followed by BatchNorm with smaller weights has a larger curvature for the same function",
            protocol=f"Hessian {name} of the train NLL at each solution, BN recomputed "
            "(swalab.curvature)",
        )
        values = {
            seed: float(summary["curvature"]["sgd"][key]) - float(summary["curvature"]["swa"][key])
            for seed, (summary, _) in curvature.items()
        }
        claims.append(paired_verdict(claim, values))
    return claims


def _line_values(inp: _Inputs, key: str) -> tuple[dict[int, tuple[float, float]], str]:
    """Per seed ``(key at t = 1.5, key at t = 0.5)`` of the ``line`` piece."""
    have, why = inp.piece("line")
    out = {}
    for seed, (_, where) in have.items():
        path = where / "line.npz"
        if not path.exists() and not path.is_symlink():
            continue
        line = load_npz(path, root=where)
        if key not in line:
            why = why or f"{path} has no {key}; recompute it with `{inp.recompute_command('line')}`"
            continue
        ts, loss = line["t"], line[key]
        if ts.min() > 0.5 or ts.max() < 1.5:
            why = (
                why
                or f"{path}: the line must span t in [0.5, 1.5]; recompute with `{inp.landscape_command}`"
            )
            continue
        out[seed] = (float(np.interp(1.5, ts, loss)), float(np.interp(0.5, ts, loss)))
    return out, why


def _claim3(inp: _Inputs) -> list[Claim]:
    """3a on the NLL (the L2 term apart), 3b the train losses of the two solutions, 3c their test
    errors (claim 1's numbers)."""
    rise = Claim(
        "3a",
        "The loss rises faster beyond SGD than towards SWA (SGD at the periphery of a flat region)",
        "Fig. 5 (line through w_SGD and w_SWA)",
        "train NLL at t = 1.5 minus train NLL at t = 0.5 on w(t) = t·w_SGD + (1 − t)·w_SWA "
        "(half the SGD–SWA distance beyond SGD vs towards SWA)",
        protocol="train NLL (data term, no L2) along the line, BN recomputed at every point",
    )
    nll, why = _line_values(inp, "train_nll")
    rise.note = why
    paired_verdict(rise, {s: hi - lo for s, (hi, lo) in nll.items()})
    objective, _ = _line_values(inp, "train_loss")
    both = [s for s in rise.values if s in objective]
    if both:
        d_obj = {s: objective[s][0] - objective[s][1] for s in both}
        with_l2 = paired_verdict(Claim("", "", "", ""), d_obj)
        shares = [(d_obj[s] - rise.values[s]) / d_obj[s] for s in both if d_obj[s] != 0]
        share = f"; the L2 term is {100 * statistics.fmean(shares):.0f}% of it" if shares else ""
        rise.secondary.append(
            f"objective with the L2 term (the former claim 3): mean d {_num(with_l2.mean)}, "
            f"95% CI [{_num(with_l2.low)}, {_num(with_l2.high)}], {with_l2.verdict}{share}"
        )

    lower = Claim(
        "3b",
        "SGD has the lower train loss",
        "Fig. 5 (train loss at the two solutions)",
        "train NLL of w_SWA minus train NLL of w_SGD (BN recomputed, the line's end points)",
        protocol="train NLL at w_SWA and w_SGD, BN recomputed",
    )
    have, why = inp.piece("line")
    values = {}
    for seed, (summary, _) in have.items():
        ends = summary["line"]
        if "swa" in ends and "sgd" in ends and "train_nll" in ends["swa"]:
            values[seed] = float(ends["swa"]["train_nll"]) - float(ends["sgd"]["train_nll"])
    lower.note = why
    paired_verdict(lower, values)

    swas = [m for m in _swa_methods(inp) if m.budget == 1.0]
    unit = "points of test accuracy" if inp.task.probabilistic else "test MSE, SGD minus SWA"
    test = Claim(
        "3c",
        "SWA has the lower test error",
        "Fig. 5 (test error at the two solutions)",
        f"SWA − SGD, {unit}, per seed (claim 1's statistic)",
        sampling="–",
    )
    if inp.sgd is None or not swas:
        test.note = "the run has no SGD/SWA pair at budget 1 (see claim 1)"
    else:
        _test_claim(inp, test, swas[0].label, inp.sgd)
    return [rise, lower, test]


def _ensemble_scores(summary: dict[str, Any], split: str) -> dict[str, Any] | None:
    e = summary.get("ensemble", {})
    scores = e if split == "test" else e.get(split)
    if not scores or any(scores.get(k) is None for k in ("average", "ensemble", "snapshots_mean")):
        return None
    return scores


def _claim4(inp: _Inputs) -> list[Claim]:
    """4a the fraction of the snapshot ensemble's gain that SWA recovers; 4b SWA vs FGE."""
    unit = "points" if inp.task.probabilistic else "test MSE"
    recovered = Claim(
        "4a",
        f"SWA recovers at least {RECOVERED:.0%} of the snapshot ensemble's gain over its members",
        "§3.4 (SWA approximates the ensemble of its snapshots)",
        f"g_SWA − {RECOVERED:g}·g_ens, {unit}; g = mean snapshot error − error of w_SWA / of the "
        "ensemble (probabilities averaged, each snapshot with its own BN statistics)",
        protocol=f"fraction of the ensemble's gain recovered, on {inp.test_set}",
    )
    have, why = inp.piece("ensemble")
    g_swa: dict[int, float] = {}
    g_ens: dict[int, float] = {}
    published: dict[int, tuple[float, float]] = {}
    variances: dict[int, float] = {}
    for seed, (summary, where) in have.items():
        scores = _ensemble_scores(summary, inp.split)
        if scores is None:
            why = why or (
                f"the ensemble piece of seed {seed} predates the large test set; recompute it "
                f"with `{inp.recompute_command('ensemble')}`"
            )
            continue
        members = float(scores["snapshots_mean"])
        g_swa[seed] = members - float(scores["average"])
        g_ens[seed] = members - float(scores["ensemble"])
        pub = _ensemble_scores(summary, "test")
        if pub is not None:
            m = float(pub["snapshots_mean"])
            published[seed] = (m - float(pub["average"]), m - float(pub["ensemble"]))
        path = where / "ensemble.npz"
        if path.is_file():
            with np.load(path) as arrays:
                names = [f"{inp.split}_{k}" for k in ("snapshots", "ensemble", "average")]
                if all(n in arrays.files for n in names):
                    snaps, ens, avg = (np.asarray(arrays[n], float) for n in names)
                    per = (1 - RECOVERED) * snaps.mean(0) - avg + RECOVERED * ens
                    variances[seed] = inp.scale**2 * _mean_variance(per)
    recovered.note = why
    paired_verdict(recovered, {s: g_swa[s] - RECOVERED * g_ens[s] for s in g_swa})
    how = (
        f"sampling variance of d from the per-sample errors of the snapshots, ensemble and w_SWA "
        f"on {inp.test_set} vs seed-to-seed"
        if variances
        else "– (no ensemble.npz: recompute the ensemble piece)"
    )
    sampling_share(recovered, variances, how)
    for name, pairs in (
        (inp.test_set, {s: (g_swa[s], g_ens[s]) for s in g_swa}),
        *([("the published test split", published)] if inp.large else []),
    ):
        if len(pairs) >= 2:
            ratio, low, high = fieller_interval(
                [a for a, _ in pairs.values()], [b for _, b in pairs.values()]
            )
            ens = statistics.fmean(b for _, b in pairs.values())
            recovered.secondary.append(
                f"fraction recovered on {name}: {ratio:.2f} (Fieller 95% [{low:.2f}, {high:.2f}]); "
                f"the ensemble's gain over its members {ens:+.3g} {unit}"
            )

    margin = EQUIVALENCE_MARGIN[inp.task.primary]
    fges = [m for m in inp.run.cfg.methods if m.method == "fge" and m.budget == 1.0]
    swas = [m for m in _swa_methods(inp) if m.budget == 1.0]
    fge = Claim(
        "4b",
        "SWA is comparable to FGE (equivalence)",
        '§3.4 ("comparable to FGE", as a published summary of the paper puts it)',
        (
            "test accuracy of SWA minus FGE's, points"
            if inp.task.probabilistic
            else "test MSE of FGE minus SWA's, in % of FGE's"
        )
        + f"; equivalent within ±{margin:g}",
        margin=margin,
        protocol=f"TOST equivalence, paired over seeds on {inp.test_set}",
        sampling="–",
    )
    if not fges or not swas:
        fge.note = (
            "the run has no "
            + ("fge" if not fges else "swa")
            + " method at budget 1; add `{method: fge}` to the config and `swalab run` it"
        )
        return [recovered, fge]
    f, w = fges[0].label, swas[0].label
    if inp.task.probabilistic:
        _test_claim(inp, fge, w, f)
        return [recovered, fge]
    # regression: in % of FGE's MSE
    pct = {s: 100.0 / inp.done[(f, s)] for s in inp.run.cfg.seeds if (f, s) in inp.done}
    values = {s: d * pct[s] for s, d in inp.gain(w, f).items() if s in pct}
    paired_verdict(fge, values)
    sampling_share(fge, *inp.pair_variances(w, f, scale=lambda s: pct.get(s, math.nan)))
    return [recovered, fge]


def _claim5(inp: _Inputs) -> Claim:
    unit = "points of test accuracy" if inp.task.probabilistic else "test MSE, SGD minus SWA"
    pairs = [
        (m.label, m.baseline)
        for m in inp.run.cfg.methods
        if m.method == "swa" and m.options.get("schedule") == "constant" and m.baseline
    ]
    claim = Claim(
        "5",
        "Averaging at a constant learning rate beats the constant-LR iterate",
        "§5 fixed-LR ablation (CIFAR-100)",
        f"SWA(constant LR) − SGD(constant LR), {unit}",
        sampling="–",
    )
    if not pairs:
        claim.note = (
            "the run has no fixed-LR ablation; add `{method: sgd, label: sgd-const, options: "
            "{schedule: constant}}` and `{method: swa, label: swa-const, baseline: sgd-const, "
            "options: {schedule: constant}}` to the config (as the mnist1d preset does) and `swalab run` it"
        )
        return claim
    label, base = pairs[0]
    claim.statistic = f"{label} − {base}, {unit}, per seed"
    return _test_claim(inp, claim, label, base)


_BN_COUNTERFACTUALS = {
    "fresh": "fresh BN buffers (mean 0, variance 1), as the reference code's swa_model before bn_update",
    "carried": "the last SGD iterate's BN statistics",
    "averaged": "the BN buffers averaged over the snapshots like the weights",
}


def _bn_claim(inp: _Inputs, claim: Claim, key: str, have: dict[int, Any], why: str) -> Claim:
    """``claim``: error of w_SWA with the ``key`` BN buffers minus with recomputed statistics."""
    field_name = f"{inp.split}_error"
    values: dict[int, float] = {}
    published: dict[int, float] = {}
    variances: dict[int, float] = {}
    for seed, (summary, where) in have.items():
        b = summary["bn"]
        if key not in b or field_name not in b[key] or field_name not in b["recomputed"]:
            why = (
                why
                or b.get("averaged_missing")
                or (
                    f"the bn piece of seed {seed} has no {key} counterfactual on {inp.test_set}; "
                    f"recompute it with `{inp.recompute_command('bn')}`"
                )
            )
            continue
        rec = float(b["recomputed"][field_name])
        scale = 1.0 if inp.task.probabilistic else 100.0 / rec
        values[seed] = scale * (float(b[key][field_name]) - rec)
        if "test_error" in b[key]:
            pub_rec = float(b["recomputed"]["test_error"])
            pub_scale = 1.0 if inp.task.probabilistic else 100.0 / pub_rec
            published[seed] = pub_scale * (float(b[key]["test_error"]) - pub_rec)
        path = where / "bn.npz"
        if path.is_file():
            with np.load(path) as arrays:
                a, r = f"{inp.split}_{key}", f"{inp.split}_recomputed"
                if a in arrays.files and r in arrays.files:
                    diff = np.asarray(arrays[a], float) - np.asarray(arrays[r], float)
                    k = inp.scale * scale
                    variances[seed] = k * k * _mean_variance(diff)
    claim.note = why
    paired_verdict(claim, values)
    how = (
        f"sampling variance of the paired difference on {inp.test_set} vs seed-to-seed"
        if variances
        else "– (no bn.npz: recompute the bn piece)"
    )
    sampling_share(claim, variances, how)
    inp.published_line(claim, published)
    return claim


def _claim6(inp: _Inputs) -> list[Claim]:
    metric = (
        "test error (points)" if inp.task.probabilistic else "test MSE (% of the recomputed one)"
    )
    have, why = inp.piece("bn")
    primary = Claim(
        "6",
        "BatchNorm statistics must be recomputed for the averaged weights",
        "§3.2",
        f"{metric} of w_SWA with {_BN_COUNTERFACTUALS['fresh']}, minus with recomputed ones",
        protocol=f"fresh BN buffers (the reference code) vs recomputed, on {inp.test_set}",
    )
    _bn_claim(inp, primary, "fresh", have, why)
    carried = _bn_claim(inp, Claim("", "", "", ""), "carried", have, why)
    if carried.values:
        ci = "–" if carried.low is None else f"[{_num(carried.low)}, {_num(carried.high)}]"
        primary.secondary.insert(
            0,
            f"with {_BN_COUNTERFACTUALS['carried']} instead (the former claim 6): mean d "
            f"{_num(carried.mean)}, 95% CI {ci}, {carried.verdict}",
        )
    averaged = Claim(
        "6b",
        "Recomputing BN beats averaging the BN buffers like the weights",
        "§3.2 (a practitioners' question)",
        f"{metric} of w_SWA with {_BN_COUNTERFACTUALS['averaged']}, minus with recomputed ones",
        protocol=f"averaged BN buffers vs recomputed, on {inp.test_set}",
    )
    _bn_claim(inp, averaged, "averaged", have, why)
    return [primary, averaged]


def _claim_start(inp: _Inputs) -> Claim:
    """Claim 7 (post hoc, docs/claims.md): the range over the start band of the test error of SWA
    over ``[start, E]`` from ``posthoc.csv``, equivalent to 0 within claim 4's margin."""
    from ..lab.methods import run_epochs
    from .windows import start_band

    margin = EQUIVALENCE_MARGIN[inp.task.primary]
    cfg, run = inp.run.cfg, inp.run
    band = start_band(cfg.train.epochs)
    unit = "points of test error" if inp.task.probabilistic else "% of the test MSE at 0.8 B + 1"
    claim = Claim(
        "7",
        "SWA's gain does not depend on the exact start",
        "§3 swa_start = 0.8 B + 1 (post hoc)",
        f"largest minus smallest {unit} of SWA over [start, E] for starts {band} "
        f"(0.6-0.9 B + 1), E the posthoc run's last epoch; equivalent within ±{margin:g}",
        margin=margin,
        sampling="not estimated: posthoc.csv holds no per-sample scores",
    )
    label = cfg.posthoc.run
    if not label:
        claim.note = (
            f"no posthoc.run in the config; train one with `swalab run {run.config_path} "
            f"--out {run.path}-posthoc --set posthoc.run=LABEL`, then `swalab posthoc`"
        )
        return claim
    end = run_epochs(run.method(label).budget, cfg.train.epochs)
    band = [start for start in band if start < end]  # a window holds two epochs or more
    if len(band) < 2:
        claim.note = f"{label} ends at epoch {end}: fewer than two starts of the band before it"
        return claim
    key = inp.metric
    cells = {
        (int(r["seed"]), int(r["start"])): float(r[key])
        for r in run.posthoc_results()
        if r.get("source") == label and int(r["end"]) == end and r.get(key) not in (None, "")
    }
    values = {}
    for seed in cfg.seeds:
        scores = [cells.get((seed, start)) for start in band]
        if any(v is None for v in scores):
            continue
        if inp.task.probabilistic:  # accuracy points: the range of the error is the same
            values[seed] = max(scores) - min(scores)
        else:
            paper = cells.get((seed, int(0.8 * cfg.train.epochs) + 1), scores[0])
            values[seed] = 100.0 * (max(scores) - min(scores)) / paper
    if not values:
        claim.note = (
            f"no windows [{band[0]}..{band[-1]}, {end}] in {run.path / 'posthoc.csv'}; compute "
            f"them with `swalab posthoc {run.path} --start {' '.join(map(str, band))} --end {end}`"
        )
    return paired_verdict(claim, values)


def evaluate_claims(run_dir: str | Path) -> list[Claim]:
    """The claims on the run directory (claim 1 once per SWA budget), in order."""
    inp = _Inputs(RunDir(run_dir))
    return [
        *_claim1(inp),
        *_claim2(inp),
        *_claim3(inp),
        *_claim4(inp),
        _claim5(inp),
        *_claim6(inp),
        _claim_start(inp),
    ]


# --- output -------------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:+.3g}"


def _share(c: Claim) -> str:
    if c.sampling_share is None:
        return c.sampling if c.sampling == TRAIN_ONLY else "–"
    return "∞" if not math.isfinite(c.sampling_share) else f"{100 * c.sampling_share:.0f}%"


def _needed(c: Claim) -> str:
    if not c.values:
        return "–"
    if c.seeds_needed is None:
        return "never at this mean" if len(c.values) > 1 else "–"
    return str(c.seeds_needed) + (f" (within ±{c.margin:g})" if c.margin is not None else "")


def claim_rows(claims: list[Claim]) -> tuple[list[str], list[list[str]]]:
    """A table: claim, source, protocol, seeds, mean d, 95% interval, verdict, minimum detectable
    effect, test-sampling share, seeds to decide, statistic / note."""
    header = [
        "claim",
        "paper",
        "primary protocol",
        "seeds",
        "mean d",
        "95% CI",
        "verdict",
        "min. detectable effect",
        "test-sampling share",
        "seeds to decide",
        "statistic d / note",
    ]
    rows = []
    for c in claims:
        interval = "–" if c.low is None else f"[{_num(c.low)}, {_num(c.high)}]"
        mde = "–" if c.mde is None or not math.isfinite(c.mde) else f"{c.mde:.3g}"
        if c.margin is not None and mde != "–":
            mde = f"{mde} below the margin"
        rows.append(
            [
                f"{c.id}. {c.title}",
                c.source,
                c.protocol or "–",
                str(len(c.values)),
                _num(c.mean),
                interval,
                c.verdict if c.values else "no input",
                mde,
                _share(c),
                _needed(c),
                c.statistic
                + (f" — {c.note}" if c.note else "")
                + "".join(f"; {line}" for line in c.secondary),
            ]
        )
    return header, rows


def format_claims(claims: list[Claim]) -> str:
    """Plain text for the terminal: one block per claim."""
    lines = [
        (
            f"verdicts: 95% paired t-interval over seeds; minimum detectable effect and seeds to "
            f"decide: paired t-test, two-sided alpha {ALPHA:g}, power {POWER:g}, at the observed sd "
            "(a power calculation); test-sampling share: the test set's sampling variance of d over "
            "its variance across seeds (docs/claims.md)"
        )
    ]
    _, rows = claim_rows(claims)
    for c, row in zip(claims, rows):
        claim, source, protocol, n, mean, interval, verdict, mde, share, needed, _ = row
        how = f" ({c.sampling})" if c.sampling_share is not None else ""
        lines += [
            "",
            f"{claim}  [{source}]",
            f"  verdict: {verdict.upper()}  — primary protocol: {protocol}",
            f"  seeds {n}, mean d {mean}, 95% CI {interval}, minimum detectable effect {mde}, "
            f"seeds to decide: {needed}",
            f"  test-sampling share: {share}{how}",
            f"  d = {c.statistic}" + (f" — {c.note}" if c.note else ""),
            *(f"  {line}" for line in c.secondary),
        ]
    return "\n".join(lines)
