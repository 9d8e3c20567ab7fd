"""Issue 20, "any module, any subset": models deepcopy cannot copy, subsets of the weights,
EMA half-life, updates from the optimizer's step hook and the exported average."""

import threading
import warnings
from concurrent.futures import Future

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import swalab


class Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


class WithLock(nn.Module):
    """A module deepcopy refuses (a lock among its attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        with self.lock:
            return self.linear(x)


def reparametrized(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm/spectral_norm are deprecated
        if kind == "parametrize":
            parametrize.register_parametrization(model[0], "weight", Symmetric())
        elif kind == "weight_norm (old)":
            torch.nn.utils.weight_norm(model[0])
        elif kind == "weight_norm":
            parametrizations.weight_norm(model[0])
        elif kind == "spectral_norm (old)":
            torch.nn.utils.spectral_norm(model[0])
        elif kind == "spectral_norm":
            parametrizations.spectral_norm(model[0])
        else:
            model[1] = WithLock()
    model(torch.randn(4, 3))  # the old hooks keep the computed weight as an attribute (not a leaf)
    return model


KINDS = [
    "parametrize",
    "weight_norm (old)",
    "weight_norm",
    "spectral_norm (old)",
    "spectral_norm",
    "lock",
]


@pytest.mark.parametrize("kind", KINDS)
def test_models_deepcopy_cannot_copy_are_averaged(kind):
    model = reparametrized(kind)
    averaged = swalab.AveragedModel(model)
    snapshots = []
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        model.train()
        model(torch.randn(4, 3))  # spectral_norm's power iteration moves its u, v buffers
        averaged.update_parameters(model)
        snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
    for name, a in averaged.module.named_parameters():
        expected = sum(s[name] for s in snapshots) / 3
        torch.testing.assert_close(a.detach(), expected, msg=name)
    # The average computes like the model holding the averaged parameters and the same buffers.
    reference = reparametrized(kind)
    reference.load_state_dict(averaged.module.state_dict())
    x = torch.randn(5, 3)
    averaged.eval(), reference.eval()
    torch.testing.assert_close(averaged(x), reference(x))
    assert all(
        a.data_ptr() != p.data_ptr() for a, p in zip(averaged.parameters(), model.parameters())
    )


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (LoRA, Hu et al., 2021)."""

    def __init__(self, n: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(n, n).requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, n) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(n, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def lora_model() -> nn.Module:
    torch.manual_seed(0)
    frozen_norm = nn.BatchNorm1d(4).requires_grad_(False)
    return nn.Sequential(LoRALinear(4), frozen_norm, nn.ReLU(), LoRALinear(4))


ADAPTERS = {"0.lora_a", "0.lora_b", "3.lora_a", "3.lora_b"}


def own_tensors(averaged, model):
    """Names of the average's tensors that are not the model's own (same names, by storage)."""
    theirs = {n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()}
    return {
        n
        for n, t in averaged.module.state_dict(keep_vars=True).items()
        if t.data_ptr() != theirs[n]
    }


@pytest.mark.parametrize(
    "kwargs",
    [{"trainable_only": True}, {"include": "*.lora_*"}, {"include": ["*lora_a", "*lora_b"]}],
)
def test_lora_average_holds_exactly_the_adapter_tensors(kwargs, tmp_path):
    model = lora_model()
    averaged = swalab.AveragedModel(model, **kwargs)
    assert averaged.selected == ADAPTERS and own_tensors(averaged, model) == ADAPTERS
    snapshots = []
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step))).pow(
            2
        ).sum().backward()
        optimizer.step()
        averaged.update_parameters(model)
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, a in averaged.module.named_parameters():
        if name in ADAPTERS:
            torch.testing.assert_close(a.detach(), sum(s[name] for s in snapshots) / 3)
        else:  # the frozen base is the model's own tensor
            assert a is dict(model.named_parameters())[name]
    assert set(averaged.average_state_dict()) == ADAPTERS
    averaged.save_average(tmp_path / "adapters.pt")
    saved = torch.load(tmp_path / "adapters.pt")
    assert set(saved) == ADAPTERS
    fresh = lora_model()
    fresh.load_state_dict(saved, strict=False)
    for name in ADAPTERS:
        torch.testing.assert_close(fresh.get_parameter(name), averaged.module.get_parameter(name))
    with averaged.swapped_into(model):  # only the adapters move
        assert all(torch.equal(model.get_parameter(n), saved[n]) for n in ADAPTERS)


def test_exclude_patterns_leave_those_tensors_shared_and_unaveraged():
    model = lora_model()
    averaged = swalab.AveragedModel(model, exclude=["*.bias", "1.*"])
    assert own_tensors(averaged, model) == {"0.base.weight", "3.base.weight"} | ADAPTERS
    before = model[3].base.bias.detach().clone()
    averaged.update_parameters(model)
    with torch.no_grad():
        model[3].base.bias.add_(1.0)
        model[3].lora_a.add_(2.0)
    averaged.update_parameters(model)
    torch.testing.assert_close(averaged.module[3].base.bias, before + 1.0)  # shared: the model's
    torch.testing.assert_close(averaged.module[3].lora_a, model[3].lora_a - 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"include": "*.lora_c"}, "include pattern '\\*.lora_c' matches no parameter or buffer"),
        ({"exclude": ["*.bias", "nope"]}, "exclude pattern 'nope' matches no parameter"),
        ({"include": "*.bias", "exclude": "*"}, "leave no parameter or buffer to average"),
        ({"include": 3}, "include must be a pattern or a list of patterns, got 3"),
        ({"trainable_only": "yes"}, "trainable_only must be True or False"),
    ],
)
def test_subset_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        swalab.AveragedModel(lora_model(), **kwargs)


def test_save_average_writes_a_plain_state_dict_that_loads_into_the_model(tmp_path):
    model = lora_model()
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    averaged.save_average(tmp_path / "average.pt")
    saved = torch.load(tmp_path / "average.pt")
    assert list(saved) == list(model.state_dict())  # no module., no n_averaged
    fresh = lora_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(saved)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["average.pt"]  # no temporary file left


def _ones_then_zeros(averaged, model, steps):
    """The model is all ones at step 0, all zeros after: the average is the first model's weight."""
    for step in range(steps + 1):
        with torch.no_grad():
            model.weight.fill_(1.0 if step == 0 else 0.0)
        averaged.update_parameters(model)
    return averaged.module.weight.detach()


@pytest.mark.parametrize("every", [1, 2, 4, 8])
def test_half_life_halves_a_models_weight_every_h_steps_whatever_update_every(every):
    model = nn.Linear(3, 1, bias=False)
    ema = swalab.AveragedModel(model, rule=swalab.EMA(half_life=8), update_every=every)
    torch.testing.assert_close(_ones_then_zeros(ema, model, 8), torch.full((1, 3), 0.5))
    assert ema.rule.decay == pytest.approx(2 ** (-1 / 8))
    ema = swalab.AveragedModel(model, rule=swalab.EMA(half_life=8), update_every=every)
    torch.testing.assert_close(_ones_then_zeros(ema, model, 16), torch.full((1, 3), 0.25))
    fraction = swalab.AveragedModel(
        model, rule=swalab.EMA(half_life=0.1, total_steps=80), update_every=every
    )
    torch.testing.assert_close(_ones_then_zeros(fraction, model, 8), torch.full((1, 3), 0.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay": 0.9, "half_life": 10}, "give decay or half_life, not both"),
        ({"half_life": 0}, "half_life must be a finite number > 0, got 0"),
        ({"half_life": float("inf")}, "half_life must be a finite number > 0"),
        ({"half_life": 5, "total_steps": 100}, "half_life is a fraction of total_steps"),
        ({"half_life": 0.5, "total_steps": 0}, "total_steps must be an integer >= 1, got 0"),
        ({"total_steps": 100}, "half_life must be a finite number > 0, got None"),
    ],
)
def test_half_life_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        swalab.EMA(**kwargs)


def test_default_decay_is_unchanged():
    assert swalab.EMA().decay == 0.999 and swalab.EMA(0.9).weight(5) == pytest.approx(0.1)


def test_attach_updates_once_per_optimizer_step_under_gradient_accumulation():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    averaged = swalab.AveragedModel(model)
    handle = averaged.attach(optimizer, every=2)
    after_steps = []
    for step in range(6):
        for micro in range(3):  # three backward passes, one optimizer step
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(10 * step + micro))
            model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        after_steps.append([p.detach().clone() for p in model.parameters()])
    assert averaged.count == 3  # steps 0, 2 and 4
    for i, a in enumerate(averaged.module.parameters()):
        torch.testing.assert_close(a.detach(), sum(after_steps[s][i] for s in (0, 2, 4)) / 3)
    handle.remove()
    optimizer.step()
    optimizer.step()
    assert averaged.count == 3
    with pytest.raises(ValueError, match="every must be an integer >= 1, got 0"):
        averaged.attach(optimizer, every=0)
    with pytest.raises(ValueError, match="every=3 conflicts with update_every=2"):
        averaged.attach(optimizer, every=3)


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rule": swalab.EMA(0.9)},
        {"use_buffers": True},
        {"rule": swalab.EMA(half_life=3), "update_every": 2},
    ],
)
def test_asynchronous_updates_on_a_worker_thread_equal_the_synchronous_ones(kwargs):
    model = bn_model()
    sync = swalab.AveragedModel(model, **kwargs)
    background = swalab.AveragedModel(model, asynchronous=True, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    for step in range(7):
        optimizer.zero_grad()
        model(x + step).pow(2).mean().backward()
        optimizer.step()  # the model moves on while the fold may still run
        sync.update_parameters(model)
        background.update_parameters(model)
    assert background._worker.pending is not None  # the last fold is still in flight, or unjoined
    ours, reference = background.state_dict(), sync.state_dict()  # state_dict joins first
    assert background._worker.pending is None
    assert list(ours) == list(reference)
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
    assert background.count == sync.count
    torch.testing.assert_close(background(x), sync(x), rtol=0, atol=0)


def test_asynchronous_fold_error_is_raised_at_the_join():
    model = bn_model()
    averaged = swalab.AveragedModel(model, asynchronous=True)
    averaged.update_parameters(model)
    averaged._worker.pending.result()
    future = Future()
    future.set_exception(RuntimeError("fold failed"))
    averaged._worker.pending = future
    with pytest.raises(RuntimeError, match="fold failed"):
        averaged.join()
    averaged.join()  # raised once


def test_asynchronous_update_bn_waits_for_the_fold_before_resetting_statistics():
    model = bn_model()
    averaged = swalab.AveragedModel(model, asynchronous=True)
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
    averaged.update_parameters(model)
    loader = [torch.randn(8, 3, generator=torch.Generator().manual_seed(1))]
    swalab.update_bn(loader, averaged)
    reference = swalab.AveragedModel(model)
    reference.update_parameters(model)
    swalab.update_bn(loader, reference)
    assert torch.equal(averaged.module[1].running_mean, reference.module[1].running_mean)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"asynchronous": 1}, "asynchronous must be True or False, got 1"),
        ({"asynchronous": True, "avg_fn": swalab.get_swa_avg_fn()}, "not avg_fn/multi_avg_fn"),
    ],
)
def test_asynchronous_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        swalab.AveragedModel(bn_model(), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_asynchronous_gpu_model_into_cpu_average_through_pinned_staging():
    model = bn_model().cuda()
    sync = swalab.AveragedModel(model, device="cpu")
    background = swalab.AveragedModel(model, device="cpu", asynchronous=True)
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step)
        sync.update_parameters(model)
        background.update_parameters(model)
    assert background._worker.pending is not None
    for (key, a), b in zip(background.state_dict().items(), sync.state_dict().values()):
        assert torch.equal(a, b), key


def test_asynchronous_average_of_a_subset_equals_the_synchronous_one():
    model = lora_model()
    sync = swalab.AveragedModel(model, trainable_only=True, rule=swalab.EMA(half_life=2))
    background = swalab.AveragedModel(
        model, trainable_only=True, rule=swalab.EMA(half_life=2), asynchronous=True
    )
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (step + 1))
        sync.update_parameters(model)
        background.update_parameters(model)
    assert set(background.average_state_dict()) == ADAPTERS
    for key, value in sync.average_state_dict().items():
        assert torch.equal(background.average_state_dict()[key], value), key
    assert own_tensors(background, model) == ADAPTERS
