"""Oracle tests for ``swalab report``: the table against summarize() and hand-computed intervals,
learning curves against the saved metrics, a self-contained HTML page, and bad input."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from swalab.cli import main
from swalab.lab.config import load_config, to_dict
from swalab.lab.rundir import RESULT_FIELDS
from swalab.lab.stats import summarize
from swalab.report import build_report
from swalab.report.build import format_value, learning_curves, results_tables
from swalab.report.rundir import RunDir

ACCURACY = {"sgd": [90.0, 91.0, 92.0], "swa": [91.0, 93.0, 92.0], "swag": [92.5, 92.0, 93.5]}
EPOCHS = 4


def make_run(path: Path, with_results: bool = True) -> Path:
    """A run directory as ``swalab run`` leaves it, written by hand with known numbers (no training)."""
    cfg = load_config(
        "mnist1d",
        [
            "seeds=[0, 1, 2]",
            f"train.epochs={EPOCHS}",
            "methods=[{method: sgd}, {method: swa}, {method: swag}]",
        ],
    )
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (path / "meta.json").write_text(
        json.dumps({"command": ["swalab", "run", "mnist1d"], "torch": "x"})
    )
    if not with_results:
        return path
    rows = []
    for seed in cfg.seeds:
        for label, name in (("sgd", "sgd"), ("swa", "swa"), ("swag", "swag")):
            acc = ACCURACY[label][seed]
            rows.append(
                {
                    "method": label,
                    "method_name": name,
                    "baseline": "",
                    "seed": seed,
                    "budget": 1.0,
                    "epochs": EPOCHS,
                    "status": "done",
                    "test_accuracy": acc,
                    "test_loss": (100 - acc) / 30,
                    "test_ece": 0.01 * (seed + 1),
                }
            )
            records = []
            for epoch in range(1, EPOCHS + 1):
                r = {
                    "epoch": epoch,
                    "lr": 0.1 / epoch,
                    "train_loss": 1.0 / epoch,
                    "test_accuracy": 10 * epoch + seed,
                }
                if label == "swa" and epoch >= 3:
                    r["avg_test_accuracy"] = 20 * epoch + seed
                records.append(r)
            run = path / label / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with (path / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path / "run")


def table_rows(markdown: str, title: str) -> list[list[str]]:
    block = markdown.split(f"**{title}**", 1)[1].strip().split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_table_numbers_are_summarize_numbers(run):
    build_report(run, log=lambda _: None)
    markdown = (run / "report" / "report.md").read_text()
    rows = RunDir(run).results()
    titles = {
        "test_accuracy": "test accuracy (%)",
        "test_loss": "test NLL",
        "test_ece": "test ECE (20 equal-mass bins)",
    }
    assert [metric for metric, _, _ in results_tables(rows)] == list(titles)
    for metric, title in titles.items():
        got = table_rows(markdown, title)
        for cells, s in zip(got, summarize(rows, metric), strict=True):
            assert cells[0] == s.label and cells[1] == str(len(s.values))
            assert cells[2] == f"{format_value(s.mean, metric)} ± {format_value(s.std, metric)}"
            assert cells[5:] == [format_value(v, metric) for v in s.values]
            if s.diff_mean is not None:
                assert cells[3] == "sgd"
                lo, mean_hi = cells[4].split(" [")
                assert float(lo) == pytest.approx(s.diff_mean, abs=0.006)
                low, high = (float(x) for x in mean_hi.rstrip("]").split(", "))
                assert (low, high) == pytest.approx((s.diff_low, s.diff_high), abs=0.006)


def test_table_by_hand(run):
    """SWA - SGD per seed = (1, 2, 0): mean 1, sd 1, 95% interval 1 ± t(0.975, 2) / sqrt(3) = 1 ± 2.4841."""
    build_report(run, log=lambda _: None)
    cells = table_rows((run / "report" / "report.md").read_text(), "test accuracy (%)")
    assert cells[0] == ["sgd", "3", "91.00 ± 1.00", "", "", "90.00", "91.00", "92.00"]
    assert cells[1] == [
        "swa",
        "3",
        "92.00 ± 1.00",
        "sgd",
        "+1.00 [-1.48, +3.48]",
        "91.00",
        "93.00",
        "92.00",
    ]


def test_learning_curves_average_the_seeds(run):
    curves, schedules = learning_curves(RunDir(run), "test_accuracy")
    np.testing.assert_allclose(
        curves["sgd"]["iterate"], [11, 21, 31, 41]
    )  # 10 epoch + mean seed (1)
    assert "average" not in curves["sgd"]
    np.testing.assert_allclose(curves["swa"]["average"], [np.nan, np.nan, 61, 81])
    np.testing.assert_allclose(schedules["swag"][1], [0.1, 0.05, 0.1 / 3, 0.025])


def test_html_is_one_self_contained_page(run):
    report = build_report(run, html_page=True, log=lambda _: None)
    page = report["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table" in page
    assert "<script" not in page and "<link" not in page and "url(" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    # learning curves (SGD vs SWA, every method in its own panel) and LR schedules
    assert len(sources) == len(report["figures"]) == 3
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = report["markdown"].read_text()
    for figure in report["figures"]:
        assert f"]({figure.name})" in markdown and figure.stat().st_size > 0


def test_missing_landscape_and_predictions_are_named_with_their_commands(run):
    report = build_report(run, log=lambda _: None)
    assert report["missing"] == [
        # the preset's posthoc.run: auto made the swa run keep post-hoc snapshots
        f"no posthoc.csv in {run}; evaluate the windows with `swalab posthoc {run}`",
        f"no landscape in {run / 'landscape'}; compute it with `swalab landscape {run}`",
        f"no final predictions in {run / 'landscape' / 'predictions.npz'}; compute them with "
        f"`swalab landscape {run} --what predictions`",
    ]


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_directories(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "is empty" in one_line_error(capsys, ["report", str(tmp_path / "empty")])
    assert "does not exist" in one_line_error(capsys, ["report", str(tmp_path / "nowhere")])
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in one_line_error(capsys, ["report", str(tmp_path / "file")])
    unfinished = make_run(tmp_path / "unfinished", with_results=False)
    err = one_line_error(capsys, ["report", str(unfinished)])
    assert (
        "no results in" in err
        and f"swalab run {unfinished / 'config.yaml'} --out {unfinished}" in err
    )


def test_cli_report(run, capsys):
    assert main(["report", str(run), "--html"]) == 0
    out = capsys.readouterr().out
    assert f"report written to {run / 'report' / 'report.html'}" in out
    assert "missing: no landscape" in out
