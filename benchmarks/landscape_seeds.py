"""The landscape pieces the claims read, for every seed of a run: the former protocol vs the preset's.

    python benchmarks/landscape_seeds.py RUN_DIR [--jobs 2] [--repeats 1]

RUN_DIR: a finished MNIST-1D run with SGD and SWA runs whose SWA run kept its snapshots, e.g.

    swalab run mnist1d --out runs/bench --jobs 2 --set 'landscape.pieces=[]' \\
        --set 'methods=[{method: sgd}, {method: swa, options: {swa_lr: 0.05}}]'

Each protocol computes the pieces line, rays, ensemble and bn of every seed as ``swalab run`` does
after training (``landscapes_of_run``: ``--jobs`` seeds at once in spawned processes, one thread
each), in a fresh copy of RUN_DIR without its landscape, so the start of the worker processes
counts. Protocols (docs/claims.md):

- former: the 3-seed first outcome's (line 21 points, rays 10 x 21 points, whole rays, raw
  directions);
- preset, raw rays only: the mnist1d preset's section with ``directions: [raw]`` (before issue 19);
- preset: the mnist1d preset's ``landscape:`` section (filter-normalised and raw rays).

Repeats interleaved, medians. CPU = user + system time of this process and its workers; points =
evaluated weight vectors per seed (line + ray points actually evaluated; ensemble and bn add a
few evaluations each). The claims' statistics are read from both, so the table also gives the
largest change of claim 2's per-seed width difference and claim 3's per-seed line statistic
(the latter must be 0: both grids hold t = 0.5 and 1.5).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from swalab.lab.config import LandscapeConfig, load_config
from swalab.report.claims import CLAIM_PIECES, evaluate_claims
from swalab.report.geometry import landscape_dir, landscapes_of_run
from swalab.report.rundir import RunDir

PROTOCOLS = {
    "former (line 21, rays 10 x 21, whole rays)": LandscapeConfig(
        pieces=list(CLAIM_PIECES),
        line_points=21,
        rays=10,
        ray_points=21,
        ray_tails=True,
        directions=["raw"],
    ),
    "preset, raw rays only": load_config("mnist1d", ["landscape.directions=[raw]"]).landscape,
    "preset (pre-registered)": load_config("mnist1d").landscape,
}
RAW_LINE = ("2", "2 (raw rays)")  # claim 2 on raw rays: the primary line, or the second one


def once(run_dir: Path, config: LandscapeConfig, jobs: int) -> tuple[float, float, float, dict]:
    """(wall s, CPU s, points per seed, claim values) of one protocol in a fresh copy."""
    work = Path(tempfile.mkdtemp()) / "run"
    shutil.copytree(run_dir, work, ignore=shutil.ignore_patterns("landscape", ".lock"))
    before, start = os.times(), time.perf_counter()
    landscapes_of_run(work, jobs=jobs, config=config, log=lambda _: None)
    wall, after = time.perf_counter() - start, os.times()
    cpu = sum(after[:4]) - sum(before[:4])  # user + system, this process and its children
    run = RunDir(work)
    points = []
    for seed in run.cfg.seeds:
        count = config.line_points
        for how in config.directions:
            name = "rays.npz" if how == "raw" else f"rays_{how}.npz"
            rays = np.load(landscape_dir(run, seed) / name)
            along = [rays[f"{k}_train_loss"][:, 1:] for k in ("swa", "sgd")]
            count += 2 + sum(int(np.isfinite(a).sum()) for a in along)
        points.append(count)
    claims = evaluate_claims(work)
    raw = next(c for c in claims if c.id in RAW_LINE and "raw rays" in c.statistic)
    values = {"2": raw.values, "3": next(c.values for c in claims if c.id == "3")}
    shutil.rmtree(work.parent)
    return wall, cpu, statistics.mean(points), values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    walls: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    cpus: dict[str, list[float]] = {name: [] for name in PROTOCOLS}
    points: dict[str, float] = {}
    values: dict[str, dict] = {}
    loads = []
    for _ in range(args.repeats):
        for name, config in PROTOCOLS.items():
            load = os.getloadavg()[0]
            wall, cpu, points[name], values[name] = once(args.run_dir, config, args.jobs)
            walls[name].append(wall)
            cpus[name].append(cpu)
            loads.append(f"{load:.1f} -> {os.getloadavg()[0]:.1f}")
    seeds = RunDir(args.run_dir).cfg.seeds
    print(
        f"{len(seeds)} seeds of {args.run_dir}, --jobs {args.jobs}; medians of {args.repeats} "
        f"interleaved repeats; load average (1 min) before -> after each: {', '.join(loads)}"
    )
    print()
    print("| protocol | points per seed | wall s | CPU s | ratio (wall) | ratio (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = next(iter(PROTOCOLS))
    for name in PROTOCOLS:
        w, c = statistics.median(walls[name]), statistics.median(cpus[name])
        print(
            f"| {name} | {points[name]:.0f} | {w:.1f} | {c:.1f} | "
            f"{w / statistics.median(walls[base]):.2f}x | {c / statistics.median(cpus[base]):.2f}x |"
        )
    new = list(PROTOCOLS)[-1]
    for claim in ("2", "3"):
        a, b = values[base].get(claim, {}), values[new].get(claim, {})
        change = max((abs(a[s] - b[s]) for s in a if s in b), default=float("nan"))
        print(
            f"claim {claim}{' (raw rays)' if claim == '2' else ''}: largest per-seed change of d "
            f"between the first and the last protocol: {change:.3g}"
        )


if __name__ == "__main__":
    main()
