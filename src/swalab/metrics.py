"""Metrics for classification and regression predictions, including calibration.

Classification metrics take probabilities ``probs [N, C]`` (e.g. an ensemble's or SWAG's averaged
softmax) and integer targets ``[N]``; regression metrics take tensors of one shape. All return
Python floats (``reliability_diagram`` returns lists), computed in float64.

Calibration follows Guo et al. (2017, "On Calibration of Modern Neural Networks") with the equal-mass
bins used by SWAG (Maddox et al., 2019; 20 bins): the samples sorted by confidence are cut into
``n_bins`` groups of sizes differing by at most one. ``binning="width"`` uses ``n_bins`` equal-width
intervals ``(k / n_bins, (k + 1) / n_bins]`` of [0, 1] instead.

Example:
    >>> probs = swalab.bma_predict(swag, test_loader, train_loader)["probs"]
    >>> accuracy(probs, y), nll(probs, y), ece(probs, y)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "brier",
    "ece",
    "gaussian_nll",
    "mse",
    "nll",
    "reliability_diagram",
]

Binning = Literal["mass", "width"]


def _check_classification(probs: Tensor, targets: Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must be [N, C], got shape {tuple(probs.shape)}")
    if targets.shape != probs.shape[:1]:
        raise ValueError(
            f"targets must be [N] = [{probs.shape[0]}], got shape {tuple(targets.shape)}"
        )
    if probs.shape[0] == 0:
        raise ValueError("no predictions (N = 0)")


def _check_same_shape(**tensors: Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, {first_name} has {tuple(first.shape)}"
            )
    if first.numel() == 0:
        raise ValueError("no predictions (empty tensors)")


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Fraction of samples whose most probable class is the target (any scores work, e.g. logits)."""
    _check_classification(probs, targets)
    return probs.argmax(1).eq(targets).double().mean().item()


def balanced_accuracy(probs: Tensor, targets: Tensor, ignore_index: int = -1) -> float:
    """Mean per-class recall over the classes present in ``targets`` (the CLUSTER metric, Dwivedi et al.).

    Samples whose target is ``ignore_index`` are left out.
    """
    _check_classification(probs, targets)
    keep = targets != ignore_index
    targets = targets[keep]
    if targets.numel() == 0:
        raise ValueError(f"every target equals ignore_index={ignore_index}")
    correct = probs[keep].argmax(1).eq(targets).double()
    support = torch.bincount(targets, minlength=probs.shape[1])
    hits = torch.bincount(targets, weights=correct, minlength=probs.shape[1])
    present = support > 0
    return (hits[present] / support[present]).mean().item()


def nll(probs: Tensor, targets: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-log p[target]``, with probabilities clamped to ``>= eps``."""
    _check_classification(probs, targets)
    p = probs.double().gather(1, targets.long().unsqueeze(1)).squeeze(1)
    return -p.clamp_min(eps).log().mean().item()


def brier(probs: Tensor, targets: Tensor) -> float:
    """Multi-class Brier score (Brier, 1950): ``mean_n sum_c (p_nc - [c = y_n])**2``, in [0, 2]."""
    _check_classification(probs, targets)
    one_hot = torch.nn.functional.one_hot(targets.long(), probs.shape[1]).double()
    return (probs.double() - one_hot).square().sum(1).mean().item()


def _bins(
    probs: Tensor, targets: Tensor, n_bins: int, binning: Binning
) -> tuple[Tensor, Tensor, Tensor]:
    """Per non-empty bin: mean confidence, accuracy and count (float64, sorted by confidence)."""
    _check_classification(probs, targets)
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    confidence, prediction = probs.double().max(1)
    correct = prediction.eq(targets).double()
    n = confidence.numel()
    if binning == "mass":
        order = torch.argsort(confidence, stable=True)
        bin_id = torch.empty_like(order)
        bin_id[order] = torch.arange(n, device=order.device) * n_bins // n
    elif binning == "width":
        inner_edges = torch.linspace(
            0, 1, n_bins + 1, dtype=torch.float64, device=confidence.device
        )[1:-1]
        bin_id = torch.bucketize(
            confidence, inner_edges
        )  # bin k holds (k / n_bins, (k + 1) / n_bins]
    else:
        raise ValueError(f"binning must be 'mass' or 'width', got {binning!r}")
    count = torch.bincount(bin_id, minlength=n_bins).double()
    conf_sum = torch.bincount(bin_id, weights=confidence, minlength=n_bins)
    hit_sum = torch.bincount(bin_id, weights=correct, minlength=n_bins)
    filled = count > 0
    return conf_sum[filled] / count[filled], hit_sum[filled] / count[filled], count[filled]


def reliability_diagram(
    probs: Tensor, targets: Tensor, n_bins: int = 20, binning: Binning = "mass"
) -> dict[str, list[float]]:
    """Data of a reliability diagram: per non-empty bin, mean confidence, accuracy and count.

    Returns:
        ``{"confidence": [...], "accuracy": [...], "count": [...]}``, bins in increasing confidence.
    """
    confidence, acc, count = _bins(probs, targets, n_bins, binning)
    return {"confidence": confidence.tolist(), "accuracy": acc.tolist(), "count": count.tolist()}


def ece(probs: Tensor, targets: Tensor, n_bins: int = 20, binning: Binning = "mass") -> float:
    """Expected calibration error ``sum_b (n_b / N) |accuracy_b - confidence_b|``.

    Bins are equal-mass (20 by default, as in SWAG) or, with ``binning="width"``, equal-width.
    """
    confidence, acc, count = _bins(probs, targets, n_bins, binning)
    return ((count / count.sum()) * (acc - confidence).abs()).sum().item()


def mse(prediction: Tensor, target: Tensor) -> float:
    """Mean squared error; ``prediction`` and ``target`` must have the same shape (no broadcasting)."""
    _check_same_shape(prediction=prediction, target=target)
    return (prediction.double() - target.double()).square().mean().item()


def gaussian_nll(mean: Tensor, var: Tensor, target: Tensor, eps: float = 1e-12) -> float:
    """Mean Gaussian negative log-likelihood ``0.5 * (log(2 pi var) + (target - mean)**2 / var)``.

    The constant is included; variances are clamped to ``>= eps``, negative ones are an error.
    """
    _check_same_shape(mean=mean, var=var, target=target)
    if bool((var < 0).any()):
        raise ValueError("var has negative entries")
    var = var.double().clamp_min(eps)
    residual = target.double() - mean.double()
    return (0.5 * (torch.log(var) + math.log(2 * math.pi) + residual.square() / var)).mean().item()
