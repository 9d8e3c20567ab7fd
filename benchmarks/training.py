"""Training overheads: an SWA run vs plain SGD, and swalab's trainer vs a bare PyTorch loop.

    python benchmarks/training.py [--epochs 40 --repeats 9 --threads 1]

Both comparisons use the MNIST-1D BN CNN of the default preset, the same data, batch order and
optimizer; evaluation happens once at the end, on the train, validation and test splits in both
(so per-epoch learning curves do not enter the ratio). Ratios use the process's CPU time (one
thread), which a busy shared machine disturbs far less than wall time; both are printed.
The GCN's dense vs sparse paths are timed by benchmarks/gcn.py.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swalab.data import load
from swalab.lab.config import load_config
from swalab.lab.trainer import train_run
from swalab.models import create
from swalab.schedules import sgd_reference_lr


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def config(method: str, epochs: int):
    options = "{swa_lr: 0.05}" if method == "swa" else "{}"
    return load_config("mnist1d", [f"train.epochs={epochs}", f"train.eval_every={epochs}",
                                   f"methods=[{{method: {method}, options: {options}}}]"])


def swalab_run(cfg, bundle) -> None:
    out = Path(tempfile.mkdtemp())
    try:
        train_run(cfg, cfg.methods[0], 0, bundle, out, torch.device("cpu"))
    finally:
        shutil.rmtree(out)


def bare_loop(epochs: int, bundle) -> None:
    """What a person writes by hand: same model, permutation, schedule and optimizer; no averaging."""
    torch.manual_seed(0)
    model = create("mnist1d_cnn", bundle.in_shape, bundle.num_outputs, bn=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedule = sgd_reference_lr(0.1, epochs)
    generator = torch.Generator().manual_seed(0)
    x, y = bundle.train.x, bundle.train.y
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = schedule(epoch)
        model.train()
        perm = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), 100):
            idx = perm[i:i + 100]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        for split in (bundle.train, bundle.val, bundle.test):
            probs = torch.cat([model(split.x[i:i + 1000]).softmax(1) for i in range(0, len(split.y), 1000)])
            F.nll_loss(probs.log(), split.y), probs.argmax(1).eq(split.y).float().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load("mnist1d", seed=0, val_size=500)
    sgd, swa = config("sgd", args.epochs), config("swa", args.epochs)
    swalab_run(config("sgd", 1), bundle)  # warm-up
    rows = {
        "bare PyTorch loop (SGD)": lambda: bare_loop(args.epochs, bundle),
        "swalab trainer, SGD": lambda: swalab_run(sgd, bundle),
        "swalab trainer, SWA": lambda: swalab_run(swa, bundle),
    }
    # interleave repeats so drifting machine load affects every row alike
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for label, fn in rows.items():
            samples[label].append(timed(fn))
    wall = {k: statistics.median(w for w, _ in v) for k, v in samples.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in samples.items()}
    bare, sgd_label, swa_label = rows
    print(f"MNIST-1D BN CNN, {args.epochs} epochs, {args.threads} thread(s), median of {args.repeats} repeats\n")
    print("| run | wall s | CPU s | CPU ratio | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| {bare} | {wall[bare]:.2f} | {cpu[bare]:.2f} | 1.000 | |")
    print(f"| {sgd_label} | {wall[sgd_label]:.2f} | {cpu[sgd_label]:.2f} | "
          f"{cpu[sgd_label] / cpu[bare]:.3f} vs bare loop | ≤ 1.05 |")
    print(f"| {swa_label} | {wall[swa_label]:.2f} | {cpu[swa_label]:.2f} | "
          f"{cpu[swa_label] / cpu[sgd_label]:.3f} vs swalab SGD | ≤ 1.02 |")


if __name__ == "__main__":
    main()
