"""Time a 21 × 21 loss plane for the MNIST-1D CNN with BatchNorm, BN recomputed at every point.

    python benchmarks/landscape.py [--grid 21] [--repeats 3] [--baseline-points 9] [--threads 1]

swalab: ``LandscapeEvaluator`` — one model instance, each grid point copied into its parameters,
BN recomputed with ``update_bn`` on batches held in memory (3,500 training sequences in batches of
100, the training run's BN pass), then train loss and test error in eval mode on in-memory batches
of 1,000. Baseline, in the style of the reference ``plane.py``: at each point a new model, the
weights loaded with ``vector_to_parameters``, ``torch.utils.data.DataLoader`` over a
``TensorDataset`` (batches of 100) for ``torch.optim.swa_utils.update_bn`` and for evaluation;
timed on a few points (each right after swalab's evaluation of the same point; the speed-up is the
median of these paired ratios) and extrapolated to the whole grid. Both use the same BN batches
(same shuffling generator), so their numbers agree; the script checks that.

Target: the whole plane in under 60 s on the project's 2-core CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.utils import vector_to_parameters
from torch.optim import swa_utils
from torch.utils.data import DataLoader, TensorDataset

from swalab.data import BatchLoader, load
from swalab.landscape import LandscapeEvaluator, cross_entropy_stats, flat_parameters, grid_coordinates, plane
from swalab.models import create

BN_BATCH, EVAL_BATCH, BN_SEED, WD = 100, 1000, 20_000, 5e-4


def naive_point(w: torch.Tensor, bundle) -> dict[str, float]:
    """One grid point the straightforward way: new model, DataLoaders, torch's update_bn."""
    model = create("mnist1d_cnn", bundle.in_shape, bundle.num_outputs, bn=True)
    vector_to_parameters(w.float(), model.parameters())
    train = TensorDataset(bundle.train.x, bundle.train.y)
    bn_loader = DataLoader(train, batch_size=BN_BATCH, shuffle=True,
                           generator=torch.Generator().manual_seed(BN_SEED))
    swa_utils.update_bn(bn_loader, model)
    model.eval()
    out = {}
    with torch.no_grad():
        for name, split in (("train", bundle.train), ("test", bundle.test)):
            loss, wrong, n = 0.0, 0, 0
            for x, y in DataLoader(TensorDataset(split.x, split.y), batch_size=BN_BATCH):
                logits = model(x)
                loss += F.cross_entropy(logits, y, reduction="sum").item()
                wrong += logits.argmax(1).ne(y).sum().item()
                n += len(y)
            out[f"{name}_nll"], out[f"{name}_error"] = loss / n, 100.0 * wrong / n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=3, help="timed planes (median reported)")
    parser.add_argument("--baseline-points", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle = load("mnist1d", seed=0, val_size=500)
    ws = []
    for seed in range(3):  # three weight vectors spanning the plane (the cost does not depend on their values)
        torch.manual_seed(seed)
        ws.append(flat_parameters(create("mnist1d_cnn", bundle.in_shape, bundle.num_outputs, bn=True)))
    pl = plane(*ws)
    coords = grid_coordinates(args.grid)
    points = [pl.point(float(a), float(b)) for a in coords for b in coords]

    model = create("mnist1d_cnn", bundle.in_shape, bundle.num_outputs, bn=True)
    bn = list(BatchLoader(bundle.train, BN_BATCH, shuffle=True, generator=torch.Generator().manual_seed(BN_SEED)))
    data = {name: list(BatchLoader(split, EVAL_BATCH)) for name, split in (("train", bundle.train), ("test", bundle.test))}
    evaluate = LandscapeEvaluator(model, bn, data, cross_entropy_stats, weight_decay=WD)

    ours = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        results = [evaluate(w) for w in points]
        ours.append(time.perf_counter() - start)

    # the baseline on a few points, each timed right after swalab on the same point: on a shared, noisy
    # machine the per-point ratio of this pair is steadier than two separately timed totals
    naive, ratios, nll_diff, error_diff = [], [], 0.0, 0.0
    for i, w in enumerate(points[: args.baseline_points]):
        start = time.perf_counter()
        evaluate(w)
        mid = time.perf_counter()
        reference = naive_point(w, bundle)
        naive.append(time.perf_counter() - mid)
        ratios.append(naive[-1] / (mid - start))
        nll_diff = max([nll_diff] + [abs(reference[k] - results[i][k]) for k in ("train_nll", "test_nll")])
        error_diff = max([error_diff] + [abs(reference[k] - results[i][k]) for k in ("train_error", "test_error")])

    n = len(points)
    ours_s = statistics.median(ours)
    naive_s = statistics.median(naive) * n
    print(f"{args.grid} x {args.grid} plane ({n} points), mnist1d_cnn bn=true, {sum(p.numel() for p in model.parameters())} "
          f"parameters, BN recomputed at every point; torch {torch.__version__}, {args.threads} thread(s)")
    print(f"swalab: median of {args.repeats} planes {['%.1f' % t for t in ours]} s; baseline: median of "
          f"{args.baseline_points} points x {n}; speed-up = median per-point ratio (each point timed both ways "
          f"back to back); the two agree to {nll_diff:.1e} in NLL and {error_diff:.2f} points of error "
          "(argmax ties under a different summation order)")
    print()
    print("| method | seconds (plane) | points/s | speed-up vs baseline |")
    print("|---|---:|---:|---:|")
    print(f"| baseline: new model + DataLoader per point (extrapolated) | {naive_s:.1f} | {n / naive_s:.1f} | 1.0× |")
    print(f"| swalab LandscapeEvaluator | {ours_s:.1f} | {n / ours_s:.1f} | {statistics.median(ratios):.1f}× |")
    print()
    print(f"target: < 60 s — {'met' if ours_s < 60 else 'NOT met'}")


if __name__ == "__main__":
    main()
