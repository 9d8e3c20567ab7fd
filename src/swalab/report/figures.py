"""Matplotlib figures of the landscape and the report, drawn without pyplot (no global state).

Every figure is written as PNG (what the Markdown and HTML pages show) and, with ``formats``, also
as SVG and PDF beside it (vector files for a paper), each through a temporary file and a rename.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colors, patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..lab.files import atomic_output
from ..landscape import log_levels

__all__ = [
    "FORMATS",
    "learning_curves_figure",
    "line_figure",
    "line_seeds_figure",
    "lr_figure",
    "own_curves",
    "own_models_figure",
    "plane_figure",
    "protocols_figure",
    "rays_figure",
    "rays_seeds_figure",
    "reliability_figure",
    "small_multiples_figure",
    "width_figure",
    "width_seeds_figure",
]

SWA_COLOR, SGD_COLOR = "tab:blue", "tab:orange"
DPI = 200  # PNG resolution (SVG and PDF are vector files)
FORMATS = ("png", "svg", "pdf")
# The paper's plane figures (dnn-mode-connectivity plane_plot.py): clip values, levels' log_alpha.
TRAIN_LOSS_CLIP, TRAIN_LOSS_LOG_ALPHA = 5.0, -5.0
TEST_ERROR_CLIP, TEST_ERROR_LOG_ALPHA = 40.0, -1.0


def _save(fig: Figure, path: Path, formats: Sequence[str] = ("png",)) -> Path:
    """Write ``fig`` as ``path`` (PNG) and as each other format in ``formats`` beside it."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(
            f"figure formats must be among {', '.join(FORMATS)}, got {', '.join(unknown)}"
        )
    for fmt in dict.fromkeys(["png", *formats]):
        with atomic_output(path.with_suffix(f".{fmt}")) as tmp:
            fig.savefig(
                tmp,
                format=fmt,
                dpi=DPI,
                bbox_inches="tight",
                metadata={"Date": None} if fmt == "svg" else None,
            )  # reproducible SVG files
    return path


def _error_label(values: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """Key and axis label of the test metric: error (%) for classification, else the test MSE."""
    if np.all(np.isnan(values["test_error"])):
        return "test_nll", "test MSE"
    return "test_error", "test error (%)"


def line_figure(
    ts: np.ndarray,
    values: Mapping[str, np.ndarray],
    sgd: str,
    swa: str,
    path: Path,
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
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
    return _save(fig, path, formats)


def rays_figure(
    arrays: Mapping[str, np.ndarray],
    sgd: str,
    swa: str,
    path: Path,
    directions: str = "raw",
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
    """Train NLL (the data loss) and test error along random rays from both solutions (paper
    Fig. 4); ``directions``: how the rays were scaled (``swalab.landscape.normalize_direction``)."""
    d = arrays["distances"]
    nll = "train_nll" if "swa_train_nll" in arrays else "train_loss"  # files of older versions
    key, label = _error_label({"test_error": arrays["swa_test_error"]})
    # rays stopped at their width (ray_tails: false) carry the train loss alone
    tested = not np.all(np.isnan(arrays[f"swa_{key}"]))
    fig = Figure(figsize=(10, 3.6) if tested else (5.5, 3.6))
    axes = fig.subplots(1, 2) if tested else [fig.subplots(1, 1)]
    panels = list(zip(axes, (nll, key), (nll.replace("_", " "), label)))
    for name, color, text in (("swa", SWA_COLOR, swa), ("sgd", SGD_COLOR, sgd)):
        for ax, metric, _ in panels:
            for i, values in enumerate(arrays[f"{name}_{metric}"]):
                ax.plot(d, values, color=color, lw=1, alpha=0.7, label=text if i == 0 else None)
    for ax, _, ylabel in panels:
        ax.set_xlabel(_RAY_AXIS[directions])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{_RAY_TITLE[directions]}, {len(arrays['swa_train_loss'])} directions")
    return _save(fig, path, formats)


_RAY_AXIS = {
    "raw": "distance ‖t·d/‖d‖‖",
    "filter": "t (steps of each filter's own norm)",
    "layer": "t (steps of each tensor's own norm)",
}
_RAY_TITLE = {
    "raw": "random rays w + t·d/‖d‖, d ~ N(0, I)",
    "filter": "filter-normalised rays w + t·d, ‖d_f‖ = ‖w_f‖ per filter (Li et al. 2018)",
    "layer": "layer-normalised rays w + t·d, ‖d_l‖ = ‖w_l‖ per tensor",
}


def _capped(widths: Sequence[float] | np.ndarray, cap: float) -> np.ndarray:
    """Widths with a ray beyond the range (inf) counted at the range's end ``cap``."""
    w = np.asarray(widths, dtype=float)
    return np.where(np.isfinite(w), w, cap)


def width_figure(
    widths: Mapping[str, Sequence[float]],
    max_distance: float,
    rise: float,
    sgd: str,
    swa: str,
    path: Path,
    directions: str = "raw",
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
    """Per solution, the distance along each ray at which the train NLL has risen by ``rise``."""
    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    for i, (key, color) in enumerate((("swa", SWA_COLOR), ("sgd", SGD_COLOR))):
        w = np.array(widths[key], dtype=float)
        inside = np.isfinite(w)
        jitter = np.linspace(-0.12, 0.12, len(w)) if len(w) > 1 else np.zeros(1)
        ax.scatter(i + jitter[inside], w[inside], color=color, s=18)
        ax.scatter(
            i + jitter[~inside],
            np.full((~inside).sum(), max_distance),
            color=color,
            marker="^",
            s=24,
        )
        if inside.any():
            ax.hlines(np.median(_capped(w, max_distance)), i - 0.25, i + 0.25, color=color, lw=2)
    ax.set_xticks([0, 1], [swa, sgd])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylim(0, max_distance * 1.05)
    ax.set_ylabel(f"{'distance' if directions == 'raw' else 't'} where train NLL rises by {rise:g}")
    ax.set_title(f"width along {directions} rays (▲: beyond the range, bar: median)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path, formats)


def protocols_figure(
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    rise: float,
    sgd: str,
    swa: str,
    path: Path,
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
    """The rays under each scaling of the directions side by side (``arrays``: ``{direction:
    rays arrays}``): train NLL along the rays from both solutions (top), and each ray's width
    from SWA against its width from SGD (bottom; above the diagonal: wider from SWA)."""
    hows = list(arrays)
    fig = Figure(figsize=(4.8 * len(hows), 7.6), layout="constrained")
    axes = np.array(fig.subplots(2, len(hows), squeeze=False))
    for col, how in enumerate(hows):
        a = arrays[how]
        d = a["distances"]
        nll = "train_nll" if "swa_train_nll" in a else "train_loss"
        top, bottom = axes[0, col], axes[1, col]
        for name, color, text in (("swa", SWA_COLOR, swa), ("sgd", SGD_COLOR, sgd)):
            for i, values in enumerate(a[f"{name}_{nll}"]):
                top.plot(d, values, color=color, lw=1, alpha=0.7, label=text if i == 0 else None)
        top.axhline(float(a[f"swa_{nll}"][0, 0]) + rise, color=SWA_COLOR, lw=0.6, ls=":")
        top.axhline(float(a[f"sgd_{nll}"][0, 0]) + rise, color=SGD_COLOR, lw=0.6, ls=":")
        top.set_xlabel(_RAY_AXIS[how])
        top.set_ylabel(nll.replace("_", " "))
        top.set_title(_RAY_TITLE[how], fontsize=8)
        top.grid(alpha=0.3)
        top.legend(fontsize=8)
        cap = float(d[-1])
        w_swa, w_sgd = _capped(a["swa_width"], cap), _capped(a["sgd_width"], cap)
        bottom.scatter(w_sgd, w_swa, color="k", s=16)
        low = 0.9 * float(min(w_swa.min(), w_sgd.min()))
        high = 1.1 * float(max(w_swa.max(), w_sgd.max()))
        bottom.plot([low, high], [low, high], color="grey", lw=0.8, ls="--")
        bottom.set_xlim(low, high)
        bottom.set_ylim(low, high)
        wider = int((w_swa > w_sgd).sum())
        ratio = float(np.median(w_swa / w_sgd))
        bottom.set_title(
            f"{how}: wider from {swa} on {wider}/{len(w_swa)} rays, median ratio {ratio:.3f}",
            fontsize=8,
        )
        bottom.set_xlabel(f"width from {sgd} (train NLL +{rise:g})")
        bottom.set_ylabel(f"width from {swa}")
        bottom.grid(alpha=0.3)
    fig.suptitle("the same random rays under each scaling of the directions", fontsize=10)
    return _save(fig, path, formats)


def _level_format(levels: np.ndarray) -> str:
    """A %g format with enough significant digits to tell neighbouring levels apart."""
    gap = float(np.min(np.diff(levels)))
    top = float(np.max(np.abs(levels)))
    digits = 3 if gap <= 0 or top <= 0 else min(6, max(3, math.ceil(math.log10(top / gap)) + 1))
    return f"%.{digits}g"


def _plane_panel(
    fig: Figure,
    ax: Axes,
    xy: np.ndarray,
    values: np.ndarray,
    clip: float | None,
    log_alpha: float,
    title: str,
) -> None:
    levels = log_levels(values, clip, log_alpha)
    norm = colors.BoundaryNorm(levels, 256, extend="max")
    filled = ax.contourf(
        xy[..., 0], xy[..., 1], values, levels=levels, cmap="viridis", norm=norm, extend="max"
    )
    ax.contour(xy[..., 0], xy[..., 1], values, levels=levels, colors="k", linewidths=0.5, alpha=0.4)
    bar = fig.colorbar(filled, ax=ax, ticks=levels, format=_level_format(levels), shrink=0.9)
    bar.ax.tick_params(labelsize=7)
    ax.set_xlim(xy[..., 0].min(), xy[..., 0].max())
    ax.set_ylim(xy[..., 1].min(), xy[..., 1].max())
    ax.set_aspect("equal")  # distances in weight space read the same along both axes
    # landscape.plane: u points from the first point to the third, v towards the second
    ax.set_xlabel("weight-space distance along û = (w₃ − w₁)/‖w₃ − w₁‖", fontsize=8)
    ax.set_ylabel("weight-space distance along v̂ ⊥ û (towards w₂)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=10)


# the trajectory: a white line with a black outline, visible on the colour map and in the legend
_OUTLINED = [patheffects.Stroke(linewidth=3.0, foreground="k"), patheffects.Normal()]


def plane_figure(
    xy: np.ndarray,
    values: Mapping[str, np.ndarray],
    points: np.ndarray,
    labels: Sequence[str],
    paths: Mapping[str, np.ndarray],
    marks: Mapping[str, np.ndarray],
    title: str,
    path: Path,
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
    """Train loss and test error on the plane through w₁, w₂, w₃ (paper Fig. 1, 3), in the paper's
    style: log-scaled contour levels, equal aspect, the three points, the projected trajectory."""
    key, label = _error_label(values)
    span_x = float(np.ptp(xy[..., 0])) or 1.0
    ratio = float(np.ptp(xy[..., 1])) / span_x
    stacked = ratio < 0.5  # a long thin plane: the panels one above the other, each the full width
    panel_w = 10.0 if stacked else 5.6
    panel_h = min(max(panel_w * ratio, 1.0), 6.0) + 0.9
    fig = Figure(
        figsize=(panel_w + 1.6, 2 * panel_h + 1.2)
        if stacked
        else (2 * panel_w + 2.4, panel_h + 1.4),
        layout="constrained",
    )
    axes = fig.subplots(2, 1) if stacked else fig.subplots(1, 2)
    panels = (
        (
            "train_loss",
            TRAIN_LOSS_CLIP,
            TRAIN_LOSS_LOG_ALPHA,
            f"train loss (clipped at {TRAIN_LOSS_CLIP:g})",
        ),
        (
            key,
            TEST_ERROR_CLIP if key == "test_error" else None,
            TEST_ERROR_LOG_ALPHA if key == "test_error" else TRAIN_LOSS_LOG_ALPHA,
            f"{label}" + (f" (clipped at {TEST_ERROR_CLIP:g}%)" if key == "test_error" else ""),
        ),
    )
    x_mid = 0.5 * (xy[..., 0].min() + xy[..., 0].max())
    for ax, (k, clip, log_alpha, panel_title) in zip(axes, panels):
        _plane_panel(fig, ax, xy, values[k], clip, log_alpha, panel_title)
        for name, p in paths.items():
            ax.plot(
                p[:, 0],
                p[:, 1],
                color="w",
                lw=1.4,
                marker=".",
                ms=5,
                label=name,
                path_effects=_OUTLINED,
                zorder=3,
            )
        ax.scatter(
            points[:, 0],
            points[:, 1],
            color="k",
            edgecolors="w",
            marker="o",
            s=45,
            zorder=4,
            label="w₁, w₂, w₃",
        )
        for i, ((x, y), text) in enumerate(zip(points, labels)):
            ax.annotate(
                f"w{'₁₂₃'[i]}: {text}",
                (x, y),
                textcoords="offset points",
                xytext=(6 if x < x_mid else -6, 6),
                fontsize=8,
                ha="left" if x < x_mid else "right",
                zorder=6,
                bbox={"boxstyle": "round,pad=0.2", "fc": "w", "alpha": 0.8},
            )
        for (name, p), marker in zip(marks.items(), ("*", "X", "P")):
            ax.scatter(
                [p[0]],
                [p[1]],
                color="r",
                edgecolors="w",
                marker=marker,
                s=110,
                zorder=7,  # above the points' name boxes (a mark often sits next to a point)
                label=name,
            )
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        loc="outside lower center",
        ncols=min(len(names), 4),
        fontsize=8,
        framealpha=1.0,
    )
    fig.suptitle(title)
    return _save(fig, path, formats)


def _curve(ax: Axes, x: np.ndarray, y: np.ndarray, std: np.ndarray | None, **style: object) -> None:
    """A mean curve with its ± std band over seeds (no band for a single seed)."""
    (line,) = ax.plot(x, y, **style)
    if std is not None and np.any(std > 0):
        ax.fill_between(x, y - std, y + std, color=line.get_color(), alpha=0.18, lw=0)


def _late_window(
    curves: Mapping[str, Mapping[str, np.ndarray]], keys: Sequence[str]
) -> tuple[float, float, float]:
    """The first epoch of the second half and the y-range of every curve ± std from there on."""
    last = max(float(c["epoch"][-1]) for c in curves.values())
    start = max(1.0, 0.5 * last)
    lows, highs = [], []
    for c in curves.values():
        late = c["epoch"] >= start
        for key in keys:
            if key in c:
                std = np.nan_to_num(c.get(f"{key}_std", np.zeros_like(c[key])))
                lows.append(np.nanmin(np.where(late, c[key] - std, np.nan), initial=np.inf))
                highs.append(np.nanmax(np.where(late, c[key] + std, np.nan), initial=-np.inf))
    return start, float(min(lows)), float(max(highs))


def learning_curves_figure(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    metric: str,
    focus: Sequence[str],
    path: Path,
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
    """Test metric over epochs: the SGD iterate and the running SWA model,
    mean over seeds with a ± std band, on the full y-range.

    Where the first epochs would squeeze the end of training into a few pixels, an accuracy panel
    gets an inset on the second half of training and a positive loss or MSE a log y-axis.

    Args:
        curves: ``{label: {"epoch", "iterate", "average" (absent for non-averaging methods)}}``,
            averaged over seeds, with optional ``"iterate_std"``/``"average_std"``.
        metric: e.g. ``test_accuracy``.
        focus: labels drawn with both curves (SGD and SWA); every method's own model is drawn
            by :func:`own_models_figure`, one small panel each.
    """
    fig = Figure(figsize=(7, 4.4), layout="constrained")
    left = fig.subplots(1, 1)
    color = {label: f"C{i % 10}" for i, label in enumerate(curves)}

    def draw_left(ax: Axes) -> None:
        for label in (f for f in focus if f in curves):
            c = curves[label]
            _curve(
                ax,
                c["epoch"],
                c["iterate"],
                c.get("iterate_std"),
                color=color[label],
                lw=1.2,
                label=f"{label} (iterate)" if "average" in c else label,
            )
            if "average" in c:
                _curve(
                    ax,
                    c["epoch"],
                    c["average"],
                    c.get("average_std"),
                    color=color[label],
                    lw=2.2,
                    ls="--",
                    label=f"{label} (running average)",
                )

    unit = " (%)" if metric.endswith("accuracy") else ""
    panels = (
        (left, draw_left, {k: curves[k] for k in focus if k in curves}, ("iterate", "average")),
    )
    for ax, draw, shown, keys in panels:
        draw(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric.replace("_", " ") + unit)
        ax.grid(alpha=0.3)
        if not shown:
            continue
        values = np.concatenate([c[k] for c in shown.values() for k in keys if k in c])
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        start, late_low, late_high = _late_window(shown, keys)
        squeezed = high - low > 4 * max(late_high - late_low, 1e-12)
        if squeezed and metric.endswith("accuracy"):
            inset = ax.inset_axes((0.42, 0.08, 0.55, 0.5))
            draw(inset)
            pad = 0.1 * (late_high - late_low) or 0.5
            inset.set_xlim(start, max(float(c["epoch"][-1]) for c in shown.values()))
            inset.set_ylim(late_low - pad, late_high + pad)
            inset.tick_params(labelsize=7)
            inset.grid(alpha=0.3)
            ax.indicate_inset_zoom(inset, edgecolor="0.4")
        elif squeezed and low > 0 and high / low > 10:
            ax.set_yscale("log")
    left.legend(fontsize=8, loc="upper left" if metric.endswith("accuracy") else "upper right")
    left.set_title(" vs ".join(f for f in focus if f in curves) or "no SGD/SWA runs", fontsize=10)
    fig.suptitle("mean over seeds, band: ± std", fontsize=9)
    return _save(fig, path, formats)


def own_curves(
    curves: Mapping[str, Mapping[str, np.ndarray]],
) -> dict[str, dict[str, np.ndarray]]:
    """Every method's own model over epochs: its running average where it has one (its iterate
    before averaging starts), else its iterate; ``{"epoch", "own", "own_std"}``."""
    own: dict[str, dict[str, np.ndarray]] = {}
    for label, c in curves.items():
        zero = 0 * c["iterate"]
        if "average" in c:
            before = np.isnan(c["average"])
            own[label] = {
                "epoch": c["epoch"],
                "own": np.where(before, c["iterate"], c["average"]),
                "own_std": np.where(before, c.get("iterate_std", zero), c.get("average_std", zero)),
            }
        else:
            own[label] = {
                "epoch": c["epoch"],
                "own": c["iterate"],
                "own_std": c.get("iterate_std", zero),
            }
    return own


def own_models_figure(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    metric: str,
    baseline: str | None,
    path: Path,
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
    """Every method's own model (:func:`own_curves`) over the second half of its training, one small
    panel per method on a shared y-axis, the baseline (SGD) in grey in each: mean ± std over seeds."""
    own = own_curves(curves)
    late: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for label, c in own.items():
        keep = c["epoch"] >= max(1.0, 0.5 * float(c["epoch"][-1]))  # the second half of its run
        late[label] = (c["epoch"][keep], c["own"][keep], c["own_std"][keep])
    _, low, high = _late_window(own, ("own",))
    pad = 0.1 * (high - low) or 0.5
    reference = (
        (baseline, own[baseline]["epoch"], own[baseline]["own"]) if baseline in own else None
    )
    unit = " (%)" if metric.endswith("accuracy") else ""
    return small_multiples_figure(
        late,
        metric.replace("_", " ") + unit,
        path,
        reference=reference,
        ylim=(low - pad, high + pad),
        sharex=False,
        title="each method's own model over the second half of its training: mean over seeds, "
        "band ± std",
        formats=formats,
    )


def lr_figure(
    schedules: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: Path,
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
    """Learning rate of every method: its value at the first step of each epoch, held for it; one
    small panel per method on shared axes (equal schedules would hide each other in one)."""
    series = {
        label: (
            np.concatenate([epochs - 1, epochs[-1:]]),  # epoch e runs from e - 1 to e
            np.concatenate([lr, lr[-1:]]),
            None,
        )
        for label, (epochs, lr) in schedules.items()
    }
    return small_multiples_figure(
        series, "learning rate", path, step=True, logy=True, formats=formats
    )


def small_multiples_figure(
    series: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    ylabel: str,
    path: Path,
    *,
    reference: tuple[str, np.ndarray, np.ndarray] | None = None,
    step: bool = False,
    logy: bool = False,
    ylim: tuple[float, float] | None = None,
    sharex: bool = True,
    title: str = "",
    formats: Sequence[str] = ("png",),
) -> Path:
    """One small panel per curve ``{label: (x, y, std or None)}`` on shared axes, 4 to a row,
    with an optional ``reference`` curve ``(label, x, y)`` drawn thin and grey in every panel."""
    labels = list(series)
    cols = min(4, max(1, len(labels)))
    rows = -(-len(labels) // cols)
    fig = Figure(figsize=(3.1 * cols, 2.3 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(
        fig.subplots(rows, cols, sharex=sharex, sharey=True, squeeze=False)
    ).ravel()
    for i, (ax, label) in enumerate(zip(axes, labels)):
        x, y, std = series[label]
        if reference is not None and reference[0] != label:
            ax.plot(reference[1], reference[2], color="0.6", lw=1, label=reference[0])
        if step:
            ax.plot(x, y, drawstyle="steps-post", color=f"C{i % 10}", lw=1.6, label=label)
        else:
            _curve(ax, x, y, std, color=f"C{i % 10}", lw=1.6, label=label)
        ax.set_title(label, fontsize=9)
        if not sharex and len(x) > 1:  # the panel's own range (the reference may be longer)
            ax.set_xlim(float(x[0]), float(x[-1]))
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=7)
        if reference is not None and reference[0] != label:
            ax.legend(fontsize=6, loc="best")
    for ax in axes[len(labels) :]:
        ax.set_visible(False)
    if logy:
        axes[0].set_yscale("log")
    if ylim is not None:
        axes[0].set_ylim(*ylim)
    for ax in axes[(rows - 1) * cols :]:
        ax.set_xlabel("epoch", fontsize=8)
    for ax in axes[::cols]:
        ax.set_ylabel(ylabel, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, formats)


def reliability_figure(
    diagrams: Mapping[str, Mapping[str, Sequence[float]]],
    eces: Mapping[str, float],
    path: Path,
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
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
    return _save(fig, path, formats)


def _band(ax: Axes, x: np.ndarray, band: Mapping[str, np.ndarray], color: str, label: str) -> None:
    """Median over seeds (line), interquartile band (darker) and range (lighter)."""
    ax.fill_between(x, band["min"], band["max"], color=color, alpha=0.12, lw=0)
    ax.fill_between(x, band["q25"], band["q75"], color=color, alpha=0.3, lw=0)
    ax.plot(x, band["median"], color=color, lw=1.6, label=label)


def line_seeds_figure(
    ts: np.ndarray,
    bands: Mapping[str, Mapping[str, np.ndarray]],
    seeds: int,
    sgd: str,
    swa: str,
    path: Path,
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
    """Train loss and test error along ``t * w_SGD + (1 - t) * w_SWA`` (paper Fig. 5) over
    ``seeds`` seeds: ``bands`` ``{metric: report.seeds.quantile_band}``, median with its
    interquartile band and range."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _band(left, ts, bands["train_loss"], "k", "train loss (CE + L2), median")
    key, label = _error_label({k: v["median"] for k, v in bands.items()})
    _band(right, ts, bands[key], "tab:red", f"{label}, median")
    for ax, ylabel in ((left, "train loss"), (right, label)):
        ax.axvline(0, color=SWA_COLOR, lw=1, label=swa)
        ax.axvline(1, color=SGD_COLOR, lw=1, label=sgd)
        ax.set_xlabel(f"t   (0 = {swa}, 1 = {sgd})")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"line w(t) = t·w_{sgd} + (1 − t)·w_{swa}, {seeds} seeds: median, "
        "band: interquartile range (dark) and min–max (light)",
        fontsize=10,
    )
    return _save(fig, path, formats)


def rays_seeds_figure(
    per_seed: Mapping[int, Mapping[str, np.ndarray]],
    medians: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    sgd: str,
    swa: str,
    path: Path,
    directions: str = "raw",
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
    """Train NLL and test error along random rays from both solutions (paper Fig. 4) for every
    seed (``per_seed``: each seed's ``rays.npz`` arrays), thin; bold: ``medians``
    ``{metric: {"swa"|"sgd": (x, median)}}`` over all rays of all seeds
    (``report.seeds.pooled_median``)."""
    first = next(iter(per_seed.values()))
    nll = "train_nll" if "swa_train_nll" in first else "train_loss"
    key, label = _error_label({"test_error": first["swa_test_error"]})
    tested = all(not np.all(np.isnan(a[f"swa_{key}"])) for a in per_seed.values())
    fig = Figure(figsize=(10, 3.8) if tested else (5.5, 3.8), layout="constrained")
    axes = fig.subplots(1, 2) if tested else [fig.subplots(1, 1)]
    panels = list(zip(axes, (nll, key), (nll.replace("_", " "), label)))
    for name, color, text in (("swa", SWA_COLOR, swa), ("sgd", SGD_COLOR, sgd)):
        for ax, metric, _ in panels:
            for a in per_seed.values():
                for values in a[f"{name}_{metric}"]:
                    ax.plot(a["distances"], values, color=color, lw=0.6, alpha=0.25)
            if metric in medians:
                x, median = medians[metric][name]
                ax.plot(x, median, color=color, lw=2.2, label=f"{text}, median of all rays")
    for ax, _, ylabel in panels:
        ax.set_xlabel(_RAY_AXIS[directions])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    rays = len(first["swa_train_loss"])
    fig.suptitle(
        f"{_RAY_TITLE[directions]}: {len(per_seed)} seeds × {rays} directions (thin)",
        fontsize=10,
    )
    return _save(fig, path, formats)


def width_seeds_figure(
    widths: Mapping[int, Mapping[str, np.ndarray | float]],
    rise: float,
    sgd: str,
    swa: str,
    path: Path,
    directions: str = "raw",
    *,
    formats: Sequence[str] = ("png",),
) -> Path:
    """Each seed's median width over its rays from both solutions (``widths``: ``{seed: {"swa",
    "sgd": per-ray widths, inf beyond the range, "max": the range}}``, a ray beyond the range
    counted at its end), a grey line joining the two of a seed; bar: the median over seeds."""
    fig = Figure(figsize=(5, 3.6), layout="constrained")
    ax = fig.subplots()
    medians = {
        key: np.array([float(np.median(_capped(w[key], w["max"]))) for w in widths.values()])
        for key in ("swa", "sgd")
    }
    for a, b in zip(medians["swa"], medians["sgd"]):
        ax.plot([0, 1], [a, b], color="0.7", lw=0.8, zorder=1)
    for i, (key, color) in enumerate((("swa", SWA_COLOR), ("sgd", SGD_COLOR))):
        ax.scatter(np.full(len(medians[key]), i), medians[key], color=color, s=20, zorder=2)
        ax.hlines(np.median(medians[key]), i - 0.25, i + 0.25, color=color, lw=2, zorder=3)
    ax.set_xticks([0, 1], [swa, sgd])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylabel(f"median width ({'distance' if directions == 'raw' else 't'})", fontsize=9)
    ax.set_title(
        f"width along {directions} rays (train NLL +{rise:g}), {len(widths)} seeds\n"
        "dot: a seed's median over its rays; bar: median over seeds",
        fontsize=8,
    )
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path, formats)
