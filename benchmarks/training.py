"""Training overheads: an SWA run vs plain SGD, and swalab's trainer vs a bare PyTorch loop.

    python benchmarks/training.py [--epochs 20 --repeats 5 --threads 1]

Both comparisons use the MNIST-1D BN CNN of the default preset, the same data, batch order and
optimizer; evaluation happens once at the end (as in the bare loop) so the per-epoch learning
curves do not enter the ratio. The GCN's dense vs sparse paths are timed by benchmarks/gcn.py.
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


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def swalab_run(method: str, epochs: int, bundle) -> None:
    options = "{swa_lr: 0.05}" if method == "swa" else "{}"
    cfg = load_config("mnist1d", [f"train.epochs={epochs}", f"train.eval_every={epochs}",
                                  f"methods=[{{method: {method}, options: {options}}}]"])
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
        model(bundle.test.x).argmax(1).eq(bundle.test.y).float().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load("mnist1d", seed=0, val_size=500)
    swalab_run("sgd", 1, bundle)  # warm-up
    rows = {
        "bare PyTorch loop (SGD)": lambda: bare_loop(args.epochs, bundle),
        "swalab trainer, SGD": lambda: swalab_run("sgd", args.epochs, bundle),
        "swalab trainer, SWA": lambda: swalab_run("swa", args.epochs, bundle),
    }
    # interleave repeats so drifting machine load affects every row alike
    samples: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for label, fn in rows.items():
            samples[label].append(timed(fn, 1))
    median = {k: statistics.median(v) for k, v in samples.items()}
    print(f"MNIST-1D BN CNN, {args.epochs} epochs, {args.threads} thread(s), median of {args.repeats} repeats\n")
    print("| run | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| bare PyTorch loop (SGD) | {median['bare PyTorch loop (SGD)']:.2f} | 1.000 |")
    print(f"| swalab trainer, SGD | {median['swalab trainer, SGD']:.2f} | "
          f"{median['swalab trainer, SGD'] / median['bare PyTorch loop (SGD)']:.3f} (vs bare loop) |")
    print(f"| swalab trainer, SWA | {median['swalab trainer, SWA']:.2f} | "
          f"{median['swalab trainer, SWA'] / median['swalab trainer, SGD']:.3f} (vs swalab SGD) |")


if __name__ == "__main__":
    main()
