"""Training recipes: how each method sets the learning rate and what it averages or collects.

A recipe reads like the paper's pseudocode: ``lr(epoch, step)`` before every optimizer step,
``after_step`` after it, ``after_epoch`` at the end of each epoch, and ``predictor`` builds what is
evaluated at the end. Paper variants (budgets, constant or cyclic LR) are config options, not
new classes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..averaging import EMA, SWA, AveragedModel, restart_from_average
from ..bn import has_batchnorm
from ..data import Split
from ..ensembles import (
    FGE,
    ensemble_predict,
    fge_should_collect,
    greedy_soup,
    uniform_soup,
    weighted_soup,
)
from ..registry import Registry
from ..schedules import (
    constant_lr,
    cyclic_lr,
    fge_lr,
    sgd_reference_lr,
    swa_reference_lr,
    swa_should_average,
)
from ..swag import SWAG, bma_predict
from .evaluation import EvalContext, evaluate, joint_predictions, model_outputs, predict

__all__ = [
    "METHODS",
    "Recipe",
    "build_recipe",
    "method_role",
    "recipe_of",
    "run_epochs",
]

METHODS = Registry("method")

# What a method is to the report and the statistics, declared by its builder (``_role``): the
# paired baseline of every table ("baseline"), the average the landscape compares with it
# ("average"), or an ensemble of predictions ("ensemble").
ROLES = ("baseline", "average", "ensemble")


def _role(role: str) -> Callable[[Callable[..., Recipe]], Callable[..., Recipe]]:
    def mark(builder: Callable[..., Recipe]) -> Callable[..., Recipe]:
        builder.role = role  # type: ignore[attr-defined]
        return builder

    return mark


def method_role(method: str) -> str | None:
    """The role ``method`` declares (one of ``ROLES``), or None."""
    return getattr(METHODS.get(method), "role", None) if method in METHODS else None


def run_epochs(budget: float, budget_epochs: int) -> int:
    """Length of a run at ``budget`` times the budget B: ``floor(budget * B + 0.5)``, at least 1."""
    return max(1, math.floor(budget * budget_epochs + 0.5))


class Recipe:
    """Plain SGD with a given per-epoch or per-step schedule; the base of every recipe.

    Args:
        epochs: length of this method's run.
        steps_per_epoch: optimizer steps in one epoch.
    """

    def __init__(
        self, epochs: int, steps_per_epoch: int, schedule: Callable[[int, int], float]
    ) -> None:
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self._schedule = schedule

    def lr(self, epoch: int, step: int) -> float:
        return self._schedule(epoch, step)

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step."""

    def after_epoch(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called at the end of every 0-based ``epoch``."""

    def final_model(self, model: nn.Module) -> nn.Module:
        """The single model this method hands in (before any BN recomputation)."""
        return model

    def running_model(self, model: nn.Module) -> nn.Module | None:
        """The model behind the method's learning curve besides the iterate (e.g. the running average)."""
        return None

    def averaged_epochs(self) -> list[int]:
        """1-based epochs whose end-of-epoch weights the final model averages with equal weights
        (empty when the final model is not such an average)."""
        return []

    def predict(
        self, model: nn.Module, splits: dict[str, Split], ctx: EvalContext
    ) -> dict[str, Tensor]:
        """Final outputs on each split; an averaged model gets its BatchNorm statistics recomputed first."""
        final = self.final_model(model)
        if final is not model and has_batchnorm(final):
            ctx.recompute_bn(final)
        return predict(final, splits, ctx)

    def final_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Weights of the final model, on the CPU (``final.pt`` of a run)."""
        return {k: v.detach().cpu() for k, v in self.final_model(model).state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def iterate_plan(self, epoch: int) -> tuple[Any, ...]:
        """How the recipe moves the trained weights in 0-based ``epoch``: the LR of every step, and
        (in subclasses) what replaces them at the end (a restart), else None. What it averages or
        collects is not part of it. Runs whose plans agree on an epoch train it identically
        (shared trajectories, sharing.py)."""
        return (tuple(self.lr(epoch, s) for s in range(self.steps_per_epoch)), None)


class RunSpec(NamedTuple):
    """What every recipe is built from: the run's shape and the model it trains."""

    lr: float  # initial learning rate
    budget_epochs: int  # the budget B (train.epochs)
    epochs: int  # this run's length: round(budget * B)
    steps_per_epoch: int
    model: nn.Module


def _per_epoch(schedule: Callable[[float], float]) -> Callable[[int, int], float]:
    return lambda epoch, step: schedule(epoch)


def _check(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@METHODS.register("sgd")
@_role("baseline")
def sgd(
    run: RunSpec,
    *,
    schedule: str = "reference",
    step_every: int = 5,
    step_factor: float = 4.0,
) -> Recipe:
    """SGD: the paper's 50%/90% schedule, a constant LR, or step decay every `step_every` iterations."""
    if schedule == "reference":
        return Recipe(
            run.epochs, run.steps_per_epoch, _per_epoch(sgd_reference_lr(run.lr, run.epochs))
        )
    if schedule == "constant":
        return Recipe(run.epochs, run.steps_per_epoch, _per_epoch(constant_lr(run.lr)))
    if schedule == "step":
        _check(
            "step_every",
            step_every,
            isinstance(step_every, int) and step_every > 0,
            "a positive integer",
        )
        _check("step_factor", step_factor, step_factor >= 1, ">= 1")
        return Recipe(
            run.epochs,
            run.steps_per_epoch,
            lambda epoch, step: (
                run.lr / step_factor ** ((epoch * run.steps_per_epoch + step) // step_every)
            ),
        )
    raise ValueError(f"schedule must be one of 'reference', 'constant', 'step', got {schedule!r}")


@METHODS.register("none")
def no_training(run: RunSpec) -> Recipe:
    """No further training: evaluates the (pre-trained) starting point."""
    return Recipe(0, run.steps_per_epoch, lambda epoch, step: run.lr)


class Averaging(Recipe):
    """SGD whose iterates are folded into an ``AveragedModel`` (SWA, EMA, periodic SWA).

    Args:
        averaged: the running average of the model.
        collect: ``collect(epoch, step)`` says whether to fold the model in after that step
            (``step = None`` at the end of an epoch).
        restart: ``restart(epoch)`` says whether periodic SWA restarts from the average then.
        reset_at: 0-based epoch at whose end the average is emptied before collecting (PSWA's
            switch to ordinary SWA).
        snapshots: the average is an equal-weight one of end-of-epoch weights (``averaged_epochs``).
    """

    def __init__(
        self,
        epochs: int,
        steps_per_epoch: int,
        schedule: Callable[[int, int], float],
        averaged: AveragedModel,
        collect: Callable[[int, int | None], bool],
        restart: Callable[[int], bool] = lambda epoch: False,
        reset_at: int | None = None,
        snapshots: bool = False,
    ) -> None:
        super().__init__(epochs, steps_per_epoch, schedule)
        self.snapshots = snapshots  # an equal-weight average of end-of-epoch weights (SWA)
        self.averaged = averaged
        self._collect = collect
        self._restart = restart
        self._reset_at = reset_at
        self._epoch = 0
        self._step = 0

    def lr(self, epoch: int, step: int) -> float:
        self._epoch, self._step = epoch, step
        return self._schedule(epoch, step)

    def after_step(self, model: nn.Module) -> None:
        if self._collect(self._epoch, self._step):
            self.averaged.update_parameters(model)

    def after_epoch(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self._reset_at is not None and epoch == self._reset_at:
            self.averaged.reset()
        if self._collect(epoch, None):
            self.averaged.update_parameters(model)
        if self._restart(epoch) and self.averaged.count > 0:
            restart_from_average(self.averaged, model, optimizer)

    def final_model(self, model: nn.Module) -> nn.Module:
        return self.averaged.module if self.averaged.count > 0 else model

    def running_model(self, model: nn.Module) -> nn.Module | None:
        return self.averaged.module if self.averaged.count > 0 else None

    def iterate_plan(self, epoch: int) -> tuple[Any, ...]:
        # a restart replaces the weights after this run's own averaging hooks: no other run can
        # share that epoch (the recipe itself, compared by identity, marks it)
        lrs, _ = super().iterate_plan(epoch)
        return (lrs, self if self._restart(epoch) else None)

    def averaged_epochs(self) -> list[int]:
        if not self.snapshots:
            return []
        return [epoch + 1 for epoch in range(self.epochs) if self._collect(epoch, None)]

    def state_dict(self) -> dict[str, Any]:
        # An empty average holds nothing (its first update copies): checkpoint it only once it counts.
        return {"averaged": self.averaged.state_dict()} if self.averaged.count > 0 else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "averaged" in state:
            self.averaged.load_state_dict(state["averaged"])


def _swa_start(swa_start: float | None, budget_epochs: int, epochs: int) -> int:
    """1-based epoch from which models are averaged; default 0.8 B + 1 (161 for B = 200, as the paper)."""
    start = int(0.8 * budget_epochs) + 1 if swa_start is None else swa_start
    _check(
        "swa_start",
        swa_start,
        isinstance(start, int) and 1 <= start <= epochs,
        f"an epoch in 1..{epochs}",
    )
    return start


def _phase_schedule(
    kind: str,
    lr: float,
    swa_lr: float,
    swa_start: int,
    steps_per_epoch: int,
    cycle: int,
    epochs: int,
) -> Callable[[int, int], float]:
    """The LR of an averaging run: the paper's SWA schedule, a constant LR, or Algorithm 1's cycles."""
    if kind == "reference":
        return _per_epoch(swa_reference_lr(lr, swa_start, swa_lr, epochs))
    if kind == "constant":
        return _per_epoch(constant_lr(lr))
    if kind == "cyclic":
        before = swa_reference_lr(lr, swa_start, swa_lr, epochs)
        cyclic = cyclic_lr(lr, swa_lr, cycle * steps_per_epoch)
        start = swa_start - 1  # 0-based first epoch of the averaging phase

        def schedule(epoch: int, step: int) -> float:
            if epoch < start:
                return before(epoch)
            return cyclic((epoch - start) * steps_per_epoch + step + 1)

        return schedule
    raise ValueError(f"schedule must be one of 'reference', 'constant', 'cyclic', got {kind!r}")


@METHODS.register("swa")
@_role("average")
def swa(
    run: RunSpec,
    *,
    swa_lr: float = 0.05,
    swa_start: int | None = None,
    schedule: str = "reference",
    cycle: int = 1,
    every: int = 1,
) -> Averaging:
    """SWA (Izmailov et al., 2018): average once per epoch (or per cycle) from `swa_start`."""
    start = _swa_start(swa_start, run.budget_epochs, run.epochs)
    _check("cycle", cycle, isinstance(cycle, int) and cycle > 0, "a positive integer")
    _check("every", every, isinstance(every, int) and every > 0, "a positive integer")
    if schedule == "cyclic":  # a model at the end of each cycle, where lr = swa_lr (Algorithm 1)

        def collect(epoch: int, step: int | None) -> bool:
            return step is None and epoch + 1 >= start and (epoch + 2 - start) % cycle == 0
    else:  # timgaripov/swa: at swa_start, then every `every` epochs

        def collect(epoch: int, step: int | None) -> bool:
            return step is None and swa_should_average(epoch, start, every)

    return Averaging(
        run.epochs,
        run.steps_per_epoch,
        _phase_schedule(schedule, run.lr, swa_lr, start, run.steps_per_epoch, cycle, run.epochs),
        AveragedModel(run.model, rule=SWA()),
        collect=collect,
        snapshots=True,
    )


@METHODS.register("ema")
def ema(
    run: RunSpec,
    *,
    decay: float = 0.999,
    warmup_gamma: float | None = None,
    swa_lr: float = 0.05,
    swa_start: int | None = None,
    schedule: str = "reference",
) -> Averaging:
    """EMA of the weights after every step from `swa_start`, under the SWA schedule."""
    start = _swa_start(swa_start, run.budget_epochs, run.epochs)
    return Averaging(
        run.epochs,
        run.steps_per_epoch,
        _phase_schedule(schedule, run.lr, swa_lr, start, run.steps_per_epoch, 1, run.epochs),
        AveragedModel(run.model, rule=EMA(decay, warmup_gamma)),
        collect=lambda epoch, step: step is not None and epoch + 1 >= start,
    )


@METHODS.register("pswa")
def pswa(
    run: RunSpec,
    *,
    swa_lr: float = 0.05,
    pswa_start: int | None = None,
    period: int | None = None,
    swa_start: int | None = None,
) -> Averaging:
    """Periodic SWA (Guo et al., 2023): restart from the average every `period` epochs, then SWA."""
    pswa_start = max(1, run.budget_epochs // 4) if pswa_start is None else pswa_start
    period = max(1, run.budget_epochs // 8) if period is None else period
    swa_start = run.budget_epochs + 1 if swa_start is None else swa_start
    _check(
        "pswa_start",
        pswa_start,
        isinstance(pswa_start, int) and 1 <= pswa_start <= run.epochs,
        f"an epoch in 1..{run.epochs}",
    )
    _check("period", period, isinstance(period, int) and period > 0, "a positive integer")
    _check(
        "swa_start",
        swa_start,
        isinstance(swa_start, int) and swa_start > pswa_start,
        f"> pswa_start ({pswa_start})",
    )
    schedule = swa_reference_lr(run.lr, min(swa_start, run.epochs), swa_lr)
    return Averaging(
        run.epochs,
        run.steps_per_epoch,
        _per_epoch(schedule),
        AveragedModel(run.model, rule=SWA()),
        collect=lambda epoch, step: step is None and epoch + 1 >= pswa_start,
        # after the k-th model of a period is folded in (k = epoch + 2 - pswa_start), restart if k % period == 0
        restart=lambda epoch: (
            pswa_start <= epoch + 1 < swa_start and (epoch + 2 - pswa_start) % period == 0
        ),
        reset_at=swa_start - 1 if swa_start <= run.epochs else None,
    )


class Ensembling(Recipe):
    """Collects models into an FGE ensemble or a SWAG posterior; predictions average probabilities."""

    def __init__(
        self,
        epochs: int,
        steps_per_epoch: int,
        schedule: Callable[[int, int], float],
        collect: Callable[[int], bool],
    ) -> None:
        super().__init__(epochs, steps_per_epoch, schedule)
        self._collect = collect

    def collect(self, model: nn.Module) -> None:
        raise NotImplementedError

    def after_epoch(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self._collect(epoch):
            self.collect(model)


class FGERecipe(Ensembling):
    """FGE: models collected at the minimum of each triangular LR cycle, kept on the CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fge = FGE()

    def collect(self, model: nn.Module) -> None:
        self.fge.collect(model)

    def predict(
        self, model: nn.Module, splits: dict[str, Split], ctx: EvalContext
    ) -> dict[str, Tensor]:
        if not self.fge.members:
            return super().predict(model, splits, ctx)
        # members keep their own BN statistics
        predict_fn, unflatten = joint_predictions(splits, ctx)
        probs = ensemble_predict(self.fge.members, model, None, predict_fn=predict_fn)["probs"]
        return unflatten(probs)

    def state_dict(self) -> dict[str, Any]:
        return {"members": self.fge.members}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fge.members = list(state["members"])


class SWAGRecipe(Ensembling):
    """SWAG: Gaussian posterior from the SWA trajectory; Bayesian model averaging over samples."""

    def __init__(
        self,
        *args: Any,
        swag: SWAG,
        n_samples: int,
        scale: float,
        cov: bool,
        seed: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.swag, self.n_samples, self.scale, self.cov, self.seed = (
            swag,
            n_samples,
            scale,
            cov,
            seed,
        )

    def collect(self, model: nn.Module) -> None:
        self.swag.collect_model(model)

    def predict(
        self, model: nn.Module, splits: dict[str, Split], ctx: EvalContext
    ) -> dict[str, Tensor]:
        if self.swag.n_models == 0:
            return super().predict(model, splits, ctx)
        generator = torch.Generator(device=self.swag.mean.device).manual_seed(self.seed)
        predict_fn, unflatten = joint_predictions(splits, ctx)
        kind = "classification" if ctx.task.probabilistic else "regression"
        out = bma_predict(
            self.swag,
            None,
            _Passes(ctx.bn_loader),
            n_samples=self.n_samples,
            scale=self.scale,
            cov=self.cov,
            task=kind,
            generator=generator,
            predict_fn=predict_fn,
            max_bn_batches=ctx.bn_batches,
            bn_weighting=ctx.bn_weighting,
        )
        return unflatten(out["probs" if ctx.task.probabilistic else "mean"])

    def final_state(self, model: nn.Module) -> dict[str, Tensor]:
        sample = self.swag.sample(0.0)  # the SWA mean
        return {k: v.detach().cpu() for k, v in sample.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"swag": self.swag.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.swag.load_state_dict(state["swag"])


class _Passes:
    """An iterable whose every pass is a fresh loader from ``make`` (the same seeded BN batches)."""

    def __init__(self, make: Callable[[], Iterable[Any]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Any]:
        return iter(self.make())


class SoupRecipe(FGERecipe):
    """Snapshots of the SWA trajectory combined into one model by a soup chosen on the validation split."""

    def __init__(self, *args: Any, kind: str, temperature: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind, self.temperature = kind, temperature
        self.ingredients: list[int] = []

    def predict(
        self, model: nn.Module, splits: dict[str, Split], ctx: EvalContext
    ) -> dict[str, Tensor]:
        members = self.fge.members
        if not members:
            return Recipe.predict(self, model, splits, ctx)
        if "val" not in splits and self.kind != "uniform":
            raise ValueError(
                f"a {self.kind} soup scores snapshots on the validation split; set a val_size > 0"
            )
        bn = has_batchnorm(model)

        def score(state: dict[str, Tensor]) -> float:  # validation metric, higher is better
            model.load_state_dict(state)
            if bn:
                ctx.recompute_bn(model)
            outputs = model_outputs(model, splits["val"], ctx)
            return ctx.task.score(evaluate(outputs, splits["val"], ctx.task))

        bn_loader = ctx.bn_loader() if bn else None
        if self.kind == "uniform":
            uniform_soup(members, model=model, bn_loader=bn_loader)
            self.ingredients = list(range(len(members)))
        elif self.kind == "greedy":
            self.ingredients = greedy_soup(
                members, score, model=model, bn_loader=bn_loader
            ).ingredients
        else:
            scores = [score(m) for m in members]
            if not ctx.task.probabilistic and self.temperature is None:
                raise ValueError(
                    f"weighted soup on a {ctx.task.name} task needs a temperature "
                    "(scores are negative errors)"
                )
            weighted_soup(
                members, scores, temperature=self.temperature, model=model, bn_loader=bn_loader
            )
            self.ingredients = list(range(len(members)))
        return predict(model, splits, ctx)


@METHODS.register("soup")
def soup(
    run: RunSpec,
    *,
    kind: str = "greedy",
    swa_lr: float = 0.05,
    swa_start: int | None = None,
    temperature: float | None = None,
) -> SoupRecipe:
    """Soup of per-epoch snapshots after `swa_start` (SWA schedule): greedy, weighted by validation score, or uniform."""
    if kind not in ("greedy", "weighted", "uniform"):
        raise ValueError(f"kind must be one of 'greedy', 'weighted', 'uniform', got {kind!r}")
    start = _swa_start(swa_start, run.budget_epochs, run.epochs)
    return SoupRecipe(
        run.epochs,
        run.steps_per_epoch,
        _per_epoch(swa_reference_lr(run.lr, start, swa_lr, run.epochs)),
        collect=lambda epoch: swa_should_average(epoch, start),
        kind=kind,
        temperature=temperature,
    )


@METHODS.register("fge")
@_role("ensemble")
def fge(
    run: RunSpec,
    *,
    a1: float = 0.05,
    a2: float = 0.01,
    cycle: int = 2,
    fge_start: int | None = None,
) -> FGERecipe:
    """FGE (Garipov et al., 2018): triangular LR cycles from `fge_start`, ensemble of the cycle minima."""
    start = _swa_start(fge_start, run.budget_epochs, run.epochs)
    _check("cycle", cycle, isinstance(cycle, int) and cycle >= 2, "an integer >= 2")
    before = swa_reference_lr(run.lr, start, a1)
    cycles = fge_lr(a1, a2, cycle)

    def schedule(epoch: int, step: int) -> float:
        if epoch + 1 < start:
            return before(epoch)
        return cycles(epoch - (start - 1) + step / run.steps_per_epoch)

    return FGERecipe(
        run.epochs,
        run.steps_per_epoch,
        schedule,
        collect=lambda epoch: epoch + 1 >= start and fge_should_collect(epoch - (start - 1), cycle),
    )


@METHODS.register("swag")
@_role("ensemble")
def swag(
    run: RunSpec,
    *,
    swa_lr: float = 0.05,
    swa_start: int | None = None,
    max_num_models: int = 20,
    n_samples: int = 30,
    scale: float = 0.5,
    cov: bool = True,
    seed: int = 0,
) -> SWAGRecipe:
    """SWAG (Maddox et al., 2019): SWA schedule, moments once per epoch, BMA over `n_samples` samples."""
    start = _swa_start(swa_start, run.budget_epochs, run.epochs)
    _check(
        "n_samples", n_samples, isinstance(n_samples, int) and n_samples > 0, "a positive integer"
    )
    return SWAGRecipe(
        run.epochs,
        run.steps_per_epoch,
        _per_epoch(swa_reference_lr(run.lr, start, swa_lr, run.epochs)),
        collect=lambda epoch: swa_should_average(epoch, start),
        swag=SWAG(run.model, max_num_models=max_num_models, no_cov_mat=not cov),
        n_samples=n_samples,
        scale=scale,
        cov=cov,
        seed=seed,
    )


def build_recipe(
    method: str,
    options: dict[str, Any],
    *,
    lr: float,
    budget_epochs: int,
    budget: float,
    steps_per_epoch: int = 1,
    model: nn.Module | None = None,
) -> Recipe:
    """The recipe of ``method`` for a run of ``run_epochs(budget, budget_epochs)`` epochs.

    Without ``model`` a stand-in is used: enough to check the options and to ask the recipe for its
    epochs, schedule and averaged epochs before any data is loaded.
    """
    builder = METHODS.get(method)
    known = [k for k in inspect.signature(builder).parameters if k != "run"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; it takes {known}")
    model = nn.Linear(1, 1) if model is None else model
    run = RunSpec(lr, budget_epochs, run_epochs(budget, budget_epochs), steps_per_epoch, model)
    return builder(run, **options)


def recipe_of(
    method: Any, train: Any, steps_per_epoch: int = 1, model: nn.Module | None = None
) -> Recipe:
    """The recipe of a ``MethodConfig`` under a ``TrainConfig`` (``lr`` defaults to ``train.lr``)."""
    lr = method.lr if method.lr is not None else train.lr
    return build_recipe(
        method.method,
        method.options,
        lr=lr,
        budget_epochs=train.epochs,
        budget=method.budget,
        steps_per_epoch=steps_per_epoch,
        model=model,
    )
