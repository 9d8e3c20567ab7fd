"""Weight averaging: SWA, EMA and a drop-in ``AveragedModel`` for ``torch.optim.swa_utils``.

An averaging rule is a pair of functions with explicit state (optax style)::

    rule = SWA()                         # or EMA(decay=0.999, warmup_gamma=10)
    state = rule.init(params)            # AverageState(average=[...], count=0)
    state = rule.update(state, params)   # one multi-tensor pass, count kept on the host

SWA (Izmailov et al., 2018, Algorithm 1) folds each model into an equal running average
``w_swa <- w_swa + (w - w_swa) / (n + 1)``; EMA (Polyak averaging with exponential weights)
uses ``w_ema <- w_ema + (1 - decay_t) (w - w_ema)``. Both are one ``torch._foreach_lerp_`` per
(device, dtype) group with a Python-float weight, so the update reads the average, reads the
weights and writes the average (12 bytes per fp32 parameter) and never waits for the device.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import numbers
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import (
    get_ema_avg_fn,
    get_ema_multi_avg_fn,
    get_swa_avg_fn,
    get_swa_multi_avg_fn,
)

from swalab import sharded

__all__ = [
    "AverageState",
    "AveragingRule",
    "AveragedModel",
    "SWA",
    "EMA",
    "restart_from_average",
    "get_swa_multi_avg_fn",
    "get_ema_multi_avg_fn",
    "get_swa_avg_fn",
    "get_ema_avg_fn",
]


def _is_real(value: Any) -> bool:
    """A real Python or NumPy number, not a bool (``nan`` passes: callers compare it to a range)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class AverageState(NamedTuple):
    """The averaged tensors (updated in place) and how many models they hold."""

    average: list[Tensor]
    count: int = 0


def _groups(
    average: Sequence[Tensor], params: Sequence[Tensor]
) -> list[tuple[list[Tensor], list[Tensor]]]:
    """Pairs of lists that share the average's (device, dtype), in order; params are cast to it."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for a, p in zip(average, params):
        avg_list, param_list = groups.setdefault((a.device, a.dtype), ([], []))
        avg_list.append(a)
        param_list.append(p.to(a.device, a.dtype))  # p itself when already there
    return list(groups.values())


def _fold(avg_list: list[Tensor], src_list: Sequence[Tensor], weight: float) -> None:
    """One (device, dtype) group: ``avg <- lerp(avg, src, weight)``; copied when ``weight == 1``
    or the tensors are integers (e.g. ``num_batches_tracked``)."""
    if weight == 1.0 or not (avg_list[0].is_floating_point() or avg_list[0].is_complex()):
        torch._foreach_copy_(avg_list, src_list)
    else:
        torch._foreach_lerp_(avg_list, src_list, weight)


@torch.no_grad()
def lerp_(average: Sequence[Tensor], params: Sequence[Tensor], weight: float) -> None:
    """``average += weight * (params - average)`` in one multi-tensor pass per (device, dtype).

    Floating tensors are interpolated; integer tensors (e.g. ``num_batches_tracked``) are copied.
    """
    for avg_list, param_list in _groups(average, params):
        _fold(avg_list, param_list, weight)


class AveragingRule:
    """A running average updated by interpolation: ``w_avg <- w_avg + weight(n) (w - w_avg)``.

    ``init(params) -> AverageState`` copies the tensors (to another device/dtype if asked);
    ``update(state, params) -> AverageState`` folds ``params`` in with one ``lerp_`` pass; the first
    update copies. Subclasses define ``weight(n)`` for the (n + 1)-th model, n >= 1.
    """

    def weight(self, n: int) -> float:
        raise NotImplementedError

    def init(
        self, params: Sequence[Tensor], device: Any = None, dtype: torch.dtype | None = None
    ) -> AverageState:
        average = [
            p.detach().to(device=device, dtype=dtype if p.is_floating_point() else None, copy=True)
            for p in params
        ]
        return AverageState(average, 0)

    def update(self, state: AverageState, params: Sequence[Tensor]) -> AverageState:
        lerp_(
            state.average,
            [p.detach() for p in params],
            1.0 if state.count == 0 else self.weight(state.count),
        )
        return AverageState(state.average, state.count + 1)


@dataclass(frozen=True)
class SWA(AveragingRule):
    """Equal-weight running average (Izmailov et al., 2018): ``w <- w + (w_new - w) / (n + 1)``."""

    def weight(self, n: int) -> float:
        return 1.0 / (n + 1)


@dataclass(frozen=True)
class EMA(AveragingRule):
    """Exponential moving average ``w <- decay_t w + (1 - decay_t) w_new``.

    Without warm-up ``decay_t = decay`` (torch's ``get_ema_multi_avg_fn``). With ``warmup_gamma``
    set, ``decay_t = min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)`` for the t-th update
    (t = 0 is the first, which copies), so early weights are forgotten quickly.

    Args:
        decay: long-run decay in [0, 1].
        warmup_gamma: warm-up time scale in updates (> 0), or None for no warm-up.
        warmup_power: warm-up exponent (> 0).
    """

    decay: float = 0.999
    warmup_gamma: float | None = None
    warmup_power: float = 2 / 3

    def __post_init__(self) -> None:
        if not _is_real(self.decay) or not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got {self.decay!r}")
        if self.warmup_gamma is not None and not (
            _is_real(self.warmup_gamma) and 0 < self.warmup_gamma < math.inf
        ):
            raise ValueError(
                f"warmup_gamma must be a finite number > 0 (or None), got {self.warmup_gamma!r}"
            )
        if not (_is_real(self.warmup_power) and 0 < self.warmup_power < math.inf):
            raise ValueError(f"warmup_power must be a finite number > 0, got {self.warmup_power!r}")

    def weight(self, n: int) -> float:
        decay = self.decay
        if self.warmup_gamma is not None:
            decay = min(decay, 1.0 - (1.0 + n / self.warmup_gamma) ** -self.warmup_power)
        return 1.0 - decay


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` (``_orig_mod``) and ``DistributedDataParallel`` (``.module``)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = getattr(model.module, "_orig_mod", model.module)
    return model


def _one_foreach_call(fn: Any) -> bool:
    """Whether ``fn`` is torch's own multi-tensor EMA or SWA function, which changes a group of
    floating tensors in one ``torch._foreach_lerp_`` call: it writes all of them or none."""
    return getattr(fn, "__module__", None) == "torch.optim.swa_utils" and getattr(
        fn, "__qualname__", ""
    ).startswith(("get_ema_multi_avg_fn.", "get_swa_multi_avg_fn."))


def _strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}


def _slots(modules: Sequence[nn.Module]) -> list[dict[str, Any]]:
    """The dicts that hold each module's children, parameters and buffers."""
    return [d for m in modules for d in (m._modules, m._parameters, m._buffers)]


def _tree(slots: Sequence[dict[str, Any]]) -> list[Any]:
    """Every child, parameter and buffer in ``slots`` (C-level iteration): changes when one is
    replaced."""
    return list(itertools.chain.from_iterable(map(dict.values, slots)))


def _same_kind(a: Tensor, b: Tensor) -> bool:
    return a.is_floating_point() == b.is_floating_point() and a.is_complex() == b.is_complex()


def _check_pairs(
    ours: Sequence[tuple[str, Tensor]], theirs: Sequence[tuple[str, Tensor]], kind: str, whose: str
) -> None:
    """``ValueError`` naming the first tensor whose count, shape or kind (float/int) differs."""
    if len(theirs) != len(ours):
        raise ValueError(f"model has {len(theirs)} {kind}, {whose} has {len(ours)}")
    for (name, a), (_, t) in zip(ours, theirs):
        if t.shape != a.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, {whose} has {tuple(a.shape)}")
        if not _same_kind(a, t):
            raise ValueError(f"{name} is {t.dtype}, {whose} has {a.dtype}")


def _pairs(
    averaged: nn.Module, model: nn.Module
) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """The (average, model) pairs of parameters and of buffers, in order, once ``ValueError`` has
    named any tensor of ``model`` whose count, shape or kind differs."""
    ours_p, theirs_p = list(averaged.named_parameters()), list(model.named_parameters())
    ours_b, theirs_b = list(averaged.named_buffers()), list(model.named_buffers())
    _check_pairs(ours_p, theirs_p, "parameters", "the averaged model")
    _check_pairs(ours_b, theirs_b, "buffers", "the averaged model")
    return (
        [(a, t) for (_, a), (_, t) in zip(ours_p, theirs_p)],
        [(a, t) for (_, a), (_, t) in zip(ours_b, theirs_b)],
    )


class ModelBinding:
    """A model's tensors looked up once, and a cheap test that the model still holds them.

    ``holds(model)`` compares the module tree's slots by identity and the tensors' storage
    addresses, so a replaced submodule or parameter, ``model.to(dtype)`` or ``.data = ...`` is
    noticed without walking ``named_parameters()`` again.
    """

    def __init__(self, model: nn.Module, tensors: Sequence[Tensor]) -> None:
        """``tensors``: the model's own parameters and buffers (not detached aliases of them)."""
        self.model = model
        self._slots = _slots(list(model.modules()))
        self._tree = _tree(self._slots)
        self._tensors = list(tensors)
        self._ptrs = list(map(Tensor.data_ptr, self._tensors))

    def holds(self, model: nn.Module) -> bool:
        if model is not self.model:
            return False
        tree = _tree(self._slots)
        return (
            len(tree) == len(self._tree)
            and all(map(operator.is_, tree, self._tree))
            and list(map(Tensor.data_ptr, self._tensors)) == self._ptrs
        )


class HostStaging:
    """Copy tensors of one device and dtype to the host in chunks, through two staging buffers.

    ``run(fn)`` calls ``fn(k, chunk)`` for each chunk ``k``, a 1-D host tensor holding elements
    ``ranges[k]`` of the sources concatenated (flattened, in order); the copy of chunk ``k + 1``
    is in flight while ``fn`` works on chunk ``k``. From a GPU, each chunk is gathered on the
    device (one ``cat``) and copied to pinned memory without blocking; from the CPU (tests, or a
    CPU model) it is gathered straight into the staging buffer. Sources must be contiguous.
    """

    def __init__(self, sources: Sequence[Tensor], chunk_bytes: int = 8 << 20) -> None:
        if not sources or any(not t.is_contiguous() for t in sources):
            raise ValueError("HostStaging needs a non-empty list of contiguous tensors")
        device, dtype = sources[0].device, sources[0].dtype
        if any((t.device, t.dtype) != (device, dtype) for t in sources) or device.type not in (
            "cpu",
            "cuda",
        ):
            raise ValueError("HostStaging needs tensors of one device (CPU or CUDA) and one dtype")
        self._stream_device = device
        per_chunk = max(1, chunk_bytes // sources[0].element_size())
        flats = [t.detach().view(-1) for t in sources]
        self.slices: list[list[Tensor]] = [[]]  # the sources' pieces gathered into each chunk
        self.ranges: list[tuple[int, int]] = []
        start = filled = 0
        for flat in flats:
            lo = 0
            while lo < flat.numel():
                hi = min(flat.numel(), lo + per_chunk - filled)
                self.slices[-1].append(flat[lo:hi])
                filled += hi - lo
                lo = hi
                if filled == per_chunk:
                    self.ranges.append((start, start + filled))
                    start, filled = start + filled, 0
                    self.slices.append([])
        if filled:
            self.ranges.append((start, start + filled))
        else:
            self.slices.pop()
        size = max((e - s for s, e in self.ranges), default=0)
        n_buffers = min(2, len(self.ranges))  # none when every source is empty
        self.on_host = device.type == "cpu"
        pin = not self.on_host and torch.cuda.is_available()
        self._host = [torch.empty(size, dtype=dtype, pin_memory=pin) for _ in range(n_buffers)]
        self._device = (
            []
            if self.on_host
            else [torch.empty(size, dtype=dtype, device=device) for _ in range(n_buffers)]
        )
        self._events = [] if self.on_host else [torch.cuda.Event() for _ in range(n_buffers)]

    def pieces(self, targets: Sequence[Tensor]) -> list[tuple[list[Tensor], list[int]]]:
        """For each chunk, the slices of ``targets`` (contiguous, shaped like the sources) that pair
        with its elements, and their sizes (to ``split`` the chunk)."""
        bounds = list(itertools.accumulate((t.numel() for t in targets), initial=0))
        out = []
        for start, end in self.ranges:
            chunk_pieces, sizes = [], []
            for i, t in enumerate(targets):
                lo, hi = max(start, bounds[i]), min(end, bounds[i + 1])
                if lo < hi:
                    chunk_pieces.append(t.view(-1)[lo - bounds[i] : hi - bounds[i]])
                    sizes.append(hi - lo)
            out.append((chunk_pieces, sizes))
        return out

    def _issue(self, k: int) -> None:
        slot = k % len(self._host)
        n = self.ranges[k][1] - self.ranges[k][0]
        host, pieces = self._host[slot][:n], self.slices[k]
        if self.on_host:
            if len(pieces) > 1:
                torch.cat(pieces, out=host)
            else:
                host.copy_(pieces[0])
            return
        if len(pieces) > 1:
            gathered = self._device[slot][:n]
            torch.cat(pieces, out=gathered)
        else:
            gathered = pieces[0]
        host.copy_(gathered, non_blocking=True)
        self._record(slot)

    def _record(self, slot: int) -> None:
        """Mark the end of the copy into ``slot`` on the stream that runs it (the current one)."""
        self._events[slot].record(torch.cuda.current_stream(self._stream_device))

    def run(self, fn: Callable[[int, Tensor], None]) -> None:
        if not self.ranges:
            return
        self._issue(0)
        for k, (start, end) in enumerate(self.ranges):
            if k + 1 < len(self.ranges):
                self._issue(k + 1)  # into the other buffer, which fn(k - 1) has finished with
            slot = k % len(self._host)
            if self._events:
                self._events[slot].synchronize()
            fn(k, self._host[slot][: end - start])


_GATHER_MAX_NUMEL = 1 << 22  # gather at most 16 MB of fp32 into a scratch buffer ...
_GATHER_MEAN_NUMEL = 4096  # ... and only tensors this small on average


def _flat_view(tensors: Sequence[Tensor]) -> Tensor | None:
    """A 1-D view over ``tensors`` if they are contiguous, consecutive pieces of one storage."""
    first = tensors[0]
    ptr, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.untyped_storage().data_ptr() != ptr
            or t.storage_offset() != offset
        ):
            return None
        offset += t.numel()
    return first.as_strided((offset - first.storage_offset(),), (1,))


class _Groups:
    """Pairs ``(average tensor, model tensor)`` grouped once, and the update over all of them.

    Groups are keyed by (average device/dtype, model device/dtype): same device and dtype is one
    multi-tensor op on the tensors themselves; a model on an accelerator averaged on the CPU goes
    through :class:`HostStaging`; anything else is cast per update.
    """

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]], chunk_bytes: int = 8 << 20) -> None:
        self.chunk_bytes = chunk_bytes
        self.direct: list[tuple[list[Tensor], list[Tensor]]] = []
        self.gathered: list[tuple[Tensor, list[Tensor], Tensor]] = []
        self.cast: list[tuple[list[Tensor], list[Tensor]]] = []
        self.staged: list[tuple[HostStaging, list[list[Tensor]], list[list[int]], torch.dtype]] = []
        groups: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
        for a, t in pairs:
            avg_list, src_list = groups.setdefault((a.device, a.dtype, t.device, t.dtype), ([], []))
            avg_list.append(a)
            src_list.append(t)
        for (a_device, a_dtype, t_device, t_dtype), (avg_list, src_list) in groups.items():
            if (a_device, a_dtype) == (t_device, t_dtype):
                self._add_direct(avg_list, src_list)
            elif (
                a_device.type == "cpu"
                and t_device.type == "cuda"
                and all(x.is_contiguous() for x in avg_list + src_list)
            ):
                self._add_staged(avg_list, src_list, a_dtype)
            else:
                self.cast.append((avg_list, src_list))

    def _add_direct(self, avg_list: list[Tensor], src_list: list[Tensor]) -> None:
        """One op over flat views when both sides are one buffer; on the CPU, many small tensors of
        the model are first gathered into one (a multi-tensor op there costs about 0.5 us a
        tensor)."""
        avg_flat, src_flat = _flat_view(avg_list), _flat_view(src_list)
        if avg_flat is not None and src_flat is not None:
            self.direct.append(([avg_flat], [src_flat]))
        elif (
            avg_flat is not None
            and avg_flat.device.type == "cpu"
            and len(src_list) > 1
            and avg_flat.numel() <= _GATHER_MAX_NUMEL
            and avg_flat.numel() <= _GATHER_MEAN_NUMEL * len(src_list)
            and all(t.is_contiguous() for t in src_list)
        ):
            self.gathered.append(
                (avg_flat, [t.view(-1) for t in src_list], torch.empty_like(avg_flat))
            )
        else:
            self.direct.append((avg_list, src_list))

    def _add_staged(
        self, avg_list: list[Tensor], src_list: list[Tensor], dtype: torch.dtype
    ) -> None:
        staging = HostStaging(src_list, self.chunk_bytes)
        pieces = staging.pieces(avg_list)
        self.staged.append((staging, [p for p, _ in pieces], [s for _, s in pieces], dtype))

    def apply(self, weight: float) -> None:
        """``average <- lerp(average, model, weight)`` over every group; ``weight == 1`` copies."""
        for avg_list, src_list in self.direct:
            _fold(avg_list, src_list, weight)
        for avg_flat, src_views, scratch in self.gathered:
            _fold([avg_flat], [torch.cat(src_views, out=scratch)], weight)
        for avg_list, src_list in self.cast:
            _fold(avg_list, [t.to(a.device, a.dtype) for a, t in zip(avg_list, src_list)], weight)
        for staging, pieces, sizes, dtype in self.staged:
            staging.run(
                lambda k, chunk, p=pieces, s=sizes, d=dtype: _fold(
                    p[k], chunk.to(d).split(s[k]), weight
                )
            )


class _Pairing:
    """An ``AveragedModel``'s tensors paired with a model's: checked in full once, then bound.

    Parameters (and floating buffers with ``use_buffers``) are averaged in one pass per group;
    integer buffers, and every buffer without ``use_buffers``, are copied.
    """

    def __init__(self, averaged: AveragedModel, model: nn.Module) -> None:
        param_pairs, buffer_pairs = _pairs(averaged.module, model)
        if averaged.sharded:  # the rank's own shards (a ValueError if the sharding changed)
            ours = [*averaged.module.named_parameters(), *averaged.module.named_buffers()]
            sharded.check_layout(ours, [*model.named_parameters(), *model.named_buffers()])
            param_pairs = [(sharded.local(a), sharded.local(t)) for a, t in param_pairs]
            buffer_pairs = [(sharded.local(a), sharded.local(t)) for a, t in buffer_pairs]
        pairs = param_pairs + buffer_pairs
        # The average's tensors too: ``averaged.module.to(...)`` gives them storage unseen by us.
        self.binding = ModelBinding(model, [t for _, t in pairs] + [a for a, _ in pairs])
        params = [(a.detach(), t.detach()) for a, t in param_pairs]
        buffers = [(a.detach(), t.detach()) for a, t in buffer_pairs]
        candidates = params + buffers if averaged.use_buffers else params
        self.folded = [(a, t) for a, t in candidates if a.is_floating_point() or a.is_complex()]
        folded = {id(a) for a, _ in self.folded}
        self.averaged = _Groups(self.folded)
        self.copied = _Groups([(a, t) for a, t in params + buffers if id(a) not in folded])
        # A copy of the folded average on the CPU, made on the first update through a user
        # function and kept, for putting the average back if the function raises.
        self.saved: list[list[Tensor]] | None = None


class AveragedModel(nn.Module):
    r"""Averaged copy of a model for SWA and EMA; a drop-in for ``torch.optim.swa_utils.AveragedModel``.

    Same constructor, ``update_parameters``, ``n_averaged``, ``module``, ``forward`` and
    ``state_dict`` keys as torch's. With the default rule (``SWA()``, or ``rule=EMA(...)``) each
    update is one ``torch._foreach_lerp_`` per (device, dtype) group over parameters and averaged
    buffers, with
    the count kept on the host, so it never synchronises with the device and launches no kernel for
    the bookkeeping (``n_averaged`` is brought up to date when read or saved). The model's tensors
    are paired with the average's on the first update and checked again only when a cheap test
    (same modules, same tensors, same storage) fails. A model on a GPU averaged on the CPU
    (``device="cpu"``) is copied in chunks through pinned memory, each chunk folded in while the
    next is in flight. ``avg_fn``/``multi_avg_fn`` behave exactly as in torch, except that integer
    buffers are copied, never passed to them.

    Everything about the model is checked before anything is written: after a ``ValueError`` the
    average and its count are as before. Between updates the averaged model keeps a reference to
    the last model it was paired with (until ``load_state_dict``, ``to()`` or another model).

    Args:
        model: the model whose weights are averaged (``torch.compile`` and ``DistributedDataParallel``
            wrappers are unwrapped). A model sharded with FSDP2 or holding DTensor parameters is
            averaged shard by shard (see :mod:`swalab.sharded`).
        device: where the average lives (e.g. ``"cpu"`` for a GPU model); default: the model's.
        avg_fn: torch-style per-tensor function ``(averaged, current, n_averaged) -> new averaged``.
        multi_avg_fn: torch-style in-place function over lists of tensors.
        use_buffers: average buffers too (integer buffers are copied); otherwise buffers are copied.
        rule: a swalab ``AveragingRule``: ``SWA()`` (default) or ``EMA(decay, warmup_gamma)``.
        dtype: floating dtype of the average, e.g. ``torch.float32`` for a bf16 model, whose bf16
            average would stop moving once the increments round to zero.
        update_every: average only every k-th step (timm's ``ModelEmaV3``, ema-pytorch's
            ``update_every``, Lightning's ``update_every_n_steps``); warm-up counts averaged models.
        update_after: skip the steps before this one; the first averaged step copies the model.

    Example:
        >>> swa_model = swalab.AveragedModel(model)
        >>> scheduler = swalab.SWALR(optimizer, swa_lr=0.05)
        >>> for epoch in range(epochs):
        ...     for x, y in loader:
        ...         optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        ...     if epoch >= swa_start:
        ...         swa_model.update_parameters(model); scheduler.step()
        >>> swalab.update_bn(loader, swa_model)
        >>> swa_model(x_test)
    """

    sharded = False  # whether the average is held as DTensor shards (set by __init__)

    def __init__(
        self,
        model: nn.Module,
        device: int | str | torch.device | None = None,
        avg_fn: Callable[[Tensor, Tensor, Tensor | int], Tensor] | None = None,
        multi_avg_fn: Callable[[list[Tensor], list[Tensor], Tensor | int], None] | None = None,
        use_buffers: bool = False,
        *,
        rule: AveragingRule | None = None,
        dtype: torch.dtype | None = None,
        update_every: int = 1,
        update_after: int = 0,
    ) -> None:
        super().__init__()
        if sum(f is not None for f in (avg_fn, multi_avg_fn, rule)) > 1:
            raise ValueError("give at most one of avg_fn, multi_avg_fn and rule")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        if isinstance(update_after, bool) or not isinstance(update_after, int) or update_after < 0:
            raise ValueError(f"update_after must be an integer >= 0, got {update_after!r}")
        self.sharded = sharded.is_sharded(model)
        if self.sharded and device is not None:
            raise ValueError(
                f"device={device!r}: the average of a sharded model lives with its shards (leave device unset)"
            )
        copy_module = (
            sharded.average_module
            if self.sharded
            else functools.partial(_copy_module, device=device)
        )
        self.module = copy_module(_unwrap(model), dtype=dtype)
        # n_averaged is torch's buffer; the count lives on the host and is written into it when the
        # buffer is read (the property below) or saved, so updates launch no kernel for it.
        self._buffers["n_averaged"] = torch.tensor(0, dtype=torch.long, device=device)
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self.rule = rule if rule is not None else SWA()
        self.update_every, self.update_after = update_every, update_after
        self._calls = 0  # steps seen when the caller gives none
        self._count = 0
        self._written = 0  # the count last written into the n_averaged buffer
        self._pairing: _Pairing | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.sharded:
            raise ValueError(
                "the average of a sharded model runs inside the model: "
                "use `with averaged.swapped_into(model): model(x)`"
            )
        return self.module(*args, **kwargs)

    @property
    def n_averaged(self) -> Tensor:
        """torch's ``n_averaged`` buffer (a long scalar on the average's device), up to date."""
        buffer = self._buffers["n_averaged"]
        if self._written != self._count:
            buffer.fill_(self._count)
            self._written = self._count
        return buffer

    @property
    def count(self) -> int:
        """Number of models averaged so far (the host copy of ``n_averaged``)."""
        return self._count

    def _bind(self, model: nn.Module) -> _Pairing:
        """The pairing with ``model``: the bound one if the cheap test passes, else checked anew."""
        pairing = self._pairing
        if pairing is None or not pairing.binding.holds(model):
            self._pairing = None  # a failed check leaves nothing bound
            if self.sharded:  # FSDP2 left unsharded (by an evaluation) swaps its parameters
                sharded.reshard(model)
            pairing = self._pairing = _Pairing(self, model)
        return pairing

    def should_update(self, step: int) -> bool:
        """Whether ``step`` (0-based) is averaged: ``step >= update_after`` and every ``update_every``-th after it."""
        return step >= self.update_after and (step - self.update_after) % self.update_every == 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module, step: int | None = None) -> bool:
        """Fold ``model``'s current weights into the average (the first averaged call copies them).

        ``step`` is the caller's 0-based optimizer step (pass it when resuming: the default counts this
        object's own calls, which are not checkpointed). Returns whether this step was averaged.
        """
        if step is None:
            step, self._calls = self._calls, self._calls + 1
        if not self.should_update(step):
            return False
        pairing = self._bind(_unwrap(model))
        if self._count == 0:
            pairing.averaged.apply(1.0)
        elif self.avg_fn is None and self.multi_avg_fn is None:
            pairing.averaged.apply(self.rule.weight(self._count))
        else:
            self._update_with_torch_fn(pairing)
        pairing.copied.apply(1.0)
        self._count += 1
        return True

    def _update_with_torch_fn(self, pairing: _Pairing) -> None:
        """The user's ``avg_fn``/``multi_avg_fn``, called as ``torch.optim.swa_utils`` calls them.

        Floating tensors only, grouped by the average's (device, dtype) like torch. All or nothing:
        the averaged tensors are first copied aside (into one more copy of them: from the caching
        allocator on an accelerator, kept between updates on the CPU) and put back if the function
        raises, so a function that fails half-way leaves the average as it was. torch's own
        ``get_ema_multi_avg_fn``/``get_swa_multi_avg_fn`` on one group skip the copy.
        """
        n_averaged = self.n_averaged
        groups = _groups([a for a, _ in pairing.folded], [t for _, t in pairing.folded])
        if len(groups) == 1 and _one_foreach_call(self.multi_avg_fn):
            ((avg_list, src_list),) = (
                groups  # nothing to copy aside: one call writes all or nothing
            )
            self.multi_avg_fn(avg_list, src_list, n_averaged.to(avg_list[0].device))
            return
        saved = pairing.saved or [[torch.empty_like(a) for a in avg] for avg, _ in groups]
        if all(avg[0].device.type == "cpu" for avg, _ in groups):
            pairing.saved = saved  # there, allocating a copy per update costs more than copying
        for (avg_list, _), old in zip(groups, saved):
            torch._foreach_copy_(old, avg_list)
        try:
            for avg_list, src_list in groups:
                n = n_averaged.to(avg_list[0].device)
                if self.multi_avg_fn is not None:
                    self.multi_avg_fn(avg_list, src_list, n)
                else:
                    for a, t in zip(avg_list, src_list):
                        a.copy_(self.avg_fn(a, t, n))
        except BaseException:
            for (avg_list, _), old in zip(groups, saved):
                torch._foreach_copy_(avg_list, old)
            raise

    def save_average(self, path: str | os.PathLike) -> None:
        """Write the average as a plain ``state_dict`` that ``load_state_dict`` takes into the
        unsharded model: the model's keys (no ``module.``/``_orig_mod.`` prefix, no
        ``n_averaged``), CPU tensors, a whole file or none. A sharded average is gathered once
        and written by rank 0 (call it on every rank)."""
        sharded.save_average(self.module, path)

    def reset(self) -> None:
        """Start a new average: the next ``update_parameters`` copies the model (periodic SWA)."""
        self._count = 0

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        self.n_averaged  # noqa: B018 -- write the host count into the buffer before it is saved
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def load_state_dict(
        self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        self.n_averaged  # noqa: B018 -- up to date, in case the state_dict lacks it (strict=False)
        result = super().load_state_dict(
            _strip_compile_prefix(state_dict), strict=strict, assign=assign
        )
        self._count = self._written = int(self._buffers["n_averaged"])
        self._pairing = None
        return result

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> AveragedModel:
        self._pairing = None  # .to(), .cuda(), .half() ... give the average new tensors
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # The pairing holds the trained model's tensors: never pickle or deep-copy it.
        return dict(super().__getstate__(), _pairing=None)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate the average inside the live ``model``, then put the model's own weights back.

        Parameters and floating buffers are exchanged; tensors on the same device and dtype swap
        storage (no copy, no extra memory), others are copied in and restored from a saved copy.
        Inside the block the averaged model itself holds the live weights: use ``model``. A model
        whose tensors differ in count, shape or kind raises ``ValueError`` before anything moves.

        Example:
            >>> with swa_model.swapped_into(model):
            ...     accuracy = evaluate(model)
        """
        if self.sharded:
            sharded.reshard(model)
        params, buffers = _pairs(self.module, _unwrap(model))
        self._pairing = None  # storage moves between the two models: pair again afterwards
        if self.sharded:
            sharded.check_layout(
                list(self.module.named_parameters()), list(_unwrap(model).named_parameters())
            )
            with sharded.swapped_into(model, params, buffers):
                yield model
            return
        pairs = [(t, a) for a, t in params + buffers if t.is_floating_point()]
        saved = _exchange(pairs, saved=None)
        try:
            yield model
        finally:
            _exchange(pairs, saved)


def _exchange(
    pairs: list[tuple[Tensor, Tensor]], saved: list[Tensor | None] | None
) -> list[Tensor | None]:
    """Swap storage of same-device/dtype pairs; copy the others in (saving) or back (restoring)."""
    out: list[Tensor | None] = []
    with torch.no_grad():
        for i, (live, average) in enumerate(pairs):
            if (live.device, live.dtype) == (average.device, average.dtype):
                live.data, average.data = average.data, live.data
                out.append(None)
            elif saved is None:
                out.append(live.detach().clone())
                live.copy_(average)
            else:
                live.copy_(saved[i])
                out.append(None)
    return out


def _copy_module(model: nn.Module, *, device: Any, dtype: torch.dtype | None) -> nn.Module:
    """Deep copy with every tensor created directly on ``device``/``dtype`` (one copy at peak).

    The copies of each (device, dtype) are views into one flat buffer, parameters first, then
    buffers, in the model's order, so that an update can be one operation over the whole buffer.
    """
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    keys = [
        (
            torch.device(device) if device is not None else t.device,
            dtype if (dtype is not None and t.is_floating_point()) else t.dtype,
        )
        for t in tensors
    ]
    sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    for t, key in zip(tensors, keys):
        sizes[key] = sizes.get(key, 0) + t.numel()
    flats = {key: torch.empty(n, device=key[0], dtype=key[1]) for key, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    memo: dict[int, Any] = {}
    for t, key in zip(tensors, keys):
        start = offsets[key]
        offsets[key] += t.numel()
        clone = flats[key][start : start + t.numel()].view(t.shape)
        clone.copy_(t.detach())
        if isinstance(t, nn.Parameter):
            clone = nn.Parameter(clone, requires_grad=t.requires_grad)
        memo[id(t)] = clone
    return copy.deepcopy(model, memo)


@torch.no_grad()
def restart_from_average(
    averaged: AveragedModel, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Periodic SWA restart (Guo, Jin & Liu, 2023): the model continues from the average.

    Copies the averaged weights (and buffers) into ``model``, clears the optimizer's state
    (momentum) and resets the average's count so the next period starts a fresh average. A model
    whose tensors differ in count, shape or kind raises ``ValueError`` before anything is written.
    """
    if averaged.sharded:
        sharded.reshard(model)
    params, buffers = _pairs(averaged.module, _unwrap(model))
    if averaged.sharded:
        sharded.check_layout(
            list(averaged.module.named_parameters()), list(_unwrap(model).named_parameters())
        )
        params = [(sharded.local(a), sharded.local(t)) for a, t in params]
    lerp_([t.detach() for _, t in params + buffers], [a.detach() for a, _ in params + buffers], 1.0)
    optimizer.state.clear()
    averaged.reset()
