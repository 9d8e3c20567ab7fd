"""What the report's paper figures cost in the default run: the test split on the rays (Fig. 4)
and the paper's Fig. 1 plane, per point of the MNIST-1D CNN with BatchNorm.

    python benchmarks/landscape_figures.py [--points 60] [--repeats 5] [--threads 1]
    python benchmarks/landscape_figures.py --run RUN_DIR [--repeats 2] [--jobs 2]

Each point is evaluated as ``swalab landscape`` does (BN recomputed with the training run's pass,
3,500 training sequences in batches of 100, then eval-mode metrics in batches of 1,000):

- baseline: the train split alone (what the rays stopped at their width evaluated before);
- train + test: what they evaluate now, and what every plane point costs.

With ``--run``: the wall-clock time of the landscape step of ``swalab run`` on a finished run of
the default preset (``landscapes_of_run``, its landscape directory removed before each repeat), its
pieces alone (baseline) and with the paper's Fig. 1 plane of the first seed
(``landscape.first_seed: [plane]``, the preset's default).

Repeats are interleaved (baseline, then train + test, then again), so machine load hits both rows
alike; the table gives medians of CPU (process) time per point and the ratio to the baseline
measured in the same run, and the estimated seconds per seed of the default preset's rays (at most
404 points: 2 scalings × (2 × 10 rays × 10 steps + 2)) and of a plane of 21² / 15² / 11² points.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import time

import torch

from swalab.data import BatchLoader, load
from swalab.landscape import LandscapeEvaluator, cross_entropy_stats, flat_parameters
from swalab.models import create

BN_BATCH, EVAL_BATCH, BN_SEED, WD = 100, 1000, 20_000, 5e-4
RAY_POINTS = 2 * (2 * 10 * 10 + 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run", help="time the landscape step of this finished run instead")
    parser.add_argument("--jobs", type=int, default=2, help="seeds at once (with --run)")
    args = parser.parse_args()
    if args.points < 1 or args.repeats < 1:
        raise SystemExit("--points and --repeats must be >= 1")
    if args.run:
        return run_step(args.run, args.repeats, args.jobs)
    torch.set_num_threads(args.threads)
    bundle = load("mnist1d", seed=0, val_size=500)
    model = create("mnist1d_cnn", bundle.in_shape, bundle.num_outputs, bn=True)
    w = flat_parameters(model)
    g = torch.Generator().manual_seed(0)
    points = [
        w + 0.01 * torch.randn(w.shape, generator=g, dtype=w.dtype) for _ in range(args.points)
    ]
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
        "train split alone (baseline)": LandscapeEvaluator(
            model, bn, {"train": data["train"]}, cross_entropy_stats, weight_decay=WD
        ),
        "train + test": LandscapeEvaluator(model, bn, data, cross_entropy_stats, weight_decay=WD),
    }
    cpu: dict[str, list[float]] = {k: [] for k in evaluators}
    for _ in range(args.repeats):
        for name, evaluate in evaluators.items():
            start = time.process_time()
            evaluate.evaluate_many(points)
            cpu[name].append((time.process_time() - start) / len(points))
    print(
        f"{args.points} points, mnist1d_cnn bn=true, BN recomputed at every point; torch "
        f"{torch.__version__}, {args.threads} thread(s); medians of {args.repeats} interleaved "
        "repeats, CPU time"
    )
    print()
    print("| evaluation | ms/point | ratio | rays per seed (s) | plane 21² / 15² / 11² (s) |")
    print("|---|---:|---:|---:|---|")
    base = statistics.median(cpu["train split alone (baseline)"])
    for name, times in cpu.items():
        t = statistics.median(times)
        planes = " / ".join(f"{n * n * t:.1f}" for n in (21, 15, 11))
        print(f"| {name} | {1000 * t:.1f} | {t / base:.2f}x | {RAY_POINTS * t:.1f} | {planes} |")


def run_step(run_dir: str, repeats: int, jobs: int) -> None:
    """Wall-clock seconds of ``landscapes_of_run`` without and with the first seed's plane."""
    from swalab.report.geometry import landscapes_of_run
    from swalab.report.rundir import RunDir

    run = RunDir(run_dir)
    base = run.cfg.landscape
    rows = {
        f"pieces {', '.join(base.pieces)} (baseline)": dataclasses.replace(base, first_seed=[]),
        "the same + Fig. 1 plane of the first seed": dataclasses.replace(
            base, first_seed=["plane"]
        ),
    }
    wall: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(repeats):
        for name, config in rows.items():
            shutil.rmtree(run.path / "landscape", ignore_errors=True)
            start = time.perf_counter()
            landscapes_of_run(run.path, jobs=jobs, config=config, log=lambda _: None)
            wall[name].append(time.perf_counter() - start)
    print(
        f"landscape step of {run.path} ({len(run.cfg.seeds)} seeds, {jobs} at a time, grid "
        f"{base.grid}); medians of {repeats} interleaved repeats, wall-clock"
    )
    print()
    print("| landscape step | wall s | ratio | repeats (s) |")
    print("|---|---:|---:|---|")
    first = statistics.median(next(iter(wall.values())))
    for name, times in wall.items():
        t = statistics.median(times)
        print(f"| {name} | {t:.1f} | {t / first:.2f}x | {', '.join(f'{x:.1f}' for x in times)} |")


if __name__ == "__main__":
    main()
