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
import itertools
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


class AverageState(NamedTuple):
    """The averaged tensors (updated in place) and how many models they hold."""

    average: list[Tensor]
    count: int = 0


def _groups(average: Sequence[Tensor], params: Sequence[Tensor]) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Pairs of lists that share the average's (device, dtype); params are cast to it if needed."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for a, p in zip(average, params):
        avg_list, param_list = groups.setdefault((a.device, a.dtype), ([], []))
        avg_list.append(a)
        param_list.append(p if (p.device, p.dtype) == (a.device, a.dtype) else p.to(a.device, a.dtype))
    return iter(groups.values())


@torch.no_grad()
def lerp_(average: Sequence[Tensor], params: Sequence[Tensor], weight: float) -> None:
    """``average += weight * (params - average)`` in one multi-tensor pass per (device, dtype).

    Floating tensors are interpolated; integer tensors (e.g. ``num_batches_tracked``) are copied.
    """
    for avg_list, param_list in _groups(average, params):
        if avg_list[0].is_floating_point() or avg_list[0].is_complex():
            if weight == 1.0:
                torch._foreach_copy_(avg_list, param_list)
            else:
                torch._foreach_lerp_(avg_list, param_list, weight)
        else:
            torch._foreach_copy_(avg_list, param_list)


class AveragingRule:
    """A running average updated by interpolation: ``w_avg <- w_avg + weight(n) (w - w_avg)``.

    ``init(params) -> AverageState`` copies the tensors (to another device/dtype if asked);
    ``update(state, params) -> AverageState`` folds ``params`` in with one ``lerp_`` pass; the first
    update copies. Subclasses define ``weight(n)`` for the (n + 1)-th model, n >= 1.
    """

    def weight(self, n: int) -> float:
        raise NotImplementedError

    def init(self, params: Sequence[Tensor], device: Any = None, dtype: torch.dtype | None = None) -> AverageState:
        average = [
            p.detach().to(device=device, dtype=dtype if p.is_floating_point() else None, copy=True)
            for p in params
        ]
        return AverageState(average, 0)

    def update(self, state: AverageState, params: Sequence[Tensor]) -> AverageState:
        lerp_(state.average, [p.detach() for p in params], 1.0 if state.count == 0 else self.weight(state.count))
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
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay}")
        if self.warmup_gamma is not None and self.warmup_gamma <= 0:
            raise ValueError(f"warmup_gamma must be > 0, got {self.warmup_gamma}")
        if self.warmup_power <= 0:
            raise ValueError(f"warmup_power must be > 0, got {self.warmup_power}")

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


def _check_not_sharded(model: nn.Module) -> None:
    """Refuse FSDP (1 or 2) and DTensor-sharded models: each rank holds only shards of the weights."""
    sharded = any(type(m).__name__ == "FullyShardedDataParallel" or type(m).__name__.startswith("FSDP")
                  for m in model.modules()) or any(type(p).__name__ == "DTensor" for p in model.parameters())
    if sharded:
        raise ValueError(
            "AveragedModel does not support sharded models (FSDP, DTensor parameters): average an unsharded "
            "model, e.g. one trained with DistributedDataParallel, or the full state_dict gathered from the shards"
        )


def _strip_compile_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}


class AveragedModel(nn.Module):
    r"""Averaged copy of a model for SWA and EMA; a drop-in for ``torch.optim.swa_utils.AveragedModel``.

    Same constructor, ``update_parameters``, ``n_averaged``, ``module``, ``forward`` and
    ``state_dict`` keys as torch's. With the default rule (``SWA()``, or ``rule=EMA(...)``) each update is
    one ``torch._foreach_lerp_`` per (device, dtype) group with the count kept on the host, so it
    never synchronises with the device. ``avg_fn``/``multi_avg_fn`` behave exactly as in torch.

    Args:
        model: the model whose weights are averaged (``torch.compile`` and ``DistributedDataParallel``
            wrappers are unwrapped; FSDP-sharded models are refused with a ``ValueError``).
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

    n_averaged: Tensor

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
        _check_not_sharded(model)
        self.module = _copy_module(_unwrap(model), device, dtype)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self.rule = rule if rule is not None else SWA()
        self.update_every, self.update_after = update_every, update_after
        self._calls = 0  # steps seen when the caller gives none
        self._state = AverageState(self._averaged_tensors(), 0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _averaged_tensors(self) -> list[Tensor]:
        tensors = self.module.parameters() if not self.use_buffers else itertools.chain(
            self.module.parameters(), self.module.buffers()
        )
        return [t.detach() for t in tensors]

    def _source_tensors(self, model: nn.Module) -> list[Tensor]:
        """The model's tensors that pair with ours, after checking count and shapes (nothing written yet)."""
        model = _unwrap(model)
        tensors = list(model.parameters())
        if self.use_buffers:
            tensors += list(model.buffers())
        average = self._state.average
        if len(tensors) != len(average):
            kind = "parameters and buffers" if self.use_buffers else "parameters"
            raise ValueError(f"model has {len(tensors)} {kind}, the averaged model has {len(average)}")
        for i, (t, a) in enumerate(zip(tensors, average)):
            if t.shape != a.shape:
                name = list(self._names())[i]
                raise ValueError(f"{name} has shape {tuple(t.shape)}, the averaged model has {tuple(a.shape)}")
        return [t.detach() for t in tensors]

    def _names(self) -> Iterator[str]:
        yield from (name for name, _ in self.module.named_parameters())
        if self.use_buffers:
            yield from (name for name, _ in self.module.named_buffers())

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
        current = self._source_tensors(model)
        if self.avg_fn is None and self.multi_avg_fn is None:
            self._state = self.rule.update(self._state, current)
        else:
            self._update_with_torch_fn(current)
            self._state = AverageState(self._state.average, self._state.count + 1)
        if not self.use_buffers:
            lerp_([b.detach() for b in self.module.buffers()], [b.detach() for b in _unwrap(model).buffers()], 1.0)
        self.n_averaged.add_(1)
        return True

    def _update_with_torch_fn(self, current: list[Tensor]) -> None:
        """The user's ``avg_fn``/``multi_avg_fn``, called as ``torch.optim.swa_utils`` calls them."""
        average = self._state.average
        if self._state.count == 0:
            lerp_(average, current, 1.0)
        elif self.multi_avg_fn is not None:
            for avg_list, param_list in _groups(average, current):
                self.multi_avg_fn(avg_list, param_list, self.n_averaged.to(avg_list[0].device))
        else:
            for a, p in zip(average, current):
                a.copy_(self.avg_fn(a, p.to(a.device), self.n_averaged.to(a.device)))

    @property
    def count(self) -> int:
        """Number of models averaged so far (the host copy of ``n_averaged``)."""
        return self._state.count

    def reset(self) -> None:
        """Start a new average: the next ``update_parameters`` copies the model (periodic SWA)."""
        self._state = AverageState(self._state.average, 0)
        self.n_averaged.zero_()

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(_strip_compile_prefix(state_dict), strict=strict, assign=assign)
        self._state = AverageState(self._averaged_tensors(), int(self.n_averaged))
        return result

    def __getstate__(self) -> dict[str, Any]:
        # The averaged tensors are the module's own: pickle only the count and re-link on unpickling.
        return dict(super().__getstate__(), _state=AverageState([], self._state.count))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._state = AverageState(self._averaged_tensors(), self._state.count)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate the average inside the live ``model``, then put the model's own weights back.

        Parameters and floating buffers are exchanged; tensors on the same device and dtype swap
        storage (no copy, no extra memory), others are copied in and restored from a saved copy.
        Inside the block the averaged model itself holds the live weights: use ``model``.

        Example:
            >>> with swa_model.swapped_into(model):
            ...     accuracy = evaluate(model)
        """
        live = _unwrap(model)
        live_tensors = [*live.parameters(), *live.buffers()]
        ours = [*self.module.parameters(), *self.module.buffers()]
        if len(live_tensors) != len(ours) or any(t.shape != a.shape for t, a in zip(live_tensors, ours)):
            raise ValueError("model does not match the averaged model's parameters and buffers")
        pairs = [(t, a) for t, a in zip(live_tensors, ours) if t.is_floating_point()]
        saved = _exchange(pairs, saved=None)
        try:
            yield model
        finally:
            _exchange(pairs, saved)


def _exchange(pairs: list[tuple[Tensor, Tensor]], saved: list[Tensor | None] | None) -> list[Tensor | None]:
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


def _copy_module(model: nn.Module, device: Any, dtype: torch.dtype | None) -> nn.Module:
    """Deep copy with every tensor created directly on ``device``/``dtype`` (one copy at peak)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        target_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        clone = tensor.detach().to(device=device, dtype=target_dtype, copy=True)
        if isinstance(tensor, nn.Parameter):
            clone = nn.Parameter(clone, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = clone
    return copy.deepcopy(model, memo)


@torch.no_grad()
def restart_from_average(averaged: AveragedModel, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Periodic SWA restart (Guo, Jin & Liu, 2023): the model continues from the average.

    Copies the averaged weights (and buffers) into ``model``, clears the optimizer's state
    (momentum) and resets the average's count so the next period starts a fresh average.
    """
    live = _unwrap(model)
    lerp_([t.detach() for t in itertools.chain(live.parameters(), live.buffers())],
          [t.detach() for t in itertools.chain(averaged.module.parameters(), averaged.module.buffers())], 1.0)
    optimizer.state.clear()
    averaged.reset()
