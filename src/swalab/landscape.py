"""Loss-landscape geometry on flat parameter vectors: line, random rays, width, plane, projection.

The SWA paper explains its gain geometrically (Izmailov et al., 2018, §3): SGD ends on the
boundary of a wide low-loss region, SWA in its centre, and the train and test surfaces are shifted.
This module holds the pieces that show it, on flattened parameters ``w`` (1-D tensors, ordered as
``model.parameters()``):

- the line ``w(t) = t * w_SGD + (1 - t) * w_SWA`` (paper Fig. 5): :func:`segment`;
- random rays ``w + t * d / ||d||``, ``d ~ N(0, I)`` (Fig. 4): :func:`random_directions`, and the
  width of a solution, the distance along a ray at which the train loss has risen by a set amount:
  :func:`width`; the direction rescaled to the solution's own filter or layer norms, so that a
  width does not change when a layer followed by BatchNorm is rescaled (Li et al., 2018):
  :func:`normalize_direction`;
- the plane through three points with the Gram–Schmidt basis of Garipov et al. (2018,
  dnn-mode-connectivity ``plane.py``): :func:`plane`, :class:`Plane` (points, plot coordinates,
  projections of other weights such as a trajectory), and the log-scaled contour levels of its
  figures: :func:`log_levels`;
- :class:`LandscapeEvaluator`: train loss and test error at any vector with one model instance,
  BatchNorm statistics recomputed at every point, batches held in memory.

Example:
    >>> names = [n for n, _ in model.named_parameters()]
    >>> w0, w1, w2 = (flat_parameters(torch.load(p), names) for p in ("init.pt", "sgd.pt", "swa.pt"))
    >>> pl = plane(w0, w1, w2)
    >>> evaluator = LandscapeEvaluator(model, bn_batches, {"train": train_batches, "test": test_batches},
    ...                                cross_entropy_stats, weight_decay=5e-4)
    >>> alphas = betas = grid_coordinates(21)
    >>> surface = [[evaluator(pl.point(a, b))["train_loss"] for b in betas] for a in alphas]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bn import WEIGHTINGS, batch_size, call_model, has_batchnorm, update_bn

__all__ = [
    "BatchStats",
    "LandscapeEvaluator",
    "Plane",
    "cross_entropy_stats",
    "flat_parameters",
    "grid_coordinates",
    "has_batchnorm",
    "load_flat",
    "log_levels",
    "mse_stats",
    "normalize_direction",
    "plane",
    "random_directions",
    "segment",
    "width",
]

Batch = tuple[Any, Tensor]
BatchStats = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None, int]]
"""``stats(output, y) -> (summed data loss, number of errors or None, number of targets)`` of a batch."""


# --- vectors ----------------------------------------------------------------------------------------


def flat_parameters(
    source: nn.Module | Mapping[str, Tensor], names: Sequence[str] | None = None
) -> Tensor:
    """The parameters of a model, or the entries ``names`` of a state_dict, as one float64 vector."""
    if isinstance(source, nn.Module):
        tensors = [p.detach() for p in source.parameters()]
    else:
        if names is None:
            raise ValueError("flat_parameters of a state_dict needs the parameter names")
        missing = [n for n in names if n not in source]
        if missing:
            raise ValueError(
                f"state_dict lacks parameter(s) {missing[:3]}{' ...' if len(missing) > 3 else ''}"
            )
        tensors = [source[n].detach() for n in names]
    return torch.cat([t.reshape(-1).to("cpu", torch.float64) for t in tensors])


@torch.no_grad()
def load_flat(model: nn.Module, w: Tensor) -> None:
    """Copy the vector ``w`` into the parameters of ``model`` in place (dtype and device converted).

    Unlike ``torch.nn.utils.vector_to_parameters`` the parameters keep their own storage, dtype and
    device, so ``w`` may be float64 on the CPU for a float32 model on a GPU.
    """
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if w.dim() != 1 or w.numel() != total:
        raise ValueError(f"expected a vector of {total} parameters, got shape {tuple(w.shape)}")
    for p, chunk in zip(params, w.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))


def segment(w_from: Tensor, w_to: Tensor, t: float) -> Tensor:
    """``(1 - t) * w_from + t * w_to``; with ``w_from = w_SWA``, ``w_to = w_SGD`` the paper's line."""
    return torch.lerp(w_from, w_to, t)


def random_directions(dim: int, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` unit vectors ``d / ||d||``, ``d ~ N(0, I_dim)``, as rows of a float64 ``[n, dim]`` tensor."""
    if dim < 1 or n < 1:
        raise ValueError(f"dim and n must be >= 1, got dim={dim}, n={n}")
    d = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return d / torch.linalg.vector_norm(d, dim=1, keepdim=True)


DIRECTIONS = ("filter", "layer", "raw")


def normalize_direction(
    d: Tensor, w: Tensor, shapes: Sequence[torch.Size | tuple[int, ...]], how: str
) -> Tensor:
    """The direction ``d`` rescaled to the weights ``w`` (Li et al., 2018, "Visualizing the Loss
    Landscape of Neural Nets", §4), both flat vectors over parameter tensors of ``shapes``.

    - ``"filter"``: each filter of ``d`` (a slice along a tensor's first, output dimension: a
      convolution's output channel, a linear layer's row) is rescaled to the norm of the same
      filter of ``w``: ``d_f <- d_f ||w_f|| / ||d_f||``;
    - ``"layer"``: each tensor of ``d`` is rescaled to the norm of the tensor of ``w``;
    - ``"raw"``: ``d`` unchanged (a step of Euclidean length ``t ||d||``, the SWA paper's rays).

    Under ``filter`` and ``layer``, the entries of 1-D tensors (biases, BatchNorm's weight and bias)
    are set to zero, as Li et al. do by default (their ``ignore='biasbn'``), so a ray moves the
    multi-dimensional weights only. A step ``w + t d`` then moves every filter (tensor) by ``t``
    times its own norm, so the loss along it does not change when a layer followed by BatchNorm —
    where the loss depends on ``W / ||W||`` only — is rescaled; a raw step does change.
    """
    if how not in DIRECTIONS:
        raise ValueError(f"directions must be one of {', '.join(DIRECTIONS)}, got {how!r}")
    sizes = [math.prod(s) for s in shapes]
    if d.shape != w.shape or d.dim() != 1 or d.numel() != sum(sizes):
        raise ValueError(
            f"d and w must be vectors of {sum(sizes)} parameters, got {tuple(d.shape)}, "
            f"{tuple(w.shape)}"
        )
    if how == "raw":
        return d.clone()
    w = w.to(d)
    parts = []
    for shape, dp, wp in zip(shapes, d.split(sizes), w.split(sizes)):
        if len(shape) <= 1:
            parts.append(torch.zeros_like(dp))
            continue
        rows = 1 if how == "layer" else shape[0]
        dr, wr = dp.reshape(rows, -1), wp.reshape(rows, -1)
        scale = torch.linalg.vector_norm(wr, dim=1, keepdim=True) / (
            torch.linalg.vector_norm(dr, dim=1, keepdim=True) + 1e-10
        )
        parts.append((dr * scale).reshape(-1))
    return torch.cat(parts)


def width(
    distances: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray, rise: float
) -> float:
    """The distance at which ``losses`` first exceeds ``losses[0] + rise`` along a ray.

    Args:
        distances: increasing distances from the solution, ``distances[0] = 0``.
        losses: the train loss at each distance.
        rise: how much the loss must rise (> 0).

    Returns:
        The crossing, linearly interpolated between the two grid points around it, or ``inf``
        when the loss stays below the threshold over the whole ray.
    """
    if rise <= 0:
        raise ValueError(f"rise must be > 0, got {rise}")
    d = np.asarray(distances, dtype=float)
    f = np.asarray(losses, dtype=float)
    if d.shape != f.shape or d.ndim != 1 or len(d) < 2:
        raise ValueError(
            f"distances and losses must be 1-D of the same length >= 2, got {d.shape}, {f.shape}"
        )
    threshold = f[0] + rise
    above = np.nonzero(f >= threshold)[0]
    if len(above) == 0:
        return math.inf
    k = int(above[0])
    return float(d[k - 1] + (threshold - f[k - 1]) / (f[k] - f[k - 1]) * (d[k] - d[k - 1]))


# --- the plane --------------------------------------------------------------------------------------


class Plane(NamedTuple):
    """The plane through ``w0, w1, w2`` with orthonormal ``u`` (towards ``w2``) and ``v``.

    ``w0`` sits at plot coordinates (0, 0), ``w2`` at ``(dx, 0)`` and ``w1`` at ``(u · (w1 - w0), dy)``.
    """

    origin: Tensor
    u: Tensor
    v: Tensor
    dx: float
    dy: float

    def point(self, alpha: float, beta: float) -> Tensor:
        """``w0 + alpha * dx * u + beta * dy * v``, at plot coordinates ``(alpha * dx, beta * dy)``."""
        return self.origin + (alpha * self.dx) * self.u + (beta * self.dy) * self.v

    def coordinates(self, w: Tensor) -> tuple[float, float]:
        """Plot coordinates ``((w - w0) · u, (w - w0) · v)`` of the orthogonal projection of ``w``."""
        r = w.to(self.origin) - self.origin
        return float(r @ self.u), float(r @ self.v)

    def distance(self, w: Tensor) -> float:
        """Distance from ``w`` to the plane (0 for points in it)."""
        r = w.to(self.origin) - self.origin
        return float(torch.linalg.vector_norm(r - (r @ self.u) * self.u - (r @ self.v) * self.v))


def plane(w0: Tensor, w1: Tensor, w2: Tensor) -> Plane:
    """The plane through three weight vectors (Garipov et al., 2018), basis by Gram–Schmidt::

    u = w2 - w0; dx = ||u||; u /= dx
    v = w1 - w0; v -= (u . v) u; dy = ||v||; v /= dy
    """
    w0, w1, w2 = (w.to(torch.float64) for w in (w0, w1, w2))
    u = w2 - w0
    dx = float(torch.linalg.vector_norm(u))
    if dx == 0:
        raise ValueError("the first and third points coincide: no plane")
    u = u / dx
    v = w1 - w0
    length = float(torch.linalg.vector_norm(v))
    v = v - (u @ v) * u
    dy = float(torch.linalg.vector_norm(v))
    if dy <= 1e-7 * max(dx, length):  # collinear up to float32 rounding
        raise ValueError("the three points are collinear: no plane")
    return Plane(w0, u, v / dy, dx, dy)


def grid_coordinates(n: int = 21, margin: float = 0.2) -> np.ndarray:
    """``linspace(-margin, 1 + margin, n)``: the alphas (and betas) of the plane's grid."""
    if n < 2:
        raise ValueError(f"a grid needs n >= 2 points per side, got {n}")
    return np.linspace(-margin, 1.0 + margin, n)


def log_levels(
    values: np.ndarray, vmax: float | None = None, log_alpha: float = -5.0, n: int = 7
) -> np.ndarray:
    """Contour levels spaced logarithmically above the minimum (dnn-mode-connectivity ``plane_plot.py``).

    Values are clipped at ``vmax``; level ``k`` is ``min + exp(log_alpha + k * g)`` with
    ``g = (log(max - min) - log_alpha) / n``, the first set to ``min`` and the last to ``max``
    (of the clipped values), so the levels crowd near the minimum where the interesting shape is.
    The paper uses ``vmax = 5, log_alpha = -5`` for train loss and ``vmax = 40, log_alpha = -1``
    for test error (%). A range narrower than ``exp(log_alpha)`` lowers ``log_alpha`` to
    ``log(max - min) - 1`` so that the levels still increase.
    """
    clipped = np.asarray(values, dtype=float)
    if vmax is not None:
        clipped = np.minimum(clipped, vmax)
    low, high = float(np.nanmin(clipped)), float(np.nanmax(clipped))
    if not high > low:
        return np.array([low, low + 1e-8])
    log_alpha = min(log_alpha, math.log(high - low) - 1)
    gamma = (math.log(high - low) - log_alpha) / n
    levels = low + np.exp(log_alpha + gamma * np.arange(n + 1))
    levels[0], levels[-1] = low, high
    return levels


# --- evaluation at a point --------------------------------------------------------------------------


def cross_entropy_stats(output: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
    """Summed cross-entropy and errors; ``[..., C]`` outputs are flattened and targets of -1 ignored."""
    output, y = output.reshape(-1, output.shape[-1]), y.reshape(-1)
    keep = y >= 0
    output, y = output[keep], y[keep]
    loss = F.cross_entropy(output.float(), y, reduction="sum")
    return loss, output.argmax(-1).ne(y).sum(), int(y.numel())


def mse_stats(output: Tensor, y: Tensor) -> tuple[Tensor, None, int]:
    """Squared error averaged over outputs and summed over samples (regression has no error rate)."""
    per_sample = (output.float() - y.float()).square().reshape(y.shape[0], -1).mean(1)
    return per_sample.sum(), None, int(y.shape[0])


class LandscapeEvaluator:
    """Train loss and test error at weight vectors, with one model instance and in-memory batches.

    At each vector ``w``: copy ``w`` into the model (:func:`load_flat`), recompute the BatchNorm
    statistics with one pass over ``bn_batches`` (if the model has BN; the same batches at every
    point, so the surface carries no batch-sampling noise), then evaluate in eval mode.

    :meth:`evaluate_many` gives the same numbers for several vectors at once: the parameter sets
    are stacked and the model is run with ``torch.func.functional_call`` under ``torch.vmap``, so
    one forward pass serves ``stack`` points. BatchNorm keeps one set of running statistics per
    point (stacked buffers, reset and averaged over the pass exactly as :func:`~swalab.bn.update_bn`
    does with ``momentum=None``).

    Args:
        model: the architecture; its parameters and BN statistics are overwritten.
        bn_batches: ``(x, y)`` training batches for the BN pass (ignored without BN).
        datasets: ``{name: [(x, y), ...]}``, e.g. ``{"train": ..., "test": ...}``.
        stats: per-batch statistics, :func:`cross_entropy_stats` or :func:`mse_stats`.
        weight_decay: ``wd``: ``<name>_loss`` adds ``wd / 2 * ||w||^2`` to the data loss — the
            objective SGD with ``weight_decay=wd`` minimises. (The dnn-mode-connectivity code adds
            ``wd / 2 * sum_p ||p||``, a sum of unsquared per-tensor norms; we use the objective.)
        stack: how many points :meth:`evaluate_many` runs in one vectorised pass (default 1: one
            by one). On a CPU the stacked pass was measured no faster for the MNIST-1D CNN (its
            convolutions become grouped ones; ``benchmarks/landscape.py``); it is meant for small
            models on a GPU, where one launch per point dominates. Models with dropout are always
            evaluated one by one (a vmapped train-mode pass would draw different masks).
        bn_weighting: the BN pass's weighting of batches, ``update_bn``'s ``weighting``
            (``"batches"``, torch's, or ``"samples"``, the paper's reference code).

    Returns (``__call__``):
        ``{"<name>_nll": mean data loss (cross-entropy or MSE), "<name>_loss": nll + wd/2 ||w||^2,
        "<name>_error": error in % (NaN for regression)}`` for every dataset.
    """

    def __init__(
        self,
        model: nn.Module,
        bn_batches: Iterable[Batch],
        datasets: Mapping[str, Iterable[Batch]],
        stats: BatchStats = cross_entropy_stats,
        weight_decay: float = 0.0,
        stack: int = 1,
        bn_weighting: str = "batches",
    ) -> None:
        if stack < 1:
            raise ValueError(f"stack must be >= 1, got {stack}")
        if bn_weighting not in WEIGHTINGS:
            raise ValueError(
                f"bn_weighting must be one of {', '.join(WEIGHTINGS)}, got {bn_weighting!r}"
            )
        self.bn_weighting = bn_weighting
        self.model = model
        self.bn_batches = list(bn_batches) if has_batchnorm(model) else []
        self.datasets = {name: list(batches) for name, batches in datasets.items()}
        self.stats = stats
        self.weight_decay = weight_decay
        has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
        self.stack = 1 if has_dropout else stack

    @torch.inference_mode()
    def __call__(self, w: Tensor) -> dict[str, float]:
        load_flat(self.model, w)
        if self.bn_batches:
            update_bn(
                self.bn_batches, self.model, weighting=self.bn_weighting, unpack=True
            )  # the batches' inputs are run as call_model runs them
        return self.measure(float(w.double().square().sum()))

    @torch.inference_mode()
    def measure(self, squared_norm: float) -> dict[str, float]:
        """The metrics of the model as it stands (eval mode, BN statistics as they are).

        ``squared_norm`` is ``||w||^2`` of its parameters, for the weight-decay term.
        """
        self.model.eval()
        outputs = {
            name: [call_model(self.model, x) for x, _ in batches]
            for name, batches in self.datasets.items()
        }
        return self._summarise(outputs, squared_norm)

    def _summarise(
        self, outputs: Mapping[str, list[Tensor]], squared_norm: float
    ) -> dict[str, float]:
        penalty = 0.5 * self.weight_decay * squared_norm
        out: dict[str, float] = {}
        for name, batches in self.datasets.items():
            losses, errors, count = [], [], 0
            for output, (_, y) in zip(outputs[name], batches):
                batch_loss, batch_errors, n = self.stats(output, y)
                losses.append(batch_loss.double())
                if batch_errors is not None:
                    errors.append(batch_errors)
                count += n
            nll = float(torch.stack(losses).sum()) / count  # one host synchronisation per dataset
            out[f"{name}_nll"] = nll
            out[f"{name}_loss"] = nll + penalty
            out[f"{name}_error"] = (
                100.0 * float(torch.stack(errors).sum()) / count if errors else math.nan
            )
        return out

    def evaluate_many(self, ws: Sequence[Tensor] | Tensor) -> list[dict[str, float]]:
        """``[self(w) for w in ws]``, computed ``stack`` points at a time with stacked weights."""
        ws = list(ws)
        results: list[dict[str, float]] = []
        for start in range(0, len(ws), self.stack):
            chunk = ws[start : start + self.stack]
            if len(chunk) == 1:
                results.append(self(chunk[0]))
            else:
                results += self._stacked(torch.stack([w.to(torch.float64) for w in chunk]))
        return results

    @torch.inference_mode()
    def _stacked(self, ws: Tensor) -> list[dict[str, float]]:
        model, k = self.model, ws.shape[0]
        params = list(model.named_parameters())
        total = sum(p.numel() for _, p in params)
        if ws.dim() != 2 or ws.shape[1] != total:
            raise ValueError(f"expected vectors of {total} parameters, got shape {tuple(ws.shape)}")
        stacked: dict[str, Tensor] = {}
        for (name, p), chunk in zip(params, ws.split([p.numel() for _, p in params], dim=1)):
            stacked[name] = chunk.reshape(k, *p.shape).to(p.device, p.dtype)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        prefix = {m: name for name, m in model.named_modules()}
        for m in bns:  # one set of running statistics per point, reset as update_bn resets them
            if m.track_running_stats and m.running_mean is not None:
                stacked[_join(prefix[m], "running_mean")] = torch.zeros(
                    k, *m.running_mean.shape
                ).to(m.running_mean)
                stacked[_join(prefix[m], "running_var")] = torch.ones(k, *m.running_var.shape).to(
                    m.running_var
                )

        def run(state: dict[str, Tensor], x: Any) -> Tensor:
            args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            return torch.func.functional_call(model, state, args, strict=False)

        batched = torch.vmap(run, in_dims=(0, None))
        was_training = model.training
        momenta = {m: m.momentum for m in bns}
        try:
            if self.bn_batches:
                for m in bns:
                    m.momentum = (
                        None  # cumulative average: 1 / num_batches_tracked, shared by the points
                    )
                    if m.num_batches_tracked is not None:
                        m.num_batches_tracked.zero_()
                model.train()
                seen = 0
                for x, y in self.bn_batches:
                    if self.bn_weighting == "samples":  # update_bn's momentum b / (n + b)
                        size = batch_size((x, y))
                        for m in bns:
                            m.momentum = size / (seen + size)
                        seen += size
                    batched(stacked, x)
            model.eval()
            outputs = {
                name: [batched(stacked, x) for x, _ in batches]
                for name, batches in self.datasets.items()
            }
        finally:
            for m, momentum in momenta.items():
                m.momentum = momentum
            model.train(was_training)
        norms = ws.square().sum(1).tolist()
        return [
            self._summarise(
                {name: [o[i] for o in outs] for name, outs in outputs.items()}, norms[i]
            )
            for i in range(k)
        ]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
