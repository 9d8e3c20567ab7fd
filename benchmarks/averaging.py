"""Time one averaging update: swalab vs torch.optim.swa_utils, against the memory-bandwidth floor.

    python benchmarks/averaging.py [--device cpu|cuda] [--repeats N] [--models small_cnn,...]
                                   [--threads N]
                                   [--baseline OLD/src/swalab/averaging.py]
    torchrun --standalone --nproc_per_node=2 benchmarks/averaging.py --sharded [--models ...]

The floor moves the same 12 bytes per fp32 parameter as an ideal update (read the average, read
the weights, write the average) with one ``lerp_`` over a flat buffer. On a GPU the update is also
timed with the average on the CPU (``device="cpu"``, the case of a model that does not fit twice on
the GPU), against the floor of a bare device-to-host copy of all parameters into pinned memory.
GPU times are CUDA-event times of one call from an idle device (the host work that launches the
kernels is inside); CPU times, and the CPU-average rows, are wall-clock times. Medians of N calls,
interleaved (each round times every contender once, in a new order, so a busy machine slows all
alike and no contender always runs after the same one).
``mlp_200`` (100 small linear layers, 200 tensors) shows the host work per tensor, which does not
depend on the memory bandwidth. ``small_cnn_host`` is the small CNN with one channel per layer: its
update time is the host time per update (checks, bookkeeping, op dispatch), against a floor of one
``lerp_`` dispatch; it is timed with ``--host-repeats`` calls (one call is a few microseconds, and a
median of many single calls is robust to the other jobs that preempt this one). On the CPU, also measures the peak extra memory while building
the averaged copy of a ResNet-50, in units of its parameter bytes.

``--sharded`` (under torchrun, gloo on the CPU) shards each model with FSDP2's ``fully_shard`` over
all processes and times the sharded SWA update (each rank folds in its own shards, no collective)
against the unsharded update of the same model in the same process, and prints the average's
bytes held by each rank against the unsharded average's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from types import ModuleType

import torch
import torchvision
from torch import nn
from torch.optim import swa_utils

import swalab


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def small_cnn_host() -> nn.Module:
    """The small CNN's layers and tensors (12 parameters, 6 buffers) with one channel and one unit
    each: the update's arithmetic is negligible, so its time is the host's work per update."""
    return nn.Sequential(
        nn.Conv2d(3, 1, 3, padding=1),
        nn.BatchNorm2d(1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(1, 1, 3, padding=1),
        nn.BatchNorm2d(1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1, 1),
        nn.ReLU(),
        nn.Linear(1, 1),
    )


def mlp_200() -> nn.Module:
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(100)])


MODELS: dict[str, Callable[[], nn.Module]] = {
    "small_cnn": small_cnn,
    "small_cnn_host": small_cnn_host,
    "mlp_200": mlp_200,
    "resnet50": lambda: torchvision.models.resnet50(),
    "vit_b_16": lambda: torchvision.models.vit_b_16(),
}
DEFAULT_MODELS = {
    "cpu": "small_cnn,small_cnn_host,mlp_200,resnet50",
    "cuda": "small_cnn,mlp_200,resnet50,vit_b_16",
}


def one_call_ms(fn: Callable[[], object], device: torch.device, wall: bool) -> float:
    """One call from an idle device: CUDA-event time on a GPU unless ``wall``, else wall-clock."""
    if device.type != "cuda":
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3
    torch.cuda.synchronize()
    if wall:
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - begin) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def interleaved_medians(
    calls: dict[str, tuple[Callable[[], object], bool]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median ms of each call; each round times every call once, so load drifts hit all alike,
    in a new order, so no call always follows the same one (torch's per-tensor update leaves the
    caches cold: a call timed after it in every round was up to 1.6x slower than its own copy)."""
    for fn, _ in calls.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {label: [] for label in calls}
    order, rng = list(calls), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for label in order:
            fn, wall = calls[label]
            times[label].append(one_call_ms(fn, device, wall))
    return {label: statistics.median(t) for label, t in times.items()}


def load_baseline(path: str) -> ModuleType:
    """Another version of ``swalab/averaging.py`` (e.g. an older checkout's), timed beside this."""
    spec = importlib.util.spec_from_file_location("baseline_averaging", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline: cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def time_updates(
    name: str, repeats: int, device: torch.device, baseline: ModuleType | None = None
) -> list[tuple[str, float, str]]:
    """Rows ``(label, ms, floor label)``; the first rows are the floors."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    contenders: dict[str, tuple[nn.Module, str]] = {
        "torch SWA (default)": (swa_utils.AveragedModel(model), "lerp"),
        "swalab SWA (default)": (swalab.AveragedModel(model), "lerp"),
        "torch EMA (multi_avg_fn)": (
            swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.999)),
            "lerp",
        ),
        "swalab EMA": (swalab.AveragedModel(model, rule=swalab.EMA(0.999)), "lerp"),
        "swalab EMA (multi_avg_fn)": (
            swalab.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.999)),
            "lerp",
        ),
    }
    if baseline is not None:
        contenders["baseline SWA (default)"] = (baseline.AveragedModel(model), "lerp")
        contenders["baseline EMA"] = (
            baseline.AveragedModel(model, rule=baseline.EMA(0.999)),
            "lerp",
        )
        contenders["baseline EMA (multi_avg_fn)"] = (
            baseline.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.999)),
            "lerp",
        )
    if device.type == "cuda":
        contenders["torch SWA, average on CPU"] = (
            swa_utils.AveragedModel(model, device="cpu"),
            "d2h",
        )
        contenders["swalab SWA, average on CPU"] = (
            swalab.AveragedModel(model, device="cpu"),
            "d2h",
        )
    for averaged, _ in contenders.values():
        averaged.update_parameters(model)  # the first update copies; time the averaging ones
    with torch.no_grad():
        weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    average = weights.clone()
    calls = {"floor: flat lerp_ (12 B/param)": (lambda: average.lerp_(weights, 0.5), False)}
    floors = {"floor: flat lerp_ (12 B/param)": "lerp"}
    if device.type == "cuda":
        host = torch.empty(weights.shape, dtype=weights.dtype, pin_memory=True)
        calls["floor: pinned D2H copy (4 B/param)"] = (
            lambda: host.copy_(weights, non_blocking=True),
            True,
        )
        floors["floor: pinned D2H copy (4 B/param)"] = "d2h"
    for label, (averaged, floor) in contenders.items():
        calls[label] = (lambda a=averaged: a.update_parameters(model), floor == "d2h")
        floors[label] = floor
    medians = interleaved_medians(calls, repeats, device)
    return [(label, medians[label], floors[label]) for label in calls]


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
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, which], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


def print_table(name: str, rows: list[tuple[str, float, str]]) -> None:
    model = MODELS[name]()
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = sum(1 for _ in model.parameters())
    floors = {floor: ms for label, ms, floor in rows if label.startswith("floor")}
    times = {label: ms for label, ms, _ in rows}
    print(f"### {name}: {n_params / 1e6:.2f}M parameters in {n_tensors} tensors\n")
    print("| update | ms | × floor | speed-up vs torch |")
    print("|---|---:|---:|---:|")
    for label, ms, floor in rows:
        torch_label = label.replace("swalab", "torch")
        if torch_label not in times:
            torch_label = torch_label.replace("EMA", "EMA (multi_avg_fn)")
        speedup = f"{times[torch_label] / ms:.1f}×" if label.startswith("swalab") else ""
        baseline_label = label.replace("swalab", "baseline")
        if label.startswith("swalab") and baseline_label in times:
            speedup += f" ({times[baseline_label] / ms:.1f}× baseline)"
        digits = 4 if ms < 0.1 else 3
        print(f"| {label} | {ms:.{digits}f} | {ms / floors[floor]:.2f} | {speedup} |")
    print()


def fsdp2(model: nn.Module, world: int) -> nn.Module:
    """``model`` sharded with FSDP2 over a CPU mesh of all ranks: each child holding parameters,
    then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def sharded_rows(name: str, repeats: int) -> tuple[dict[str, float], list[int], int]:
    """Median ms of the unsharded and the sharded SWA update (this rank), every rank's average
    bytes and the unsharded average's bytes."""
    import torch.distributed as dist

    from swalab import sharded

    world = dist.get_world_size()
    torch.manual_seed(0)
    model = MODELS[name]()
    sharded_model = fsdp2(MODELS[name](), world)
    plain, split = swalab.AveragedModel(model), swalab.AveragedModel(sharded_model)
    plain.update_parameters(model)
    split.update_parameters(sharded_model)
    cpu = torch.device("cpu")
    times = interleaved_medians(
        {
            "unsharded SWA update": (lambda: plain.update_parameters(model), True),
            f"sharded SWA update ({world} ranks)": (
                lambda: split.update_parameters(sharded_model),
                True,
            ),
        },
        repeats,
        cpu,
    )

    def nbytes(module: nn.Module) -> int:
        return sum(
            sharded.local(t).numel() * sharded.local(t).element_size() for t in module.parameters()
        )

    per_rank: list[int] = [0] * world
    dist.all_gather_object(per_rank, nbytes(split.module))
    return times, per_rank, nbytes(plain.module)


def sharded_main(names: list[str], repeats: int) -> None:
    """``--sharded``: run under torchrun; rank 0 prints."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(
            f"torch {torch.__version__}, {world} gloo ranks x {torch.get_num_threads()} threads, median of {repeats} calls\n"
        )
    for name in names:
        times, per_rank, whole = sharded_rows(name, repeats)
        if rank == 0:
            base = times["unsharded SWA update"]
            print(f"### {name} (FSDP2, {world} ranks), rank 0's times\n")
            print("| update | ms | × unsharded |")
            print("|---|---:|---:|")
            for label, ms in times.items():
                print(f"| {label} | {ms:.3f} | {ms / base:.2f} |")
            print("\n| average held | bytes | × unsharded |")
            print("|---|---:|---:|")
            print(f"| unsharded, every rank | {whole} | 1.00 |")
            for r, b in enumerate(per_rank):
                print(f"| sharded, rank {r} | {b} | {b / whole:.3f} |")
            print()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--repeats", type=int, help="calls per median (default: 15 on the CPU, 50 on a GPU)"
    )
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--host-repeats", type=int, default=3000, help="calls per median for small_cnn_host"
    )
    parser.add_argument(
        "--baseline", help="path of another swalab/averaging.py to time beside this one"
    )
    parser.add_argument(
        "--sharded", action="store_true", help="FSDP2 sharded update vs unsharded (under torchrun)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is available")
    repeats = args.repeats or (50 if device.type == "cuda" else 15)
    names = (args.models or DEFAULT_MODELS[device.type]).split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown or repeats < 1:
        parser.error(
            f"unknown model(s) {unknown}" if unknown else f"--repeats must be >= 1, got {repeats}"
        )
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{torch.get_num_threads()} threads"
    )
    if args.sharded:
        if device.type != "cpu":
            parser.error("--sharded runs on the CPU with gloo (--device cpu)")
        if "RANK" not in os.environ:
            parser.error(
                "--sharded runs under torchrun: "
                "torchrun --standalone --nproc_per_node=2 benchmarks/averaging.py --sharded"
            )
        sharded_main(names, repeats)
        return
    print(
        f"torch {torch.__version__}, {where}, median of {repeats} calls"
        f" ({max(repeats, args.host_repeats)} for small_cnn_host)\n"
    )
    baseline = load_baseline(args.baseline) if args.baseline else None
    for name in names:
        n = max(repeats, args.host_repeats) if name == "small_cnn_host" else repeats
        print_table(name, time_updates(name, n, device, baseline))
    if device.type == "cpu":
        print(
            "### Peak extra memory while building the averaged copy of resnet50"
            " (× parameter bytes)\n"
        )
        print("| implementation | peak extra |")
        print("|---|---:|")
        for which in ("torch", "swalab"):
            print(f"| {which} AveragedModel(model) | {peak_copy_ratio(which):.2f} |")


if __name__ == "__main__":
    main()
