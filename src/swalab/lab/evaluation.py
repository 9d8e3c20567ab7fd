"""Losses, predictions over a split and the metrics of a run (shared by trainer and recipes)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import metrics
from ..data import BatchLoader, Split

if TYPE_CHECKING:
    from .distributed import World

__all__ = ["EvalContext", "evaluate", "forward", "has_batchnorm", "loss_fn", "model_outputs", "predict"]


class EvalContext(NamedTuple):
    """What a recipe needs to produce its final predictions."""

    task: str
    device: torch.device
    batch_size: int
    bn_loader: Callable[[], BatchLoader]  # a fresh, seeded pass over the training data
    bn_batches: int | None
    world: World | None = None  # under DDP: each rank predicts its part of a split (see distributed.py)


def forward(model: nn.Module, x: Tensor | tuple[Tensor, ...]) -> Tensor:
    """Run a model on inputs that are a tensor or a tuple (graphs: features, adjacency, mask)."""
    return model(*x) if isinstance(x, tuple) else model(x)


def loss_fn(task: str, output: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy for classification (padded nodes ignored), mean squared error for regression.

    ``reduction="sum"`` sums instead of averaging (a DDP rank's share of the global batch's loss).
    """
    if task == "regression":
        return F.mse_loss(output, y, reduction=reduction)
    if task == "node_classification":
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), y.reshape(-1), ignore_index=-1,
                               reduction=reduction)
    return F.cross_entropy(output, y, reduction=reduction)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def model_outputs(model: nn.Module, split: Split, ctx: EvalContext) -> Tensor:
    """Probabilities (classification) or predictions (regression) of ``model`` in eval mode, on the CPU.

    Under DDP (``ctx.world``) each rank predicts its contiguous part of the split and the parts are
    gathered, so every rank returns the outputs for the whole split.
    """
    if ctx.world is not None and ctx.world.size > 1:
        part = model_outputs(model, ctx.world.shard(split), ctx._replace(world=None))
        return ctx.world.gather_rows(part, len(split))
    was_training = model.training
    model.eval()
    outputs = []
    for x, _ in BatchLoader(split, ctx.batch_size, device=ctx.device):
        out = forward(model, x)
        outputs.append((out if ctx.task == "regression" else out.softmax(-1)).cpu())
    model.train(was_training)
    return torch.cat(outputs)


def predict(model: nn.Module, splits: dict[str, Split], ctx: EvalContext) -> dict[str, Tensor]:
    return {name: model_outputs(model, split, ctx) for name, split in splits.items()}


def evaluate(outputs: Tensor, split: Split, task: str) -> dict[str, float]:
    """Loss and task metrics of ``outputs`` (probabilities or predictions) against ``split.y``."""
    y = split.y
    if task == "regression":
        mse = metrics.mse(outputs, y)
        return {"loss": mse, "mse": mse}
    if task == "node_classification":
        probs, y = outputs.reshape(-1, outputs.shape[-1]), y.reshape(-1)
        keep = y >= 0
        return {"loss": metrics.nll(probs[keep], y[keep]), "accuracy": 100 * metrics.balanced_accuracy(probs, y)}
    return {"loss": metrics.nll(outputs, y), "accuracy": 100 * metrics.accuracy(outputs, y),
            "ece": metrics.ece(outputs, y)}
