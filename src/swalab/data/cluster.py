"""CLUSTER (Dwivedi et al., "Benchmarking Graph Neural Networks"): node classification on SBMs.

Each graph is a stochastic block model with 6 clusters of ``randint(5, 35)`` nodes, intra-cluster
edge probability p = 0.55 and inter-cluster q = 0.25, nodes randomly permuted; one random node of
each cluster r carries the feature r + 1 and all others 0; the target of every node is its cluster
id (REFERENCE.md §6). ``cluster`` generates such graphs from a seed, ``cluster-pyg`` reads the
published 12,000 graphs through torch_geometric.

Both are held densely, padded to the largest graph of the bundle, ``n_max`` nodes:
``x = (features [G, n_max, 7] float, adj [G, n_max, n_max] float, mask [G, n_max] bool)`` with the
feature value 0..6 one-hot encoded (as in torch_geometric's CLUSTER), ``adj`` symmetric 0/1 without
self loops, and ``y [G, n_max]`` long with -1 on padding. Padding rows of features and adj are zero.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from swalab.data.base import (
    DATASETS,
    DataBundle,
    DatasetUnavailable,
    Split,
    check_int,
    seeded_generator,
)

__all__ = ["NUM_FEATURES", "graphs_to_dense", "sbm_cluster_graphs"]

NUM_CLUSTERS = 6
NUM_FEATURES = NUM_CLUSTERS + 1  # one-hot of the node feature value 0..6


def sbm_cluster_graphs(
    num_graphs: int,
    generator: torch.Generator,
    num_clusters: int = NUM_CLUSTERS,
    min_size: int = 5,
    max_size: int = 35,
    p: float = 0.55,
    q: float = 0.25,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample CLUSTER graphs (Dwivedi et al.), batched: a chunk of graphs is one set of tensor ops.

    Cluster sizes are drawn first; graphs are then generated in chunks of similar node count (so a
    chunk pads little), writing each graph back to its own index.

    Args:
        num_graphs: how many graphs.
        generator: the only random source.
        num_clusters: clusters per graph.
        min_size, max_size: cluster sizes are ``randint(min_size, max_size)`` (max excluded).
        p, q: intra- and inter-cluster edge probabilities.
        chunk_size: graphs generated together (memory about ``10 · chunk_size · n_max²`` bytes).

    Returns:
        ``features [G, n_max]`` long (r + 1 on cluster r's seed node, 0 elsewhere and on padding),
        ``adj [G, n_max, n_max]`` bool (symmetric, no self loops), ``labels [G, n_max]`` long
        (cluster ids, -1 on padding); the nodes of graph g are its first ``(labels[g] >= 0).sum()``.
    """
    k = num_clusters
    sizes = torch.randint(min_size, max_size, (num_graphs, k), generator=generator)
    counts = sizes.sum(1)
    n_max = int(counts.max()) if num_graphs else 0
    features = torch.zeros(num_graphs, n_max, dtype=torch.long)
    adj = torch.zeros(num_graphs, n_max, n_max, dtype=torch.bool)
    labels = torch.full((num_graphs, n_max), -1, dtype=torch.long)
    by_size = torch.argsort(counts, stable=True)
    for start in range(0, num_graphs, chunk_size):
        index = by_size[start : start + chunk_size]
        b, n = len(index), int(counts[index].max())
        # Nodes in cluster order (cluster k marks padding), then a random permutation that keeps
        # padding last: random keys in [0, 1) for nodes and [1, 2) for padding, sorted.
        ends = sizes[index].cumsum(1)  # [b, k]
        lab = torch.searchsorted(ends, torch.arange(n).expand(b, n).contiguous(), right=True)
        keys = torch.rand(b, n, generator=generator) + (lab == k)
        lab = lab.gather(1, keys.argsort(1))  # [b, n]
        valid = lab < k
        # Edges: one Bernoulli(p or q) draw per unordered pair (upper triangle), mirrored.
        same = lab[:, :, None] == lab[:, None, :]
        prob = torch.where(same, p, q)
        upper = (torch.rand(b, n, n, generator=generator) < prob).triu(1)
        upper &= valid[:, :, None] & valid[:, None, :]
        # Seed nodes: the member of cluster r with the largest random score gets feature r + 1.
        score = torch.rand(b, n, generator=generator)
        member = lab[:, None, :] == torch.arange(k)[None, :, None]  # [b, k, n]
        seed_node = torch.where(member, score[:, None, :], -1.0).argmax(2)  # [b, k]
        feat = torch.zeros(b, n, dtype=torch.long)
        feat.scatter_(1, seed_node, torch.arange(1, k + 1).expand(b, k))

        features[index, :n] = feat
        adj[index, :n, :n] = upper | upper.transpose(1, 2)
        labels[index, :n] = torch.where(valid, lab, -1)
    return features, adj, labels


def _dense_split(features: Tensor, adj: Tensor, labels: Tensor) -> Split:
    """Integer features -> one-hot float with zero padding rows; bool adj -> float."""
    mask = labels >= 0
    x = torch.nn.functional.one_hot(features, NUM_FEATURES).float() * mask[..., None]
    return Split((x, adj.float(), mask), labels)


def _bundle(name: str, train: Split, val: Split, test: Split, num_features: int) -> DataBundle:
    return DataBundle(
        name,
        "node_classification",
        train,
        val,
        test,
        num_outputs=NUM_CLUSTERS,
        in_shape=(num_features,),
    )


@DATASETS.register("cluster")
def cluster(
    *,
    root: str = "data",
    download: bool = False,
    seed: int = 0,
    n_train: int = 10_000,
    n_val: int = 1_000,
    n_test: int = 1_000,
) -> DataBundle:
    """CLUSTER generated from a seed: SBM graphs, 6 clusters, p=0.55, q=0.25, dense padded tensors.

    Same generator as the benchmark (REFERENCE.md §6), whose 10,000/1,000/1,000 split sizes are the
    defaults; the three splits are consecutive draws from one seeded stream. Node features are the
    one-hot value 0..6 (7 features); see the module docstring for the dense layout. ``root`` and
    ``download`` are accepted for a uniform signature and unused.
    """
    check_int("n_train", n_train, 1)
    check_int("n_val", n_val, 0)
    check_int("n_test", n_test, 0)
    features, adj, labels = sbm_cluster_graphs(n_train + n_val + n_test, seeded_generator(seed))
    full = _dense_split(features, adj, labels)
    val_end = n_train + n_val
    train, val, test = (
        full.subset(slice(a, b)) for a, b in ((0, n_train), (n_train, val_end), (val_end, None))
    )
    return _bundle("cluster", train, val, test, NUM_FEATURES)


def _node_features(x: Tensor) -> Tensor:
    """Integer feature values ``[N]`` or ``[N, 1]`` -> one-hot ``[N, 7]``; float ``[N, F]`` kept."""
    if x.is_floating_point():
        return x if x.dim() == 2 else x[:, None]
    return torch.nn.functional.one_hot(x.reshape(-1).long(), NUM_FEATURES).float()


def graphs_to_dense(graphs: Sequence[Any], n_max: int) -> Split:
    """torch_geometric ``Data`` graphs (``x``, ``edge_index``, ``y``) -> a dense padded Split.

    Integer node features (values 0..6) are one-hot encoded, float ones kept; each edge
    ``(source, target)`` of ``edge_index`` sets ``adj[g, source, target] = 1``.
    """
    num_features = _node_features(graphs[0].x).shape[1] if graphs else NUM_FEATURES
    x = torch.zeros(len(graphs), n_max, num_features)
    adj = torch.zeros(len(graphs), n_max, n_max)
    y = torch.full((len(graphs), n_max), -1, dtype=torch.long)
    for g, data in enumerate(graphs):
        n = data.num_nodes
        x[g, :n] = _node_features(data.x)
        adj[g, data.edge_index[0], data.edge_index[1]] = 1.0
        y[g, :n] = data.y.long()
    return Split((x, adj, y >= 0), y)


@DATASETS.register("cluster-pyg")
def cluster_pyg(*, root: str = "data", download: bool = False, seed: int = 0) -> DataBundle:
    """CLUSTER as published (torch_geometric GNNBenchmarkDataset): 10,000/1,000/1,000 graphs, dense.

    Reads ``root/CLUSTER/raw/CLUSTER_v2.pt`` (processing it once into ``root/CLUSTER/processed/``)
    and fetches it only with ``download=True``. The splits are fixed, so ``seed`` is unused. Node
    features are torch_geometric's 7 CLUSTER features; see the module docstring for the layout.
    """
    from torch_geometric.datasets import GNNBenchmarkDataset

    check_int("seed", seed, 0)
    folder = os.path.join(root, "CLUSTER")
    # torch_geometric requires the raw file even when processed files exist (Dataset._download).
    if not download and not os.path.isfile(os.path.join(folder, "raw", "CLUSTER_v2.pt")):
        raise DatasetUnavailable(
            f"CLUSTER not found in {folder} (no raw/CLUSTER_v2.pt); run with --download to fetch it"
        )
    splits = [list(GNNBenchmarkDataset(root, "CLUSTER", split=s)) for s in ("train", "val", "test")]
    n_max = max(data.num_nodes for graphs in splits for data in graphs)
    train, val, test = (graphs_to_dense(graphs, n_max) for graphs in splits)
    return _bundle("cluster-pyg", train, val, test, num_features=train.x[0].shape[2])
