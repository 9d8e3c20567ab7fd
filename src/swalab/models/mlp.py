"""Multilayer perceptron for the toy regression, Friedman and tabular tasks.

Source documents 000/001 (BayesianML-SWA, ``models/mlp.py``): ``n`` hidden layers Linear-ReLU of one
width, then a linear output; 3 x 16 for the 2-D toy, 3 x 32 for Friedman 1 and 3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from swalab.models.base import MODELS, check_choice, check_positive

__all__ = ["MLP", "mlp"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


class MLP(nn.Module):
    """Flatten, then ``Linear-activation`` per hidden width, then ``Linear`` to the outputs.

    With no hidden layers it is a linear model (logistic regression under cross-entropy).
    """

    def __init__(
        self, in_features: int, num_outputs: int, hidden: Sequence[int], activation: str
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, *in_shape]`` -> ``[B, num_outputs]``."""
        return self.net(x)


@MODELS.register("mlp")
def mlp(
    in_shape: tuple[int, ...],
    num_outputs: int,
    hidden: Sequence[int] = (32, 32, 32),
    activation: str = "relu",
) -> MLP:
    """MLP on the flattened input (documents 000/001: 3 hidden layers of 16 or 32)."""
    if not isinstance(hidden, (tuple, list)):
        raise ValueError(f"hidden must be a sequence of layer widths, got {hidden!r}")
    for h in hidden:
        check_positive("hidden width", h, integer=True)
    check_choice("activation", activation, sorted(ACTIVATIONS))
    return MLP(math.prod(in_shape), num_outputs, tuple(hidden), activation)
