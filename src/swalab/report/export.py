"""What a paper needs from a report: tables as CSV and LaTeX (booktabs), landscape figures redrawn
in every format from their saved data, and the run times and environment of the run."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..lab.files import DATA_LIMIT, atomic_write_bytes, atomic_write_text, load_npz, read_bytes
from ..lab.stats import MethodSummary
from . import figures
from .geometry import METRICS

__all__ = ["landscape_figure", "latex_table", "run_times", "summary_csv", "write_table"]

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"\ensuremath{\pm}",
    "Δ": r"\ensuremath{\Delta}",
    "–": "--",
    "−": r"\ensuremath{-}",
    "‖": r"\ensuremath{\|}",
    "§": r"\S{}",
    "·": r"\ensuremath{\cdot}",
    "w̄": r"\ensuremath{\bar{w}}",
}


def latex_escape(text: str) -> str:
    r"""``text`` with LaTeX's special characters escaped, ±, Δ, – written as LaTeX and the sign of a
    negative number as a minus (``-2.75`` -> ``\ensuremath{-}2.75``), in text and math alike."""
    text = text.replace("w̄", "\0")  # w + combining macron: one symbol, \bar{w}
    escaped = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text).replace("\0", _LATEX_SPECIAL["w̄"])
    return re.sub(r"(?<![\w.-])-(?=\d)", lambda _: r"\ensuremath{-}", escaped)  # not in 3--5


def latex_table(
    caption: str, header: Sequence[str], rows: Sequence[Sequence[str]], label: str
) -> str:
    """A booktabs table: the first column left-aligned, the others right-aligned."""
    spec = "l" + "r" * (len(header) - 1)
    lines = [
        r"% needs \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def summary_csv(
    summaries: Sequence[MethodSummary], rows: Sequence[dict[str, str]], metric: str
) -> str:
    """Full-precision numbers of a results table: mean, std, paired Δ, its interval, each seed."""
    seeds = sorted({int(r["seed"]) for r in rows})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "method",
            "metric",
            "n",
            "diverged",
            "mean",
            "std",
            "baseline",
            "diff_mean",
            "diff_low",
            "diff_high",
        ]
        + [f"seed{s}" for s in seeds]
    )
    for s in summaries:
        done = sorted(
            int(r["seed"]) for r in rows if r["method"] == s.label and r["status"] == "done"
        )
        by_seed = dict(zip(done, s.values))
        writer.writerow(
            [
                s.label,
                metric,
                len(s.values),
                s.diverged,
                _plain(s.mean),
                _plain(s.std),
                s.baseline or "",
                _plain(s.diff_mean),
                _plain(s.diff_low),
                _plain(s.diff_high),
            ]
            + [_plain(by_seed.get(seed)) for seed in seeds]
        )
    return buffer.getvalue()


def _plain(value: float | None) -> str:
    return (
        ""
        if value is None or (isinstance(value, float) and math.isnan(value))
        else repr(float(value))
    )


def write_table(
    out: Path,
    stem: str,
    caption: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    csv_text: str | None = None,
) -> list[Path]:
    """``<stem>.csv`` (``csv_text``, else the shown cells) and ``<stem>.tex`` in ``out``."""
    if csv_text is None:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([list(header), *map(list, rows)])
        csv_text = buffer.getvalue()
    paths = [out / f"{stem}.csv", out / f"{stem}.tex"]
    atomic_write_text(paths[0], csv_text)
    atomic_write_text(paths[1], latex_table(caption, header, rows, f"tab:{stem}"))
    return paths


def run_times(rows: Sequence[dict[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Per method the wall-clock seconds of its runs (as ``results.csv`` records them): mean ± std
    over seeds and the total. A run's seconds include the epochs it shares with the other runs of
    its seed (trained once, shared trajectories), so the methods' totals overlap: the last row adds
    each seed's longest run rather than every run (seeds trained at once by ``--jobs`` still add
    up: compute time, not the command's wall clock)."""
    by_method: dict[str, list[float]] = {}
    for r in rows:
        if r.get("seconds") not in (None, ""):
            by_method.setdefault(r["method"], []).append(float(r["seconds"]))
    header = ["method", "runs", "seconds per run (mean ± std)", "total"]
    body = [
        [
            label,
            str(len(v)),
            f"{np.mean(v):.1f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.1f}",
            _duration(sum(v)),
        ]
        for label, v in by_method.items()
    ]
    if body:  # runs of a seed share epochs (trained once): each seed's longest run, not the sum
        longest: dict[str, float] = {}
        for r in rows:
            if r.get("seconds") not in (None, ""):
                seed = str(r.get("seed", ""))
                longest[seed] = max(longest.get(seed, 0.0), float(r["seconds"]))
        every = [x for v in by_method.values() for x in v]
        body.append(
            [
                "all (each seed's longest run)",
                str(len(every)),
                f"{np.mean(every):.1f}",
                _duration(sum(longest.values())),
            ]
        )
    return header, body


def _duration(seconds: float) -> str:
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours} h {minutes:02d} min"
        if hours
        else f"{minutes} min {sec:02d} s"
        if minutes
        else f"{sec} s"
    )


def environment(meta: dict[str, Any]) -> list[list[str]]:
    """``meta.json`` as (key, value) rows, the command last; ``imports`` (the config's own
    modules) as ``module (folder)``, left out when there are none."""
    rows = []
    for key, value in meta.items():
        if key == "command" or (key == "imports" and not value):
            continue
        if key == "imports" and isinstance(value, dict):
            text = ", ".join(f"{m} ({where.get('directory')})" for m, where in value.items())
        else:
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        rows.append([key, text])
    return rows


def landscape_figure(
    name: str, summary: dict[str, Any], src: Path, out: Path, formats: Sequence[str]
) -> Path:
    """Redraw landscape figure ``name`` (``line.png``, ...) from its saved ``npz`` into ``out`` in
    every format; a landscape without the data (an older one) has its PNG copied as it is."""
    target = out / name
    try:
        return _redraw(Path(name).stem, summary, src, target, formats)
    except (KeyError, FileNotFoundError):
        # checked at both ends: the source is a regular file of the run (never a link to any
        # file, which report.html would embed), the target is replaced, never written through
        atomic_write_bytes(target, read_bytes(src / name, DATA_LIMIT, root=src))
        return target


def _redraw(stem: str, s: dict[str, Any], src: Path, target: Path, formats: Sequence[str]) -> Path:
    sgd, swa = s["sgd"], s["swa"]
    if stem == "line":
        d = load_npz(src / "line.npz", root=src)
        return figures.line_figure(
            d["t"], {k: d[k] for k in METRICS}, sgd, swa, target, formats=formats
        )
    kind, _, how = stem.partition("_")  # rays.png, rays_filter.png, width_layer.png, ...
    if stem == "rays_protocols":
        arrays_of = {}
        for direction in s["rays"]["directions"]:
            name = "rays.npz" if direction == "raw" else f"rays_{direction}.npz"
            arrays_of[direction] = dict(load_npz(src / name, root=src))
        return figures.protocols_figure(
            arrays_of, s["rays"]["rise"], sgd, swa, target, formats=formats
        )
    if kind in ("rays", "width") and how in ("", "filter", "layer"):
        arrays = dict(load_npz(src / f"rays{'_' + how if how else ''}.npz", root=src))
        if kind == "rays":
            return figures.rays_figure(arrays, sgd, swa, target, how or "raw", formats=formats)
        widths = {key: arrays[f"{key}_width"] for key in ("swa", "sgd")}
        return figures.width_figure(
            widths,
            float(arrays["distances"][-1]),
            s["rays"]["rise"],
            sgd,
            swa,
            target,
            how or "raw",
            formats=formats,
        )
    d = load_npz(src / f"{stem}.npz", root=src)
    labels = [str(x) for x in d["point_labels"]]
    paths = {k[len("path_") :]: d[k] for k in d if k.startswith("path_")}
    marks = {k[len("mark_") :]: d[k] for k in d if k.startswith("mark_")}
    title = s[stem].get("title") or (  # summaries of older versions carry no title
        f"plane through {labels[0]}, {labels[1]}, {labels[2]} (seed {s['seed']})"
        if stem in ("plane", "plane_init")
        else f"plane through three {swa} snapshots (seed {s['seed']})"
    )
    return figures.plane_figure(
        d["grid"],
        {k: d[k] for k in METRICS},
        d["points"],
        labels,
        paths,
        marks,
        title,
        target,
        formats=formats,
    )
