"""Concurrent runs: wall time of ``swalab run PRESET --jobs N`` (and ``--executor``) against ``--jobs 1``.

    python benchmarks/jobs.py [--preset mnist1d --jobs 2 --repeats 1 --set train.epochs=10]
    python benchmarks/jobs.py --executors submitit,ray   # each engine against --jobs 2

With ``--executors``, each engine (submitit's local executor standing in for Slurm, a local Ray
cluster) runs the same command, start-up included, and is compared with ``--jobs N``; its
start-up cost is the wall time of a one-epoch, one-run experiment beyond that of ``--jobs 1``.

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


# the engines of --executor, as this machine runs them (a local Slurm stand-in, a local Ray)
EXECUTORS = {
    "submitit": ["--executor", "submitit", "--executor-option", "cluster=local"],
    "ray": ["--executor", "ray", "--executor-option", "num_cpus=1"],
}
# a run with almost nothing to train: its wall time is the start-up (engine, data, processes)
TRIVIAL = ["train.epochs=1", "seeds=[0]", "methods=[{method: sgd}]"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist1d")
    parser.add_argument("--variant")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--executors",
        default="",
        help="comma-separated: submitit,ray: also time these executors, against --jobs N, and "
        "their start-up (a one-epoch, one-run experiment, against --jobs 1)",
    )
    args = parser.parse_args()
    chosen = [e.strip() for e in args.executors.split(",") if e.strip()]
    for name in chosen:
        if name not in EXECUTORS:
            raise SystemExit(
                f"--executors: expected names among {', '.join(EXECUTORS)}, got {name!r}"
            )
    commands = {"--jobs 1": ["--jobs", "1"], f"--jobs {args.jobs}": ["--jobs", str(args.jobs)]}
    commands.update({f"--executor {name}": EXECUTORS[name] for name in chosen})
    baseline = f"--jobs {args.jobs}"
    walls: dict[str, list[float]] = {name: [] for name in commands}
    loads: dict[str, list[str]] = {name: [] for name in commands}
    starts: dict[str, list[float]] = {name: [] for name in commands if name != baseline}
    identical = True
    for _ in range(args.repeats):
        results = {}
        for name, flags in commands.items():  # interleaved: each repeat runs every command
            wall, rows, load = run(args.preset, flags, args.set, args.variant)
            walls[name].append(wall)
            loads[name].append(load)
            results[name] = rows
            if chosen and name in starts:
                starts[name].append(run(args.preset, flags, [*args.set, *TRIVIAL], args.variant)[0])
        identical &= all(rows == results["--jobs 1"] for rows in results.values())
    median = {name: statistics.median(w) for name, w in walls.items()}
    extra = f" --set {' --set '.join(args.set)}" if args.set else ""
    print(
        f"swalab run {args.preset}{extra}: {os.cpu_count()} CPUs, "
        f"median of {args.repeats} repeat(s)\n"
    )
    print(
        f"| command | wall s (each repeat) | median s | ratio to --jobs 1 | ratio to {baseline} "
        "| load avg (1 min) before -> after | target |"
    )
    print("|---|---|---:|---:|---:|---|---|")
    for name in commands:
        target = "<= 0.6" if name == baseline else ""
        print(
            f"| {name} | {', '.join(f'{w:.1f}' for w in walls[name])} | {median[name]:.1f} | "
            f"{median[name] / median['--jobs 1']:.2f} | {median[name] / median[baseline]:.2f} | "
            f"{'; '.join(loads[name])} | {target} |"
        )
    if chosen:
        one = statistics.median(starts["--jobs 1"])
        print(
            f"\nstart-up: the same command on a one-epoch, one-run experiment ({', '.join(TRIVIAL)})\n"
        )
        print("| command | wall s (median) | start-up beyond --jobs 1, s |")
        print("|---|---:|---:|")
        for name, values in starts.items():
            print(
                f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) - one:+.1f} |"
            )
    print(f"\nresults.csv metrics identical: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
