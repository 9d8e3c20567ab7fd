"""Data-parallel runs under ``torch.distributed``: DDP launched by ``torchrun``, one process per device.

    torchrun --standalone --nproc_per_node=8 -m swalab run cifar100-vgg16 --download

Every process runs the same laboratory code (``runner.run_experiment`` → ``trainer.train_run``); the
:class:`World` it is handed says which rank it is. What differs from one process:

- **Data.** ``train.batch_size`` is the *global* batch. Every rank draws the same permutation from
  the same seeded generator, so the global batches are exactly those of the single-process run, and
  takes its contiguous slice of each (:func:`shard_batches`). Like ``DistributedSampler`` each sample
  is seen once per epoch by one rank, but the order is the single-process order, so a run on N
  processes is the single-process run with the same global batch (up to float rounding, for
  models without BatchNorm; see below).
- **Gradients.** The model is wrapped in ``DistributedDataParallel`` (:func:`data_parallel`), which
  averages gradients over ranks. :func:`global_batch_loss` scales each rank's summed loss so that the
  average is the gradient of the global batch's mean loss, also for an unevenly split last batch.
- **Buffers.** BatchNorm normalises with each rank's own slice in the forward pass (torch's default;
  ``SyncBatchNorm`` is not offered). Rank 0's running statistics are broadcast after every optimizer
  step (:func:`broadcast_buffers`, instead of DDP's broadcast before every forward), so the whole model
  state, and with it every average (SWA, EMA, SWAG, FGE), checkpoint and prediction, is identical on
  every rank without any extra communication per averaging update.
- **Evaluation.** Each rank predicts its contiguous part of a split and the parts are gathered
  (:meth:`World.gather_rows`); ``update_bn`` runs on whole global batches dealt round-robin to the
  ranks and all-reduces the statistics, which equals the single-process pass exactly.
- **Files.** Only rank 0 reads and writes the run directory; what it finds (finished runs, checkpoints,
  the pre-training cache) is broadcast (:meth:`World.on_main`), so resuming needs no shared filesystem.
  Downloads happen on rank 0 before the other ranks read the data (a shared data root is assumed).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..data import BatchLoader, Split
from ..data.base import Inputs
from .devices import resolve_device
from .errors import ConfigError
from .task import Task

__all__ = [
    "RendezvousError",
    "ShardedBatches",
    "World",
    "batch_loss",
    "broadcast_buffers",
    "data_parallel",
    "global_batch_loss",
    "rank_seed",
    "reported_by_rank0",
    "restore_rng",
    "setup",
    "shard_batches",
]

T = TypeVar("T")

# Collectives after start-up may wait this long (rank 0 writing a large checkpoint or downloading):
# the short --dist-timeout only bounds how long a process waits for the others to join.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class RendezvousError(ValueError):
    """A process could not reach the others within the timeout (reported as one line)."""


@dataclass(frozen=True)
class World:
    """This process's place in a run: ``size == 1`` is an ordinary single-process run.

    Args:
        rank: global rank (``RANK``); rank 0 alone touches files.
        size: number of processes (``WORLD_SIZE``).
        local_rank: rank on this machine (``LOCAL_RANK``), the GPU index under NCCL.
        device: where this process trains and where its collectives' tensors live.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def on_main(self, fn: Callable[[], T], share: bool = True) -> T:
        """``fn()`` on rank 0 only; every rank returns its result (``share=False``: ``None`` elsewhere).

        An exception on rank 0 is raised on every rank, so all of them stop together instead of the
        others waiting in their next collective.
        """
        if self.size == 1:
            return fn()
        outcome: list[Any] = [None]
        if self.main:
            try:
                value = fn()
            except Exception as err:
                outcome[0] = ("error", _portable(err))
                dist.broadcast_object_list(outcome, src=0)
                raise
            outcome[0] = ("ok", value if share else None)
        dist.broadcast_object_list(outcome, src=0)
        kind, payload = outcome[0]
        if kind == "error":
            payload.reported_by_rank0 = True
            raise payload
        return value if self.main else payload

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on the others (rank 0 downloads what they then read)."""
        value = self.on_main(fn, share=False)
        return value if self.main else fn()

    def bounds(self, rank: int, n: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of ``n`` that belong to ``rank``: contiguous parts differing by at most one."""
        return rank * n // self.size, (rank + 1) * n // self.size

    def shard(self, split: Split) -> Split:
        """This rank's contiguous part of ``split`` (for evaluation)."""
        return split.subset(slice(*self.bounds(self.rank, len(split))))

    def gather_rows(self, part: Tensor, n: int) -> Tensor:
        """Every rank's ``part`` (rows ``bounds(rank, n)`` of a result), concatenated in rank order, on the CPU."""
        sizes = [hi - lo for lo, hi in (self.bounds(r, n) for r in range(self.size))]
        padded = part.new_zeros((max(sizes), *part.shape[1:]), device=self.device)
        padded[: len(part)] = part
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:size] for p, size in zip(parts, sizes)]).cpu()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def close(self, finished: bool = True) -> None:
        """Leave the process group; ``finished``: first wait until every rank is done with it.

        After an error on this rank only, the others may never arrive, so it leaves at once.
        """
        if self.size > 1 and dist.is_initialized():
            gc.collect()  # DDP wrappers of finished runs, before their process group goes
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _portable(err: Exception) -> Exception:
    """``err`` if it survives pickling (to be sent to the other ranks), else a RuntimeError with its text."""
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(str(err))


def reported_by_rank0(err: BaseException) -> bool:
    """Whether a non-zero rank should keep quiet about ``err`` because rank 0 reports the same error.

    Config errors are the same on every rank (same command line), and errors re-raised from rank 0
    by :meth:`World.on_main` are rank 0's; anything else (e.g. a rendezvous failure) is this rank's own.
    """
    rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    return rank != 0 and (isinstance(err, ConfigError) or getattr(err, "reported_by_rank0", False))


def setup(batch_size: int, device: str = "auto", timeout: float = 60.0) -> World:
    """Join the process group described by torchrun's environment, or return a single-process World.

    Args:
        batch_size: the global batch (``train.batch_size``), which must divide evenly over the ranks.
        device: ``train.device``; under CUDA each process takes ``cuda:LOCAL_RANK`` and NCCL, on the CPU gloo.
        timeout: seconds a process waits for all others to join before giving up with one line.

    Raises:
        ConfigError: the batch does not divide over the processes, or a bad device/timeout.
        RendezvousError: the others could not be reached within ``timeout`` seconds.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not timeout > 0:
        raise ConfigError(f"--dist-timeout must be > 0 seconds, got {timeout:g}")
    if batch_size % size:
        raise ConfigError(
            f"train.batch_size {batch_size} is the global batch and must be divisible by the number of "
            f"processes {size}; set train.batch_size to a multiple of {size} or change --nproc_per_node"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    where = resolve_device(device)
    if where.type == "cuda":
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    elif where.type != "cpu":
        raise ConfigError(f"distributed runs need train.device cpu or cuda, got {device!r}")
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        with _quiet_stderr():  # torch's C++ logs each failed connection attempt with a stack trace
            store, _, _ = next(
                dist.rendezvous("env://", rank, size, timeout=timedelta(seconds=timeout))
            )
            _wait_for_all(store, size, timedelta(seconds=timeout))
    except (RuntimeError, TimeoutError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RendezvousError(
            f"process {rank} of {size} could not reach the others at {address} within {timeout:g} s "
            f"(--dist-timeout): {reason}"
        ) from None
    store.set_timeout(COLLECTIVE_TIMEOUT)
    dist.init_process_group(
        "nccl" if where.type == "cuda" else "gloo",
        store=store,
        rank=rank,
        world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return World(rank, size, local_rank, where)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null for the block (C++ logging bypasses ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _wait_for_all(store: dist.Store, size: int, timeout: timedelta) -> None:
    """A barrier on the rendezvous store: torchrun's own store lets a process in without the others."""
    prefix = f"swalab/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if store.add(f"{prefix}/arrived", 1) == size:
        store.set(f"{prefix}/all", "1")
    store.wait([f"{prefix}/all"], timeout)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's global RNG (dropout): ``seed`` on rank 0, as in one process; distinct on the others."""
    return seed + rank * 2**32


def restore_rng(checkpoint: dict[str, Any], world: World, seed: int) -> None:
    """This rank's global RNG state from a checkpoint (a rank it has none for starts its own stream)."""
    states = checkpoint.get("torch_rng_ranks") or [checkpoint["torch_rng"]]
    if world.rank < len(states):
        torch.set_rng_state(states[world.rank])
    else:
        torch.manual_seed(rank_seed(seed, world.rank))


def data_parallel(model: nn.Module, world: World) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (the model itself in one process).

    Train through the wrapper; average, evaluate and checkpoint the model itself (``wrapper.module``),
    whose parameters DDP keeps identical on every rank.
    """
    if world.size == 1:
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # no buffer broadcast before each forward: broadcast_buffers() follows each optimizer step instead
    no_sync = (
        "forward_sync_buffers" if "forward_sync_buffers" in _DDP_PARAMETERS else "broadcast_buffers"
    )
    return DistributedDataParallel(model, device_ids=device_ids, **{no_sync: False})


_DDP_PARAMETERS = inspect.signature(
    DistributedDataParallel.__init__
).parameters  # newer torch renamed the flag


@torch.no_grad()
def broadcast_buffers(model: nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: one broadcast per dtype.

    Called after each optimizer step in place of DDP's broadcast before each forward (the same
    traffic), so after every step the model's whole state is the same on every rank.
    """
    if world.size == 1:
        return
    groups: dict[torch.dtype, list[Tensor]] = {}
    for buffer in model.buffers():
        groups.setdefault(buffer.dtype, []).append(buffer)
    for buffers in groups.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
            b.copy_(part.view_as(b))


def global_batch_loss(task: Task, output: Tensor, y: Tensor, world: World) -> Tensor:
    """The global batch's mean loss, computed from this rank's slice of it, for DDP.

    The value is the mean over the whole global batch, the same on every rank (one all-reduce of
    two numbers, asynchronous on a GPU), so the logged loss and the divergence check agree with one
    process and across ranks. The gradient is that of ``size * (this slice's summed loss) / (global
    count)``, which DDP's averaging over ranks turns into the gradient of the global mean, also when
    the last batch splits unevenly or (node classification) ranks hold different numbers of labels.
    """
    total = task.loss(output, y, reduction="sum")
    count = task.count(y)
    stats = torch.stack([total.detach(), count.to(total)])
    dist.all_reduce(stats)
    share = total * (world.size / stats[1])
    return (
        share + (stats[0] / stats[1] - share).detach()
    )  # value: global mean; gradient: this rank's share


def batch_loss(task: Task, world: World) -> Callable[[Tensor, Tensor], Tensor]:
    """``task.loss`` in one process, :func:`global_batch_loss` under DDP."""
    if world.size == 1:
        return task.loss
    return lambda output, y: global_batch_loss(task, output, y, world)


def _rows(x: Inputs, lo: int, hi: int) -> Inputs:
    return tuple(t[lo:hi] for t in x) if isinstance(x, tuple) else x[lo:hi]


class ShardedBatches:
    """This rank's part of the global batches of a :class:`BatchLoader`.

    The wrapped loader is iterated as in one process (same permutation from its generator, same
    augmentation of each whole global batch, so the generator advances identically on every rank);
    then each rank keeps either its contiguous slice of every batch (training) or every
    ``size``-th whole batch starting at its rank (``whole_batches=True``: ``update_bn``, whose
    all-reduce of per-batch statistics then gives exactly the single-process result).

    Args:
        loader: the single-process loader of global batches.
        world: this process's rank and the number of processes.
        whole_batches: deal whole batches round-robin instead of slicing each.
        max_batches: use only the first ``max_batches`` global batches (``train.bn_batches``).
    """

    def __init__(
        self,
        loader: BatchLoader,
        world: World,
        whole_batches: bool = False,
        max_batches: int | None = None,
    ) -> None:
        self.loader, self.world = loader, world
        self.whole_batches, self.max_batches = whole_batches, max_batches

    def _global_len(self) -> int:
        return (
            len(self.loader)
            if self.max_batches is None
            else min(len(self.loader), self.max_batches)
        )

    def __len__(self) -> int:
        n = self._global_len()
        return len(range(self.world.rank, n, self.world.size)) if self.whole_batches else n

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        n = self._global_len()
        for b, (x, y) in enumerate(self.loader):
            if b >= n:
                return
            if self.whole_batches:
                if b % self.world.size == self.world.rank:
                    yield x, y
            else:
                lo, hi = self.world.bounds(self.world.rank, len(y))
                yield _rows(x, lo, hi), y[lo:hi]


def shard_batches(
    loader: BatchLoader, world: World, whole_batches: bool = False, max_batches: int | None = None
) -> BatchLoader | ShardedBatches:
    """``loader`` itself in one process, else this rank's :class:`ShardedBatches` of it."""
    if world.size == 1:
        return loader
    return ShardedBatches(loader, world, whole_batches, max_batches)
