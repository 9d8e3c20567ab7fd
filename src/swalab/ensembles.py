"""Ensembles of checkpoints: FGE, prediction averaging, model soups and the ensemble view of SWA.

* Fast Geometric Ensembling (Garipov et al., 2018, "Loss Surfaces, Mode Connectivity, and Fast
  Ensembling of DNNs"): under the triangular schedule ``swalab.fge_lr`` a model is collected in the
  middle of every cycle, where the learning rate is ``a2``; the ensemble averages the members'
  softmax probabilities, each member with its own BatchNorm statistics.
* Soups, i.e. one set of weights averaged from chosen checkpoints (Wortsman et al., 2022, "Model
  soups"): uniform, greedy (a candidate enters only if the validation score improves), and weighted
  by validation score (Elkoubi & Ein Dor's reimplementation study, §4.2).
* The ensemble view of SWA (Izmailov et al., 2018, §3.5): ``f(w_bar) - mean_i f(w_i) = O(Delta)``
  with ``Delta = max_i ||w_i - w_bar||``.

Checkpoints are given as state_dicts or paths of ``torch.save``-d state_dicts (loaded on the CPU one
at a time, so memory stays bounded by a few copies of the model).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from swalab import sharded
from swalab._files import save_whole
from swalab.averaging import HostStaging, ModelBinding
from swalab.bn import default_forward, move_to, update_bn

__all__ = [
    "FGE",
    "GreedySoup",
    "ensemble_predict",
    "ensemble_view",
    "fge_should_collect",
    "greedy_soup",
    "predict_outputs",
    "uniform_soup",
    "weighted_soup",
]

StateDict = dict[str, Tensor]
Checkpoint = Mapping[str, Tensor] | str | os.PathLike
ForwardFn = Callable[[nn.Module, Any], Any]
# a model's predictions over the data, from a custom or sharded pass
PredictFn = Callable[[nn.Module], Tensor]


def fge_should_collect(epoch: int, cycle: int) -> bool:
    """Whether FGE collects the model at the end of 0-based ``epoch`` (timgaripov/dnn-mode-connectivity).

    The reference condition ``(epoch % cycle + 1) == cycle // 2``: for an even ``cycle`` this is
    the middle of the cycle, where ``fge_lr`` reaches ``a2``.
    """
    if not (isinstance(cycle, int) and cycle >= 2):
        raise ValueError(
            f"cycle must be an integer >= 2 (a cycle of 1 never collects), got {cycle}"
        )
    if not (isinstance(epoch, int) and epoch >= 0):
        raise ValueError(f"epoch must be a non-negative integer, got {epoch}")
    return (epoch % cycle + 1) == cycle // 2


def _load(checkpoint: Checkpoint) -> Mapping[str, Tensor]:
    """A state_dict as given, or loaded on the CPU from a path."""
    if isinstance(checkpoint, Mapping):
        return checkpoint
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not (isinstance(state, Mapping) and all(isinstance(v, Tensor) for v in state.values())):
        raise ValueError(
            f"{os.fspath(checkpoint)!r} does not hold a state_dict (a mapping of tensors)"
        )
    return state


def _shapes(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _check_compatible(
    expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """``ValueError`` naming the first key that is missing, unexpected or of another shape."""
    for key, shape in expected.items():
        if key not in got:
            raise ValueError(f"{what}: missing key {key!r}")
        if got[key] != shape:
            raise ValueError(f"{what}: key {key!r} has shape {got[key]}, expected {shape}")
    for key in got:
        if key not in expected:
            raise ValueError(f"{what}: unexpected key {key!r}")


def _checkpoints(checkpoints: Sequence[Checkpoint]) -> list[Checkpoint]:
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("the list of checkpoints is empty")
    return checkpoints


def _forward(
    model: nn.Module, batch: Any, device: torch.device, forward_fn: ForwardFn | None
) -> Tensor:
    if forward_fn is not None:
        return forward_fn(model, batch)
    return default_forward(model, move_to(batch, device))


def _targets(batch: Any) -> Tensor | None:
    """``y`` of an ``(x, y, ...)`` batch or of an object with a ``.y`` attribute (PyG), else None."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    y = getattr(batch, "y", None)
    return y if isinstance(y, Tensor) else None


@torch.no_grad()
def predict_outputs(
    model: nn.Module, loader: Iterable[Any], *, forward_fn: ForwardFn | None = None
) -> tuple[Tensor, Tensor | None]:
    """Run ``model`` in eval mode over ``loader``; return its outputs and the targets, on the CPU.

    Batches are run as ``update_bn`` runs them (``swalab.bn.default_forward``, inputs moved to the
    model's device) unless ``forward_fn(model, batch)`` is given. Targets are the second element of
    ``(x, y)`` batches (or ``batch.y``); ``None`` when the batches carry none. The mode is restored.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs, targets = [], []
    try:
        for batch in loader:
            outputs.append(_forward(model, batch, device, forward_fn).cpu())
            targets.append(_targets(batch))
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("the loader yielded no batches")
    y = torch.cat([t.cpu() for t in targets]) if all(t is not None for t in targets) else None
    return torch.cat(outputs), y


@torch.no_grad()
def ensemble_predict(
    checkpoints: Sequence[Checkpoint],
    model: nn.Module,
    loader: Iterable[Any] | None,
    *,
    forward_fn: ForwardFn | None = None,
    predict_fn: PredictFn | None = None,
) -> dict[str, Tensor | None]:
    """Average the softmax probabilities of several checkpoints, loaded into ``model`` in turn.

    Each checkpoint keeps its own BatchNorm statistics (FGE). ``model``'s own weights are restored.
    ``predict_fn(model)``, if given, returns the predictions to average (probabilities, or values
    for regression) in place of the softmax of the outputs over ``loader`` — e.g. each process
    predicting its shard of the data and gathering the parts; ``targets`` is then None.

    Returns:
        ``{"probs": [N, C] averaged probabilities, "targets": [N] or None}`` on the CPU.
    """
    checkpoints = _checkpoints(checkpoints)
    expected = _shapes(model.state_dict())
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    probs: Tensor | None = None
    try:
        for i, checkpoint in enumerate(checkpoints):
            state = _load(checkpoint)
            _check_compatible(expected, _shapes(state), f"checkpoint {i}")
            model.load_state_dict(state)
            if predict_fn is None:
                outputs, targets = predict_outputs(model, loader, forward_fn=forward_fn)
                p = outputs.double().softmax(-1)
            else:
                p, targets = predict_fn(model).double(), None
            probs = p if probs is None else probs.add_(p)
    finally:
        model.load_state_dict(original)
    return {"probs": (probs / len(checkpoints)).float(), "targets": targets}


class FGE:
    """Fast Geometric Ensembling (Garipov et al., 2018): collect models, average their predictions.

    Members are copies of the model's full ``state_dict`` (parameters and BatchNorm statistics) kept
    on the CPU, or saved as ``member_000.pt, member_001.pt, ...`` under ``directory`` (existing files
    of those names are replaced, each by a whole file or not at all), so the accelerator holds only
    the training model.

    Args:
        directory: where to save members; ``None`` keeps them in CPU memory.

    Attributes:
        members: the collected state_dicts or their paths, usable wherever checkpoints are taken
            (e.g. ``uniform_soup(fge.members)``).

    Example:
        >>> fge, schedule = swalab.FGE(), swalab.fge_lr(a1=0.05, a2=0.01, cycle=4)
        >>> for epoch in range(epochs):
        ...     for i, (x, y) in enumerate(loader):
        ...         swalab.set_lr(optimizer, schedule(epoch + i / len(loader)))
        ...         optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        ...     if swalab.fge_should_collect(epoch, cycle=4):
        ...         fge.collect(model)
        >>> probs = fge.predict(test_loader, model)["probs"]
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.members: list[StateDict | Path] = []
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._bound: tuple[ModelBinding, dict[str, Tensor], list[Any]] | None = None

    def __len__(self) -> int:
        return len(self.members)

    def _bind(self, model: nn.Module) -> tuple[ModelBinding, dict[str, Tensor], list[Any]]:
        """The model's state tensors, looked up and checked once, then only tested cheaply."""
        if self._bound is not None and self._bound[0].holds(model):
            return self._bound
        self._bound = None
        live = model.state_dict(keep_vars=True)
        if not all(isinstance(v, Tensor) for v in live.values()):
            raise ValueError("collect: the model's state_dict holds non-tensor entries")
        if self._shapes is None:
            self._shapes = _shapes(live)
        _check_compatible(self._shapes, _shapes(live), "collect: model")
        groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for key, value in live.items():  # contiguous GPU tensors are staged per (device, dtype)
            if value.device.type == "cuda" and value.is_contiguous():
                groups.setdefault((value.device, value.dtype), []).append(key)
        staged = [(keys, HostStaging([live[k].detach() for k in keys])) for keys in groups.values()]
        # a sharded model's tensors are DTensors: the binding tests the rank's own shards
        self._bound = (ModelBinding(model, [sharded.local(v) for v in live.values()]), live, staged)
        return self._bound

    @torch.no_grad()
    def collect(self, model: nn.Module) -> None:
        """Add a CPU copy of ``model.state_dict()`` to the ensemble (or save it in ``directory``).

        From a GPU, tensors are copied in chunks through pinned memory (as ``AveragedModel`` does).
        A sharded model (FSDP2, DTensor) gives members holding DTensors of the same placements:
        each rank keeps its shards; ``predict`` loads them back into the sharded model.
        """
        if sharded.is_sharded(model):
            sharded.reshard(model)
        _, live, staged = self._bind(model)
        staged_keys = {k for keys, _ in staged for k in keys}
        state = {
            k: torch.empty(v.shape, dtype=v.dtype)
            if k in staged_keys
            else v.detach().to("cpu", copy=True)
            for k, v in live.items()
        }
        for keys, staging in staged:
            pieces = staging.pieces([state[k] for k in keys])
            staging.run(
                lambda k, chunk, p=pieces: torch._foreach_copy_(p[k][0], chunk.split(p[k][1]))
            )
        if self.directory is None:
            self.members.append(state)
        else:
            path = self.directory / f"member_{len(self.members):03d}.pt"
            save_whole(state, path)
            self.members.append(path)

    def predict(
        self, loader: Iterable[Any], model: nn.Module, *, forward_fn: ForwardFn | None = None
    ) -> dict[str, Tensor | None]:
        """Averaged softmax probabilities of the members, each loaded into ``model`` in turn.

        ``model`` is a template of the same architecture (e.g. the training model; its weights are
        restored). Returns ``{"probs": [N, C], "targets": [N] or None}``.
        """
        if not self.members:
            raise ValueError("FGE.predict before any collect()")
        return ensemble_predict(self.members, model, loader, forward_fn=forward_fn)


def _float_keys(state: Mapping[str, Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def _accumulator(state: Mapping[str, Tensor], keys: list[str], weight: float) -> list[Tensor]:
    """``weight * state[k]`` for the floating keys, in at least float32 (half sums would stall)."""
    return [
        state[k].detach().to(torch.promote_types(state[k].dtype, torch.float32)) * weight
        for k in keys
    ]


def _as_state(first: Mapping[str, Tensor], keys: list[str], values: list[Tensor]) -> StateDict:
    """Floating entries from ``values`` in ``first``'s dtypes; the others copied from ``first``."""
    averaged = dict(zip(keys, values))
    return {
        k: averaged[k].to(v.dtype) if k in averaged else v.detach().clone()
        for k, v in first.items()
    }


def _weighted_average(checkpoints: list[Checkpoint], weights: Sequence[float]) -> StateDict:
    """``sum_i weights[i] * state_i`` over floating tensors, one checkpoint loaded at a time."""
    first = _load(checkpoints[0])
    expected, keys = _shapes(first), _float_keys(first)
    total = _accumulator(first, keys, weights[0])
    for i in range(1, len(checkpoints)):
        state = _load(checkpoints[i])
        _check_compatible(expected, _shapes(state), f"checkpoint {i}")
        torch._foreach_add_(
            total, [state[k].to(t.device, t.dtype) for k, t in zip(keys, total)], alpha=weights[i]
        )
    return _as_state(first, keys, total)


def _finish(
    soup: StateDict,
    model: nn.Module | None,
    bn_loader: Iterable[Any] | None,
    forward_fn: ForwardFn | None,
) -> StateDict:
    """Load ``soup`` into ``model`` and recompute its BatchNorm statistics on ``bn_loader``, if given."""
    if model is None:
        if bn_loader is not None:
            raise ValueError("bn_loader needs a model to recompute BatchNorm statistics in")
        return soup
    _check_compatible(_shapes(model.state_dict()), _shapes(soup), "soup vs model")
    model.load_state_dict(soup)
    if bn_loader is None:
        return soup
    device = next(model.parameters()).device  # batches are run as for prediction (unpacked)
    update_bn(bn_loader, model, device, forward_fn=forward_fn, unpack=forward_fn is None)
    return {k: v.detach().to(soup[k].device, copy=True) for k, v in model.state_dict().items()}


def uniform_soup(
    checkpoints: Sequence[Checkpoint],
    *,
    model: nn.Module | None = None,
    bn_loader: Iterable[Any] | None = None,
    forward_fn: ForwardFn | None = None,
) -> StateDict:
    """Equal average of the checkpoints' floating tensors (Wortsman et al., 2022, uniform soup).

    Non-floating buffers (e.g. ``num_batches_tracked``) are taken from the first checkpoint.

    Args:
        checkpoints: state_dicts or paths of saved state_dicts, all of one architecture.
        model: if given, the soup is loaded into it.
        bn_loader: if given (with ``model``), BatchNorm statistics are recomputed for the soup with
            ``update_bn`` and returned in the state_dict.
        forward_fn: ``forward_fn(model, batch)`` for ``update_bn``.

    Returns:
        The soup's state_dict.
    """
    checkpoints = _checkpoints(checkpoints)
    soup = _weighted_average(checkpoints, [1.0 / len(checkpoints)] * len(checkpoints))
    return _finish(soup, model, bn_loader, forward_fn)


def _score_weights(scores: Sequence[float], temperature: float | None) -> list[float]:
    scores = [float(s) for s in scores]
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"scores must be finite, got {scores}")
    if temperature is not None:
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        return torch.softmax(torch.tensor(scores, dtype=torch.float64) / temperature, 0).tolist()
    if min(scores) < 0 or sum(scores) <= 0:
        raise ValueError(
            f"weights proportional to scores need scores >= 0 with a positive sum, got {scores}"
        )
    return [s / sum(scores) for s in scores]


def weighted_soup(
    checkpoints: Sequence[Checkpoint],
    scores: Sequence[float],
    *,
    temperature: float | None = None,
    model: nn.Module | None = None,
    bn_loader: Iterable[Any] | None = None,
    forward_fn: ForwardFn | None = None,
) -> StateDict:
    """Average of the checkpoints weighted by their validation scores (Elkoubi & Ein Dor's reimplementation study, §4.2).

    Weights are ``scores / sum(scores)`` (scores such as accuracies, ``>= 0``), or
    ``softmax(scores / temperature)`` when ``temperature`` is given (a small temperature leans on
    the best checkpoints, a large one tends to the uniform soup). Other arguments and the result
    are those of :func:`uniform_soup`.
    """
    checkpoints = _checkpoints(checkpoints)
    if len(scores) != len(checkpoints):
        raise ValueError(f"{len(scores)} scores for {len(checkpoints)} checkpoints")
    soup = _weighted_average(checkpoints, _score_weights(scores, temperature))
    return _finish(soup, model, bn_loader, forward_fn)


class GreedySoup(NamedTuple):
    """Result of :func:`greedy_soup`."""

    state_dict: StateDict
    ingredients: list[int]  # indices into the checkpoints, in the order they entered
    score: float  # the validation score of the soup (before any final BatchNorm recomputation)


def greedy_soup(
    checkpoints: Sequence[Checkpoint],
    evaluate: Callable[[StateDict], float],
    *,
    scores: Sequence[float] | None = None,
    model: nn.Module | None = None,
    bn_loader: Iterable[Any] | None = None,
    forward_fn: ForwardFn | None = None,
) -> GreedySoup:
    """Greedy soup (Wortsman et al., 2022, Recipe 1): add checkpoints only while the score improves.

    Candidates are tried in decreasing order of their own score; the soup starts as the best one
    and a candidate enters when the uniform average of the soup and the candidate scores strictly
    higher than the soup (as in the reference code: an equal score does not enter).

    Args:
        checkpoints: state_dicts or paths of saved state_dicts, all of one architecture.
        evaluate: ``evaluate(state_dict) -> float``, the validation score, higher is better. It is
            the caller's: load the state into a model, recompute BatchNorm if the model has it
            (``update_bn``), and evaluate on held-out data.
        scores: the candidates' own scores by ``evaluate``, when already known; computed otherwise.
        model, bn_loader, forward_fn: as in :func:`uniform_soup`, applied to the final soup.

    Example:
        >>> def evaluate(state):
        ...     model.load_state_dict(state); swalab.update_bn(train_loader, model)
        ...     return swalab.metrics.accuracy(*swalab.predict_outputs(model, val_loader))
        >>> soup = swalab.greedy_soup(paths, evaluate, model=model, bn_loader=train_loader)
    """
    checkpoints = _checkpoints(checkpoints)
    if scores is None:
        scores = [float(evaluate(dict(_load(c)))) for c in checkpoints]
    elif len(scores) != len(checkpoints):
        raise ValueError(f"{len(scores)} scores for {len(checkpoints)} checkpoints")
    order = sorted(range(len(checkpoints)), key=lambda i: scores[i], reverse=True)
    first = _load(checkpoints[order[0]])
    expected, keys = _shapes(first), _float_keys(first)
    soup, ingredients, best = _accumulator(first, keys, 1.0), [order[0]], float(scores[order[0]])
    for i in order[1:]:
        state = _load(checkpoints[i])
        _check_compatible(expected, _shapes(state), f"checkpoint {i}")
        n = len(ingredients)
        candidate = torch._foreach_mul(soup, n / (n + 1))
        torch._foreach_add_(
            candidate,
            [state[k].to(t.device, t.dtype) for k, t in zip(keys, soup)],
            alpha=1 / (n + 1),
        )
        score = float(evaluate(_as_state(first, keys, candidate)))
        if score > best:
            soup, best = candidate, score
            ingredients.append(i)
    state_dict = _finish(_as_state(first, keys, soup), model, bn_loader, forward_fn)
    return GreedySoup(state_dict, ingredients, best)


def _flat_parameters(state: Mapping[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([state[name].detach().reshape(-1).double().cpu() for name in names])


@torch.no_grad()
def ensemble_view(
    snapshots: Sequence[Checkpoint],
    average: Checkpoint,
    model: nn.Module,
    loader: Iterable[Any],
    *,
    forward_fn: ForwardFn | None = None,
    eps: float = 1e-12,
) -> dict[str, float]:
    """Compare SWA's average with the ensemble of the averaged snapshots (Izmailov et al., 2018, §3.5).

    Args:
        snapshots: the averaged models ``w_i`` (state_dicts or paths), each with its BN statistics.
        average: their average ``w_bar`` (e.g. the SWA model's state_dict, BN recomputed).
        model: a template of the architecture (its weights are restored).
        loader: the data to predict on.

    Returns:
        ``{"delta": max_i ||w_i - w_bar||`` over the flattened parameters,
        ``"agreement":`` fraction of samples where ``f(w_bar)`` and the ensemble's averaged
        probabilities have the same argmax, ``"kl":`` mean ``KL(ensemble || f(w_bar))``}.
    """
    snapshots = _checkpoints(snapshots)
    average = _load(average)
    names = [name for name, _ in model.named_parameters()]
    expected = _shapes(model.state_dict())
    _check_compatible(expected, _shapes(average), "average")
    w_bar = _flat_parameters(average, names)
    delta = 0.0
    for i, snapshot in enumerate(snapshots):
        state = _load(snapshot)
        _check_compatible(expected, _shapes(state), f"snapshot {i}")
        delta = max(delta, torch.linalg.vector_norm(_flat_parameters(state, names) - w_bar).item())
    p_ens = ensemble_predict(snapshots, model, loader, forward_fn=forward_fn)["probs"].double()
    p_avg = ensemble_predict([average], model, loader, forward_fn=forward_fn)["probs"].double()
    agreement = p_ens.argmax(-1).eq(p_avg.argmax(-1)).double().mean().item()
    kl = (torch.xlogy(p_ens, p_ens) - p_ens * p_avg.clamp_min(eps).log()).sum(-1).mean().item()
    return {"delta": delta, "agreement": agreement, "kl": kl}
