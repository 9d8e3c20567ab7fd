"""Averages of sharded models (FSDP2 ``fully_shard``, tensor-parallel DTensors) on the CPU with gloo.

Each test spawns 2 or 3 ranks on loopback (``torch.multiprocessing.spawn``), trains the sharded
model and the same model unsharded on the same batches, and checks the gathered averages against
the unsharded ones (float rounding), the bytes each rank holds, that ``update_parameters`` issues
no collective (every c10d op is counted by a dispatch mode), and the DCP checkpoints resharded
from 2 ranks to 1 and 3.
"""

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import swalab
from swalab import sharded

STEPS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world, *args):
    torch.multiprocessing.spawn(_entry, args=(fn, world, _free_port(), *args), nprocs=world)


def _entry(rank, fn, world, port, *args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    fn(rank, world, *args)
    # every rank done with its collectives before any tears gloo down (destroying the group while
    # another rank still talks to it can abort that rank: "terminate called without an active
    # exception"); a rank that raised fails the spawn without getting here
    dist.barrier()
    dist.destroy_process_group()


class CountCollectives(TorchDispatchMode):
    """Counts every c10d op (torch.distributed's and the functional collectives) dispatched."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "c10d" in func.namespace:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _net(hidden=5):
    # 5 and 3 rows: uneven dim-0 shards over 2 ranks (3/2, 2/1) and over 3 ranks (2/2/1, 1/1/1)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def _fsdp(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)]


def _averages(model):
    return {
        "swa": swalab.AveragedModel(model),
        "ema": swalab.AveragedModel(model, rule=swalab.EMA(0.8)),
        "user": swalab.AveragedModel(
            model, multi_avg_fn=swalab.get_ema_multi_avg_fn(0.7), dtype=torch.float64
        ),
    }


def _train(model, averages, counter=None):
    """20 SGD steps on the same full batches (every rank feeds the whole batch, so FSDP's averaged
    gradient is the unsharded one); every average updated after each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in _batches():
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        with counter if counter is not None else torch.no_grad():
            for averaged in averages.values():
                averaged.update_parameters(model)


def _gathered(averaged):
    return {k: sharded.gather(v) for k, v in averaged.state_dict().items()}


def _local_bytes(module):
    return sum(
        sharded.local(p).numel() * sharded.local(p).element_size() for p in module.parameters()
    )


def _fsdp_worker(rank, world, out):
    reference = _net()
    ref_averages = _averages(reference)
    _train(reference, ref_averages)

    model = _fsdp(_net(), world)
    averages = _averages(model)
    counter = CountCollectives()
    _train(model, averages, counter)
    assert counter.ops == [], counter.ops
    with CountCollectives() as forward:  # the counter does see FSDP's all-gathers
        model(torch.zeros(1, 3))
    assert any("allgather" in op for op in forward.ops), forward.ops
    model.reshard()  # the root stays unsharded after a forward without backward

    for name, averaged in averages.items():
        assert averaged.count == STEPS
        got, want = _gathered(averaged), ref_averages[name].state_dict()
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], msg=f"{name} {key}")
        # the average is sharded like the model: same placements, 1/world of the bytes per rank
        for (key, a), (_, p) in zip(averaged.module.named_parameters(), model.named_parameters()):
            assert (a.placements, a.device_mesh) == (p.placements, p.device_mesh), key
            assert sharded.local(a).shape == sharded.local(p).shape
    swa = averages["swa"]
    mine = torch.tensor(_local_bytes(swa.module))
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    full = sum(p.numel() * 4 for p in reference.parameters())
    assert sum(int(b) for b in everyone) == full
    assert int(mine) == _local_bytes(model)  # the model's own shard, in fp32
    assert int(mine) < full

    # the average evaluated inside the sharded model, then the model's weights back
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(x)
        with swa.swapped_into(model) as m:
            inside = m(x)
        after = model(x)
    torch.testing.assert_close(inside, ref_averages["swa"].module(x))
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="swapped_into"):
        swa(x)

    # bad input: the sharding changed (placements, or no sharding at all), the average untouched
    resharded = _tp(_net(), world)  # layer 2's weight Shard(1) where FSDP2 has Shard(0)
    saved = {k: v.clone() for k, v in _gathered(swa).items()}
    with pytest.raises(ValueError, match=r"^2\.weight is sharded as \(Shard\(dim=1\),\)"):
        swa.update_parameters(resharded)
    with pytest.raises(ValueError, match=r"^0\.weight is not sharded"):
        swa.update_parameters(_net())
    assert swa.count == STEPS
    for key, value in _gathered(swa).items():
        assert torch.equal(value, saved[key]), key
    swa.update_parameters(model)  # the right model still averages
    assert swa.count == STEPS + 1

    # checkpoints: DCP (every rank its shards) and one gathered plain state_dict
    rebuilt = swalab.AveragedModel(model)
    sharded.save_checkpoint(averages["user"], f"{out}/dcp")
    averages["user"].save_average(f"{out}/plain.pt")
    sharded.load_checkpoint(rebuilt, f"{out}/dcp")
    assert rebuilt.count == STEPS
    for key, value in _gathered(rebuilt).items():
        torch.testing.assert_close(value, _gathered(averages["user"])[key].to(value.dtype))
    expected = _gathered(averages["user"])  # a collective: on every rank
    if rank == 0:
        torch.save(expected, f"{out}/expected.pt")


def _load_worker(rank, world, out):
    """Load the 2-rank DCP checkpoint into a 3-rank FSDP2 average."""
    model = _fsdp(_net(), world)
    averaged = swalab.AveragedModel(model)
    sharded.load_checkpoint(averaged, f"{out}/dcp")
    assert averaged.count == STEPS
    expected = torch.load(f"{out}/expected.pt")
    for key, value in _gathered(averaged).items():
        assert torch.equal(value, expected[key].float()), key
    assert sharded.local(averaged.module.get_submodule("0").weight).shape[0] == (
        2 if rank < 2 else 1
    )


@pytest.mark.slow
def test_fsdp2_averages_equal_unsharded_ones_and_checkpoints_reshard(tmp_path):
    _spawn(_fsdp_worker, 2, str(tmp_path))
    expected = torch.load(tmp_path / "expected.pt")
    # saved by 2 processes, loaded by 1 (no process group: an ordinary average) ...
    single = swalab.AveragedModel(_net())
    sharded.load_checkpoint(single, tmp_path / "dcp")
    assert single.count == STEPS
    for key, value in single.state_dict().items():
        assert value.dtype != torch.float64 or key == "n_averaged"
        assert torch.equal(value, expected[key].to(value.dtype)), key
    # ... and by 3
    _spawn(_load_worker, 3, str(tmp_path))
    # save_average: a plain state_dict of the model's keys, loading into the unsharded model
    plain = torch.load(tmp_path / "plain.pt")
    model = _net()
    model.load_state_dict(plain)
    assert set(plain) == set(model.state_dict())
    for key, value in plain.items():
        assert torch.equal(value, expected["module." + key]), key
    # a checkpoint of another shape: ValueError naming the tensor, the average untouched
    other = swalab.AveragedModel(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"^module\.0\.weight has shape \(5, 3\) in checkpoint"):
        sharded.load_checkpoint(other, tmp_path / "dcp")
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def _tp(model, world):
    """Tensor parallel: the first layer's weight and bias Shard(0), the second's weight Shard(1)
    and bias Replicate."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world,))
    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _tp_worker(rank, world):
    from torch.distributed.tensor import Replicate, Shard

    reference = _net(hidden=4)  # torch's row-wise parallel layer needs even shards
    ref_averages = _averages(reference)
    _train(reference, ref_averages)
    model = _tp(_net(hidden=4), world)
    assert model[0].weight.placements == (Shard(0),)
    assert model[2].bias.placements == (Replicate(),)
    averages = _averages(model)
    counter = CountCollectives()
    _train(model, averages, counter)
    assert counter.ops == [], counter.ops
    for name, averaged in averages.items():
        got, want = _gathered(averaged), ref_averages[name].state_dict()
        for key in want:
            torch.testing.assert_close(got[key], want[key], msg=f"{name} {key}")
    x = torch.randn(6, 3)
    with torch.no_grad(), averages["ema"].swapped_into(model):
        torch.testing.assert_close(model(x), ref_averages["ema"].module(x))
    # HSDP: a 2-D mesh, parameters (Replicate(), Shard(0)) on it
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    hsdp = _net()
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "shard")))
    assert hsdp.get_submodule("0").weight.placements == (Replicate(), Shard(0))
    averages = _averages(hsdp)
    _train(hsdp, averages)
    reference = _net()
    ref_averages = _averages(reference)
    _train(reference, ref_averages)
    for name, averaged in averages.items():
        got, want = _gathered(averaged), ref_averages[name].state_dict()
        for key in want:
            torch.testing.assert_close(got[key], want[key], msg=f"hsdp {name} {key}")


@pytest.mark.slow
def test_tensor_parallel_and_hsdp_layers_average_like_the_unsharded_ones():
    _spawn(_tp_worker, 2)


def _gather_flat(swag, flat):
    """SWAG's flat local moments, per parameter, as whole tensors (one all-gather each)."""
    templates = list(swag.base.parameters())
    return torch.cat(
        [
            sharded.gather(sharded.wrap_like(t, view)).reshape(-1)
            for t, view in zip(templates, swag._views(flat))
        ]
    )


def _expected_sample(reference, params, seed, scale=0.5):
    """The SWAG sample formula on the unsharded moments, with z1 drawn parameter by parameter."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.cat([torch.randn(p.shape, generator=g).reshape(-1) for p in params])
    z2 = torch.randn(reference.rank, generator=g)
    var = torch.clamp(reference.sq_mean - reference.mean.square(), min=reference.var_clamp)
    low_rank = z2 @ reference.cov_mat_sqrt[: reference.rank] / (reference.rank - 1) ** 0.5
    return reference.mean + scale**0.5 * (var.sqrt() * z1 + low_rank)


def _swag_worker(rank, world, out):
    reference = _net()
    ref_swag, ref_fge = swalab.SWAG(reference, max_num_models=5), swalab.FGE()
    model = _fsdp(_net(), world)
    swag, fge = swalab.SWAG(model, max_num_models=5), swalab.FGE()
    counter = CountCollectives()
    for net, (s, f), count in (
        (reference, (ref_swag, ref_fge), None),
        (model, (swag, fge), counter),
    ):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for step, (x, y) in enumerate(_batches()):
            optimizer.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
            with count if count is not None else torch.no_grad():
                s.collect_model(net)
            if step % 10 == 9:
                f.collect(net)
    assert counter.ops == [], counter.ops
    assert swag.n_models == STEPS
    # the moments, 1/world of them on each rank, gathered: the unsharded ones
    assert swag.mean.numel() == sum(sharded.local(p).numel() for p in model.parameters())
    torch.testing.assert_close(_gather_flat(swag, swag.mean), ref_swag.mean)
    torch.testing.assert_close(_gather_flat(swag, swag.sq_mean), ref_swag.sq_mean)
    for k in range(5):
        torch.testing.assert_close(
            _gather_flat(swag, swag.cov_mat_sqrt[k]), ref_swag.cov_mat_sqrt[k], msg=f"row {k}"
        )
    # samples: z2 the same on every rank, z1 each parameter's noise sliced to the rank's shard
    params = list(reference.parameters())
    swag.sample(0.5, generator=torch.Generator().manual_seed(3))
    sample = _gather_flat(
        swag, torch.cat([sharded.local(p).reshape(-1) for p in swag.base.parameters()])
    )
    torch.testing.assert_close(sample, _expected_sample(ref_swag, params, 3))
    # without a generator: rank 0's global RNG seeds every rank's draws
    torch.manual_seed(100 + rank)
    swag.sample(0.5)
    torch.manual_seed(100)
    seed = int(torch.randint(0, 2**62, (1,)))
    sample = _gather_flat(
        swag, torch.cat([sharded.local(p).reshape(-1) for p in swag.base.parameters()])
    )
    torch.testing.assert_close(sample, _expected_sample(ref_swag, params, seed))
    # the sample evaluated inside the sharded model, the model's weights back afterwards
    x = torch.randn(4, 3)
    with torch.no_grad():
        before = model(x)
        with swag.swapped_into(model):
            inside = model(x)
        torch.nn.utils.vector_to_parameters(sample, reference.parameters())
        torch.testing.assert_close(inside, reference(x))
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    # Bayesian model averaging inside the sharded model: at scale 0 every sample is the mean
    loader = _batches()[:3]
    bma = swalab.bma_predict(swag, loader, model=model, n_samples=2, scale=0.0, task="regression")
    ref_swag.sample(0.0)
    ref_out = swalab.bma_predict(ref_swag, loader, n_samples=1, scale=0.0, task="regression")
    torch.testing.assert_close(bma["mean"], ref_out["mean"])
    with pytest.raises(ValueError, match="pass model="):
        swalab.bma_predict(swag, loader, n_samples=1)
    # FGE members of a sharded model hold its shards and predict like the unsharded ones
    assert len(fge) == 2
    member = fge.members[0]["0.weight"]
    assert member.placements == model.get_submodule("0").weight.placements
    torch.testing.assert_close(
        fge.predict(loader, model)["probs"], ref_fge.predict(loader, _net())["probs"]
    )

    # a DCP checkpoint of the sharded SWAG: reloaded by 1 process (below) and by 3
    sharded.save_checkpoint(swag, f"{out}/swag_dcp")
    moments = {key: _gather_flat(swag, getattr(swag, key)) for key in ("mean", "sq_mean")} | {
        "cov_mat_sqrt": torch.stack([_gather_flat(swag, row) for row in swag.cov_mat_sqrt])
    }
    if rank == 0:
        torch.save(moments, f"{out}/swag.pt")


def _swag_load_worker(rank, world, out):
    swag = swalab.SWAG(_fsdp(_net(), world), max_num_models=5)
    sharded.load_checkpoint(swag, f"{out}/swag_dcp")
    assert swag.n_models == STEPS
    moments = {key: _gather_flat(swag, getattr(swag, key)) for key in ("mean", "sq_mean")}
    moments["cov_mat_sqrt"] = torch.stack([_gather_flat(swag, row) for row in swag.cov_mat_sqrt])
    expected = torch.load(f"{out}/swag.pt")
    for key, value in moments.items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.slow
def test_swag_and_fge_of_an_fsdp2_model_equal_the_unsharded_ones(tmp_path):
    _spawn(_swag_worker, 2, str(tmp_path))
    expected = torch.load(tmp_path / "swag.pt")
    single = swalab.SWAG(_net(), max_num_models=5)
    sharded.load_checkpoint(single, tmp_path / "swag_dcp")
    assert single.n_models == STEPS
    for key, value in expected.items():
        assert torch.equal(getattr(single, key), value), key
    _spawn(_swag_load_worker, 3, str(tmp_path))
    other = swalab.SWAG(_net(), max_num_models=4)
    with pytest.raises(ValueError, match=r"^cov_mat_sqrt\.0\.weight has shape \(5, 5, 3\)"):
        sharded.load_checkpoint(other, tmp_path / "swag_dcp")
    assert other.n_models == 0


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


def _bn_batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(6, 3, generator=g) * 2 + 1 for _ in range(5)]


def _bn_worker(rank, world):
    """Rank 0 holds 3 of the 5 batches, rank 1 the other 2: the FSDP2 forwards stay in lockstep
    and every rank ends with the statistics of all 5 batches, in the average."""
    reference = _bn_net()
    ref_swa = swalab.AveragedModel(reference)
    model = _fsdp(_bn_net(), world)
    swa = swalab.AveragedModel(model)
    for net, averaged in ((reference, ref_swa), (model, swa)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for x, y in _batches()[:5]:
            optimizer.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            optimizer.step()
            averaged.update_parameters(net)
    batches = _bn_batches()
    swalab.update_bn(batches, ref_swa)
    model_stats = model.get_submodule("1").running_mean.clone()
    with swa.swapped_into(model):
        swalab.update_bn(batches[rank::world], model)
        x = batches[0]
        model.eval()
        with torch.no_grad():
            inside = model(x)
    bn, ref_bn = swa.module.get_submodule("1"), ref_swa.module.get_submodule("1")
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 5
    assert torch.equal(model.get_submodule("1").running_mean, model_stats)  # the model's own back
    ref_swa.eval()
    with torch.no_grad():
        torch.testing.assert_close(inside, ref_swa(x))
    with pytest.raises(ValueError, match="a rank has no batch"):
        with swa.swapped_into(model):
            swalab.update_bn(batches[:1] if rank == 0 else [], model)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)  # nothing was reset


@pytest.mark.slow
def test_update_bn_of_an_fsdp2_model_uses_the_whole_data_on_every_rank():
    _spawn(_bn_worker, 2)


def test_save_average_of_an_ordinary_average_is_the_model_state_dict(tmp_path):
    model = _bn_net()
    averaged = swalab.AveragedModel(torch.compile(model))
    averaged.update_parameters(model)
    averaged.save_average(tmp_path / "average.pt")
    state = torch.load(tmp_path / "average.pt")
    assert list(state) == list(model.state_dict())
    fresh = _bn_net()
    fresh.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


@pytest.mark.slow
def test_readme_fsdp2_example_runs_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rest = text[text.index("\n### Sharded models") :]
    start = rest.index("```python\n") + len("```python\n")
    (tmp_path / "example.py").write_text(rest[start : rest.index("```", start)])
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["example.py"],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("tensor(") == 2  # each rank printed the average's output
    model = nn.Sequential(nn.Linear(8, 33), nn.ReLU(), nn.Linear(33, 1))
    state = torch.load(tmp_path / "ema.pt")
    model.load_state_dict(state)
    # the DCP checkpoint loads in one process into an ordinary average, equal to the plain file
    averaged = swalab.AveragedModel(model)
    sharded.load_checkpoint(averaged, tmp_path / "ema_dcp")
    assert averaged.count == 100
    for key, value in averaged.module.state_dict().items():
        assert torch.equal(value, state[key]), key


# --- one process (a world of 1): checks that need no second rank -------------------------------


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_checkpoint_of_a_bf16_average_is_float32_and_loads_back(one_rank, tmp_path):
    import torch.distributed.checkpoint as dcp

    model = _fsdp(_net().to(torch.bfloat16), 1)
    averaged = swalab.AveragedModel(model)  # held in bf16 like the parameters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    averaged.update_parameters(model)
    sharded.save_checkpoint(averaged, tmp_path / "ckpt")
    metadata = dcp.FileSystemReader(str(tmp_path / "ckpt")).read_metadata().state_dict_metadata
    dtypes = {key: meta.properties.dtype for key, meta in metadata.items()}
    assert dtypes.pop("n_averaged") == torch.long
    assert set(dtypes.values()) == {torch.float32}
    fresh = swalab.AveragedModel(_fsdp(_net().to(torch.bfloat16), 1))
    sharded.load_checkpoint(fresh, tmp_path / "ckpt")
    assert fresh.count == 1
    for (key, a), b in zip(averaged.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(sharded.gather(a), sharded.gather(b)), key


def test_sharded_average_refuses_a_device_and_a_direct_call_and_restarts(one_rank):
    model = _fsdp(_net(), 1)
    with pytest.raises(ValueError, match=r"^device='cpu': the average of a sharded model"):
        swalab.AveragedModel(model, device="cpu")
    averaged = swalab.AveragedModel(model)
    with pytest.raises(ValueError, match="swapped_into"):
        averaged(torch.zeros(1, 3))
    averaged.update_parameters(model)
    with torch.no_grad():  # a forward without backward leaves the root's parameters unsharded
        model(torch.zeros(1, 3))
    assert not sharded.is_dtensor(model.get_submodule("2").weight)
    averaged.update_parameters(model)  # resharded, paired again
    assert averaged.count == 2 and sharded.is_dtensor(model.get_submodule("2").weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.mse_loss(model(torch.ones(2, 3)), torch.zeros(2, 3)).backward()
    optimizer.step()
    swalab.restart_from_average(averaged, model, optimizer)  # periodic SWA: back to the average
    assert averaged.count == 0 and not optimizer.state
    for (key, a), p in zip(averaged.module.named_parameters(), model.parameters()):
        assert torch.equal(sharded.gather(a), sharded.gather(p)), key
