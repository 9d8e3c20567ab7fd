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
import fnmatch
import itertools
import math
import numbers
import operator
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
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
from swalab._files import save_whole

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

    With ``half_life`` = H optimizer steps instead of ``decay``, a model's weight in the average
    halves every H steps whatever the spacing of the updates: an ``AveragedModel`` updated every
    k-th step (``update_every=k``) uses ``decay = 2 ** (-k / H)`` per update (``decay`` holds the
    per-step value ``2 ** (-1 / H)``). With ``total_steps`` = T, ``half_life`` is a fraction of
    training in (0, 1], H = half_life * T.

    Args:
        decay: long-run decay per update in [0, 1] (default 0.999 unless ``half_life`` is given).
        warmup_gamma: warm-up time scale in updates (> 0), or None for no warm-up.
        warmup_power: warm-up exponent (> 0).
        half_life: the decay as a half-life in optimizer steps (> 0), or a fraction of
            ``total_steps``.
        total_steps: the length of training in optimizer steps, when ``half_life`` is a fraction.
    """

    decay: float | None = None
    warmup_gamma: float | None = None
    warmup_power: float = 2 / 3
    half_life: float | None = None
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.half_life is not None or self.total_steps is not None:
            object.__setattr__(self, "decay", self._half_life_decay())
        elif self.decay is None:
            object.__setattr__(self, "decay", 0.999)
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

    def _half_life_decay(self) -> float:
        if self.decay is not None:
            raise ValueError(f"give decay or half_life, not both (got decay={self.decay!r})")
        h, total = self.half_life, self.total_steps
        if not (_is_real(h) and 0 < h < math.inf):
            raise ValueError(f"half_life must be a finite number > 0, got {h!r}")
        if total is not None:
            if isinstance(total, bool) or not isinstance(total, int) or total < 1:
                raise ValueError(f"total_steps must be an integer >= 1, got {total!r}")
            if h > 1:
                raise ValueError(
                    f"half_life is a fraction of total_steps, in (0, 1]; got {h!r} with "
                    f"total_steps={total}"
                )
            h = h * total
        return 2.0 ** (-1.0 / h)

    def weight(self, n: int, every: int = 1) -> float:
        """The weight of the (n + 1)-th model; ``every``: optimizer steps between updates, which
        scales the decay when it is given as a half-life."""
        decay = self.decay if every == 1 or self.half_life is None else self.decay**every
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
    averaged: nn.Module, model: nn.Module, names: frozenset[str] | None = None
) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """The (average, model) pairs of parameters and of buffers, in order, once ``ValueError`` has
    named any tensor of ``model`` whose count, shape or kind differs; only those named in
    ``names`` if given (the average's subset)."""
    ours_p, theirs_p = list(averaged.named_parameters()), list(model.named_parameters())
    ours_b, theirs_b = list(averaged.named_buffers()), list(model.named_buffers())
    _check_pairs(ours_p, theirs_p, "parameters", "the averaged model")
    _check_pairs(ours_b, theirs_b, "buffers", "the averaged model")
    return (
        [(a, t) for (n, a), (_, t) in zip(ours_p, theirs_p) if names is None or n in names],
        [(a, t) for (n, a), (_, t) in zip(ours_b, theirs_b) if names is None or n in names],
    )


def _select(
    model: nn.Module, include: Any, exclude: Any, trainable_only: bool
) -> frozenset[str] | None:
    """Canonical names (those of the unwrapped model) of the parameters and buffers averaged, or
    None for all: names matching an ``include`` pattern (all if None), none of the ``exclude``
    patterns, and, with ``trainable_only``, parameters that require grad (no buffers).
    Patterns are ``fnmatch`` globs (``"*lora_*"``); one that matches no name is an error."""
    if not isinstance(trainable_only, bool):
        raise ValueError(f"trainable_only must be True or False, got {trainable_only!r}")
    params, buffers = list(model.named_parameters()), list(model.named_buffers())
    names = [n for n, _ in params + buffers]
    chosen = [n for n, p in params if p.requires_grad] if trainable_only else list(names)
    for arg, patterns in (("include", include), ("exclude", exclude)):
        if patterns is None:
            continue
        listed = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(listed, (list, tuple, set, frozenset)) or not all(
            isinstance(x, str) for x in listed
        ):
            raise ValueError(f"{arg} must be a pattern or a list of patterns, got {patterns!r}")
        for pattern in listed:
            if not fnmatch.filter(names, pattern):
                raise ValueError(
                    f"{arg} pattern {pattern!r} matches no parameter or buffer of the model "
                    f"(names look like {names[0]!r})"
                )
        matches = {n for n in names if any(fnmatch.fnmatchcase(n, x) for x in listed)}
        chosen = [n for n in chosen if (n in matches) == (arg == "include")]
    if not chosen:
        raise ValueError("include/exclude/trainable_only leave no parameter or buffer to average")
    return None if len(chosen) == len(names) else frozenset(chosen)


_REGISTRATIONS = [0]  # modules, parameters and buffers set on any module so far (see ModelBinding)
_RECENT: deque[int] = deque(maxlen=256)  # id() of the modules of the latest registrations


def _count_registration(module: nn.Module, name: str, value: Any) -> None:
    _REGISTRATIONS[0] += 1
    _RECENT.append(id(module))


for _register in (
    nn.modules.module.register_module_module_registration_hook,
    nn.modules.module.register_module_parameter_registration_hook,
    nn.modules.module.register_module_buffer_registration_hook,
):
    _register(_count_registration)


class ModelBinding:
    """A model's tensors looked up once, and a cheap test that the model still holds them.

    ``holds(model)`` notices a replaced submodule or parameter, ``model.to(dtype)``,
    ``.data = ...`` and ``load_state_dict(..., assign=True)`` without walking
    ``named_parameters()`` again: the tensors' storage addresses are compared, and the module
    trees' slots by identity -- only after one of their modules registered a child, parameter or
    buffer (torch's global registration hooks record which), or a container lost a child (``del``).
    (A parameter or buffer deleted with nothing registered after it is not noticed until then.)
    ``also`` are more modules watched the same way (the average's own, for ``AveragedModel``).
    """

    def __init__(
        self, model: nn.Module, tensors: Sequence[Tensor], also: Sequence[nn.Module] = ()
    ) -> None:
        """``tensors``: the model's own parameters and buffers (not detached aliases of them)."""
        self.model = model
        roots = [model, *also]
        modules = [m for root in roots for m in root.modules()]
        self._slots = _slots(modules)
        self._registrations = _REGISTRATIONS[0]
        self._tree = _tree(self._slots)
        self._containers = [m._modules for m in modules if m._modules]
        self._children = sum(map(len, self._containers))
        self._ids = set(map(id, modules))
        self._tensors = list(tensors)
        self._ptrs = list(map(Tensor.data_ptr, self._tensors))

    def holds(self, model: nn.Module) -> bool:
        if model is not self.model or list(map(Tensor.data_ptr, self._tensors)) != self._ptrs:
            return False
        now = _REGISTRATIONS[0]
        if now != self._registrations:
            new = now - self._registrations
            if new > len(_RECENT) or any(
                i in self._ids for i in itertools.islice(reversed(_RECENT), new)
            ):  # one of ours registered something, or too many registrations to tell
                tree = _tree(self._slots)
                if len(tree) != len(self._tree) or not all(map(operator.is_, tree, self._tree)):
                    return False
            self._registrations = now  # still ours
        return sum(map(len, self._containers)) == self._children


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
            if weight == 1.0:
                torch.cat(src_views, out=avg_flat)  # a copy: no scratch, one op
            else:
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
        """``model`` as the caller passed it (``torch.compile`` and DDP wrappers unwrapped here)."""
        param_pairs, buffer_pairs = _pairs(averaged.module, _unwrap(model), averaged.selected)
        if averaged.sharded:  # the rank's own shards (a ValueError if the sharding changed)
            inner = _unwrap(model)
            ours = [*averaged.module.named_parameters(), *averaged.module.named_buffers()]
            sharded.check_layout(ours, [*inner.named_parameters(), *inner.named_buffers()])
            param_pairs = [(sharded.local(a), sharded.local(t)) for a, t in param_pairs]
            buffer_pairs = [(sharded.local(a), sharded.local(t)) for a, t in buffer_pairs]
        pairs = param_pairs + buffer_pairs
        # The average's side too: ``averaged.module.to(...)``, ``averaged.module[1] = ...`` or
        # ``averaged.module.load_state_dict(sd, assign=True)`` give it tensors unseen by us.
        self.binding = ModelBinding(
            model, [t for _, t in pairs] + [a for a, _ in pairs], also=[averaged]
        )
        params = [(a.detach(), t.detach()) for a, t in param_pairs]
        buffers = [(a.detach(), t.detach()) for a, t in buffer_pairs]
        candidates = params + buffers if averaged.use_buffers else params
        self.folded = [(a, t) for a, t in candidates if a.is_floating_point() or a.is_complex()]
        self.all = params + buffers
        self.folded_ids = folded = {id(a) for a, _ in self.folded}
        self.averaged = _Groups(self.folded)
        self.copied = _Groups([(a, t) for a, t in self.all if id(a) not in folded])
        self.snapshot: _Snapshot | None = None  # for asynchronous updates, made on the first
        # A copy of the folded average on the CPU, made on the first update through a user
        # function and kept, for putting the average back if the function raises.
        self.saved: list[list[Tensor]] | None = None


class _Snapshot:
    """The model's tensors of a pairing copied into host staging, and the fold of that copy.

    ``take()`` copies them on the caller's thread (from a GPU: non-blocking, into pinned memory,
    and returns the CUDA event that marks the end of the copies); ``fold(weight, event)`` then
    folds the copy into the average (a CPU average), on any thread.
    """

    def __init__(self, folded: list[tuple[Tensor, Tensor]], copied: list[tuple[Tensor, Tensor]]):
        pairs = folded + copied
        pin = torch.cuda.is_available() and any(t.device.type == "cuda" for _, t in pairs)
        sizes: dict[torch.dtype, int] = {}
        for _, t in pairs:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
        flats = {dtype: torch.empty(n, dtype=dtype, pin_memory=pin) for dtype, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        views = []
        for _, t in pairs:
            start = offsets[t.dtype]
            offsets[t.dtype] += t.numel()
            views.append(flats[t.dtype][start : start + t.numel()].view(t.shape))
        self.copies: dict[tuple[Any, ...], tuple[list[Tensor], list[Tensor]]] = {}
        for view, (_, t) in zip(views, pairs):
            into, sources = self.copies.setdefault((t.device, t.dtype), ([], []))
            into.append(view)
            sources.append(t)
        self.on_gpu = any(t.device.type == "cuda" for _, t in pairs)
        self.averaged = _Groups([(a, v) for (a, _), v in zip(folded, views)])
        self.copied = _Groups([(a, v) for (a, _), v in zip(copied, views[len(folded) :])])

    def take(self) -> Any:
        for into, sources in self.copies.values():
            torch._foreach_copy_(into, sources, non_blocking=True)
        if not self.on_gpu:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def fold(self, weight: float, event: Any) -> None:
        if event is not None:
            event.synchronize()
        with torch.no_grad():
            self.averaged.apply(weight)
            self.copied.apply(1.0)


class _Worker:
    """One worker thread that folds snapshots into a CPU average; ``join()`` waits for the last
    fold and raises its error, if any."""

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None
        self.pending: Future[None] | None = None

    def join(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def submit(self, pairing: _Pairing, weight: float) -> None:
        self.join()  # the staging and the average are free again
        if pairing.snapshot is None:
            pairing.snapshot = _Snapshot(
                pairing.folded, [(a, t) for a, t in pairing.all if id(a) not in pairing.folded_ids]
            )
        event = pairing.snapshot.take()
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix="swalab-average")
        self.pending = self.executor.submit(pairing.snapshot.fold, weight, event)


class _HostCount:
    """``n_averaged`` mirrored on the host, so that an update never reads the device.

    The buffer is written after each update (on the CPU through a NumPy view of its memory: no
    dispatch, no version bump; elsewhere with ``fill_``, a launch but no synchronisation). A write
    by anyone else (``fill_``, ``zero_``, ``+=``, ``copy_``/``load_state_dict``, assignment of a new
    tensor) changes the buffer's ``_version`` counter or identity, and the next ``read`` takes the
    buffer's value (the only time the host waits for the device).
    """

    __slots__ = ("value", "calls", "buffer", "view", "version")

    def __init__(self, calls: int = 0) -> None:
        self.value = 0
        self.calls = calls  # steps seen when the caller gives none
        self.buffer: Tensor | None = None  # the buffer the mirror follows
        self.view: Any = None  # a NumPy view of a CPU buffer, written without dispatch
        self.version = -1

    def detached(self) -> _HostCount:
        """A mirror for a copy of the model: same step count, follows the copy's buffer."""
        return _HostCount(self.calls)

    def read(self, buffer: Tensor) -> int:
        if buffer is not self.buffer or buffer._version != self.version:
            self.value = int(buffer)  # written by someone else: take it
            self._follow(buffer)
        return self.value

    def _follow(self, buffer: Tensor) -> None:
        self.buffer, self.view = buffer, None
        if buffer.device.type == "cpu" and not buffer.requires_grad:
            with contextlib.suppress(TypeError, RuntimeError):  # e.g. bfloat16 has no NumPy view
                self.view = buffer.numpy()
        self.version = buffer._version

    def write(self, buffer: Tensor, value: int) -> None:
        if buffer is not self.buffer:
            self._follow(buffer)
        self.value = value
        if self.view is not None:
            self.view[...] = value
        else:
            buffer.fill_(value)
            self.version = buffer._version


class AveragedModel(nn.Module):
    r"""Averaged copy of a model for SWA and EMA; a drop-in for ``torch.optim.swa_utils.AveragedModel``.

    Same constructor, ``update_parameters``, ``n_averaged``, ``module``, ``forward`` and
    ``state_dict`` keys as torch's. With the default rule (``SWA()``, or ``rule=EMA(...)``) each
    update is one ``torch._foreach_lerp_`` per (device, dtype) group over parameters and averaged
    buffers; it never synchronises with the device. ``n_averaged`` is torch's buffer, written after
    each update and read like torch's (``fill_(0)``, ``+=``, assignment and ``load_state_dict`` are
    taken into account), with a host mirror so the update never reads it back. The model's tensors
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
        include: ``fnmatch`` pattern(s) on canonical parameter and buffer names (those of the
            unwrapped model, e.g. ``"*.lora_*"``): average only these.
        exclude: pattern(s) of names not to average.
        trainable_only: average only the parameters that require grad (e.g. LoRA/adapter
            weights of a frozen base model), no buffers. With any of these three, the tensors not
            averaged are not copied: ``module`` shares them with ``model`` (same tensors), and
            ``save_average`` exports only the averaged ones.
        asynchronous: fold updates in on a worker thread (an average on the CPU only): the model's
            tensors are copied into host staging (non-blocking, pinned, from a GPU) and the fold
            runs while training goes on; the next update, ``forward``, ``state_dict``,
            ``swapped_into``, ``save_average``, ``update_bn``, ``load_state_dict`` and ``to()``
            wait for it first (call ``join()`` before reading ``module``'s tensors yourself).
            Results are those of the synchronous update. With ``rule=`` (SWA, EMA) only.
        snapshots: a ``swalab.posthoc.Snapshots`` that collects the model at every call of
            ``update_parameters`` (before ``update_every``/``update_after`` gate the average), for
            choosing SWA windows, LAWA or the EMA length after training.

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
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        trainable_only: bool = False,
        asynchronous: bool = False,
        snapshots: Any = None,
    ) -> None:
        super().__init__()
        if snapshots is not None and not callable(getattr(snapshots, "update", None)):
            raise ValueError(f"snapshots must be a swalab.posthoc.Snapshots, got {snapshots!r}")
        if sum(f is not None for f in (avg_fn, multi_avg_fn, rule)) > 1:
            raise ValueError("give at most one of avg_fn, multi_avg_fn and rule")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        if isinstance(update_after, bool) or not isinstance(update_after, int) or update_after < 0:
            raise ValueError(f"update_after must be an integer >= 0, got {update_after!r}")
        if not isinstance(asynchronous, bool):
            raise ValueError(f"asynchronous must be True or False, got {asynchronous!r}")
        if asynchronous and (avg_fn is not None or multi_avg_fn is not None):
            raise ValueError(
                "asynchronous=True folds with rule= (SWA, EMA), not avg_fn/multi_avg_fn"
            )
        self.sharded = sharded.is_sharded(model)
        # The canonical names of the tensors averaged (None: all); the others are shared.
        self.selected = _select(_unwrap(model), include, exclude, trainable_only)
        if self.sharded:
            for name, given in (("device", device), ("asynchronous", asynchronous or None)):
                if given is not None:
                    raise ValueError(
                        f"{name}={given!r}: the average of a sharded model lives with its shards "
                        f"and is updated in place (leave {name} unset)"
                    )
            if self.selected is not None:
                raise ValueError(
                    "include=/exclude=/trainable_only= select tensors of unsharded models; "
                    "a sharded model's average holds all of its parameters"
                )
            self.module = sharded.average_module(_unwrap(model), dtype=dtype)
        else:
            self.module = _copy_module(_unwrap(model), device, dtype, self.selected)
        # n_averaged is torch's buffer, always up to date; the count is mirrored on the host (see
        # _HostCount) so that an update never reads it back from the device.
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self.rule = rule if rule is not None else SWA()
        self.update_every, self.update_after = update_every, update_after
        self._host = _HostCount()
        self._pairing: _Pairing | None = None
        self._source = weakref.ref(model)  # the default model of attach()
        self._worker = _Worker() if asynchronous else None
        if asynchronous and any(t.device.type != "cpu" for t in self.module.parameters()):
            raise ValueError(
                "asynchronous=True needs the average on the CPU (device='cpu'); an average on an "
                "accelerator updates without waiting already"
            )
        self.snapshots = snapshots

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.join()
        if self.sharded:
            raise ValueError(
                "the average of a sharded model runs inside the model: "
                "use `with averaged.swapped_into(model): model(x)`"
            )
        return self.module(*args, **kwargs)

    def join(self) -> None:
        """Wait for an asynchronous update in flight (and raise its error); no-op otherwise."""
        worker = self.__dict__.get("_worker")
        if worker is not None:
            worker.join()

    @property
    def count(self) -> int:
        """Number of models averaged so far (``int(n_averaged)``, read from its host mirror)."""
        return self._host.read(self._buffers["n_averaged"])

    def _bind(self, model: nn.Module) -> _Pairing:
        """The pairing with ``model``: the bound one if the cheap test passes, else checked anew."""
        if self.sharded:  # FSDP2 left unsharded (by an evaluation) holds other parameters, set
            sharded.reshard(model)  # without a registration the cheap check would see
        pairing = self._pairing
        if pairing is None or not pairing.binding.holds(model):
            self._pairing = None  # a failed check leaves nothing bound
            with torch.no_grad():
                pairing = self._pairing = _Pairing(self, model)
        return pairing

    def _weight(self, count: int) -> float | None:
        """The weight of the (count + 1)-th model; None when a user function averages."""
        if count == 0:
            return 1.0
        if self.avg_fn is not None or self.multi_avg_fn is not None:
            return None
        rule = self.rule  # an EMA given as a half-life scales its decay to the spacing
        return (
            rule.weight(count, self.update_every) if isinstance(rule, EMA) else rule.weight(count)
        )

    def should_update(self, step: int) -> bool:
        """Whether ``step`` (0-based) is averaged: ``step >= update_after`` and every ``update_every``-th after it."""
        return step >= self.update_after and (step - self.update_after) % self.update_every == 0

    def update_parameters(self, model: nn.Module, step: int | None = None) -> bool:
        """Fold ``model``'s current weights into the average (the first averaged call copies them).

        ``step`` is the caller's 0-based optimizer step (pass it when resuming: the default counts this
        object's own calls, which are not checkpointed). Returns whether this step was averaged.
        """
        host = self._host
        if step is None:
            step = host.calls
            host.calls += 1
        if self.snapshots is not None:
            self.snapshots.update(_unwrap(model), step=step)
        if not self.should_update(step):
            return False
        pairing = self._bind(model)
        buffer = self._buffers["n_averaged"]
        count = host.read(buffer)
        weight = self._weight(count)
        # The pairing holds detached aliases of both sides: no autograd, no torch.no_grad needed.
        if self._worker is not None:
            self._worker.submit(pairing, weight)
        elif weight is None:
            with torch.no_grad():
                self._update_with_torch_fn(pairing, buffer)
            pairing.copied.apply(1.0)
        else:
            pairing.averaged.apply(weight)
            pairing.copied.apply(1.0)
        host.write(buffer, count + 1)
        return True

    def _update_with_torch_fn(self, pairing: _Pairing, n_averaged: Tensor) -> None:
        """The user's ``avg_fn``/``multi_avg_fn``, called as ``torch.optim.swa_utils`` calls them.

        Floating tensors only, grouped by the average's (device, dtype) like torch. All or nothing:
        the averaged tensors are first copied aside (into one more copy of them: from the caching
        allocator on an accelerator, kept between updates on the CPU) and put back if the function
        raises, so a function that fails half-way leaves the average as it was. torch's own
        ``get_ema_multi_avg_fn``/``get_swa_multi_avg_fn`` on one group skip the copy.
        """
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

    def reset(self) -> None:
        """Start a new average: the next ``update_parameters`` copies the model (periodic SWA)."""
        self._host.write(self._buffers["n_averaged"], 0)

    def load_state_dict(
        self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        self.join()
        result = super().load_state_dict(
            _strip_compile_prefix(state_dict), strict=strict, assign=assign
        )
        self._pairing = None  # n_averaged was written: its host mirror reads it again
        return result

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> AveragedModel:
        self.join()
        self._pairing = None  # .to(), .cuda(), .half() ... give the average new tensors
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # The pairing holds the trained model's tensors: never pickle or deep-copy it. The host
        # mirror of n_averaged starts again from the buffer (always up to date).
        self.join()
        worker = _Worker() if self.__dict__.get("_worker") is not None else None
        return dict(
            super().__getstate__(),
            _pairing=None,
            _host=self._host.detached(),
            _source=None,
            _worker=worker,
            snapshots=None,  # a copy writing into the same directory would corrupt it
        )

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        self.join()  # the module's tensors are saved by its own hook, after this one
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def attach(
        self, optimizer: torch.optim.Optimizer, model: nn.Module | None = None, every: int = 1
    ) -> torch.utils.hooks.RemovableHandle:
        """Update the average after each ``optimizer.step()`` (its post-step hook).

        One update per real optimizer step, so gradient accumulation (several backward passes per
        step) and a ``GradScaler`` that skips a step are handled. ``every=k`` sets
        ``update_every`` (every k-th step, counted from ``update_after``; a half-life EMA keeps its
        time scale). ``model``: the model averaged (default: the one given to the constructor).
        Returns the hook's handle: ``handle.remove()`` detaches.

        Example:
            >>> ema = swalab.AveragedModel(model, rule=swalab.EMA(half_life=1000))
            >>> ema.attach(optimizer, every=10)
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if every != 1 and self.update_every not in (1, every):
            raise ValueError(f"every={every} conflicts with update_every={self.update_every}")
        target = model if model is not None else self._source and self._source()
        if target is None:
            raise ValueError("attach: the model given to the constructor is gone; pass model=")
        if every != 1:
            self.update_every = every
        return optimizer.register_step_post_hook(
            lambda _optimizer, _args, _kwargs: self.update_parameters(target)
        )

    def average_state_dict(self) -> dict[str, Tensor]:
        """The average as a plain ``state_dict`` of the model: canonical names (no ``module.``,
        ``_orig_mod.`` or ``n_averaged``), only the averaged tensors with ``include``/``exclude``/
        ``trainable_only`` (load those with ``strict=False``). A sharded average is gathered
        (a collective: call it on every rank)."""
        self.join()
        names = self.selected
        return {
            k: sharded.gather(v)
            for k, v in self.module.state_dict().items()
            if names is None or k in names
        }

    def save_average(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`average_state_dict` to ``path`` with ``torch.save`` (a temporary file and a
        rename: never half-written); ``model.load_state_dict(torch.load(path))`` puts it in. A
        sharded average is gathered once and written by rank 0 (call it on every rank)."""
        if self.sharded:
            sharded.save_average(self.module, path)
            return
        save_whole(self.average_state_dict(), Path(path))

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
        self.join()
        if self.sharded:
            sharded.reshard(model)
        params, buffers = _pairs(self.module, _unwrap(model), self.selected)
        self._pairing = None  # storage moves between the two models: pair again afterwards
        if self.sharded:
            sharded.check_layout(
                list(self.module.named_parameters()), list(_unwrap(model).named_parameters())
            )
            with sharded.swapped_into(model, params, buffers):
                yield model
            return
        pairs = [(t, a) for a, t in params + buffers if t.is_floating_point() or t.is_complex()]
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


def _copy_module(
    model: nn.Module,
    device: Any,
    dtype: torch.dtype | None,
    names: frozenset[str] | None = None,
) -> nn.Module:
    """Copy of ``model`` with every tensor created directly on ``device``/``dtype`` (one copy at peak).

    The copies of each (device, dtype) are views into one flat buffer, parameters first, then
    buffers, in the model's order, so that an update can be one operation over the whole buffer.
    Tensors a module keeps as plain attributes (the weight that ``weight_norm`` and
    ``spectral_norm`` compute in each forward, not a graph leaf, which ``copy.deepcopy`` refuses)
    are copied detached (to ``device``, in their dtype). When ``copy.deepcopy`` still fails (a
    module holding a lock, a file or another object that cannot be copied), the modules are copied
    one by one instead (:func:`_copy_tree`), sharing such attributes with the model. With
    ``names``, only the named tensors are copied; the others are the model's own, shared.
    """
    memo: dict[int, Any] = {}
    named = list(itertools.chain(model.named_parameters(), model.named_buffers()))
    if names is not None:
        memo.update((id(t), t) for n, t in named if n not in names)
    tensors = [t for n, t in named if id(t) not in memo]
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
    for t, key in zip(tensors, keys):
        start = offsets[key]
        offsets[key] += t.numel()
        clone = flats[key][start : start + t.numel()].view(t.shape)
        clone.copy_(t.detach())
        if isinstance(t, nn.Parameter):
            clone = nn.Parameter(clone, requires_grad=t.requires_grad)
        memo[id(t)] = clone
    for t in _attribute_tensors(model):
        if id(t) not in memo:
            memo[id(t)] = t.detach().to(device=device, copy=True)
    try:
        return copy.deepcopy(model, dict(memo))
    except Exception:  # noqa: BLE001 -- any object deepcopy cannot copy: copy module by module
        return _copy_tree(model, memo, {})


def _attribute_tensors(model: nn.Module) -> Iterator[Tensor]:
    """Tensors held as plain module attributes (directly or in a list, tuple or dict)."""
    for module in model.modules():
        for value in vars(module).values():
            items = value.values() if isinstance(value, dict) else value
            if isinstance(value, Tensor):
                yield value
            elif isinstance(value, (list, tuple, dict)):
                yield from (v for v in items if isinstance(v, Tensor))


def _copy_tree(module: nn.Module, tensors: dict[int, Any], done: dict[int, nn.Module]) -> nn.Module:
    """A new module object per module (``copy.copy``) with new slots for children, parameters and
    buffers (the copies in ``tensors``) and hook dicts of its own; other attributes are shared."""
    if id(module) in done:
        return done[id(module)]
    new = done[id(module)] = copy.copy(module)
    for key, value in vars(module).items():
        if key in ("_parameters", "_buffers"):
            new.__dict__[key] = {k: tensors.get(id(v), v) for k, v in value.items()}
        elif key == "_modules":
            new.__dict__[key] = {
                k: None if c is None else _copy_tree(c, tensors, done) for k, c in value.items()
            }
        elif isinstance(value, Tensor):
            new.__dict__[key] = tensors.get(id(value), value)
        elif isinstance(value, dict) and key.endswith(
            ("hooks", "hooks_with_kwargs", "always_call")
        ):
            new.__dict__[key] = copy.copy(value)
    return new


@torch.no_grad()
def restart_from_average(
    averaged: AveragedModel, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Periodic SWA restart (Guo, Jin & Liu, 2023): the model continues from the average.

    Copies the averaged weights (and buffers) into ``model``, clears the optimizer's state
    (momentum) and resets the average's count so the next period starts a fresh average. A model
    whose tensors differ in count, shape or kind raises ``ValueError`` before anything is written.
    """
    averaged.join()
    if averaged.sharded:
        sharded.reshard(model)
    params, buffers = _pairs(averaged.module, _unwrap(model), averaged.selected)
    if averaged.sharded:
        sharded.check_layout(
            list(averaged.module.named_parameters()), list(_unwrap(model).named_parameters())
        )
        params = [(sharded.local(a), sharded.local(t)) for a, t in params]
    lerp_([t.detach() for _, t in params + buffers], [a.detach() for a, _ in params + buffers], 1.0)
    optimizer.state.clear()
    averaged.reset()
