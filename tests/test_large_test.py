"""The large test sets drawn from the generators (docs/claims.md) and the per-sample scores the
claims' test-sampling share reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swalab.data import load
from swalab.data.regression import toy2d_surface
from swalab.lab.rundir import RunFiles
from swalab.lab.task import TASKS


@pytest.mark.parametrize("name", ["toy2d", "friedman1", "friedman3"])
def test_regression_large_test_is_fixed_and_its_own(name):
    a, b = load(name, seed=0, large_test=500), load(name, seed=3, large_test=500)
    assert len(a.large_test) == 500 and a.large_test.x.shape[1:] == a.test.x.shape[1:]
    if name == "toy2d":  # the same set for every run seed (unstandardised)
        assert torch.equal(a.large_test.x, b.large_test.x)
        assert torch.equal(a.large_test.y, b.large_test.y)
    # not the test split, nor the training data
    assert not torch.equal(a.large_test.x[: len(a.test)], a.test.x[: len(a.large_test)])
    assert load(name, seed=0).large_test is None
    with pytest.raises(ValueError, match="large_test must be an integer >= 0, got -1"):
        load(name, large_test=-1)


def test_toy2d_large_test_is_the_same_surface_and_noise():
    bundle = load("toy2d", large_test=20_000)
    x, y = bundle.large_test.x, bundle.large_test.y
    assert x.min() >= -2 and x.max() <= 2  # uniform on the grid's square
    residual = y - toy2d_surface(x)
    assert residual.std().item() == pytest.approx(0.1, rel=0.03)  # noise 0.1
    noiseless = load("toy2d", large_test=100, noise=0.0).large_test
    assert torch.allclose(noiseless.y, toy2d_surface(noiseless.x))


def test_friedman_large_test_is_standardised_with_the_training_statistics():
    raw = load("friedman1", standardize=False, large_test=2000)
    std = load("friedman1", large_test=2000)
    mean, sd = raw.train.y.mean(0), raw.train.y.std(0)
    assert torch.allclose(std.large_test.y, (raw.large_test.y - mean) / sd, atol=1e-5)


def test_mnist1d_large_test(tmp_path):
    bundle = load("mnist1d", root=str(tmp_path), seed=0, large_test=200)
    large = bundle.large_test
    assert large.x.shape == (200, 1, 40) and large.x.dtype == torch.float32
    assert torch.equal(large.y.bincount(), torch.full((10,), 20))  # 20 per class
    assert large.x.std().item() == pytest.approx(1.0, abs=1e-4)  # normalised as the package does
    again = load("mnist1d", root=str(tmp_path), seed=5, large_test=200).large_test
    assert torch.equal(large.x, again.x)  # cached, and the same for every run seed
    assert not any(torch.equal(large.x[0], t) for t in bundle.test.x[:, :])
    with pytest.raises(ValueError, match="multiple of 10"):
        load("mnist1d", root=str(tmp_path), large_test=15)


def test_per_sample_scores_average_to_the_metrics(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 4, generator=g).softmax(-1)
    y = torch.randint(0, 4, (50,), generator=g)
    task = TASKS["classification"]
    assert 100 * task.per_sample(probs, y).mean().item() == pytest.approx(
        task.metrics(probs, y)["accuracy"]
    )
    pred, target = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
    reg = TASKS["regression"]
    assert reg.per_sample(pred, target).mean().item() == pytest.approx(
        reg.metrics(pred, target)["mse"], rel=1e-6
    )
    assert TASKS["node_classification"].per_sample(probs, y) is None
    files = RunFiles(tmp_path / "sgd" / "seed0")
    assert files.per_sample() == {}
    files.save_per_sample({"test": np.array([1.0, 0.0]), "large_test": np.ones(3)})
    stored = files.per_sample()
    assert stored["test"].tolist() == [1.0, 0.0] and stored["large_test"].shape == (3,)
