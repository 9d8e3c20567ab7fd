"""``swalab plan``: the epochs an experiment will train, per seed, with and without shared
trajectories (``sharing.py``), and the wall time they take here, from timing a few training steps.

No data is read: the model trains on random batches of the data's shape (``inputs.data_shape``),
and the steps per epoch come from the size of the training split and ``train.batch_size``. The
estimate counts training steps only (evaluation, BatchNorm recomputation and batch preparation
come on top), at the precision, memory format and compilation the config asks for.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import DataShape
from ..data.base import num_batches
from .config import ExperimentConfig
from .devices import resolve_device
from .distributed import World
from .errors import ConfigError
from .inputs import build_model, data_shape
from .precision import Precision
from .rundir import RunDirectory
from .runner import plan_runs
from .sharing import trained_epochs
from .task import task_of
from .trainer import make_optimizer, train_one_epoch

__all__ = ["ExperimentPlan", "SeedPlan", "plan_experiment", "random_batch", "step_seconds"]


@dataclass
class SeedPlan:
    """Epochs one seed trains: runs left to train, with shared trajectories and without."""

    seed: int
    runs: int
    shared: int
    separate: int


@dataclass
class ExperimentPlan:
    """What ``plan_experiment`` found: the epochs per seed and the time of one training step."""

    name: str
    device: torch.device
    shape: DataShape
    steps_per_epoch: int
    step_seconds: float
    timed_steps: int
    seeds: list[SeedPlan]

    def seconds(self, epochs: int) -> float:
        """Estimated wall time of training ``epochs`` epochs."""
        return epochs * self.steps_per_epoch * self.step_seconds

    def format(self, cfg: ExperimentConfig) -> str:
        t = cfg.train
        how = [t.precision, *(["channels_last"] if t.channels_last else [])]
        how += ["compiled"] if t.compile else []
        total = SeedPlan(
            -1, *(sum(getattr(s, k) for s in self.seeds) for k in ("runs", "shared", "separate"))
        )
        lines = [
            f"{self.name}: {len(cfg.seeds)} seed(s) x {len(cfg.methods)} method(s); "
            f"{self.shape.train} training samples, batch {t.batch_size}: "
            f"{self.steps_per_epoch} steps per epoch",
            f"one training step of {cfg.model.name} ({', '.join(how)}) on {self.device}: "
            f"{self.step_seconds * 1000:.1f} ms ({self._timing()}), "
            f"{_duration(self.seconds(1))} per epoch",
            "",
            f"{'seed':>6} {'runs left':>9} {'epochs shared':>14} {'epochs separate':>16} "
            f"{'time shared':>12} {'time separate':>14}",
        ]
        for s in [*self.seeds, total]:
            lines.append(
                f"{'all' if s is total else s.seed:>6} {s.runs:>9} {s.shared:>14} "
                f"{s.separate:>16} {_duration(self.seconds(s.shared)):>12} "
                f"{_duration(self.seconds(s.separate)):>14}"
            )
        fewer = f", {total.separate / total.shared:.2f}x the epochs" if total.shared else ""
        lines += [
            "",
            f"estimated: {_duration(self.seconds(total.shared))} with shared trajectories, "
            f"{_duration(self.seconds(total.separate))} without (--no-share{fewer}); training "
            "steps only (evaluation, BN recomputation and batches on top), one job at a time",
        ]
        return "\n".join(lines)

    def _timing(self) -> str:
        if self.timed_steps == 0:
            return "one step, the warm-up: an upper bound"
        return f"median of {self.timed_steps} after a warm-up"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def random_batch(shape: DataShape, batch_size: int, device: torch.device) -> tuple[Any, Any]:
    """A batch of random inputs and targets of ``shape`` on ``device``."""
    x = torch.randn(batch_size, *shape.in_shape, device=device)
    if shape.task == "classification":
        return x, torch.randint(0, shape.num_outputs, (batch_size,), device=device)
    if shape.task == "regression":
        return x, torch.randn(batch_size, shape.num_outputs, device=device)
    raise ConfigError(
        f"swalab plan times models on random tensors: task {shape.task!r} (graphs) has no "
        "batch shape to draw; expected classification or regression data"
    )


def step_seconds(
    cfg: ExperimentConfig,
    shape: DataShape,
    device: torch.device,
    repeats: int = 5,
    warmup: int = 1,
    budget: float = 20.0,
) -> tuple[float, int]:
    """Median seconds of one training step (forward, loss, backward, optimizer step) of the
    experiment's model at ``train.batch_size`` on a random batch, after ``warmup`` steps, and how
    many steps it is the median of: ``repeats``, or fewer once the timed steps took ``budget``
    seconds; 0 when a warm-up step alone took that long (a Table 1 model on a CPU: minutes per
    step) and is the estimate itself, uncompiled (compiling makes a first step far slower).
    Through the lab's own step (``trainer.train_one_epoch``), so precision, channels_last and
    compile are those of a run."""
    train = cfg.train
    precision = Precision(train.precision, train.channels_last, device, train.compile)
    model = precision.model(build_model(cfg, shape, seed=0).to(device))
    optimizer = make_optimizer(train.optimizer, model, train.lr, train.momentum, train.weight_decay)
    loss = task_of(shape.task).loss
    batch = [random_batch(shape, train.batch_size, device)]
    net = precision.compiled(model)
    times: list[float] = []
    for i in range(warmup + repeats):
        _synchronize(device)
        start = time.perf_counter()
        total = train_one_epoch(
            model, net, batch, optimizer, loss, lambda step: train.lr, World(), precision
        )
        total.item()  # waits for the device
        seconds = time.perf_counter() - start
        if i < warmup and seconds >= budget and not train.compile:
            return seconds, 0
        if i >= warmup:
            times.append(seconds)
            if sum(times) >= budget:
                break
    return statistics.median(times), len(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plan_experiment(
    cfg: ExperimentConfig,
    out: Path,
    device: torch.device | None = None,
    repeats: int = 5,
    log: Callable[[str], None] = lambda _: None,
) -> ExperimentPlan:
    """The plan of ``cfg`` run into ``out``: per seed, the epochs left to train (from where each
    run stands in ``out``: finished runs drop out, unfinished ones resume; all of them when ``out``
    does not exist) with and without shared trajectories (``runner.plan_runs``), and the seconds of
    one training step on ``device`` (default ``train.device``). Pre-training epochs count in both
    columns where a seed has runs left and no cached pre-training."""
    device = device or resolve_device(cfg.train.device, "train.device")
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    shape = data_shape(cfg, cfg.seeds[0])
    random_batch(shape, 1, torch.device("cpu"))  # data it can draw, before any work
    steps = num_batches(shape.train, cfg.train.batch_size)
    layout = RunDirectory(out)
    runs = [(seed, m) for seed in cfg.seeds for m in cfg.methods]
    todo = [(s, m) for s, m in runs if layout.run(m.label, s).result() is None]
    shared, separate = (plan_runs(cfg, todo, layout, steps, share) for share in (True, False))
    seeds = []
    for seed in cfg.seeds:
        roots = separate.get(seed, [])  # one per run left (diverged runs are not retried)
        pretrain = cfg.pretrain.epochs
        if not roots or layout.pretrain_path(seed).exists():
            pretrain = 0
        seeds.append(
            SeedPlan(
                seed,
                len(roots),
                pretrain + trained_epochs(shared.get(seed, [])),
                pretrain + trained_epochs(roots),
            )
        )
    # timing a large model's steps on a CPU takes minutes: say so first (bad input failed above)
    log(
        f"{cfg.name}: timing {repeats} training steps of {cfg.model.name} "
        f"(batch {cfg.train.batch_size}) on {device} for the estimate..."
    )
    seconds, timed = step_seconds(cfg, shape, device, repeats)
    return ExperimentPlan(cfg.name, device, shape, steps, seconds, timed, seeds)
