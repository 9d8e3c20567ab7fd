"""scikit-learn's handwritten digits: 1,797 8×8 grey images of 10 classes, shipped with sklearn."""

from __future__ import annotations

import torch

from swalab.data.base import (
    DATASETS,
    DataBundle,
    Split,
    fraction_sizes,
    random_split,
    seeded_generator,
)


@DATASETS.register("digits")
def digits(
    *,
    root: str = "data",
    download: bool = False,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> DataBundle:
    """sklearn digits: 1,797 8×8 images, 10 classes, pixels scaled to [0, 1], seeded 70/10/20 split.

    x is ``[N, 1, 8, 8]`` float32 (``load_digits`` pixels are 0..16, divided by 16). No file is
    read: the data ship with scikit-learn, so ``root`` and ``download`` are unused.
    """
    from sklearn.datasets import load_digits

    images, targets = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(targets, dtype=torch.long)
    n_val, n_test = fraction_sizes(len(y), val_fraction, test_fraction)
    val, test, train = random_split(Split(x, y), (n_val, n_test), seeded_generator(seed))
    return DataBundle(
        "digits", "classification", train, val, test, num_outputs=10, in_shape=(1, 8, 8)
    )
