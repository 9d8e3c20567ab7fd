"""Time one CLUSTER training epoch: dense-batch GCN vs sparse message passing (torch_geometric).

    python benchmarks/gcn.py [--graphs 1000 --repeats 3 --batch-size 128]

Both paths run the same ~100k-parameter GCN (``swalab.models`` ``gcn`` / ``gcn_sparse``) from the
same initial weights on the same batches: forward, cross-entropy on the valid nodes, backward and
an Adam step (lr 1e-3, as Dwivedi et al.). The dense path takes the padded batches exactly as
``swalab.data.BatchLoader`` yields them; the sparse path takes the same batches converted once,
before timing, with ``dense_to_sparse_batch`` (neither path pays for data preparation). The paths
alternate, epoch by epoch, for ``--repeats`` rounds; prints the median seconds per epoch and the
median of the per-round ratios sparse / dense (and the ratio of the fastest epochs, the least
disturbed by other load on a shared machine). The two paths' mean losses agree, which checks that
they compute the same thing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from swalab.data import BatchLoader, load
from swalab.models import create, dense_to_sparse_batch

Batch = tuple[tuple[Tensor, ...], Tensor]


def train_epoch(
    model: nn.Module, batches: list[Batch], initial: dict[str, Tensor]
) -> tuple[float, float]:
    """Seconds for one epoch from ``initial`` weights with a fresh Adam, and its mean loss."""
    model.load_state_dict(initial)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_sum = 0.0
    start = time.perf_counter()
    for inputs, target in batches:
        logits = model(*inputs)  # dense [B, N, C] with target -1 on padding; sparse [M, C]
        loss = F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item()
    return time.perf_counter() - start, loss_sum / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=1000, help="training graphs per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (one epoch per path)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    bundle = load("cluster", seed=args.seed, n_train=args.graphs, n_val=0, n_test=0)
    dense_batches: list[Batch] = []
    sparse_batches: list[Batch] = []
    for (x, adj, mask), y in BatchLoader(bundle.train, batch_size=args.batch_size):
        dense_batches.append(((x, adj, mask), y))
        sparse_batches.append((dense_to_sparse_batch(x, adj, mask), y[mask]))

    torch.manual_seed(args.seed)
    dense = create("gcn", bundle.in_shape, bundle.num_outputs)
    sparse = create("gcn_sparse", bundle.in_shape, bundle.num_outputs)
    initial = {k: v.clone() for k, v in dense.state_dict().items()}

    paths = {
        "dense (DenseGCNConv)": (dense, dense_batches),
        "sparse (GCNConv)": (sparse, sparse_batches),
    }
    nodes = int(bundle.train.x[2].sum())
    edges = sum(int(b[0][1].shape[1]) for b in sparse_batches)
    print(
        f"CLUSTER-like SBM: {args.graphs} graphs, {nodes} nodes, {edges} directed edges, "
        f"padded to {bundle.train.x[0].shape[1]} nodes; batch {args.batch_size}; "
        f"{sum(p.numel() for p in dense.parameters()):,} params; "
        f"torch threads {torch.get_num_threads()}"
    )
    for model, batches in paths.values():
        train_epoch(model, batches[:2], initial)  # warm-up
    # Alternate the paths so that both see the same background load; ratios are per repeat.
    times: dict[str, list[float]] = {name: [] for name in paths}
    losses: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, (model, batches) in paths.items():
            seconds, losses[name] = train_epoch(model, batches, initial)
            times[name].append(seconds)
    print(f"{'path':<22}{'s/epoch (median)':>18}{'min':>9}{'max':>9}{'mean loss':>12}")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"{name:<22}{median:>18.3f}{min(t):>9.3f}{max(t):>9.3f}{losses[name]:>12.5f}")
    ratios = [t_sparse / t_dense for t_dense, t_sparse in zip(*times.values())]
    fastest = min(times["sparse (GCNConv)"]) / min(times["dense (DenseGCNConv)"])
    print(
        f"ratio sparse / dense: {statistics.median(ratios):.2f}x "
        f"(median of {len(ratios)} rounds; range {min(ratios):.2f}-{max(ratios):.2f}; "
        f"fastest epochs {fastest:.2f}x)"
    )


if __name__ == "__main__":
    main()
