"""What a run is built from: the experiment's data, its model, its training batches and the
batches that recompute BatchNorm statistics. Shared by the trainer, the runner and the report.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..data import BatchLoader, DataBundle, DataShape, shape_of
from ..data import load as load_data
from ..models import create as create_model
from .config import ConfigError, ExperimentConfig
from .distributed import World, shard_batches

__all__ = ["bn_loader", "build_model", "check_inputs", "data_shape", "load_bundle", "train_loader"]


def load_bundle(cfg: ExperimentConfig, seed: int, download: bool = False) -> DataBundle:
    """The experiment's dataset for ``seed``, cut to ``data.train_size``/``data.test_size``."""
    bundle = load_data(
        cfg.data.name, root=cfg.data.root, download=download, seed=seed, **cfg.data.options
    )
    if cfg.data.train_size is not None and cfg.data.train_size < len(bundle.train):
        keep = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed))[
            : cfg.data.train_size
        ]
        bundle = dataclasses.replace(bundle, train=bundle.train.subset(keep))
    if cfg.data.test_size is not None and cfg.data.test_size < len(bundle.test):
        bundle = dataclasses.replace(bundle, test=bundle.test.subset(slice(0, cfg.data.test_size)))
    return bundle


def data_shape(cfg: ExperimentConfig, seed: int = 0) -> DataShape:
    """The shape of ``load_bundle(cfg, seed)`` without its data where the dataset declares it (files
    such as CIFAR are not read): its training split cut to ``data.train_size``."""
    shape = shape_of(cfg.data.name, root=cfg.data.root, seed=seed, **cfg.data.options)
    if cfg.data.train_size is not None and cfg.data.train_size < shape.train:
        shape = dataclasses.replace(shape, train=cfg.data.train_size)
    return shape


def check_inputs(cfg: ExperimentConfig, download: bool = False) -> None:
    """Before any work: the dataset's options (``val_size``, ...) and, unless downloading, its files;
    then the model built on the ``meta`` device (no memory) for that data, so its options
    (``hidden``, ``activation``, a ``weights`` path) fail here, not after the data is loaded.

    Raises:
        ConfigError: one line naming the option (or the missing dataset) and what was expected.
    """
    from ..data import DATASETS

    builder = DATASETS.get(cfg.data.name)
    missing = getattr(builder, "missing", None)
    options = {"root": cfg.data.root, "download": download, **cfg.data.options}
    why = missing(options) if missing is not None else None
    if why:
        raise ConfigError(f"data.name {cfg.data.name!r}: {why}")
    try:
        shape = data_shape(cfg, cfg.seeds[0])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"data.options: {_first_line(err)}") from None
    weights = cfg.model.options.get("weights")
    if isinstance(weights, str) and not os.path.isfile(weights):
        raise ConfigError(f"model.options.weights: no file {weights}")
    try:
        with torch.device("meta"):
            build_model(cfg, shape)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise ConfigError(f"model.options: {_first_line(err)}") from None
    except RuntimeError:  # e.g. an operation the meta device lacks: the real build reports it
        pass


def _first_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text.splitlines()[0] if text.strip() else type(err).__name__


def build_model(
    cfg: ExperimentConfig, bundle: DataBundle | DataShape, seed: int | None = None
) -> nn.Module:
    """The experiment's model for ``bundle`` (or a :class:`DataShape`), initialised from ``seed``
    (global RNG) if given."""
    if seed is not None:
        torch.manual_seed(seed)
    return create_model(cfg.model.name, bundle.in_shape, bundle.num_outputs, **cfg.model.options)


def train_loader(
    cfg: ExperimentConfig,
    bundle: DataBundle,
    seed: int,
    device: torch.device,
    world: World = World(),
) -> tuple[Any, torch.Generator]:
    """Training batches in the order of a generator seeded by ``seed``, and that generator (it is
    checkpointed); under DDP every rank draws the same global batches and takes its slice of each."""
    generator = torch.Generator().manual_seed(seed)
    return shard_batches(
        BatchLoader(
            bundle.train,
            cfg.train.batch_size,
            shuffle=True,
            generator=generator,
            augment=bundle.augment if cfg.train.augment else None,
            device=device,
        ),
        world,
    ), generator


def bn_loader(
    cfg: ExperimentConfig,
    bundle: DataBundle,
    seed: int,
    device: torch.device | None,
    world: World = World(),
) -> Iterable[Any]:
    """The training data pass that recomputes BatchNorm statistics of a run's averaged models.

    Seeded per run (so a resumed run and ``swalab landscape`` repeat it exactly); under DDP whole
    global batches are dealt round-robin to the ranks.
    """
    train = cfg.train
    loader = BatchLoader(
        bundle.train,
        train.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(20_000 + seed),
        augment=bundle.augment if train.augment else None,
        device=device,
    )
    return shard_batches(loader, world, whole_batches=True, max_batches=train.bn_batches)
