"""Oracle tests for swalab.averaging: SWA/EMA against hand-computed averages and torch's AveragedModel."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.optim import swa_utils

import swalab
from swalab.averaging import AverageState


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


def perturb(model: nn.Module, seed: int, with_buffers: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if with_buffers:
            for b in model.buffers():
                if b.is_floating_point():
                    b.copy_(torch.rand(b.shape, generator=g) + 0.5)
                else:
                    b.fill_(seed)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def test_swa_equals_mean_of_collected_models():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    snapshots = []
    for seed in range(7):
        perturb(model, seed)
        snapshots.append(flat(model.parameters()))
        averaged.update_parameters(model)
    expected = torch.stack(snapshots).mean(0)
    torch.testing.assert_close(flat(averaged.module.parameters()), expected, rtol=1e-6, atol=1e-6)
    assert averaged.count == 7 and int(averaged.n_averaged) == 7
    # buffers are copied from the model when use_buffers=False
    for b_avg, b in zip(averaged.module.buffers(), model.buffers()):
        assert torch.equal(b_avg, b)


def test_swa_with_buffers_averages_float_buffers_and_copies_integer_ones():
    model = small_model()
    averaged = swalab.AveragedModel(model, use_buffers=True)
    means = []
    for seed in range(1, 5):
        perturb(model, seed, with_buffers=True)
        means.append(model[1].running_var.clone().double())
        averaged.update_parameters(model)
    torch.testing.assert_close(averaged.module[1].running_var.double(), torch.stack(means).mean(0))
    assert int(averaged.module[1].num_batches_tracked) == 4  # the last model's, copied


def test_ema_recurrence_by_hand():
    model = small_model()
    decay = 0.8
    averaged = swalab.AveragedModel(model, rule=swalab.EMA(decay))
    expected = None
    for seed in range(6):
        perturb(model, seed)
        w = flat(model.parameters())
        expected = w if expected is None else decay * expected + (1 - decay) * w
        averaged.update_parameters(model)
    torch.testing.assert_close(flat(averaged.module.parameters()), expected, rtol=1e-6, atol=1e-6)


def test_ema_warmup_decay_formula():
    rule = swalab.EMA(decay=0.99, warmup_gamma=2.0, warmup_power=0.5)
    for t in [1, 2, 10, 10_000]:
        decay_t = min(0.99, 1 - (1 + t / 2.0) ** -0.5)
        assert rule.weight(t) == pytest.approx(1 - decay_t)
    assert rule.weight(10**6) == pytest.approx(0.01)  # 1 - (1 + t/2)^-0.5 > 0.99 once t > 19998
    # The functional API: init copies, update folds in.
    params = [torch.zeros(3)]
    state = rule.init(params)
    state = rule.update(state, [torch.ones(3)])  # first update copies
    state = rule.update(state, [torch.zeros(3)])
    assert state.count == 2
    torch.testing.assert_close(state.average[0], torch.full((3,), 1 - rule.weight(1)))


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_ema_rejects_decay_outside_unit_interval(decay):
    with pytest.raises(ValueError, match="decay"):
        swalab.EMA(decay)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.9)},
        {"avg_fn": swa_utils.get_ema_avg_fn(0.9)},
        {"multi_avg_fn": swa_utils.get_swa_multi_avg_fn()},
        {"use_buffers": True},
    ],
    ids=["default", "ema_multi", "ema_single", "swa_multi", "buffers"],
)
def test_same_numbers_as_torch_averaged_model(kwargs):
    """A torch.optim.swa_utils script gives the same averages after switching the import.

    torch's own CPU path computes ``a + (p - a) / (n + 1)`` per tensor where swalab uses one
    lerp pass, so the default agrees to float rounding; user-supplied functions agree exactly.
    """
    model = small_model()
    ours, theirs = swalab.AveragedModel(model, **kwargs), swa_utils.AveragedModel(model, **kwargs)
    for seed in range(10):
        perturb(model, seed, with_buffers=kwargs.get("use_buffers", False))
        ours.update_parameters(model)
        theirs.update_parameters(model)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    exact = bool(kwargs) and not kwargs.get("use_buffers")
    for key, value in ours.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if exact:
            assert torch.equal(value, theirs.state_dict()[key]), key
        else:
            torch.testing.assert_close(value, theirs.state_dict()[key], rtol=1e-6, atol=1e-7)
    x = torch.randn(4, 3)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_fp32_average_of_bf16_model_keeps_moving():
    """Increments below half a bf16 ulp vanish in a bf16 average but not in an fp32 one."""
    model = nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(256.0)  # bf16 spacing at 256 is 2
    in_bf16 = swalab.AveragedModel(model)
    in_fp32 = swalab.AveragedModel(model, dtype=torch.float32)
    in_bf16.update_parameters(model), in_fp32.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(258.0)
    n = 200
    for _ in range(n - 1):
        in_bf16.update_parameters(model), in_fp32.update_parameters(model)
    exact = (256.0 + 258.0 * (n - 1)) / n
    assert in_fp32.module.weight.dtype == torch.float32
    assert in_fp32.module.weight.item() == pytest.approx(exact, abs=1e-3)
    assert abs(in_bf16.module.weight.item() - exact) > 1.0  # stuck far below


def test_average_on_another_device_and_dtype_keeps_integer_buffers():
    model = small_model()
    averaged = swalab.AveragedModel(model, device="cpu", dtype=torch.float64)
    perturb(model, 3)
    averaged.update_parameters(model)
    assert averaged.module[0].weight.dtype == torch.float64
    assert averaged.module[1].num_batches_tracked.dtype == torch.long
    torch.testing.assert_close(averaged.module[0].weight, model[0].weight.double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_average_of_cuda_model():
    model = small_model().cuda()
    averaged = swalab.AveragedModel(model, device="cpu")
    for seed in range(3):
        perturb(model, seed)
        averaged.update_parameters(model)
    assert averaged.module[0].weight.device.type == "cpu"


def test_mismatched_model_raises_and_leaves_average_untouched():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    before = copy.deepcopy(averaged.state_dict())
    wrong_shape = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"3\.weight has shape \(3, 5\)"):
        averaged.update_parameters(wrong_shape)
    with pytest.raises(ValueError, match="model has 2 parameters, the averaged model has 6"):
        averaged.update_parameters(nn.Linear(3, 5))
    for key, value in averaged.state_dict().items():
        assert torch.equal(value, before[key])
    assert averaged.count == 1


def test_torch_compile_wrapper_is_unwrapped():
    model = small_model()
    compiled = torch.compile(model)  # compiles lazily: never called here
    averaged = swalab.AveragedModel(compiled)
    assert not any("_orig_mod" in k for k in averaged.state_dict())
    perturb(model, 1)
    averaged.update_parameters(compiled)
    torch.testing.assert_close(averaged.module[0].weight, model[0].weight)
    # a state_dict saved from an AveragedModel built on the wrapper by torch loads too
    theirs = swa_utils.AveragedModel(compiled)
    theirs.update_parameters(compiled)
    assert any("_orig_mod" in k for k in theirs.state_dict())
    fresh = swalab.AveragedModel(model)
    fresh.load_state_dict(theirs.state_dict())
    assert fresh.count == 1


def test_state_dict_round_trip_resumes_exactly():
    model = small_model()
    averaged = swalab.AveragedModel(model, rule=swalab.EMA(0.9, warmup_gamma=1.0))
    for seed in range(3):
        perturb(model, seed)
        averaged.update_parameters(model)
    resumed = swalab.AveragedModel(small_model(), rule=swalab.EMA(0.9, warmup_gamma=1.0))
    resumed.load_state_dict(averaged.state_dict())
    assert resumed.count == 3
    for seed in range(3, 6):
        perturb(model, seed)
        averaged.update_parameters(model)
        resumed.update_parameters(model)
    for key, value in averaged.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_pickle_and_deepcopy_keep_count_and_link_state_to_module():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    for seed in range(2):
        perturb(model, seed)
        averaged.update_parameters(model)
    for clone in (pickle.loads(pickle.dumps(averaged)), copy.deepcopy(averaged)):
        assert clone.count == 2
        perturb(model, 9)
        clone.update_parameters(model)
        expected = (flat(averaged.module.parameters()) * 2 + flat(model.parameters())) / 3
        torch.testing.assert_close(flat(clone.module.parameters()), expected, rtol=1e-6, atol=1e-6)


def test_swapped_into_evaluates_average_in_live_model_and_restores_it():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    for seed in range(3):
        perturb(model, seed, with_buffers=True)
        averaged.update_parameters(model)
    perturb(model, 42, with_buffers=True)
    live_before = copy.deepcopy(model.state_dict())
    avg_before = copy.deepcopy(averaged.state_dict())
    x = torch.randn(8, 3)
    model.eval(), averaged.eval()
    expected = averaged(x)
    with averaged.swapped_into(model) as m:
        torch.testing.assert_close(m(x), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, live_before[key])
    for key, value in averaged.state_dict().items():
        assert torch.equal(value, avg_before[key])


def test_swapped_into_with_other_dtype_copies_and_restores():
    model = small_model()
    averaged = swalab.AveragedModel(model, dtype=torch.float64)
    perturb(model, 1)
    averaged.update_parameters(model)
    perturb(model, 2)
    before = copy.deepcopy(model.state_dict())
    with averaged.swapped_into(model):
        torch.testing.assert_close(model[0].weight, averaged.module[0].weight.float())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_restart_from_average_resets_model_optimizer_and_count():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    averaged = swalab.AveragedModel(model)
    for seed in range(3):
        perturb(model, seed)
        averaged.update_parameters(model)
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    assert optimizer.state
    swalab.restart_from_average(averaged, model, optimizer)
    assert not optimizer.state and averaged.count == 0 and int(averaged.n_averaged) == 0
    torch.testing.assert_close(flat(model.parameters()), flat(averaged.module.parameters()))


def test_functional_rule_init_on_other_dtype():
    params = [torch.ones(2, dtype=torch.bfloat16), torch.tensor([3])]
    state = swalab.SWA().init(params, dtype=torch.float32)
    assert isinstance(state, AverageState) and state.count == 0
    assert state.average[0].dtype == torch.float32 and state.average[1].dtype == torch.long


def test_rejects_conflicting_arguments():
    with pytest.raises(ValueError, match="at most one"):
        swalab.AveragedModel(small_model(), multi_avg_fn=swa_utils.get_swa_multi_avg_fn(), rule=swalab.SWA())
    with pytest.raises(ValueError, match="floating dtype"):
        swalab.AveragedModel(small_model(), dtype=torch.int32)


def test_update_every_and_after_gate_steps_and_warmup_counts_averaged_models():
    """EMA every k steps from step s (timm/ema-pytorch/Lightning options): an oracle on a scalar."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = swalab.AveragedModel(model, rule=swalab.EMA(0.5, warmup_gamma=1.0, warmup_power=1.0),
                               update_every=3, update_after=2)
    expected, count = None, 0
    for step in range(10):
        with torch.no_grad():
            model.weight.fill_(float(step))
        averaged = ema.update_parameters(model, step=step)
        assert averaged == (step >= 2 and (step - 2) % 3 == 0)
        if averaged:  # decay_t = min(0.5, 1 - 1/(1 + t)) for the t-th averaged model; t = 0 copies
            decay = min(0.5, 1 - 1 / (1 + count))
            expected = float(step) if count == 0 else decay * expected + (1 - decay) * step
            count += 1
    assert ema.n_averaged.item() == count == 3  # steps 2, 5, 8
    assert ema.module.weight.item() == pytest.approx(expected)
    calls = swalab.AveragedModel(model, update_every=2)  # without step: the object's own call count
    assert [calls.update_parameters(model) for _ in range(4)] == [True, False, True, False]


@pytest.mark.parametrize("kwargs", [{"update_every": 0}, {"update_every": 1.5}, {"update_after": -1}])
def test_update_gating_options_are_checked(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        swalab.AveragedModel(torch.nn.Linear(1, 1), **kwargs)
