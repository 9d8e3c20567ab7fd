"""The one place that turns ``train.device`` / ``--device`` into a ``torch.device``, or refuses it.

A device that does not exist (``cuda`` without a GPU, ``cuda:3`` with one GPU) is a one-line
:class:`ConfigError` naming the key, before any work starts, instead of a CUDA traceback in the
middle of a run.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    ``key`` names the setting in the error (``--device``, ``train.device``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{key} must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"{key} {name!r} does not exist: no CUDA GPU is available here; use --device cpu"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"{key} {name!r} does not exist: {count} CUDA GPU(s) visible "
                f"(cuda:0..cuda:{count - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key} {name!r} does not exist: MPS is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return device
