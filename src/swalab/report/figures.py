"""Matplotlib figures of the landscape and the report, drawn without pyplot (no global state) to PNG."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colors
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..lab.files import atomic_output
from ..landscape import log_levels

__all__ = [
    "learning_curves_figure",
    "line_figure",
    "lr_figure",
    "plane_figure",
    "rays_figure",
    "reliability_figure",
    "width_figure",
]

SWA_COLOR, SGD_COLOR = "tab:blue", "tab:orange"
DPI = 110
# The paper's plane figures (dnn-mode-connectivity plane_plot.py): clip values, log_alpha of the levels.
TRAIN_LOSS_CLIP, TRAIN_LOSS_LOG_ALPHA = 5.0, -5.0
TEST_ERROR_CLIP, TEST_ERROR_LOG_ALPHA = 40.0, -1.0


def _save(fig: Figure, path: Path) -> Path:
    with atomic_output(path) as tmp:  # a rename replaces a planted link instead of writing through it
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    return path


def _error_label(values: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """Key and axis label of the test metric: error (%) for classification, else the test MSE."""
    if np.all(np.isnan(values["test_error"])):
        return "test_nll", "test MSE"
    return "test_error", "test error (%)"


def line_figure(ts: np.ndarray, values: Mapping[str, np.ndarray], sgd: str, swa: str, path: Path) -> Path:
    """Train loss and test error along ``t * w_SGD + (1 - t) * w_SWA`` (paper Fig. 5)."""
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    left.plot(ts, values["train_loss"], color="k", label="train loss (CE + L2)")
    left.plot(ts, values["train_nll"], color="k", ls="--", lw=1, label="train NLL")
    key, label = _error_label(values)
    right.plot(ts, values[key], color="tab:red")
    for ax, ylabel in ((left, "train loss"), (right, label)):
        ax.axvline(0, color=SWA_COLOR, lw=1, label=swa)
        ax.axvline(1, color=SGD_COLOR, lw=1, label=sgd)
        ax.set_xlabel(f"t   (0 = {swa}, 1 = {sgd})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"line w(t) = t·w_{sgd} + (1 − t)·w_{swa}")
    return _save(fig, path)


def rays_figure(arrays: Mapping[str, np.ndarray], sgd: str, swa: str, path: Path) -> Path:
    """Train loss and test error along random rays from both solutions (paper Fig. 4)."""
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    d = arrays["distances"]
    key, label = _error_label({"test_error": arrays["swa_test_error"]})
    for name, color, text in (("swa", SWA_COLOR, swa), ("sgd", SGD_COLOR, sgd)):
        for i, (loss, err) in enumerate(zip(arrays[f"{name}_train_loss"], arrays[f"{name}_{key}"])):
            left.plot(d, loss, color=color, lw=1, alpha=0.7, label=text if i == 0 else None)
            right.plot(d, err, color=color, lw=1, alpha=0.7, label=text if i == 0 else None)
    for ax, ylabel in ((left, "train loss"), (right, label)):
        ax.set_xlabel("distance ‖t·d/‖d‖‖")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"random rays w + t·d/‖d‖, d ~ N(0, I), {len(arrays['swa_train_loss'])} directions")
    return _save(fig, path)


def width_figure(widths: Mapping[str, Sequence[float]], max_distance: float, rise: float, sgd: str, swa: str,
                 path: Path) -> Path:
    """Per solution, the distance along each ray at which the train loss has risen by ``rise``."""
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    for i, (key, color, text) in enumerate((("swa", SWA_COLOR, swa), ("sgd", SGD_COLOR, sgd))):
        w = np.array(widths[key], dtype=float)
        inside = np.isfinite(w)
        jitter = np.linspace(-0.12, 0.12, len(w)) if len(w) > 1 else np.zeros(1)
        ax.scatter(i + jitter[inside], w[inside], color=color, s=18)
        ax.scatter(i + jitter[~inside], np.full((~inside).sum(), max_distance), color=color, marker="^", s=24)
        if inside.any():
            ax.hlines(np.median(np.where(inside, w, max_distance)), i - 0.25, i + 0.25, color=color, lw=2)
    ax.set_xticks([0, 1], [swa, sgd])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(0, max_distance * 1.05)
    ax.set_ylabel(f"distance where train loss rises by {rise:g}")
    ax.set_title("width along random rays (▲: beyond the range, bar: median)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _level_format(levels: np.ndarray) -> str:
    """A %g format with enough significant digits to tell neighbouring levels apart."""
    gap = float(np.min(np.diff(levels)))
    top = float(np.max(np.abs(levels)))
    digits = 3 if gap <= 0 or top <= 0 else min(6, max(3, math.ceil(math.log10(top / gap)) + 1))
    return f"%.{digits}g"


def _plane_panel(fig: Figure, ax: Axes, xy: np.ndarray, values: np.ndarray, clip: float | None, log_alpha: float,
                 title: str) -> None:
    levels = log_levels(values, clip, log_alpha)
    norm = colors.BoundaryNorm(levels, 256, extend="max")
    filled = ax.contourf(xy[..., 0], xy[..., 1], values, levels=levels, cmap="viridis", norm=norm, extend="max")
    ax.contour(xy[..., 0], xy[..., 1], values, levels=levels, colors="k", linewidths=0.5, alpha=0.4)
    bar = fig.colorbar(filled, ax=ax, ticks=levels, format=_level_format(levels))
    bar.ax.tick_params(labelsize=7)
    ax.set_xlim(xy[..., 0].min(), xy[..., 0].max())
    ax.set_ylim(xy[..., 1].min(), xy[..., 1].max())
    ax.set_title(title, fontsize=10)


def plane_figure(xy: np.ndarray, values: Mapping[str, np.ndarray], points: np.ndarray, labels: Sequence[str],
                 paths: Mapping[str, np.ndarray], marks: Mapping[str, np.ndarray], title: str, path: Path) -> Path:
    """Train loss and test error on the plane through three points (paper Fig. 1, 3), log-scaled levels."""
    fig = Figure(figsize=(13, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    key, label = _error_label(values)
    panels = (("train_loss", TRAIN_LOSS_CLIP, TRAIN_LOSS_LOG_ALPHA, f"train loss (clipped at {TRAIN_LOSS_CLIP:g})"),
              (key, TEST_ERROR_CLIP if key == "test_error" else None,
               TEST_ERROR_LOG_ALPHA if key == "test_error" else TRAIN_LOSS_LOG_ALPHA,
               f"{label}" + (f" (clipped at {TEST_ERROR_CLIP:g}%)" if key == "test_error" else "")))
    for ax, (k, clip, log_alpha, panel_title) in zip(axes, panels):
        _plane_panel(fig, ax, xy, values[k], clip, log_alpha, panel_title)
        for name, p in paths.items():
            ax.plot(p[:, 0], p[:, 1], color="w", lw=1.2, marker=".", ms=5, label=name)
        x_mid = 0.5 * (xy[..., 0].min() + xy[..., 0].max())
        for (x, y), text in zip(points, labels):
            ax.scatter([x], [y], color="k", marker="o", s=40, zorder=3)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(6 if x < x_mid else -6, 6), fontsize=8,
                        ha="left" if x < x_mid else "right", zorder=5,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "w", "alpha": 0.75})
        for (name, p), marker in zip(marks.items(), ("*", "X", "P")):
            ax.scatter([p[0]], [p[1]], color="r", marker=marker, s=90, zorder=4, label=name)
        if paths or marks:
            ax.legend(fontsize=7, loc="best", framealpha=0.8)
    fig.suptitle(title)
    return _save(fig, path)


def learning_curves_figure(curves: Mapping[str, Mapping[str, np.ndarray]], metric: str, focus: Sequence[str],
                           path: Path) -> Path:
    """Test metric over epochs: the SGD iterate and the running SWA model (document 003, Fig. 1).

    Args:
        curves: ``{label: {"epoch", "iterate", "average" (absent for non-averaging methods)}}``,
            already averaged over seeds.
        metric: e.g. ``test_accuracy``.
        focus: labels drawn in the left panel with both curves (SGD and SWA); the right panel shows
            every method's own model: its running average where it has one, else its iterate.
    """
    fig = Figure(figsize=(12, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    color = {label: f"C{i % 10}" for i, label in enumerate(curves)}
    for label in (f for f in focus if f in curves):
        c = curves[label]
        ax_label = f"{label} (iterate)" if "average" in c else label
        left.plot(c["epoch"], c["iterate"], color=color[label], lw=1.2, label=ax_label)
        if "average" in c:
            left.plot(c["epoch"], c["average"], color=color[label], lw=2.2, ls="--", label=f"{label} (running average)")
    for label, c in curves.items():
        # before averaging starts, a method's model is its iterate
        own = np.where(np.isnan(c["average"]), c["iterate"], c["average"]) if "average" in c else c["iterate"]
        right.plot(c["epoch"], own, color=color[label], lw=1.5, label=label)
    unit = " (%)" if metric.endswith("accuracy") else ""
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric.replace("_", " ") + unit)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    left.set_title(" vs ".join(f for f in focus if f in curves) or "no SGD/SWA runs", fontsize=10)
    right.set_title("every method's own model (running average where there is one)", fontsize=10)
    if metric.endswith("accuracy"):
        top = max(float(np.nanmax(np.concatenate([c["iterate"], c.get("average", c["iterate"])])))
                  for c in curves.values())
        for ax in (left, right):
            ax.set_ylim(max(0.0, top - 30), min(100.0, top + 2))
    return _save(fig, path)


def lr_figure(schedules: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Learning rate of every method: the value at the first step of each epoch, held through the epoch."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    ax = fig.subplots()
    for i, (label, (epochs, lr)) in enumerate(schedules.items()):
        x = np.concatenate([epochs - 1, epochs[-1:]])  # epoch e runs from e - 1 to e
        ax.plot(x, np.concatenate([lr, lr[-1:]]), drawstyle="steps-post", label=label, lw=1.5,
                color=f"C{i % 10}", alpha=0.85)
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def reliability_figure(diagrams: Mapping[str, Mapping[str, Sequence[float]]], eces: Mapping[str, float],
                       path: Path) -> Path:
    """Reliability diagrams: accuracy minus confidence per equal-mass bin (SWAG paper style)."""
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    left.plot([0, 1], [0, 1], color="gray", lw=1, ls=":")
    for i, (label, d) in enumerate(diagrams.items()):
        conf, acc = np.array(d["confidence"]), np.array(d["accuracy"])
        text = f"{label} (ECE {100 * eces[label]:.2f}%)"
        left.plot(conf, acc, marker=".", color=f"C{i % 10}", label=text)
        right.plot(conf, acc - conf, marker=".", color=f"C{i % 10}", label=text)
    right.axhline(0, color="gray", lw=1, ls=":")
    left.set_xlabel("confidence")
    left.set_ylabel("accuracy")
    right.set_xlabel("confidence")
    right.set_ylabel("accuracy − confidence")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("calibration on the test set (20 equal-mass bins)")
    return _save(fig, path)
