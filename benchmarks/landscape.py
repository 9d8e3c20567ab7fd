"""Time the loss-landscape evaluation of the MNIST-1D CNN with BatchNorm: stacked weights vs one by one.

    python benchmarks/landscape.py [--grid 21] [--points N] [--stacks 8,16,32] [--repeats 3] [--threads 1]

Points of a 21 × 21 plane (the first ``--points`` of them, default all 441), each evaluated as
``swalab landscape`` does: BatchNorm recomputed with the training run's pass (3,500 training
sequences in batches of 100), then train loss and test error in eval mode in batches of 1,000.

- old path: ``LandscapeEvaluator(stack=1)``: one point at a time, its weights copied into one model;
- stacked: ``LandscapeEvaluator(stack=K).evaluate_many``: K points per pass, the parameter sets
  stacked and run with ``torch.func.functional_call`` under ``torch.vmap``, one set of BN running
  statistics per point.

Repeats are interleaved (old, K1, K2, ... then again), so machine load hits every row alike; the
table gives medians of wall-clock and of CPU (process) time, and the ratio to the old path in
the same run. The default landscape of ``swalab run mnist1d`` evaluates 1,305 points (line 21,
rays 402, two planes 441 each): its estimated seconds are the per-point time × 1,305. The numbers
of both paths are compared (max |Δ| of NLL and of the error rate).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from swalab.data import BatchLoader, load
from swalab.landscape import (
    LandscapeEvaluator,
    cross_entropy_stats,
    flat_parameters,
    grid_coordinates,
    plane,
)
from swalab.models import create

BN_BATCH, EVAL_BATCH, BN_SEED, WD = 100, 1000, 20_000, 5e-4
DEFAULT_LANDSCAPE_POINTS = 21 + 402 + 2 * 441


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=21)
    parser.add_argument(
        "--points", type=int, help="time the first N points of the plane (default: all)"
    )
    parser.add_argument(
        "--stacks", default="8,16,32", help="stack sizes to compare with the old path"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved repeats (median reported)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stacks = [int(k) for k in args.stacks.split(",")]
    if args.repeats < 1 or any(k < 2 for k in stacks):
        raise SystemExit("--repeats must be >= 1 and every stack >= 2")

    bundle = load("mnist1d", seed=0, val_size=500)
    ws = []
    for seed in range(
        3
    ):  # three weight vectors spanning the plane (the cost does not depend on their values)
        torch.manual_seed(seed)
        ws.append(
            flat_parameters(create("mnist1d_cnn", bundle.in_shape, bundle.num_outputs, bn=True))
        )
    pl = plane(*ws)
    coords = grid_coordinates(args.grid)
    points = [pl.point(float(a), float(b)) for a in coords for b in coords][: args.points]

    model = create("mnist1d_cnn", bundle.in_shape, bundle.num_outputs, bn=True)
    bn = list(
        BatchLoader(
            bundle.train, BN_BATCH, shuffle=True, generator=torch.Generator().manual_seed(BN_SEED)
        )
    )
    data = {
        name: list(BatchLoader(split, EVAL_BATCH))
        for name, split in (("train", bundle.train), ("test", bundle.test))
    }
    evaluators = {
        k: LandscapeEvaluator(model, bn, data, cross_entropy_stats, weight_decay=WD, stack=k)
        for k in [1] + stacks
    }

    wall: dict[int, list[float]] = {k: [] for k in evaluators}
    cpu: dict[int, list[float]] = {k: [] for k in evaluators}
    results: dict[int, list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for k, evaluate in evaluators.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            results[k] = evaluate.evaluate_many(points)
            wall[k].append(time.perf_counter() - start)
            cpu[k].append(time.process_time() - start_cpu)

    n = len(points)
    print(
        f"{n} points of a {args.grid} x {args.grid} plane, mnist1d_cnn bn=true, "
        f"{sum(p.numel() for p in model.parameters())} parameters, BN recomputed at every point; "
        f"torch {torch.__version__}, {args.threads} thread(s); medians of {args.repeats} interleaved repeats"
    )
    print()
    print(
        "| path | wall s | CPU s | ms/point (CPU) | default landscape, 1,305 points (CPU s) "
        "| speed-up (wall) | speed-up (CPU) | max abs diff NLL / error (points) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    base_wall, base_cpu = statistics.median(wall[1]), statistics.median(cpu[1])
    for k in evaluators:
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        nll = max(
            abs(a[m] - b[m])
            for a, b in zip(results[k], results[1])
            for m in ("train_nll", "test_nll")
        )
        err = max(
            abs(a[m] - b[m])
            for a, b in zip(results[k], results[1])
            for m in ("train_error", "test_error")
        )
        name = (
            "old path: one point at a time (stack=1)"
            if k == 1
            else f"stacked weights, vmap (stack={k})"
        )
        print(
            f"| {name} | {w:.1f} | {c:.1f} | {1000 * c / n:.1f} | {DEFAULT_LANDSCAPE_POINTS * c / n:.0f} "
            f"| {base_wall / w:.2f}x | {base_cpu / c:.2f}x | {nll:.1e} / {err:.2f} |"
        )


if __name__ == "__main__":
    main()
