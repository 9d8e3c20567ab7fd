"""BatchNorm recomputation for averaged weights (Izmailov et al., 2018, §3.2).

The running statistics of an averaged model belong to none of the averaged models, so they are
recomputed with one pass over the training data: running mean/variance are reset and every BN
layer uses ``momentum=None`` (PyTorch's cumulative average), which gives the average of the
per-batch statistics over the pass — exactly ``torch.optim.swa_utils.update_bn``.

``weighting="samples"`` weights each batch by its number of samples instead, as the paper's
reference code does (``bn_update`` in timgaripov/swa ``utils.py`` sets ``momentum = b / (n + b)``
before a batch of ``b`` samples, ``n`` seen so far): the two differ when the batches differ in size,
e.g. CIFAR-10's 50,000 = 390 · 128 + 80 images, whose short last batch counts 80/50,000 of the
statistics there and 1/391 of them in torch's convention.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from swalab import sharded

from .averaging import AveragedModel

__all__ = [
    "update_bn",
    "batch_size",
    "call_model",
    "default_forward",
    "has_batchnorm",
    "move_to",
    "torch_forward",
    "unpacking_forward",
]

_EMPTY = object()  # what next() returns for a loader without batches
WEIGHTINGS = ("batches", "samples")


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer (an averaged model must recompute its statistics)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def call_model(model: nn.Module, x: Any) -> Any:
    """``model(x)``, or ``model(*x)`` for inputs that are a tuple/list (a graph's features,
    adjacency and mask)."""
    return model(*x) if isinstance(x, (list, tuple)) else model(x)


def move_to(batch: Any, device: Any) -> Any:
    """``batch`` with every tensor inside (nested lists, tuples, dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def torch_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch as ``torch.optim.swa_utils.update_bn`` does (``update_bn``'s default):
    ``model(batch[0])`` for a list/tuple, ``model(batch)`` for anything else (a dict included)."""
    return model(batch[0] if isinstance(batch, (list, tuple)) else batch)


def unpacking_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch, unpacking it (``update_bn(..., unpack=True)``).

    A tensor is the input; a list/tuple's first element is the input (torch's rule), and an input
    that is itself a tuple/list is unpacked (``model(*x)``, e.g. a graph's features, adjacency and
    mask); a dict is passed as keyword arguments (``model(**batch)``, e.g. a Hugging Face batch).
    """
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return call_model(model, batch)


default_forward = unpacking_forward  # the name ensemble prediction uses for its batches


@torch.no_grad()
def update_bn(
    loader: Iterable[Any],
    model: nn.Module,
    device: int | str | torch.device | None = None,
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
    unpack: bool = False,
    weighting: str = "batches",
) -> None:
    """Recompute BatchNorm running statistics of ``model`` with one pass over ``loader``.

    Same signature and numbers as ``torch.optim.swa_utils.update_bn``, plus:

    Args:
        loader: batches: tensors, ``(x, y)`` lists/tuples, dicts, or anything ``forward_fn`` takes.
        model: the model (e.g. an ``AveragedModel``) whose BN statistics are recomputed.
        device: if set, every tensor of a batch is moved there first.
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch (default: torch's
            convention, :func:`torch_forward`: ``model(batch[0])`` for a list/tuple, else
            ``model(batch)``, a dict included).
        max_batches: stop after this many batches (all by default).
        unpack: unpack batches instead (:func:`unpacking_forward`): a dict as keyword arguments
            (``model(**batch)``), an input that is a tuple/list as arguments (``model(*x)``).
        weighting: ``"batches"`` (default, torch's): the statistics are the plain average of the
            per-batch ones; ``"samples"``: each batch weighted by its size, the leading dimension
            of its first tensor (:func:`batch_size`), as the SWA paper's reference ``bn_update``
            does. The two agree when all batches have the same size.

    Raises:
        ValueError: if the model has BatchNorm layers and ``loader`` yields no batch (nothing is
            reset then); with ``torch.distributed``, a rank may have no batch if others have some.

    When ``torch.distributed`` is initialised, the statistics of all ranks are combined (weighted
    by their number of batches), so every rank ends with those of the whole data. A sharded model
    (FSDP2) runs as many forwards on every rank (see :func:`swalab.sharded.lockstep`); evaluate an
    average inside it: ``with averaged.swapped_into(model): update_bn(loader, model)``. Momenta and the
    train/eval mode of the model are restored.

    Example:
        >>> swalab.update_bn(train_loader, swa_model, forward_fn=lambda m, b: m(b["pixels"]))
    """
    integral = isinstance(max_batches, numbers.Integral) and not isinstance(max_batches, bool)
    if max_batches is not None and not (integral and max_batches >= 1):
        raise ValueError(f"max_batches must be an integer >= 1, got {max_batches!r}")
    if not isinstance(unpack, bool):
        raise ValueError(f"unpack must be True or False, got {unpack!r}")
    if unpack and forward_fn is not None:
        raise ValueError(
            "give forward_fn or unpack=True, not both (forward_fn decides how to call)"
        )
    if isinstance(model, AveragedModel):
        model.join()  # an asynchronous update in flight would write the statistics reset below
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    momenta = {m: m.momentum for m in model.modules() if isinstance(m, _BatchNorm)}
    if not momenta:
        return
    batches = iter(loader)
    first = next(batches, _EMPTY)
    if first is _EMPTY and not _distributed():  # before the reset, which would leave 0 and 1
        raise ValueError(
            "update_bn: the loader yielded no batches, so the BatchNorm statistics cannot be "
            "computed"
        )
    if sharded.is_sharded(model):  # before the reset: ValueError on every rank if one has none
        sharded.require_batches(first is not _EMPTY)
    for module in momenta:
        module.reset_running_stats()
        module.momentum = None
    was_training = model.training
    model.train()
    forward = forward_fn or (unpacking_forward if unpack else torch_forward)
    seen = 0  # samples so far (weighting="samples")

    def own(batches: Iterable[Any]) -> Iterator[Any]:
        """The rank's own batches; under ``weighting="samples"`` each sets the momentum of the
        reference code's cumulative average over samples before it is run."""
        nonlocal seen
        for batch in batches:
            if weighting == "samples":
                size = batch_size(batch)
                for module in momenta:
                    module.momentum = size / (seen + size)
                seen += size
            yield batch

    try:
        data = itertools.islice(
            own(itertools.chain([] if first is _EMPTY else [first], batches)), max_batches
        )
        if sharded.is_sharded(model):  # FSDP2 all-gathers in each forward: ranks go in lockstep
            data = sharded.lockstep(data, list(momenta))  # replays are not counted in `seen`
        for batch in data:
            forward(model, move_to(batch, device) if device is not None else batch)
        _all_reduce_statistics(list(momenta), seen if weighting == "samples" else None)
    finally:
        for module, momentum in momenta.items():
            module.momentum = momentum
        model.train(was_training)


def batch_size(batch: Any) -> int:
    """The number of samples of a batch: the leading dimension of its first tensor (depth first
    through lists, tuples and dicts), as the reference ``bn_update`` reads ``input.size(0)``."""
    size = _leading_size(batch)
    if size is None:
        raise ValueError(
            f"update_bn(weighting='samples'): no tensor with a batch dimension in a batch of type "
            f"{type(batch).__name__} to read its size from"
        )
    return size


def _leading_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    items = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(items, (list, tuple)) or isinstance(batch, Mapping):
        for item in items:
            size = _leading_size(item)
            if size is not None:
                return size
    return None


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_statistics(modules: list[_BatchNorm], samples: int | None = None) -> None:
    """Average each rank's running statistics, weighted by its batch count (by its ``samples``
    under ``weighting="samples"``), across all ranks."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    tracked = [m for m in modules if m.track_running_stats and m.running_mean is not None]
    if not tracked:
        return
    # One flat buffer: [w * mean, w * var, w, batches] per layer, summed over ranks, then divided
    # by the total weight w (the batch count, or the sample count).
    device = tracked[0].running_mean.device
    parts = []
    for m in tracked:
        n = m.num_batches_tracked.to(device=device, dtype=m.running_mean.dtype).reshape(1)
        w = n if samples is None else torch.full_like(n, float(samples))
        parts += [m.running_mean * w, m.running_var * w, w, n]
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    offset = 0
    for m in tracked:
        c = m.running_mean.numel()
        total = flat[offset + 2 * c]
        m.running_mean.copy_(flat[offset : offset + c] / total)
        m.running_var.copy_(flat[offset + c : offset + 2 * c] / total)
        m.num_batches_tracked.copy_(flat[offset + 2 * c + 1].round().long())
        offset += 2 * c + 2
