"""Synthetic regression: the 2D toy surface and Friedman's three benchmark functions.

Both come from the source documents' reproduction of SWA (REFERENCE.md §5): an MLP is fitted to
the 2D toy grid and to Friedman #1/#3; their test MSEs are quoted there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from swalab.data.base import (
    DATASETS,
    LARGE_TEST_SEED,
    DataBundle,
    Split,
    check_float,
    check_int,
    fraction_sizes,
    random_split,
    seeded_generator,
)

__all__ = ["toy2d_surface"]


def toy2d_surface(x: Tensor) -> Tensor:
    """The noise-free toy target ``2cos(π x1 x2) − 0.5 x1 + 0.08 x2 + sin(π x1) − sin(π x2)``.

    Args:
        x: points ``[N, 2]``.

    Returns:
        targets ``[N, 1]``.
    """
    x1, x2 = x[:, 0], x[:, 1]
    y = (
        2 * torch.cos(math.pi * x1 * x2)
        - 0.5 * x1
        + 0.08 * x2
        + torch.sin(math.pi * x1)
        - torch.sin(math.pi * x2)
    )
    return y.unsqueeze(1)


def _split_fractions(
    x: Tensor, y: Tensor, val_fraction: float, test_fraction: float, generator: torch.Generator
) -> tuple[Split, Split, Split]:
    """Random (train, val, test) split of ``(x, y)``; train gets what the two fractions leave."""
    n_val, n_test = fraction_sizes(len(y), val_fraction, test_fraction)
    val, test, train = random_split(Split(x, y), (n_val, n_test), generator)
    return train, val, test


@DATASETS.register("toy2d")
def toy2d(
    *,
    root: str = "data",
    download: bool = False,
    seed: int = 0,
    grid_size: int = 75,
    noise: float = 0.1,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    large_test: int = 0,
) -> DataBundle:
    """2D toy regression: 2cos(πx1x2) − 0.5x1 + 0.08x2 + sin(πx1) − sin(πx2) + 0.1ε, 75×75 grid.

    The grid covers [−2, 2]² (REFERENCE.md §5); ε ~ N(0, 1) and the random train/val/test split
    (70/10/20 by default) are both drawn from ``seed``. Inputs and targets are left unscaled.
    ``root`` and ``download`` are accepted for a uniform signature and unused.

    Args:
        grid_size: points per axis.
        noise: standard deviation of the additive Gaussian noise (0 gives the exact surface).
        val_fraction, test_fraction: shares of the grid held out.
        large_test: a second test set (``DataBundle.large_test``) of that many points drawn
            uniformly on [−2, 2]² with the same surface and noise, from ``LARGE_TEST_SEED``
            (0: none).
    """
    check_int("grid_size", grid_size, 2)
    check_int("large_test", large_test, 0)
    noise = check_float("noise", noise, 0.0)
    generator = seeded_generator(seed)
    axis = torch.linspace(-2.0, 2.0, grid_size)
    x = torch.cartesian_prod(axis, axis)  # [grid_size², 2], x1 varies slowest
    y = toy2d_surface(x) + noise * torch.randn(len(x), 1, generator=generator)
    train, val, test = _split_fractions(x, y, val_fraction, test_fraction, generator)
    large = None
    if large_test:
        fresh = seeded_generator(LARGE_TEST_SEED)
        x_large = 4.0 * torch.rand(large_test, 2, generator=fresh) - 2.0
        y_large = toy2d_surface(x_large) + noise * torch.randn(large_test, 1, generator=fresh)
        large = Split(x_large, y_large)
    return DataBundle(
        "toy2d", "regression", train, val, test, num_outputs=1, in_shape=(2,), large_test=large
    )


def _friedman(
    name: str,
    make: str,
    *,
    seed: int,
    n_samples: int,
    noise: float,
    standardize: bool,
    val_fraction: float,
    test_fraction: float,
    large_test: int = 0,
    **make_kwargs: int,
) -> DataBundle:
    """Sample ``sklearn.datasets.<make>``, split it, standardise with the training statistics.

    ``large_test``: a second test set of that many samples of the same function drawn with
    ``random_state=LARGE_TEST_SEED`` (``DataBundle.large_test``; 0: none), standardised as the others.
    """
    from sklearn import datasets

    check_int("n_samples", n_samples, 10)
    check_int("large_test", large_test, 0)
    noise = check_float("noise", noise, 0.0)
    generator = seeded_generator(seed)

    def sample(n: int, random_state: int) -> Split:
        x_np, y_np = getattr(datasets, make)(
            n_samples=n, noise=noise, random_state=random_state, **make_kwargs
        )
        x = torch.as_tensor(x_np, dtype=torch.float32)
        return Split(x, torch.as_tensor(y_np, dtype=torch.float32).unsqueeze(1))

    data = sample(n_samples, seed)
    train, val, test = _split_fractions(data.x, data.y, val_fraction, test_fraction, generator)
    large = sample(large_test, LARGE_TEST_SEED) if large_test else None
    if standardize:
        x_mean, x_std = train.x.mean(0), train.x.std(0)
        y_mean, y_std = train.y.mean(0), train.y.std(0)
        train, val, test, large = (
            None if s is None else Split((s.x - x_mean) / x_std, (s.y - y_mean) / y_std)
            for s in (train, val, test, large)
        )
    in_shape = (data.x.shape[1],)
    return DataBundle(
        name, "regression", train, val, test, num_outputs=1, in_shape=in_shape, large_test=large
    )


@DATASETS.register("friedman1")
def friedman1(
    *,
    root: str = "data",
    download: bool = False,
    seed: int = 0,
    n_samples: int = 10_000,
    n_features: int = 5,
    noise: float = 0.1,
    standardize: bool = True,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    large_test: int = 0,
) -> DataBundle:
    """Friedman #1, y = 10sin(πx0x1) + 20(x2−0.5)² + 10x3 + 5x4 + noise·ε (sklearn make_friedman1).

    10,000 samples of 5 features, noise 0.1 as in the source documents (REFERENCE.md §5); features
    beyond the fifth are pure distractors. Split randomly 70/10/20; inputs and targets are
    standardised with the training split's mean and std (``standardize=False`` keeps raw values).
    ``large_test``: a second test set of that many samples (``DataBundle.large_test``).
    """
    check_int("n_features", n_features, 5)
    return _friedman(
        "friedman1",
        "make_friedman1",
        seed=seed,
        n_samples=n_samples,
        noise=noise,
        standardize=standardize,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        large_test=large_test,
        n_features=n_features,
    )


@DATASETS.register("friedman2")
def friedman2(
    *,
    root: str = "data",
    download: bool = False,
    seed: int = 0,
    n_samples: int = 10_000,
    noise: float = 125.0,
    standardize: bool = True,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    large_test: int = 0,
) -> DataBundle:
    """Friedman #2, y = sqrt(x0² + (x1x2 − 1/(x1x3))²) + noise·ε (sklearn make_friedman2).

    10,000 samples of 4 features; noise std 125 gives Friedman's (1991) 3:1 signal-to-noise ratio.
    Split randomly 70/10/20; inputs and targets are standardised with the training split's mean and
    std (``standardize=False`` keeps raw values). ``large_test``: a second test set of that many
    samples (``DataBundle.large_test``, docs/claims.md).
    """
    return _friedman(
        "friedman2",
        "make_friedman2",
        seed=seed,
        n_samples=n_samples,
        noise=noise,
        standardize=standardize,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        large_test=large_test,
    )


@DATASETS.register("friedman3")
def friedman3(
    *,
    root: str = "data",
    download: bool = False,
    seed: int = 0,
    n_samples: int = 10_000,
    noise: float = 0.1,
    standardize: bool = True,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    large_test: int = 0,
) -> DataBundle:
    """Friedman #3, y = arctan((x1x2 − 1/(x1x3)) / x0) + noise·ε (sklearn make_friedman3).

    10,000 samples of 4 features; noise std 0.1 gives Friedman's (1991) 3:1 signal-to-noise ratio.
    Split randomly 70/10/20; inputs and targets are standardised with the training split's mean and
    std (``standardize=False`` keeps raw values). ``large_test``: a second test set of that many
    samples (``DataBundle.large_test``, docs/claims.md).
    """
    return _friedman(
        "friedman3",
        "make_friedman3",
        seed=seed,
        n_samples=n_samples,
        noise=noise,
        standardize=standardize,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        large_test=large_test,
    )
