"""Oracle tests for swalab.curvature: Hessian-vector products, power iteration and Hutchinson's
trace against the exact Hessian (torch.autograd.functional.hessian) of small models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from swalab import update_bn
from swalab.curvature import curvature, hutchinson_trace, make_hvp, top_eigenvalue
from swalab.landscape import cross_entropy_stats, flat_parameters, mse_stats


def small_model(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 5)] + ([nn.BatchNorm1d(5)] if bn else []) + [nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


def data(seed: int = 1, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[:16], y[:16]), (x[16:32], y[16:32]), (x[32:], y[32:])]  # a short last batch


def exact_hessian(model: nn.Module, batches, stats=cross_entropy_stats) -> torch.Tensor:
    """The Hessian of the mean data loss over all samples, eval mode, by autograd's hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    model.eval()

    def f(flat):
        params = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
        total, count = 0.0, 0
        for x, y in batches:
            out = torch.func.functional_call(model, (params, buffers), (x,))
            loss, _, k = stats(out, y)
            total, count = total + loss.double(), count + k
        return total / count

    return torch.autograd.functional.hessian(f, flat_parameters(model))


@pytest.mark.parametrize("bn", [False, True])
def test_hvp_equals_exact_hessian_times_vector(bn):
    model, batches = small_model(bn), data()
    if bn:
        update_bn(batches, model)
    H = exact_hessian(model, batches)
    hvp = make_hvp(model, batches)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
        torch.testing.assert_close(hvp(v), H @ v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bn", [False, True])
def test_top_eigenvalue_and_trace_against_the_exact_hessian(bn):
    model, batches = small_model(bn), data()
    if bn:
        update_bn(batches, model)
    H = exact_hessian(model, batches)
    eigs = torch.linalg.eigvalsh(H)
    top = float(eigs[eigs.abs().argmax()])
    hvp = make_hvp(model, batches)
    g = torch.Generator().manual_seed(0)
    eig, its, converged = top_eigenvalue(
        hvp, H.shape[0], iterations=500, tol=1e-10, generator=g, dtype=torch.float64
    )
    assert converged and its < 500
    assert eig == pytest.approx(top, rel=1e-4)
    trace, stderr = hutchinson_trace(hvp, H.shape[0], probes=400, generator=g, dtype=torch.float64)
    exact = float(torch.trace(H))
    # Rademacher variance 2 * sum_{i != j} H_ij^2: the estimate within 4 standard errors
    sd = math.sqrt(2 * float((H**2).sum() - (torch.diagonal(H) ** 2).sum()))
    assert stderr == pytest.approx(sd / math.sqrt(400), rel=0.3)
    assert abs(trace - exact) < 4 * sd / math.sqrt(400)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_power_iteration_by_hand():
    D = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    trace, stderr = hutchinson_trace(lambda v: D * v, 4, probes=5, dtype=torch.float64)
    assert trace == pytest.approx(4.5) and stderr == pytest.approx(0.0)
    A = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # eigenvalues 3 and 1
    eig, _, converged = top_eigenvalue(lambda v: A @ v, 2, iterations=100, dtype=torch.float64)
    assert converged and eig == pytest.approx(3.0, rel=1e-3)
    with pytest.raises(ValueError, match="probes must be an integer >= 1, got 0"):
        hutchinson_trace(lambda v: v, 2, probes=0)
    with pytest.raises(ValueError, match="iterations must be an integer >= 1, got 1.5"):
        top_eigenvalue(lambda v: v, 2, iterations=1.5)


def test_curvature_recomputes_bn_first_and_is_reproducible():
    """With bn_batches, the statistics are recomputed before the Hessian (the exact one at the
    recomputed statistics); the same seed gives the same numbers; MSE models work too."""
    model, batches = small_model(True), data()
    model[1].running_mean.fill_(5.0)  # stale statistics: curvature must not use them
    c = curvature(model, batches, bn_batches=batches, iterations=300, tol=1e-10, probes=3, seed=4)
    H = exact_hessian(model, batches)  # after curvature's BN pass
    eigs = torch.linalg.eigvalsh(H)
    assert float(model[1].running_mean.abs().max()) < 2.0
    assert c.top_eigenvalue == pytest.approx(float(eigs[eigs.abs().argmax()]), rel=1e-4)
    assert c.dim == H.shape[0] and c.probes == 3
    again = curvature(
        model, batches, bn_batches=batches, iterations=300, tol=1e-10, probes=3, seed=4
    )
    assert again == c
    reg = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ys = [(x, torch.randn(len(x), 2, dtype=torch.float64)) for x, _ in batches]
    H = exact_hessian(reg, ys, mse_stats)
    r = curvature(reg, ys, stats=mse_stats, iterations=500, tol=1e-10, probes=2)
    eigs = torch.linalg.eigvalsh(H)
    assert r.top_eigenvalue == pytest.approx(float(eigs[eigs.abs().argmax()]), rel=1e-4)
