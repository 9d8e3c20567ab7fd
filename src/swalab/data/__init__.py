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

from typing import Any

from swalab.data import cluster, digits, images, mnist1d, regression  # noqa: F401  (registration)
from swalab.data.base import DATASETS, BatchLoader, DataBundle, DatasetUnavailable, Split

__all__ = ["DATASETS", "BatchLoader", "DataBundle", "DatasetUnavailable", "Split", "load"]


def load(name: str, **options: Any) -> DataBundle:
    """Build the registered dataset ``name`` with ``options`` (e.g. ``seed``, ``val_size``)."""
    return DATASETS.create(name, **options)
