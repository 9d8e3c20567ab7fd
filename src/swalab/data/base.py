"""In-memory splits, the dataset bundle, a batch loader that slices tensors, and shared helpers.

Every dataset is held as whole tensors (first dimension = samples), so a mini-batch is one
indexing operation instead of ``batch_size`` calls to ``__getitem__`` plus a collate step.

Example:
    >>> from swalab.data import load, BatchLoader
    >>> bundle = load("toy2d", seed=0)
    >>> g = torch.Generator().manual_seed(0)
    >>> for x, y in BatchLoader(bundle.train, batch_size=128, shuffle=True, generator=g):
    ...     pass
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from swalab.registry import Registry

__all__ = [
    "DATASETS",
    "Augment",
    "BatchLoader",
    "DataBundle",
    "DataShape",
    "DatasetUnavailable",
    "Inputs",
    "Split",
    "num_batches",
]

DATASETS = Registry("dataset")

Inputs = Tensor | tuple[Tensor, ...]
"""A tensor, or a tuple of tensors sharing the first (sample) dimension, e.g. a graph batch."""

Augment = Callable[[Inputs, torch.Generator | None], Inputs]
"""Batched train-time augmentation ``(x, generator) -> x``; ``None`` uses torch's global RNG."""


class DatasetUnavailable(FileNotFoundError):
    """A dataset's files are not on disk and downloading was not requested."""


def _tensors(x: Inputs) -> tuple[Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


@dataclass
class Split:
    """One split held in memory; the first dimension of ``y`` and of every ``x`` tensor is samples.

    Args:
        x: inputs; for graphs the tuple
            ``(node_features [G, N, F], adj [G, N, N], mask [G, N] bool)``.
        y: class ids (long), regression targets (float, ``[G, out]``) or per-node class ids
            ``[G, N]`` with -1 on padding.
        decode: stored inputs to model inputs, applied by :class:`BatchLoader` to each batch
            where the batch is (before ``augment``): e.g. uint8 images normalised on the training
            device, a quarter of the memory of fp32 images. ``None``: ``x`` is what the model
            takes.
    """

    x: Inputs
    y: Tensor
    decode: Callable[[Inputs], Inputs] | None = None

    def __post_init__(self) -> None:
        sizes = {t.shape[0] for t in _tensors(self.x)} | {self.y.shape[0]}
        if len(sizes) != 1:
            raise ValueError(
                f"x and y must have the same number of samples, got sizes {sorted(sizes)}"
            )

    def __len__(self) -> int:
        return self.y.shape[0]

    def subset(self, index: Tensor | slice) -> Split:
        """The samples at ``index``: a long tensor of positions, or a slice (giving views)."""
        x = tuple(t[index] for t in self.x) if isinstance(self.x, tuple) else self.x[index]
        return Split(x, self.y[index], self.decode)

    def inputs(self) -> Inputs:
        """Every sample's model inputs: ``x`` decoded (all at once: for small splits)."""
        return self.x if self.decode is None else self.decode(self.x)


@dataclass
class DataBundle:
    """A dataset ready for training: three splits plus what is needed to build a model for it.

    Args:
        name: registry name.
        task: ``"classification"``, ``"regression"`` or ``"node_classification"``.
        train, val, test: the splits; ``val`` has 0 samples when built with ``val_size=0``.
        num_outputs: number of classes, or the regression output dimension.
        in_shape: per-sample input shape, e.g. ``(3, 32, 32)``; for graphs ``(num_node_features,)``.
        augment: batched train-time augmentation, applied by :class:`BatchLoader` only when asked.
        large_test: for a generated dataset, a second, large test set drawn from the generator
            with its own seed (``large_test=N`` option; docs/claims.md), so that a difference
            between two methods is not decided by the sampling noise of a small test split;
            ``None`` when not asked for.
    """

    name: str
    task: str
    train: Split
    val: Split
    test: Split
    num_outputs: int
    in_shape: tuple[int, ...]
    augment: Augment | None = None
    large_test: Split | None = None


@dataclass(frozen=True)
class DataShape:
    """What a model and a training schedule need of a dataset, without its data.

    Args:
        train: samples in the training split.
        in_shape: per-sample input shape, as in :class:`DataBundle`.
        num_outputs: number of classes, or the regression output dimension.
        task: as in :class:`DataBundle`.
    """

    train: int
    in_shape: tuple[int, ...]
    num_outputs: int
    task: str = "classification"

    @classmethod
    def of(cls, bundle: DataBundle) -> DataShape:
        return cls(len(bundle.train), bundle.in_shape, bundle.num_outputs, bundle.task)


def num_batches(samples: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one pass over ``samples`` (the last one smaller unless ``drop_last``)."""
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)


class BatchLoader:
    """Iterates ``(x, y)`` mini-batches of a :class:`Split` by indexing its tensors.

    With ``shuffle=True`` each ``__iter__`` call draws one
    ``torch.randperm(n, generator=generator)``, so the batch order is a function of the generator
    state alone. ``augment`` (if given) is applied to each batch of inputs after it is moved to
    ``device``, with the same generator; a split's ``decode`` (uint8 images to normalised floats)
    comes before it, on ``device`` too.

    Data on the device: when the whole split fits on ``device`` (:func:`fits_on_device`), it is
    copied there once (shared by every loader of the same split) and batches are cut there, so no
    batch crosses the bus. The random numbers are still drawn on the CPU from ``generator``, so the
    batches are those of a loader that moves each batch.

    Args:
        split: the data.
        batch_size: samples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: draw a new random order for every epoch.
        generator: random source of the order and the augmentation; ``None``: torch's global RNG.
        augment: batched augmentation ``(x, generator) -> x``, e.g. ``bundle.augment``.
        drop_last: skip the final incomplete batch.
        device: where batches are moved; ``None`` leaves them where the split lives.
        keep_on_device: hold the whole split on ``device``: ``None`` when it fits, ``True``
            always, ``False`` never (move each batch).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: Augment | None = None,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        keep_on_device: bool | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.augment = augment
        self.drop_last = drop_last
        self.device = device
        self.keep_on_device = keep_on_device

    def _source(self) -> Split:
        """The split to index: its copy on ``device`` when it is kept there, else itself."""
        if self.device is None or self.keep_on_device is False:
            return self.split
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        kept = (id(self.split), str(device)) in _ON_DEVICE  # copied before: no memory check again
        if self.keep_on_device or kept or fits_on_device(_nbytes(self.split), device):
            return on_device(self.split, device)
        return self.split

    def __len__(self) -> int:
        return num_batches(len(self.split), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        split = self._source()
        n = len(split)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(split.y.device)
        for b in range(len(self)):
            batch = split.subset(order[b * self.batch_size : (b + 1) * self.batch_size])
            x, y = batch.x, batch.y
            if self.device is not None:
                x = (
                    tuple(t.to(self.device) for t in x)
                    if isinstance(x, tuple)
                    else x.to(self.device)
                )
                y = y.to(self.device)
            if split.decode is not None:
                x = split.decode(x)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            yield x, y


def _nbytes(split: Split) -> int:
    return sum(t.numel() * t.element_size() for t in (*_tensors(split.x), split.y))


def fits_on_device(nbytes: int, device: torch.device, fraction: float = 0.25) -> bool:
    """Whether ``nbytes`` of data may stay on ``device``: on CUDA at most ``fraction`` of its
    free memory (the rest is the model's and the activations'); the CPU always."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= fraction * free
    return device.type == "cpu"


_ON_DEVICE: dict[tuple[int, str], Split] = {}


def on_device(split: Split, device: torch.device) -> Split:
    """``split`` copied to ``device``, once: the copy lives as long as ``split`` does."""
    key = (id(split), str(device))
    if key not in _ON_DEVICE:
        x = (
            tuple(t.to(device) for t in split.x)
            if isinstance(split.x, tuple)
            else split.x.to(device)
        )
        _ON_DEVICE[key] = Split(x, split.y.to(device), split.decode)
        weakref.finalize(split, _ON_DEVICE.pop, key, None)
    return _ON_DEVICE[key]


# --- helpers shared by the dataset modules -------------------------------------------------------

LARGE_TEST_SEED = 2018
"""The generator seed of every dataset's large test set (``large_test=N``), fixed in docs/claims.md
before any outcome; not a run seed, so the set is the same for every run."""


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (``high=None``: unbounded), else ``ValueError``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high)  # type: ignore[operator]
    if not ok:
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {expected}, got {value!r}")
    return value  # type: ignore[return-value]


def check_float(name: str, value: object, low: float, high: float | None = None) -> float:
    """``value`` as a float in ``[low, high]``, else ``ValueError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high)  # type: ignore[operator]
    if not ok:
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be a number {expected}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def seeded_generator(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed`` (a non-negative int)."""
    return torch.Generator().manual_seed(check_int("seed", seed, 0, 2**32 - 1))


def random_split(
    split: Split, sizes: tuple[int, ...], generator: torch.Generator
) -> tuple[Split, ...]:
    """Shuffle ``split`` with ``generator`` and cut it into consecutive parts of the given sizes.

    The last part takes whatever is left, so ``sizes`` has one entry fewer than the result.
    """
    order = torch.randperm(len(split), generator=generator)
    bounds = [0, *itertools.accumulate(sizes), len(split)]
    return tuple(split.subset(order[a:b]) for a, b in itertools.pairwise(bounds))


def fraction_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Validation and test sizes for fractions of ``n``; both must leave a non-empty train part."""
    check_float("val_fraction", val_fraction, 0.0, 1.0)
    check_float("test_fraction", test_fraction, 0.0, 1.0)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction + test_fraction must be < 1 to leave training data, "
            f"got {val_fraction} + {test_fraction}"
        )
    return round(n * val_fraction), round(n * test_fraction)
