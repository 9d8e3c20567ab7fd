"""Models for the laboratory: one module per family, every builder registered in ``MODELS``.

torchvision (``mobilenet_v2``, ``resnet50``) and torch_geometric (``gcn``, ``gcn_sparse``) are
imported only when such a model is built.

Example:
    >>> from swalab.models import MODELS, create
    >>> MODELS.names()[:3]
    ['gcn', 'gcn_sparse', 'mlp']
    >>> model = create("mnist1d_cnn", in_shape=(1, 40), num_outputs=10, bn=True)
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from swalab.models import (  # noqa: F401  (imported so that their builders register)
    cnn,
    gcn,
    mlp,
    mobilenet,
    preresnet,
    resnet,
    vgg,
    wide_resnet,
)
from swalab.models.base import MODELS
from swalab.models.gcn import dense_to_sparse_batch

__all__ = ["MODELS", "create", "default_options", "dense_to_sparse_batch"]


def default_options(name: str) -> dict[str, Any]:
    """The options of model ``name`` with their defaults."""
    params = inspect.signature(MODELS.get(name)).parameters
    return {k: p.default for k, p in params.items() if k not in ("in_shape", "num_outputs")}


def create(name: str, in_shape: tuple[int, ...], num_outputs: int, **options: Any) -> nn.Module:
    """Build model ``name`` for samples of shape ``in_shape`` with ``num_outputs`` outputs.

    Args:
        name: a name from ``MODELS.names()``.
        in_shape: shape of one sample: ``(F,)`` tabular or graph node features, ``(C, L)`` 1-D
            signals, ``(C, H, W)`` images.
        num_outputs: number of classes, or of regression targets.
        **options: the model's options (see ``default_options(name)``); unknown keys raise
            ``ValueError``.
    """
    known = default_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; it takes {sorted(known)}"
        )
    in_shape = tuple(in_shape)
    if not in_shape or not all(isinstance(d, int) and d > 0 for d in in_shape):
        raise ValueError(f"in_shape must be a non-empty tuple of positive ints, got {in_shape}")
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive int, got {num_outputs!r}")
    return MODELS.create(name, in_shape=in_shape, num_outputs=num_outputs, **options)
