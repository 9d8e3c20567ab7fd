"""Shared trajectories: epochs trained per seed with and without sharing, and the wall time of
``swalab run PRESET --jobs 1`` against ``swalab run PRESET --jobs 1 --no-share``.

    python benchmarks/share.py [--preset mnist1d --repeats 1 --set train.epochs=10]

The epoch counts come from the recipes alone (``sharing.plan_branches``, no training), for the
Table 1 presets (SGD at B against SWA at 1B, 1.25B and 1.5B) and ``--preset``; steps per epoch from
the dataset's training size and the batch size (they matter only to recipes whose LR changes
within an epoch). Each repeat then runs both commands, interleaved, as fresh processes into fresh
run directories, checks that ``results.csv`` holds the same metrics, and prints the median wall
times and their ratio.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from jobs import run  # benchmarks/jobs.py: one timed `swalab run` in a fresh directory

from swalab.lab.config import load_config
from swalab.lab.inputs import load_bundle, train_loader
from swalab.lab.sharing import plan_branches, trained_epochs

TABLE1 = [
    f"{d}-{m}" for d in ("cifar10", "cifar100") for m in ("vgg16", "preresnet164", "wrn28x10")
]


def steps_per_epoch(cfg) -> int:
    """From the data itself where it is generated here; CIFAR's 50,000 images otherwise (not on
    this machine; only recipes whose LR changes within an epoch see the difference)."""
    if cfg.data.name.startswith("cifar"):
        return -(-(cfg.data.train_size or 50_000) // cfg.train.batch_size)
    bundle = load_bundle(cfg, cfg.seeds[0], download=False)
    return len(train_loader(cfg, bundle, cfg.seeds[0], torch.device("cpu"))[0])


def epochs_per_seed(preset: str, sets: list[str], variant: str | None) -> tuple[int, int, int]:
    """(epochs without sharing, with sharing, runs) for one seed of ``preset``."""
    cfg = load_config(preset, sets, variant)
    steps = steps_per_epoch(cfg)
    alone, shared = (
        trained_epochs(plan_branches(cfg.train, cfg.methods, steps, share=share))
        for share in (False, True)
    )
    return alone, shared, len(cfg.methods)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist1d")
    parser.add_argument("--variant")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    print("| preset | runs per seed | epochs per seed, separate | shared | ratio |")
    print("|---|---:|---:|---:|---:|")
    for preset in [*TABLE1, args.preset]:
        sets, variant = (args.set, args.variant) if preset == args.preset else ([], None)
        alone, shared, runs = epochs_per_seed(preset, sets, variant)
        print(f"| {preset} | {runs} | {alone} | {shared} | {shared / alone:.2f} |")

    walls: dict[bool, list[float]] = {False: [], True: []}
    identical = True
    for _ in range(args.repeats):
        results = {}
        for share in (False, True):
            flags = ["--jobs", "1"] + ([] if share else ["--no-share"])  # sharing alone
            wall, results[share], _ = run(args.preset, flags, args.set, args.variant)
            walls[share].append(wall)
        identical = identical and results[False] == results[True]
    command = f"swalab run {args.preset} " + " ".join(f"--set {s}" for s in args.set)
    print(f"\n{command}\n")
    print("| command | wall s (each repeat) | median s | ratio |")
    print("|---|---|---:|---:|")
    base = statistics.median(walls[False])
    for share in (False, True):
        each = ", ".join(f"{w:.1f}" for w in walls[share])
        median = statistics.median(walls[share])
        name = "shared (default)" if share else "--no-share"
        print(f"| {name} | {each} | {median:.1f} | {median / base:.2f} |")
    print(f"\nresults.csv metrics identical: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
