"""Tests for swalab.models: a contract test over every registered model, plus oracle checks.

Parameter counts are compared with the literature: MNIST-1D CNN 5,210 (Greydanus 2020);
PreResNet-164 on CIFAR-100 1.7M and basic-block ResNet-110 1.7M, ResNet-20 0.27M (He et al. 2016);
WRN-28-10 36.5M (Zagoruyko & Komodakis 2016).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from swalab.models import MODELS, create, dense_to_sparse_batch

# (name, in_shape, num_outputs, options); large models are run on small images.
CASES: list[tuple[str, tuple[int, ...], int, dict[str, Any]]] = [
    ("mlp", (5,), 3, {}),
    ("mlp", (2,), 1, {"hidden": (16, 16, 16), "activation": "tanh"}),
    ("mlp", (1, 4, 4), 2, {"hidden": ()}),
    ("mnist1d_cnn", (1, 40), 10, {}),
    ("mnist1d_cnn", (40,), 10, {"bn": True}),
    ("small_cnn", (1, 28, 28), 10, {}),
    ("small_cnn", (3, 32, 32), 10, {"bn": True}),
    ("small_cnn", (1, 8, 8), 10, {}),
    ("vgg16", (3, 32, 32), 10, {}),
    ("vgg16_bn", (1, 32, 32), 100, {}),
    ("preresnet", (3, 8, 8), 10, {"depth": 8}),
    ("preresnet110", (3, 8, 8), 10, {}),
    ("preresnet164", (3, 8, 8), 100, {}),
    ("wideresnet", (3, 8, 8), 10, {"depth": 10, "widen_factor": 2, "dropout": 0.3}),
    ("wrn28_10", (3, 8, 8), 10, {}),
    ("mobilenet_v2", (3, 16, 16), 10, {"width_mult": 0.5}),
    ("mobilenet_v2", (1, 28, 28), 10, {}),
    ("resnet50", (1, 16, 16), 10, {}),
    ("gcn", (7,), 6, {}),
    ("gcn_sparse", (7,), 6, {"hidden": 32, "num_layers": 2, "readout_layers": 0}),
]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _graph_batch(
    num_nodes: list[int], features: int = 7, pad_to: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Random symmetric graphs, padded dense: ``(x [B, N, F], adj [B, N, N], mask [B, N])``."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(num_nodes), max(num_nodes)
    mask = torch.arange(n) < torch.tensor(num_nodes)[:, None]
    adj = torch.triu((torch.rand(b, n, n, generator=g) < 0.4).float(), 1)
    adj = (adj + adj.transpose(1, 2)) * (mask[:, :, None] & mask[:, None, :])
    x = torch.randn(b, n, features, generator=g) * mask[..., None]
    pad = (pad_to or n) - n
    return (
        nn.functional.pad(x, (0, 0, 0, pad)),
        nn.functional.pad(adj, (0, pad, 0, pad)),
        nn.functional.pad(mask, (0, pad)),
    )


def _inputs(name: str, in_shape: tuple[int, ...], batch: int) -> tuple[Tensor, ...]:
    if name == "gcn":
        return _graph_batch([5, 9, 3, 7][:batch], in_shape[0])
    if name == "gcn_sparse":
        return dense_to_sparse_batch(*_graph_batch([5, 9, 3, 7][:batch], in_shape[0]))
    return (torch.randn(batch, *in_shape),)


def _expected_shape(name: str, inputs: tuple[Tensor, ...], num_outputs: int) -> tuple[int, ...]:
    if name == "gcn":
        return (*inputs[2].shape, num_outputs)
    return (inputs[0].shape[0], num_outputs)


def test_every_registered_model_has_a_contract_case_and_a_description() -> None:
    assert {case[0] for case in CASES} == set(MODELS.names())
    assert all(MODELS.describe(name) for name in MODELS.names())


@pytest.mark.parametrize("name, in_shape, num_outputs, options", CASES)
def test_contract(
    name: str, in_shape: tuple[int, ...], num_outputs: int, options: dict[str, Any]
) -> None:
    torch.manual_seed(0)
    model = create(name, in_shape, num_outputs, **options)
    inputs = _inputs(name, in_shape, batch=4 if len(in_shape) < 3 else 2)
    expected = _expected_shape(name, inputs, num_outputs)

    model.train()
    out = model(*inputs)
    assert out.shape == expected
    (out.square().mean() + out.mean()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n

    model.eval()
    with torch.no_grad():
        first, second = model(*inputs), model(*inputs)
    assert first.shape == expected and torch.isfinite(first).all()
    torch.testing.assert_close(first, second)  # eval is deterministic


@pytest.mark.parametrize(
    "name, in_shape, num_outputs, options, expected, rel",
    [
        ("mnist1d_cnn", (1, 40), 10, {}, 5_210, 0.0),
        ("mnist1d_cnn", (40,), 10, {}, 5_210, 0.0),
        ("preresnet164", (3, 32, 32), 100, {}, 1.7e6, 0.03),
        ("preresnet", (3, 32, 32), 10, {"depth": 110, "block": "basic"}, 1.7e6, 0.03),
        ("preresnet", (3, 32, 32), 10, {"depth": 20}, 0.27e6, 0.03),
        ("wrn28_10", (3, 32, 32), 100, {}, 36.5e6, 0.03),
    ],
)
def test_parameter_counts_match_the_literature(
    name: str,
    in_shape: tuple[int, ...],
    num_outputs: int,
    options: dict[str, Any],
    expected: float,
    rel: float,
) -> None:
    count = _n_params(create(name, in_shape, num_outputs, **options))
    assert count == pytest.approx(expected, rel=rel, abs=0)


def test_gcn_parameter_count_is_the_benchmarks_100k() -> None:
    f, h, c = 7, 146, 6
    embed = f * h + h
    layer = (h * h + h) + 2 * h  # GCN weight and bias, BatchNorm affine
    readout = (h * (h // 2) + h // 2) + ((h // 2) * (h // 4) + h // 4) + ((h // 4) * c + c)
    assert _n_params(create("gcn", (f,), c)) == embed + 4 * layer + readout == 101_801


def test_mnist1d_cnn_matches_reference_layout() -> None:
    model = create("mnist1d_cnn", (1, 40), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    layout = [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding) for m in convs]
    assert layout == [
        (1, 25, (5,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
    ]
    assert model.linear.in_features == 125
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    with_bn = create("mnist1d_cnn", (1, 40), 10, bn=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in with_bn.modules()) == 3


def test_small_image_adaptations() -> None:
    mobilenet = create("mobilenet_v2", (3, 32, 32), 10)
    assert mobilenet.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)  # total stride 8
    big = create("mobilenet_v2", (1, 224, 224), 10)
    assert big.features[0][0].in_channels == 1 and big.features[0][0].stride == (2, 2)

    resnet = create("resnet50", (1, 28, 28), 10)
    assert isinstance(resnet.maxpool, nn.Identity)
    stem = resnet.conv1
    assert (stem.in_channels, stem.kernel_size, stem.stride) == (1, (3, 3), (1, 1))
    assert create("vgg16", (3, 64, 64), 10).classifier[1].in_features == 512 * 2 * 2


def test_resnet50_loads_local_imagenet_weights(tmp_path) -> None:
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    expected = reference.state_dict()

    full = create("resnet50", (3, 224, 224), 1000, weights=str(path))
    for key, value in full.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

    head = create("resnet50", (1, 28, 28), 10, weights=str(path), freeze_backbone=True)
    torch.testing.assert_close(head.layer4[2].conv3.weight, expected["layer4.2.conv3.weight"])
    torch.testing.assert_close(head.bn1.running_var, expected["bn1.running_var"])
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable == {"conv1.weight", "fc.weight", "fc.bias"}  # new stem and head only

    with pytest.raises(FileNotFoundError, match="not found"):
        create("resnet50", (3, 32, 32), 10, weights=str(tmp_path / "missing.pth"))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="not a torchvision resnet50"):
        create("resnet50", (3, 32, 32), 10, weights=str(tmp_path / "r18.pth"))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dense_and_sparse_gcn_compute_the_same_function(mode: str) -> None:
    torch.manual_seed(0)
    dense, sparse = create("gcn", (7,), 6), create("gcn_sparse", (7,), 6)
    sparse.load_state_dict(dense.state_dict())
    x, adj, mask = _graph_batch([12, 30, 5, 21], seed=1)
    adj[0, 3, 3] = 1.0  # an explicit self-loop: both layers treat the diagonal as 1
    dense.train(mode == "train")
    sparse.train(mode == "train")

    out_dense = dense(x, adj, mask)
    out_sparse = sparse(*dense_to_sparse_batch(x, adj, mask))
    torch.testing.assert_close(out_dense[mask], out_sparse, rtol=0, atol=1e-5)
    assert (out_dense[~mask] == 0).all()
    for a, b in zip(dense.norms, sparse.norms):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=1e-6)


def test_dense_to_sparse_batch_indexes_valid_nodes() -> None:
    x, adj, mask = _graph_batch([3, 2], features=1, pad_to=4)
    adj.zero_()
    adj[0, 0, 2] = adj[0, 2, 0] = 1.0
    adj[1, 1, 0] = 1.0  # directed j=0 -> i=1 within graph 1
    nodes, edge_index = dense_to_sparse_batch(x, adj, mask)
    torch.testing.assert_close(nodes, x[mask])
    assert sorted(map(tuple, edge_index.T.tolist())) == [(0, 2), (2, 0), (3, 4)]


def test_gcn_batchnorm_ignores_padded_nodes() -> None:
    torch.manual_seed(0)
    model = create("gcn", (7,), 6).train()
    twin = create("gcn", (7,), 6).train()
    twin.load_state_dict(model.state_dict())
    x, adj, mask = _graph_batch([12, 30, 5], seed=2)
    out = model(x, adj, mask)

    # Same graphs padded further, with garbage features on every padded node.
    x2, adj2, mask2 = _graph_batch([12, 30, 5], seed=2, pad_to=40)
    x2[~mask2] = 100.0 * torch.randn(int((~mask2).sum()), 7)
    out2 = twin(x2, adj2, mask2)

    torch.testing.assert_close(out2[mask2], out[mask], rtol=0, atol=1e-5)
    for a, b in zip(model.norms, twin.norms):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name, in_shape, options, value",
    [
        ("mlp", (5,), {"activation": "swish"}, "'swish'"),
        ("mlp", (5,), {"hidden": (32, -3)}, "-3"),
        ("mlp", (5,), {"hidden": 64}, "64"),
        ("mnist1d_cnn", (1, 2), {}, "(1, 2)"),
        ("small_cnn", (1, 4, 4), {}, "(1, 4, 4)"),
        ("vgg16", (3, 16, 16), {}, "(3, 16, 16)"),
        ("preresnet", (3, 32, 32), {"depth": 100}, "100"),
        ("preresnet", (3, 32, 32), {"block": "wide"}, "'wide'"),
        ("wideresnet", (3, 32, 32), {"depth": 27}, "27"),
        ("wideresnet", (3, 32, 32), {"dropout": 1.5}, "1.5"),
        ("mobilenet_v2", (3, 32, 32), {"width_mult": -1.0}, "-1.0"),
        ("gcn", (7,), {"hidden": -5}, "-5"),
        ("gcn", (3, 32, 32), {}, "(3, 32, 32)"),
        ("gcn", (7,), {"readout_layers": 9}, "9"),
        ("mlp", (5,), {"widht": 3}, "widht"),
    ],
)
def test_bad_options_raise_value_error_naming_the_value(
    name: str, in_shape: tuple[int, ...], options: dict[str, Any], value: str
) -> None:
    with pytest.raises(ValueError) as error:
        create(name, in_shape, 10, **options)
    assert value in str(error.value)


@pytest.mark.parametrize("in_shape, num_outputs", [((), 10), ((3, 0, 4), 10), ((5,), 0)])
def test_bad_shapes_raise_value_error(in_shape: tuple[int, ...], num_outputs: int) -> None:
    with pytest.raises(ValueError):
        create("mlp", in_shape, num_outputs)


def test_mlp_is_linear_without_hidden_layers() -> None:
    model = create("mlp", (3,), 2, hidden=())
    x = torch.randn(4, 3)
    linear = model.net[-1]
    torch.testing.assert_close(model(x), x @ linear.weight.T + linear.bias)
    assert _n_params(model) == 3 * 2 + 2
