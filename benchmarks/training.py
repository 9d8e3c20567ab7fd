"""Training overheads: an SWA run vs plain SGD, and swalab's trainer vs a bare PyTorch loop.

    python benchmarks/training.py [--epochs 40 --repeats 9 --threads 1]
    python benchmarks/training.py --device cuda --data cifar100 --model vgg16 --batch-size 128 \\
        --epochs 2 --repeats 3 [--precision bf16 --channels-last] [--compile]

Both comparisons use the same model, data, batch order, augmentation and optimizer; evaluation
happens once at the end, on the train, validation and test splits in both (so per-epoch learning
curves do not enter the ratio). The bare loop keeps the training tensors on the device, as the
lab's BatchLoader does when they fit, and autocasts / uses channels_last like the lab when asked.

- ``--data mnist1d`` (default): the MNIST-1D BN CNN of the default preset on the CPU; ratios use
  the process's CPU time (one thread), which a busy shared machine disturbs far less than wall time.
- ``--data cifar10|cifar100``: random CIFAR-shaped images (45,000 train, 3x32x32, uint8 normalised
  per batch as swalab holds CIFAR, the paper's crop + flip augmentation), so no download is needed on a GPU machine; ``--model`` picks
  ``vgg16``, ``preresnet164``, ``wrn28_10`` ... On CUDA the ratios use wall time (synchronised).

``--compile`` adds a row: the swalab SGD run with ``train.compile: true`` (``torch.compile`` of
the training forward), against the same run uncompiled; each repeat is a fresh run, so it pays its
compilation (from Inductor's warm on-disk cache after the warm-up run), as every run does.

The GCN's dense vs sparse paths are timed by benchmarks/gcn.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from swalab.data import DataBundle, Split, load
from swalab.data.images import NORMALIZATION, normalize_images, random_crop_flip
from swalab.lab.config import load_config
from swalab.lab.devices import resolve_device
from swalab.lab.trainer import train_run
from swalab.models import create
from swalab.schedules import sgd_reference_lr


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def cifar_like(classes: int, train: int = 45000, test: int = 10000) -> DataBundle:
    """Random CIFAR-shaped data with the paper's augmentation: CIFAR's speed without a download."""
    g = torch.Generator().manual_seed(0)
    mean, std = (torch.tensor(v) for v in NORMALIZATION["resnet"])
    decode = functools.partial(normalize_images, normalization="resnet")

    def split(n: int) -> Split:  # uint8 images normalised per batch, as swalab holds CIFAR
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        return Split(images, torch.randint(0, classes, (n,), generator=g), decode)

    fill = -mean / std
    return DataBundle(
        f"cifar{classes}-shaped",
        "classification",
        split(train),
        split(0),
        split(test),
        classes,
        (3, 32, 32),
        lambda x, gen: random_crop_flip(x, gen, 4, True, fill),
    )


def config(args, method: str, epochs: int, compile: bool = False):
    options = "{swa_lr: 0.05}" if method == "swa" else "{}"
    return load_config(
        "mnist1d",
        [
            f"train.epochs={epochs}",
            f"train.eval_every={epochs}",
            f"train.batch_size={args.batch_size}",
            f"train.precision={args.precision}",
            f"train.channels_last={args.channels_last}",
            f"train.compile={compile}",
            f"model.name={args.model}",
            f"model.options={args.model_options}",
            f"methods=[{{method: {method}, options: {options}}}]",
        ],
    )


def swalab_run(cfg, bundle, device) -> None:
    out = Path(tempfile.mkdtemp())
    try:
        train_run(cfg, cfg.methods[0], 0, bundle, out, device)
    finally:
        shutil.rmtree(out)


def bare_loop(args, bundle, device) -> None:
    """What a person writes by hand: same model, permutation, augmentation, schedule and optimizer;
    the training tensors on the device; no averaging."""
    torch.manual_seed(0)
    model = create(args.model, bundle.in_shape, bundle.num_outputs, **args.options).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    )
    schedule = sgd_reference_lr(0.1, args.epochs)
    generator = torch.Generator().manual_seed(0)
    x, y = bundle.train.x.to(device), bundle.train.y.to(device)
    decode = bundle.train.decode or (lambda x: x)
    b = args.batch_size
    for epoch in range(args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = schedule(epoch)
        model.train()
        perm = torch.randperm(len(y), generator=generator).to(device)
        for i in range(0, len(y), b):
            idx = perm[i : i + b]
            inputs = decode(x[idx])  # uint8 CIFAR normalised here, as the lab does
            inputs = bundle.augment(inputs, generator) if bundle.augment else inputs
            if args.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast():
                loss = F.cross_entropy(model(inputs), y[idx])
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
    model.eval()
    with torch.no_grad():
        for split in (bundle.train, bundle.val, bundle.test):
            if not len(split):
                continue
            probs = torch.cat(
                [
                    model(decode(split.x[i : i + 1000].to(device))).softmax(1)
                    for i in range(0, len(split.y), 1000)
                ]
            )
            target = split.y.to(device)
            F.nll_loss(probs.log(), target).item(), probs.argmax(1).eq(target).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--data", default="mnist1d", choices=["mnist1d", "cifar10", "cifar100"])
    parser.add_argument("--model", help="default: mnist1d_cnn (bn) for mnist1d, vgg16 for CIFAR")
    parser.add_argument("--batch-size", type=int, help="default: 100 for mnist1d, 128 for CIFAR")
    parser.add_argument(
        "--train-size", type=int, default=45000, help="CIFAR-shaped training images"
    )
    parser.add_argument("--test-size", type=int, default=10000, help="CIFAR-shaped test images")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="add a row: the SGD run with train.compile: true"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    if args.data == "mnist1d":
        bundle = load("mnist1d", seed=0, val_size=500)
        args.model, args.batch_size = args.model or "mnist1d_cnn", args.batch_size or 100
    else:
        bundle = cifar_like(10 if args.data == "cifar10" else 100, args.train_size, args.test_size)
        args.model, args.batch_size = args.model or "vgg16", args.batch_size or 128
    args.options = {"bn": True} if args.model == "mnist1d_cnn" else {}
    args.model_options = "{bn: true}" if args.model == "mnist1d_cnn" else "{}"
    sgd, swa = config(args, "sgd", args.epochs), config(args, "swa", args.epochs)
    warmup = dataclasses.replace(bundle, train=bundle.train.subset(slice(0, 4 * args.batch_size)))
    swalab_run(config(args, "sgd", 1), warmup, device)  # warm-up (kernels, cuDNN autotuning)
    compiled = config(args, "sgd", args.epochs, compile=True)
    if args.compile:
        swalab_run(config(args, "sgd", 1, compile=True), warmup, device)  # Inductor's cache
    bare_loop(argparse.Namespace(**{**vars(args), "epochs": 1}), warmup, device)
    rows = {
        "bare PyTorch loop (SGD)": lambda: bare_loop(args, bundle, device),
        "swalab trainer, SGD": lambda: swalab_run(sgd, bundle, device),
        "swalab trainer, SWA": lambda: swalab_run(swa, bundle, device),
    }
    if args.compile:
        rows["swalab trainer, SGD, train.compile"] = lambda: swalab_run(compiled, bundle, device)
    # interleave repeats so drifting machine load affects every row alike
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for label, fn in rows.items():
            samples[label].append(timed(fn, device))
    wall = {k: statistics.median(w for w, _ in v) for k, v in samples.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in samples.items()}
    ratio_of = wall if device.type == "cuda" else cpu
    basis = "wall" if device.type == "cuda" else "CPU"
    bare, sgd_label, swa_label, *compile_label = rows
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} thread(s)"
    )
    print(
        f"{args.data} {args.model}, batch {args.batch_size}, {args.epochs} epochs, {args.precision}"
        f"{', channels_last' if args.channels_last else ''}, {where}, torch {torch.__version__}, "
        f"median of {args.repeats} repeats\n"
    )
    print(f"| run | wall s | CPU s | s/epoch (wall) | {basis} ratio | target |")
    print("|---|---:|---:|---:|---:|---|")
    for label, versus, target in (
        (bare, None, ""),
        (sgd_label, bare, "≤ 1.05"),
        (swa_label, sgd_label, "≤ 1.02"),
        *((label, sgd_label, "< 1 pays") for label in compile_label),
    ):
        ratio = (
            "1.000" if versus is None else f"{ratio_of[label] / ratio_of[versus]:.3f} vs {versus}"
        )
        print(
            f"| {label} | {wall[label]:.2f} | {cpu[label]:.2f} | {wall[label] / args.epochs:.2f} | "
            f"{ratio} | {target} |"
        )


if __name__ == "__main__":
    main()
