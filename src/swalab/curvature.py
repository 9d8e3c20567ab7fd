"""Curvature of the train loss at a solution: the Hessian's top eigenvalue and its trace.

A second measure of flatness beside the widths along random rays (Izmailov et al., 2018, §3.1
compare solutions by width; Keskar et al., 2017 and the SWA literature by the Hessian): the largest
eigenvalue by power iteration, the trace by Hutchinson's estimator with Rademacher probes
(``E[z^T H z] = tr H`` for ``z`` with independent ±1 entries; Hutchinson, 1990). Both only need
Hessian-vector products (:func:`make_hvp`: the model run by ``torch.func.functional_call`` on a
flat parameter vector, differentiated twice), batch by batch, never the Hessian itself.

The loss is the data loss (cross-entropy or MSE, :mod:`swalab.landscape`'s batch statistics)
averaged over the given batches, with the model in eval mode: BatchNorm normalises with its
running statistics, which are constants of the loss. Those statistics must be the solution's own:
pass ``bn_batches`` and :func:`curvature` recomputes them first (``update_bn``), or pass a model
whose statistics are already recomputed. The L2 term ``wd/2 ||w||^2`` is left out; it adds ``wd``
to every eigenvalue and ``wd * dim`` to the trace.

Example:
    >>> c = curvature(model, train_batches, bn_batches=train_batches, iterations=20, probes=10)
    >>> c.top_eigenvalue, c.trace, c.trace_stderr
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .bn import has_batchnorm, update_bn
from .landscape import BatchStats, cross_entropy_stats

__all__ = ["Curvature", "curvature", "hutchinson_trace", "make_hvp", "top_eigenvalue"]

HVP = Callable[[Tensor], Tensor]


class Curvature(NamedTuple):
    """What :func:`curvature` measures at one solution."""

    top_eigenvalue: float  # the Hessian's eigenvalue of largest magnitude (power iteration)
    iterations: int  # power iterations run
    converged: bool  # relative change of the estimate below ``tol`` before ``iterations`` ran out
    trace: float  # Hutchinson's estimate of tr H
    trace_stderr: float  # its standard error over the probes (NaN for one probe)
    probes: int
    dim: int  # number of parameters


def make_hvp(
    model: nn.Module, batches: Sequence[tuple[Any, Tensor]], stats: BatchStats = cross_entropy_stats
) -> HVP:
    """``v -> H v`` at the model's current parameters, ``H`` the Hessian of the mean data loss over
    ``batches`` (eval mode, buffers held fixed), for flat vectors ordered as ``model.parameters()``.

    Each product differentiates ``grad(loss_b) · v`` once more (reverse over reverse, Pearlmutter
    1994) on every batch, the model run by ``torch.func.functional_call`` on a flat parameter
    vector, and sums them weighted by the batch's share of the targets, so memory is that of one
    batch. (Forward over reverse, ``torch.func.jvp`` of ``torch.func.grad``, gives the same numbers
    but its first call imports ``torch._dynamo``, seconds per process on a CPU.)
    """
    named = list(model.named_parameters())
    if not named:
        raise ValueError("the model has no parameters")
    if not batches:
        raise ValueError("make_hvp needs at least one batch")
    names = [name for name, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def hvp(v: Tensor) -> Tensor:
        if v.shape != flat0.shape:
            raise ValueError(f"expected a vector of {flat0.numel()} entries, got {tuple(v.shape)}")
        v = v.to(flat0)
        was_training = model.training
        model.eval()
        out, count = torch.zeros_like(flat0), 0
        try:
            for x, y in batches:
                with torch.enable_grad():
                    flat = flat0.clone().requires_grad_(True)
                    params = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
                    args = tuple(x) if isinstance(x, (list, tuple)) else (x,)
                    output = torch.func.functional_call(model, (params, buffers), args)
                    loss, _, n = stats(output, y)  # summed over the batch's targets
                    (grad,) = torch.autograd.grad(loss, flat, create_graph=True)
                    if not grad.requires_grad:  # a loss linear in the parameters: H = 0
                        count += n
                        continue
                    (hv,) = torch.autograd.grad(grad @ v, flat)
                out += hv
                count += n
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError("the batches hold no targets")
        return out / count

    return hvp


def top_eigenvalue(
    hvp: HVP,
    dim: int,
    *,
    iterations: int = 20,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[float, int, bool]:
    """Power iteration ``v <- H v / ||H v||`` from a Gaussian start: the eigenvalue of largest
    magnitude of the symmetric ``H`` as the Rayleigh quotient ``v^T H v``.

    Returns ``(eigenvalue, iterations run, converged)``; converged when two successive estimates
    differ by less than ``tol`` relative to the latest.
    """
    _check_counts("iterations", iterations)
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be finite and > 0, got {tol}")
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    v = v / torch.linalg.vector_norm(v)
    estimate = math.nan
    for i in range(1, iterations + 1):
        hv = hvp(v)
        new = float(torch.dot(v.double().flatten(), hv.double().flatten()))
        norm = torch.linalg.vector_norm(hv)
        if float(norm) == 0.0:  # v in the null space: H v = 0
            return 0.0, i, True
        if i > 1 and abs(new - estimate) <= tol * abs(new):
            return new, i, True
        estimate = new
        v = hv / norm
    return estimate, iterations, False


def hutchinson_trace(
    hvp: HVP,
    dim: int,
    *,
    probes: int = 10,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """Hutchinson's estimator ``mean_k z_k^T H z_k`` with Rademacher ``z_k`` (entries ±1).

    Returns ``(trace, standard error over the probes)``; the standard error is NaN for one probe.
    Exact for a diagonal ``H`` (``z_i^2 = 1``).
    """
    _check_counts("probes", probes)
    values = []
    for _ in range(probes):
        z = torch.randint(0, 2, (dim,), generator=generator).to(torch.float64) * 2 - 1
        z = z.to(dtype=dtype, device=device)
        values.append(float(torch.dot(z.double(), hvp(z).double())))
    mean = sum(values) / probes
    if probes == 1:
        return mean, math.nan
    var = sum((x - mean) ** 2 for x in values) / (probes - 1)
    return mean, math.sqrt(var / probes)


def curvature(
    model: nn.Module,
    batches: Iterable[tuple[Any, Tensor]],
    *,
    stats: BatchStats = cross_entropy_stats,
    bn_batches: Iterable[Any] | None = None,
    bn_weighting: str = "batches",
    iterations: int = 20,
    tol: float = 1e-3,
    probes: int = 10,
    seed: int = 0,
) -> Curvature:
    """The Hessian's top eigenvalue and trace of the mean data loss over ``batches`` at the
    model's parameters (the module docstring says which loss).

    Args:
        model: the solution; with BatchNorm, its running statistics are used as constants.
        batches: ``(x, y)`` batches of the train split (or a fixed subset of it: the cost is about
            ``(iterations + probes)`` times three passes over them).
        stats: per-batch statistics, :func:`~swalab.landscape.cross_entropy_stats` or
            :func:`~swalab.landscape.mse_stats`.
        bn_batches: if given and the model has BatchNorm, ``update_bn(bn_batches, model,
            weighting=bn_weighting)`` runs first, so the statistics are the solution's own;
            without it the caller has recomputed them.
        iterations, tol: power iteration (:func:`top_eigenvalue`).
        probes: Rademacher probes of Hutchinson's estimator (:func:`hutchinson_trace`).
        seed: seeds the start vector and the probes (the same for every solution compared).
    """
    _check_counts("iterations", iterations)
    _check_counts("probes", probes)
    batches = list(batches)
    if bn_batches is not None and has_batchnorm(model):
        update_bn(bn_batches, model, weighting=bn_weighting, unpack=True)
    hvp = make_hvp(model, batches, stats)
    first = next(model.parameters())
    dim = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"generator": generator, "dtype": first.dtype, "device": first.device}
    eig, its, converged = top_eigenvalue(hvp, dim, iterations=iterations, tol=tol, **kwargs)
    trace, stderr = hutchinson_trace(hvp, dim, probes=probes, **kwargs)
    return Curvature(eig, its, converged, trace, stderr, probes, dim)


def _check_counts(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
