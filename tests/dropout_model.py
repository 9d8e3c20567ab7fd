"""A stochastic model for the determinism tests (issue 23): dropout draws from the global RNG in
every training forward, and BatchNorm makes every average's evaluation recompute its statistics
(a training-mode pass, dropout included)."""

from __future__ import annotations

import math

from torch import nn


def build(in_shape: tuple[int, ...], num_outputs: int, p: float = 0.3) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(in_shape), 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(p),
        nn.Linear(32, num_outputs),
    )
