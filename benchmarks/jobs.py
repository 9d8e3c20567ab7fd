"""Concurrent runs: wall time of ``swalab run PRESET --jobs N`` against the sequential ``--jobs 1``.

    python benchmarks/jobs.py [--preset mnist1d --jobs 2 --repeats 1 --set train.epochs=10]

Each repeat runs both commands, interleaved, as fresh processes into fresh run directories (so the
start of the worker processes counts), checks that ``results.csv`` holds the same metrics, and
prints the median wall times and their ratio (target for mnist1d on the 2-core CPU: <= 0.6). The
one-minute load average before and after each command is printed too: on a machine shared with
other work the ratio is only as good as the cores that were free.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from swalab.lab.rundir import RESULT_FIELDS

# every column of results.csv except the ones that may differ between two equal runs
METRICS = tuple(f for f in RESULT_FIELDS if f not in ("seconds", "message"))


def run(
    preset: str, flags: list[str], sets: list[str], variant: str | None
) -> tuple[float, list[dict], str]:
    """(wall seconds, metric rows, load averages) of one ``swalab run PRESET FLAGS`` in a fresh
    directory (also used by benchmarks/share.py)."""
    out = Path(tempfile.mkdtemp()) / "run"
    argv = [sys.executable, "-m", "swalab", "run", preset, "--out", str(out), *flags]
    argv += [a for s in sets for a in ("--set", s)] + (["--variant", variant] if variant else [])
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    with (out / "results.csv").open() as f:
        rows = [{k: r[k] for k in METRICS} for r in csv.DictReader(f)]
    shutil.rmtree(out.parent)
    return wall, rows, f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist1d")
    parser.add_argument("--variant")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    walls: dict[int, list[float]] = {1: [], args.jobs: []}
    loads: dict[int, list[str]] = {1: [], args.jobs: []}
    identical = True
    for _ in range(args.repeats):
        results = {}
        for jobs in (1, args.jobs):
            wall, rows, load = run(args.preset, ["--jobs", str(jobs)], args.set, args.variant)
            walls[jobs].append(wall)
            loads[jobs].append(load)
            results[jobs] = rows
        identical &= results[1] == results[args.jobs]
    seq, par = statistics.median(walls[1]), statistics.median(walls[args.jobs])
    extra = f" --set {' --set '.join(args.set)}" if args.set else ""
    print(
        f"swalab run {args.preset}{extra}: {os.cpu_count()} CPUs, "
        f"median of {args.repeats} repeat(s)\n"
    )
    print(
        "| command | wall s (each repeat) | median s | ratio | load avg (1 min) before -> after "
        "| target |"
    )
    print("|---|---|---:|---:|---|---|")
    print(
        f"| --jobs 1 | {', '.join(f'{w:.1f}' for w in walls[1])} | {seq:.1f} | 1.00 | "
        f"{'; '.join(loads[1])} | |"
    )
    print(
        f"| --jobs {args.jobs} | {', '.join(f'{w:.1f}' for w in walls[args.jobs])} | {par:.1f} | "
        f"{par / seq:.2f} | {'; '.join(loads[args.jobs])} | <= 0.6 |"
    )
    print(f"\nresults.csv metrics identical: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
