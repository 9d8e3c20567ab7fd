"""Saving a run's trajectory: one file per epoch (``RunFiles.append_trajectory``) against the
former ``trajectory.pt``, re-read and rewritten whole every epoch (I/O quadratic in epochs).

    python benchmarks/trajectory.py [--epochs 20 50] [--params 100000] [--repeats 3]

Each row times writing the weights after every one of E epochs (a state of P float32 values, a
model of that size) into a fresh directory, median of the repeats; the ratio is old / new.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from swalab.lab.files import atomic_save, load_torch
from swalab.lab.rundir import RunFiles


def whole_file(path: Path, epochs: int, state: dict[str, torch.Tensor]) -> None:
    """The former scheme: load the list, append this epoch, save the whole list again."""
    target = path / "trajectory.pt"
    for epoch in range(epochs):
        trajectory = load_torch(target) if epoch > 0 else []
        atomic_save(trajectory + [state], target)


def per_epoch(path: Path, epochs: int, state: dict[str, torch.Tensor]) -> None:
    files = RunFiles(path)
    for epoch in range(epochs):
        files.append_trajectory(epoch + 1, state)


def median_s(fn, epochs: int, state: dict[str, torch.Tensor], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            fn(Path(tmp), epochs, state)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = {"weight": torch.randn(args.params)}
    print(f"trajectory of {args.params:,} float32 parameters, median of {args.repeats}")
    print(f"{'epochs':>6}  {'whole file (s)':>14}  {'per epoch (s)':>13}  {'ratio':>6}")
    for epochs in args.epochs:
        old = median_s(whole_file, epochs, state, args.repeats)
        new = median_s(per_epoch, epochs, state, args.repeats)
        print(f"{epochs:>6}  {old:>14.3f}  {new:>13.3f}  {old / new:>6.1f}")


if __name__ == "__main__":
    main()
