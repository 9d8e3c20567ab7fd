"""Predictions over a split and the metrics of a run (shared by trainer and recipes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from ..bn import call_model, update_bn
from ..data import BatchLoader, Split
from .task import Task


class Shards(Protocol):
    """How a split is divided over processes (``distributed.World``; evaluation needs no more)."""

    size: int

    def shard(self, split: Split) -> Split: ...

    def gather_rows(self, part: Tensor, n: int) -> Tensor: ...


__all__ = ["EvalContext", "evaluate", "joint_predictions", "model_outputs", "predict"]


class EvalContext(NamedTuple):
    """What a recipe needs to produce its final predictions."""

    task: Task
    device: torch.device
    batch_size: int
    bn_loader: Callable[[], BatchLoader]  # a fresh, seeded pass over the training data
    bn_batches: int | None
    world: Shards | None = None  # under DDP each rank predicts its part of a split (distributed.py)
    bn_weighting: str = "batches"  # update_bn's weighting (train.bn_weighting)

    def recompute_bn(self, model: nn.Module) -> None:
        """``update_bn`` on a fresh pass of the training data, as the run's config says."""
        update_bn(  # the lab's (x, y) batches, x a tensor or a graph's tuple of inputs: unpacked
            self.bn_loader(),
            model,
            max_batches=self.bn_batches,
            weighting=self.bn_weighting,
            unpack=True,
        )


@torch.no_grad()
def model_outputs(model: nn.Module, split: Split, ctx: EvalContext) -> Tensor:
    """Predictions (``ctx.task.outputs``: probabilities or values) of ``model`` in eval mode, on
    the CPU.

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
        outputs.append(ctx.task.outputs(call_model(model, x)).cpu())
    model.train(was_training)
    return torch.cat(outputs)


def predict(model: nn.Module, splits: dict[str, Split], ctx: EvalContext) -> dict[str, Tensor]:
    return {name: model_outputs(model, split, ctx) for name, split in splits.items()}


def joint_predictions(
    splits: dict[str, Split], ctx: EvalContext
) -> tuple[Callable[[nn.Module], Tensor], Callable[[Tensor], dict[str, Tensor]]]:
    """A ``predict_fn`` for the library's ensembles (``ensemble_predict``, ``bma_predict``): a
    model's predictions on every split as one flat tensor (they average elementwise), and its
    inverse."""
    shapes: dict[str, torch.Size] = {}

    def predict_fn(model: nn.Module) -> Tensor:
        outputs = predict(model, splits, ctx)
        shapes.update({name: out.shape for name, out in outputs.items()})
        return torch.cat([out.reshape(-1) for out in outputs.values()])

    def unflatten(flat: Tensor) -> dict[str, Tensor]:
        parts = flat.split([shape.numel() for shape in shapes.values()])
        return {name: part.reshape(shapes[name]) for name, part in zip(shapes, parts)}

    return predict_fn, unflatten


def evaluate(outputs: Tensor, split: Split, task: Task) -> dict[str, float]:
    """Loss and task metrics of ``outputs`` (probabilities or predictions) against ``split.y``."""
    return task.metrics(outputs, split.y)
