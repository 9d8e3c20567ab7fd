"""``swalab posthoc RUN_DIR``: SWA over a grid of (start, end) windows from one run's snapshots.

The run of method ``posthoc.run`` stored ``swalab.posthoc`` snapshots after every epoch (float64
running sums), so the SWA average of the epochs ``start..end`` (1-based, both included) is exact
without training again (Izmailov et al., 2018, choose ``swa_start`` = 0.8 B + 1 and average to the
budget's end). Each window's average gets its BatchNorm statistics recomputed with the run's own
pass and is scored with the run's metrics; the rows go to ``posthoc.csv`` (method
``<label>[start-end]``) and the **window map** (``window_map.png``) shows the test metric over
(start, end), with SGD's result as the colour scale's centre and the paper's windows marked.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bn import has_batchnorm
from ..lab.evaluation import EvalContext, evaluate, model_outputs
from ..lab.methods import recipe_of
from ..lab.stats import primary_metric
from ..lab.task import task_of
from ..posthoc import Snapshots, swa_window
from .rundir import RunDir

__all__ = [
    "START_BAND",
    "default_grid",
    "evaluate_windows",
    "paper_windows",
    "start_band",
    "window_label",
    "window_map",
]

GRID_POINTS = 10  # starts and ends of the default grid
START_BAND = (0.6, 0.7, 0.8, 0.9)  # claim 7's starts, as fractions of B (docs/claims.md)


def start_band(budget_epochs: int) -> list[int]:
    """Claim 7's starts: ``floor(f B) + 1`` for ``f`` in ``START_BAND`` (0.8: the paper's)."""
    return sorted({int(f * budget_epochs) + 1 for f in START_BAND})


def window_label(label: str, start: int, end: int) -> str:
    return f"{label}[{start}-{end}]"


def default_grid(last: int, extra: Sequence[int] = ()) -> list[int]:
    """About ``GRID_POINTS`` epochs spread over ``1..last``, plus ``extra`` (the paper's)."""
    points = np.linspace(1, last, min(GRID_POINTS, last)).round().astype(int).tolist()
    return sorted({*points, *(e for e in extra if 1 <= e <= last)})


def paper_windows(run: RunDir) -> dict[str, tuple[int, int]]:
    """The (first, last) averaged epoch of each SWA run of the config (the paper's choice:
    ``swa_start`` = 0.8 B + 1 to the run's budget), by label."""
    out = {}
    for m in run.cfg.methods:
        if m.method != "swa":
            continue
        recipe = recipe_of(m, run.cfg.train, steps_per_epoch=1, model=nn.Linear(1, 1))
        epochs = recipe.averaged_epochs()
        if epochs and epochs == list(range(epochs[0], epochs[-1] + 1)):
            out[m.label] = (epochs[0], epochs[-1])
    return out


def _snapshots(run: RunDir, label: str, seed: int) -> Snapshots:
    return Snapshots(run.run(label, seed).path / "posthoc")


def evaluate_windows(
    run_dir: str | Path,
    starts: Sequence[int] | None = None,
    ends: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Evaluate every window ``start < end`` of the grid for every seed; write ``posthoc.csv`` and
    the window map; return the map's path. Windows are checked before any work starts."""
    run = RunDir(run_dir)
    cfg = run.cfg
    label = cfg.posthoc.run
    if not label:
        raise ValueError(
            f"{run.config_path} sets no posthoc.run, so no run stored snapshots; train one with "
            f"`swalab run {run.config_path} --out {run.path}-posthoc --set posthoc.run=LABEL`"
        )
    run.check_code()  # the run's own model code is allowed (--allow-import), before any work
    seeds = [s for s in cfg.seeds if _snapshots(run, label, s).files()]
    for seed in sorted(set(cfg.seeds) - set(seeds)):
        log(f"posthoc: {label} seed {seed} skipped (no snapshots yet; `{run.resume_command}`)")
    if not seeds:
        raise ValueError(
            f"no snapshots under {run.run(label, cfg.seeds[0]).path / 'posthoc'}; "
            f"finish the runs with `{run.resume_command}`"
        )
    last = min(_snapshots(run, label, s).index()[-1]["step"] for s in seeds)
    papers = paper_windows(run)
    band = start_band(cfg.train.epochs)
    starts = list(
        starts
        or cfg.posthoc.starts
        or default_grid(last, [*band, *(a for a, _ in papers.values())])
    )
    ends = list(ends or cfg.posthoc.ends or default_grid(last, [b for _, b in papers.values()]))
    for name, values in (("start", starts), ("end", ends)):
        outside = [v for v in values if not 1 <= v <= last]
        if outside:
            raise ValueError(f"{name}={outside[0]} is outside the stored epochs 1..{last}")
    windows = [(a, b) for a in starts for b in ends if a < b]
    if not windows:
        raise ValueError(f"no window with start < end in starts={starts}, ends={ends}")
    device = torch.device(device or "cpu")
    task = task_of(run.data(seeds[0]).task)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        snaps = _snapshots(run, label, seed)
        for a, b in windows:  # every window before any work: one line naming a bad one
            swa_window_check(snaps, a, b)
        bundle = run.data(seed)
        model = run.model(bundle).to(device)
        ctx = EvalContext(
            task,
            device,
            cfg.train.eval_batch_size,
            partial(run.bn_loader, bundle, seed, device),
            cfg.train.bn_batches,
            bn_weighting=cfg.train.bn_weighting,
        )
        for a, b in windows:
            model.load_state_dict(swa_window(snaps, a, b))
            if has_batchnorm(model):
                ctx.recompute_bn(model)
            row: dict[str, Any] = {
                "method": window_label(label, a, b),
                "source": label,
                "seed": seed,
                "start": a,
                "end": b,
                "epochs": b - a + 1,
            }
            for name in ("val", "test", "large_test"):  # large_test: claims' primary set
                split = getattr(bundle, name)
                if split is not None and len(split):
                    metrics = evaluate(model_outputs(model, split, ctx), split, task)
                    row.update({f"{name}_{k}": v for k, v in metrics.items()})
            rows.append(row)
        log(f"posthoc: {label} seed {seed}: {len(windows)} windows evaluated")
    # windows evaluated before (another grid) stay; the ones evaluated again are replaced
    fresh = {(r["method"], str(r["seed"])) for r in rows}
    kept = [r for r in run.posthoc_results() if (r["method"], r["seed"]) not in fresh]
    run.write_posthoc_results(kept + rows)
    return window_map(run)


def swa_window_check(snaps: Snapshots, start: int, end: int) -> None:
    """``ValueError`` from ``swa_window``'s checks for a window that the snapshots cannot give."""
    index = snaps.index()
    if not any(s["step"] == end for s in index) or not any(s["steps"][0] == start for s in index):
        swa_window(snaps, start, end)  # raises the one-line error naming the window


def _means(rows: list[dict[str, str]], metric: str) -> dict[tuple[int, int], float]:
    cells: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if r.get(metric) not in (None, ""):
            cells.setdefault((int(r["start"]), int(r["end"])), []).append(float(r[metric]))
    return {k: statistics.fmean(v) for k, v in cells.items()}


def sgd_reference(run: RunDir, metric: str) -> float | None:
    """The mean over seeds of the SGD (budget 1) run's test metric, if finished."""
    sgd = run.default_label("baseline")
    values = (
        [
            float(r[metric])
            for r in run.results()
            if r["method"] == sgd and r["status"] == "done" and r.get(metric)
        ]
        if sgd
        else []
    )
    return statistics.fmean(values) if values else None


def window_map(run: RunDir, path: Path | None = None, formats: Sequence[str] = ("png",)) -> Path:
    """The window map (default ``RUN_DIR/window_map.png``): the mean test metric over (start,
    end) from ``posthoc.csv``, centred on SGD's result, the paper's windows outlined."""
    from matplotlib import colors
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from .figures import _save

    rows = run.posthoc_results()
    metric = primary_metric(rows)
    means = _means(rows, metric)
    starts = sorted({a for a, _ in means})
    ends = sorted({b for _, b in means})
    grid = np.full((len(ends), len(starts)), np.nan)
    for (a, b), v in means.items():
        grid[ends.index(b), starts.index(a)] = v
    sgd = sgd_reference(run, metric) if run.results() else None
    higher = metric != "test_mse"
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot()
    finite = grid[np.isfinite(grid)]
    centre = sgd if sgd is not None else float(np.median(finite))
    spread = max(float(np.max(np.abs(finite - centre))), 1e-9)
    norm = colors.TwoSlopeNorm(centre, centre - spread, centre + spread)
    cmap = "RdBu" if higher else "RdBu_r"
    image = ax.pcolormesh(
        np.arange(len(starts) + 1), np.arange(len(ends) + 1), grid, cmap=cmap, norm=norm
    )
    digits = 2 if spread < 1 else 1  # small differences stay visible
    for i in range(len(ends)):
        for j in range(len(starts)):
            if np.isfinite(grid[i, j]):
                dark = abs(grid[i, j] - centre) > 0.6 * spread  # white on the deep colours
                ax.text(
                    j + 0.5,
                    i + 0.42,
                    f"{grid[i, j]:.{digits}f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if dark else "black",
                )
    ax.set_xticks(np.arange(len(starts)) + 0.5, [str(s) for s in starts], fontsize=7)
    ax.set_yticks(np.arange(len(ends)) + 0.5, [str(e) for e in ends], fontsize=7)
    ax.set_xlabel("first averaged epoch (start)")
    ax.set_ylabel("last averaged epoch (end)")
    name = metric.replace("test_", "test ")
    bar = fig.colorbar(image, ax=ax, label=f"{name} (mean over seeds)")
    if sgd is not None:
        bar.ax.axhline(sgd, color="black", linewidth=2)
    for label, (a, b) in paper_windows(run).items():
        if a in starts and b in ends:
            x, y = starts.index(a), ends.index(b)
            ax.add_patch(Rectangle((x, y), 1, 1, fill=False, edgecolor="black", linewidth=2))
            ax.text(x + 0.5, y + 0.93, label, ha="center", va="top", fontsize=5, weight="bold")
    source = rows[0]["source"] if rows else "?"
    ref = f"; SGD {sgd:.2f} (black line on the scale)" if sgd is not None else ""
    better = "blue: better than SGD" if sgd is not None else "centred on the median"
    ax.set_title(
        f"SWA window map from {source}'s snapshots{ref}\n{better}; outlined: the paper's windows",
        fontsize=9,
    )
    return _save(fig, path or run.path / "window_map.png", formats)
