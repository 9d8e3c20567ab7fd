"""The Lightning callback under ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` in
``configure_model``), 2 processes with gloo on the CPU.

Each rank feeds the whole batch (no distributed sampler), so FSDP's averaged gradient is the
unsharded one and the sharded run must end with the average of the same training unsharded (the
unsharded callback run in the test's own process). Oracles: the average is the mean of the live
weights recorded after the averaged steps; a validation before the first update sees the live
weights (never the untouched average); each rank holds 1/world of the average; a fit resumed
from a sharded checkpoint ends with the uninterrupted run's average and live weights; the DCP
checkpoint's ``state_dict`` is the average, the live weights nested beside it.
"""

import os
import socket
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy  # noqa: E402

import swalab  # noqa: E402
from swalab import sharded  # noqa: E402
from swalab.integrations.lightning import AveragingCallback  # noqa: E402

WORLD = 2
UPDATE_AFTER = 5  # steps 5, 6, 7 of 8 averaged: the validation after epoch 0 precedes them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, world=WORLD):
    torch.multiprocessing.spawn(_entry, args=(fn, _free_port(), world, *args), nprocs=world)


def _entry(rank, fn, port, world, *args):
    # the variables torchrun sets: Lightning then joins these processes instead of launching
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        SWALAB_TEST_WORLD=str(world),  # (Lightning's teardown removes WORLD_SIZE)
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    fn(rank, *args)
    dist.barrier()  # every rank done with its collectives before gloo is torn down
    dist.destroy_process_group()


def _gathered(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: sharded.gather(v).clone() for k, v in module.state_dict().items()}


class Net(pl.LightningModule):
    """5 and 3 rows: uneven dim-0 shards over 2 ranks. Records the (gathered) weights after each
    optimizer step and the weights each validation runs with."""

    def __init__(self, shard: bool, bn: bool = False):
        super().__init__()
        torch.manual_seed(0)
        norm = [nn.BatchNorm1d(5)] if bn else []
        hidden = 4 if shard == "tp" else 5  # (tensor parallelism's local outputs need even shards)
        self.net = nn.Sequential(nn.Linear(3, hidden), *norm, nn.Tanh(), nn.Linear(hidden, 3))
        self.shard = shard
        self.live, self.validated = [], []

    def configure_model(self):
        if self.shard == "tp":  # rows of the first layer's weight, columns of the second's
            from torch.distributed.tensor.parallel import (
                ColwiseParallel,
                RowwiseParallel,
                parallelize_module,
            )

            plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
        elif self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)  # the BatchNorm's buffers stay whole
            fully_shard(self.net, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.live.append(_gathered(self.net))

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.validated.append(_gathered(self.net))
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader():
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 3, generator=g), torch.randn(32, 3, generator=g))
    return DataLoader(data, batch_size=8)  # 4 steps per epoch


def _trainer(strategy, callbacks, **kwargs):
    options = dict(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    options.update(kwargs)
    if strategy is None:
        return pl.Trainer(devices=1, callbacks=callbacks, **options)
    devices = int(os.environ["SWALAB_TEST_WORLD"])
    return pl.Trainer(devices=devices, strategy=strategy, callbacks=callbacks, **options)


def _strategy():
    world = int(os.environ["SWALAB_TEST_WORLD"])
    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)


def _average_worker(rank, out):
    module, callback = Net(shard=True, bn=True), AveragingCallback(update_after=UPDATE_AFTER)
    _trainer(_strategy(), [callback]).fit(module, _loader(), _loader())
    averaged = callback.averaged
    assert averaged.sharded and averaged.count == 3
    own = sum(sharded.local(p).numel() for p in averaged.module.parameters())
    model = sum(sharded.local(p).numel() for p in module.parameters())
    total = torch.tensor(own)
    dist.all_reduce(total)
    result = {
        "total": int(total),
        "average": averaged.average_state_dict(),  # a gather: every rank
        "final": _gathered(module.net),
        "live": module.live,
        "validated": module.validated,
        "own": own,
        "model": model,
    }
    if rank == 0:
        torch.save(result, out)


@pytest.mark.slow
def test_sharded_average_equals_the_unsharded_run_and_never_swaps_before_an_update(tmp_path):
    # BatchNorm statistics of the average recomputed before each validation and after training
    reference, callback = Net(shard=False, bn=True), AveragingCallback(update_after=UPDATE_AFTER)
    _trainer(None, [callback]).fit(reference, _loader(), _loader())
    want = {f"net.{k}": v for k, v in _gathered(reference.net).items()}  # copied to the model

    _spawn(_average_worker, tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt")
    # rank 0 holds the first 3 of 5 rows (Linear, BatchNorm) and 2 of 3 (the last Linear): 30 of
    # the 48 parameters, as its shards of the model; the ranks' parts add up to the whole
    assert got["own"] == got["model"] == 30 and got["total"] == 48
    average = {k.removeprefix("net."): v for k, v in got["average"].items()}
    # update_bn combines the ranks' statistics: each rank ran the 4 batches, 8 in all
    assert int(got["average"].pop("net.1.num_batches_tracked")) == 2 * int(
        want.pop("net.1.num_batches_tracked")
    )
    assert got["average"].keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got["average"][key], value, msg=key)
    assert "1.running_mean" in average
    for key in ("1.running_mean", "1.running_var"):  # recomputed for the average's weights
        assert not torch.allclose(average[key], got["live"][-1][key])
    for key in dict(Net(shard=False, bn=True).net.named_parameters()):
        # the oracle: SWA is the mean of the live weights after steps 5, 6, 7
        mean = sum(step[key] for step in got["live"][UPDATE_AFTER:]) / 3
        torch.testing.assert_close(average[key], mean, msg=key)
    first, second = got["validated"]  # after epoch 0 (no update yet) and after epoch 1
    for key in [k for k, v in average.items() if v.is_floating_point()]:  # (what is swapped)
        torch.testing.assert_close(first[key], got["live"][3][key], msg=key)
        torch.testing.assert_close(second[key], average[key], msg=key)
    for key in average:
        torch.testing.assert_close(got["final"][key], average[key], msg=key)  # copy_to_model
    assert not torch.equal(first["0.weight"], Net(shard=False).net[0].weight.detach())


def _tensor_parallel_worker(rank, out):
    module, callback = Net(shard="tp"), AveragingCallback(update_after=UPDATE_AFTER)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=WORLD)
    _trainer(strategy, [callback]).fit(module, _loader(), _loader())
    layout = [
        (tuple(a.placements), tuple(p.placements), sharded.local(a).shape)
        for a, p in zip(callback.averaged.module.parameters(), module.parameters())
    ]
    result = {
        "average": callback.averaged.average_state_dict(),
        "validated": module.validated,
        "live": module.live,
        "layout": layout,
    }
    if rank == 0:
        torch.save(result, out)


@pytest.mark.slow
def test_tensor_parallel_module_average_equals_the_unsharded_run(tmp_path):
    from torch.distributed.tensor import Replicate, Shard

    reference, callback = Net(shard="tp"), AveragingCallback(update_after=UPDATE_AFTER)
    reference.shard = False  # the same 4-wide model, unsharded
    _trainer(None, [callback]).fit(reference, _loader(), _loader())
    want = callback.averaged.average_state_dict()

    _spawn(_tensor_parallel_worker, tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt")
    # held like the parameters: Shard(0) rows (first layer), Shard(1) columns, a replicated bias
    assert [(a, p) for a, p, _ in got["layout"]] == [
        ((Shard(0),), (Shard(0),)), ((Shard(0),), (Shard(0),)),
        ((Shard(1),), (Shard(1),)), ((Replicate(),), (Replicate(),)),
    ]  # fmt: skip
    assert [shape for *_, shape in got["layout"]] == [(2, 3), (2,), (3, 2), (3,)]
    assert got["average"].keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got["average"][key], value, msg=key)
    first, second = got["validated"]
    for key, value in first.items():
        torch.testing.assert_close(value, got["live"][3][key], msg=key)  # no update yet
        torch.testing.assert_close(second[key], want[f"net.{key}"], msg=key)


def _checkpoint_worker(rank, directory):
    directory = Path(directory)
    saved = {}

    class Record(pl.Callback):  # what the callback holds when the checkpoint is written
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            saved.setdefault("averages", []).append(averaging.averaged.average_state_dict())
            saved["average"] = saved["averages"][-1]
            saved["live"] = _gathered(pl_module)

    averaging = AveragingCallback(swalab.EMA(0.8), update_after=2, copy_to_model=False)
    checkpoint = pl.callbacks.ModelCheckpoint(directory / "ckpt", save_top_k=-1)
    first = Net(shard=True)
    trainer = _trainer(_strategy(), [averaging, Record(), checkpoint], enable_checkpointing=True)
    trainer.fit(first, _loader())
    uninterrupted = (averaging.averaged.average_state_dict(), _gathered(first))

    path = directory / "ckpt" / "epoch=0-step=4.ckpt"  # EMA of steps 2, 3
    resumed, again = (
        Net(shard=True),
        AveragingCallback(swalab.EMA(0.8), update_after=2, copy_to_model=False),
    )
    _trainer(_strategy(), [again]).fit(resumed, _loader(), ckpt_path=path)
    assert again.averaged.count == averaging.averaged.count == 6
    # validate(ckpt_path=...) without the callback: the strategy loads the checkpoint's average
    checked = Net(shard=True)
    _trainer(_strategy(), []).validate(checked, _loader(), ckpt_path=path, verbose=False)
    saved["validated"] = checked.validated[0]
    result = {
        "uninterrupted": uninterrupted,
        "resumed": (again.averaged.average_state_dict(), _gathered(resumed)),
        "saved": saved,
        "path": str(path),
    }
    if rank == 0:
        torch.save(result, directory / "out.pt")


def _resume_worker(rank, directory):
    """One process resumes the 2-rank checkpoint (DCP reshards)."""
    directory = Path(directory)
    resumed = Net(shard=True)
    again = AveragingCallback(swalab.EMA(0.8), update_after=2, copy_to_model=False)
    path = directory / "ckpt" / "epoch=0-step=4.ckpt"
    _trainer(_strategy(), [again]).fit(resumed, _loader(), ckpt_path=path)
    result = (again.averaged.count, again.averaged.average_state_dict(), _gathered(resumed))
    torch.save(result, directory / "one.pt")


@pytest.mark.slow
def test_sharded_checkpoint_holds_the_average_and_a_resumed_fit_ends_the_same(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    _spawn(_checkpoint_worker, str(tmp_path))
    _spawn(_resume_worker, str(tmp_path), world=1)  # the same checkpoint, resumed by 1 process
    got = torch.load(tmp_path / "out.pt")
    count, *one = torch.load(tmp_path / "one.pt")
    assert count == 6
    for want, have, alone in zip(got["uninterrupted"], got["resumed"], one):
        assert want.keys() == have.keys() == alone.keys()
        for key in want:
            torch.testing.assert_close(have[key], want[key], msg=key)
            torch.testing.assert_close(alone[key], want[key], msg=key)
    # the sharded checkpoint (epoch 1's, the last written) as one file: "state_dict" is the
    # average, the live weights nested under swalab_model_state_dict
    dcp_to_torch_save(got["path"].replace("epoch=0-step=4", "epoch=1-step=8"), tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt")["state_dict"]
    live = state.pop("swalab_model_state_dict")
    assert state.keys() == got["saved"]["average"].keys() == live.keys()
    for key in state:
        torch.testing.assert_close(state[key], got["saved"]["average"][key], msg=key)
        torch.testing.assert_close(live[key], got["saved"]["live"][key], msg=key)
    assert not torch.equal(state["net.0.weight"], live["net.0.weight"])
    first = got["saved"]["averages"][0]  # the average in epoch 0's checkpoint
    for key, value in got["saved"]["validated"].items():
        torch.testing.assert_close(value, first[f"net.{key}"], msg=key)


def _fake_trainer(strategy, callback):
    return types.SimpleNamespace(strategy=strategy, callbacks=[callback])


def test_fsdp1_strategy_is_refused_at_setup_pointing_to_model_parallel():
    callback = AveragingCallback()
    with pytest.raises(ValueError, match="FSDPStrategy.*ModelParallelStrategy") as error:
        callback.setup(_fake_trainer(FSDPStrategy(), callback), Net(shard=False), "fit")
    assert "\n" not in str(error.value) and callback.averaged is None


@pytest.mark.parametrize(
    "options, strategy, match",
    [
        (dict(swag_max_models=5), {}, "swag_max_models=5"),
        (dict(device="cpu"), {}, "device='cpu'"),
        ({}, dict(save_distributed_checkpoint=False), "save_distributed_checkpoint=True"),
    ],
)
def test_options_a_sharded_average_lacks_are_refused_at_setup(options, strategy, match):
    callback = AveragingCallback(swalab.SWA(), **options)
    trainer = _fake_trainer(ModelParallelStrategy(**strategy), callback)
    with pytest.raises(ValueError, match=match):
        callback.setup(trainer, Net(shard=False), "fit")


# -- Hugging Face: the callback's sharded path, driven hook by hook ------------------------------
# accelerate 1.16 turns TrainingArguments(fsdp=...) into FSDP only on accelerators (MULTI_GPU,
# MULTI_NPU, ...): on the CPU (MULTI_CPU) the model trains as replicas and the callback averages
# it as an ordinary model. The sharded path is therefore driven here by calling the callback's
# hooks, in the Trainer's order, around a GPT-2 sharded with fully_shard by hand.

HF_STEPS, HF_SAVE = 6, 4


def _gpt2(shard):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _hf_args(out, resume=None):
    return types.SimpleNamespace(
        output_dir=str(out),
        resume_from_checkpoint=resume,
        metric_for_best_model=None,
        load_best_model_at_end=False,
        device=torch.device("cpu"),
    )


def _hf_state(step=0):
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    return types.SimpleNamespace(
        global_step=step, is_world_process_zero=rank0, best_model_checkpoint=None
    )


def _hf_run(model, callback, out):
    """``HF_STEPS`` AdamW steps on the same batches on every rank, the callback's hooks called as
    the Trainer calls them; saves at ``HF_SAVE``. Returns the gathered average at the save."""
    from swalab.integrations import _sharded

    args, state = _hf_args(out), _hf_state()
    callback.on_train_begin(args, state, None, model=model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    at_save = None
    for _ in range(HF_STEPS):
        ids = torch.randint(0, 32, (4, 8), generator=g)
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        state.global_step += 1
        callback.on_step_end(args, state, None, model=model)
        if state.global_step == HF_SAVE:
            callback.on_save(args, state, None)
            at_save = _sharded.gathered_on_rank0(callback.averaged)
    callback.on_train_end(args, state, None, model=model)
    return at_save


def _hf_worker(rank, out):
    from swalab.integrations.transformers import AveragingCallback as HFCallback

    torch.set_num_threads(1)
    dist.init_process_group("gloo", world_size=WORLD, rank=rank)  # from the variables _entry set
    out = Path(out)
    reference = HFCallback(update_after=1, evaluate_average=False)
    ref_at_save = _hf_run(_gpt2(shard=False), reference, out / f"unsharded{rank}")
    model = _gpt2(shard=True)
    callback = HFCallback(update_after=1, evaluate_average=False)
    at_save = _hf_run(model, callback, out / "sharded")
    assert callback.averaged.sharded and callback.averaged.count == HF_STEPS - 1
    own = sum(sharded.local(p).numel() for p in callback.averaged.module.parameters())
    assert own == sum(sharded.local(p).numel() for p in model.parameters())
    # resumed at the saved step with 2 ranks: the average (and its count) as it was saved
    again = HFCallback(update_after=1, evaluate_average=False)
    resume = str(out / "sharded" / f"checkpoint-{HF_SAVE}")
    again.on_train_begin(_hf_args(out, resume), _hf_state(HF_SAVE), None, model=model)
    resumed = _sharded_gathered(again)
    # metric_for_best_model naming the average's metric, the best checkpoint the saved one: the
    # export is that checkpoint's average, and load_best_model_at_end puts it into the model
    best_args = _hf_args(out / "best")
    best_args.metric_for_best_model, best_args.load_best_model_at_end = "eval_average_loss", True
    best_state = _hf_state(HF_STEPS)
    best_state.best_model_checkpoint = resume
    callback.on_train_end(best_args, best_state, None, model=model)
    loaded = {k: sharded.gather(v) for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(
            {
                "reference": reference.averaged.average_state_dict(),
                "ref_at_save": ref_at_save,
                "at_save": at_save,
                "resumed": (again.averaged.count, resumed),
                "own": own,
                "loaded": loaded,
            },
            out / "out.pt",
        )


def _sharded_gathered(callback):
    from swalab.integrations import _sharded

    return _sharded.gathered_on_rank0(callback.averaged)


@pytest.mark.slow
def test_hf_callback_keeps_a_sharded_average_saves_it_with_the_checkpoint_and_resumes(tmp_path):
    transformers = pytest.importorskip("transformers")

    from swalab.integrations.transformers import AveragingCallback as HFCallback

    _spawn(_hf_worker, str(tmp_path))
    got = torch.load(tmp_path / "out.pt")
    # the final export loads unsharded with from_pretrained and equals the unsharded run's average
    final = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "sharded" / "swalab_average")
    exported = final.state_dict()
    for key, value in got["reference"].items():
        torch.testing.assert_close(exported[key], value, msg=key)
    for key, value in got["ref_at_save"].items():
        torch.testing.assert_close(got["at_save"][key], value, msg=key)
        torch.testing.assert_close(got["resumed"][1][key], value, msg=key)
    assert got["resumed"][0] == HF_SAVE - 1
    best = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "best" / "swalab_average")
    for key, value in got["ref_at_save"].items():
        torch.testing.assert_close(best.state_dict()[key], value, msg=key)
        torch.testing.assert_close(got["loaded"][key], value, msg=key)
    assert got["own"] < sum(p.numel() for p in final.parameters())
    # the same DCP checkpoint read by one process into an ordinary (unsharded) average
    one = HFCallback(update_after=1, evaluate_average=False)
    resume = str(tmp_path / "sharded" / f"checkpoint-{HF_SAVE}")
    one.on_train_begin(_hf_args(tmp_path, resume), _hf_state(HF_SAVE), None, model=_gpt2(False))
    assert not one.averaged.sharded and one.averaged.count == HF_SAVE - 1
    for key, value in one.averaged.average_state_dict().items():
        torch.testing.assert_close(value, got["ref_at_save"][key], msg=key)


def test_hf_callback_refuses_deepspeed_zero3_before_copying():
    pytest.importorskip("transformers")
    from swalab.integrations.transformers import AveragingCallback as HFCallback

    model = nn.Linear(3, 2)
    for p in model.parameters():  # what ZeRO-3 leaves on each rank: empty placeholders
        p.data = torch.empty(0)
        p.ds_id = 0
    callback = HFCallback(evaluate_average=False)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3"):
        callback.on_train_begin(_hf_args("unused"), _hf_state(), None, model=model)
    assert callback.averaged is None
