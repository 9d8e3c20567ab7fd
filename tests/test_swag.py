"""Oracle tests of swalab.swag: moments vs numpy, sample covariance vs closed form, BMA, resuming."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from swalab.averaging import AveragedModel
from swalab.bn import update_bn
from swalab.ensembles import predict_outputs
from swalab.swag import SWAG, bma_predict


def _collect(swag: SWAG, model: nn.Module, thetas: np.ndarray) -> None:
    for theta in thetas:
        vector_to_parameters(torch.as_tensor(theta, dtype=torch.float32), model.parameters())
        swag.collect_model(model)


def _thetas(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * rng.uniform(0.1, 2.0, size=d) + rng.normal(size=d)).astype(
        np.float32
    )


def test_moments_and_deviations_match_numpy() -> None:
    model, k = nn.Linear(4, 3), 5
    thetas = _thetas(7, 15).astype(np.float64)  # 7 > K: the ring buffer wraps
    swag = SWAG(model, max_num_models=k)
    _collect(swag, model, thetas)
    np.testing.assert_allclose(swag.mean.numpy(), thetas.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(swag.sq_mean.numpy(), (thetas**2).mean(0), rtol=1e-5, atol=1e-6)
    running_means = np.cumsum(thetas, 0) / np.arange(1, 8)[:, None]
    deviations = thetas - running_means  # deviation from the mean updated with that model
    for n in range(7 - k, 7):  # the last K, model n in row n % K
        np.testing.assert_allclose(
            swag.cov_mat_sqrt[n % k].numpy(), deviations[n], rtol=1e-5, atol=1e-5
        )
    assert swag.n_models == 7 and swag.rank == k


def test_memory_is_two_plus_k_parameters() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    swag = SWAG(model, max_num_models=20)
    held = swag.mean.nbytes + swag.sq_mean.nbytes + swag.cov_mat_sqrt.nbytes
    assert held == (2 + 20) * param_bytes
    diag = SWAG(model, no_cov_mat=True)
    assert diag.cov_mat_sqrt is None and diag.mean.nbytes + diag.sq_mean.nbytes == 2 * param_bytes


@pytest.mark.parametrize("scale, cov", [(0.5, True), (1.0, False)])
def test_sample_covariance_matches_closed_form(scale: float, cov: bool) -> None:
    model, k = nn.Linear(2, 1), 4  # d = 3
    swag = SWAG(model, max_num_models=k)
    _collect(swag, model, _thetas(6, 3, seed=1))
    mean, sq_mean, d = swag.mean.double(), swag.sq_mean.double(), swag.cov_mat_sqrt.double()
    sigma = torch.diag((sq_mean - mean**2).clamp_min(1e-30))
    if cov:
        sigma = sigma + d.T @ d / (k - 1)
    sigma = scale * sigma
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack(
        [
            parameters_to_vector(swag.sample(scale, cov, generator=gen).parameters())
            for _ in range(20000)
        ]
    ).double()
    assert torch.allclose(samples.mean(0), mean, atol=0.03 * sigma.diag().max().sqrt().item())
    assert torch.allclose(torch.cov(samples.T), sigma, atol=0.04 * sigma.abs().max().item())


def test_scale_zero_is_the_swa_mean_exactly() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    swag, swa = SWAG(model, max_num_models=3), AveragedModel(model)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        swag.collect_model(model)
        swa.update_parameters(model)
    sampled = parameters_to_vector(swag.sample(scale=0.0).parameters())
    assert torch.equal(sampled, swag.mean)
    assert torch.allclose(sampled, parameters_to_vector(swa.module.parameters()), rtol=0, atol=1e-6)


def test_state_dict_round_trip_continues_the_ring_buffer() -> None:
    model = nn.Linear(3, 2)
    thetas = _thetas(5, 8, seed=2)
    a = SWAG(model, max_num_models=2)
    _collect(a, model, thetas[:3])
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = SWAG(nn.Linear(3, 2), max_num_models=2)
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    _collect(a, model, thetas[3:])
    _collect(b, model, thetas[3:])
    assert a.n_models == b.n_models == 5
    for key in ("mean", "sq_mean", "cov_mat_sqrt"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    sample_a = parameters_to_vector(
        a.sample(generator=torch.Generator().manual_seed(3)).parameters()
    )
    sample_b = parameters_to_vector(
        b.sample(generator=torch.Generator().manual_seed(3)).parameters()
    )
    assert torch.equal(sample_a, sample_b)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _loader(n_batches: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=gen) + 1, torch.randint(0, 3, (16,), generator=gen))
        for _ in range(n_batches)
    ]


def _three_collected(model: nn.Module) -> SWAG:
    """A SWAG of three random steps of ``model`` (which is left at the last one)."""
    swag = SWAG(model, max_num_models=3)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        swag.collect_model(model)
    return swag


def test_bma_classification_at_scale_zero_is_the_mean_model_with_bn_recomputed() -> None:
    model = _bn_model()
    swag = _three_collected(model)
    train, test = _loader(seed=1), _loader(seed=2)
    out = bma_predict(swag, test, train, n_samples=2, scale=0.0)

    reference = copy.deepcopy(model)
    vector_to_parameters(swag.mean.clone(), reference.parameters())
    update_bn(train, reference)
    reference.eval()
    expected = torch.cat([reference(x).softmax(-1) for x, _ in test])
    assert torch.allclose(out["probs"], expected, atol=1e-6)
    assert torch.equal(out["targets"], torch.cat([y for _, y in test]))

    noisy = bma_predict(swag, test, train, n_samples=3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noisy["probs"].sum(-1), torch.ones(48), atol=1e-5)
    with pytest.raises(ValueError, match="BatchNorm"):
        bma_predict(swag, test, None)


def test_bma_with_predict_fn_and_a_bn_cap_matches_the_loader_pass() -> None:
    """``predict_fn`` replaces the pass over ``loader`` (a sharded evaluation); ``max_bn_batches``
    recomputes BatchNorm on the first batches only, as a loader cut to them does."""
    model = _bn_model()
    swag = _three_collected(model)
    train, test = _loader(seed=1), _loader(seed=2)
    expected = bma_predict(
        swag, test, train[:2], n_samples=3, generator=torch.Generator().manual_seed(0)
    )
    out = bma_predict(
        swag,
        None,
        train,
        n_samples=3,
        generator=torch.Generator().manual_seed(0),
        predict_fn=lambda m: predict_outputs(m, test)[0].softmax(-1),
        max_bn_batches=2,
    )
    assert torch.allclose(out["probs"], expected["probs"], atol=1e-7) and out["targets"] is None


def test_bma_regression_variance_of_a_linear_model() -> None:
    # theta ~ N(mean, diag(var)) and f(x) = w.x + b give Var f(x) = sum_i x_i**2 var_wi + var_b.
    model = nn.Linear(4, 1)
    swag = SWAG(model, no_cov_mat=True)
    _collect(swag, model, _thetas(10, 5, seed=4))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    loader = [(x, torch.zeros(6, 1))]
    exact = bma_predict(swag, loader, n_samples=1, scale=0.0, cov=False, task="regression")
    w, b = swag.mean[:4], swag.mean[4]
    assert torch.allclose(exact["mean"].squeeze(1), x @ w + b, atol=1e-5)
    assert torch.equal(exact["var"], torch.zeros(6, 1))

    out = bma_predict(
        swag,
        loader,
        n_samples=800,
        scale=1.0,
        cov=False,
        task="regression",
        generator=torch.Generator().manual_seed(6),
    )
    var = swag.sq_mean - swag.mean**2
    expected = x**2 @ var[:4] + var[4]
    assert torch.allclose(out["var"].squeeze(1), expected, rtol=0.2)


def test_bad_input() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="max_num_models"):
        SWAG(model, max_num_models=1)
    SWAG(model, max_num_models=1, no_cov_mat=True)  # SWAG-Diag needs no deviations
    swag = SWAG(model, max_num_models=4)
    with pytest.raises(ValueError, match="before any collect_model"):
        swag.sample()
    swag.collect_model(model)
    with pytest.raises(ValueError, match="at least 2"):
        swag.sample(cov=True)
    with pytest.raises(ValueError, match="scale"):
        swag.sample(scale=-0.5, cov=False)
    with pytest.raises(ValueError, match="another architecture.*'weight'"):
        swag.collect_model(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="missing key '1.weight'"):
        SWAG(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))).collect_model(
            nn.Sequential(nn.Linear(4, 3))
        )
    with pytest.raises(ValueError, match="no_cov_mat"):
        SWAG(model, no_cov_mat=True).sample(cov=True)
    with pytest.raises(ValueError, match="max_num_models"):
        SWAG(model, max_num_models=5).load_state_dict(swag.state_dict())
    with pytest.raises(ValueError, match="task"):
        bma_predict(swag, [], task="segmentation")


@pytest.mark.parametrize("chunk_bytes", [12, 1 << 20])
def test_chunked_host_path_gives_the_same_moments(chunk_bytes: int) -> None:
    """The path of a GPU model collected on the CPU (pinned chunks), run CPU to CPU here."""
    from swalab.averaging import HostStaging

    model, k = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)), 3
    direct, chunked = SWAG(model, max_num_models=k), SWAG(model, max_num_models=k)
    for seed in range(5):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
            model[1].running_mean.normal_()
        direct.collect_model(model)
        binding, _, params, buffers = chunked._bind(model)
        chunked._bound = (binding, HostStaging(params, chunk_bytes), params, buffers)
        chunked.collect_model(model)
    for key, value in direct.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(chunked.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked.base[1].running_mean, model[1].running_mean)


def test_replaced_layer_is_noticed_between_collections() -> None:
    """The bound parameters are re-looked-up when a submodule is replaced (never stale tensors)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    swag = SWAG(model, max_num_models=2)
    swag.collect_model(model)
    first = parameters_to_vector(model.parameters()).detach().clone()
    model[1] = nn.Linear(3, 2)
    with torch.no_grad():
        model[1].weight.fill_(1.0)
        model[1].bias.fill_(2.0)
    swag.collect_model(model)
    second = torch.cat([first[:15], torch.ones(6), torch.full((2,), 2.0)])
    torch.testing.assert_close(swag.mean, (first + second) / 2)
    model[1] = nn.Linear(3, 5)
    with pytest.raises(ValueError, match="another architecture"):
        swag.collect_model(model)
    assert swag.n_models == 2
    torch.testing.assert_close(swag.mean, (first + second) / 2)


def _swag_state(swag: SWAG) -> dict:
    state = swag.state_dict()
    return {
        "moments": [state["mean"].clone(), state["sq_mean"].clone(), state["cov_mat_sqrt"].clone()],
        "n_models": state["n_models"],
        "base": {k: v.clone() for k, v in swag.base.state_dict().items()},
    }


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["n_models"] == b["n_models"]
    for x, y in zip(a["moments"], b["moments"], strict=True):
        assert torch.equal(x, y)
    assert a["base"].keys() == b["base"].keys()
    for key, value in a["base"].items():
        assert torch.equal(value, b["base"][key]), key


@pytest.mark.parametrize("change", ["wider layer", "extra buffer", "missing layer"])
def test_refused_collection_writes_nothing_and_the_next_one_works(change: str) -> None:
    """A model of another shape is refused before anything is written: moments, deviations, count
    and ``base``'s buffers are bit-identical, and the next collection equals one never refused."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    swag, reference = SWAG(model, max_num_models=2), SWAG(model, max_num_models=2)
    for seed in range(3):  # fills the ring buffer and wraps around
        torch.manual_seed(seed)
        with torch.no_grad():
            for t in [*model.parameters(), model[1].running_mean]:
                t.normal_()
        swag.collect_model(model)
        reference.collect_model(model)
    before = _swag_state(swag)
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong[1].running_mean.fill_(7.0)  # would be copied into base if anything were written
    if change == "wider layer":
        wrong[2] = nn.Linear(3, 5)
    elif change == "extra buffer":
        wrong[0].register_buffer("extra", torch.zeros(2))
    else:
        del wrong[2]
    with pytest.raises(ValueError, match="another architecture"):
        swag.collect_model(wrong)
    _assert_same_state(_swag_state(swag), before)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    swag.collect_model(model)
    reference.collect_model(model)
    _assert_same_state(_swag_state(swag), _swag_state(reference))


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), True])
def test_sample_refuses_non_finite_scale(scale) -> None:
    """Issue 14, finding 7: SWAG.sample(scale=inf) was accepted."""
    model = nn.Linear(2, 1)
    swag = SWAG(model, max_num_models=2)
    swag.collect_model(model)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        swag.sample(scale=scale, cov=False)


@pytest.mark.parametrize("var_clamp", [float("inf"), float("nan"), -1.0])
def test_var_clamp_must_be_finite(var_clamp) -> None:
    with pytest.raises(ValueError, match="var_clamp"):
        SWAG(nn.Linear(2, 1), var_clamp=var_clamp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cuda_model_collected_on_cpu_or_gpu_equals_cpu_collection(device: str) -> None:
    model = nn.Sequential(nn.Linear(500, 1000), nn.BatchNorm1d(1000), nn.Linear(1000, 3000))
    gpu_model = copy.deepcopy(model).cuda()
    reference = SWAG(model, max_num_models=3)
    swag = SWAG(gpu_model, max_num_models=3, device=device)
    for seed in range(4):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        gpu_model.load_state_dict(model.state_dict())
        reference.collect_model(model)
        swag.collect_model(gpu_model)
    for key in ("mean", "sq_mean", "cov_mat_sqrt"):
        expected = getattr(reference, key)
        torch.testing.assert_close(getattr(swag, key).cpu(), expected, rtol=1e-5, atol=1e-6)
