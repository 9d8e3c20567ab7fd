"""swalab.integrations.lightning against the real Lightning Trainer on the CPU.

Oracles: the callback's average equals the mean (or the EMA recurrence) of the weights recorded at
the averaged steps; periodic SWA restarts from the hand-computed mean; a resumed run ends with the
uninterrupted run's average; the logged validation metric equals the average evaluated directly;
BatchNorm statistics after training equal the mean/variance of the inputs (BN is the first layer).
"""

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from integration_helpers import assert_all_close, ema, mean, params, run_readme_example
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import swalab

pl = pytest.importorskip("lightning.pytorch")
from swalab.integrations.lightning import AveragingCallback  # noqa: E402

N, BATCH = 32, 8  # 4 optimizer steps per epoch


def _data(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) * 2 + 1
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


def _loader(seed=0, n=N):
    return DataLoader(_data(seed, n), batch_size=BATCH, shuffle=False)


class Net(pl.LightningModule):
    def __init__(self, bn=False, lr=0.1):
        super().__init__()
        self.lr = lr
        self.norm = nn.BatchNorm1d(4) if bn else nn.Identity()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(self.norm(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TwoOptimizers(Net):
    """Manual optimisation with one optimizer per layer: global_step grows by 2 per batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(F.mse_loss(self(x), y))
        first.step()
        second.step()

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.Adam(self.net[2].parameters(), lr=0.01),
        ]


class Recorder(pl.Callback):
    """Snapshots of the parameters after every optimizer step and at every epoch's start."""

    def __init__(self):
        self.steps, self.epoch_starts, self.optimizer_states, self.lrs = [], [], [], []
        self._global_step = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_starts.append(params(pl_module))
        self.optimizer_states.append([len(o.state) for o in trainer.optimizers])
        self.lrs.append([o.param_groups[0]["lr"] for o in trainer.optimizers])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._global_step:
            self._global_step = trainer.global_step
            self.steps.append(params(pl_module))


def _trainer(callbacks, epochs=3, **kwargs):
    kwargs = dict(
        dict(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        ),
        **kwargs,
    )
    return pl.Trainer(callbacks=callbacks, **kwargs)


def test_swa_every_k_steps_from_a_start_step_is_the_mean_of_those_steps():
    torch.manual_seed(0)
    recorder, callback = (
        Recorder(),
        AveragingCallback(update_every=3, update_after=2, update_bn=False),
    )
    model = Net()
    _trainer([recorder, callback], epochs=3).fit(model, _loader())
    assert len(recorder.steps) == 12
    averaged_steps = [2, 5, 8, 11]  # 0-based steps >= 2, every 3rd
    assert callback.averaged.count == len(averaged_steps)
    expected = mean([recorder.steps[i] for i in averaged_steps])
    assert_all_close(params(callback.averaged.module), expected)
    assert_all_close(params(model), expected)  # copy_to_model: the module ends holding the average


def test_ema_with_warmup_follows_the_recurrence():
    torch.manual_seed(1)
    decay, gamma, power = 0.9, 2.0, 2 / 3
    recorder = Recorder()
    callback = AveragingCallback(
        swalab.EMA(decay, warmup_gamma=gamma), update_after=3, update_bn=False
    )
    _trainer([recorder, callback], epochs=2).fit(Net(), _loader())
    expected = ema(recorder.steps[3:], decay, gamma, power)  # the first averaged step copies
    assert_all_close(params(callback.averaged.module), expected)


def test_epoch_interval_averages_the_last_step_of_each_epoch_before_validation():
    torch.manual_seed(2)
    recorder = Recorder()
    callback = AveragingCallback(
        interval="epoch", update_after=1, update_bn=False, copy_to_model=False
    )
    val = _loader(seed=5, n=BATCH)
    model = Net()
    _trainer([recorder, callback], epochs=4).fit(model, _loader(), val)
    expected = mean([recorder.steps[4 * e + 3] for e in (1, 2, 3)])
    assert_all_close(params(callback.averaged.module), expected)
    # The last validation saw the average of epochs 1..3: the fold runs before it.
    x, y = val.dataset.tensors
    with torch.no_grad():
        direct = F.mse_loss(callback.averaged.module(x), y)
        live = F.mse_loss(model(x), y)
    torch.testing.assert_close(pl_metric(model, "val_loss"), direct)
    assert not torch.isclose(live, direct)  # the live weights would have logged another number


def pl_metric(model, name):
    return model.trainer.callback_metrics[name].float()


def test_validation_off_logs_the_live_model():
    torch.manual_seed(3)
    callback = AveragingCallback(validate_average=False, update_bn=False, copy_to_model=False)
    val = _loader(seed=5, n=BATCH)
    model = Net()
    _trainer([callback], epochs=2).fit(model, _loader(), val)
    x, y = val.dataset.tensors
    with torch.no_grad():
        torch.testing.assert_close(pl_metric(model, "val_loss"), F.mse_loss(model(x), y))


def test_periodic_swa_restarts_from_the_mean_then_averages_afresh():
    torch.manual_seed(4)
    recorder = Recorder()
    callback = AveragingCallback(
        interval="epoch",
        update_after=0,
        restart_every=2,
        restart_until=4,
        update_bn=False,
        copy_to_model=False,
    )
    _trainer([recorder, callback], epochs=6).fit(Net(), _loader())
    end = [recorder.steps[4 * e + 3] for e in range(6)]  # weights at each epoch's end
    assert_all_close(recorder.epoch_starts[2], mean(end[0:2]))
    assert_all_close(recorder.epoch_starts[4], mean(end[2:4]))
    assert recorder.optimizer_states[2] == [0] and recorder.optimizer_states[3] != [0]
    assert callback.averaged.count == 2
    assert_all_close(params(callback.averaged.module), mean(end[4:6]))


def test_swag_collects_the_averaged_steps():
    torch.manual_seed(5)
    recorder = Recorder()
    callback = AveragingCallback(update_after=6, swag_max_models=3, update_bn=False)
    _trainer([recorder, callback], epochs=3).fit(Net(), _loader())
    assert callback.swag.n_models == 6
    flat = [torch.cat([t.flatten() for t in s]) for s in recorder.steps[6:]]
    torch.testing.assert_close(callback.swag.mean, torch.stack(flat).mean(0))
    torch.testing.assert_close(callback.swag.sq_mean, torch.stack(flat).square().mean(0))
    torch.testing.assert_close(
        callback.swag.mean, torch.cat([p.flatten() for p in callback.averaged.module.parameters()])
    )


def test_several_optimizers_one_step_per_batch_and_schedule_in_each():
    torch.manual_seed(6)
    recorder = Recorder()
    schedule = swalab.swa_reference_lr(lr_init=0.1, swa_start=2, swa_lr=0.01)
    callback = AveragingCallback(
        update_every=2, update_after=0, lr_schedule=schedule, update_bn=False
    )
    trainer = _trainer(
        [callback, recorder], epochs=3
    )  # the recorder reads the LR after ours sets it
    trainer.fit(TwoOptimizers(), _loader())
    assert trainer.global_step == 24 and len(recorder.steps) == 12  # 2 optimizer steps per batch
    assert_all_close(params(callback.averaged.module), mean(recorder.steps[0::2]))
    assert recorder.lrs == [[schedule(e)] * 2 for e in range(3)]


def test_gradient_accumulation_averages_after_optimizer_steps_only():
    torch.manual_seed(11)
    recorder, callback = Recorder(), AveragingCallback(update_after=0, update_bn=False)
    trainer = _trainer([recorder, callback], epochs=2, accumulate_grad_batches=2)
    trainer.fit(Net(), _loader())
    assert trainer.global_step == 4 and callback.averaged.count == 4  # 8 batches, 4 steps
    assert_all_close(params(callback.averaged.module), mean(recorder.steps))


class WithScheduler(Net):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)]


def test_schedule_takes_over_from_the_modules_scheduler_when_averaging_starts():
    """Lightning's SWA hand-over: the module's StepLR drives epochs 0-1 (0.1, 0.05), the swalab
    schedule from the first averaged epoch on; the scheduler is no longer stepped."""
    recorder = Recorder()
    callback = AveragingCallback(
        interval="epoch", update_after=2, lr_schedule=swalab.constant_lr(0.02), update_bn=False
    )
    trainer = _trainer([callback, recorder], epochs=4)
    trainer.fit(WithScheduler(), _loader())
    assert recorder.lrs == [[0.1], [0.05], [0.02], [0.02]]
    assert callback.averaged.count == 2 and trainer.lr_scheduler_configs == []


def test_defaults_swa_from_80_percent_ema_from_the_start_fractions_and_nothing_warns():
    steps = 5 * N // BATCH  # 20 optimizer steps
    for kwargs, count in [
        ({}, steps - int(0.8 * steps)),  # SWA: the last 20%, as swa_epoch_start=0.8
        ({"rule": swalab.EMA(0.9)}, steps),
        ({"update_after": 0.5}, steps // 2),
        ({"interval": "epoch", "update_after": 0.6}, 2),
    ]:
        callback = AveragingCallback(**kwargs, update_bn=False)
        _trainer([callback], epochs=5).fit(Net(), _loader())
        assert callback.averaged.count == count, kwargs
    with pytest.warns(UserWarning, match=r"update_after=100 \(steps\) is past the end of training"):
        with pytest.warns(UserWarning, match="averaged no model"):
            _trainer([AveragingCallback(update_after=100)], epochs=1).fit(Net(), _loader())
    with pytest.raises(ValueError, match="update_after must be an integer >= 0 .* got 1.5"):
        AveragingCallback(update_after=1.5)


class BNNet(Net):
    def __init__(self):
        super().__init__(bn=True)


class ValLosses(pl.Callback):
    """The validated val_loss of each epoch (checkpoints are written after it)."""

    def __init__(self):
        self.losses = {}

    def on_validation_end(self, trainer, pl_module):
        self.losses[trainer.current_epoch] = float(trainer.callback_metrics["val_loss"])


def test_every_checkpoint_loads_the_model_validated_for_it(tmp_path):
    """With BatchNorm: the validated average has its statistics recomputed, and each checkpoint
    holds that model, so load_from_checkpoint scores what was validated for it."""
    torch.manual_seed(12)
    losses = ValLosses()
    every_epoch = pl.callbacks.ModelCheckpoint(
        tmp_path, save_top_k=-1, every_n_epochs=1, save_last=True
    )
    callback = AveragingCallback(update_after=2)
    val = _loader(seed=5, n=BATCH)  # one batch: the logged mean is the loss of the whole set
    train = DataLoader(_data(), batch_size=BATCH, shuffle=True)
    model = BNNet()
    _trainer([callback, every_epoch, losses], epochs=3, enable_checkpointing=True).fit(
        model, train, val
    )
    x, y = val.dataset.tensors

    def score(module):
        module.eval()
        with torch.no_grad():
            return float(F.mse_loss(module(x), y))

    for epoch in range(3):
        (path,) = tmp_path.glob(f"epoch={epoch}-*.ckpt")
        assert score(BNNet.load_from_checkpoint(path)) == pytest.approx(losses.losses[epoch])
    assert score(BNNet.load_from_checkpoint(tmp_path / "last.ckpt")) == pytest.approx(
        losses.losses[2]
    )
    assert score(model) == pytest.approx(losses.losses[2])  # the module after training


def test_bn_recomputed_at_the_end_for_any_batch_format():
    torch.manual_seed(7)
    x = _data().tensors[0]
    dict_loader = DataLoader([{"inputs": row} for row in x], batch_size=BATCH)
    callback = AveragingCallback(
        update_after=4,
        bn_loader=dict_loader,
        bn_forward_fn=lambda module, batch: module(batch["inputs"]),
    )
    model = Net(bn=True)
    _trainer([callback], epochs=2).fit(model, _loader())
    batches = x.split(BATCH)
    bn = callback.averaged.module.norm
    torch.testing.assert_close(bn.running_mean, x.mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(0) for b in batches]).mean(0))
    torch.testing.assert_close(model.norm.running_mean, x.mean(0))  # copied into the module


def test_bf16_mixed_precision_averages_and_recomputes_bn():
    torch.manual_seed(8)
    recorder, callback = Recorder(), AveragingCallback(update_after=2)
    model = Net(bn=True)
    _trainer([recorder, callback], epochs=2, precision="bf16-mixed").fit(model, _loader())
    assert_all_close(params(callback.averaged.module), mean(recorder.steps[2:]))
    x = _data().tensors[0]
    torch.testing.assert_close(callback.averaged.module.norm.running_mean, x.mean(0))


@pytest.mark.parametrize(
    "options",
    [
        dict(interval="epoch", update_after=1, swag_max_models=2),
        dict(rule=swalab.EMA(0.8, warmup_gamma=3), update_every=2, update_after=5),
        dict(interval="epoch", update_after=0, restart_every=2, restart_until=3),
    ],
)
def test_resume_gives_the_uninterrupted_average(tmp_path, options):
    def run(epochs, callbacks, ckpt_path=None, **kwargs):
        torch.manual_seed(9)
        callback = AveragingCallback(**options, update_bn=False, copy_to_model=False)
        model = Net()
        _trainer([callback, *callbacks], epochs=epochs, **kwargs).fit(
            model, _loader(), ckpt_path=ckpt_path
        )
        return callback, model

    every_epoch = pl.callbacks.ModelCheckpoint(tmp_path, save_top_k=-1, every_n_epochs=1)
    whole, whole_model = run(5, [every_epoch], enable_checkpointing=True)
    checkpoint = tmp_path / "epoch=1-step=8.ckpt"
    assert checkpoint.exists(), sorted(os.listdir(tmp_path))
    resumed, resumed_model = run(5, [], ckpt_path=str(checkpoint))
    assert_all_close(params(resumed.averaged.module), params(whole.averaged.module))
    assert_all_close(params(resumed_model), params(whole_model))
    assert resumed.averaged.count == whole.averaged.count
    if whole.swag is not None:
        torch.testing.assert_close(resumed.swag.cov_mat_sqrt, whole.swag.cov_mat_sqrt)
    # The checkpoint's model is the average, so load_from_checkpoint gives it.
    state = torch.load(tmp_path / "epoch=4-step=20.ckpt", weights_only=False)
    loaded = Net.load_from_checkpoint(tmp_path / "epoch=4-step=20.ckpt")
    if state["callbacks"][AveragingCallback.__qualname__]["count"] > 0:
        assert_all_close(params(loaded), params(whole.averaged.module))


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="interval must be 'step' or 'epoch', got 'batch'"):
        AveragingCallback(interval="batch")
    with pytest.raises(ValueError, match="restart_until .* give restart_every"):
        AveragingCallback(restart_until=3)
    with pytest.raises(ValueError, match="rule must be a swalab AveragingRule"):
        AveragingCallback(rule=0.999)
    with pytest.raises(ValueError, match="update_every must be an integer >= 1, got 0"):
        _trainer([AveragingCallback(update_every=0)], epochs=1).fit(Net(), _loader())


class SaveAverage(pl.Callback):
    def __init__(self, out):
        self.out = str(out)

    def on_train_end(self, trainer, pl_module):
        averaged = next(
            cb for cb in trainer.callbacks if isinstance(cb, AveragingCallback)
        ).averaged
        torch.save(averaged.module.state_dict(), Path(self.out) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_averages_are_identical_on_every_rank(tmp_path):
    torch.manual_seed(10)
    callback = AveragingCallback(update_every=2, update_after=1, swag_max_models=2)
    trainer = _trainer([callback, SaveAverage(tmp_path)], epochs=2, strategy="ddp_spawn", devices=2)
    train = DataLoader(_data(n=2 * N), batch_size=BATCH, shuffle=True)
    trainer.fit(Net(bn=True), train, _loader(seed=5, n=2 * BATCH))  # validation swaps on each rank
    assert "val_loss" in trainer.callback_metrics
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # BN statistics combined over both ranks' shards: those of the whole data.
    x = _data(n=2 * N).tensors[0]
    torch.testing.assert_close(ranks[0]["norm.running_mean"], x.mean(0))
    assert math.isclose(float(ranks[0]["norm.num_batches_tracked"]), 2 * N / BATCH)


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    count, val_loss = run_readme_example("**Lightning**", tmp_path).split()[-2:]
    assert int(count) == 5 and math.isfinite(float(val_loss))
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
