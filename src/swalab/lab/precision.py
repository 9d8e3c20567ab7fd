"""Mixed precision and memory format of the training step (``train.precision``, ``channels_last``).

``bf16``/``fp16`` run the forward pass and the loss under ``torch.autocast`` (Micikevicius et al.
2018, "Mixed Precision Training"); the weights, the optimizer state, and with them every average
(SWA, EMA, SWAG moments), the BatchNorm recomputation and the evaluation stay in fp32: only the
training step autocasts. ``fp16`` scales the loss with a ``torch.amp.GradScaler`` (its state is
checkpointed); it needs CUDA. ``channels_last`` stores 4-D weights and input batches as NHWC, which
tensor-core convolutions prefer.

``compile`` (``train.compile``) runs the training forward through ``torch.compile`` (TorchDynamo
and Inductor, PyTorch 2.0); averages, BatchNorm recomputation and evaluation keep the plain module,
which shares its parameters with the compiled one. Opt-in: compiling takes tens of seconds per run,
and whether it pays depends on the model and the device (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["PRECISIONS", "Precision", "check_compile"]

PRECISIONS = ("fp32", "bf16", "fp16")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast, gradient scaling, memory format and compilation of one run's training step on
    ``device``."""

    def __init__(
        self, precision: str, channels_last: bool, device: torch.device, compile: bool = False
    ) -> None:
        if compile:
            check_compile(device)
        if precision not in PRECISIONS:
            raise ConfigError(
                f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            )
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"train.precision fp16 needs a CUDA device, got {device.type}; use bf16 or fp32"
            )
        self.precision, self.channels_last, self.device = precision, channels_last, device
        self.compile = compile
        self.dtype = _DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context of the forward pass and the loss (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` in channels_last memory format if asked (in place; the dtype stays fp32)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def compiled(self, net: nn.Module) -> nn.Module:
        """The module of the training forward: ``torch.compile(net)`` if asked, else ``net``."""
        return torch.compile(net) if self.compile else net

    def inputs(self, x: Any) -> Any:
        """A batch in the model's memory format (4-D tensors only)."""
        if self.channels_last and isinstance(x, Tensor) and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def backward_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` and ``optimizer.step()``, through the gradient scaler in fp16."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def check_compile(device: torch.device | None = None) -> None:
    """``train.compile: true`` can work here: TorchDynamo supports this Python, and on ``device``
    Inductor finds what it generates code with (a C++ compiler on the CPU, Triton on CUDA)."""
    fix = "set train.compile false"
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(f"train.compile: torch.compile does not support this Python; {fix}")
    if device is None or device.type == "mps":
        return
    if device.type == "cpu":
        compilers = [os.environ.get("CXX") or "g++", "clang++"]
        if not any(shutil.which(c) for c in compilers):
            raise ConfigError(
                f"train.compile on the CPU needs a C++ compiler ({' or '.join(compilers)}, or "
                f"$CXX), none found; install one or {fix}"
            )
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(f"train.compile on CUDA needs Triton (pip install triton); {fix}")
