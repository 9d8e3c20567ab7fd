"""Datasets as in-memory tensors: a registry of builders returning :class:`DataBundle`.

Every builder takes ``root`` (where files live), ``download`` (fetch missing files) and ``seed``
(splits and generated data) plus its own options, all keyword-only with defaults, and is
deterministic for a given seed. ``swalab list`` shows each one's docstring summary.

Example:
    >>> from swalab.data import BatchLoader, load
    >>> bundle = load("mnist1d", seed=0, val_size=500)
    >>> loader = BatchLoader(bundle.train, batch_size=100, shuffle=True,
    ...                      generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import inspect
from typing import Any

from swalab.data import cluster, digits, images, mnist1d, regression  # noqa: F401  (registration)
from swalab.data.base import (
    DATASETS,
    BatchLoader,
    DataBundle,
    DatasetUnavailable,
    DataShape,
    Split,
)

__all__ = [
    "DATASETS",
    "BatchLoader",
    "DataBundle",
    "DataShape",
    "DatasetUnavailable",
    "Split",
    "load",
    "shape_of",
]


def load(name: str, **options: Any) -> DataBundle:
    """Build the registered dataset ``name`` with ``options`` (e.g. ``seed``, ``val_size``)."""
    bundle = DATASETS.create(name, **options)
    if not isinstance(bundle, DataBundle):
        raise ValueError(
            f"dataset {name!r} returned a {type(bundle).__name__}, not a swalab.data.DataBundle "
            "(see the README, 'Your own model, dataset or method')"
        )
    return bundle


def shape_of(name: str, **options: Any) -> DataShape:
    """The :class:`DataShape` of ``load(name, **options)``, without reading a file where the
    builder declares it (``builder.shape(options)``, given every option with its default: datasets
    read from files, e.g. CIFAR); any other dataset is built (generated data: cheap)."""
    builder = DATASETS.get(name)
    declared = getattr(builder, "shape", None)
    if declared is None:
        return DataShape.of(load(name, **options))
    params = inspect.signature(builder).parameters.values()
    return declared({**{p.name: p.default for p in params if p.default is not p.empty}, **options})
