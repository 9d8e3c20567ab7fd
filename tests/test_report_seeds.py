"""The landscape figures over all seeds: the spread band against hand-computed quantiles, the
pooled median of stopped rays, and the report drawing them with the number of seeds named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from test_report import make_run

from swalab.report import build_report, figures
from swalab.report.build import over_seeds
from swalab.report.rundir import RunDir
from swalab.report.seeds import pooled_median, quantile_band, seed_arrays


def test_quantile_band_by_hand():
    curves = np.array([[1, 10], [2, 20], [3, 30], [4, 40], [10, 50.0]])
    band = quantile_band(curves)
    np.testing.assert_array_equal(band["median"], [3, 30])
    np.testing.assert_array_equal(band["q25"], [2, 20])  # linear quantile: rank 0.25 * 4 = 1
    np.testing.assert_array_equal(band["q75"], [4, 40])
    np.testing.assert_array_equal(band["min"], [1, 10])
    np.testing.assert_array_equal(band["max"], [10, 50])
    # four seeds: rank 0.25 * 3 = 0.75 between the first two; NaN (a seed without it) left out
    band = quantile_band(np.array([[0.0], [4.0], [8.0], [12.0], [np.nan]]))
    assert (band["q25"][0], band["median"][0], band["q75"][0]) == (3.0, 6.0, 9.0)
    with pytest.raises(ValueError, match="seeds, points"):
        quantile_band(np.zeros(3))


def test_pooled_median_interpolates_and_stops_where_a_ray_stopped():
    # seed a: distances 0, 1, 2; seed b: 0, 2, 4 (raw rays: each seed its own ||w_SWA|| / 2)
    a = (np.array([0.0, 1.0, 2.0]), np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 6.0]]))
    b = (np.array([0.0, 2.0, 4.0]), np.array([[0.0, 2.0, 4.0]]))
    x, median = pooled_median([a, b], points=5)
    np.testing.assert_allclose(x, [0, 0.5, 1, 1.5, 2])  # the shortest range: seed a's
    # at x: seed a rays x and 3x, seed b ray x -> median x
    np.testing.assert_allclose(median, x)
    # a ray stopped after distance 1 (NaN beyond): the median ends at 1
    stopped = (a[0], np.array([[0.0, 1.0, np.nan], [0.0, 3.0, 6.0]]))
    x, median = pooled_median([stopped, b], points=5)
    np.testing.assert_allclose(x, [0, 0.5, 1])
    np.testing.assert_allclose(median, [0, 0.5, 1])


def _landscape(run: Path, seed: int, t: np.ndarray, shift: float) -> None:
    """A seed's landscape.json, line.npz and rays.npz with known numbers (raw rays, 2 of them,
    the test error evaluated up to the width and NaN beyond)."""
    out = run / "landscape" if seed == 0 else run / "landscape" / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "seed": seed,
        "sgd": "sgd",
        "swa": "swa",
        "protocol": {"train_loss": "CE + L2", "batchnorm": "recomputed"},
        "line": {
            "distance": 1.0,
            **{
                k: {
                    m: 1.0
                    for m in ("train_loss", "train_nll", "train_error", "test_nll", "test_error")
                }
                for k in ("swa", "sgd")
            },
        },
        "settings": {"rays": {"tails": False, "test_on_stopped_rays": True}},
    }
    (out / "landscape.json").write_text(json.dumps(summary))
    line = {k: shift + t**2 for k in ("train_loss", "train_nll", "test_nll")}
    line["test_error"] = 10 * shift + t
    line["train_error"] = t
    np.savez(out / "line.npz", t=t, **line)
    d = np.array([0.0, 1.0, 2.0])
    rays = {"distances": d}
    for key in ("swa", "sgd"):
        for m in ("train_loss", "train_nll", "train_error", "test_nll", "test_error"):
            rays[f"{key}_{m}"] = np.array(
                [[shift, shift + 1, np.nan], [shift, shift + 2, shift + 3]]
            )
    rays["swa_width"] = np.array([1.0 + shift, np.inf])  # the second ray beyond the range (2)
    rays["sgd_width"] = np.array([0.5 + shift, 1.5 + shift])
    np.savez(out / "rays.npz", **rays)


def test_report_draws_the_line_and_rays_over_all_seeds(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")  # seeds 0, 1, 2
    t = np.linspace(-0.5, 1.5, 5)
    shifts = {0: 0.0, 1: 1.0, 2: 5.0}
    for seed, shift in shifts.items():
        _landscape(run, seed, t, shift)
    drawn = []
    real_save = figures._save
    monkeypatch.setattr(
        figures,
        "_save",
        lambda fig, path, formats=("png",): (
            drawn.append((path.name, fig)) or real_save(fig, path, formats)
        ),
    )
    build_report(run, log=lambda _: None)
    text = (run / "report" / "report.md").read_text()
    assert "over 3 seeds (0, 1, 2)" in text and "Fig. 5" in text and "Fig. 4" in text
    assert "Train NLL and test error along raw random rays" in text
    assert (
        "(tables and figures of this seed unless a caption names more: line.png, rays.png" in text
    )
    line = dict(drawn)["line.png"]
    left = line.axes[0]
    median = [ln for ln in left.lines if ln.get_label().startswith("train loss")][0]
    np.testing.assert_allclose(median.get_ydata(), 1.0 + t**2)  # median shift of 0, 1, 5
    bands = [c for c in left.collections if isinstance(c, PolyCollection)]
    # the min-max band spans shift 0 to 5 above t², the interquartile band 0.5 to 3
    low_high = sorted(
        (float(p.get_paths()[0].vertices[:, 1].min()), float(p.get_paths()[0].vertices[:, 1].max()))
        for p in bands
    )
    assert low_high[0][0] == pytest.approx(float((t**2).min()) + 0.0)
    assert low_high[1][0] == pytest.approx(float((t**2).min()) + 0.5)
    assert max(h for _, h in low_high) == pytest.approx(float((t**2).max()) + 5.0)
    # the planes were not computed: the report names the command that adds them
    assert "Not computed for this run: the paper's Fig. 1 (middle, right) plane" in text
    assert f"`swalab landscape {run} --what plane,snapshots` adds them" in text
    # widths: each seed's median over its rays (a ray beyond the range counted at 2), paired
    (ax,) = dict(drawn)["width.png"].axes
    dots = [c.get_offsets()[:, 1].tolist() for c in ax.collections if len(c.get_offsets()) == 3]
    shift = np.array([0.0, 1.0, 5.0])
    np.testing.assert_allclose(dots[0], (1 + shift + 2) / 2)  # swa: median of 1 + shift and 2
    np.testing.assert_allclose(dots[1], 1 + shift)  # sgd: median of 0.5 and 1.5 above shift
    assert "Width on raw rays over 3 seeds (0, 1, 2)" in text
    rays = dict(drawn)["rays.png"]
    assert len(rays.axes) == 2  # train NLL and test error
    assert "3 seeds × 2 directions" in rays._suptitle.get_text()


def test_one_seed_keeps_the_seed_figure_and_mismatched_labels_are_left_out(tmp_path):
    run = make_run(tmp_path / "run")
    t = np.linspace(-0.5, 1.5, 5)
    _landscape(run, 0, t, 0.0)
    assert over_seeds(RunDir(run), {"sgd": "sgd", "swa": "swa"}, tmp_path, ("png",)) == {}
    _landscape(run, 1, t, 1.0)
    other = run / "landscape" / "seed1" / "landscape.json"
    other.write_text(other.read_text().replace('"swa": "swa"', '"swa": "swag"'))
    found, missing = seed_arrays(RunDir(run), "line.npz")
    assert list(found) == [0] and missing == [1, 2]
