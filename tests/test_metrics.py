"""Oracle tests of swalab.metrics: hand-computed values and constructed calibrations."""

from __future__ import annotations

import math

import pytest
import torch

from swalab.metrics import (
    accuracy,
    balanced_accuracy,
    brier,
    ece,
    gaussian_nll,
    mse,
    nll,
    reliability_diagram,
)


def _predictions(
    confidences: list[float], correct: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-class probabilities ``[c, (1-c)/2, (1-c)/2]`` (class 0 predicted) and targets 0 or 1."""
    c = torch.tensor(confidences, dtype=torch.float64)
    probs = torch.stack([c, (1 - c) / 2, (1 - c) / 2], 1)
    targets = torch.tensor([0 if ok else 1 for ok in correct])
    return probs, targets


def test_accuracy_nll_brier_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    targets = torch.tensor([0, 2])
    assert accuracy(probs, targets) == 0.5
    assert nll(probs, targets) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2, rel=1e-6)
    # (0.09 + 0.04 + 0.01) + (0.01 + 0.36 + 0.49) = 1.0 -> mean 0.5
    assert brier(probs, targets) == pytest.approx(0.5, rel=1e-6)


def test_nll_clamps_zero_probability() -> None:
    probs = torch.tensor([[1.0, 0.0]])
    assert nll(probs, torch.tensor([1]), eps=1e-8) == pytest.approx(-math.log(1e-8))


def test_balanced_accuracy_mean_recall_with_ignore_index() -> None:
    # class 0: 3 of 4 right, class 1: 1 of 1 right, class 2 absent; the -1 sample is ignored.
    scores = torch.eye(3)[torch.tensor([0, 0, 0, 1, 1, 2])]
    targets = torch.tensor([0, 0, 0, 0, 1, -1])
    assert balanced_accuracy(scores, targets) == pytest.approx((3 / 4 + 1) / 2)
    assert accuracy(scores[:5], targets[:5]) == pytest.approx(4 / 5)


def test_ece_zero_for_perfect_calibration_equal_mass() -> None:
    # Three equal-mass bins of 4: confidence 0.5 with 2/4 right, 0.75 with 3/4, 1.0 with 4/4.
    conf = [0.5] * 4 + [0.75] * 4 + [1.0] * 4
    correct = [True, True, False, False] + [True, True, True, False] + [True] * 4
    probs, targets = _predictions(conf, correct)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert ece(probs[perm], targets[perm], n_bins=3) == 0.0
    # Equal width, 4 bins: 0.5 in (0.25, 0.5], 0.75 in (0.5, 0.75], 1.0 in (0.75, 1].
    assert ece(probs[perm], targets[perm], n_bins=4, binning="width") == 0.0
    data = reliability_diagram(probs[perm], targets[perm], n_bins=3)
    assert data == {
        "confidence": [0.5, 0.75, 1.0],
        "accuracy": [0.5, 0.75, 1.0],
        "count": [4.0, 4.0, 4.0],
    }


def test_ece_hand_computed_miscalibrated() -> None:
    probs, targets = _predictions([0.95, 0.85, 0.75, 0.65], [True, False, True, True])
    # Equal mass, 2 bins: {0.65, 0.75} conf 0.7 acc 1 ; {0.85, 0.95} conf 0.9 acc 0.5.
    assert ece(probs, targets, n_bins=2) == pytest.approx(0.5 * 0.3 + 0.5 * 0.4)
    # One sample per bin: mean |conf - correct| = (0.35 + 0.25 + 0.85 + 0.05) / 4.
    assert ece(probs, targets, n_bins=4) == pytest.approx(1.5 / 4)
    # Equal width, 2 bins: all in (0.5, 1], conf 0.8 acc 0.75.
    assert ece(probs, targets, n_bins=2, binning="width") == pytest.approx(0.05)
    # Equal width, 5 bins: (0.6, 0.8] holds 0.65, 0.75 ; (0.8, 1] holds 0.85, 0.95.
    assert ece(probs, targets, n_bins=5, binning="width") == pytest.approx(0.35)
    data = reliability_diagram(probs, targets, n_bins=5, binning="width")
    assert data["confidence"] == pytest.approx([0.7, 0.9])
    assert data["accuracy"] == pytest.approx([1.0, 0.5])
    assert data["count"] == [2.0, 2.0]


def test_ece_default_twenty_equal_mass_bins_unequal_sizes() -> None:
    # 50 samples in 20 bins: sizes differ by at most one and cover every sample.
    probs = torch.softmax(torch.randn(50, 4, generator=torch.Generator().manual_seed(1)), 1)
    targets = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(2))
    counts = reliability_diagram(probs, targets)["count"]
    assert len(counts) == 20 and sum(counts) == 50 and set(counts) == {2.0, 3.0}


def test_regression_metrics_by_hand() -> None:
    mean = torch.tensor([0.0, 1.0])
    target = torch.tensor([1.0, 1.0])
    var = torch.tensor([1.0, 4.0])
    assert mse(mean, target) == pytest.approx(0.5)
    expected = 0.5 * (math.log(2 * math.pi) + 1) / 2 + 0.5 * (math.log(2 * math.pi * 4)) / 2
    assert gaussian_nll(mean, var, target) == pytest.approx(expected)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: accuracy(torch.ones(3), torch.zeros(3)), r"\[N, C\]"),
        (lambda: nll(torch.ones(3, 2), torch.zeros(2, dtype=torch.long)), "targets"),
        (
            lambda: ece(torch.ones(3, 2) / 2, torch.zeros(3, dtype=torch.long), binning="log"),
            "binning",
        ),
        (lambda: ece(torch.ones(3, 2) / 2, torch.zeros(3, dtype=torch.long), n_bins=0), "n_bins"),
        (lambda: mse(torch.ones(3), torch.ones(3, 1)), "shape"),
        (lambda: gaussian_nll(torch.ones(2), -torch.ones(2), torch.ones(2)), "negative"),
        (lambda: balanced_accuracy(torch.ones(2, 2), torch.tensor([-1, -1])), "ignore_index"),
        (lambda: accuracy(torch.ones(0, 2), torch.ones(0)), "N = 0"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
