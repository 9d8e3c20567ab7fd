"""Honest statistics over seeds: mean ± std with the raw values, and paired differences to SGD.

A paired difference uses the runs of the same seed (same initialisation and data order), so the
95% interval is ``mean(d) ± t_{0.975, n-1} · sd(d) / sqrt(n)`` over the seeds both methods finished.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats as scipy_stats

from .methods import method_role

__all__ = ["MethodSummary", "summarize", "primary_metric", "baseline_label"]


@dataclass
class MethodSummary:
    label: str
    values: list[float]  # one per finished seed, in seed order
    mean: float
    std: float
    diverged: int
    baseline: str | None = None  # the label it is paired with
    diff_mean: float | None = None  # paired difference to the baseline
    diff_low: float | None = None
    diff_high: float | None = None
    pairs: int = 0


def primary_metric(rows: list[dict]) -> str:
    """``test_accuracy`` for classification runs, ``test_mse`` for regression."""
    return "test_mse" if any(r.get("test_mse") not in (None, "") for r in rows) else "test_accuracy"


def baseline_label(rows: list[dict]) -> str | None:
    """The baseline method (SGD) at budget 1 (the paper's), else the first one, else none."""
    sgd = [r for r in rows if method_role(r["method_name"]) == "baseline"]
    at_budget = [r for r in sgd if float(r["budget"]) == 1.0]
    return (at_budget or sgd or [{"method": None}])[0]["method"]


def _interval(diffs: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = (
        scipy_stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    )
    return mean, mean - half, mean + half


def summarize(rows: list[dict], metric: str) -> list[MethodSummary]:
    """One summary per method label, in first-seen order, with paired differences to its baseline.

    A method's baseline is its own ``baseline`` column if set, else the SGD run at budget 1.
    """
    labels = list(dict.fromkeys(r["method"] for r in rows))
    done = {(r["method"], int(r["seed"])): float(r[metric]) for r in rows if r["status"] == "done"}
    default_base = baseline_label(rows)
    own_base = {r["method"]: r.get("baseline") or None for r in rows}
    out = []
    for label in labels:
        seeds = sorted(
            int(r["seed"]) for r in rows if r["method"] == label and r["status"] == "done"
        )
        values = [done[(label, s)] for s in seeds]
        diverged = sum(1 for r in rows if r["method"] == label and r["status"] == "diverged")
        summary = MethodSummary(
            label,
            values,
            statistics.fmean(values) if values else math.nan,
            statistics.stdev(values) if len(values) > 1 else math.nan,
            diverged,
        )
        base = own_base.get(label) or default_base
        if base is not None and label != base:
            summary.baseline = base
            diffs = [done[(label, s)] - done[(base, s)] for s in seeds if (base, s) in done]
            if diffs:
                summary.diff_mean, summary.diff_low, summary.diff_high = _interval(diffs)
                summary.pairs = len(diffs)
        out.append(summary)
    return out
