"""``swalab report RUN_DIR``: a report of a run from its saved files only, as Markdown and one HTML page.

The report is a list of blocks (headings, paragraphs, tables, figures) rendered twice:
``report/report.md`` with the PNGs beside it, and ``report/report.html``, one self-contained page
(CSS inline, images base64-embedded, no scripts, no external resources).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics
from ..lab.files import RunFileError, atomic_write_text, load_npz, read_json
from ..lab.methods import method_role
from ..lab.runschema import check_landscape
from ..lab.stats import MethodSummary, primary_metric, summarize
from . import export, figures
from .geometry import ray_protocols
from .rundir import RunDir
from .seeds import pooled_median, quantile_band, seed_arrays

__all__ = ["Block", "build_report", "format_value", "learning_curves", "results_tables"]

LANDSCAPE_FIGURES = (
    (
        "line",
        "line.png",
        "Train loss and test error along the line t·w_SGD + (1 − t)·w_SWA (paper Fig. 5).",
    ),
    (
        "rays",
        "rays_protocols.png",
        "The same random rays under each scaling of the directions, side by side: filter-"
        "normalised (Li et al. 2018; invariant to rescaling a layer followed by BatchNorm) and "
        "raw (the paper's Fig. 4). Top: train NLL along the rays; bottom: each ray's width from "
        "SWA against its width from SGD.",
    ),
    (
        "rays",
        "rays.png",
        "Train NLL and test error along raw random rays from both solutions (paper Fig. 4).",
    ),
    (
        "rays",
        "width.png",
        "Width on raw rays: distance along each ray at which the train NLL has risen by the set "
        "amount.",
    ),
    (
        "plane",
        "plane.png",
        "The paper's Fig. 1 (middle, right): train loss and test error in the plane through the "
        "point SGD and SWA both start from (the last epoch their runs trained alike, or the "
        "epoch before SWA's first averaged one if earlier), SGD's end and SWA, BN recomputed at "
        "every grid point; "
        "axes in weight-space distance; the SWA run's iterates projected.",
    ),
    (
        "plane_init",
        "plane_init.png",
        "The plane through SGD's initialisation, SGD's end and SWA, with SGD's trajectory "
        "projected.",
    ),
    (
        "snapshots",
        "snapshots.png",
        "The paper's Fig. 1 (left) and Fig. 3: the plane through three averaged SWA snapshots "
        "(first, middle, last); their average and the SWA solution marked, the SWA run's "
        "iterates projected.",
    ),
)


@dataclass
class Block:
    """One element of the report: ``kind`` is h1, h2, h3, p, note, code, table, figure or files
    (``rows``: ``[name, path]`` of files written beside the report)."""

    kind: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    image: Path | None = None
    stem: str = ""  # a table with a stem is also written as <stem>.csv and <stem>.tex


# --- numbers -----------------------------------------------------------------------------------------


def format_value(value: float | None, metric: str, signed: bool = False) -> str:
    """Accuracies with 2 decimals, other metrics with 4; ``–`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.2f}" if metric.endswith("accuracy") else f"{value:.4f}"
    return "+" + text if signed and not text.startswith("-") else text


def _metric_title(metric: str) -> str:
    names = {
        "test_accuracy": "test accuracy (%)",
        "test_mse": "test MSE",
        "test_loss": "test NLL",
        "test_ece": "test ECE (20 equal-mass bins)",
    }
    return names.get(metric, metric)


def results_tables(rows: list[dict[str, str]]) -> list[tuple[str, list[MethodSummary], Block]]:
    """The results tables in the paper's format, one per metric: the primary metric, then NLL and ECE."""
    primary = primary_metric(rows)
    chosen = [primary] + (
        [
            m
            for m in ("test_loss", "test_ece")
            if all(r.get(m) not in (None, "") for r in rows if r["status"] == "done")
        ]
        if primary == "test_accuracy"
        else []
    )
    seeds = sorted({int(r["seed"]) for r in rows})
    tables = []
    for metric in chosen:
        summaries = summarize(rows, metric)
        header = ["method", "n", "mean ± std", "Δ vs", "Δ [95% CI]"] + [f"seed {s}" for s in seeds]
        body = []
        for s in summaries:
            done_seeds = sorted(
                int(r["seed"]) for r in rows if r["method"] == s.label and r["status"] == "done"
            )
            by_seed = dict(zip(done_seeds, s.values))
            n = f"{len(s.values)}" + (f" ({s.diverged} diverged)" if s.diverged else "")
            diff = (
                ""
                if s.diff_mean is None
                else (
                    f"{format_value(s.diff_mean, metric, True)} [{format_value(s.diff_low, metric, True)}, "
                    f"{format_value(s.diff_high, metric, True)}]"
                )
            )
            body.append(
                [
                    s.label,
                    n,
                    f"{format_value(s.mean, metric)} ± {format_value(s.std, metric)}",
                    s.baseline or "",
                    diff,
                ]
                + [format_value(by_seed.get(seed), metric) for seed in seeds]
            )
        tables.append((metric, summaries, Block("table", _metric_title(metric), header, body)))
    return tables


# --- sections ----------------------------------------------------------------------------------------


def _header(run: RunDir) -> list[Block]:
    cfg = run.cfg
    blocks = [Block("h1", f"swalab report: {cfg.name}")]
    if cfg.description:
        blocks.append(Block("p", cfg.description))
    meta = run.meta()
    facts = [
        f"run directory `{run.path}`",
        f"dataset {cfg.data.name}",
        f"model {cfg.model.name}",
        f"budget B = {cfg.train.epochs} epochs",
        f"seeds {cfg.seeds}",
    ]
    if meta:
        facts += [f"torch {meta.get('torch')}", f"swalab {meta.get('swalab')}"]
        if meta.get("git_revision"):
            facts.append(f"git {str(meta['git_revision'])[:10]}")
    blocks.append(Block("p", "; ".join(facts) + "."))
    if meta.get("command"):
        blocks.append(Block("code", " ".join(str(a) for a in meta["command"])))
    return blocks


def _claims(run: RunDir) -> list[Block]:
    """The paper's six claims with their verdicts (``swalab claims``; docs/claims.md)."""
    from .claims import ALPHA, POWER, claim_rows, evaluate_claims

    claims = evaluate_claims(run.path)
    header, rows = claim_rows(claims)
    blocks = [
        Block("h2", "Claims"),
        Block(
            "p",
            f"Each claim of the SWA paper as a per-seed statistic d (> 0: the paper's side), its "
            f"paired 95% interval over seeds and a verdict; seeds to decide: a power calculation "
            f"(paired t-test, two-sided alpha {ALPHA:g}, power {POWER:g}) at the observed mean and "
            "standard deviation. Statistics and thresholds: docs/claims.md.",
        ),
        Block("table", "The paper's claims on this run", header, rows, stem="table_claims"),
    ]
    against = [c for c in claims if c.verdict == "contradicted"]
    if against:
        blocks.append(
            Block(
                "note",
                "this run contradicts the paper on: "
                + "; ".join(f"claim {c.id} ({c.title})" for c in against),
            )
        )
    return blocks


def _results(run: RunDir, out: Path) -> list[Block]:
    rows = run.results()
    blocks = [
        Block("h2", "Results"),
        Block(
            "p",
            "Mean ± std over seeds; Δ = paired difference to the baseline over the same seeds with "
            "its 95% t-interval; the raw value of every seed.",
        ),
    ]
    for metric, summaries, table in results_tables(rows):
        blocks.append(table)
        files = export.write_table(
            out,
            f"table_{metric}",
            table.text,
            table.header,
            table.rows,
            export.summary_csv(summaries, rows, metric),
        )
        blocks.append(
            Block(
                "files",
                rows=[["CSV (full precision)", files[0].name], ["LaTeX (booktabs)", files[1].name]],
            )
        )
    unfinished = sorted({r["method"] for r in rows if r["status"] != "done"})
    if unfinished:
        blocks.append(Block("note", f"not finished or diverged: {', '.join(unfinished)}"))
    return blocks


def learning_curves(
    run: RunDir, metric: str
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """From every ``metrics.jsonl``: per method the test metric over epochs averaged over seeds,
    ``{"epoch", "iterate", "average"}`` (``average``: the running average, NaN before it exists;
    absent for methods without one) with the std over seeds as ``iterate_std``/``average_std``,
    and the LR schedule of the first seed, ``(epochs, lr)``.
    """
    curves: dict[str, dict[str, np.ndarray]] = {}
    schedules: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for label in run.labels:
        per_seed = [
            records for records in (run.metrics(label, seed) for seed in run.cfg.seeds) if records
        ]
        if not per_seed:
            continue
        schedules[label] = (
            np.array([r["epoch"] for r in per_seed[0]]),
            np.array([r["lr"] for r in per_seed[0]]),
        )
        by_key: dict[str, dict[int, list[float]]] = {metric: {}, f"avg_{metric}": {}}
        for records in per_seed:
            for r in records:
                for key, by_epoch in by_key.items():
                    if key in r:
                        by_epoch.setdefault(r["epoch"], []).append(r[key])
        if not by_key[metric]:
            continue
        epochs = sorted(by_key[metric])
        iterates = by_key[metric]
        curve = {
            "epoch": np.array(epochs),
            "iterate": np.array([np.mean(iterates[e]) for e in epochs]),
            "iterate_std": np.array([_std(iterates[e]) for e in epochs]),
        }
        averages = by_key[f"avg_{metric}"]
        if averages:
            curve["average"] = np.array(
                [np.mean(averages[e]) if e in averages else np.nan for e in epochs]
            )
            curve["average_std"] = np.array(
                [_std(averages[e]) if e in averages else np.nan for e in epochs]
            )
        curves[label] = curve
    return curves, schedules


def _std(values: list[float]) -> float:
    """Sample standard deviation over seeds (ddof 1, as in the results tables); 0 for one seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _curves(run: RunDir, out: Path, metric: str, formats: Sequence[str]) -> list[Block]:
    """Learning curves averaged over seeds and the LR schedules (first seed), from metrics.jsonl."""
    curves, schedules = learning_curves(run, metric)
    if not curves:
        return [
            Block("h2", "Learning curves"),
            Block(
                "note",
                f"no metrics.jsonl under {run.path}; run the experiment with `{run.resume_command}`",
            ),
        ]
    focus = [
        label for label in (run.default_label("baseline"), run.default_label("average")) if label
    ]
    blocks = [Block("h2", "Learning curves")]
    caption = (
        f"Test {metric.split('_', 1)[1]} over epochs, mean over seeds with a ± std band: "
        "the iterate (thin) and, for averaging methods, the running average with "
        "BatchNorm recomputed (dashed)."
    )
    image = figures.learning_curves_figure(
        curves, metric, focus, out / "learning_curves.png", formats=formats
    )
    blocks.append(Block("figure", caption, image=image))
    blocks.append(
        Block(
            "figure",
            f"Test {metric.split('_', 1)[1]} of every method's own model (its running average "
            "where it has one) over the second half of training, one panel per method on shared "
            f"axes, {focus[0] if focus else 'the baseline'} in grey: mean over seeds "
            f"({len(run.cfg.seeds)}), band ± std.",
            image=figures.own_models_figure(
                curves,
                metric,
                focus[0] if focus else None,
                out / "own_models.png",
                formats=formats,
            ),
        )
    )
    blocks.append(Block("h2", "Learning-rate schedules"))
    blocks.append(
        Block(
            "figure",
            f"Learning rate at the start of each epoch, one panel per method "
            f"(seed {run.cfg.seeds[0]}; every seed's is the same).",
            image=figures.lr_figure(schedules, out / "lr_schedules.png", formats=formats),
        )
    )
    return blocks


def _windows(run: RunDir, out: Path, formats: Sequence[str]) -> list[Block]:
    """The window map of ``swalab posthoc`` (post-hoc SWA windows), when the run has snapshots."""
    from .windows import window_map

    if not run.cfg.posthoc.run:
        return []
    blocks = [Block("h2", "Post-hoc SWA windows")]
    if not run.posthoc_results():
        note = (
            f"no posthoc.csv in {run.path}; evaluate the windows with `swalab posthoc {run.path}`"
        )
        return [*blocks, Block("note", note)]
    caption = (
        f"Test metric (mean over seeds) of SWA over epochs start..end, computed after training "
        f"from {run.cfg.posthoc.run}'s snapshots (exact float64 sums, BatchNorm recomputed); the "
        "colour scale is centred on SGD's result, the paper's windows (swa_start = 0.8 B + 1 to "
        "each SWA run's budget) are outlined. Rows: posthoc.csv."
    )
    return [
        *blocks,
        Block("figure", caption, image=window_map(run, out / "window_map.png", formats)),
    ]


def _landscape(run: RunDir, out: Path, formats: Sequence[str]) -> list[Block]:
    src = run.path / "landscape"
    summary_path = src / "landscape.json"
    if not summary_path.exists() and not summary_path.is_symlink():
        return [
            Block("h2", "Loss landscape"),
            Block("note", f"no landscape in {src}; compute it with `swalab landscape {run.path}`"),
        ]
    try:
        summary = check_landscape(summary_path, read_json(summary_path, root=run.path))
        return _landscape_blocks(summary, src, out, formats, over_seeds(run, summary, out, formats))
    except RunFileError:
        raise  # a damaged file: one line naming it
    except (KeyError, TypeError, ValueError) as err:
        return [
            Block("h2", "Loss landscape"),
            Block(
                "note",
                f"{summary_path} is unreadable or from another swalab version ({err!r}); "
                f"recompute it with `swalab landscape {run.path}`",
            ),
        ]


def _landscape_blocks(
    s: dict[str, Any],
    src: Path,
    out: Path,
    formats: Sequence[str],
    seed_figures: dict[str, Block] | None = None,
) -> list[Block]:
    """The landscape section; ``seed_figures``: figures over all seeds (:func:`over_seeds`)
    that replace the first seed's of the same name."""
    seed_figures = seed_figures or {}
    blocks = [Block("h2", "Loss landscape")]
    blocks.append(
        Block(
            "p",
            f"Seed {s['seed']}, SGD = `{s['sgd']}`, SWA = `{s['swa']}`"
            + (
                f" (tables and figures of this seed unless a caption names more: "
                f"{', '.join(sorted(seed_figures))} over all seeds)"
                if seed_figures
                else ""
            )
            + f". Train loss: {s['protocol']['train_loss']}; BatchNorm "
            f"{s['protocol']['batchnorm']}.",
        )
    )
    if "line" in s:
        line = s["line"]
        header = [
            "solution",
            "train loss",
            "train NLL",
            "train error (%)",
            "test NLL",
            "test error (%)",
        ]
        rows = [
            [
                s[key],
                *(
                    _number(line[key][k], 2 if "error" in k else 4)
                    for k in ("train_loss", "train_nll", "train_error", "test_nll", "test_error")
                ),
            ]
            for key in ("swa", "sgd")
        ]
        blocks.append(
            Block(
                "table",
                f"The two solutions, BN recomputed (‖w_SGD − w_SWA‖ = {line['distance']:.3f})",
                header,
                rows,
                stem="table_solutions",
            )
        )
    if "rays" in s:
        blocks += _rays_blocks(s)
    if "curvature" in s:
        c = s["curvature"]
        blocks.append(
            Block(
                "table",
                f"Curvature: the Hessian of the train NLL on {c['samples']} training samples, BN "
                f"recomputed (top eigenvalue: {c['iterations']} power iterations at most; trace: "
                f"Hutchinson, {c['probes']} Rademacher probes, ± standard error)",
                ["solution", "top eigenvalue", "trace"],
                [
                    [
                        s[key],
                        _number(c[key]["top_eigenvalue"], 4),
                        f"{_number(c[key]['trace'], 3)} ± {_number(c[key]['trace_stderr'], 3)}",
                    ]
                    for key in ("swa", "sgd")
                ],
                stem="table_curvature",
            )
        )
    for piece, name, caption in LANDSCAPE_FIGURES:
        if name in seed_figures:
            blocks.append(seed_figures[name])
        elif piece in s and (src / name).is_file():
            note = (
                f" {s[piece]['note']}"
                if isinstance(s.get(piece), dict) and s[piece].get("note")
                else ""
            )
            image = export.landscape_figure(name, s, src, out, formats)  # redrawn in every format
            blocks.append(Block("figure", _landscape_caption(name, caption, s) + note, image=image))
    absent = {
        piece: text
        for piece, text in (
            ("plane", "the paper's Fig. 1 (middle, right) plane, SGD and SWA from one point"),
            ("snapshots", "the paper's Fig. 1 (left) / Fig. 3 plane through three SWA snapshots"),
        )
        if piece not in s and piece not in s.get("skipped", {})
    }
    if absent:
        blocks.append(
            Block(
                "note",
                f"Not computed for this run: {' and '.join(absent.values())}; "
                f"`swalab landscape {src.parent} --what {','.join(absent)}` adds "
                f"{'it' if len(absent) == 1 else 'them'} (grid² points a plane, about 18 s CPU for "
                "21 × 21 on the MNIST-1D CNN), or `landscape.first_seed` in the config.",
            )
        )
    if "ensemble" in s:
        e = s["ensemble"]
        m = e["metric"]
        blocks.append(
            Block(
                "table",
                f"The ensemble view (paper §3.5): the SWA average vs the ensemble of its "
                f"{len(e['epochs'])} snapshots (epochs {e['epochs'][0]}–{e['epochs'][-1]})",
                [
                    "Δ = max‖w_i − w̄‖",
                    "agreement",
                    "KL(ensemble ‖ average)",
                    f"{m} of the average",
                    f"{m} of the ensemble",
                    f"mean {m} of the snapshots",
                ],
                [
                    [
                        _number(e["delta"], 4),
                        "–" if e["agreement"] is None else f"{100 * e['agreement']:.2f}%",
                        _number(e["kl"], 4),
                        *(
                            _number(e[k], 2 if "%" in m else 4)
                            for k in ("average", "ensemble", "snapshots_mean")
                        ),
                    ]
                ],
                stem="table_ensemble",
            )
        )
    for piece, message in s.get("skipped", {}).items():
        blocks.append(Block("note", f"{piece} not computed: {message}"))
    return blocks


def _rays_blocks(s: dict[str, Any]) -> list[Block]:
    """The widths under each scaling of the directions, and the per-tensor norms of the two
    solutions (a layer followed by BatchNorm: only its direction matters)."""
    r = s["rays"]
    rows = []
    for how, p in ray_protocols(r).items():
        width = p.get("width") or p["width_objective"]  # older summaries: the objective only
        on = "train NLL" if "width" in p else "train loss (NLL + L2)"
        for key in ("swa", "sgd"):
            rows.append(
                [
                    how + (" (primary)" if how == r.get("primary") else ""),
                    s[key],
                    _width_text(width[key]["median"], p["max_distance"]),
                    f"{width[key]['beyond_range']} / {r['rays']}",
                    f"{p['max_distance']:.3g}",
                    on,
                ]
            )
    blocks = [
        Block(
            "table",
            f"Width: how far along each of {r['rays']} random directions the loss rises by "
            f"{r['rise']:g}, per scaling of the directions (filter, layer: t in units of each "
            f"filter's / tensor's own norm; raw: Euclidean distance)",
            ["directions", "solution", "median width", "rays beyond", "range", "loss"],
            rows,
            stem="table_width",
        )
    ]
    if "l2_term" in r:
        blocks.append(
            Block(
                "p",
                f"L2 term wd/2·‖w‖² (wd = {r['weight_decay']:g}), reported apart from the "
                f"widths: {s['swa']} {r['l2_term']['swa']:.4f}, {s['sgd']} "
                f"{r['l2_term']['sgd']:.4f}.",
            )
        )
    norms = r.get("layer_norms")
    if norms:
        blocks.append(
            Block(
                "table",
                "Per-tensor norms of the two solutions (ratio < 1: SWA's tensor is smaller, so a "
                "fixed Euclidean step is a larger relative step from SWA)",
                ["tensor", f"‖w‖ {s['sgd']}", f"‖w‖ {s['swa']}", "ratio SWA / SGD"],
                [
                    [name, f"{v['sgd']:.4f}", f"{v['swa']:.4f}", _number(v["ratio"], 4)]
                    for name, v in norms.items()
                ],
                stem="table_layer_norms",
            )
        )
    return blocks


def _landscape_caption(name: str, caption: str, s: dict[str, Any]) -> str:
    """``caption`` made true of what was drawn: rays stopped at their width (``ray_tails: false``)
    carry the train loss alone; and which seed the figure shows."""
    rays = s.get("rays")
    if name == "rays.png" and isinstance(rays, dict) and rays.get("tails") is False:
        tested = (s.get("settings", {}).get("rays") or {}).get("test_on_stopped_rays")
        caption = (
            (
                "Train NLL and test error along raw random rays from both solutions (paper "
                "Fig. 4), each ray evaluated up to its first point past the width "
            )
            if tested
            else "Train NLL along raw random rays from both solutions (paper Fig. 4 also plots "
            "the test error; recompute with `swalab landscape RUN --what rays`): each ray stops "
            "at its first point past the width "
        ) + (
            "(`landscape.ray_tails: false`; `swalab landscape RUN --what rays --ray-tails` "
            "evaluates whole rays)."
        )
    if name == "plane.png" and not (s.get("plane") or {}).get("through"):
        # a landscape of an earlier version: its plane went through SGD's initialisation
        caption = dict((n, c) for _, n, c in LANDSCAPE_FIGURES)["plane_init.png"]
    if name.startswith(("plane", "snapshots")):
        piece = name.split(".")[0]
        return (
            f"{caption} Seed {s.get('seed', 0)} only (a plane costs grid² evaluations per seed); "
            f"the other seeds': `swalab landscape RUN --seed all --what {piece}`."
        )
    return (
        f"{caption} Seed {s.get('seed', 0)}; the other seeds' figures are in "
        "`landscape/seed<k>/`, their spread in the claims table."
    )


def over_seeds(
    run: RunDir, s: dict[str, Any], out: Path, formats: Sequence[str]
) -> dict[str, Block]:
    """The line (paper Fig. 5) and the raw rays (Fig. 4) over every seed that has them, as
    figure blocks named as the first seed's figures they replace (none with fewer than 2 seeds)."""
    blocks: dict[str, Block] = {}
    sgd, swa = s["sgd"], s["swa"]
    lines, missing = seed_arrays(run, "line.npz")
    if len(lines) >= 2:
        ts = next(iter(lines.values()))["t"]
        if all(np.array_equal(a["t"], ts) for a in lines.values()):
            bands = {
                k: quantile_band(np.stack([a[k] for a in lines.values()]))
                for k in ("train_loss", "test_error", "test_nll")
            }
            image = figures.line_seeds_figure(
                ts, bands, len(lines), sgd, swa, out / "line.png", formats=formats
            )
            blocks["line.png"] = Block(
                "figure",
                "Train loss and test error along the line t·w_SGD + (1 − t)·w_SWA (paper Fig. 5), "
                f"BN recomputed at every point, over {_seed_list(lines, missing)}: median, "
                "interquartile band (dark) and min–max range (light).",
                image=image,
            )
    rays, missing = seed_arrays(run, "rays.npz")
    if len(rays) >= 2:
        tested = all(not np.all(np.isnan(a["swa_test_error"])) for a in rays.values())
        metrics = ["train_nll", "test_error"] if tested else ["train_nll"]
        medians = {
            m: {
                key: pooled_median([(a["distances"], a[f"{key}_{m}"]) for a in rays.values()])
                for key in ("swa", "sgd")
            }
            for m in metrics
            if all(f"swa_{m}" in a for a in rays.values())
        }
        image = figures.rays_seeds_figure(
            rays, medians, sgd, swa, out / "rays.png", "raw", formats=formats
        )
        n_rays = len(next(iter(rays.values()))["swa_train_loss"])
        stopped = (s.get("rays") or {}).get("tails") is False
        if all("swa_width" in a for a in rays.values()):
            rise = (s.get("rays") or {}).get("rise", 0.1)
            widths = {
                seed: {
                    **{k: a[f"{k}_width"] for k in ("swa", "sgd")},
                    "max": float(a["distances"][-1]),
                }
                for seed, a in rays.items()
            }
            width_image = figures.width_seeds_figure(
                widths, rise, sgd, swa, out / "width.png", formats=formats
            )
            blocks["width.png"] = Block(
                "figure",
                f"Width on raw rays over {_seed_list(rays, missing)}: each seed's median, over its "
                f"{n_rays} rays, of the distance at which the train NLL has risen by {rise:g} (a ray "
                "beyond the range counted at its end), the two solutions of a seed joined; bar: the "
                "median over seeds (claim 2's paired statistic is in the claims table).",
                image=width_image,
            )
        blocks["rays.png"] = Block(
            "figure",
            f"{'Train NLL and test error' if tested else 'Train NLL'} along raw random rays from "
            f"both solutions (paper Fig. 4) over {_seed_list(rays, missing)}, {n_rays} directions "
            "each (thin); bold: the median of all rays of all seeds, drawn as far as every ray "
            "was evaluated (distances interpolated onto the shortest seed's range)"
            + (
                "; each ray stops at its first point past the width (`landscape.ray_tails: "
                "false`; `swalab landscape RUN --seed all --what rays --ray-tails` evaluates "
                "whole rays)."
                if stopped
                else "."
            ),
            image=image,
        )
    return blocks


def _seed_list(found: dict[int, Any], missing: list[int]) -> str:
    text = f"{len(found)} seeds ({', '.join(map(str, found))})"
    return text + (f"; seeds {', '.join(map(str, missing))} lack it" if missing else "")


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _width_text(value: float | None, max_distance: float) -> str:
    return f"> {max_distance:.3g}" if value is None else f"{value:.3f}"


def _calibration(run: RunDir, out: Path, formats: Sequence[str]) -> list[Block]:
    ensembles = [m.label for m in run.cfg.methods if method_role(m.method) == "ensemble"]
    if not ensembles or primary_metric(run.results()) != "test_accuracy":
        return []
    blocks = [Block("h2", "Calibration")]
    summary_path = run.path / "landscape" / "landscape.json"
    summary = (
        check_landscape(summary_path, read_json(summary_path, root=run.path))
        if summary_path.exists() or summary_path.is_symlink()
        else {}
    )
    path = run.path / "landscape" / "predictions.npz"
    if "predictions" in summary.get("skipped", {}):
        blocks.append(
            Block("note", f"no reliability diagrams: {summary['skipped']['predictions']}")
        )
        return blocks
    if "predictions" not in summary or not (path.exists() or path.is_symlink()):
        blocks.append(
            Block(
                "note",
                f"no final predictions in {path}; compute them with "
                f"`swalab landscape {run.path} --what predictions`",
            )
        )
        return blocks
    npz = load_npz(path, root=run.path)  # allow_pickle=False: arrays only
    missing = [key for key in ("labels", "targets", "probs") if key not in npz]
    if missing:
        raise RunFileError(
            f"cannot read {path}: no array {missing[0]!r}; "
            f"delete it and run `swalab landscape {run.path} --what predictions`"
        )
    data = {key: npz[key] for key in ("labels", "targets", "probs")}
    labels = [str(x) for x in data["labels"]]
    chosen = [
        label
        for label in (run.default_label("baseline"), run.default_label("average"), *ensembles)
        if label in labels
    ]
    targets = torch.from_numpy(data["targets"])
    diagrams, eces = {}, {}
    for label in dict.fromkeys(chosen):
        probs = torch.from_numpy(data["probs"][labels.index(label)])
        diagrams[label] = metrics.reliability_diagram(probs, targets)
        eces[label] = metrics.ece(probs, targets)
    blocks.append(
        Block(
            "figure",
            f"Reliability diagrams of the final predictions (seed {summary['seed']}; SWAG: Bayesian "
            "model averaging over its samples, FGE: averaged member probabilities).",
            image=figures.reliability_figure(
                diagrams, eces, out / "reliability.png", formats=formats
            ),
        )
    )
    return blocks


def _export_tables(blocks: list[Block], out: Path) -> list[Block]:
    """Every table with a stem also as CSV and LaTeX, linked under it."""
    exported: list[Block] = []
    for b in blocks:
        exported.append(b)
        if b.kind == "table" and b.stem:
            files = export.write_table(out, b.stem, b.text, b.header, b.rows)
            exported.append(
                Block("files", rows=[["CSV", files[0].name], ["LaTeX (booktabs)", files[1].name]])
            )
    return exported


def _times(run: RunDir, out: Path) -> list[Block]:
    """Run times from ``results.csv`` and the environment from ``meta.json``."""
    blocks = [Block("h2", "Run times and environment")]
    header, rows = export.run_times(run.results())
    if rows:
        caption = (
            "Wall-clock time of the runs (a resumed run: the time of its last process). A run's "
            "time includes the epochs it shares with the other runs of its seed (trained once), "
            "so the last row adds each seed's longest run, not every run"
        )
        blocks.append(Block("table", caption, header, rows, stem="table_run_times"))
    else:
        blocks.append(Block("note", "results.csv records no run times"))
    meta = run.meta()
    if meta:
        blocks.append(
            Block("table", "Environment (meta.json)", ["key", "value"], export.environment(meta))
        )
    return blocks


# --- rendering ---------------------------------------------------------------------------------------


def render_markdown(blocks: list[Block], out: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "note":
            lines += [f"> **note:** {b.text}", ""]
        elif b.kind == "code":
            lines += ["```", b.text, "```", ""]
        elif b.kind == "table":
            lines += [
                f"**{b.text}**",
                "",
                "| " + " | ".join(b.header) + " |",
                "|" + "|".join("---" for _ in b.header) + "|",
            ]
            lines += [
                "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in b.rows
            ]
            lines.append("")
        elif b.kind == "figure" and b.image is not None:
            vector = "".join(f" [{p.suffix[1:].upper()}]({p.name})" for p in _vector_files(b.image))
            lines += [
                f"![{b.image.stem}]({b.image.relative_to(out).as_posix()})",
                "",
                f"*{b.text}*{vector}",
                "",
            ]
        elif b.kind == "files":
            lines += [" · ".join(f"[{name}]({path})" for name, path in b.rows), ""]
    return "\n".join(lines)


def _vector_files(image: Path) -> list[Path]:
    """The SVG and PDF files written beside a figure's PNG."""
    return [p for p in (image.with_suffix(".svg"), image.with_suffix(".pdf")) if p.is_file()]


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding: .3em 0; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
td { white-space: nowrap; } th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
td.text { white-space: normal; text-align: left; min-width: 9em; max-width: 22em; }
.scroll { overflow-x: auto; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } .files { font-size: 0.85em; margin-top: -1em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5em 1em; }
code, pre { background: #f6f6f6; padding: .1em .3em; } pre { padding: .6em; overflow-x: auto; }
"""


def _inline_code(text: str) -> str:
    """HTML-escape ``text`` and turn `backticks` into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _cell(text: str) -> str:
    """A table cell; long text (a claim, a statistic's definition) wraps, so that a wide table
    such as the claims' keeps its last columns (the verdict) on screen."""
    wrap = len(text) > 24 and " " in text
    return f'<td class="text">{html.escape(text)}</td>' if wrap else f"<td>{html.escape(text)}</td>"


def render_html(blocks: list[Block], title: str) -> str:
    body: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{_inline_code(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_code(b.text)}</p>")
        elif b.kind == "note":
            body.append(f'<p class="note">{_inline_code(b.text)}</p>')
        elif b.kind == "code":
            body.append(f"<pre>{html.escape(b.text)}</pre>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in b.rows)
            body.append(
                f'<div class="scroll"><table class="results"><caption>{_inline_code(b.text)}</caption>'
                f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
            )
        elif b.kind == "figure" and b.image is not None:
            data = base64.b64encode(b.image.read_bytes()).decode("ascii")
            vector = "".join(
                f' <a href="{html.escape(p.name)}">{p.suffix[1:].upper()}</a>'
                for p in _vector_files(b.image)
            )
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.image.stem)}">'
                f"<figcaption>{_inline_code(b.text)}{vector}</figcaption></figure>"
            )
        elif b.kind == "files":
            links = (
                f'<a href="{html.escape(path)}">{html.escape(name)}</a>' for name, path in b.rows
            )
            body.append('<p class="files">' + " · ".join(links) + "</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def build_report(
    run_dir: str | Path,
    *,
    html_page: bool = False,
    formats: Sequence[str] = ("png",),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write ``RUN_DIR/report/report.md`` (+ PNGs, tables as CSV and LaTeX) and, with ``html_page``,
    ``report.html``; ``formats`` adds ``svg`` and/or ``pdf`` files of every figure.

    Returns:
        ``{"markdown": path, "html": path or None, "figures": [paths], "missing": [notes]}``.
    """
    unknown = sorted(set(formats) - set(figures.FORMATS))
    if unknown:
        raise ValueError(f"--format takes {', '.join(figures.FORMATS)}, got {', '.join(unknown)}")
    run = RunDir(run_dir)
    rows = run.results()
    out = run.path / "report"
    out.mkdir(exist_ok=True)
    blocks = (
        _header(run)
        + _claims(run)
        + _results(run, out)
        + _curves(run, out, primary_metric(rows), formats)
        + _windows(run, out, formats)
        + _landscape(run, out, formats)
        + _calibration(run, out, formats)
        + _times(run, out)
    )
    blocks = _export_tables(blocks, out)
    markdown = out / "report.md"
    atomic_write_text(markdown, render_markdown(blocks, out))
    page = None
    if html_page:
        page = out / "report.html"
        atomic_write_text(page, render_html(blocks, f"swalab report: {run.cfg.name}"))
    missing = [b.text for b in blocks if b.kind == "note" and "`swalab" in b.text]
    for note in missing:
        log(f"missing: {note}")
    log(f"report written to {page or markdown}")
    return {
        "markdown": markdown,
        "html": page,
        "figures": [b.image for b in blocks if b.kind == "figure"],
        "missing": missing,
    }
