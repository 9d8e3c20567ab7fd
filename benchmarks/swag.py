"""Cost of SWAG collection (K = 20) vs one SWA update vs one training epoch, and SWAG's memory.

    python benchmarks/swag.py [--repeats 7] [--device cpu] [--threads N]

With ``--device cuda`` it also times the collection of the GPU model into a state kept on the CPU.

Data of MNIST-1D's size (4,000 sequences of length 40, 10 classes; synthetic, the timing does not
depend on the values), batch 100, Adam 1e-2, the MNIST-1D reference CNN (25 channels, 5,210
parameters) and a wider one (128 channels). Target (issue 3): one collection per epoch adds <= 10%
to the epoch, and the state is exactly (2 + K) x the parameters: mean, sq_mean and K deviations.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.optim import swa_utils

import swalab
from swalab.models.cnn import MNIST1DCNN
from swalab.swag import SWAG

K = 20
WIDTHS = {"reference CNN (25 ch)": 25, "wide CNN (128 ch)": 128}


def median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def held_bytes(swag: SWAG) -> int:
    """Bytes of the storages behind SWAG's state (views could hide a larger storage: count those)."""
    return sum(t.untyped_storage().nbytes() for t in (swag.mean, swag.sq_mean, swag.cov_mat_sqrt))


def measure(channels: int, repeats: int, device: torch.device) -> dict[str, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 1, 40, generator=gen).to(device)
    y = torch.randint(0, 10, (4000,), generator=gen).to(device)
    torch.manual_seed(0)
    model = MNIST1DCNN(1, 40, 10, channels=channels).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()

    def epoch() -> None:
        for i in torch.randperm(4000, device=device).split(100):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[i]), y[i]).backward()
            optimizer.step()

    swag = SWAG(model, max_num_models=K)
    for _ in range(K + 1):  # fill the ring buffer: time the steady state
        swag.collect_model(model)
    swa = swalab.AveragedModel(model)
    torch_swa = swa_utils.AveragedModel(model)
    swa.update_parameters(model)
    torch_swa.update_parameters(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    updates = 10 * repeats  # updates are short: more repeats
    extra = {}
    if device.type == "cuda":  # state on the CPU: pinned chunks, each folded while the next copies
        on_cpu = SWAG(model, max_num_models=K, device="cpu")
        for _ in range(K + 1):
            on_cpu.collect_model(model)
        extra["swag_cpu"] = median_ms(lambda: on_cpu.collect_model(model), updates, sync)
    return extra | {
        "params": sum(p.numel() for p in model.parameters()),
        "epoch": median_ms(epoch, repeats, sync),
        "swa": median_ms(lambda: swa.update_parameters(model), updates, sync),
        "torch_swa": median_ms(lambda: torch_swa.update_parameters(model), updates, sync),
        "swag": median_ms(lambda: swag.collect_model(model), updates, sync),
        "sample": median_ms(lambda: swag.sample(0.5, cov=True), updates, sync),
        "memory": held_bytes(swag) / param_bytes,
    }


RSS_SCRIPT = f"""
import torch
from swalab.models.cnn import MNIST1DCNN
from swalab.swag import SWAG
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
tiny = MNIST1DCNN(1, 40, 10, channels=2)
warm = SWAG(tiny, max_num_models=2)  # load the kernels' code pages before measuring
for _ in range(3):
    warm.collect_model(tiny)
model = MNIST1DCNN(1, 40, 10, channels=512)
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
base = rss()
swag = SWAG(model, max_num_models={K})
for _ in range({K + 1}):
    swag.collect_model(model)
print((rss() - base) / param_bytes)
"""


def rss_ratio() -> float:
    """Resident memory added by a SWAG after K + 1 collections (wide model), x parameter bytes."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats} epochs and {10 * args.repeats} updates, K = {K}\n"
    )
    print(
        "| model | params | epoch ms | SWA update ms (torch) | SWAG collect ms | SWAG / SWA "
        "| SWAG % of epoch | SWAG sample ms | SWAG state / params |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    for label, channels in WIDTHS.items():
        r = results[label] = measure(channels, args.repeats, device)
        print(
            f"| {label} | {r['params']:,} | {r['epoch']:.1f} | {r['swa']:.3f} ({r['torch_swa']:.3f}) "
            f"| {r['swag']:.3f} | {r['swag'] / r['swa']:.1f}× | {100 * r['swag'] / r['epoch']:.2f}% "
            f"| {r['sample']:.3f} | {r['memory']:.2f} |"
        )
    if device.type == "cuda":
        print(
            '\nSWAG collect with the state on the CPU (`SWAG(model, device="cpu")`), ms: '
            + ", ".join(f"{label} {r['swag_cpu']:.3f}" for label, r in results.items())
        )
    print(
        f"\nResident memory added by SWAG(K = {K}) of a 512-channel CNN after {K + 1} collections: "
        f"{rss_ratio():.2f} × parameter bytes (state 2 + K = {2 + K}, plus 1 for the sampling copy `base`)."
    )


if __name__ == "__main__":
    main()
