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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..bn import call_model, has_batchnorm, update_bn
from ..data import DataBundle
from ..schedules import set_lr
from .config import ExperimentConfig, MethodConfig
from .distributed import World, batch_loss, broadcast_buffers, data_parallel, rank_seed, restore_rng
from .evaluation import EvalContext, evaluate, model_outputs
from .files import load_torch
from .inputs import bn_loader, build_model, train_loader
from .methods import Recipe, recipe_of
from .precision import Precision
from .rundir import RunFiles
from .task import task_of

__all__ = ["Reader", "RunResult", "train_one_epoch", "train_run"]


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


class Reader(NamedTuple):
    """A method read off another run's trajectory at its own last epoch (shared trajectories).

    ``done(method, result, history)`` receives its result and learning curve once it is finished.
    """

    method: MethodConfig
    files: RunFiles
    done: Callable[[MethodConfig, RunResult, list[dict[str, Any]]], None]


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
    precision = Precision(cfg.train.precision, cfg.train.channels_last, device)
    model = precision.model(build_model(cfg, bundle, seed).to(device))
    net, criterion = data_parallel(model, world), batch_loss(task_of(bundle.task), world)
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
    readers: Sequence[Reader] = (),
) -> RunResult:
    """Train ``method`` with ``seed``, resuming from the run's checkpoint if it exists.

    ``readers``: runs whose epochs are a prefix of this one (``methods.shares_trajectory``); each is
    finished at its last epoch exactly as its own run would finish it, into its own directory.
    Readers whose last epoch a resumed run has already passed are left out (not ``done``).

    Under DDP (``world.size > 1``) every rank calls this; recipes average and evaluate ``model``
    itself, whose state is the same on every rank after every step.
    """
    files = run_dir if isinstance(run_dir, RunFiles) else RunFiles(run_dir)
    train, task = cfg.train, task_of(bundle.task)
    model = build_model(cfg, bundle, seed)
    if cfg.pretrain.epochs > 0:
        model.load_state_dict(pretrain(cfg, bundle, seed, files, device, world, on_epoch))
    precision = Precision(train.precision, train.channels_last, device)
    precision.model(model.to(device))
    # Batch order and augmentation come from one generator; BN recomputation uses its own.
    loader, generator = train_loader(cfg, bundle, seed, device, world)
    recipe = recipe_of(method, train, steps_per_epoch=len(loader), model=model)
    lr = method.lr if method.lr is not None else train.lr
    optimizer = make_optimizer(train.optimizer, model, lr, train.momentum, train.weight_decay)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    # Rank 0 reads the checkpoint and hands it to every rank (CPU tensors; load_state_dict moves them).
    ckpt = world.on_main(files.checkpoint)
    if ckpt is not None:
        if ckpt.get("diverged"):
            return RunResult("diverged", ckpt["epoch"] + 1, {}, ckpt["diverged"])
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        recipe.load_state_dict(ckpt["recipe"])
        generator.set_state(ckpt["generator"])
        precision.load_state_dict(ckpt.get("grad_scaler", {}))
        restore_rng(ckpt, world, seed)
        history, start_epoch = ckpt["history"], ckpt["epoch"] + 1
        if world.main:  # lines appended after the checkpoint by an interrupted epoch go
            files.write_metrics(history)
    else:
        torch.manual_seed(rank_seed(seed, world.rank))  # dropout and any other global randomness
        if world.main:
            files.save_weights("init", _cpu_state(model))
    pending = {
        r.method.label: (r, recipe_of(r.method, train, len(loader)).epochs)
        for r in readers
        if recipe_of(r.method, train, len(loader)).epochs > start_epoch
    }
    for reader, _ in pending.values():
        if world.main and not reader.files.weights_path("init").exists():
            reader.files.save_weights("init", load_torch(files.weights_path("init")))

    ctx = EvalContext(
        task,
        device,
        train.eval_batch_size,
        lambda: bn_loader(cfg, bundle, seed, device, world),
        train.bn_batches,
        world,
    )
    # DDP wrapper and global-batch loss (the model itself and its task's loss in one process)
    net, criterion = data_parallel(model, world), batch_loss(task, world)
    for epoch in range(start_epoch, recipe.epochs):
        total_loss = train_one_epoch(
            model,
            net,
            loader,
            optimizer,
            criterion,
            partial(recipe.lr, epoch),
            world,
            precision,
            recipe.after_step,
        )
        train_loss = total_loss.item() / len(loader)
        if not math.isfinite(train_loss):  # keep the previous epoch's checkpoint, the last good one
            message = f"{method.label} seed {seed}: loss became {train_loss} in epoch {epoch + 1}"
            if world.main:
                files.mark_diverged(message)
            for reader, _ in pending.values():  # they would have diverged here too
                text = message.replace(method.label, reader.method.label, 1)
                if world.main:
                    reader.files.mark_diverged(text)
                reader.done(reader.method, RunResult("diverged", epoch + 1, {}, text), [])
            return RunResult("diverged", epoch + 1, {}, message)
        recipe.after_epoch(epoch, model, optimizer)

        # The epoch's record: one line of metrics.jsonl (a per-epoch hook reads it here).
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": recipe.lr(epoch, 0),
            "train_loss": train_loss,
        }
        last = epoch + 1 == recipe.epochs
        if (epoch + 1) % train.eval_every == 0 or last:
            record.update(
                {
                    f"test_{k}": v
                    for k, v in evaluate(
                        model_outputs(model, bundle.test, ctx), bundle.test, task
                    ).items()
                }
            )
            running = recipe.running_model(model)
            if (
                running is not None and not last
            ):  # the last epoch's average is the final model, evaluated below
                if has_batchnorm(
                    running
                ):  # recompute BN on a copy: the average's own BN stays as it is
                    running = copy.deepcopy(running)
                    update_bn(ctx.bn_loader(), running, max_batches=ctx.bn_batches)
                record.update(
                    {
                        f"avg_test_{k}": v
                        for k, v in evaluate(
                            model_outputs(running, bundle.test, ctx), bundle.test, task
                        ).items()
                    }
                )
        history.append(record)
        rng_states = world.gather(
            torch.get_rng_state()
        )  # every rank's dropout stream ([its own] in one process)
        if world.main:  # under DDP rank 0 alone writes
            if train.saves_trajectory(method.label):
                files.append_trajectory(epoch + 1, _cpu_state(model))
            files.save_checkpoint(
                {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "recipe": recipe.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": rng_states[0],
                    "history": history,
                    "grad_scaler": precision.state_dict(),
                    **({"torch_rng_ranks": rng_states} if world.size > 1 else {}),
                }
            )
            if not (last and recipe.running_model(model) is not None):  # waits for final metrics
                files.append_metrics(record)
        for label in [k for k, (_, end) in pending.items() if end == epoch + 1]:
            reader = pending.pop(label)[0]
            state = {"generator": generator.get_state(), "torch_rng": rng_states[0]}
            state["grad_scaler"] = precision.state_dict()
            reader.done(
                reader.method,
                *_read_off(
                    reader, train, recipe, model, optimizer, state, history, bundle, ctx, world
                ),
            )
        if not last:  # the last epoch is reported with the final model's metrics, below
            on_epoch(record)

    results = _finish(recipe, model, bundle, ctx, files, history, world, rewrite=False)
    if history:
        on_epoch(history[-1])
    return RunResult("done", recipe.epochs, results)


def _finish(
    recipe: Recipe,
    model: nn.Module,
    bundle: DataBundle,
    ctx: EvalContext,
    files: RunFiles,
    history: list[dict[str, Any]],
    world: World,
    rewrite: bool,
) -> dict[str, float]:
    """The end of a run: its final model's predictions, ``final.pt`` and metrics on every split;
    the running average's last point joins the learning curve (``rewrite``: write it all anyway)."""
    splits = {
        name: getattr(bundle, name)
        for name in ("train", "val", "test")
        if len(getattr(bundle, name))
    }
    outputs = recipe.predict(model, splits, ctx)
    if world.main:
        files.save_weights("final", recipe.final_state(model))
    results: dict[str, float] = {}
    for name, split in splits.items():
        results.update(
            {f"{name}_{k}": v for k, v in evaluate(outputs[name], split, ctx.task).items()}
        )
    running = history and recipe.running_model(model) is not None
    if running:  # the learning curve's last average point
        history[-1].update(
            {
                k.replace("test_", "avg_test_", 1): v
                for k, v in results.items()
                if k.startswith("test_")
            }
        )
    if world.main and (running or rewrite):
        files.write_metrics(history)
    return results


def _read_off(
    reader: Reader,
    train: Any,
    recipe: Recipe,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    history: list[dict[str, Any]],
    bundle: DataBundle,
    ctx: EvalContext,
    world: World,
) -> tuple[RunResult, list[dict[str, Any]]]:
    """Finish ``reader`` at this epoch, its last, as its own run would: on copies of the model and
    of the recipe's state (averages, ensembles), leaving this run and the global RNG untouched."""
    rng = torch.get_rng_state()
    model = copy.deepcopy(model)
    short = recipe_of(reader.method, train, recipe.steps_per_epoch, model=model)
    short.load_state_dict(copy.deepcopy(recipe.state_dict()))
    # its last epoch's record: the iterate evaluated, no running-average point (that is the final's)
    last = {k: v for k, v in history[-1].items() if not k.startswith("avg_test_")}
    if not any(k.startswith("test_") for k in last):
        test = evaluate(model_outputs(model, bundle.test, ctx), bundle.test, ctx.task)
        last.update({f"test_{k}": v for k, v in test.items()})
    own = [*copy.deepcopy(history[:-1]), last]
    if world.main:
        reader.files.save_checkpoint(
            {
                "epoch": last["epoch"] - 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "recipe": short.state_dict(),
                "history": copy.deepcopy(own),
                **state,
            }
        )
    results = _finish(short, model, bundle, ctx, reader.files, own, world, rewrite=True)
    torch.set_rng_state(rng)
    return RunResult("done", short.epochs, results), own


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
