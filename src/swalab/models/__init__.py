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


_GIVEN = ("in_shape", "num_outputs", "num_classes")  # what swalab passes a builder itself


def _signature(name: str) -> dict[str, inspect.Parameter]:
    """The parameters of model ``name``'s builder, or a one-line ``ValueError`` when swalab
    cannot call it: it must take ``num_outputs`` or, as torchvision's and timm's builders do,
    ``num_classes`` (named, or through ``**kwargs``), and need nothing else without a default."""
    builder = MODELS.get(name)
    try:
        params = dict(inspect.signature(builder).parameters)
    except (TypeError, ValueError):
        raise ValueError(f"model {name!r}: cannot read the signature of {builder!r}") from None
    keywords = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not ({"num_outputs", "num_classes"} & set(params) or keywords):
        raise ValueError(
            f"model {name!r} takes neither num_outputs nor num_classes (its parameters: "
            f"{list(params)}); swalab calls a model builder as "
            "builder(in_shape=..., num_outputs=..., **model.options)"
        )
    required = [
        k
        for k, p in params.items()
        if p.default is p.empty
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        and k not in _GIVEN
    ]
    if required:
        raise ValueError(
            f"model {name!r} needs {required} (no default); swalab gives a builder in_shape and "
            "num_outputs (or num_classes): give the others in model.options or default them"
        )
    return params


def default_options(name: str) -> dict[str, Any]:
    """The options of model ``name`` with their defaults."""
    params = _signature(name)
    return {
        k: p.default
        for k, p in params.items()
        if k not in _GIVEN and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


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
    params = _signature(name)
    given: dict[str, Any] = {"in_shape": in_shape} if "in_shape" in params else {}
    if "num_outputs" in params:
        given["num_outputs"] = num_outputs
    else:  # torchvision's and timm's convention, named or through **kwargs
        given["num_classes"] = num_outputs
    model = MODELS.create(name, **given, **options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
