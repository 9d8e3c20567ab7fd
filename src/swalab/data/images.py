"""MNIST, CIFAR-10 and CIFAR-100 read through torchvision and held in memory as uint8 images.

Each batch is normalised where it is (:func:`normalize_images`, the splits' ``decode``): on the
training device when the images are kept there (CIFAR's 45,000-50,000 training images: 150 MB as
uint8 against 600 MB as fp32), into the same values, bit for bit, as images normalised up front.

Files are read from ``root`` in torchvision's own layout (``root/MNIST/raw/``,
``root/cifar-10-batches-py/``, ``root/cifar-100-python/``) and fetched only with ``download=True``.
The SWA paper's train-time augmentation (REFERENCE.md §1: RandomCrop(32, padding 4) + horizontal
flip) is reimplemented on whole batches by :func:`random_crop_flip`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from swalab.data.base import (
    DATASETS,
    DataBundle,
    DatasetUnavailable,
    DataShape,
    Split,
    check_int,
    random_split,
    seeded_generator,
)

__all__ = ["NORMALIZATION", "normalize_images", "random_crop_flip"]

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "resnet": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # PreResNet / WRN, REFERENCE §1
    "vgg": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # VGG, REFERENCE §1
    "mnist": ((0.1307,), (0.3081,)),
}
"""Per-channel (mean, std) of pixels in [0, 1]."""

_FILES: dict[str, tuple[int, tuple[int, ...], int]] = {
    "mnist": (60_000, (1, 28, 28), 10),
    "cifar10": (50_000, (3, 32, 32), 10),
    "cifar100": (50_000, (3, 32, 32), 100),
}
"""Training images (before ``val_size`` is carved off), image shape and classes of each dataset."""
_FOLDERS: dict[str, tuple[str, str]] = {
    "mnist": ("MNIST", os.path.join("MNIST", "raw")),
    "cifar10": ("CIFAR-10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR-100", "cifar-100-python"),
}
"""The title and the folder under ``root`` torchvision reads each dataset from."""


def _declares_shape(name: str) -> Callable[[Callable[..., DataBundle]], Callable[..., DataBundle]]:
    """Give the builder of ``name`` its ``shape(options)`` (``data.shape_of``): no file is read."""
    images, in_shape, classes = _FILES[name]

    def shape(options: dict[str, Any]) -> DataShape:
        val_size = check_int("val_size", options["val_size"], 0, images - 1)
        if "normalization" in options:
            _check_cifar_normalization(options["normalization"])
        return DataShape(images - val_size, in_shape, classes)

    def missing(options: dict[str, Any]) -> str | None:
        """Why the dataset cannot be read without downloading it, or None (checked before a run
        starts: not after hours of another dataset's work)."""
        title, folder = _FOLDERS[name]
        path = os.path.join(options.get("root", "data"), folder)
        if options.get("download") or os.path.isdir(path):
            return None
        return f"{title} not found in {path}; run with --download to fetch it"

    def mark(builder: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        builder.shape = shape  # type: ignore[attr-defined]
        builder.missing = missing  # type: ignore[attr-defined]
        return builder

    return mark


def random_crop_flip(
    x: Tensor, generator: torch.Generator | None, padding: int, flip: bool, fill: Tensor
) -> Tensor:
    """Batched ``RandomCrop(size, padding)`` (+ ``RandomHorizontalFlip``), one draw per image.

    Each image of ``x [B, C, H, W]`` is padded by ``padding`` pixels of the per-channel value
    ``fill [C]`` on every side, and an ``H × W`` window at a uniformly random offset in
    ``[0, 2·padding]²`` is cut out; then, with probability 1/2, it is mirrored left-right.
    Random numbers are drawn on the CPU from ``generator`` so results do not depend on the device.
    """
    b, c, h, w = x.shape
    if padding > 0:
        padded = fill.to(x).view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = x
        top = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        left = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
        cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, channel, rows, cols]  # [B, C, H, W]
    if flip:
        mirror = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x


def _augmentation(
    normalization: str, padding: int, flip: bool
) -> Callable[[Tensor, torch.Generator | None], Tensor]:
    """Crop (+ flip) of normalised images, padding with normalised black.

    The reference code crops the raw image before ``Normalize``, so its padding is black pixels.
    """
    mean, std = (torch.tensor(v) for v in NORMALIZATION[normalization])
    return functools.partial(random_crop_flip, padding=padding, flip=flip, fill=-mean / std)


def _read(
    dataset_cls: type, title: str, folder: str, root: str, download: bool, train: bool
) -> Split:
    """One torchvision split as uint8 ``[N, C, H, W]`` images and long labels."""
    try:
        dataset = dataset_cls(root, train=train, download=download)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted. ..."
        if "not found" not in str(error):
            raise
        path = os.path.join(root, folder)
        raise DatasetUnavailable(
            f"{title} not found (or corrupted) in {path}; run with --download to fetch it"
        ) from error
    images = torch.as_tensor(dataset.data)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)  # NHWC
    return Split(images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long))


def normalize_images(x: Tensor, normalization: str) -> Tensor:
    """uint8 images ``[B, C, H, W]`` to floats ``(x / 255 - mean) / std`` per channel, where
    ``x`` is (a split's ``decode``: the images stay uint8 in memory, a quarter of fp32's)."""
    if x.dtype != torch.uint8:  # .float() would be x itself, normalised in place
        raise ValueError(f"normalize_images expects uint8 images, got {x.dtype}")
    mean, std = _statistics(normalization, x.device)
    return x.float().div_(255).sub_(mean).div_(std)


@functools.lru_cache(maxsize=16)
def _statistics(normalization: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """``NORMALIZATION[normalization]`` as ``[1, C, 1, 1]`` tensors on ``device``, made once."""
    mean, std = NORMALIZATION[normalization]
    return tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))


def _normalise(split: Split, normalization: str) -> Split:
    return Split(split.x, split.y, functools.partial(normalize_images, normalization=normalization))


def _image_bundle(
    name: str,
    dataset_cls: type,
    title: str,
    folder: str,
    *,
    root: str,
    download: bool,
    seed: int,
    val_size: int,
    normalization: str,
    padding: int,
    flip: bool,
) -> DataBundle:
    """Read both torchvision splits, carve ``val_size`` training images off, normalise."""
    generator = seeded_generator(seed)
    check_int("val_size", val_size, 0)
    train_full = _read(dataset_cls, title, folder, root, download, train=True)
    test = _read(dataset_cls, title, folder, root, download, train=False)
    check_int("val_size", val_size, 0, len(train_full) - 1)
    val, train = random_split(train_full, (val_size,), generator)
    train, val, test = (_normalise(s, normalization) for s in (train, val, test))
    return DataBundle(
        name,
        "classification",
        train,
        val,
        test,
        num_outputs=_FILES[name][2],
        in_shape=tuple(train.x.shape[1:]),
        augment=_augmentation(normalization, padding, flip),
    )


def _check_cifar_normalization(normalization: str) -> None:
    if normalization not in ("resnet", "vgg"):
        raise ValueError(f"normalization must be 'resnet' or 'vgg', got {normalization!r}")


@DATASETS.register("mnist")
@_declares_shape("mnist")
def mnist(
    *, root: str = "data", download: bool = False, seed: int = 0, val_size: int = 5000
) -> DataBundle:
    """MNIST via torchvision: 60,000 train (minus val_size) / 10,000 test, 1×28×28, normalised.

    Pixels are normalised with mean 0.1307 and std 0.3081. ``augment`` is a random 28×28 crop of the
    image zero-padded (in pixel space) by 2, without flips, since mirrored digits change meaning.
    """
    from torchvision.datasets import MNIST

    return _image_bundle(
        "mnist",
        MNIST,
        "MNIST",
        os.path.join("MNIST", "raw"),
        root=root,
        download=download,
        seed=seed,
        val_size=val_size,
        normalization="mnist",
        padding=2,
        flip=False,
    )


@DATASETS.register("cifar10")
@_declares_shape("cifar10")
def cifar10(
    *,
    root: str = "data",
    download: bool = False,
    seed: int = 0,
    val_size: int = 5000,
    normalization: str = "resnet",
) -> DataBundle:
    """CIFAR-10 via torchvision: 50,000 train (minus val_size) / 10,000 test, 3×32×32, normalised.

    ``normalization`` picks the SWA reference code's constants (REFERENCE.md §1): ``"resnet"``
    (PreResNet/WRN) or ``"vgg"``. ``augment`` is RandomCrop(32, padding 4) + horizontal flip.
    """
    _check_cifar_normalization(normalization)
    from torchvision.datasets import CIFAR10

    return _image_bundle(
        "cifar10",
        CIFAR10,
        "CIFAR-10",
        "cifar-10-batches-py",
        root=root,
        download=download,
        seed=seed,
        val_size=val_size,
        normalization=normalization,
        padding=4,
        flip=True,
    )


@DATASETS.register("cifar100")
@_declares_shape("cifar100")
def cifar100(
    *,
    root: str = "data",
    download: bool = False,
    seed: int = 0,
    val_size: int = 5000,
    normalization: str = "resnet",
) -> DataBundle:
    """CIFAR-100 via torchvision: 50,000 train (minus val_size) / 10,000 test, 3×32×32, normalised.

    Fine labels (100 classes). ``normalization`` picks the SWA reference code's constants
    (REFERENCE.md §1): ``"resnet"`` or ``"vgg"``. ``augment`` is RandomCrop(32, padding 4) + flip.
    """
    _check_cifar_normalization(normalization)
    from torchvision.datasets import CIFAR100

    return _image_bundle(
        "cifar100",
        CIFAR100,
        "CIFAR-100",
        "cifar-100-python",
        root=root,
        download=download,
        seed=seed,
        val_size=val_size,
        normalization=normalization,
        padding=4,
        flip=True,
    )
