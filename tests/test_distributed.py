"""Data-parallel runs (torchrun, DDP, gloo on the CPU) against the single-process run they must equal.

The end-to-end tests launch the real ``torchrun -m swalab run`` with 2 processes on a model without
BatchNorm (an MLP on the 2-D toy regression), whose DDP run is the single-process run up to float rounding; the
library-level tests run 2 ranks with ``torch.multiprocessing.spawn`` on loopback.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import swalab
from swalab.data import BatchLoader, Split
from swalab.lab.distributed import (
    ShardedBatches,
    World,
    broadcast_buffers,
    data_parallel,
    global_batch_loss,
    shard_batches,
)
from swalab.lab.evaluation import EvalContext, model_outputs
from swalab.lab.task import task_of

# The CLI and the runner (and scipy behind them) are imported inside the tests that use them: the
# spawned ranks import this module, and every second of import is paid twice on a 2-core machine.

# A 44 x 44 grid: 1355 training samples, so the last batch of 64 (11 samples) splits 5/6 over 2 ranks.
CONFIG = """
name: ddp-test
seeds: [0]
data: {name: toy2d, options: {grid_size: 44}}
model: {name: mlp, options: {hidden: [16, 16]}}
train: {epochs: 3, batch_size: 64, eval_batch_size: 128, lr: 0.05, momentum: 0.9, weight_decay: 0.0,
        augment: false, threads: 1}
methods:
  - {method: sgd}
  - {method: swa, options: {swa_start: 2, swa_lr: 0.02}}
  - {method: ema, options: {swa_start: 2, decay: 0.9}}
  - {method: swag, options: {swa_start: 2, n_samples: 3, max_num_models: 3}}
  - {method: fge, options: {fge_start: 2, cycle: 2}}
"""
METHODS = ["sgd", "swa", "ema", "swag", "fge"]
METRICS = ["train_loss", "val_loss", "test_loss", "test_mse"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(config, out):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "swalab",
        "run",
        str(config),
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _children(pid):
    """Process ids whose parent is ``pid`` (Linux /proc): torchrun's workers, in sessions of their own."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            kids.append(int(stat.parent.name))
    return kids


def _finish(proc, timeout=120):
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One uninterrupted ``torchrun --nproc_per_node=2 -m swalab run`` of CONFIG."""
    root = tmp_path_factory.mktemp("ddp")
    config = root / "ddp-test.yaml"
    config.write_text(CONFIG)
    _finish(_torchrun(config, root / "ddp"))
    return config, root / "ddp"


def _final(out, method):
    return torch.load(out / method / "seed0" / "final.pt")


# --- data sharding (no process group needed) ------------------------------------------------------


def _noise(x, generator):
    return x + torch.randn(x.shape, generator=generator)


def test_sharded_batches_are_the_single_process_batches_split_over_ranks():
    split = Split(torch.arange(23.0).unsqueeze(1), torch.arange(23))

    def loader():
        return BatchLoader(
            split, 6, shuffle=True, generator=torch.Generator().manual_seed(3), augment=_noise
        )

    single = list(loader())
    ranks = [list(ShardedBatches(loader(), World(rank=r, size=2))) for r in range(2)]
    assert (
        [len(r) for r in ranks]
        == [len(single)] * 2
        == [len(ShardedBatches(loader(), World(0, 2)))] * 2
    )
    for b, (x, y) in enumerate(single):
        # contiguous slices of the same (augmented) global batch; the last one (5 samples) splits 2/3
        torch.testing.assert_close(torch.cat([ranks[0][b][0], ranks[1][b][0]]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]]), y)
    assert [len(r[-1][1]) for r in ranks] == [2, 3]

    whole = [
        list(ShardedBatches(loader(), World(r, 2), whole_batches=True, max_batches=3))
        for r in range(2)
    ]
    assert [[y.tolist() for _, y in w] for w in whole] == [
        [single[0][1].tolist(), single[2][1].tolist()],
        [single[1][1].tolist()],
    ]
    assert (
        shard_batches(loader(), World()).__class__ is BatchLoader
    )  # one process: the loader itself


# --- bad input: one line, non-zero exit, no hang ---------------------------------------------------


def _torchrun_env(monkeypatch, rank, world_size, port):
    for key, value in {
        "RANK": rank,
        "LOCAL_RANK": rank,
        "WORLD_SIZE": world_size,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }.items():
        monkeypatch.setenv(key, str(value))


def test_batch_not_divisible_by_world_size_is_one_line(tmp_path, monkeypatch, capfd):
    from swalab.cli import main

    _torchrun_env(monkeypatch, 0, 3, _free_port())
    args = ["run", "mnist1d", "--out", str(tmp_path / "out"), "--set", "train.batch_size=100"]
    assert main(args) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "swalab: error: train.batch_size 100 is the global batch and must be divisible by the number "
        "of processes 3; set train.batch_size to a multiple of 3 or change --nproc_per_node"
    ]
    assert not (tmp_path / "out").exists()
    _torchrun_env(monkeypatch, 1, 3, _free_port())
    assert main(args) == 2
    assert capfd.readouterr().err == ""  # the other ranks leave the report to rank 0


@pytest.mark.parametrize("rank", [0, 1], ids=["alone-as-rank-0", "no-rank-0"])
def test_unreachable_processes_fail_within_the_timeout_with_one_line(
    tmp_path, monkeypatch, capfd, rank
):
    from swalab.cli import main

    port = _free_port()
    _torchrun_env(monkeypatch, rank, 2, port)
    start = time.monotonic()
    assert main(["run", "mnist1d", "--out", str(tmp_path / "out"), "--dist-timeout", "1"]) == 2
    assert time.monotonic() - start < 15
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        f"swalab: error: process {rank} of 2 could not reach the others at "
        f"127.0.0.1:{port} within 1 s (--dist-timeout)"
    )
    assert not dist.is_initialized()


# --- sharded models ---------------------------------------------------------------------------------


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_averaged_model_takes_fsdp2_and_unwraps_ddp(one_process_group):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    averaged = swalab.AveragedModel(ddp)
    assert isinstance(averaged.module, nn.Sequential)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    averaged.update_parameters(ddp)
    averaged.update_parameters(model)
    torch.testing.assert_close(averaged.module[0].weight, model[0].weight)

    fully_shard(
        model
    )  # FSDP2: parameters become DTensor shards (tests/test_sharded.py: 2, 3 ranks)
    sharded = swalab.AveragedModel(model)
    sharded.update_parameters(model)
    assert type(sharded.module[0].weight).__name__ == "DTensor"
    torch.testing.assert_close(
        sharded.module[0].weight.full_tensor(), model[0].weight.full_tensor()
    )


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FSDP1 (FullyShardedDataParallel) needs an accelerator"
)
def test_averaged_model_refuses_fsdp1(one_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(nn.Linear(4, 2).cuda())
    with pytest.raises(ValueError, match="FSDP1"):
        swalab.AveragedModel(model)


# --- 2 ranks, library level: update_bn, sharded evaluation, averages identical on every rank -----


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _data():
    g = torch.Generator().manual_seed(1)
    return Split(torch.randn(70, 3, generator=g) * 2 + 1, torch.randint(0, 2, (70,), generator=g))


def _bn_loader(split):  # 70 samples in batches of 16: 5 batches, the last of 6
    return BatchLoader(
        split, 16, shuffle=True, generator=torch.Generator().manual_seed(2), augment=_noise
    )


def _rank_worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world = World(rank, 2)
    split = _data()
    model = _bn_net()
    # update_bn over whole global batches dealt round-robin, statistics all-reduced
    swalab.update_bn(shard_batches(_bn_loader(split), world, whole_batches=True), model)
    stats = {"mean": model[1].running_mean.clone(), "var": model[1].running_var.clone()}
    ctx = EvalContext(task_of("classification"), torch.device("cpu"), 16, lambda: None, None, world)
    outputs = model_outputs(model, split, ctx)
    # a few DDP steps on slices of global batches; SWA, EMA, SWAG and FGE fed the synchronised model
    net = data_parallel(model, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    swa = swalab.AveragedModel(model)
    ema = swalab.AveragedModel(model, rule=swalab.EMA(0.9))
    swag, fge = swalab.SWAG(model, max_num_models=3), swalab.FGE()
    loader = shard_batches(
        BatchLoader(split, 16, shuffle=True, generator=torch.Generator().manual_seed(4)), world
    )
    for x, y in loader:
        loss = global_batch_loss(task_of("classification"), net(x), y, world)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        broadcast_buffers(model, world)
        for averaged in (swa, ema):
            averaged.update_parameters(model)
        swag.collect_model(model)
        fge.collect(model)
    state = {
        "swa": swa.state_dict(),
        "ema": ema.state_dict(),
        "swag": swag.state_dict(),
        "fge": fge.members,
        "model": model.state_dict(),
    }
    torch.save({"stats": stats, "outputs": outputs, "state": state}, f"{out}/{rank}.pt")
    dist.barrier()  # every rank done with gloo before it is torn down
    dist.destroy_process_group()


def _flat(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _flat(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat(v)]
    return []


@pytest.mark.slow
def test_two_ranks_update_bn_evaluation_and_averages(tmp_path):
    torch.multiprocessing.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    split, model = _data(), _bn_net()
    swalab.update_bn(_bn_loader(split), model)  # one process over the same global batches
    model.eval()
    with torch.no_grad():
        expected = model(split.x).softmax(-1)
    for r in ranks:
        torch.testing.assert_close(r["stats"]["mean"], model[1].running_mean)
        torch.testing.assert_close(r["stats"]["var"], model[1].running_var)
        torch.testing.assert_close(r["outputs"], expected)
    # every average, posterior and ensemble member is bit-identical on both ranks
    zero, one = _flat(ranks[0]["state"]), _flat(ranks[1]["state"])
    assert len(zero) == len(one) > 20
    assert all(torch.equal(a, b) for a, b in zip(zero, one))


# --- end to end: torchrun -m swalab run ------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(two_process_run, tmp_path):
    from swalab.lab.config import load_config
    from swalab.lab.rundir import read_results
    from swalab.lab.runner import run_experiment

    config, ddp = two_process_run
    run_experiment(
        load_config(str(config)), tmp_path / "single", progress=False, log=lambda text: None
    )
    for method in METHODS:
        one, two = _final(tmp_path / "single", method), _final(ddp, method)
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(
                two[key], one[key], rtol=1e-5, atol=2e-6, msg=f"{method} {key}"
            )
    rows = {(r["method"]): r for r in read_results(tmp_path / "single")}
    for row in read_results(ddp):
        for metric in METRICS:
            assert float(row[metric]) == pytest.approx(
                float(rows[row["method"]][metric]), rel=1e-4
            ), (row, metric)
    assert json.loads((ddp / "meta.json").read_text())["processes"] == 2


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc"
)
def test_killed_two_process_run_resumes_to_the_same_result(two_process_run, tmp_path):
    from swalab.lab.rundir import read_results

    config, ddp = two_process_run
    out = tmp_path / "killed"
    proc = _torchrun(config, out)
    finished = out / "sgd" / "seed0" / "result.json"  # the others are on their trajectories
    deadline = time.monotonic() + 90
    while not finished.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert len(workers) == 2
    for pid in workers:  # both workers die mid-run; torchrun reports the failure and exits
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    done = [m for m in METHODS if (out / m / "seed0" / "result.json").exists()]
    cut = [m for m in METHODS if m not in done and (out / m / "seed0" / "checkpoint.pt").exists()]
    assert "sgd" in done and cut, "the run was not interrupted in the middle of a method"

    output = _finish(_torchrun(config, out))
    assert f"5 runs ({len(done)} already done)" in output
    for method in METHODS:
        one, two = _final(ddp, method), _final(out, method)
        assert all(torch.equal(one[k], two[k]) for k in one), method
    for a, b in zip(read_results(ddp), read_results(out)):
        assert {k: v for k, v in a.items() if k != "seconds"} == {
            k: v for k, v in b.items() if k != "seconds"
        }
