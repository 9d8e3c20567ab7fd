"""Averages of sharded models: FSDP2 (``fully_shard``) and tensor-parallel (DTensor) parameters.

Each rank holds only its shards of the weights, so the average of a sharded model is held the same
way: one DTensor per parameter with the parameter's mesh and placements (FSDP2's uneven dim-0
shards included), whose local tensor is updated from the parameter's local tensor. The SWA/EMA
update of Izmailov et al. (2018) is elementwise, so folding each shard in locally is the update of
the whole model, with no collective. Gathering happens only when asked: :func:`save_average`
(one gather, a plain ``state_dict``) and the DCP checkpoints (:func:`save_checkpoint`,
:func:`load_checkpoint`), which torch.distributed.checkpoint reshards to any world size.

``AveragedModel``, ``SWAG`` and ``FGE`` call into this module when given a sharded model; users
normally only call :func:`save_checkpoint` / :func:`load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swalab._files import save_whole

__all__ = ["is_sharded", "save_checkpoint", "load_checkpoint", "save_average", "gather"]


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds DTensor parameters or is sharded with FSDP2's ``fully_shard``.

    FSDP1 (``FullyShardedDataParallel``, flat parameters) raises ``ValueError``."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "FullyShardedDataParallel (FSDP1) flattens the parameters: shard the model with "
            "FSDP2's torch.distributed.fsdp.fully_shard to average it shard by shard"
        )
    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        is_dtensor(p) for p in model.parameters()
    )


def reshard(model: nn.Module) -> None:
    """Put FSDP2 modules left unsharded (after a forward without backward) back into their
    sharded state, so that their parameters are the DTensor shards (no collective)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local(t: Tensor) -> Tensor:
    """The rank's own part of ``t``: the local tensor of a DTensor (the storage FSDP2 all-gathers
    from), or ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def _layout(t: Tensor) -> str:
    if not is_dtensor(t):
        return "not sharded (a plain tensor)"
    return f"sharded as {tuple(t.placements)} over {t.device_mesh} with local shape {tuple(t._local_tensor.shape)}"


def check_layout(ours: Sequence[tuple[str, Tensor]], theirs: Sequence[tuple[str, Tensor]]) -> None:
    """``ValueError`` naming the first tensor whose sharding (DTensor or not, mesh, placements,
    local shape) differs from the average's; names and global shapes are checked by the caller."""
    for (name, a), (_, t) in zip(ours, theirs):
        same = is_dtensor(a) == is_dtensor(t) and (
            not is_dtensor(a)
            or (
                a.device_mesh == t.device_mesh
                and tuple(a.placements) == tuple(t.placements)
                and a._local_tensor.shape == t._local_tensor.shape
            )
        )
        if not same:
            raise ValueError(
                f"{name} is {_layout(t)}, the average's is {_layout(a)}: the model's sharding changed "
                "since the average was made (build a new average for the new sharding)"
            )


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # kept, so that indexing works


def wrap_like(t: Tensor, local_view: Tensor, leading: int = 0) -> Tensor:
    """``local_view`` (shaped like the rank's part of ``t``, with ``leading`` extra dimensions in
    front) as a DTensor laid out like ``t`` (shard dimensions shifted by ``leading``); itself when
    ``t`` is not a DTensor."""
    if not is_dtensor(t):
        return local_view
    from torch.distributed.tensor import DTensor, Shard

    placements = [Shard(p.dim + leading) if isinstance(p, Shard) else p for p in t.placements]
    shape = (*local_view.shape[:leading], *t.shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local_view, t.device_mesh, placements, run_check=False, shape=shape, stride=stride
    )


@torch.no_grad()
def average_module(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A module tree with ``model``'s names holding copies of its parameters and buffers.

    DTensor parameters become DTensors of the same mesh and placements, their local tensors views
    into one flat buffer per dtype (so an update is one op over it). No FSDP state or hook is
    copied: the tree (plain modules; ``Sequential``, ``ModuleList``, ``ModuleDict`` kept) only
    holds the average; it is evaluated inside the model (``swapped_into``). Tied parameters stay
    tied.
    """
    tensors = [*model.parameters(), *model.buffers()]
    target = [dtype if (dtype is not None and t.is_floating_point()) else t.dtype for t in tensors]
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for t, d in zip(tensors, target):
        key = (local(t).device, d)
        sizes[key] = sizes.get(key, 0) + local(t).numel()
    flats = {key: torch.empty(n, device=key[0], dtype=key[1]) for key, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    copies: dict[int, Tensor] = {}
    for t, d in zip(tensors, target):
        lt = local(t)
        key = (lt.device, d)
        start = offsets[key]
        offsets[key] += lt.numel()
        clone = flats[key][start : start + lt.numel()].view(lt.shape)
        clone.copy_(lt.detach())
        if is_dtensor(t):
            clone = wrap_like(t, clone)
        if isinstance(t, nn.Parameter):
            clone = nn.Parameter(clone, requires_grad=False)
        copies[id(t)] = clone
    mirror: dict[int, nn.Module] = {}
    for m in model.modules():
        container = next((c for c in _CONTAINERS if isinstance(m, c)), nn.Module)
        copy = mirror[id(m)] = container()
        for pname, p in m._parameters.items():
            copy.register_parameter(pname, None if p is None else copies[id(p)])
        for bname, b in m._buffers.items():
            copy.register_buffer(
                bname,
                None if b is None else copies[id(b)],
                persistent=bname not in m._non_persistent_buffers_set,
            )
    for m in model.modules():
        for cname, child in m._modules.items():
            if child is not None:
                mirror[id(m)].add_module(cname, mirror[id(child)])
    return mirror[id(model)]


@contextlib.contextmanager
def swapped_into(
    model: nn.Module,
    params: Sequence[tuple[Tensor, Tensor]],
    buffers: Sequence[tuple[Tensor, Tensor]],
) -> Iterator[None]:
    """Copy the average's local shards into the model's (``(average, live)`` pairs), then back.

    Parameters are copied in place into the local tensors FSDP2 all-gathers from (a swap of
    ``.data`` would not reach them); the model's shards are saved aside (1/world of the model per
    rank). Floating buffers swap storage, so statistics recomputed inside the block (``update_bn``)
    stay with the average. FSDP2 modules left unsharded by a forward inside the block are
    resharded before the model's shards are put back.
    """
    live = [local(t).detach() for _, t in params]
    avg = [local(a).detach() for a, _ in params]
    with torch.no_grad():
        saved = [t.clone() for t in live]
        if live:
            torch._foreach_copy_(live, avg)
    floating = [(a, t) for a, t in buffers if t.is_floating_point()]
    for a, t in floating:
        t.data, a.data = a.data, t.data
    try:
        yield
    finally:
        reshard(model)
        for a, t in floating:
            t.data, a.data = a.data, t.data
        with torch.no_grad():
            if live:
                torch._foreach_copy_(live, saved)


def shared_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """``generator``, or (without one) a generator seeded from rank 0's global RNG, broadcast once:
    every rank then draws the same numbers."""
    if generator is not None:
        return generator
    seed = torch.randint(0, 2**62, (1,))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        seed = seed.to(_comm_device())
        dist.broadcast(seed, src=0)
    return torch.Generator(device).manual_seed(int(seed))


def local_noise(
    templates: Sequence[Tensor], generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise for the rank's shards of ``templates``, flat and in their order.

    Each parameter's whole noise is drawn (the same on every rank, from ``generator``) and the
    rank keeps its own slice, so the gathered noise does not depend on the sharding: at most one
    parameter's noise is held at a time.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    parts = []
    for t in templates:
        lt = local(t)
        z = torch.randn(t.shape, generator=generator, device=lt.device, dtype=dtype)
        if is_dtensor(t):
            shape, offset = compute_local_shape_and_global_offset(
                t.shape, t.device_mesh, t.placements
            )
            z = z[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        parts.append(z.reshape(-1))
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


_END = object()


def _comm_device() -> torch.device:
    """Where a tensor for a collective lives: the current GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _vote(value: bool, op: Any) -> bool:
    flag = torch.tensor([int(value)], device=_comm_device())
    torch.distributed.all_reduce(flag, op=op)
    return bool(flag)


def require_batches(has_batch: bool) -> None:
    """``ValueError`` on every rank unless every rank has a batch (one small all-reduce)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if not has_batch:
            raise ValueError("update_bn of a sharded model: no batch")
        return
    if not _vote(has_batch, dist.ReduceOp.MIN):
        raise ValueError(
            "update_bn of a sharded model: a rank has no batch; every rank needs at least one "
            "(its forward passes are collectives)"
        )


def lockstep(batches: Iterable[Any], modules: Sequence[nn.Module]) -> Iterator[Any]:
    """``batches``, with as many iterations on every rank: a sharded forward is a collective.

    A rank whose batches run out while others still have some replays its first batch, and the
    BatchNorm statistics of ``modules`` are put back as they were after each replayed forward, so
    only the rank's own batches count (``update_bn`` then combines the ranks' statistics). One
    small all-reduce per batch. Every rank needs at least one batch (:func:`require_batches`).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield from batches
        return
    it = iter(batches)
    first = batch = next(it, _END)
    require_batches(first is not _END)
    tracked = [m for m in modules if getattr(m, "running_mean", None) is not None]
    while _vote(batch is not _END, dist.ReduceOp.MAX):
        if batch is not _END:
            yield batch
            batch = next(it, _END)
            continue
        stats = [
            (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in tracked
        ]
        yield first
        with torch.no_grad():
            for m, (mean, var, count) in zip(tracked, stats):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def gather(t: Tensor) -> Tensor:
    """The whole tensor on every rank (one all-gather for a DTensor), detached."""
    return t.detach().full_tensor() if is_dtensor(t) else t.detach()


def _plain_state(module: nn.Module) -> dict[str, Tensor]:
    return {k.replace("_orig_mod.", ""): v for k, v in module.state_dict().items()}


@torch.no_grad()
def save_average(module: nn.Module, path: str | os.PathLike) -> None:
    """Gather the average once and write it on rank 0 as a plain ``state_dict`` (CPU tensors, the
    model's keys) that ``load_state_dict`` takes into the unsharded model; a whole file or none.
    Only rank 0 keeps the whole state; the others hold one gathered tensor at a time."""
    dist = torch.distributed
    writer = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    state = {}
    for key, value in _plain_state(module).items():
        whole = gather(value)  # a collective for a DTensor: every rank, one tensor at a time
        if writer:
            state[key] = whole.cpu()
    if writer:
        save_whole(state, Path(path))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _checkpoint_state(obj: Any) -> dict[str, Any]:
    state = obj.checkpoint_state() if hasattr(obj, "checkpoint_state") else obj.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{type(obj).__name__}.state_dict() must map names to tensors for a DCP checkpoint"
        )
    return state


def _fp32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32) if t.is_floating_point() else t.detach()


@torch.no_grad()
def save_checkpoint(averaged: Any, path: str | os.PathLike) -> None:
    """Save an ``AveragedModel`` or a ``SWAG`` (sharded or not) with ``torch.distributed.checkpoint``.

    Every rank writes its own shards, floating tensors in float32 whatever the parameters' dtype;
    :func:`load_checkpoint` reads it back with any number of processes (DCP reshards). Call it on
    every rank.
    """
    import torch.distributed.checkpoint as dcp

    state = {k: _fp32(v) for k, v in _checkpoint_state(averaged).items()}
    with warnings.catch_warnings():  # one process without a process group is a supported case
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save(state, checkpoint_id=os.fspath(path))


@torch.no_grad()
def load_checkpoint(averaged: Any, path: str | os.PathLike) -> None:
    """Load what :func:`save_checkpoint` wrote, resharded to ``averaged``'s layout (any world size).

    Names and shapes are checked against the checkpoint's metadata first and the tensors read into
    fresh copies, so a mismatch raises ``ValueError`` naming the tensor and leaves ``averaged``
    untouched.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ours = _checkpoint_state(averaged)
    metadata = dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    missing = sorted(set(ours) - set(metadata))
    extra = sorted(set(metadata) - set(ours))
    if missing or extra:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not match the average: missing {missing}, unexpected {extra}"
        )
    for key, value in ours.items():
        meta = metadata[key]
        if not isinstance(meta, TensorStorageMetadata) or tuple(meta.size) != tuple(value.shape):
            shape = tuple(meta.size) if isinstance(meta, TensorStorageMetadata) else "no tensor"
            raise ValueError(
                f"{key} has shape {shape} in checkpoint {os.fspath(path)!r}, the average has {tuple(value.shape)}"
            )
    fresh = {k: torch.empty_like(_fp32(v)) for k, v in ours.items()}
    with warnings.catch_warnings():  # one process without a process group is a supported case
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(fresh, checkpoint_id=os.fspath(path))
    if hasattr(averaged, "load_checkpoint_state"):
        averaged.load_checkpoint_state(fresh)
    else:
        averaged.load_state_dict(fresh)
