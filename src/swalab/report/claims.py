"""``swalab claims RUN_DIR``: the SWA paper's six claims checked on a run, one verdict each.

Izmailov et al. (2018) claim, and source documents 002 and 004 repeat:

1. SWA generalises better than SGD at the same budget, and at 1.25B / 1.5B (Table 1);
2. SWA finds wider solutions: along random rays the train loss rises more slowly from w_SWA
   than from w_SGD (Fig. 4, the width figure of document 004);
3. SGD ends at the periphery of a flat region whose interior lies towards w_SWA (Fig. 5);
4. SWA approximates the ensemble of the snapshots it averages (§3.4, "comparable to FGE");
5. averaging with a constant learning rate works where the constant-LR iterate does not (the
   fixed-LR ablation of §5);
6. BatchNorm statistics must be recomputed for the averaged weights (§3.2).

For each claim a per-seed statistic ``d`` (oriented so that ``d > 0`` agrees with the paper) is
paired over the seeds, its 95% t-interval computed, and a verdict given: **supported** when the
interval lies on the paper's side, **contradicted** when it lies on the other side, **undecided**
otherwise (claim 4 is an equivalence claim: supported when the interval lies inside
``[-margin, +margin]``). The seeds needed to decide are a power calculation at the observed mean
and standard deviation: a two-sided one-sample t-test, alpha 0.05, power 0.8 (claim 4: two
one-sided tests at 0.025, normal-theory approximation). Statistics, thresholds and margins are
written down in ``docs/claims.md``; nothing here depends on the outcome.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from ..lab.files import load_npz, read_json
from ..lab.runschema import check_landscape
from ..lab.stats import primary_metric
from ..lab.task import TASKS
from .geometry import landscape_dir, ray_protocols
from .rundir import RunDir

__all__ = [
    "ALPHA",
    "POWER",
    "Claim",
    "claim_rows",
    "evaluate_claims",
    "format_claims",
    "paired_verdict",
    "seeds_to_decide",
]

ALPHA, POWER = 0.05, 0.8
EQUIVALENCE_MARGIN = {"accuracy": 1.0, "mse": 5.0}  # claim 4, by the task's primary metric: error
# points / MSE percent
CLAIM_PIECES = ("line", "rays", "ensemble", "bn")  # the landscape pieces claims 2, 3, 4, 6 read
MAX_SEEDS = 10_000  # beyond this a claim counts as undecidable at the observed variance


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


def seeds_to_decide(mean: float, sd: float, margin: float | None = None) -> int | None:
    """Seeds for a paired t-test (two-sided, ``ALPHA``) to reach ``POWER`` at this mean and sd.

    Without ``margin``: the smallest ``n >= 2`` whose power against ``mean != 0``, computed with the
    noncentral t distribution, is at least ``POWER``. With ``margin`` (equivalence, two one-sided
    tests at ``ALPHA / 2``): the smallest ``n`` with ``(margin - |mean|) sqrt(n) / sd >=
    t_{1 - ALPHA/2, n-1} + t_{POWER, n-1}``. ``None`` when no number of seeds decides it (no
    observed difference, a mean beyond the margin, or more than ``MAX_SEEDS``).
    """
    if not (math.isfinite(mean) and math.isfinite(sd)):
        return None
    effect = (margin - abs(mean)) if margin is not None else abs(mean)
    if effect <= 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, MAX_SEEDS + 1):
        df, nc = n - 1, effect * math.sqrt(n) / sd
        if margin is not None:
            reached = nc >= scipy_stats.t.ppf(1 - ALPHA / 2, df) + scipy_stats.t.ppf(POWER, df)
        else:
            crit = scipy_stats.t.ppf(1 - ALPHA / 2, df)
            power = scipy_stats.nct.sf(crit, df, nc) + scipy_stats.nct.cdf(-crit, df, nc)
            reached = power >= POWER
        if reached:
            return n
    return None


def paired_verdict(claim: Claim, values: dict[int, float]) -> Claim:
    """Fill ``claim`` from per-seed values: mean, 95% interval, verdict, seeds needed."""
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
    claim.seeds_needed = seeds_to_decide(claim.mean, sd, claim.margin)
    return claim


# --- inputs -------------------------------------------------------------------------------------


class _Inputs:
    """What the claims read from a run directory: results.csv and the per-seed landscape summaries."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.rows = run.results()
        self.metric = primary_metric(self.rows)
        self.task = next(t for t in TASKS.values() if f"test_{t.primary}" == self.metric)
        self.done = {
            (r["method"], int(r["seed"])): float(r[self.metric])
            for r in self.rows
            if r["status"] == "done"
        }
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

    def gain(self, label: str, base: str) -> dict[int, float]:
        """Per seed ``metric(label) - metric(base)``, sign flipped for MSE so that > 0 favours ``label``."""
        sign = -1.0 if not self.task.probabilistic else 1.0
        return {
            s: sign * (v - self.done[(base, s)])
            for (lab, s), v in self.done.items()
            if lab == label and (base, s) in self.done
        }

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


def _claim1(inp: _Inputs) -> list[Claim]:
    unit = "points of test accuracy" if inp.task.probabilistic else "test MSE, SGD minus SWA"
    swas = [
        m
        for m in inp.run.cfg.methods
        if m.method == "swa" and not m.baseline and m.options.get("schedule", "swa") != "constant"
    ]
    if inp.sgd is None or not swas:
        missing = "an sgd method" if inp.sgd is None else "an swa method"
        return [
            Claim(
                "1",
                "SWA generalises better than SGD at the same budget",
                "Table 1",
                f"SWA − SGD, {unit}",
                note=f"the run has no {missing}; add one to the config and `swalab run` it",
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
        values = inp.gain(m.label, inp.sgd)
        if not values:
            claim.note = (
                f"no finished {m.label}/{inp.sgd} pair in results.csv; `{inp.run.resume_command}`"
            )
        out.append(paired_verdict(claim, values))
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
            f"protocol: {_PROTOCOL_NAMES[how]}{' (primary)' if first else ''}; median over rays "
            f"of width(w_SWA) − width(w_SGD), the same directions from both; width = {unit} at "
            "which the train NLL has risen by `rise` (a ray that stays below counts as the "
            "largest distance)",
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
            f"protocol: Hessian {name} of the train NLL at each solution, BN recomputed "
            f"(swalab.curvature); d = {name}(w_SGD) − {name}(w_SWA), > 0: SWA flatter. Not "
            "scale-invariant: a layer followed by BatchNorm with smaller weights has a larger "
            "curvature for the same function",
        )
        values = {
            seed: float(summary["curvature"]["sgd"][key]) - float(summary["curvature"]["swa"][key])
            for seed, (summary, _) in curvature.items()
        }
        claims.append(paired_verdict(claim, values))
    return claims


def _claim3(inp: _Inputs) -> Claim:
    claim = Claim(
        "3",
        "SGD ends at the periphery of a flat region that extends towards SWA",
        "Fig. 5 (line through w_SGD and w_SWA)",
        "train loss at t = 1.5 minus train loss at t = 0.5 on w(t) = t·w_SGD + (1 − t)·w_SWA "
        "(half the SGD–SWA distance beyond SGD vs towards SWA; > 0: the loss rises away from SWA "
        "faster than towards it)",
    )
    have, why = inp.piece("line")
    values = {}
    for seed, (_, where) in have.items():
        path = where / "line.npz"
        if not path.exists() and not path.is_symlink():
            continue
        line = load_npz(path, root=where)
        ts, loss = line["t"], line["train_loss"]
        if ts.min() > 0.5 or ts.max() < 1.5:
            why = (
                why
                or f"{path}: the line must span t in [0.5, 1.5]; recompute with `{inp.landscape_command}`"
            )
            continue
        values[seed] = float(np.interp(1.5, ts, loss) - np.interp(0.5, ts, loss))
    claim.note = why
    return paired_verdict(claim, values)


def _claim4(inp: _Inputs) -> Claim:
    margin = EQUIVALENCE_MARGIN[inp.task.primary]
    stat = (
        "test error of w_SWA minus test error of the ensemble of its snapshots, points"
        if inp.task.probabilistic
        else "test MSE of w_SWA minus that of the ensemble of its snapshots, in % of the ensemble's"
    )
    claim = Claim(
        "4",
        "SWA approximates the ensemble of the snapshots it averages",
        "§3.4 (SWA comparable to FGE)",
        f"{stat}; equivalent within ±{margin:g}",
        margin=margin,
    )
    have, why = inp.piece("ensemble")
    values = {}
    for seed, (summary, _) in have.items():
        e = summary["ensemble"]
        if e.get("average") is None or e.get("ensemble") is None:
            continue
        if inp.task.probabilistic:
            values[seed] = float(e["average"]) - float(e["ensemble"])
        else:
            values[seed] = (
                100.0 * (float(e["average"]) - float(e["ensemble"])) / float(e["ensemble"])
            )
    claim.note = why
    # the statistic is "SWA worse by": > margin contradicts; orientation kept for the equivalence test
    return paired_verdict(claim, values)


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
    values = inp.gain(label, base)
    if not values:
        claim.note = f"no finished {label}/{base} pair in results.csv; `{inp.run.resume_command}`"
    return paired_verdict(claim, values)


def _claim6(inp: _Inputs) -> Claim:
    metric = (
        "test error (points)" if inp.task.probabilistic else "test MSE (% of the recomputed one)"
    )
    claim = Claim(
        "6",
        "BatchNorm statistics must be recomputed for the averaged weights",
        "§3.2",
        f"{metric} of w_SWA with the BN statistics it carries (its run's last iterate's) minus with "
        "recomputed ones",
    )
    have, why = inp.piece("bn")
    values = {}
    for seed, (summary, _) in have.items():
        b = summary["bn"]
        key = "test_error" if inp.task.probabilistic else "test_nll"
        carried, recomputed = float(b["carried"][key]), float(b["recomputed"][key])
        values[seed] = (
            carried - recomputed
            if inp.task.probabilistic
            else 100.0 * (carried - recomputed) / recomputed
        )
    claim.note = why
    return paired_verdict(claim, values)


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
    """The six claims on the run directory (claim 1 once per SWA budget), in order."""
    inp = _Inputs(RunDir(run_dir))
    return [
        *_claim1(inp),
        *_claim2(inp),
        _claim3(inp),
        _claim4(inp),
        _claim5(inp),
        _claim6(inp),
        _claim_start(inp),
    ]


# --- output -------------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:+.3g}"


def claim_rows(claims: list[Claim]) -> tuple[list[str], list[list[str]]]:
    """A table: claim, source, seeds, mean d, 95% interval, verdict, seeds to decide, note."""
    header = [
        "claim",
        "paper",
        "seeds",
        "mean d",
        "95% CI",
        "verdict",
        "seeds to decide",
        "statistic d / note",
    ]
    rows = []
    for c in claims:
        interval = "–" if c.low is None else f"[{_num(c.low)}, {_num(c.high)}]"
        needed = (
            "–"
            if not c.values
            else (
                "never at this mean"
                if c.seeds_needed is None and len(c.values) > 1
                else "–"
                if c.seeds_needed is None
                else str(c.seeds_needed)
            )
        )
        if c.margin is not None and c.values:
            needed += f" (within ±{c.margin:g})" if needed[0].isdigit() else ""
        verdict = c.verdict if c.values else "no input"
        rows.append(
            [
                f"{c.id}. {c.title}",
                c.source,
                str(len(c.values)),
                _num(c.mean),
                interval,
                verdict,
                needed,
                c.statistic + (f" — {c.note}" if c.note else ""),
            ]
        )
    return header, rows


def format_claims(claims: list[Claim]) -> str:
    """Plain text for the terminal: one block per claim."""
    lines = [
        (
            f"verdicts: 95% paired t-interval over seeds; seeds to decide: paired t-test, two-sided "
            f"alpha {ALPHA:g}, power {POWER:g}, at the observed mean and sd (a power calculation)"
        )
    ]
    _, rows = claim_rows(claims)
    for row in rows:
        claim, source, n, mean, interval, verdict, needed, statistic = row
        summary = (
            f"  verdict: {verdict.upper()}  (seeds {n}, mean d {mean}, 95% CI {interval}, "
            f"seeds to decide: {needed})"
        )
        lines += ["", f"{claim}  [{source}]", summary, f"  d = {statistic}"]
    return "\n".join(lines)
