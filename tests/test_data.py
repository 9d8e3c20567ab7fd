"""Tests of swalab.data: the shared contract over the registry, oracles per dataset, the loader,
the augmentation, and the file-based loaders on tiny files written in the real on-disk formats."""

from __future__ import annotations

import math
import os
import pickle
import random
import struct

import numpy as np
import pytest
import torch

from swalab.data import (
    DATASETS,
    BatchLoader,
    DataBundle,
    DatasetUnavailable,
    DataShape,
    Split,
    load,
    shape_of,
)
from swalab.data.cluster import graphs_to_dense, sbm_cluster_graphs
from swalab.data.images import NORMALIZATION, random_crop_flip

# Datasets built without files, with small options where the defaults are large, and the split
# sizes those options give.
GENERATED = {
    "toy2d": ({}, (3938, 562, 1125)),
    "friedman1": ({}, (7000, 1000, 2000)),
    "friedman2": ({}, (7000, 1000, 2000)),
    "friedman3": ({}, (7000, 1000, 2000)),
    "digits": ({}, (1258, 180, 359)),
    "mnist1d": ({}, (3500, 500, 1000)),
    "cluster": ({"n_train": 40, "n_val": 8, "n_test": 6}, (40, 8, 6)),
}
FILE_BASED = {"mnist", "cifar10", "cifar100", "cluster-pyg"}


def _inputs(split: Split) -> tuple[torch.Tensor, ...]:
    return split.x if isinstance(split.x, tuple) else (split.x,)


def _splits(bundle: DataBundle) -> tuple[Split, Split, Split]:
    return bundle.train, bundle.val, bundle.test


def _same(a: DataBundle, b: DataBundle) -> bool:
    return all(
        all(torch.equal(u, v) for u, v in zip(_inputs(s), _inputs(t), strict=True))
        and torch.equal(s.y, t.y)
        for s, t in zip(_splits(a), _splits(b), strict=True)
    )


# --- the shared contract


def test_every_registered_dataset_is_covered_and_described():
    assert set(DATASETS.names()) == set(GENERATED) | FILE_BASED
    for name in DATASETS.names():
        assert DATASETS.describe(name), f"{name} has no docstring summary"


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_dataset_contract(name):
    options, sizes = GENERATED[name]
    bundle = load(name, seed=0, **options)
    assert bundle.name == name
    assert tuple(len(s) for s in _splits(bundle)) == sizes
    for split in _splits(bundle):
        for t in _inputs(split):
            assert t.shape[0] == len(split)
        if bundle.task == "regression":
            assert split.x.dtype == torch.float32
            assert split.x.shape[1:] == bundle.in_shape
            assert split.y.dtype == torch.float32
            assert split.y.shape == (len(split), bundle.num_outputs)
        elif bundle.task == "classification":
            assert split.x.dtype == torch.float32
            assert split.x.shape[1:] == bundle.in_shape
            assert split.y.dtype == torch.long and split.y.shape == (len(split),)
            assert 0 <= split.y.min() and split.y.max() < bundle.num_outputs
        else:
            assert bundle.task == "node_classification"
            features, adj, mask = split.x
            assert features.dtype == adj.dtype == torch.float32 and mask.dtype == torch.bool
            assert features.shape[2:] == bundle.in_shape
            assert split.y.dtype == torch.long
            assert torch.equal(split.y >= 0, mask)
            assert split.y.max() < bundle.num_outputs
    # Deterministic for a seed, different for another.
    assert _same(bundle, load(name, seed=0, **options))
    assert not _same(bundle, load(name, seed=1, **options))


@pytest.mark.parametrize(
    "name, options, bad",
    [
        ("toy2d", {"noise": -1.0}, "-1.0"),
        ("toy2d", {"seed": -3}, "-3"),
        ("friedman1", {"n_features": 3}, "3"),
        ("digits", {"val_fraction": 0.9, "test_fraction": 0.2}, "0.9"),
        ("mnist1d", {"val_size": 4000}, "4000"),
        ("cluster", {"n_train": 0}, "0"),
        ("cifar10", {"normalization": "imagenet"}, "'imagenet'"),
    ],
)
def test_invalid_options_raise_value_error_naming_the_value(name, options, bad):
    with pytest.raises(ValueError, match=bad):
        load(name, **options)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="cifar10"):
        load("cifar-10")


# --- regression oracles


def test_toy2d_is_the_formula_on_the_75x75_grid():
    bundle = load("toy2d", noise=0.0)
    x = torch.cat([s.x for s in _splits(bundle)]).double()
    y = torch.cat([s.y for s in _splits(bundle)]).double()
    grid = np.linspace(-2, 2, 75)
    rows = x[torch.argsort(x[:, 0] * 100 + x[:, 1])].numpy()
    np.testing.assert_allclose(
        rows, np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2), atol=1e-6
    )
    x1, x2 = x[:, 0].numpy(), x[:, 1].numpy()
    pi = math.pi
    expected = 2 * np.cos(pi * x1 * x2) - 0.5 * x1 + 0.08 * x2 + np.sin(pi * x1) - np.sin(pi * x2)
    np.testing.assert_allclose(y[:, 0].numpy(), expected, atol=1e-5)


def test_toy2d_noise_has_the_requested_std():
    clean, noisy = load("toy2d", noise=0.0, seed=4), load("toy2d", noise=0.1, seed=4)
    residual = torch.cat([n.y - c.y for n, c in zip(_splits(noisy), _splits(clean), strict=True)])
    assert residual.std().item() == pytest.approx(0.1, abs=0.005)
    assert residual.mean().item() == pytest.approx(0.0, abs=0.005)


FRIEDMAN = {
    "friedman1": lambda x: (
        10 * np.sin(np.pi * x[:, 0] * x[:, 1])
        + 20 * (x[:, 2] - 0.5) ** 2
        + 10 * x[:, 3]
        + 5 * x[:, 4]
    ),
    "friedman2": lambda x: np.sqrt(
        x[:, 0] ** 2 + (x[:, 1] * x[:, 2] - 1 / (x[:, 1] * x[:, 3])) ** 2
    ),
    "friedman3": lambda x: np.arctan((x[:, 1] * x[:, 2] - 1 / (x[:, 1] * x[:, 3])) / x[:, 0]),
}


@pytest.mark.parametrize("name", sorted(FRIEDMAN))
def test_friedman_targets_follow_the_formula(name):
    raw = load(name, noise=0.0, standardize=False, n_samples=500)
    for split in _splits(raw):
        expected = FRIEDMAN[name](split.x.double().numpy())
        np.testing.assert_allclose(split.y[:, 0].numpy(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(FRIEDMAN))
def test_friedman_is_standardised_with_train_statistics(name):
    raw = load(name, n_samples=1000, standardize=False, seed=2)
    std = load(name, n_samples=1000, seed=2)
    torch.testing.assert_close(std.train.x.mean(0), torch.zeros(std.in_shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(std.train.x.std(0), torch.ones(std.in_shape), atol=1e-5, rtol=0)
    assert std.train.y.mean().item() == pytest.approx(0, abs=1e-5)
    assert std.train.y.std().item() == pytest.approx(1, abs=1e-5)
    mean, scale = raw.train.y.mean(), raw.train.y.std()
    torch.testing.assert_close(std.test.y, (raw.test.y - mean) / scale)


# --- image-like generated data


def test_digits_pixels_in_unit_interval_and_splits_partition_the_data():
    bundle = load("digits", seed=3)
    x = torch.cat([s.x for s in _splits(bundle)])
    assert x.min() == 0 and x.max() == 1
    assert len(x) == 1797
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().data, dtype=torch.float32) / 16
    assert sorted(map(tuple, x.flatten(1).tolist())) == sorted(map(tuple, images.tolist()))


def test_mnist1d_matches_the_package_and_leaves_global_rngs_alone(tmp_path):
    from mnist1d.data import get_dataset_args, make_dataset

    from swalab.data import mnist1d as module

    module._generate.cache_clear()
    random.seed(7)
    np.random.seed(7)
    bundle = load("mnist1d", val_size=0, root=str(tmp_path))  # generated (nothing kept there)
    assert (random.random(), np.random.rand()) == (
        random.Random(7).random(),
        np.random.RandomState(7).rand(),
    )

    reference = make_dataset(get_dataset_args())
    torch.testing.assert_close(
        bundle.test.x[:, 0], torch.tensor(reference["x_test"], dtype=torch.float32)
    )
    torch.testing.assert_close(bundle.test.y, torch.tensor(reference["y_test"]))
    assert len(bundle.val) == 0 and len(bundle.train) == 4000
    # The train part is a permutation of the package's training sequences.
    carved = load("mnist1d", val_size=300, seed=5, root=str(tmp_path))
    x = torch.cat([carved.train.x, carved.val.x])[:, 0]
    expected = torch.tensor(reference["x"], dtype=torch.float32)
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, expected.tolist()))


def test_mnist1d_is_generated_once_and_kept_under_root(tmp_path, monkeypatch):
    import mnist1d.data

    from swalab.data import mnist1d as module

    module._generate.cache_clear()
    first = load("mnist1d", root=str(tmp_path))
    (kept,) = (tmp_path / "mnist1d").iterdir()
    assert kept.name.startswith("generated-") and kept.suffix == ".npz"
    assert kept.stat().st_mode & 0o777 == 0o666 & ~_umask()

    def never(args):
        raise AssertionError("generated again")

    monkeypatch.setattr(mnist1d.data, "make_dataset", never)
    module._generate.cache_clear()
    again = load("mnist1d", root=str(tmp_path))
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).x, getattr(again, name).x)
        assert torch.equal(getattr(first, name).y, getattr(again, name).y)
    monkeypatch.undo()
    kept.write_bytes(kept.read_bytes()[:100])  # a cut file is generated and written again
    module._generate.cache_clear()
    assert torch.equal(load("mnist1d", root=str(tmp_path)).test.x, first.test.x)
    assert kept.stat().st_size > 100
    unwritable = tmp_path / "a-file"  # a root that cannot be written (even by root): generated
    unwritable.write_text("")
    module._generate.cache_clear()
    assert torch.equal(load("mnist1d", root=str(unwritable)).test.x, first.test.x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "mnist1d"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- CLUSTER


@pytest.fixture(scope="module")
def sbm_graphs():
    return sbm_cluster_graphs(300, torch.Generator().manual_seed(11))


def test_cluster_graph_structure(sbm_graphs):
    features, adj, labels = sbm_graphs
    for g in range(len(labels)):
        n = int((labels[g] >= 0).sum())
        assert (labels[g, :n] >= 0).all() and (
            labels[g, n:] == -1
        ).all()  # nodes first, then padding
        sizes = torch.bincount(labels[g, :n], minlength=6)
        assert len(sizes) == 6 and sizes.min() >= 5 and sizes.max() <= 34
        # Exactly one seed node per cluster, carrying cluster id + 1.
        seeds = features[g, :n].nonzero().flatten()
        assert sorted(labels[g, seeds].tolist()) == list(range(6))
        assert torch.equal(features[g, seeds], labels[g, seeds] + 1)
        assert (features[g, n:] == 0).all()
        # No edges to padding.
        assert not adj[g, n:].any() and not adj[g, :, n:].any()
    assert torch.equal(adj, adj.transpose(1, 2))
    assert not adj.diagonal(dim1=1, dim2=2).any()
    # Nodes are permuted, not grouped by cluster.
    assert sum(bool((lab[lab >= 0].diff() >= 0).all()) for lab in labels) == 0


def test_cluster_edge_densities_and_sizes(sbm_graphs):
    _, adj, labels = sbm_graphs
    valid = labels >= 0
    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(labels.shape[1], dtype=torch.bool)
    same = (labels[:, :, None] == labels[:, None, :]) & pair
    other = pair & ~same
    assert adj[same].float().mean().item() == pytest.approx(0.55, abs=0.01)
    assert adj[other].float().mean().item() == pytest.approx(0.25, abs=0.01)
    sizes = torch.stack([torch.bincount(lab[lab >= 0], minlength=6) for lab in labels])
    assert sizes.float().mean().item() == pytest.approx(19.5, abs=0.5)  # randint(5, 35)


def test_cluster_bundle_dense_layout():
    bundle = load("cluster", n_train=20, n_val=3, n_test=0, seed=2)
    assert bundle.in_shape == (7,) and bundle.num_outputs == 6
    assert len(bundle.test) == 0
    features, adj, mask = bundle.train.x
    n_max = features.shape[1]
    assert n_max == max(int(m.sum()) for s in _splits(bundle) for m in s.x[2])
    assert torch.equal(features.sum(-1), mask.float())  # one-hot on nodes, zero rows on padding
    value = features.argmax(-1)
    for g in range(len(bundle.train)):
        seeds = value[g].nonzero().flatten()
        assert torch.equal(value[g, seeds], bundle.train.y[g, seeds] + 1)
    assert set(adj.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(adj, adj.transpose(1, 2))


def _fake_pyg_graph(n, edges, labels, seeds):
    x = torch.zeros(n, 7)
    x[torch.arange(n), 0] = 1.0
    for node, value in seeds.items():
        x[node] = torch.nn.functional.one_hot(torch.tensor(value), 7).float()
    pairs = edges + [(b, a) for a, b in edges]
    edge_index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).t()
    return {"x": x, "edge_index": edge_index, "y": torch.tensor(labels)}


def test_cluster_pyg_reads_the_raw_file_format(tmp_path):
    # torch_geometric's GNNBenchmarkDataset processes raw/CLUSTER_v2.pt: a list of the train, val
    # and test splits, each a list of dicts of Data attributes.
    train = [
        _fake_pyg_graph(3, [(0, 1), (1, 2)], [0, 0, 1], {0: 1, 2: 2}),
        _fake_pyg_graph(5, [(0, 4)], [1, 0, 2, 2, 1], {3: 3}),
    ]
    val = [_fake_pyg_graph(2, [(0, 1)], [5, 5], {1: 6})]
    test = [_fake_pyg_graph(4, [], [3, 4, 3, 4], {})]
    (tmp_path / "CLUSTER" / "raw").mkdir(parents=True)
    torch.save([train, val, test], tmp_path / "CLUSTER" / "raw" / "CLUSTER_v2.pt")

    bundle = load("cluster-pyg", root=str(tmp_path))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (2, 1, 1)
    assert bundle.in_shape == (7,) and bundle.task == "node_classification"
    features, adj, mask = bundle.train.x
    assert features.shape == (2, 5, 7) and adj.shape == (2, 5, 5)
    torch.testing.assert_close(features[0, :3], train[0]["x"])
    assert (features[0, 3:] == 0).all()
    expected_adj = torch.zeros(5, 5)
    expected_adj[[0, 1, 1, 2], [1, 0, 2, 1]] = 1
    torch.testing.assert_close(adj[0], expected_adj)
    assert bundle.train.y[0].tolist() == [0, 0, 1, -1, -1]
    assert mask[0].tolist() == [True, True, True, False, False]
    assert bundle.val.y.tolist() == [[5, 5, -1, -1, -1]]
    assert bundle.test.x[1].sum() == 0
    # A second load reads the processed files.
    assert _same(bundle, load("cluster-pyg", root=str(tmp_path)))


def test_graphs_to_dense_one_hot_encodes_integer_features():
    from torch_geometric.data import Data

    graph = Data(
        x=torch.tensor([0, 3, 0]),
        edge_index=torch.tensor([[0, 2], [2, 0]]),
        y=torch.tensor([1, 2, 1]),
    )
    split = graphs_to_dense([graph], n_max=4)
    features, adj, mask = split.x
    assert features.shape == (1, 4, 7)
    assert features[0].argmax(-1)[:3].tolist() == [0, 3, 0] and features[0].sum() == 3
    assert adj[0, 0, 2] == adj[0, 2, 0] == 1 and adj.sum() == 2
    assert split.y.tolist() == [[1, 2, 1, -1]] and mask.tolist() == [[True, True, True, False]]
    column = Data(x=graph.x[:, None], edge_index=graph.edge_index, y=graph.y)
    assert torch.equal(graphs_to_dense([column], n_max=4).x[0], features)


# --- BatchLoader


def _indexed_split(n: int) -> Split:
    index = torch.arange(n)
    return Split(index.float()[:, None], index)


def test_loader_covers_each_sample_once_in_the_generator_order():
    split = _indexed_split(10)
    loader = BatchLoader(
        split, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    assert len(loader) == 4
    first = [y for _, y in loader]
    assert [len(y) for y in first] == [3, 3, 3, 1]
    order = torch.cat(first)
    assert torch.equal(order, torch.randperm(10, generator=torch.Generator().manual_seed(5)))
    second = torch.cat([y for _, y in loader])
    assert sorted(second.tolist()) == list(range(10)) and not torch.equal(order, second)
    for x, y in loader:
        assert torch.equal(x[:, 0].long(), y)


def test_loader_without_shuffle_and_with_drop_last():
    split = _indexed_split(10)
    assert torch.equal(torch.cat([y for _, y in BatchLoader(split, 4)]), torch.arange(10))
    loader = BatchLoader(
        split, 4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
    )
    assert len(loader) == 2
    assert [len(y) for _, y in loader] == [4, 4]
    assert len(BatchLoader(Split(torch.zeros(0, 2), torch.zeros(0)), 4)) == 0
    assert list(BatchLoader(Split(torch.zeros(0, 2), torch.zeros(0)), 4)) == []


def test_loader_tuple_inputs_augment_and_device():
    index = torch.arange(7)
    split = Split((index.float(), 10 * index, index > 3), index)
    calls = []

    def augment(x, generator):
        calls.append(generator)
        return (x[0] + 0.5, x[1], x[2])

    generator = torch.Generator().manual_seed(1)
    loader = BatchLoader(split, 2, shuffle=True, generator=generator, augment=augment, device="cpu")
    for (a, b, c), y in loader:
        assert torch.equal(a, y.float() + 0.5) and torch.equal(b, 10 * y) and torch.equal(c, y > 3)
    assert calls == [generator] * 4
    for (a, _, _), y in BatchLoader(split, 2):
        assert torch.equal(a, y.float())  # augmentation only when asked


def test_split_and_loader_validation():
    with pytest.raises(ValueError, match="same number of samples"):
        Split(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="0"):
        BatchLoader(_indexed_split(3), batch_size=0)


# --- augmentation


def _crop_offsets(out, x, padding, fill):
    """For each output image, the (top, left, flipped) choices that reproduce it from x."""
    b, c, h, w = x.shape
    padded = fill.view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = x
    found = []
    for i in range(b):
        matches = [
            (top, left, flipped)
            for top in range(2 * padding + 1)
            for left in range(2 * padding + 1)
            for flipped in (False, True)
            if torch.equal(
                out[i],
                padded[i, :, top : top + h, left : left + w].flip(-1)
                if flipped
                else padded[i, :, top : top + h, left : left + w],
            )
        ]
        assert len(matches) == 1, f"image {i} is no crop of its input"
        found.append(matches[0])
    return found


def test_random_crop_flip_is_a_padded_crop_and_mirror():
    x = torch.arange(64 * 2 * 5 * 6, dtype=torch.float32).view(64, 2, 5, 6)
    fill = torch.tensor([-1.0, -2.0])
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2, flip=True, fill=fill)
    assert out.shape == x.shape
    choices = _crop_offsets(out, x, 2, fill)
    assert len({(top, left) for top, left, _ in choices}) > 10  # offsets vary
    assert 10 < sum(f for _, _, f in choices) < 54  # about half flipped
    again = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2, flip=True, fill=fill)
    assert torch.equal(out, again)


def test_random_crop_without_flip_and_flip_without_crop():
    x = torch.arange(32 * 1 * 4 * 4, dtype=torch.float32).view(32, 1, 4, 4)
    out = random_crop_flip(
        x, torch.Generator().manual_seed(3), padding=1, flip=False, fill=torch.zeros(1)
    )
    assert not any(f for _, _, f in _crop_offsets(out, x, 1, torch.zeros(1)))
    out = random_crop_flip(
        x, torch.Generator().manual_seed(3), padding=0, flip=True, fill=torch.zeros(1)
    )
    for i in range(32):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    # Hand-checked single image: padding 0 and a mirrored row.
    image = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    flipped = {
        tuple(
            random_crop_flip(image, torch.Generator().manual_seed(s), 0, True, torch.zeros(1))
            .flatten()
            .tolist()
        )
        for s in range(20)
    }
    assert flipped == {(1.0, 2.0, 3.0), (3.0, 2.0, 1.0)}


# --- torchvision file formats


def _write_idx(path, array: np.ndarray) -> None:
    """IDX format: big-endian magic (0, 0, type 0x08 = ubyte, ndim), big-endian int32 dims, data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def _constant_images(ids, channels, size):
    """Image k is constant: channel c holds 10k + c, so x identifies the image and its channel."""
    ids = np.asarray(ids)
    values = 10 * ids[:, None] + np.arange(channels)[None, :]
    shape = (len(ids), channels, size, size)
    return np.broadcast_to(values[:, :, None, None], shape).astype(np.uint8)  # as the files hold


def _ids_and_channels(x, normalization):
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in NORMALIZATION[normalization])
    pixels = torch.round((x * std + mean) * 255)
    assert (pixels == pixels[:, :, :1, :1]).all()
    pixels = pixels[:, :, 0, 0].long()
    assert torch.equal(pixels - pixels[:, :1], torch.arange(x.shape[1]).expand_as(pixels))
    return pixels[:, 0] // 10


def _check_image_bundle(bundle, n_train, n_test, val_size, normalization, labels_of):
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (
        n_train - val_size,
        val_size,
        n_test,
    )
    train_ids = _ids_and_channels(bundle.train.inputs(), normalization)
    val_ids = _ids_and_channels(bundle.val.inputs(), normalization)
    assert sorted(train_ids.tolist() + val_ids.tolist()) == list(range(n_train))
    assert torch.equal(bundle.train.y, labels_of(train_ids))
    test_ids = _ids_and_channels(bundle.test.inputs(), normalization)
    assert test_ids.tolist() == list(range(n_train, n_train + n_test))  # test order is kept
    assert bundle.in_shape == tuple(bundle.train.x.shape[1:])
    assert all(s.x.dtype == torch.uint8 for s in (bundle.train, bundle.val, bundle.test))
    out = bundle.augment(bundle.train.inputs(), torch.Generator().manual_seed(0))
    assert out.shape == bundle.train.x.shape


def test_mnist_reads_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n_train, n_test = 12, 4
    images = _constant_images(range(n_train + n_test), 1, 28)[:, 0]
    labels = np.arange(n_train + n_test) % 10
    _write_idx(raw / "train-images-idx3-ubyte", images[:n_train])
    _write_idx(raw / "train-labels-idx1-ubyte", labels[:n_train])
    _write_idx(raw / "t10k-images-idx3-ubyte", images[n_train:])
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels[n_train:])
    bundle = load("mnist", root=str(tmp_path), val_size=3, seed=1)
    assert bundle.in_shape == (1, 28, 28) and bundle.num_outputs == 10
    _check_image_bundle(bundle, n_train, n_test, 3, "mnist", lambda ids: ids % 10)
    # MNIST augmentation: crops padded with normalised black, never mirrored.
    x = torch.arange(28.0).expand(8, 1, 28, 28).contiguous()
    out = bundle.augment(x, torch.Generator().manual_seed(0))
    black = -torch.tensor([0.1307]) / torch.tensor([0.3081])
    assert not any(f for _, _, f in _crop_offsets(out, x, 2, black))


@pytest.fixture
def no_md5(monkeypatch):
    """Real CIFAR files are checked against their md5; tiny fakes only need to exist."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_reads_python_pickle_batches(tmp_path, no_md5):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = _constant_images(range(13), 3, 32).reshape(13, 3072)  # rows: R plane, G plane, B plane
    labels = [(3 * k) % 10 for k in range(13)]
    for b in range(5):  # two images per training batch
        _pickle(
            folder / f"data_batch_{b + 1}",
            {"data": images[2 * b : 2 * b + 2], "labels": labels[2 * b : 2 * b + 2]},
        )
    _pickle(folder / "test_batch", {"data": images[10:], "labels": labels[10:]})
    _pickle(folder / "batches.meta", {"label_names": [str(k) for k in range(10)]})
    for normalization in ("resnet", "vgg"):
        bundle = load("cifar10", root=str(tmp_path), val_size=2, normalization=normalization)
        assert bundle.in_shape == (3, 32, 32) and bundle.num_outputs == 10
        _check_image_bundle(bundle, 10, 3, 2, normalization, lambda ids: (3 * ids) % 10)
    empty_val = load("cifar10", root=str(tmp_path), val_size=0)
    assert len(empty_val.val) == 0 and empty_val.val.x.shape == (0, 3, 32, 32)


def test_cifar100_reads_fine_labels(tmp_path, no_md5):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = _constant_images(range(9), 3, 32).reshape(9, 3072)
    fine = [(37 * k) % 100 for k in range(9)]
    _pickle(
        folder / "train", {"data": images[:6], "fine_labels": fine[:6], "coarse_labels": [0] * 6}
    )
    _pickle(
        folder / "test", {"data": images[6:], "fine_labels": fine[6:], "coarse_labels": [0] * 3}
    )
    _pickle(folder / "meta", {"fine_label_names": [str(k) for k in range(100)]})
    bundle = load("cifar100", root=str(tmp_path), val_size=1, seed=3)
    assert bundle.num_outputs == 100
    _check_image_bundle(bundle, 6, 3, 1, "resnet", lambda ids: (37 * ids) % 100)


@pytest.mark.parametrize(
    "name, folder",
    [
        ("mnist", os.path.join("MNIST", "raw")),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("cluster-pyg", "CLUSTER"),
    ],
)
def test_missing_files_raise_dataset_unavailable(tmp_path, name, folder):
    with pytest.raises(DatasetUnavailable) as error:
        load(name, root=str(tmp_path))
    message = str(error.value)
    assert os.path.join(str(tmp_path), folder) in message
    assert "--download" in message and "\n" not in message
    assert isinstance(error.value, FileNotFoundError)


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("cifar10", {}, DataShape(45_000, (3, 32, 32), 10)),
        ("cifar100", {"val_size": 0}, DataShape(50_000, (3, 32, 32), 100)),
        ("mnist", {"val_size": 100}, DataShape(59_900, (1, 28, 28), 10)),
    ],
)
def test_file_datasets_declare_their_shape_without_files(tmp_path, name, options, expected):
    assert shape_of(name, root=str(tmp_path), **options) == expected  # tmp_path holds no file
    with pytest.raises(ValueError, match="val_size"):
        shape_of(name, root=str(tmp_path), val_size=expected.train + 5000)


@pytest.mark.parametrize("name", ["mnist1d", "digits", "toy2d", "friedman1", "cluster"])
def test_generated_datasets_shape_is_the_built_bundles(name):
    bundle = load(name, seed=1)
    assert shape_of(name, seed=1) == DataShape(
        len(bundle.train), bundle.in_shape, bundle.num_outputs, bundle.task
    )


def test_declared_shape_matches_the_files(tmp_path, no_md5):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = _constant_images(range(4), 3, 32).reshape(4, 3072)
    for split in ("train", "test"):
        _pickle(
            folder / split, {"data": images, "fine_labels": [1, 2, 3, 4], "coarse_labels": [0] * 4}
        )
    _pickle(folder / "meta", {"fine_label_names": [str(k) for k in range(100)]})
    bundle = load("cifar100", root=str(tmp_path), val_size=1)
    shape = shape_of("cifar100", root=str(tmp_path), val_size=1)
    assert (shape.in_shape, shape.num_outputs) == (bundle.in_shape, bundle.num_outputs)
    assert shape.train == 50_000 - 1  # the real file's 50,000 images, not the fake's 4
