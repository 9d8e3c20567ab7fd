"""The kind of prediction problem a dataset poses, as one object the laboratory asks.

A :class:`Task` owns everything that differs between classification, regression and node
classification: the training loss, how raw outputs become predictions (probabilities or values),
the metrics of a split, the validation score a soup maximises and the error a landscape reports.
A dataset names its task (``DataBundle.task``); :func:`task_of` turns the name into the object.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import landscape, metrics

__all__ = ["TASKS", "NodeClassification", "Regression", "Task", "task_of"]


class Task:
    """A prediction task; this base class is classification: cross-entropy on logits, softmax
    probabilities, accuracy/NLL/ECE. Subclasses change what differs."""

    name = "classification"
    primary = "accuracy"  # the metric the tables and the progress lines report
    probabilistic = True  # outputs are class probabilities (ensemble views, soups' weights)
    reliability = True  # one probability vector per sample (reliability diagrams)
    error_label = "test error (%)"
    landscape_stats: Callable[[Tensor, Tensor], tuple] = staticmethod(landscape.cross_entropy_stats)

    def loss(self, output: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """The training objective; ``reduction="sum"`` for a DDP rank's share of a global batch."""
        return F.cross_entropy(output, y, reduction=reduction)

    def count(self, y: Tensor) -> Tensor:
        """How many targets the mean loss averages over."""
        return torch.tensor(len(y))

    def outputs(self, output: Tensor) -> Tensor:
        """Raw model outputs as predictions: class probabilities."""
        return output.softmax(-1)

    def metrics(self, outputs: Tensor, y: Tensor) -> dict[str, float]:
        """Loss and metrics of predictions ``outputs`` against targets ``y``."""
        return {
            "loss": metrics.nll(outputs, y),
            "accuracy": 100 * metrics.accuracy(outputs, y),
            "ece": metrics.ece(outputs, y),
        }

    def score(self, result: dict[str, float]) -> float:
        """Validation score of ``metrics(...)``, higher is better (what a soup maximises)."""
        return result["accuracy"]

    def per_sample(self, outputs: Tensor, y: Tensor) -> Tensor | None:
        """Each sample's score whose mean is the primary metric (as a fraction): 1.0 where the
        predicted class is right, else 0.0. Two runs' scores on the same samples give the
        test-set sampling variance of their difference (docs/claims.md)."""
        return outputs.argmax(-1).eq(y).double()

    def error(self, outputs: Tensor, y: Tensor) -> float:
        """Test error of predictions in % (labels of -1, padding, ignored)."""
        y = y.reshape(-1)
        keep = y >= 0
        return (
            100.0
            * outputs.reshape(y.numel(), -1)[keep].argmax(-1).ne(y[keep]).double().mean().item()
        )


class NodeClassification(Task):
    """Per-node classes of padded graphs: padded nodes carry label -1 and are ignored."""

    name = "node_classification"
    reliability = False

    def loss(self, output: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        return F.cross_entropy(
            output.reshape(-1, output.shape[-1]),
            y.reshape(-1),
            ignore_index=-1,
            reduction=reduction,
        )

    def count(self, y: Tensor) -> Tensor:
        return (y >= 0).sum()

    def per_sample(self, outputs: Tensor, y: Tensor) -> Tensor | None:
        """None: balanced accuracy is not a mean over samples."""
        return None

    def metrics(self, outputs: Tensor, y: Tensor) -> dict[str, float]:
        probs, y = outputs.reshape(-1, outputs.shape[-1]), y.reshape(-1)
        keep = y >= 0
        return {
            "loss": metrics.nll(probs[keep], y[keep]),
            "accuracy": 100 * metrics.balanced_accuracy(probs, y),
        }


class Regression(Task):
    """Regression: mean squared error; outputs are the predictions themselves."""

    name = "regression"
    primary = "mse"
    probabilistic = False
    reliability = False
    error_label = "test MSE"
    landscape_stats = staticmethod(landscape.mse_stats)

    def loss(self, output: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        return F.mse_loss(output, y, reduction=reduction)

    def count(self, y: Tensor) -> Tensor:
        return torch.tensor(y.numel())

    def outputs(self, output: Tensor) -> Tensor:
        return output

    def metrics(self, outputs: Tensor, y: Tensor) -> dict[str, float]:
        mse = metrics.mse(outputs, y)
        return {"loss": mse, "mse": mse}

    def score(self, result: dict[str, float]) -> float:
        return -result["mse"]

    def per_sample(self, outputs: Tensor, y: Tensor) -> Tensor | None:
        """Each sample's squared error (mean over output dimensions): their mean is the MSE."""
        return (outputs.double() - y.double()).square().reshape(len(y), -1).mean(-1)

    def error(self, outputs: Tensor, y: Tensor) -> float:
        return float((outputs.double() - y.double()).square().mean())


TASKS: dict[str, Task] = {t.name: t for t in (Task(), NodeClassification(), Regression())}


def task_of(name: str) -> Task:
    """The :class:`Task` named by a dataset (``DataBundle.task``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]
