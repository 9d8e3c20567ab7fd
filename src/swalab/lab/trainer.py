"""One training run (method × seed), readable top to bottom, resumable from its last epoch.

Everything random comes from generators seeded by the run's seed (model init, batch order,
augmentation, dropout through torch's global RNG), and their states are checkpointed after each
epoch, so an interrupted run continues bit-identically on the CPU.

Under torchrun every rank runs the same code with its ``World`` (distributed.py): the model trains
through DDP on the rank's slice of each global batch, and only rank 0 reads and writes files.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..bn import call_model, has_batchnorm
from ..data import DataBundle, Split
from ..schedules import set_lr
from .config import ExperimentConfig, MethodConfig
from .distributed import (
    World,
    batch_loss,
    broadcast_buffers,
    data_parallel,
    rank_seed,
    restore_rng,
)
from .evaluation import EvalContext, evaluate, model_outputs
from .inputs import bn_loader, build_model, train_loader
from .methods import Recipe, recipe_of
from .precision import Precision
from .rng import device_rng, kept_rng, restore_device_rng
from .rundir import RunFiles
from .sharing import Branch, plan_branches
from .task import Task, task_of

__all__ = ["RunResult", "train_one_epoch", "train_run", "train_runs"]


def make_optimizer(
    name: str, model: nn.Module, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass
class RunResult:
    """What one (method, seed) run hands to the results table."""

    status: str  # "done" | "diverged"
    epochs: int
    metrics: dict[str, float]
    message: str = ""


def train_one_epoch(
    model: nn.Module,
    net: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    lr: Callable[[int], float],
    world: World,
    precision: Precision,
    after_step: Callable[[nn.Module], None] = lambda model: None,
) -> Tensor:
    """One pass over ``loader``, one optimizer step per batch; the summed loss, on the device.

    The single training step of the laboratory (pre-training and every method): ``lr(step)`` is
    written into the optimizer before the step, ``after_step(model)`` runs after it. ``net`` is
    ``model`` itself or its DDP wrapper; the loss is summed on the device (no host sync per step).
    ``precision`` autocasts the forward pass and the loss, scales fp16 gradients and puts batches in
    the model's memory format (``train.precision``, ``train.channels_last``).
    """
    model.train()
    total: Tensor | float = 0.0
    for step, (x, y) in enumerate(loader):
        set_lr(optimizer, lr(step))
        with precision.autocast():  # fp32 unless train.precision says otherwise
            loss = loss_fn(call_model(net, precision.inputs(x)), y)
        optimizer.zero_grad(set_to_none=True)
        precision.backward_step(loss, optimizer)
        broadcast_buffers(model, world)  # rank 0's BN statistics everywhere (no-op in one process)
        after_step(model)
        total = total + loss.detach()
    return torch.as_tensor(total)


def pretrain(
    cfg: ExperimentConfig,
    bundle: DataBundle,
    seed: int,
    files: RunFiles,
    device: torch.device,
    world: World = World(),
    on_epoch: Callable[[dict[str, Any]], None] = lambda record: None,
) -> dict[str, Tensor]:
    """Shared pre-training (documents 000/003): Adam/AdamW with a per-iteration cosine LR, cached per seed."""
    cached = world.on_main(lambda: files.experiment.load_pretrain(seed))
    if cached is not None:
        return cached
    precision = Precision(cfg.train.precision, cfg.train.channels_last, device, cfg.train.compile)
    model = precision.model(build_model(cfg, bundle, seed).to(device))
    net, criterion = data_parallel(model, world), batch_loss(task_of(bundle.task), world)
    net = precision.compiled(net)  # the training forward only
    p = cfg.pretrain
    optimizer = make_optimizer(p.optimizer, model, p.lr, cfg.train.momentum, p.weight_decay)
    loader, _ = train_loader(cfg, bundle, 10_000 + seed, device, world)
    total = p.epochs * len(loader)

    def cosine(epoch: int) -> Callable[[int], float]:
        def lr(step: int) -> float:
            t = (epoch * len(loader) + step) / total
            return p.lr * 0.5 * (1 + math.cos(math.pi * t)) if p.cosine else p.lr

        return lr

    for epoch in range(p.epochs):
        train_one_epoch(model, net, loader, optimizer, criterion, cosine(epoch), world, precision)
        on_epoch({"phase": "pretrain", "epoch": epoch + 1})
    state = _cpu_state(model)
    if world.main:
        files.experiment.save_pretrain(seed, state)
    return state


def train_run(
    cfg: ExperimentConfig,
    method: MethodConfig,
    seed: int,
    bundle: DataBundle,
    run_dir: Path | RunFiles,
    device: torch.device,
    on_epoch: Callable[[dict[str, Any]], None] = lambda record: None,
    world: World = World(),
) -> RunResult:
    """Train ``method`` with ``seed`` on its own (``train_runs`` with one run); ``on_epoch``
    receives every epoch's record (pre-training's too)."""
    files = run_dir if isinstance(run_dir, RunFiles) else RunFiles(run_dir)
    results: list[RunResult] = []
    train_runs(
        cfg,
        [(method, files)],
        seed,
        bundle,
        device,
        done=lambda method, result, seconds: results.append(result),
        on_record=lambda method, record: on_epoch(record),
        on_epoch=lambda methods, record: None if methods else on_epoch(record),
        world=world,
    )
    return results[0]


@dataclass
class _Run:
    """One (method, seed) run following a shared trajectory: its recipe and learning curve."""

    method: MethodConfig
    files: RunFiles
    recipe: Recipe
    history: list[dict[str, Any]]
    checkpoint: dict[str, Any] | None  # where it resumes (until its trajectory has read it)
    start: int  # epochs done before this call


def train_runs(
    cfg: ExperimentConfig,
    runs: Sequence[tuple[MethodConfig, RunFiles]],
    seed: int,
    bundle: DataBundle,
    device: torch.device,
    *,
    done: Callable[[MethodConfig, RunResult, float], None],
    on_record: Callable[[MethodConfig, dict[str, Any]], None] = lambda method, record: None,
    on_epoch: Callable[[list[MethodConfig], dict[str, Any]], None] = lambda m, record: None,
    world: World = World(),
    share: bool = True,
) -> None:
    """Train ``runs`` (methods of one ``seed`` and their files), each resuming from its checkpoint.

    Epochs that several runs would train identically are trained once (``sharing.py``; every file
    and result equals, bit for bit on the CPU, that of a run of its own; ``share=False`` trains
    each alone). ``done(method, result, seconds)`` as each run ends; ``on_record(method, record)``
    for every epoch of every run (the last after the final metrics); ``on_epoch(methods, record)``
    once per epoch trained, with the runs that trained it (``[]`` for pre-training).

    Under DDP (``world.size > 1``) every rank calls this; recipes average and evaluate ``model``
    itself, whose state is the same on every rank after every step.
    """
    train = cfg.train
    model = build_model(cfg, bundle, seed)
    if cfg.pretrain.epochs > 0:
        model.load_state_dict(
            pretrain(cfg, bundle, seed, runs[0][1], device, world, partial(on_epoch, []))
        )
    precision = Precision(train.precision, train.channels_last, device, train.compile)
    precision.model(model.to(device))
    # Batch order and augmentation come from one generator; BN recomputation uses its own.
    loader, generator = train_loader(cfg, bundle, seed, device, world)
    live: dict[str, _Run] = {}
    for method, files in runs:
        # Rank 0 reads the checkpoint and hands it to every rank (CPU tensors).
        ckpt = world.on_main(files.checkpoint)
        if ckpt is not None and ckpt.get("diverged"):
            done(method, RunResult("diverged", ckpt["epoch"] + 1, {}, ckpt["diverged"]), 0.0)
            continue
        recipe = recipe_of(method, train, steps_per_epoch=len(loader), model=model)
        run = _Run(method, files, recipe, [], ckpt, 0 if ckpt is None else ckpt["epoch"] + 1)
        if ckpt is not None:
            recipe.load_state_dict(ckpt["recipe"])
            run.history = ckpt["history"]
            if world.main:  # lines appended after the checkpoint by an interrupted epoch go
                files.write_metrics(run.history)
        live[method.label] = run
    trajectory = _Trajectory(cfg, seed, bundle, device, world, model, precision, loader, generator)
    trajectory.done, trajectory.on_record, trajectory.on_epoch = done, on_record, on_epoch
    starts = {label: run.start for label, run in live.items()}
    for root in plan_branches(train, [r.method for r in live.values()], len(loader), starts, share):
        trajectory.train_root(root, [live[m.label] for m in root.methods])


class _Trajectory:
    """The state one seed's runs train: model, optimizer, batch order and RNG, kept between
    branches (``sharing.Branch``) and restored where a branch starts."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        seed: int,
        bundle: DataBundle,
        device: torch.device,
        world: World,
        model: nn.Module,
        precision: Precision,
        loader: Any,
        generator: torch.Generator,
    ) -> None:
        self.cfg, self.seed, self.bundle, self.world = cfg, seed, bundle, world
        self.model, self.precision, self.loader, self.generator = (
            model,
            precision,
            loader,
            generator,
        )
        train = cfg.train
        self.optimizer = make_optimizer(
            train.optimizer, model, train.lr, train.momentum, train.weight_decay
        )
        self.task = task_of(bundle.task)
        self.ctx = EvalContext(
            self.task,
            device,
            train.eval_batch_size,
            lambda: bn_loader(cfg, bundle, seed, device, world),
            train.bn_batches,
            world,
            train.bn_weighting,
        )
        # DDP wrapper and global-batch loss (the model itself and its task's loss in one process)
        self.net = precision.compiled(data_parallel(model, world))  # the training forward
        self.criterion = batch_loss(self.task, world)
        self.done: Callable[[MethodConfig, RunResult, float], None] = lambda m, r, s: None
        self.on_record: Callable[[MethodConfig, dict[str, Any]], None] = lambda m, r: None
        self.on_epoch: Callable[[list[MethodConfig], dict[str, Any]], None] = lambda m, r: None
        self.started = time.perf_counter()
        # the state every run starts from: the initialised (or pre-trained) model, no momentum,
        # the first batch order, and the global RNG seeded (dropout and any other randomness)
        torch.manual_seed(rank_seed(seed, world.rank))
        self.fresh = self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """Everything the next epochs depend on (kept in memory at a branch point)."""
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "grad_scaler": self.precision.state_dict(),
            **device_rng(self.ctx.device),
        }

    def restore(self, state: dict[str, Any], ranks: bool = False) -> None:
        """Back to ``state`` (a snapshot or a checkpoint; ``ranks``: a checkpoint's RNG states)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.generator.set_state(state["generator"])
        self.precision.load_state_dict(state.get("grad_scaler", {}))
        if ranks:
            restore_rng(state, self.world, self.seed)
        else:
            torch.set_rng_state(state["torch_rng"])
        restore_device_rng(state, self.ctx.device)

    def train_root(self, root: Branch, runs: list[_Run]) -> None:
        """Train a trajectory from its first runs' checkpoint (or from the start)."""
        self.started = time.perf_counter()
        first = runs[0].checkpoint
        if first is None:
            self.restore(self.fresh)
            for run in runs:
                if self.world.main:
                    run.files.save_weights("init", _cpu_state(self.model))
        else:
            self.restore(first, ranks=True)
        for run in runs:
            run.checkpoint = None  # held no longer than needed
        self.by_label = {run.method.label: run for run in runs}
        for run in [r for r in runs if r.recipe.epochs == root.start]:  # nothing left to train
            self.finish(run)
        self.train_branch(root)

    def train_branch(self, branch: Branch) -> None:
        runs = [self.by_label[m.label] for m in branch.methods]
        for epoch in range(branch.start, branch.stop):
            going = [r for r in runs if r.recipe.epochs > epoch]
            if not self.train_epoch(epoch, going):
                return  # diverged, with every run that would have trained on from here
        if len(branch.children) > 1:
            state = self.snapshot()
            for i, child in enumerate(branch.children):
                if i:
                    self.restore(state)
                self.train_branch(child)

    def train_epoch(self, epoch: int, runs: list[_Run]) -> bool:
        """Epoch ``epoch`` for ``runs`` (whose plans agree on it): train once, then each run's
        hooks, record, checkpoint, and the end of the runs whose last epoch it is. False if the
        loss diverged (every one of ``runs`` is marked diverged)."""
        model, world = self.model, self.world
        recipes = [run.recipe for run in runs]

        def lr(step: int) -> float:  # every recipe sees its steps (its hooks depend on them)
            return [recipe.lr(epoch, step) for recipe in recipes][0]

        def after_step(model: nn.Module) -> None:
            for recipe in recipes:
                recipe.after_step(model)

        total_loss = train_one_epoch(
            model,
            self.net,
            self.loader,
            self.optimizer,
            self.criterion,
            lr,
            world,
            self.precision,
            after_step,
        )
        train_loss = total_loss.item() / len(self.loader)
        if not math.isfinite(train_loss):  # keep the previous epoch's checkpoint, the last good one
            for run in runs:
                label = run.method.label
                message = f"{label} seed {self.seed}: loss became {train_loss} in epoch {epoch + 1}"
                if world.main:
                    run.files.mark_diverged(message)
                self.done(run.method, RunResult("diverged", epoch + 1, {}, message), self._since())
            return False
        for recipe in recipes:
            recipe.after_epoch(epoch, model, self.optimizer)
        # the checkpoint holds the streams as training left them: what follows draws nothing
        with kept_rng(self.ctx.device):
            self._epoch_end(epoch, runs, train_loss)
        return True

    def _epoch_end(self, epoch: int, runs: list[_Run], train_loss: float) -> None:
        """Epoch ``epoch``'s record, evaluations, checkpoints and the end of the runs it ends."""
        model, train, world, recipes = (
            self.model,
            self.cfg.train,
            self.world,
            [r.recipe for r in runs],
        )
        # The epoch's record: one line of metrics.jsonl (a per-epoch hook reads it here).
        shared: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": recipes[0].lr(epoch, 0),
            "train_loss": train_loss,
        }
        evaluated = [
            (epoch + 1) % train.eval_every == 0 or epoch + 1 == run.recipe.epochs for run in runs
        ]
        rng_states = world.gather(torch.get_rng_state())  # every rank's dropout stream
        state = {
            "generator": self.generator.get_state(),
            "torch_rng": rng_states[0],
            "grad_scaler": self.precision.state_dict(),
            **({"torch_rng_ranks": rng_states} if world.size > 1 else {}),
            **device_rng(self.ctx.device),
        }
        if any(evaluated):  # the iterate, once for every run
            test = self._evaluate(model)
            shared.update({f"test_{k}": v for k, v in test.items()})
        averages = _SameAverages()  # runs of a shared epoch often hold the same average
        for run, evaluate_it in zip(runs, evaluated):
            last = epoch + 1 == run.recipe.epochs
            record = {k: v for k, v in shared.items() if evaluate_it or not k.startswith("test_")}
            running = run.recipe.running_model(model)
            if evaluate_it and running is not None and not last:
                # the last epoch's average is the final model, evaluated when the run ends
                record.update(
                    {
                        f"avg_test_{k}": v
                        for k, v in averages.get(running, self._evaluate_average).items()
                    }
                )
            run.history.append(record)
            if world.main:  # under DDP rank 0 alone writes
                if train.saves_trajectory(run.method.label):
                    run.files.append_trajectory(epoch + 1, _cpu_state(model))
                if self.cfg.posthoc.run == run.method.label:  # post-hoc windows (posthoc.py)
                    run.files.snapshots(self.cfg.posthoc.every).update(model, step=epoch + 1)
                run.files.save_checkpoint(
                    {
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "recipe": run.recipe.state_dict(),
                        "history": run.history,
                        **state,
                    }
                )
                if not (last and running is not None):  # waits for the final metrics
                    run.files.append_metrics(record)
            if not last:  # the last epoch is reported with the final model's metrics
                self.on_record(run.method, record)
        self.on_epoch([run.method for run in runs], runs[0].history[-1])
        for run in [r for r in runs if r.recipe.epochs == epoch + 1]:
            self.finish(run)

    def finish(self, run: _Run) -> None:
        """The end of ``run``: its final model's predictions, ``final.pt`` and metrics on every
        split, on a copy of the model and leaving the global RNG as it was (others may go on);
        the running average's last point joins the learning curve."""
        with kept_rng(self.ctx.device):
            self._finish(run)

    def _finish(self, run: _Run) -> None:
        model, bundle, history = copy.deepcopy(self.model), self.bundle, run.history
        splits = {
            name: getattr(bundle, name)
            for name in ("train", "val", "test", "large_test")
            if getattr(bundle, name) is not None and len(getattr(bundle, name))
        }
        outputs = run.recipe.predict(model, splits, self.ctx)
        if self.world.main:
            run.files.save_weights("final", run.recipe.final_state(model))
            _save_per_sample(run.files, self.task, outputs, splits)
        results: dict[str, float] = {}
        for name, split in splits.items():
            results.update(
                {f"{name}_{k}": v for k, v in evaluate(outputs[name], split, self.task).items()}
            )
        if history and run.recipe.running_model(model) is not None:
            # the learning curve's last average point
            history[-1].update(
                {
                    k.replace("test_", "avg_test_", 1): v
                    for k, v in results.items()
                    if k.startswith("test_")
                }
            )
            if self.world.main:
                run.files.write_metrics(history)
        if history:
            self.on_record(run.method, history[-1])
        self.done(run.method, RunResult("done", run.recipe.epochs, results), self._since())

    def _evaluate_average(self, running: nn.Module) -> dict[str, float]:
        """Test metrics of a running average, its BN statistics recomputed on a copy (the
        average's own stay); called inside ``kept_rng``, so a BN pass drawing dropout masks leaves
        the next epoch as the checkpoint has it."""
        if has_batchnorm(running):
            running = copy.deepcopy(running)
            self.ctx.recompute_bn(running)
        return self._evaluate(running)

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        """Test metrics of ``model``."""
        test = self.bundle.test
        return evaluate(model_outputs(model, test, self.ctx), test, self.task)

    def _since(self) -> float:
        return round(time.perf_counter() - self.started, 2)


def _save_per_sample(
    files: Any, task: Task, outputs: dict[str, Tensor], splits: dict[str, Split]
) -> None:
    """The final model's per-sample scores on the test sets (``Task.per_sample``), for the claims'
    test-sampling share; nothing for a task without them."""
    scores = {
        name: task.per_sample(outputs[name], splits[name].y)
        for name in ("test", "large_test")
        if name in splits
    }
    if scores and all(v is not None for v in scores.values()):
        files.save_per_sample({k: v.float().numpy() for k, v in scores.items()})


class _SameAverages:
    """The learning-curve metrics of the running averages of one epoch, computed once for equal
    ones: runs that share an epoch (``sharing.py``) with the same averaging so far (SWA, SWAG and
    the soup of the default preset) hold equal averages, whose BN pass and evaluation give the
    same numbers (the BN pass is seeded per run's seed, the same for all)."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, Tensor], dict[str, float]]] = []

    def get(
        self, running: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]]
    ) -> dict[str, float]:
        state = running.state_dict()
        for other, result in self.seen:
            if other.keys() == state.keys() and all(
                torch.equal(other[k], v) for k, v in state.items()
            ):
                return result
        result = evaluate(running)
        self.seen.append(({k: v.detach().clone() for k, v in state.items()}, result))
        return result


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
