"""GCN for node classification on CLUSTER (Dwivedi et al., "Benchmarking Graph Neural Networks").

The benchmark's ~100k-parameter GCN: node features embedded to ``hidden``, ``num_layers`` layers of
``h <- h + ReLU(BN(GCNConv(h)))`` (residual, BatchNorm over nodes), then their MLP readout
``hidden -> hidden/2 -> hidden/4 -> classes`` (``readout_layers=2``; 0 gives one linear layer). The
convolution is Kipf & Welling's ``D^-1/2 (A + I) D^-1/2 X W + b``.

Two implementations of the same function, with the same parameter names (state dicts interchange):

* ``DenseGCN`` (``gcn``) on a padded dense batch
  ``(features [B, N, F], adj [B, N, N], mask [B, N])`` with ``torch_geometric.nn.DenseGCNConv``:
  batched matrix products, fast on CPU for graphs of CLUSTER's size (30-200 nodes, dense SBM).
  BatchNorm sees only the valid nodes, so padding changes nothing.
* ``SparseGCN`` (``gcn_sparse``) on a PyG sparse batch ``(x [M, F], edge_index [2, E])`` with
  ``torch_geometric.nn.GCNConv`` (message passing), for comparison; ``dense_to_sparse_batch``
  converts a dense batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from swalab.models.base import MODELS, check_positive

__all__ = ["DenseGCN", "SparseGCN", "dense_to_sparse_batch", "gcn", "gcn_sparse"]


def _mlp_readout(hidden: int, num_outputs: int, layers: int) -> nn.Sequential:
    """Dwivedi et al.'s ``MLPReadout``: ``layers`` x Linear(d, d // 2)-ReLU, then a Linear."""
    modules: list[nn.Module] = []
    width = hidden
    for _ in range(layers):
        modules += [nn.Linear(width, width // 2), nn.ReLU()]
        width //= 2
    modules.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*modules)


class _GCNBase(nn.Module):
    """Parameters shared by both implementations: embedding, convolutions, norms, readout."""

    def __init__(
        self,
        in_features: int,
        num_outputs: int,
        hidden: int = 146,
        num_layers: int = 4,
        readout_layers: int = 2,
    ) -> None:
        super().__init__()
        conv = self.conv_class()
        self.embed = nn.Linear(in_features, hidden)
        self.convs = nn.ModuleList(conv(hidden, hidden) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(num_layers))
        self.readout = _mlp_readout(hidden, num_outputs, readout_layers)

    @staticmethod
    def conv_class() -> type[nn.Module]:
        """The torch_geometric convolution (imported only when a GCN is built)."""
        raise NotImplementedError


class DenseGCN(_GCNBase):
    """GCN on a padded dense batch; see the module docstring.

    Padding contract: rows and columns of ``adj`` at padded nodes are zero. Padded nodes carry zero
    hidden states, are left out of BatchNorm (batch statistics and running statistics), and get
    zero logits.
    """

    @staticmethod
    def conv_class() -> type[nn.Module]:
        from torch_geometric.nn import DenseGCNConv

        return DenseGCNConv

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor) -> Tensor:
        """``x [B, N, F]``, ``adj [B, N, N]``, ``mask [B, N]`` bool -> logits ``[B, N, C]``."""
        valid = mask.unsqueeze(-1).to(x.dtype)
        h = self.embed(x) * valid
        for conv, norm in zip(self.convs, self.norms):
            z = conv(h, adj, mask)  # self-loops added, symmetric normalisation, padded rows zeroed
            out = h.new_zeros(h.shape)
            out[mask] = norm(z[mask])  # BatchNorm over the valid nodes only
            h = h + out.relu()
        return self.readout(h) * valid


class SparseGCN(_GCNBase):
    """The same GCN on a PyG sparse batch (all nodes valid); its weights fit ``DenseGCN``."""

    @staticmethod
    def conv_class() -> type[nn.Module]:
        from torch_geometric.nn import GCNConv

        return GCNConv

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """``x [M, F]`` (nodes of all graphs), ``edge_index [2, E]`` -> logits ``[M, C]``."""
        h = self.embed(x)
        for conv, norm in zip(self.convs, self.norms):
            h = h + norm(conv(h, edge_index)).relu()
        return self.readout(h)


def dense_to_sparse_batch(features: Tensor, adj: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Convert a padded dense batch to a PyG sparse batch ``(x [M, F], edge_index [2, E])``.

    Nodes are the valid nodes in batch-major order (``features[mask]``); every nonzero
    ``adj[b, i, j]`` between valid nodes, ``i != j``, becomes the edge ``j -> i`` (so aggregation at
    ``i`` sums row ``i``, as ``adj @ h`` does). The adjacency is read as unweighted, and self-loops
    are left to ``GCNConv``, which adds them as ``DenseGCNConv`` does.
    """
    index = mask.long().flatten().cumsum(0).view(mask.shape) - 1  # node id within the sparse batch
    b, i, j = adj.nonzero(as_tuple=True)
    keep = mask[b, i] & mask[b, j] & (i != j)
    b, i, j = b[keep], i[keep], j[keep]
    edge_index = torch.stack([index[b, j], index[b, i]])
    return features[mask], edge_index


def _check(hidden: int, num_layers: int, readout_layers: int) -> None:
    check_positive("hidden", hidden, integer=True)
    check_positive("num_layers", num_layers, integer=True)
    if not isinstance(readout_layers, int) or readout_layers < 0 or (hidden >> readout_layers) < 1:
        raise ValueError(
            f"readout_layers must be an int in [0, log2(hidden)], got {readout_layers!r}"
        )


def _features(model: str, in_shape: tuple[int, ...]) -> int:
    if len(in_shape) != 1:
        raise ValueError(f"{model} expects in_shape (F,) = node feature size, got {in_shape}")
    return in_shape[0]


@MODELS.register("gcn")
def gcn(
    in_shape: tuple[int, ...],
    num_outputs: int,
    hidden: int = 146,
    num_layers: int = 4,
    readout_layers: int = 2,
) -> DenseGCN:
    """Dense-batch residual GCN with masked BatchNorm for CLUSTER (Dwivedi et al., ~100k params)."""
    _check(hidden, num_layers, readout_layers)
    return DenseGCN(_features("gcn", in_shape), num_outputs, hidden, num_layers, readout_layers)


@MODELS.register("gcn_sparse")
def gcn_sparse(
    in_shape: tuple[int, ...],
    num_outputs: int,
    hidden: int = 146,
    num_layers: int = 4,
    readout_layers: int = 2,
) -> SparseGCN:
    """The gcn model with PyG message passing on a sparse batch, forward(x, edge_index)."""
    _check(hidden, num_layers, readout_layers)
    in_features = _features("gcn_sparse", in_shape)
    return SparseGCN(in_features, num_outputs, hidden, num_layers, readout_layers)
