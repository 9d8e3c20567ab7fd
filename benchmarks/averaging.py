"""Time one averaging update: swalab vs torch.optim.swa_utils, against the memory-bandwidth floor.

    python benchmarks/averaging.py [--repeats 15]

The floor moves the same 12 bytes per fp32 parameter as an ideal update (read the average, read
the weights, write the average) with one in-place add over a flat buffer. Also measures the peak
extra memory while building the averaged copy, in units of the model's parameter bytes.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torchvision
from torch import nn
from torch.optim import swa_utils

import swalab


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )


MODELS = {"resnet50": lambda: torchvision.models.resnet50(), "small_cnn": small_cnn}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_updates(name: str, repeats: int) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    model = MODELS[name]()
    contenders = {
        "torch SWA (default)": swa_utils.AveragedModel(model),
        "swalab SWA (default)": swalab.AveragedModel(model),
        "torch EMA (multi_avg_fn)": swa_utils.AveragedModel(
            model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.999)
        ),
        "swalab EMA": swalab.AveragedModel(model, rule=swalab.EMA(0.999)),
    }
    for averaged in contenders.values():
        averaged.update_parameters(model)  # the first update copies; time the averaging ones
    average = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    weights = average.clone()
    rows = [("floor: flat add_ (12 B/param)", median_ms(lambda: average.add_(weights), repeats))]
    rows += [(label, median_ms(lambda a=a: a.update_parameters(model), repeats)) for label, a in contenders.items()]
    return rows


PEAK_SCRIPT = """
import sys, torchvision, torch
from torch.optim import swa_utils
import swalab
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
model = torchvision.models.resnet50()
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
base = rss('VmRSS')
averaged = {'swalab': swalab.AveragedModel, 'torch': swa_utils.AveragedModel}[sys.argv[1]](model)
print((rss('VmHWM') - base) / param_bytes)
"""


def peak_copy_ratio(which: str) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, which], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} repeats\n")
    for name in MODELS:
        model = MODELS[name]()
        n_params = sum(p.numel() for p in model.parameters())
        n_tensors = sum(1 for _ in model.parameters())
        rows = time_updates(name, args.repeats)
        floor = rows[0][1]
        times = dict(rows)
        print(f"## {name}: {n_params / 1e6:.2f}M parameters in {n_tensors} tensors\n")
        print("| update | ms | × floor | speed-up vs torch |")
        print("|---|---:|---:|---:|")
        for label, ms in rows:
            torch_label = label.replace("swalab", "torch").replace("EMA", "EMA (multi_avg_fn)")
            speedup = f"{times[torch_label] / ms:.1f}×" if label.startswith("swalab") else ""
            print(f"| {label} | {ms:.2f} | {ms / floor:.2f} | {speedup} |")
        print()
    print("## Peak extra memory while building the averaged copy of resnet50 (× parameter bytes)\n")
    print("| implementation | peak extra |")
    print("|---|---:|")
    for which in ("torch", "swalab"):
        print(f"| {which} AveragedModel(model) | {peak_copy_ratio(which):.2f} |")


if __name__ == "__main__":
    main()
