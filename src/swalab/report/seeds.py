"""The landscape's 1-D curves of every seed of a run, and their spread over seeds.

``swalab run`` computes the line (paper Fig. 5) and the rays (Fig. 4) for every seed
(``RUN_DIR/landscape/`` and ``landscape/seed<k>/``, :func:`~swalab.report.geometry.landscape_dir`);
the report draws them over all seeds: the line as the median over seeds with its interquartile
band and its range (:func:`quantile_band`), the rays as every seed's rays with the median over
all of them where every ray was evaluated (:func:`pooled_median`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..lab.files import load_npz, read_json
from ..lab.runschema import check_landscape
from .geometry import landscape_dir
from .rundir import RunDir

__all__ = ["pooled_median", "quantile_band", "seed_arrays"]


def quantile_band(curves: np.ndarray) -> dict[str, np.ndarray]:
    """Per column of ``curves`` (one row per seed): ``median``, ``q25``, ``q75`` (NumPy's linear
    quantiles), ``min`` and ``max`` over the rows, NaN entries left out."""
    c = np.asarray(curves, dtype=float)
    if c.ndim != 2 or c.shape[0] < 1:
        raise ValueError(f"curves must be a [seeds, points] array, got shape {c.shape}")
    q25, median, q75 = np.nanquantile(c, [0.25, 0.5, 0.75], axis=0)
    return {
        "median": median,
        "q25": q25,
        "q75": q75,
        "min": np.nanmin(c, axis=0),
        "max": np.nanmax(c, axis=0),
    }


def pooled_median(
    curves: list[tuple[np.ndarray, np.ndarray]], points: int = 41
) -> tuple[np.ndarray, np.ndarray]:
    """``(x, median)``: the median over all rays of all seeds, each seed's ``(distances, [rays,
    points])`` interpolated linearly onto ``points`` distances from 0 to the shortest seed's
    range, kept only up to the last distance where every ray is evaluated (rays stopped at
    their width are NaN beyond it: a median over the rays still going would be biased low)."""
    top = min(float(d[-1]) for d, _ in curves)
    x = np.linspace(0.0, top, points)
    rows = []
    for d, values in curves:
        for row in np.atleast_2d(values):
            inside = np.isfinite(row)
            last = int(np.nonzero(~inside)[0][0]) - 1 if not inside.all() else len(row) - 1
            rows.append(np.where(x <= d[last], np.interp(x, d, row), np.nan))
    stacked = np.array(rows)
    complete = np.isfinite(stacked).all(axis=0)
    end = len(x) if complete.all() else int(np.argmin(complete))
    return x[:end], np.median(stacked[:, :end], axis=0)


def seed_arrays(run: RunDir, name: str) -> tuple[dict[int, dict[str, np.ndarray]], list[int]]:
    """``({seed: arrays of landscape file name}, seeds without it)`` over the run's seeds, for
    the seeds whose ``landscape.json`` compares the same two runs as the first seed's."""
    found: dict[int, dict[str, np.ndarray]] = {}
    labels: tuple[Any, Any] | None = None
    missing = []
    for seed in run.cfg.seeds:
        out = landscape_dir(run, seed)
        summary = _summary(out)
        if summary is None or not (out / name).is_file():
            missing.append(seed)
            continue
        pair = (summary.get("sgd"), summary.get("swa"))
        if labels is None:
            labels = pair
        if pair != labels:
            missing.append(seed)
            continue
        found[seed] = load_npz(out / name, root=run.path)
    return found, missing


def _summary(out: Path) -> dict[str, Any] | None:
    path = out / "landscape.json"
    if not path.is_file():
        return None
    return check_landscape(path, read_json(path, root=out))  # a damaged one: one line naming it
