"""One training run (method × seed), readable top to bottom, resumable from its last epoch.

Everything random comes from generators seeded by the run's seed (model init, batch order,
augmentation, dropout through torch's global RNG), and their states are checkpointed after each
epoch, so an interrupted run continues bit-identically on the CPU.

Under torchrun every rank runs the same code with its ``World`` (distributed.py): the model trains
through DDP on the rank's slice of each global batch, and only rank 0 reads and writes files.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..bn import update_bn
from ..data import BatchLoader, DataBundle
from ..models import create as create_model
from ..schedules import set_lr
from .config import ExperimentConfig, MethodConfig, check_device
from .distributed import World, batch_loss, broadcast_buffers, data_parallel, rank_seed, restore_rng, shard_batches
from .files import atomic_save, atomic_write_text, load_torch
from .evaluation import EvalContext, evaluate, forward, has_batchnorm, model_outputs
from .methods import build_recipe

__all__ = ["RunResult", "bn_loader", "train_run", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    return check_device(name, "train.device")


def make_optimizer(name: str, model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
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


class Diverged(RuntimeError):
    pass


def build_model(cfg: ExperimentConfig, bundle: DataBundle, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(cfg.model.name, bundle.in_shape, bundle.num_outputs, **cfg.model.options)


def pretrain(cfg: ExperimentConfig, bundle: DataBundle, seed: int, path: Path, device: torch.device,
             world: World = World()) -> dict[str, Tensor]:
    """Shared pre-training (documents 000/003): Adam/AdamW with a per-iteration cosine LR, cached per seed."""
    cached = world.on_main(lambda: load_torch(path) if path.exists() else None)
    if cached is not None:
        return cached
    model = build_model(cfg, bundle, seed).to(device)
    net, criterion = data_parallel(model, world), batch_loss(world)
    p = cfg.pretrain
    optimizer = make_optimizer(p.optimizer, model, p.lr, cfg.train.momentum, p.weight_decay)
    generator = torch.Generator().manual_seed(10_000 + seed)
    loader = shard_batches(BatchLoader(bundle.train, cfg.train.batch_size, shuffle=True, generator=generator,
                                       augment=bundle.augment if cfg.train.augment else None, device=device), world)
    total = p.epochs * len(loader)
    for epoch in range(p.epochs):
        model.train()
        for step, (x, y) in enumerate(loader):
            t = (epoch * len(loader) + step) / total
            set_lr(optimizer, p.lr * 0.5 * (1 + math.cos(math.pi * t)) if p.cosine else p.lr)
            loss = criterion(bundle.task, forward(net, x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            broadcast_buffers(model, world)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if world.main:
        atomic_save(state, path)
    return state


def train_run(
    cfg: ExperimentConfig,
    method: MethodConfig,
    seed: int,
    bundle: DataBundle,
    run_dir: Path,
    device: torch.device,
    on_epoch: Callable[[], None] = lambda: None,
    world: World = World(),
) -> RunResult:
    """Train ``method`` with ``seed``, resuming from ``run_dir/checkpoint.pt`` if it exists.

    Under DDP (``world.size > 1``) every rank calls this; recipes average and evaluate ``model``
    itself, whose state is the same on every rank after every step.
    """
    train = cfg.train
    model = build_model(cfg, bundle, seed)
    if cfg.pretrain.epochs > 0:
        model.load_state_dict(pretrain(cfg, bundle, seed, run_dir.parent.parent / "pretrain" / f"seed{seed}.pt",
                                       device, world))
    model.to(device)
    # Batch order and augmentation come from one generator; BN recomputation uses its own.
    # Under DDP every rank draws the same global batches and takes its slice of each.
    generator = torch.Generator().manual_seed(seed)
    loader = shard_batches(BatchLoader(bundle.train, train.batch_size, shuffle=True, generator=generator,
                                       augment=bundle.augment if train.augment else None, device=device), world)
    lr = method.lr if method.lr is not None else train.lr
    recipe = build_recipe(method.method, method.options, lr=lr, budget_epochs=train.epochs,
                          budget=method.budget, steps_per_epoch=len(loader), model=model)
    optimizer = make_optimizer(train.optimizer, model, lr, train.momentum, train.weight_decay)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    checkpoint_path = run_dir / "checkpoint.pt"
    # Rank 0 reads the checkpoint and hands it to every rank (CPU tensors; load_state_dict moves them).
    ckpt = world.on_main(lambda: load_torch(checkpoint_path)
                         if checkpoint_path.exists() else None)
    if ckpt is not None:
        if ckpt.get("diverged"):
            return RunResult("diverged", ckpt["epoch"] + 1, {}, ckpt["diverged"])
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        recipe.load_state_dict(ckpt["recipe"])
        generator.set_state(ckpt["generator"])
        restore_rng(ckpt, world, seed)
        history, start_epoch = ckpt["history"], ckpt["epoch"] + 1
    else:
        torch.manual_seed(rank_seed(seed, world.rank))  # dropout and any other global randomness
        if world.main:
            atomic_save(_cpu_state(model), run_dir / "init.pt")

    ctx = EvalContext(bundle.task, device, train.eval_batch_size, lambda: bn_loader(cfg, bundle, seed, device, world),
                      train.bn_batches, world)
    net, criterion = data_parallel(model, world), batch_loss(world)  # the model itself in one process
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        total_loss = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for step, (x, y) in enumerate(loader):
            set_lr(optimizer, recipe.lr(epoch, step))
            loss = criterion(bundle.task, forward(net, x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            broadcast_buffers(model, world)  # rank 0's BN statistics everywhere (no-op in one process)
            recipe.after_step(model)
            total_loss += loss.detach()
        train_loss = total_loss.item() / len(loader)
        if not math.isfinite(train_loss):  # keep the previous epoch's checkpoint, the last good one
            message = f"{method.label} seed {seed}: loss became {train_loss} in epoch {epoch + 1}"
            if world.main:
                _mark_diverged(checkpoint_path, message)
            return RunResult("diverged", epoch + 1, {}, message)
        recipe.after_epoch(epoch, model, optimizer)

        record: dict[str, Any] = {"epoch": epoch + 1, "lr": recipe.lr(epoch, 0), "train_loss": train_loss}
        last = epoch + 1 == recipe.epochs
        if (epoch + 1) % train.eval_every == 0 or last:
            record.update({f"test_{k}": v for k, v in
                           evaluate(model_outputs(model, bundle.test, ctx), bundle.test, bundle.task).items()})
            running = recipe.running_model(model)
            if running is not None and not last:  # the last epoch's average is the final model, evaluated below
                if has_batchnorm(running):  # recompute BN on a copy: the average's own BN stays as it is
                    running = copy.deepcopy(running)
                    update_bn(ctx.bn_loader(), running, max_batches=ctx.bn_batches)
                record.update({f"avg_test_{k}": v for k, v in
                               evaluate(model_outputs(running, bundle.test, ctx), bundle.test, bundle.task).items()})
        history.append(record)
        rng_states = world.gather(torch.get_rng_state())  # every rank's dropout stream ([its own] in one process)
        if world.main:  # under DDP rank 0 alone writes
            if train.save_trajectory:
                trajectory = load_torch(run_dir / "trajectory.pt") if epoch > 0 and (run_dir / "trajectory.pt").exists() else []
                atomic_save(trajectory[:epoch] + [_cpu_state(model)], run_dir / "trajectory.pt")
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            atomic_save({
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "recipe": recipe.state_dict(), "generator": generator.get_state(),
                "torch_rng": rng_states[0], "history": history,
                **({"torch_rng_ranks": rng_states} if world.size > 1 else {}),
            }, checkpoint_path)
        on_epoch()

    splits = {name: getattr(bundle, name) for name in ("train", "val", "test") if len(getattr(bundle, name))}
    outputs = recipe.predict(model, splits, ctx)
    if world.main:
        atomic_save(recipe.final_state(model), run_dir / "final.pt")
    results: dict[str, float] = {}
    for name, split in splits.items():
        results.update({f"{name}_{k}": v for k, v in evaluate(outputs[name], split, bundle.task).items()})
    if history and recipe.running_model(model) is not None:  # the learning curve's last average point
        history[-1].update({k.replace("test_", "avg_test_", 1): v for k, v in results.items() if k.startswith("test_")})
        if world.main:
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    return RunResult("done", recipe.epochs, results)


def bn_loader(cfg: ExperimentConfig, bundle: DataBundle, seed: int, device: torch.device | None,
              world: World = World()) -> Iterable[Any]:
    """The training data pass that recomputes BatchNorm statistics of a run's averaged models.

    Seeded per run (so a resumed run and ``swalab landscape`` repeat it exactly); under DDP whole
    global batches are dealt round-robin to the ranks.
    """
    train = cfg.train
    loader = BatchLoader(bundle.train, train.batch_size, shuffle=True,
                         generator=torch.Generator().manual_seed(20_000 + seed),
                         augment=bundle.augment if train.augment else None, device=device)
    return shard_batches(loader, world, whole_batches=True, max_batches=train.bn_batches)


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _mark_diverged(checkpoint_path: Path, message: str) -> None:
    """Keep the last good checkpoint, flagged so a re-run reports the divergence instead of retrying."""
    if checkpoint_path.exists():
        ckpt = load_torch(checkpoint_path)
        ckpt["diverged"] = message
        atomic_save(ckpt, checkpoint_path)
    else:
        atomic_save({"epoch": -1, "diverged": message}, checkpoint_path)
