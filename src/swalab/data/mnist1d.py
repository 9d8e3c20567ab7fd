"""MNIST-1D (Greydanus 2020): ten 1D digit templates, randomly padded, shifted, sheared, noised.

The data are generated from code (REFERENCE.md §7): ``make_dataset(get_dataset_args())`` is
bit-identical to the published frozen file, so the package's download function is never called.
Generation takes seconds, so the arrays are kept under ``root`` and read from there next time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import secrets
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from swalab.data.base import (
    DATASETS,
    LARGE_TEST_SEED,
    DataBundle,
    Split,
    check_int,
    random_split,
    seeded_generator,
)

_TRAIN_SIZE = 4000
_ARRAYS = ("x", "y", "x_test", "y_test")


@functools.lru_cache(maxsize=1)
def _generate(root: str) -> tuple[np.ndarray, ...]:
    """The published dataset (fixed internal seed 42): x [4000, 40], y, x_test [1000, 40], y_test.

    Read from ``root/mnist1d/generated-<package version>.npz`` if it is there and whole; else
    generated (the package reseeds Python's and NumPy's global RNGs: their states are restored)
    and written there through a temporary file and a rename (skipped where ``root`` cannot be
    written). Cached in the process.
    """
    path = Path(root) / "mnist1d" / f"generated-{version('mnist1d')}.npz"
    with contextlib.suppress(OSError, ValueError, KeyError, zipfile.BadZipFile):
        with np.load(path) as stored:
            return tuple(stored[name] for name in _ARRAYS)
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = tuple(data[name] for name in _ARRAYS)
    _save_arrays(path, dict(zip(_ARRAYS, arrays)))
    return arrays


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` to ``path`` through a temporary file and a rename; skipped where ``path`` cannot be
    written (a read-only root: generated again next time)."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


@functools.lru_cache(maxsize=2)
def _generate_large(root: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` fresh sequences from MNIST-1D's own generator: its published arguments with
    ``num_samples=size`` and ``seed=LARGE_TEST_SEED``, all kept as test. The package normalises a
    dataset by its own mean and std. Cached under ``root`` and in the process as
    :func:`_generate`."""
    path = Path(root) / "mnist1d" / f"large-test-{LARGE_TEST_SEED}-{size}-{version('mnist1d')}.npz"
    with contextlib.suppress(OSError, ValueError, KeyError, zipfile.BadZipFile):
        with np.load(path) as stored:
            return stored["x"], stored["y"]
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = size, LARGE_TEST_SEED, 0.0
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x, y = data["x_test"], data["y_test"]
    _save_arrays(path, {"x": x, "y": y})
    return x, y


@DATASETS.register("mnist1d")
def mnist1d(
    *,
    root: str = "data",
    download: bool = False,
    seed: int = 0,
    val_size: int = 500,
    large_test: int = 0,
) -> DataBundle:
    """MNIST-1D: 4,000 train / 1,000 test sequences of length 40, 10 classes, generated from code.

    x is ``[N, 1, 40]`` float32 (the package centres and scales it to unit std). A validation
    split of ``val_size`` sequences is carved from the 4,000 training ones with ``seed``; the test
    split is always the published one. ``large_test``: that many fresh sequences from the
    package's generator with its own seed (``DataBundle.large_test``; 0: none); 10 classes of
    equal size, so a multiple of 10. The generated arrays are kept under ``root``; ``download`` is
    accepted for a uniform signature and unused.
    """
    check_int("val_size", val_size, 0, _TRAIN_SIZE - 1)
    check_int("large_test", large_test, 0)
    if large_test % 10:
        raise ValueError(f"large_test must be a multiple of 10 (10 classes), got {large_test}")
    x, y, x_test, y_test = _generate(str(root))

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
        large_test=split(*_generate_large(str(root), large_test)) if large_test else None,
    )
