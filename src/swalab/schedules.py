"""Learning-rate schedules of the SWA and FGE papers as pure functions, and one optimizer adapter.

Every schedule is validated when built and returns a function of the step (an epoch, a 1-based
iteration or a fractional epoch, as each docstring says) that gives the learning rate::

    schedule = swa_reference_lr(lr_init=0.05, swa_start=161, swa_lr=0.01)
    set_lr(optimizer, schedule(epoch))

``ScheduleLR`` wraps a schedule as a ``torch.optim.lr_scheduler.LRScheduler``; ``SWALR`` is
``torch.optim.swa_utils.SWALR`` itself, so a torch script keeps its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import SWALR

__all__ = [
    "Schedule",
    "constant_lr",
    "sgd_reference_lr",
    "swa_reference_lr",
    "cyclic_lr",
    "fge_lr",
    "swa_should_average",
    "set_lr",
    "ScheduleLR",
    "SWALR",
]

Schedule = Callable[[float], float]


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value}")


def _positive_int(name: str, value: int) -> None:
    if not (isinstance(value, int) and value > 0):
        raise ValueError(f"{name} must be a positive integer, got {value}")


def constant_lr(lr: float) -> Schedule:
    """The same learning rate at every step."""
    _positive("lr", lr)
    return lambda step: lr


def _reference_factor(t: float, lr_ratio: float) -> float:
    """timgaripov/swa ``train.py``: 1 for t <= 0.5, linear to ``lr_ratio`` at t = 0.9, then flat."""
    if t <= 0.5:
        return 1.0
    if t <= 0.9:
        return 1.0 - (1.0 - lr_ratio) * (t - 0.5) / 0.4
    return lr_ratio


def sgd_reference_lr(lr_init: float, epochs: int) -> Schedule:
    """The paper's conventional SGD schedule, per 0-based epoch (Izmailov et al., 2018, §5.1).

    ``lr_init`` for the first half of the budget, linear decay to ``0.01 * lr_init`` at 90%, flat after.
    """
    _positive("lr_init", lr_init)
    _positive_int("epochs", epochs)
    return lambda epoch: lr_init * _reference_factor(epoch / epochs, 0.01)


def swa_reference_lr(
    lr_init: float, swa_start: int, swa_lr: float, epochs: int | None = None
) -> Schedule:
    """The paper's SWA schedule, per 0-based epoch: the SGD shape scaled to ``swa_start``, ending at ``swa_lr``.

    Args:
        lr_init: initial learning rate (> 0).
        swa_start: epoch (1-based, as in the reference code) from which models are averaged.
        swa_lr: the constant learning rate of the averaging phase (> 0).
        epochs: the run's length, to check that averaging starts within it.
    """
    _positive("lr_init", lr_init)
    _positive("swa_lr", swa_lr)
    _positive_int("swa_start", swa_start)
    if epochs is not None:
        _positive_int("epochs", epochs)
        if swa_start > epochs:
            raise ValueError(f"swa_start must be <= epochs ({epochs}), got {swa_start}")
    return lambda epoch: lr_init * _reference_factor(epoch / swa_start, swa_lr / lr_init)


def cyclic_lr(a1: float, a2: float, cycle: int) -> Schedule:
    """Algorithm 1's cyclical schedule, per 1-based iteration i (Izmailov et al., 2018, eq. 1).

    ``t(i) = (((i - 1) mod c) + 1) / c``, ``lr = (1 - t) a1 + t a2``: from near ``a1`` down to ``a2``
    at the end of each cycle, where a model is collected.
    """
    _positive("a1", a1)
    _positive("a2", a2)
    _positive_int("cycle", cycle)

    def schedule(i: float) -> float:
        if i < 1:
            raise ValueError(f"iteration must be >= 1 (1-based), got {i}")
        t = (((int(i) - 1) % cycle) + 1) / cycle
        return (1 - t) * a1 + t * a2

    return schedule


def fge_lr(a1: float, a2: float, cycle: int) -> Schedule:
    """FGE's triangular cycle (Garipov et al., 2018), per fractional epoch ``epoch + u``, u in [0, 1).

    ``t = ((epoch % cycle) + u) / cycle``; ``a1 -> a2`` over the first half, ``a2 -> a1`` over the second.
    """
    _positive("a1", a1)
    _positive("a2", a2)
    _positive_int("cycle", cycle)

    def schedule(epoch: float) -> float:
        whole = math.floor(epoch)
        t = ((whole % cycle) + (epoch - whole)) / cycle
        if t < 0.5:
            return a1 * (1 - 2 * t) + a2 * 2 * t
        return a1 * (2 * t - 1) + a2 * (2 - 2 * t)

    return schedule


def swa_should_average(epoch: int, swa_start: int, every: int = 1) -> bool:
    """Whether the model is folded into the average after 0-based ``epoch`` (timgaripov/swa)."""
    return epoch + 1 >= swa_start and (epoch + 1 - swa_start) % every == 0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group of ``optimizer``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class ScheduleLR(LRScheduler):
    """Drives an optimizer with a swalab schedule, as a ``torch.optim`` LR scheduler.

    ``step()`` advances the step counter ``last_epoch`` (0, 1, 2, ...) and sets every group's
    learning rate to ``schedule(last_epoch + offset)``; use ``offset=1`` for 1-based schedules
    such as :func:`cyclic_lr`. It refuses to take over an optimizer that another LR scheduler
    already drives (it has ``initial_lr`` in its groups) unless ``replace=True``: a schedule never
    silently replaces the user's own.

    Example:
        >>> scheduler = ScheduleLR(optimizer, sgd_reference_lr(0.1, epochs=150))
        >>> for epoch in range(150):
        ...     train_one_epoch(); scheduler.step()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        offset: int = 0,
        last_epoch: int = -1,
        replace: bool = False,
    ) -> None:
        if (
            last_epoch == -1
            and not replace
            and any("initial_lr" in g for g in optimizer.param_groups)
        ):
            raise ValueError(
                "optimizer is already driven by an LR scheduler (its groups have 'initial_lr'); "
                "pass replace=True to hand it over to this schedule"
            )
        self.schedule = schedule
        self.offset = offset
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [self.schedule(self.last_epoch + self.offset)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}
