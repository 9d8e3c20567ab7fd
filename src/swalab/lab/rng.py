"""The global random streams a trajectory trains with, kept apart from the work beside training.

Dropout draws from torch's global generators (the CPU one, and the CUDA one of the device a model
runs on). What a run draws between two epochs must be exactly what a run resumed from the
checkpoint of the first epoch draws, and the same whichever process trains it (``--jobs``):
evaluation, BatchNorm recomputation of an average (a training-mode pass, dropout included), a
recipe built to count epochs, the end of a run — none of them may move these streams. Side work
runs inside :func:`kept_rng`; checkpoints hold :func:`device_rng` beside the CPU state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["device_rng", "kept_rng", "restore_device_rng"]


def device_rng(device: torch.device) -> dict[str, Any]:
    """The CUDA generator's state of ``device`` (``{}`` on the CPU), for a checkpoint."""
    if device.type != "cuda":
        return {}
    return {"cuda_rng": torch.cuda.get_rng_state(device)}


def restore_device_rng(state: dict[str, Any], device: torch.device) -> None:
    """Back to a checkpoint's CUDA generator state (checkpoints without one leave it as it is)."""
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


@contextlib.contextmanager
def kept_rng(device: torch.device) -> Iterator[None]:
    """Work inside this block leaves the global CPU generator, and ``device``'s CUDA generator,
    as they were when it began."""
    cpu = torch.get_rng_state()
    cuda = device_rng(device)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        restore_device_rng(cuda, device)
