"""The report for a paper: spread bands, full y-range, equal-aspect planes, a visible legend, tables
as CSV and booktabs LaTeX, SVG/PDF figures, run times; and the progress counter behind the ETA."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from test_report import make_run

from swalab.cli import main
from swalab.lab import tracking
from swalab.lab.stats import summarize
from swalab.report import build_report, export, figures
from swalab.report.build import learning_curves, results_tables
from swalab.report.rundir import RunDir


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures the figure functions build, instead of files."""
    figs = []
    monkeypatch.setattr(
        figures, "_save", lambda fig, path, formats=("png",): figs.append(fig) or path
    )
    return figs


def test_learning_curves_carry_the_std_over_seeds(tmp_path):
    # make_run: iterate 10·epoch + seed, average 20·epoch + seed for seeds 0, 1, 2 -> sample std 1
    curves, _ = learning_curves(RunDir(make_run(tmp_path / "run")), "test_accuracy")
    np.testing.assert_allclose(curves["sgd"]["iterate_std"], [1, 1, 1, 1])
    np.testing.assert_allclose(curves["swa"]["average_std"], [np.nan, np.nan, 1, 1])


def _curve(epochs, values, std):
    return {
        "epoch": np.arange(1, epochs + 1),
        "iterate": np.asarray(values, float),
        "iterate_std": np.full(epochs, std),
    }


def test_learning_curves_figure_bands_full_range_and_inset(tmp_path, drawn):
    rising = np.concatenate(
        [[10, 40, 70], np.linspace(90, 92, 17)]
    )  # first epochs far below the end
    curves = {
        "sgd": _curve(20, rising, 0.5),
        "swa": {
            **_curve(20, rising + 0.5, 0.5),
            "average": np.r_[[np.nan] * 10, np.full(10, 93.0)],
            "average_std": np.r_[[np.nan] * 10, np.full(10, 0.4)],
        },
    }
    figures.learning_curves_figure(curves, "test_accuracy", ["sgd", "swa"], tmp_path / "c.png")
    left = drawn[0].axes[0]
    assert left.get_ylim()[0] < 10 and left.get_ylim()[1] > 93  # nothing cut off
    bands = [c for c in left.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 3  # sgd, swa iterate, swa average
    (inset,) = left.child_axes
    assert (
        inset.get_xlim() == (10.0, 20.0)
        and 89 < inset.get_ylim()[0] < 90
        and inset.get_ylim()[1] < 94
    )
    # a loss falling over two decades: log scale instead of an inset
    drawn.clear()
    loss = {"sgd": _curve(20, np.geomspace(5, 0.03, 20), 0.0)}
    figures.learning_curves_figure(loss, "test_loss", ["sgd"], tmp_path / "l.png")
    left = drawn[0].axes[0]
    assert left.get_yscale() == "log" and not left.child_axes
    assert not [c for c in left.collections if isinstance(c, PolyCollection)]  # std 0: no band


def test_plane_figure_equal_aspect_labels_and_visible_legend(tmp_path, drawn):
    a, b = np.meshgrid(np.linspace(-2, 17, 7), np.linspace(-0.3, 1.2, 5), indexing="ij")
    xy = np.stack([a, b], axis=-1)
    values = {"train_loss": 0.1 + a**2 / 100 + b**2, "test_error": 10 + a + b}
    points = np.array([[0.0, 0.0], [15.0, 0.0], [14.0, 0.9]])
    path = {"sgd trajectory": np.array([[0.0, 0.0], [7.0, 0.5], [15.0, 0.0]])}
    figures.plane_figure(
        xy, values, points, ["sgd start", "sgd end", "swa"], path, {}, "t", tmp_path / "p.png"
    )
    fig = drawn[0]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 2
    for ax in panels:
        # u points from the first point to the third (landscape.plane), v towards the second
        assert ax.get_aspect() == 1.0
        assert ax.get_xlabel() == "weight-space distance along û = (w₃ − w₁)/‖w₃ − w₁‖"
        assert ax.get_ylabel() == "weight-space distance along v̂ ⊥ û (towards w₂)"
        assert [t.get_text() for t in ax.texts] == ["w₁: sgd start", "w₂: sgd end", "w₃: swa"]
    fig.canvas.draw()  # a plane 19 wide and 1.5 high: the panels one above the other
    assert panels[0].get_position().y0 > panels[1].get_position().y1
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["sgd trajectory", "w₁, w₂, w₃"]
    # the trajectory: white with a black outline, so its legend entry shows on the white legend box
    line = legend.legend_handles[0]
    strokes = [e for e in line.get_path_effects() if hasattr(e, "_gc")]
    assert line.get_color() == "w" and strokes and strokes[0]._gc["foreground"] == "k"


def test_latex_table_is_booktabs_with_escapes():
    text = export.latex_table(
        "test accuracy (%)",
        ["method", "mean ± std", "Δ [95% CI]"],
        [["swa_1", "95.93 ± 0.65", "-0.20 [-0.55, +0.95] (3–5)"]],
        "tab:x",
    )
    assert text.splitlines() == [
        r"% needs \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        r"\caption{test accuracy (\%)}",
        r"\label{tab:x}",
        r"\begin{tabular}{lrr}",
        r"\toprule",
        r"method & mean \ensuremath{\pm} std & \ensuremath{\Delta} [95\% CI] \\",
        r"\midrule",
        r"swa\_1 & 95.93 \ensuremath{\pm} 0.65 & \ensuremath{-}0.20 [\ensuremath{-}0.55, +0.95] (3--5) \\",
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]


def test_summary_csv_holds_summarize_numbers(tmp_path):
    rows = RunDir(make_run(tmp_path / "run")).results()
    metric, summaries, _ = results_tables(rows)[0]
    table = list(csv.DictReader(io.StringIO(export.summary_csv(summaries, rows, metric))))
    expected = {s.label: s for s in summarize(rows, metric)}
    for row in table:
        s = expected[row["method"]]
        assert float(row["mean"]) == s.mean and float(row["std"]) == s.std
        assert [float(row[f"seed{k}"]) for k in range(3)] == s.values
        assert (row["diff_low"] == "") == (s.diff_low is None)
    assert float(next(r for r in table if r["method"] == "swa")["diff_mean"]) == pytest.approx(1.0)


def test_run_times():
    """Runs of a seed share epochs: the last row adds each seed's longest run (150 + 3721 s),
    not every run (which would count seed 0's shared epochs twice)."""
    rows = [
        {"method": "sgd", "seed": "0", "seconds": "100"},
        {"method": "sgd", "seed": "1", "seconds": "3721"},
        {"method": "swa", "seed": "0", "seconds": "150"},
        {"method": "swa", "seed": "1", "seconds": ""},
    ]
    header, body = export.run_times(rows)
    assert header[0] == "method" and body == [
        ["sgd", "2", "1910.5 ± 2560.4", "1 h 03 min"],
        ["swa", "1", "150.0 ± 0.0", "2 min 30 s"],
        ["all (each seed's longest run)", "3", "1323.7", "1 h 04 min"],
    ]


def test_report_formats_and_tables(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    report = build_report(run, formats=["svg", "pdf"], log=lambda _: None)
    for figure in report["figures"]:
        assert figure.suffix == ".png" and figure.read_bytes()[:4] == b"\x89PNG"
        assert figure.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
        assert b"<svg" in figure.with_suffix(".svg").read_bytes()[:400]
    out = run / "report"
    for stem in ("table_test_accuracy", "table_test_loss", "table_test_ece"):
        assert (out / f"{stem}.csv").is_file() and "\\toprule" in (out / f"{stem}.tex").read_text()
    markdown = report["markdown"].read_text()
    assert (
        "[CSV (full precision)](table_test_accuracy.csv) · "
        "[LaTeX (booktabs)](table_test_accuracy.tex)" in markdown
    )
    assert "[SVG](learning_curves.svg) [PDF](learning_curves.pdf)" in markdown
    assert (
        "**Environment (meta.json)**" in markdown and "results.csv records no run times" in markdown
    )
    assert main(["report", str(run), "--format", "png,gif"]) == 2
    assert capsys.readouterr().err.strip() == "swalab: error: --format takes png, svg, pdf, got gif"


def test_epoch_reporter_eta_counts_only_this_process(monkeypatch):
    """10 epochs planned, 3 of them done before a resume; started at t = 100 s, the first epoch
    here ends at 110 s (start-up included), the next two at 112 and 114 s: the ETA is
    (114 − 110) / 2 · (7 − 3) = 8 s — neither 14 / 3 · 4 (start-up) nor with 10 epochs to do."""
    from rich.progress import Progress

    clock = iter([100.0, 110.0, 112.0, 114.0])
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: next(clock))
    bar = Progress(disable=True)
    task = bar.add_task("epochs", total=None)
    lines = []
    reporter = tracking.EpochReporter(bar, task, lines.append, lines=True)
    reporter.set_total(10)
    reporter.skip(3)
    for epoch in (4, 5, 6):
        reporter.epoch("[1/1] sgd seed 0", {"epoch": epoch, "train_loss": 1 / (epoch - 3)}, 10)
    assert bar.tasks[task].total == 7 and bar.tasks[task].completed == 3
    assert lines == [
        "[1/1] sgd seed 0 epoch 4/10: train_loss 1 [1/7 epochs, 10 s, ETA ?]",
        "[1/1] sgd seed 0 epoch 5/10: train_loss 0.5 [2/7 epochs, 12 s, ETA 10 s]",
        "[1/1] sgd seed 0 epoch 6/10: train_loss 0.3333 [3/7 epochs, 14 s, ETA 8 s]",
    ]
