"""The model registry and the argument checks shared by the model families.

Every builder has the signature ``builder(in_shape, num_outputs, **options)`` with defaulted
options, where ``in_shape`` is the shape of one sample: ``(F,)`` tabular or graph node features,
``(C, L)`` 1-D signals, ``(C, H, W)`` images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from swalab.registry import Registry

__all__ = ["MODELS", "check_choice", "check_positive", "image_shape"]

MODELS = Registry("model")


def image_shape(model: str, in_shape: Sequence[int], min_size: int = 1) -> tuple[int, int, int]:
    """``in_shape`` as ``(C, H, W)``; ``ValueError`` unless it is an image of >= ``min_size`` px."""
    if len(in_shape) != 3 or min(in_shape[1:]) < min_size:
        raise ValueError(
            f"{model} expects in_shape (C, H, W) with H, W >= {min_size}, got {tuple(in_shape)}"
        )
    c, h, w = in_shape
    return c, h, w


def check_positive(option: str, value: Any, integer: bool = False) -> None:
    """``ValueError`` unless ``value`` is a number (an int if ``integer``) > 0."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "an int" if integer else "a number"
        raise ValueError(f"{option} must be {kind} > 0, got {value!r}")


def check_choice(option: str, value: Any, choices: Sequence[Any]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{option} must be one of {list(choices)}, got {value!r}")
