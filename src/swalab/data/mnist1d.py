"""MNIST-1D (Greydanus 2020): ten 1D digit templates, randomly padded, shifted, sheared, noised.

The data are generated from code (REFERENCE.md §7): ``make_dataset(get_dataset_args())`` is
bit-identical to the published frozen file, so the package's download function is never called.
"""

from __future__ import annotations

import functools
import random

import numpy as np
import torch

from swalab.data.base import DATASETS, DataBundle, Split, check_int, random_split, seeded_generator

_TRAIN_SIZE = 4000


@functools.lru_cache(maxsize=1)
def _generate() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The published dataset (fixed internal seed 42): x [4000, 40], y, x_test [1000, 40], y_test.

    Cached, because generation takes about a second; the package reseeds Python's and NumPy's
    global RNGs, so their states are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


@DATASETS.register("mnist1d")
def mnist1d(
    *, root: str = "data", download: bool = False, seed: int = 0, val_size: int = 500
) -> DataBundle:
    """MNIST-1D: 4,000 train / 1,000 test sequences of length 40, 10 classes, generated from code.

    x is ``[N, 1, 40]`` float32 (the package centres and scales it to unit std). A validation
    split of ``val_size`` sequences is carved from the 4,000 training ones with ``seed``; the test
    split is always the published one. ``root`` and ``download`` are accepted for a uniform
    signature and unused (nothing is read from or written to disk).
    """
    check_int("val_size", val_size, 0, _TRAIN_SIZE - 1)
    x, y, x_test, y_test = _generate()

    def split(x: np.ndarray, y: np.ndarray) -> Split:
        return Split(
            torch.tensor(x, dtype=torch.float32).unsqueeze(1), torch.tensor(y, dtype=torch.long)
        )

    val, train = random_split(split(x, y), (val_size,), seeded_generator(seed))
    return DataBundle(
        "mnist1d",
        "classification",
        train,
        val,
        split(x_test, y_test),
        num_outputs=10,
        in_shape=(1, 40),
    )
