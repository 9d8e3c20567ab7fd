"""Post-hoc SWA windows: a grid of N windows from one run's snapshots against N training runs.

    python benchmarks/posthoc.py [--preset mnist1d --repeats 3 --set train.epochs=10]

Each repeat trains, in a fresh directory, the preset's SWA run at 1.5 B with its snapshots
(``posthoc.run``, one seed) and, interleaved, the same run without snapshots; then
``swalab posthoc`` evaluates the default grid of N windows (each: SWA from the float64 sums,
BatchNorm recomputed, test and validation metrics). Printed: the median wall times, the cost of
the grid against N training runs (each window as a run of its own would train ``end`` epochs: the
sum of ``end / E`` full runs, E the run's epochs), the training time spent writing snapshots, and
the disk per snapshot.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from swalab import posthoc
from swalab.lab.config import load_config
from swalab.lab.runner import run_experiment
from swalab.report.windows import evaluate_windows

METHODS = "methods=[{method: sgd}, {method: swa, budget: 1.5, options: {swa_lr: 0.05}}]"


def train(preset: str, sets: list[str], out: Path, snapshots: bool) -> tuple[float, float]:
    """Wall time of one training run, and the part of it spent in ``Snapshots.update``."""
    cfg = load_config(
        preset,
        [*sets, "seeds=[0]", METHODS, "landscape.pieces=[]", "train.save_trajectory=false"]
        + (["posthoc.run=swa-1.5B"] if snapshots else ["posthoc.run="]),
    )
    spent = [0.0]
    update = posthoc.Snapshots.update

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return update(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    posthoc.Snapshots.update = timed
    try:
        start = time.perf_counter()
        run_experiment(cfg, out, progress=False, log=lambda s: None)
        return time.perf_counter() - start, spent[0]
    finally:
        posthoc.Snapshots.update = update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist1d")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    with_s, without_s, in_update, grid_s, windows, ends = [], [], [], [], 0, []
    sizes: list[int] = []
    epochs = 0
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            plain, _ = train(args.preset, args.set, Path(tmp) / f"plain{k}", snapshots=False)
            out = Path(tmp) / f"snap{k}"
            wall, spent = train(args.preset, args.set, out, snapshots=True)
            without_s.append(plain)
            with_s.append(wall)
            in_update.append(spent)
            start = time.perf_counter()
            evaluate_windows(out, log=lambda s: None)
            grid_s.append(time.perf_counter() - start)
            rows = (out / "posthoc.csv").read_text().splitlines()[1:]
            windows = len(rows)
            ends = [int(r.split(",")[4]) for r in rows]
            snaps = sorted((out / "swa-1.5B" / "seed0" / "posthoc").glob("snapshot-*.pt"))
            sizes = [p.stat().st_size for p in snaps]
            epochs = len(snaps)

    run_s = statistics.median(with_s)
    grid = statistics.median(grid_s)
    full_runs = sum(end / epochs for end in ends)  # N runs, each training to its window's end
    print(f"{args.preset}, one seed, SWA-1.5B ({epochs} epochs), {args.repeats} repeats, medians")
    print("(wall times on a shared, loaded machine: read the ratios)")
    print()
    print("| what | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| training run without snapshots | {statistics.median(without_s):.2f} | 1.00 |")
    print(
        f"| training run with snapshots | {run_s:.2f} | "
        f"{run_s / statistics.median(without_s):.3f} |"
    )
    print(
        f"| of which in Snapshots.update | {statistics.median(in_update):.3f} | "
        f"{statistics.median(in_update) / run_s:.4f} of the run |"
    )
    per = grid / windows
    print(f"| grid of N = {windows} windows (BN recompute + evaluation) | {grid:.2f} | 1.00 |")
    print(f"| per window | {per:.3f} | |")
    print(
        f"| N training runs ({full_runs:.1f} full-run equivalents) | {full_runs * run_s:.1f} | "
        f"{full_runs * run_s / grid:.1f}x the grid |"
    )
    print()
    print(
        f"disk per snapshot: {statistics.median(sizes) / 1024:.1f} KiB (float64 sums + 2 float32 "
        f"EMA tracks + buffers), {epochs} snapshots: {sum(sizes) / 1024**2:.2f} MiB per seed"
    )


if __name__ == "__main__":
    main()
