"""Oracle tests for swalab.landscape and ``swalab landscape``: known coordinates, closed forms, exact re-runs."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from swalab import update_bn
from swalab.cli import main
from swalab.lab.config import load_config
from swalab.lab.runner import run_experiment
from swalab.landscape import (
    LandscapeEvaluator,
    cross_entropy_stats,
    flat_parameters,
    grid_coordinates,
    load_flat,
    log_levels,
    plane,
    random_directions,
    segment,
    width,
)
from swalab.report import compute_landscape
from swalab.report.geometry import METRICS
from swalab.report.progress import Progress

QUIET = {"log": lambda _: None, "progress": False}


# --- the plane ------------------------------------------------------------------------------------


def test_plane_by_hand():
    w0, w1, w2 = (torch.tensor(v, dtype=torch.float64) for v in ([1.0, 1, 1], [2, 3, 1], [5, 1, 1]))
    pl = plane(w0, w1, w2)
    # u = (w2 - w0)/|.| = e1, dx = 4; v: (1, 2, 0) minus its e1 part = (0, 2, 0) -> e2, dy = 2
    assert pl.dx == 4 and pl.dy == 2
    assert torch.equal(pl.u, torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert torch.equal(pl.v, torch.tensor([0.0, 1, 0], dtype=torch.float64))
    assert (
        pl.coordinates(w0) == (0, 0)
        and pl.coordinates(w2) == (4, 0)
        and pl.coordinates(w1) == (1, 2)
    )
    assert (
        pl.distance(torch.tensor([3.0, -1, 4], dtype=torch.float64)) == 3
    )  # 3 along e3 off the plane
    assert torch.equal(pl.point(0.25, 1.0), w1)


def test_plane_basis_orthonormal_and_points_at_known_coordinates():
    g = torch.Generator().manual_seed(0)
    w0, w1, w2 = (torch.randn(500, generator=g) for _ in range(3))
    pl = plane(w0, w1, w2)
    gram = torch.stack([pl.u, pl.v]) @ torch.stack([pl.u, pl.v]).T
    torch.testing.assert_close(gram, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
    w0, w1, w2 = w0.double(), w1.double(), w2.double()
    assert pl.dx == pytest.approx(float((w2 - w0).norm()), rel=1e-12)
    x1 = float((w1 - w0) @ (w2 - w0)) / pl.dx
    for w, expected in ((w0, (0, 0)), (w2, (pl.dx, 0)), (w1, (x1, pl.dy))):
        assert pl.coordinates(w) == pytest.approx(expected, abs=1e-9)
        assert pl.distance(w) == pytest.approx(0, abs=1e-9)
    # grid points: (alpha, beta) = (1, 0) is w2 and (x1 / dx, 1) is w1
    torch.testing.assert_close(pl.point(1.0, 0.0), w2)
    torch.testing.assert_close(pl.point(x1 / pl.dx, 1.0), w1)
    assert pl.coordinates(pl.point(0.3, -0.2)) == pytest.approx((0.3 * pl.dx, -0.2 * pl.dy))


def test_plane_rejects_collinear_points():
    w = torch.randn(10)
    with pytest.raises(ValueError, match="collinear"):
        plane(w, 2 * w, 3 * w)
    with pytest.raises(ValueError, match="coincide"):
        plane(w, 2 * w, w)


def test_grid_is_the_reference_linspace():
    np.testing.assert_allclose(grid_coordinates(21, 0.2), np.linspace(-0.2, 1.2, 21))


def test_log_levels_crowd_at_the_minimum():
    values = np.array([[0.1, 0.5], [2.0, 9.0]])
    levels = log_levels(values, vmax=5.0, log_alpha=-5.0, n=7)
    assert (
        len(levels) == 8 and levels[0] == 0.1 and levels[-1] == 5.0
    )  # the maximum clipped at vmax
    assert np.all(np.diff(levels) > 0)
    gaps = levels[1:-1] - 0.1  # min + exp(log_alpha + k g): a geometric sequence
    gamma = (math.log(5.0 - 0.1) + 5.0) / 7
    np.testing.assert_allclose(gaps, np.exp(-5.0 + gamma * np.arange(1, 7)))


def test_log_levels_increase_for_a_range_narrower_than_exp_log_alpha():
    levels = log_levels(np.array([3.450, 3.452, 3.481]), log_alpha=-1.0)
    assert levels[0] == 3.450 and levels[-1] == 3.481 and np.all(np.diff(levels) > 0)


def test_progress_prints_plain_lines_with_eta():
    stream = io.StringIO()
    bar = Progress(4, bar=False, stream=stream, every=0.0)
    bar.stage("plane")
    for _ in range(4):
        bar.advance()
    lines = stream.getvalue().splitlines()
    assert (
        len(lines) == 4
        and lines[-1].startswith("landscape: plane: 4/4 points")
        and lines[-1].endswith("ETA 0 s")
    )
    assert "ETA" in lines[0]


# --- line, rays, width ----------------------------------------------------------------------------


def test_segment_is_the_papers_line():
    w_swa, w_sgd = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    assert torch.equal(segment(w_swa, w_sgd, 0.0), w_swa)
    assert torch.equal(segment(w_swa, w_sgd, 1.0), w_sgd)
    torch.testing.assert_close(segment(w_swa, w_sgd, 1.5), 1.5 * w_sgd - 0.5 * w_swa)


def test_random_directions_are_seeded_unit_vectors():
    d = random_directions(1000, 4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(d.norm(dim=1), torch.ones(4, dtype=torch.float64))
    assert torch.equal(d, random_directions(1000, 4, torch.Generator().manual_seed(3)))


def test_width_by_hand():
    d = np.linspace(0, 4, 5)
    assert width(d, 1.0 + 0.5 * d, rise=1.0) == 2.0  # linear: interpolation is exact
    assert width(d, [1.0, 1.0, 1.2, 1.6, 3.0], rise=1.0) == pytest.approx(3 + 0.4 / 1.4)
    assert width(d, np.full(5, 1.0), rise=0.1) == math.inf
    with pytest.raises(ValueError, match="rise"):
        width(d, d, rise=0)


class Quadratic(nn.Module):
    """A toy "model" whose mean loss is 0.5 * sum_i h_i (w_i - c_i)^2, whatever the batch."""

    def __init__(self, c: torch.Tensor, h: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros_like(c))
        self.register_buffer("c", c)
        self.register_buffer("sqrt_h", h.sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((self.w - self.c) * self.sqrt_h).expand(x.shape[0], -1)


def half_square(output, y):
    return 0.5 * output.double().square().sum(), None, output.shape[0]


def test_rays_on_a_quadratic_match_the_closed_form():
    g = torch.Generator().manual_seed(0)
    c, h = (
        torch.randn(20, generator=g, dtype=torch.float64),
        torch.rand(20, generator=g, dtype=torch.float64) + 0.5,
    )
    model = Quadratic(c, h).double()
    batches = [(torch.zeros(7, 1), torch.zeros(7)), (torch.zeros(3, 1), torch.zeros(3))]
    wd = 1e-2
    evaluate = LandscapeEvaluator(model, [], {"train": batches}, half_square, weight_decay=wd)
    distances = np.linspace(0, 3, 301)
    for d in random_directions(20, 3, g):
        curvature = float((h * d * d).sum())  # loss(c + t d) = 0.5 t^2 d'Hd
        losses = []
        for t in distances:
            w = c + float(t) * d
            out = evaluate(w)
            assert out["train_nll"] == pytest.approx(0.5 * t * t * curvature, rel=1e-12, abs=1e-15)
            assert out["train_loss"] == pytest.approx(
                out["train_nll"] + 0.5 * wd * float(w @ w), rel=1e-12
            )
            assert math.isnan(out["train_error"])
            losses.append(out["train_nll"])
        rise = 0.5
        exact = math.sqrt(2 * rise / curvature)
        assert exact < distances[-1]
        # linear interpolation of a convex curve crosses early, by at most one grid step
        assert exact - (distances[1] - distances[0]) <= width(distances, losses, rise) <= exact


def test_evaluator_recomputes_batchnorm_at_every_point():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(1)
    bn = [
        (torch.randn(8, 3, generator=g) * 2 + 1, torch.zeros(8, dtype=torch.long)) for _ in range(3)
    ]
    data = [(torch.randn(10, 3, generator=g), torch.randint(0, 2, (10,), generator=g))]
    evaluate = LandscapeEvaluator(model, bn, {"test": data}, cross_entropy_stats)
    w_a = flat_parameters(model)
    w_b = w_a + 0.5 * random_directions(w_a.numel(), 1, g)[0]
    first, _, again = evaluate(w_a), evaluate(w_b), evaluate(w_a)
    assert first == again  # nothing of w_b's BN statistics is left behind
    # the same numbers by hand: a fresh copy, its BN recomputed on the same batches
    reference = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    load_flat(reference, w_b)
    update_bn([x for x, _ in bn], reference)
    reference.eval()
    x, y = data[0]
    with torch.no_grad():
        out = reference(x)
    expected = evaluate(w_b)
    assert expected["test_nll"] == pytest.approx(
        nn.functional.cross_entropy(out, y).item(), rel=1e-6
    )
    assert expected["test_error"] == pytest.approx(100 * out.argmax(1).ne(y).float().mean().item())


@pytest.mark.parametrize("bn", [True, False])
def test_stacked_evaluation_matches_point_by_point(bn):
    """evaluate_many (vmap over stacked weights, one BN state per point) against __call__ point by point.

    Tolerance: NLL and loss to 1e-5 relative (float32 sums in a different order); the error rate
    exactly, except where an argmax tie flips (none on these random points).
    """
    from swalab.models import create

    torch.manual_seed(0)
    model = create("mnist1d_cnn", (1, 40), 10, bn=bn)
    g = torch.Generator().manual_seed(3)
    bn_batches = [
        (torch.randn(20, 1, 40, generator=g), torch.zeros(20, dtype=torch.long)) for _ in range(4)
    ]
    data = {
        name: [
            (torch.randn(50, 1, 40, generator=g), torch.randint(0, 10, (50,), generator=g))
            for _ in range(2)
        ]
        for name in ("train", "test")
    }
    w = flat_parameters(model)
    points = [w + 0.3 * d for d in random_directions(w.numel(), 7, g)]
    stacked = LandscapeEvaluator(
        model, bn_batches, data, cross_entropy_stats, weight_decay=5e-4, stack=3
    )
    together = stacked.evaluate_many(points)  # chunks of 3, 3 and 1: both paths
    one_by_one = [
        LandscapeEvaluator(model, bn_batches, data, cross_entropy_stats, 5e-4, stack=1)(p)
        for p in points
    ]
    assert len(together) == len(one_by_one) == 7
    for a, b in zip(together, one_by_one):
        assert a.keys() == b.keys()
        for key in a:
            if key.endswith("error"):
                assert a[key] == b[key]
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    # the stacked pass leaves nothing behind: the point-by-point path still gives the same numbers
    assert stacked(points[0]) == one_by_one[0]
    assert len({round(r["test_nll"], 6) for r in together}) == 7  # the points really differ
    with pytest.raises(ValueError, match="stack must be >= 1"):
        LandscapeEvaluator(model, bn_batches, data, stack=0)


def test_stacked_evaluation_with_sample_weighted_bn_matches_point_by_point():
    """bn_weighting="samples" with a short last BN batch: the stacked pass weights batches by size
    as update_bn(weighting="samples") does, and the numbers differ from torch's convention."""
    from swalab.models import create

    torch.manual_seed(0)
    model = create("mnist1d_cnn", (1, 40), 10, bn=True)
    g = torch.Generator().manual_seed(4)
    bn_batches = [(torch.randn(n, 1, 40, generator=g), torch.zeros(n)) for n in (20, 20, 3)]
    bn_batches[-1] = (bn_batches[-1][0] * 3 + 2, bn_batches[-1][1])
    data = {
        "train": [(torch.randn(30, 1, 40, generator=g), torch.randint(0, 10, (30,), generator=g))]
    }
    w = flat_parameters(model)
    points = [w + 0.3 * d for d in random_directions(w.numel(), 2, g)]
    samples = LandscapeEvaluator(model, bn_batches, data, stack=2, bn_weighting="samples")
    together = samples.evaluate_many(points)
    for a, p in zip(together, points):
        b = samples(p)
        assert a["train_nll"] == pytest.approx(b["train_nll"], rel=1e-5)
        load_flat(model, p)
        update_bn(bn_batches, model, weighting="samples")
        assert samples.measure(float(p.square().sum()))["train_nll"] == b["train_nll"]
    batches = LandscapeEvaluator(model, bn_batches, data)(points[0])
    assert abs(batches["train_nll"] - together[0]["train_nll"]) > 1e-4
    with pytest.raises(ValueError, match="bn_weighting must be one of batches, samples"):
        LandscapeEvaluator(model, bn_batches, data, bn_weighting="equal")


def test_load_flat_round_trip_and_checks():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    w = torch.arange(26, dtype=torch.float64)
    load_flat(model, w)
    assert model[0].weight.dtype == torch.float32
    assert torch.equal(flat_parameters(model), w)
    assert torch.equal(
        flat_parameters(model.state_dict(), [n for n, _ in model.named_parameters()]), w
    )
    with pytest.raises(ValueError, match="26 parameters"):
        load_flat(model, torch.zeros(25))


# --- on a real run directory ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """SGD, SWA and a greedy soup on MNIST-1D, one seed of 5 epochs, trajectories kept, SWA averaging
    epochs 3-5 (the soup scores its snapshots on the validation split, also when predictions are rebuilt)."""
    out = tmp_path_factory.mktemp("landscape") / "run"
    cfg = load_config(
        "mnist1d",
        [
            "seeds=[0]",
            "train.epochs=5",
            "train.save_trajectory=true",
            "train.threads=1",
            "methods=[{method: sgd}, {method: swa, options: {swa_lr: 0.05, swa_start: 3}},"
            " {method: soup, options: {swa_start: 3}}]",
        ],
    )
    run_experiment(cfg, out, log=lambda _: None, progress=False)
    return out


def results(run: Path) -> dict[str, dict[str, str]]:
    with (run / "results.csv").open() as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def test_line_endpoints_reproduce_the_runs(run_dir):
    summary = compute_landscape(run_dir, what=["line"], line_points=5, **QUIET)["line"]
    rows = results(run_dir)
    # SWA's final model had its BN recomputed with the same pass: its numbers come back exactly
    assert summary["swa"]["test_nll"] == pytest.approx(float(rows["swa"]["test_loss"]), rel=1e-5)
    assert summary["swa"]["train_nll"] == pytest.approx(float(rows["swa"]["train_loss"]), rel=1e-5)
    assert 100 - summary["swa"]["test_error"] == pytest.approx(float(rows["swa"]["test_accuracy"]))
    # SGD's final model kept its running statistics; recomputed ones are close to them
    assert summary["sgd"]["test_nll"] == pytest.approx(float(rows["sgd"]["test_loss"]), rel=0.1)
    data = np.load(run_dir / "landscape" / "line.npz")
    np.testing.assert_allclose(data["t"], [-0.5, 0, 0.5, 1, 1.5])
    assert (
        data["test_nll"][1] == summary["swa"]["test_nll"]
        and data["test_nll"][3] == summary["sgd"]["test_nll"]
    )
    state = torch.load(run_dir / "sgd" / "seed0" / "final.pt")
    weight_norm2 = sum(
        float(state[n].double().square().sum())
        for n in state
        if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert summary["sgd"]["train_loss"] == pytest.approx(
        summary["sgd"]["train_nll"] + 0.5 * 5e-4 * weight_norm2
    )
    assert (run_dir / "landscape" / "line.png").stat().st_size > 0


def test_planes_rays_ensemble_and_predictions(run_dir):
    s = compute_landscape(run_dir, grid=3, rays=2, ray_points=3, line_points=3, **QUIET)
    assert s["skipped"] == {}
    out = run_dir / "landscape"
    plane_data = np.load(out / "plane_init.npz")
    dx, dy = float(plane_data["dx"]), float(plane_data["dy"])
    np.testing.assert_allclose(plane_data["points"][0], [0, 0], atol=1e-9)  # SGD start
    np.testing.assert_allclose(plane_data["points"][2], [dx, 0], atol=1e-9)  # SWA
    assert plane_data["points"][1][1] == pytest.approx(dy)  # SGD end
    assert plane_data["grid"].shape == (3, 3, 2) and plane_data["train_loss"].shape == (3, 3)
    np.testing.assert_allclose(plane_data["grid"][0, 0], [-0.2 * dx, -0.2 * dy])
    path = plane_data["path_sgd trajectory"]  # init + 5 epochs; the last one is SGD's end
    assert len(path) == 6
    np.testing.assert_allclose(path[0], [0, 0], atol=1e-9)
    np.testing.assert_allclose(path[-1], plane_data["points"][1], atol=1e-9)
    assert s["snapshots"]["epochs"] == [3, 4, 5]
    check_papers_plane(run_dir, s["plane"])
    snap = s["snapshots"]["marks"]
    assert snap["swa (all 3)"]["xy"] == pytest.approx(snap["average of the three"]["xy"], abs=1e-6)
    assert snap["average of the three"]["distance_to_plane"] == pytest.approx(0, abs=1e-6)
    e = s["ensemble"]
    assert (
        e["epochs"] == [3, 4, 5]
        and 0 < e["agreement"] <= 1
        and e["delta"] > 0
        and e["metric"] == "test error (%)"
    )
    assert 100 - e["average"] == pytest.approx(float(results(run_dir)["swa"]["test_accuracy"]))
    rays = np.load(out / "rays.npz")
    assert rays["swa_train_loss"].shape == (2, 3)
    assert np.all(
        rays["swa_train_loss"][:, 0] == rays["swa_train_loss"][0, 0]
    )  # every ray starts at w_SWA
    rows = results(run_dir)
    for label, p in s["predictions"].items():  # the final predictions are rebuilt exactly
        assert p["test_accuracy"] == pytest.approx(float(rows[label]["test_accuracy"]))
    assert set(json.loads((out / "landscape.json").read_text())) >= {
        "line",
        "rays",
        "plane",
        "plane_init",
        "snapshots",
    }
    for name in ("line", "rays", "width", "plane", "plane_init", "snapshots"):
        assert (out / f"{name}.png").stat().st_size > 0


def check_papers_plane(run_dir: Path, summary: dict) -> None:
    """The paper's Fig. 1 plane: its first point is the last weights SGD and SWA held in common
    (their saved trajectories agree there and part after), and the plotted coordinates of the
    three points keep their pairwise distances in weight space (the basis recovers them)."""
    k = summary["start_epoch"]
    trajectories = {
        label: sorted((run_dir / label / "seed0" / "trajectory").glob("epoch*.pt"))
        for label in ("sgd", "swa")
    }
    names = [n for n in torch.load(run_dir / "sgd" / "seed0" / "final.pt") if "running" not in n]
    names = [n for n in names if "num_batches" not in n]

    def flat(path: Path) -> torch.Tensor:
        state = torch.load(path)
        return torch.cat([state[n].double().reshape(-1) for n in names])

    assert 1 <= k < 3  # before SWA's first averaged epoch (3)
    assert torch.equal(flat(trajectories["sgd"][k - 1]), flat(trajectories["swa"][k - 1]))
    assert not torch.equal(flat(trajectories["sgd"][k]), flat(trajectories["swa"][k]))
    w = [
        flat(trajectories["swa"][k - 1]),
        flat(run_dir / "sgd" / "seed0" / "final.pt"),
        flat(run_dir / "swa" / "seed0" / "final.pt"),
    ]
    data = np.load(run_dir / "landscape" / "plane.npz")
    points = data["points"]
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.linalg.norm(points[i] - points[j]) == pytest.approx(
                float(torch.linalg.vector_norm(w[i] - w[j])), rel=1e-9
            )
    np.testing.assert_allclose(points[0], [0, 0], atol=1e-12)
    np.testing.assert_allclose(
        points[2], [float(torch.linalg.vector_norm(w[2] - w[0])), 0], atol=1e-9
    )
    assert [str(x) for x in data["point_labels"]] == [
        f"start of both (epoch {k})",
        "sgd end",
        "swa",
    ]
    path = data[f"path_swa iterates (epochs {k}–5)"]  # from the start to SWA's last iterate
    assert len(path) == 5 - k + 1
    np.testing.assert_allclose(path[0], [0, 0], atol=1e-12)
    assert data["train_loss"].shape == data["test_error"].shape == data["grid"].shape[:2]
    assert "first averaged snapshot (epoch 3)" in summary["marks"]


def test_rays_stopped_at_the_rise_give_the_same_widths(run_dir):
    """``ray_tails=False`` evaluates each ray only up to its first point where both the train NLL
    and the train loss have risen: the same train and test numbers there, NaN beyond,
    and the widths of the whole rays, under filter-normalised and raw directions."""
    options = {"what": ["rays"], "rays": 4, "ray_points": 7, **QUIET}
    files = {"raw": "rays.npz", "filter": "rays_filter.npz"}
    whole = compute_landscape(run_dir, ray_tails=True, **options)["rays"]
    full = {how: dict(np.load(run_dir / "landscape" / name)) for how, name in files.items()}
    cut = compute_landscape(run_dir, ray_tails=False, **options)["rays"]
    assert cut["by_direction"] == whole["by_direction"]
    assert (whole["tails"], cut["tails"]) == (True, False)
    assert whole["directions"] == ["filter", "raw"] and whole["primary"] == "filter"
    for how, name in files.items():
        short = np.load(run_dir / "landscape" / name)
        for key in ("swa", "sgd"):
            last = np.zeros(4, dtype=int)  # per ray, the last point evaluated: both have risen
            for loss in ("train_nll", "train_loss"):
                values = full[how][f"{key}_{loss}"]
                for i, row in enumerate(values):
                    above = np.nonzero(row >= row[0] + 0.1)[0]
                    last[i] = max(last[i], int(above[0]) if len(above) else len(row) - 1)
            for i in range(4):
                for metric in METRICS:  # test metrics too, at the same points (paper Fig. 4)
                    np.testing.assert_array_equal(
                        short[f"{key}_{metric}"][i, : last[i] + 1],
                        full[how][f"{key}_{metric}"][i, : last[i] + 1],
                    )
                    assert np.isnan(short[f"{key}_{metric}"][i, last[i] + 1 :]).all()
            # at t = 0 the test error is the solution's own (the line's endpoints agree)
            assert (short[f"{key}_test_error"][:, 0] == full[how][f"{key}_test_error"][0, 0]).all()
            for kind in ("width", "width_objective"):
                np.testing.assert_array_equal(short[f"{key}_{kind}"], full[how][f"{key}_{kind}"])
            # the width is read on the train NLL
            np.testing.assert_array_equal(
                short[f"{key}_width"],
                [width(short["distances"], row, 0.1) for row in full[how][f"{key}_train_nll"]],
            )
        assert np.isnan(short["swa_train_loss"]).any()  # some rays were stopped short
        # at t = 0 the test error is the SWA model's own, as the run scored it (BN recomputed)
        assert 100 - short["swa_test_error"][0, 0] == pytest.approx(
            float(results(run_dir)["swa"]["test_accuracy"])
        )
    for name in ("rays.png", "rays_filter.png", "width_filter.png", "rays_protocols.png"):
        assert (run_dir / "landscape" / name).stat().st_size > 0


def test_bn_piece_and_stacked_line(run_dir):
    """Claim 6's piece: w_SWA with recomputed BN is the run's own result; with the BN statistics of the
    SWA run's last iterate it is evaluated by hand here. The line comes out the same stacked or not."""
    s = compute_landscape(run_dir, what=["bn", "line"], line_points=5, **QUIET)
    rows = results(run_dir)
    assert 100 - s["bn"]["recomputed"]["test_error"] == pytest.approx(
        float(rows["swa"]["test_accuracy"])
    )
    assert s["bn"]["recomputed"]["test_nll"] == pytest.approx(
        float(rows["swa"]["test_loss"]), rel=1e-5
    )
    final = torch.load(run_dir / "swa" / "seed0" / "final.pt")
    iterate = torch.load(run_dir / "swa" / "seed0" / "checkpoint.pt", weights_only=False)["model"]
    from swalab.data import load
    from swalab.models import create

    bundle = load("mnist1d", seed=0, val_size=500)
    model = create("mnist1d_cnn", bundle.in_shape, bundle.num_outputs, bn=True)
    model.load_state_dict(
        {k: iterate[k] if "running" in k or "num_batches" in k else v for k, v in final.items()}
    )
    model.eval()
    with torch.no_grad():
        errors = model(bundle.test.x).argmax(1).ne(bundle.test.y).double().mean().item()
    assert s["bn"]["carried"]["test_error"] == pytest.approx(100 * errors)
    assert s["bn"]["carried"]["test_error"] != s["bn"]["recomputed"]["test_error"]
    before = dict(np.load(run_dir / "landscape" / "line.npz"))
    compute_landscape(run_dir, what=["line"], line_points=5, stack=3, **QUIET)
    after = np.load(run_dir / "landscape" / "line.npz")
    for key in ("train_loss", "test_nll"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5)
    np.testing.assert_array_equal(after["test_error"], before["test_error"])


# --- bad input: one line, exit status 2 ---------------------------------------------------------------


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_empty_foreign_and_missing_directories(tmp_path, capsys):
    assert "is empty" in one_line_error(capsys, ["landscape", str(tmp_path)])
    (tmp_path / "notes.txt").write_text("hello")
    assert "holds no swalab run (no config.yaml)" in one_line_error(
        capsys, ["landscape", str(tmp_path)]
    )
    assert "does not exist" in one_line_error(capsys, ["landscape", str(tmp_path / "nope")])
    (tmp_path / "config.yaml").write_text("learning_rate: 3\n")
    assert "is not a swalab config" in one_line_error(capsys, ["landscape", str(tmp_path)])


def test_bad_labels_seeds_and_pieces(run_dir, capsys):
    assert "no method labelled 'adam'" in one_line_error(
        capsys, ["landscape", str(run_dir), "--sgd", "adam"]
    )
    assert "seed 7 is not among" in one_line_error(
        capsys, ["landscape", str(run_dir), "--seed", "7"]
    )
    assert "unknown landscape piece" in one_line_error(
        capsys, ["landscape", str(run_dir), "--what", "cube"]
    )


def test_missing_trajectory_names_the_command(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("landscape"))
    shutil.rmtree(copy / "swa" / "seed0" / "trajectory")
    err = one_line_error(capsys, ["landscape", str(copy), "--what", "snapshots"])
    assert (
        f"no trajectory in {copy / 'swa' / 'seed0'}" in err
        and "--set train.save_trajectory=true" in err
    )
    # by default the pieces that need it are skipped with that line, and the others are computed
    assert main(["landscape", str(copy), "--what", "line,snapshots"]) == 2
    capsys.readouterr()
    assert (
        main(
            [
                "landscape",
                str(copy),
                "--grid",
                "2",
                "--rays",
                "1",
                "--ray-points",
                "2",
                "--line-points",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "skipped snapshots: no trajectory" in printed
        and "skipped ensemble: no trajectory" in printed
    )
    summary = json.loads((copy / "landscape" / "landscape.json").read_text())
    assert set(summary["skipped"]) == {"snapshots", "ensemble"} and "plane" in summary
    # the paper's plane starts at an epoch both runs trained: with no trajectory at all, one line
    shutil.rmtree(copy / "sgd" / "seed0" / "trajectory")
    err = one_line_error(capsys, ["landscape", str(copy), "--what", "plane", "--grid", "2"])
    assert "the plane starts at the weights after epoch" in err
    assert "--set train.save_trajectory=true" in err
    (copy / "sgd" / "seed0" / "final.pt").unlink()
    err = one_line_error(capsys, ["landscape", str(copy), "--what", "line"])
    assert "no final.pt in" in err and f"swalab run {copy / 'config.yaml'} --out {copy}" in err


def test_cyclic_swa_snapshots_are_the_epochs_the_recipe_averages(tmp_path):
    """Cyclic SWA (swa_start 5, cycle 2) averages the ends of its cycles, epochs 6, 8, 10; the
    landscape marks the same epochs because it asks the recipe (it used to re-derive [5, 7, 9])."""
    from swalab.lab.config import to_dict
    from swalab.lab.rundir import RunDirectory
    from swalab.report.geometry import _Sources
    from swalab.report.rundir import RunDir

    cfg = load_config(
        "mnist1d",
        [
            "train.epochs=10",
            "methods=[{method: sgd}, {method: swa, options: "
            "{swa_start: 5, schedule: cyclic, cycle: 2, swa_lr: 0.01}}]",
        ],
    )
    RunDirectory(tmp_path).write_config(to_dict(cfg))
    job = _Sources(RunDir(tmp_path), 0, "sgd", "swa")
    assert job.averaged_epochs() == [6, 8, 10]


# --- scale-invariant directions (Li et al., 2018) ---------------------------------------------------


def test_normalize_direction_by_hand():
    """Two tensors, a 2x2 weight and a bias: filter = per row, layer = per tensor, biases zeroed."""
    from swalab.landscape import normalize_direction

    shapes = [(2, 2), (2,)]
    w = torch.tensor([3.0, 4.0, 0.0, 1.0, 5.0, 5.0], dtype=torch.float64)
    d = torch.tensor([1.0, 0.0, 0.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    filt = normalize_direction(d, w, shapes, "filter")
    torch.testing.assert_close(filt, torch.tensor([5.0, 0, 0, 1, 0, 0], dtype=torch.float64))
    layer = normalize_direction(d, w, shapes, "layer")
    k = math.sqrt(26 / 5)  # ||w_weight|| / ||d_weight||
    torch.testing.assert_close(layer, torch.tensor([k, 0, 0, 2 * k, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(normalize_direction(d, w, shapes, "raw"), d)
    with pytest.raises(
        ValueError, match="directions must be one of filter, layer, raw, got 'unit'"
    ):
        normalize_direction(d, w, shapes, "unit")
    with pytest.raises(ValueError, match="vectors of 6 parameters"):
        normalize_direction(d[:5], w[:5], shapes, "filter")


def test_filter_normalised_width_is_invariant_to_rescaling_a_bn_followed_layer():
    """A layer followed by BatchNorm rescaled by 10 computes the same function; along the same
    random direction, filter-normalised from each, the NLL rises identically (the same width),
    while the raw rays (a fixed Euclidean step) give a different width."""
    import copy

    from swalab.landscape import normalize_direction

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(30, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 30, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = torch.optim.Adam(a.parameters(), lr=0.05)
    for _ in range(100):  # near a minimum, so the loss rises along every ray
        opt.zero_grad()
        nn.functional.cross_entropy(a(x), y).backward()
        opt.step()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b[0].weight.mul_(10)
        b[0].bias.mul_(10)
    data = {"train": [(x, y)]}
    shapes = [p.shape for p in a.parameters()]
    d = random_directions(sum(p.numel() for p in a.parameters()), 3, g)
    ts = np.linspace(0.0, 8.0, 81)

    origins = {id(m): flat_parameters(m) for m in (a, b)}  # evaluating overwrites the weights

    def widths(model, how):
        ev = LandscapeEvaluator(model, [(x, y)], data)
        w = origins[id(model)]
        out = []
        for row in d:
            step = normalize_direction(row, w, shapes, how)
            out.append(width(ts, [ev(w + float(t) * step)["train_nll"] for t in ts], 0.05))
        return np.array(out)

    for how in ("filter", "layer"):
        wa, wb = widths(a, how), widths(b, how)
        assert np.all(np.isfinite(wa))
        np.testing.assert_allclose(wa, wb, rtol=1e-3)
    raw_a, raw_b = widths(a, "raw"), widths(b, "raw")
    assert np.all(np.isfinite(raw_a))
    assert np.all(raw_b > 1.5 * raw_a)  # wider: the same step is 10x smaller relative to layer 0


def test_landscape_options_check_directions_and_curvature_counts():
    from swalab.report import LandscapeOptions

    assert LandscapeOptions().directions == ("filter", "raw")  # the default: filter is primary
    assert LandscapeOptions(directions=["layer"]).directions == ("layer",)
    for bad in ((), ("filter", "filter"), ("unit",)):
        with pytest.raises(ValueError, match="--directions must be distinct entries of filter"):
            LandscapeOptions(directions=bad)
    with pytest.raises(ValueError, match="curvature_probes must be >= 1, got 0"):
        LandscapeOptions(curvature_probes=0)
