"""What the callbacks share for a sharded average (FSDP2 / DTensor, :mod:`swalab.sharded`).

The average of a sharded model cannot run on its own: its BatchNorm statistics are recomputed
inside the sharded model (:func:`update_bn_inside`), and its checkpoint is a DCP folder written by
every rank into a temporary sibling that rank 0 renames into place (:func:`save_dcp_whole`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swalab import sharded
from swalab.averaging import AveragedModel
from swalab.bn import update_bn


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def update_bn_inside(
    averaged: AveragedModel, module: nn.Module, loader: Any, device: Any, **options: Any
) -> None:
    """``update_bn`` of a sharded average: it runs inside the sharded ``module`` (an FSDP2 forward
    is a collective; ``update_bn`` keeps the ranks in lockstep), whose floating buffers are the
    average's during the swap. The integer ones (``num_batches_tracked``) are not swapped: they
    are copied to the average and the module's own put back."""
    counters = [(name, t) for name, t in module.named_buffers() if not t.is_floating_point()]
    saved = [t.clone() for _, t in counters]
    with averaged.swapped_into(module):
        update_bn(loader, module, device, **options)
    ours = dict(averaged.module.named_buffers())
    with torch.no_grad():
        for (name, t), old in zip(counters, saved):
            ours[name].copy_(t)
            t.copy_(old)


def save_dcp_whole(averaged: AveragedModel, directory: Path, write_extra: Callable[[Path], None]):
    """``sharded.save_checkpoint`` into a temporary sibling of ``directory`` (named by rank 0 and
    broadcast), then rank 0 adds ``write_extra(folder)`` and renames it into place: a whole folder
    or none. Call it on every rank (a shared filesystem)."""
    dist = torch.distributed
    name: list[str | None] = [None]
    if _rank() == 0:
        directory.parent.mkdir(parents=True, exist_ok=True)
        name[0] = tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    try:
        sharded.save_checkpoint(averaged, tmp)
        _barrier()  # every rank's shards written
        if _rank() == 0:
            write_extra(tmp)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
    finally:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()


def gathered_on_rank0(averaged: AveragedModel) -> dict[str, Tensor] | None:
    """The average as a plain ``state_dict`` of the model (CPU tensors) on rank 0, None on the
    others: one tensor gathered at a time, only rank 0 keeps them. Call it on every rank."""
    keep = _rank() == 0
    state = {}
    for key, value in averaged.module.state_dict().items():
        whole = sharded.gather(value)  # a collective for a DTensor
        if keep:  # a snapshot: an unsharded average's own tensors are copied
            state[key.replace("_orig_mod.", "")] = whole.to(
                "cpu", copy=not sharded.is_dtensor(value)
            )
    return state if keep else None


def is_zero3(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``model``'s parameters (each rank holds an empty
    placeholder tensor per parameter, so a copy of them averages nothing)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())
