"""SWAG: a Gaussian posterior over the weights fitted to the SGD trajectory (Maddox et al., 2019).

"A Simple Baseline for Bayesian Uncertainty in Deep Learning" (NeurIPS 2019), reference code
wjmaddox/swa_gaussian, whose vocabulary this module keeps. Once per epoch after ``swa_start``,
``collect_model`` updates the running moments ``mean = E[theta]``, ``sq_mean = E[theta**2]`` and
appends the deviation ``theta - mean`` (mean already updated) as a row of ``D``, keeping the last
``K = max_num_models`` rows. The posterior is ``N(mean, Sigma)`` with
``Sigma = 1/2 (diag(var) + D^T D / (K - 1))``, ``var = sq_mean - mean**2``, sampled as

    theta~ = mean + sqrt(scale) * (sqrt(var) * z1 + D^T z2 / sqrt(K - 1)),  z1 ~ N(0, I_d), z2 ~ N(0, I_K)

``scale=0.5`` is SWAG, ``scale=1, cov=False`` SWAG-Diag and ``scale=0`` the SWA mean itself.
Predictions average the softmax of ~30 samples, BatchNorm recomputed for each (``bma_predict``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from swalab import sharded
from swalab.averaging import HostStaging, ModelBinding
from swalab.bn import has_batchnorm, update_bn
from swalab.ensembles import _check_compatible, predict_outputs

__all__ = ["SWAG", "bma_predict"]


def _signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters and buffers: what "the same architecture" means here."""
    return {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}


class SWAG:
    """SWA-Gaussian posterior (Maddox et al., 2019): moments and low-rank deviations of the weights.

    State, on ``device`` in float32 (float64 if the model has float64 parameters), for a model of
    ``d`` parameters: ``mean [d]``, ``sq_mean [d]`` and the deviation matrix ``cov_mat_sqrt [K, d]``
    (``D``, a ring buffer: the row of the n-th collected model, 0-based, is ``n % K``), i.e. exactly
    ``(2 + K) * d`` numbers (``2 * d`` with ``no_cov_mat``). A copy of the model, ``base``, receives
    the samples (one more ``d``).

    A sharded model (FSDP2, DTensor parameters) is collected shard by shard: ``d`` counts the rank's
    own shards, ``base`` holds DTensors laid out like the parameters (evaluate a sample with
    :meth:`swapped_into`), and :meth:`sample` draws the same ``z2`` on every rank (see
    :mod:`swalab.sharded`). :meth:`checkpoint_state` feeds ``swalab.sharded.save_checkpoint``.

    Args:
        model: the model being trained; its structure is deep-copied into ``base``.
        max_num_models: ``K``, the number of deviations kept (rank of the low-rank term).
        no_cov_mat: keep no deviations (SWAG-Diag only, memory ``2 * d``).
        device: where the state and ``base`` live (default: the model's device), e.g. ``"cpu"``.
        var_clamp: lower bound on the diagonal variance, as in the reference code.

    Example:
        >>> swag = swalab.SWAG(model, max_num_models=20)
        >>> for epoch in range(epochs):
        ...     train_one_epoch(model, optimizer, schedule(epoch))
        ...     if epoch + 1 >= swa_start:
        ...         swag.collect_model(model)
        >>> out = swalab.bma_predict(swag, test_loader, train_loader, n_samples=30, scale=0.5)
        >>> swalab.metrics.nll(out["probs"], out["targets"])
    """

    def __init__(
        self,
        model: nn.Module,
        max_num_models: int = 20,
        no_cov_mat: bool = False,
        device: int | str | torch.device | None = None,
        var_clamp: float = 1e-30,
    ) -> None:
        if not (isinstance(max_num_models, int) and max_num_models >= 1):
            raise ValueError(f"max_num_models must be a positive integer, got {max_num_models}")
        if not no_cov_mat and max_num_models < 2:
            raise ValueError(
                f"max_num_models (K) must be >= 2 for the low-rank term D^T z / sqrt(K - 1), got {max_num_models}; "
                "pass no_cov_mat=True for SWAG-Diag"
            )
        if not (isinstance(var_clamp, (int, float)) and 0 <= var_clamp < math.inf):
            raise ValueError(f"var_clamp must be a finite number >= 0, got {var_clamp!r}")
        self.sharded = sharded.is_sharded(model)
        if self.sharded:
            sharded.reshard(model)
        params = [sharded.local(p) for p in model.parameters()]  # the rank's shards
        if not params:
            raise ValueError("model has no parameters")
        self.max_num_models = max_num_models
        self.var_clamp = var_clamp
        self.device = torch.device(device) if device is not None else params[0].device
        self.dtype = functools.reduce(torch.promote_types, (p.dtype for p in params), torch.float32)
        # a sharded model's samples are held like its parameters, evaluated with swapped_into
        self.base = (
            sharded.average_module(model, dtype=None)
            if self.sharded
            else copy.deepcopy(model).to(self.device)
        )
        for p in self.base.parameters():
            p.grad = None
        self._signature = _signature(model)
        self._param_names = [name for name, _ in model.named_parameters()]
        self._shapes = [p.shape for p in params]
        self._numels = [p.numel() for p in params]
        d = sum(self._numels)
        self.mean = torch.zeros(d, device=self.device, dtype=self.dtype)
        self.sq_mean = torch.zeros(d, device=self.device, dtype=self.dtype)
        self.cov_mat_sqrt = (
            None
            if no_cov_mat
            else torch.zeros(max_num_models, d, device=self.device, dtype=self.dtype)
        )
        self.n_models = 0
        self._mean_views = self._views(self.mean)
        self._sq_mean_views = self._views(self.sq_mean)
        self._base_buffers = [b.detach() for _, b in self.base.named_buffers()]
        self._bound: tuple[ModelBinding, Any, list[Tensor], list[Tensor]] | None = None

    def _views(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views of a flat ``[d]`` tensor."""
        return [t.view(shape) for t, shape in zip(flat.split(self._numels), self._shapes)]

    @property
    def rank(self) -> int:
        """Number of deviation rows held: ``min(n_models, K)`` (0 with ``no_cov_mat``)."""
        return 0 if self.cov_mat_sqrt is None else min(self.n_models, self.max_num_models)

    def _bind(self, model: nn.Module) -> tuple[ModelBinding, Any, list[Tensor], list[Tensor]]:
        """The model's parameters in our order, ready for the update; checked in full if not bound.

        Returns the binding, how the parameters reach ``device``/``dtype`` (``None``: they are there
        already; a :class:`HostStaging` for a GPU model collected on the CPU; ``"cast"``), the
        parameters and the model's buffers paired with ``base``'s.
        """
        bound = self._bound
        if bound is not None and bound[0].holds(model):
            return bound
        self._bound = None
        if self.sharded:  # FSDP2 left unsharded (by an evaluation) swaps its parameters
            sharded.reshard(model)
        signature = _signature(model)
        if signature != self._signature:
            _check_compatible(
                self._signature, signature, "collect_model: model of another architecture"
            )
        named = dict(model.named_parameters())
        live = [named[name] for name in self._param_names]
        if self.sharded:
            sharded.check_layout(
                list(self.base.named_parameters()), list(zip(self._param_names, live))
            )
            live = [sharded.local(p) for p in live]
        named = dict(model.named_buffers())
        live_buffers = [named[name] for name, _ in self.base.named_buffers()]
        params, buffers = [p.detach() for p in live], [b.detach() for b in live_buffers]
        route: Any = "cast"
        if all((p.device, p.dtype) == (self.device, self.dtype) for p in params):
            route = None
        elif (
            self.device.type == "cpu"
            and len({(p.device, p.dtype) for p in params}) == 1
            and all(p.device.type == "cuda" and p.is_contiguous() for p in params)
        ):
            route = HostStaging(params)
        self._bound = (ModelBinding(model, live + live_buffers), route, params, buffers)
        return self._bound

    @torch.no_grad()
    def collect_model(self, model: nn.Module) -> None:
        """Fold ``model``'s weights into the moments and store its deviation from the new mean.

        Multi-tensor passes over the parameters (``torch._foreach_*``), the count kept on the host:
        ``mean <- lerp(mean, theta, 1/(n+1))``, ``sq_mean <- n/(n+1) sq_mean + theta**2/(n+1)``,
        ``D[n % K] <- theta - mean``. ``base`` takes ``model``'s buffers (e.g. BN statistics). The
        model's tensors are looked up and checked once, then only tested cheaply for replacement (as
        in ``AveragedModel``); a GPU model collected on the CPU is copied in pinned chunks, each
        folded in while the next is in flight.
        """
        _, route, params, buffers = self._bind(model)
        n = self.n_models
        row = None if self.cov_mat_sqrt is None else self.cov_mat_sqrt[n % self.max_num_models]
        if isinstance(route, HostStaging):

            def fold(k: int, chunk: Tensor) -> None:
                start, end = route.ranges[k]
                theta = chunk.to(self.dtype)
                mean, sq_mean = self.mean[start:end], self.sq_mean[start:end]
                mean.lerp_(theta, 1.0 / (n + 1))
                sq_mean.mul_(n / (n + 1)).addcmul_(theta, theta, value=1.0 / (n + 1))
                if row is not None:
                    torch.sub(theta, mean, out=row[start:end])

            route.run(fold)
        else:
            theta = params if route is None else [p.to(self.device, self.dtype) for p in params]
            torch._foreach_lerp_(self._mean_views, theta, 1.0 / (n + 1))
            torch._foreach_mul_(self._sq_mean_views, n / (n + 1))
            torch._foreach_addcmul_(self._sq_mean_views, theta, theta, value=1.0 / (n + 1))
            if row is not None:
                row_views = self._views(row)
                torch._foreach_copy_(row_views, theta)
                torch._foreach_sub_(row_views, self._mean_views)
        if buffers:
            torch._foreach_copy_(self._base_buffers, buffers)
        self.n_models += 1

    @torch.no_grad()
    def sample(
        self, scale: float = 0.5, cov: bool = True, *, generator: torch.Generator | None = None
    ) -> nn.Module:
        """Write ``theta~ = mean + sqrt(scale) (sqrt(var) z1 + D^T z2 / sqrt(K - 1))`` into ``base``.

        ``K`` is the number of rows held (``max_num_models`` once the ring buffer is full; the
        reference code divides by ``max_num_models - 1`` even before). ``cov=False`` drops the
        low-rank term (SWAG-Diag, usually with ``scale=1``); ``scale=0`` writes the mean exactly.
        BatchNorm statistics are not recomputed (see ``bma_predict``).

        Args:
            scale: multiplies the covariance, finite and ``>= 0``.
            cov: include the low-rank term ``D^T z2``.
            generator: a ``torch.Generator`` on ``device``, for reproducible samples.

        Returns:
            ``base``, holding the sample.
        """
        number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if not (number and 0 <= scale < math.inf):
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        if cov and self.cov_mat_sqrt is None:
            raise ValueError(
                "cov=True needs the deviations D, but this SWAG was built with no_cov_mat=True"
            )
        if self.n_models == 0:
            raise ValueError("sample() before any collect_model()")
        if cov and self.rank < 2:
            raise ValueError(
                f"cov=True needs at least 2 collected models for D^T z / sqrt(K - 1), got {self.rank}"
            )
        if self.sharded:  # z1 for the rank's shards, z2 the same on every rank
            generator = sharded.shared_generator(generator, self.device)
            z1 = sharded.local_noise(list(self.base.parameters()), generator, self.dtype)
        else:
            z1 = torch.randn(
                self.mean.shape, generator=generator, device=self.device, dtype=self.dtype
            )
        var = torch.clamp(self.sq_mean - self.mean.square(), min=self.var_clamp)
        noise = var.sqrt_().mul_(z1)
        if cov:
            z2 = torch.randn(self.rank, generator=generator, device=self.device, dtype=self.dtype)
            noise.add_(z2 @ self.cov_mat_sqrt[: self.rank], alpha=1 / math.sqrt(self.rank - 1))
        theta = torch.add(self.mean, noise, alpha=math.sqrt(scale))
        base = [sharded.local(p).detach() for p in self.base.parameters()]
        torch._foreach_copy_(base, self._views(theta))
        return self.base

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate ``base`` (the last sample) inside ``model``, then put the model's weights back.

        The way to evaluate samples of a sharded model (FSDP2, DTensor): ``base`` holds only the
        rank's shards, copied into the model's own; works for any model of the architecture.

        Example:
            >>> swag.sample(0.5, generator=torch.Generator().manual_seed(0))
            >>> with swag.swapped_into(model):
            ...     probs = evaluate(model)
        """
        if self.sharded:
            sharded.reshard(model)
        named = dict(model.named_parameters())
        ours = list(self.base.named_parameters())
        _check_compatible(self._signature, _signature(model), "swapped_into: model")
        theirs = [(name, named[name]) for name, _ in ours]
        sharded.check_layout(ours, theirs)
        named_buffers = dict(model.named_buffers())
        buffers = [(b, named_buffers[name]) for name, b in self.base.named_buffers()]
        with sharded.swapped_into(model, [(a, t) for (_, a), (_, t) in zip(ours, theirs)], buffers):
            yield model

    def state_dict(self) -> dict[str, Any]:
        """Moments, deviations, count (the ring position is ``n_models % K``) and ``base``'s buffers."""
        return {
            "mean": self.mean,
            "sq_mean": self.sq_mean,
            "cov_mat_sqrt": self.cov_mat_sqrt,
            "n_models": self.n_models,
            "max_num_models": self.max_num_models,
            "buffers": {name: b for name, b in self.base.named_buffers()},
        }

    def checkpoint_state(self) -> dict[str, Tensor]:
        """Every state tensor by name, for ``swalab.sharded.save_checkpoint`` (DCP): per-parameter
        views of ``mean``, ``sq_mean`` and the deviations ``[K, *shape]``, ``base``'s buffers and
        ``n_models``. For a sharded model the views are DTensors laid out like the parameters
        (the deviations' placements shifted by the row dimension), so the checkpoint reshards."""
        state: dict[str, Tensor] = {}
        templates = list(self.base.parameters())
        offsets = [0, *itertools.accumulate(self._numels)]
        for i, (name, t) in enumerate(zip(self._param_names, templates)):
            state[f"mean.{name}"] = sharded.wrap_like(t, self._views(self.mean)[i])
            state[f"sq_mean.{name}"] = sharded.wrap_like(t, self._views(self.sq_mean)[i])
            if self.cov_mat_sqrt is not None:
                rows = self.cov_mat_sqrt[:, offsets[i] : offsets[i + 1]]
                state[f"cov_mat_sqrt.{name}"] = sharded.wrap_like(
                    t, rows.view(self.max_num_models, *self._shapes[i]), leading=1
                )
        for name, b in self.base.named_buffers():
            state[f"buffers.{name}"] = b
        state["n_models"] = torch.tensor(self.n_models)
        return state

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict[str, Tensor]) -> None:
        """Copy tensors shaped like :meth:`checkpoint_state`'s into this SWAG."""
        for key, ours in self.checkpoint_state().items():
            if key != "n_models":
                ours.copy_(state[key])
        self.n_models = int(state["n_models"])

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, into a SWAG built for the same model and K."""
        if state_dict["max_num_models"] != self.max_num_models:
            raise ValueError(
                f"state has max_num_models={state_dict['max_num_models']}, this SWAG {self.max_num_models}"
            )
        if (state_dict["cov_mat_sqrt"] is None) != (self.cov_mat_sqrt is None):
            raise ValueError("state and this SWAG disagree on no_cov_mat")
        for key in ("mean", "sq_mean", "cov_mat_sqrt"):
            ours, theirs = getattr(self, key), state_dict[key]
            if ours is not None and theirs.shape != ours.shape:
                raise ValueError(
                    f"{key} has shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}"
                )
        buffers = dict(self.base.named_buffers())
        _check_compatible(
            {k: tuple(b.shape) for k, b in buffers.items()},
            {k: tuple(b.shape) for k, b in state_dict["buffers"].items()},
            "buffers",
        )
        self.mean.copy_(state_dict["mean"])
        self.sq_mean.copy_(state_dict["sq_mean"])
        if self.cov_mat_sqrt is not None:
            self.cov_mat_sqrt.copy_(state_dict["cov_mat_sqrt"])
        for name, buffer in state_dict["buffers"].items():
            buffers[name].copy_(buffer)
        self.n_models = int(state_dict["n_models"])


@torch.no_grad()
def bma_predict(
    swag: SWAG,
    loader: Iterable[Any] | None,
    bn_loader: Iterable[Any] | None = None,
    *,
    n_samples: int = 30,
    scale: float = 0.5,
    cov: bool = True,
    task: Literal["classification", "regression"] = "classification",
    generator: torch.Generator | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    predict_fn: Callable[[nn.Module], Tensor] | None = None,
    max_bn_batches: int | None = None,
    model: nn.Module | None = None,
    bn_weighting: str = "batches",
) -> dict[str, Tensor | None]:
    """Bayesian model averaging over SWAG samples (Maddox et al., 2019, §4).

    For each of ``n_samples`` samples drawn into ``swag.base``: recompute BatchNorm statistics on
    ``bn_loader`` (the training data) if the model has BatchNorm, then predict on ``loader``.

    Args:
        swag: a SWAG that has collected models.
        loader: the data to predict on (batches as ``update_bn`` takes them; targets read from
            ``(x, y)`` batches).
        bn_loader: data for ``update_bn``; required when the model has BatchNorm layers.
        n_samples, scale, cov, generator: see :meth:`SWAG.sample`.
        task: ``"classification"`` averages softmax probabilities; ``"regression"`` returns the
            mean and the variance (over samples) of the outputs.
        forward_fn: ``forward_fn(model, batch)`` for prediction and ``update_bn``.
        predict_fn: ``predict_fn(model)`` returns a sample's predictions (probabilities, or values
            for regression) in place of the pass over ``loader`` and the softmax, e.g. each process
            predicting its shard of the data and gathering the parts; ``targets`` is then None.
        max_bn_batches: use only the first batches of ``bn_loader`` (``update_bn``'s
            ``max_batches``); ``bn_weighting``: ``update_bn``'s ``weighting``.
        model: evaluate each sample inside this model (``SWAG.swapped_into``; its weights are put
            back after each), as a sharded SWAG requires; by default inside ``swag.base``.

    Returns:
        ``{"probs": [N, C], "targets"}`` or ``{"mean", "var", "targets"}``, on the CPU; ``targets``
        is ``None`` when the batches carry none. ``swag.base`` is left holding the last sample.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    if not (isinstance(n_samples, int) and n_samples >= 1):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}")
    has_bn = has_batchnorm(model if model is not None else swag.base)
    if has_bn and bn_loader is None:
        raise ValueError(
            "the model has BatchNorm layers: pass bn_loader to recompute them for each sample"
        )
    if swag.sharded and model is None:
        raise ValueError(
            "bma_predict: the samples of a sharded SWAG are evaluated inside the sharded model: "
            "pass model="
        )
    mean = m2 = 0.0
    for s in range(n_samples):
        sample = swag.sample(scale, cov, generator=generator)
        inside = swag.swapped_into(model) if model is not None else contextlib.nullcontext(sample)
        with inside as net:
            if has_bn:
                update_bn(
                    bn_loader,
                    net,
                    swag.device,
                    forward_fn=forward_fn,
                    max_batches=max_bn_batches,
                    unpack=forward_fn is None,  # as for prediction
                    weighting=bn_weighting,
                )
            if predict_fn is None:
                outputs, targets = predict_outputs(net, loader, forward_fn=forward_fn)
                y = outputs.double().softmax(-1) if task == "classification" else outputs.double()
            else:
                y, targets = predict_fn(net).double(), None
        delta = y - mean  # Welford: running mean and sum of squared deviations over samples
        mean = mean + delta / (s + 1)
        if task == "regression":
            m2 = m2 + delta * (y - mean)
    if task == "classification":
        return {"probs": mean.float(), "targets": targets}
    return {"mean": mean.float(), "var": (m2 / n_samples).float(), "targets": targets}
