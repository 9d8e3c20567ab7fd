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
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_buffers": True},
        {"rule": swalab.EMA(0.9)},
        {"use_buffers": True, "multi_avg_fn": swa_utils.get_swa_multi_avg_fn()},
    ],
)
@pytest.mark.parametrize("device", ["cpu", None])
def test_cuda_model_averaged_on_cpu_or_gpu_equals_the_cpu_average(kwargs, device):
    """The pinned, chunked copy path (device="cpu") and the on-GPU path give the CPU numbers; a BN
    model with use_buffers=True works on CUDA (torch's multi-tensor SWA rule fails there)."""
    model = small_model()
    gpu_model = copy.deepcopy(model).cuda()
    reference = swalab.AveragedModel(model, **kwargs)
    averaged = swalab.AveragedModel(gpu_model, device=device, **kwargs)
    for seed in range(4):
        perturb(model, seed, with_buffers=True)
        gpu_model.load_state_dict(model.state_dict())
        reference.update_parameters(model)
        averaged.update_parameters(gpu_model)
    assert averaged.module[0].weight.device.type == ("cpu" if device == "cpu" else "cuda")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(averaged.state_dict()[key].cpu(), value, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_model_averaged_on_cpu_through_several_chunks():
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 3000)).cuda()  # 16 MB: two chunks
    averaged = swalab.AveragedModel(model, device="cpu")
    snapshots = []
    for seed in range(3):
        perturb(model, seed)
        snapshots.append(flat(model.parameters()).cpu())
        averaged.update_parameters(model)
    assert len(averaged._pairing.averaged.staged[0][0].ranges) >= 2
    torch.testing.assert_close(flat(averaged.module.parameters()), torch.stack(snapshots).mean(0))


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


def test_swapped_into_refuses_another_model_naming_the_tensor_before_anything_moves():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    other = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    before, other_before = snapshot(averaged), copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"^3\.weight has shape \(3, 5\), the averaged model has"):
        with averaged.swapped_into(other):
            pass
    assert_unchanged(averaged, before)
    for key, value in other.state_dict().items():
        assert torch.equal(value, other_before[key]), key


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
        swalab.AveragedModel(
            small_model(), multi_avg_fn=swa_utils.get_swa_multi_avg_fn(), rule=swalab.SWA()
        )
    with pytest.raises(ValueError, match="floating dtype"):
        swalab.AveragedModel(small_model(), dtype=torch.int32)


def test_update_every_and_after_gate_steps_and_warmup_counts_averaged_models():
    """EMA every k steps from step s (timm/ema-pytorch/Lightning options): an oracle on a scalar."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = swalab.AveragedModel(
        model,
        rule=swalab.EMA(0.5, warmup_gamma=1.0, warmup_power=1.0),
        update_every=3,
        update_after=2,
    )
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


@pytest.mark.parametrize(
    "kwargs", [{"update_every": 0}, {"update_every": 1.5}, {"update_after": -1}]
)
def test_update_gating_options_are_checked(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        swalab.AveragedModel(torch.nn.Linear(1, 1), **kwargs)


def snapshot(averaged) -> dict:
    return {k: v.clone() for k, v in averaged.state_dict().items()} | {"count": averaged.count}


def assert_unchanged(averaged, before) -> None:
    assert averaged.count == before["count"]
    for key, value in averaged.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("fn", ["multi_swa", "multi_ema", "single_swa"])
def test_user_function_on_bn_model_with_buffers_copies_integer_buffers(fn, use_buffers):
    """Issue 14, finding 4: torch's multi-tensor SWA rule on num_batches_tracked raised after the
    float tensors were written; integer buffers are copied and never passed to the user function."""
    kwargs = {
        "multi_swa": {"multi_avg_fn": swa_utils.get_swa_multi_avg_fn()},
        "multi_ema": {"multi_avg_fn": swa_utils.get_ema_multi_avg_fn(0.5)},
        "single_swa": {"avg_fn": swa_utils.get_swa_avg_fn()},
    }[fn]
    model = small_model()
    averaged = swalab.AveragedModel(model, use_buffers=use_buffers, **kwargs)
    reference = swalab.AveragedModel(
        model, use_buffers=use_buffers, rule=swalab.EMA(0.5) if fn == "multi_ema" else swalab.SWA()
    )
    for seed in range(1, 5):
        perturb(model, seed, with_buffers=True)
        averaged.update_parameters(model)
        reference.update_parameters(model)
    assert int(averaged.module[1].num_batches_tracked) == 4  # copied from the last model
    for key, value in averaged.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[key], rtol=1e-6, atol=1e-6)


def test_failing_user_function_leaves_average_and_count_unchanged():
    calls = []

    def writes_then_fails(avg_list, param_list, n):
        calls.append(len(avg_list))
        avg_list[0].add_(1.0)  # writes before it fails: rolled back
        raise RuntimeError("boom")

    model = small_model()
    averaged = swalab.AveragedModel(model, multi_avg_fn=writes_then_fails)
    averaged.update_parameters(model)  # the first update copies without calling the function
    perturb(model, 1)
    before = snapshot(averaged)
    with pytest.raises(RuntimeError, match="boom"):
        averaged.update_parameters(model)
    assert calls == [6]
    assert_unchanged(averaged, before)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
        ),
    ],
)
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("which", ["avg_fn", "multi_avg_fn"])
def test_user_function_failing_on_kth_tensor_is_all_or_nothing(which, k, error, device):
    """A function that raises on the k-th real tensor, after writing the first k - 1 (and passing
    any one-element trial), leaves state_dict() bit-identical; the next update equals torch's."""
    swa = swa_utils.get_swa_avg_fn()
    seen, failing = [], [True]

    def avg_fn(a, t, n):
        seen.append(a.numel())
        if failing[0] and sum(size > 1 for size in seen) == k:
            raise error("tensor k")
        return swa(a, t, n)

    def multi_avg_fn(avg_list, param_list, n):
        for a, t in zip(avg_list, param_list):
            a.copy_(avg_fn(a, t, n))

    fn = {"avg_fn": avg_fn, "multi_avg_fn": multi_avg_fn}[which]
    model = small_model().to(device)
    averaged = swalab.AveragedModel(model, **{which: fn})
    reference = swa_utils.AveragedModel(model, avg_fn=swa)
    averaged.update_parameters(model)
    reference.update_parameters(model)
    perturb(model, 1, with_buffers=True)  # the copied buffers must not be written either
    before = snapshot(averaged)
    with pytest.raises(error, match="tensor k"):
        averaged.update_parameters(model)
    assert_unchanged(averaged, before)
    failing[0] = False
    perturb(model, 2, with_buffers=True)
    averaged.update_parameters(model)
    reference.update_parameters(model)
    assert averaged.count == 2
    for key, value in reference.state_dict().items():
        assert torch.equal(averaged.state_dict()[key], value), key
    failing[0], seen[:] = True, []  # fails again: put back to this average, not the first one
    perturb(model, 3, with_buffers=True)
    before = snapshot(averaged)
    with pytest.raises(error, match="tensor k"):
        averaged.update_parameters(model)
    assert_unchanged(averaged, before)


@pytest.mark.parametrize("get_fn", [swa_utils.get_ema_multi_avg_fn, swa_utils.get_swa_multi_avg_fn])
def test_torchs_own_multi_tensor_function_on_one_group_needs_no_copy_aside(get_fn):
    """One ``_foreach_lerp_`` call writes a group all or nothing: no copy is made (or kept) for
    torch's own functions on one (device, dtype) group; the same function wrapped by the user is
    copied aside; both equal torch's AveragedModel bit for bit."""
    fn = get_fn(0.9) if get_fn is swa_utils.get_ema_multi_avg_fn else get_fn()

    def wrapped(avg_list, param_list, n):
        fn(avg_list, param_list, n)

    model = small_model()
    ours = {f: swalab.AveragedModel(model, multi_avg_fn=f) for f in (fn, wrapped)}
    reference = swa_utils.AveragedModel(model, multi_avg_fn=fn)
    for step in range(3):
        perturb(model, step)
        reference.update_parameters(model)
        for averaged in ours.values():
            averaged.update_parameters(model)
    assert ours[fn]._pairing.saved is None and ours[wrapped]._pairing.saved is not None
    for averaged in ours.values():
        for key, value in reference.module.state_dict().items():
            assert torch.equal(averaged.module.state_dict()[key], value), key


def test_user_function_failing_on_a_later_group_rolls_back_the_earlier_ones():
    """Groups are called one by one (per dtype, like torch): a failure in the float64 group leaves
    the float32 group, already updated, as it was (even for a function that passes a one-element
    trial)."""
    dtypes = []

    def multi_avg_fn(avg_list, param_list, n):
        dtypes.append(avg_list[0].dtype)
        if avg_list[0].dtype == torch.float64 and avg_list[0].numel() > 1:  # not on a trial
            raise RuntimeError("float64 refused")
        torch._foreach_lerp_(avg_list, param_list, 0.5)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    averaged = swalab.AveragedModel(model, multi_avg_fn=multi_avg_fn)
    averaged.update_parameters(model)
    perturb(model, 1)
    before = snapshot(averaged)
    with pytest.raises(RuntimeError, match="float64 refused"):
        averaged.update_parameters(model)
    assert dtypes[-2:] == [torch.float32, torch.float64]
    assert_unchanged(averaged, before)


def test_buffer_of_another_shape_is_refused_before_parameters_are_written():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    perturb(model, 1)
    model[1].register_buffer("running_mean", torch.zeros(7))
    before = snapshot(averaged)
    with pytest.raises(
        ValueError, match=r"1\.running_mean has shape \(7,\), the averaged model has \(5,\)"
    ):
        averaged.update_parameters(model)
    assert_unchanged(averaged, before)


@pytest.mark.parametrize("use_buffers", [False, True])
def test_model_missing_the_averages_buffers_is_refused(use_buffers):
    model = small_model()
    averaged = swalab.AveragedModel(model, use_buffers=use_buffers)
    averaged.update_parameters(model)
    no_stats = small_model()
    no_stats[1] = nn.BatchNorm1d(5, track_running_stats=False)
    before = snapshot(averaged)
    with pytest.raises(ValueError, match="model has 0 buffers, the averaged model has 3"):
        averaged.update_parameters(no_stats)
    assert_unchanged(averaged, before)


def test_integer_tensor_where_a_float_one_was_is_refused():
    model = small_model()
    averaged = swalab.AveragedModel(model, use_buffers=True)
    averaged.update_parameters(model)
    model[1].running_var = torch.ones(5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"1\.running_var is torch\.int64"):
        averaged.update_parameters(model)


def test_replaced_submodule_is_rebound_never_averaged_against_stale_tensors():
    """Issue 9: the bound tensors are checked cheaply; a new nn.Linear in a submodule is noticed."""
    model = small_model()
    averaged = swalab.AveragedModel(model)
    perturb(model, 1)
    averaged.update_parameters(model)
    first = model[3].weight.detach().clone()
    model[3] = nn.Linear(5, 2)  # same shapes: re-bound to the new tensors
    with torch.no_grad():
        model[3].weight.fill_(3.0)
    averaged.update_parameters(model)
    torch.testing.assert_close(averaged.module[3].weight, (first + 3.0) / 2)
    model[3] = nn.Linear(5, 4)  # another shape: refused, naming the tensor
    before = snapshot(averaged)
    with pytest.raises(ValueError, match=r"3\.weight has shape \(4, 5\)"):
        averaged.update_parameters(model)
    assert_unchanged(averaged, before)


def test_model_moved_to_another_dtype_is_rebound_and_cast():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    perturb(model, 1)
    averaged.update_parameters(model)
    first = averaged.module[0].weight.clone()
    model.to(torch.float64)  # same Parameter objects, new storage (param.data = ...)
    with torch.no_grad():
        model[0].weight.fill_(2.0)
    averaged.update_parameters(model)
    assert averaged.module[0].weight.dtype == torch.float32
    torch.testing.assert_close(averaged.module[0].weight, (first + 2.0) / 2)


def test_parameter_data_reassigned_is_noticed():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    model[0].weight.data = torch.full((5, 3), 4.0)
    averaged.update_parameters(model)
    torch.testing.assert_close(averaged.module[0].weight, (small_model()[0].weight + 4.0) / 2)
    model[0].weight.data = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"0\.weight has shape \(3, 5\)"):
        averaged.update_parameters(model)


def test_binding_is_reused_and_dropped_by_load_state_dict_and_to():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    pairing = averaged._pairing
    averaged.update_parameters(model)
    assert averaged._pairing is pairing  # the cheap check passed: nothing looked up again
    averaged.load_state_dict(averaged.state_dict())
    assert averaged._pairing is None
    averaged.update_parameters(model)
    averaged.to(torch.float64)
    assert averaged._pairing is None
    averaged.update_parameters(model)
    assert averaged.module[0].weight.dtype == torch.float64 and averaged.count == 4


def test_n_averaged_is_a_correct_buffer_without_a_kernel_per_update():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    buffer = averaged._buffers["n_averaged"]
    for _ in range(3):
        averaged.update_parameters(model)
    assert buffer._version == 0  # not written by the updates
    assert averaged.state_dict()["n_averaged"].item() == 3 and averaged.n_averaged.item() == 3
    averaged.reset()
    assert averaged.n_averaged.item() == 0 and averaged.state_dict()["n_averaged"].item() == 0


def test_restart_from_average_checks_shapes_before_writing():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    bigger = nn.Sequential(
        nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2), nn.Linear(2, 2)
    )
    optimizer = torch.optim.SGD(bigger.parameters(), lr=0.1)
    before = copy.deepcopy(bigger.state_dict())
    with pytest.raises(ValueError, match="model has 8 parameters, the averaged model has 6"):
        swalab.restart_from_average(averaged, bigger, optimizer)
    wider = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"0\.weight has shape \(6, 3\)"):
        swalab.restart_from_average(averaged, wider, torch.optim.SGD(wider.parameters(), lr=0.1))
    assert all(torch.equal(v, before[k]) for k, v in bigger.state_dict().items())
    assert averaged.count == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": float("nan")},
        {"decay": float("inf")},
        {"warmup_gamma": float("nan")},
        {"warmup_gamma": float("inf")},
        {"warmup_power": float("nan")},
        {"warmup_power": float("inf")},
        {"decay": True},
        {"decay": "0.9"},
    ],
)
def test_ema_refuses_non_finite_or_non_numeric_hyperparameters(kwargs):
    """Issue 14, finding 7: EMA(warmup_gamma=nan) was accepted."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        swalab.EMA(**kwargs)


@pytest.mark.parametrize("chunk_bytes", [4, 12, 40, 1 << 20])
def test_host_staging_chunks_cover_every_element_once(chunk_bytes):
    """The chunked copy path (run CPU to CPU here): chunks tile the sources, in order."""
    from swalab.averaging import HostStaging

    sources = [
        torch.arange(n, dtype=torch.float32) + 100 * i for i, n in enumerate([3, 1, 7, 0, 5])
    ]
    staging = HostStaging([s for s in sources if s.numel()], chunk_bytes=chunk_bytes)
    seen = []
    staging.run(lambda k, chunk: seen.append((staging.ranges[k], chunk.clone())))
    assert [r for r, _ in seen] == staging.ranges
    assert all(e - s <= max(1, chunk_bytes // 4) for s, e in staging.ranges)
    torch.testing.assert_close(torch.cat([c for _, c in seen]), torch.cat(sources))


def test_staged_group_lerps_chunk_by_chunk_like_one_pass():
    """The GPU-to-CPU path's bookkeeping, run CPU to CPU: chunks split tensors, casts, lerps."""
    from swalab.averaging import _Groups

    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(s, generator=g) for s in [(4, 3), (5,), (2, 2, 2)]]
    average = [torch.randn(s.shape, generator=g, dtype=torch.float64) for s in sources]
    expected = [a + 0.25 * (s.double() - a) for a, s in zip(average, sources)]
    groups = _Groups(list(zip(average, sources)), chunk_bytes=28)  # 7 floats: chunks split tensors
    assert len(groups.cast) == 1 and not groups.staged  # same device: cast per update
    groups._add_staged(
        *groups.cast.pop(), torch.float64
    )  # what a GPU model averaged on the CPU gets
    assert len(groups.staged[0][0].ranges) == 4
    groups.apply(0.25)
    for a, e in zip(average, expected):
        torch.testing.assert_close(a, e)
    groups.apply(1.0)
    for a, s in zip(average, sources):
        assert torch.equal(a, s.double())


def test_average_lives_in_one_flat_buffer_and_a_flat_model_is_one_op():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    storages = {p.untyped_storage().data_ptr() for p in averaged.module.parameters()}
    assert len(storages) == 1  # parameters then float buffers of one dtype: one buffer
    flat_model = swalab.AveragedModel(
        model
    ).module  # itself a model whose parameters are one buffer
    twice = swalab.AveragedModel(flat_model)
    snapshots = []
    for seed in range(3):
        perturb(flat_model, seed)
        snapshots.append(flat(flat_model.parameters()))
        twice.update_parameters(flat_model)
        averaged.update_parameters(flat_model)
    assert len(twice._pairing.averaged.direct[0][0]) == 1  # one lerp over the flat views
    expected = torch.stack(snapshots).mean(0)
    for result in (twice, averaged):
        torch.testing.assert_close(flat(result.module.parameters()), expected, rtol=1e-6, atol=1e-6)


def test_updates_after_swapped_into_pair_the_right_tensors():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    perturb(model, 1)
    averaged.update_parameters(model)
    first = flat(model.parameters())
    with averaged.swapped_into(model):
        pass
    perturb(model, 2)
    averaged.update_parameters(model)
    torch.testing.assert_close(
        flat(averaged.module.parameters()), (first + flat(model.parameters())) / 2
    )


def test_host_staging_of_empty_tensors_does_nothing():
    from swalab.averaging import HostStaging

    staging = HostStaging([torch.zeros(0), torch.zeros(0, 3)])
    calls = []
    staging.run(lambda k, chunk: calls.append(k))
    assert staging.ranges == [] and calls == []


def test_host_staging_device_branch_double_buffers_in_order():
    """The GPU branch (gather on the device, copy to the host, wait on the slot's event), run on
    CPU tensors with the events replaced by a log: chunk k + 1 is issued before chunk k is used."""
    from swalab.averaging import HostStaging

    sources = [torch.arange(10.0), torch.arange(10.0, 13.0), torch.arange(13.0, 30.0)]
    staging = HostStaging(sources, chunk_bytes=24)  # 6 floats a chunk: 5 chunks
    log = []

    class Event:
        def __init__(self, slot):
            self.slot = slot

        def synchronize(self):
            log.append(("wait", self.slot))

    size = staging._host[0].numel()
    staging.on_host = False
    staging._device = [torch.empty(size), torch.empty(size)]
    staging._events = [Event(0), Event(1)]
    staging._record = lambda slot: log.append(("copied", slot))
    chunks = []
    staging.run(lambda k, chunk: (log.append(("use", k)), chunks.append(chunk.clone())))
    assert torch.equal(torch.cat(chunks), torch.arange(30.0))
    assert log[:5] == [("copied", 0), ("copied", 1), ("wait", 0), ("use", 0), ("copied", 0)]
    assert log[-2:] == [("wait", 0), ("use", 4)]


def test_inner_module_moved_to_another_dtype_is_paired_again():
    model = small_model()
    averaged = swalab.AveragedModel(model)
    perturb(model, 1)
    averaged.update_parameters(model)
    averaged.module.to(
        torch.float64
    )  # the inner module's own to(): AveragedModel._apply is not called
    perturb(model, 2)
    averaged.update_parameters(model)
    assert averaged.module[0].weight.dtype == torch.float64
    first = copy.deepcopy(model)
    perturb(first, 1)
    torch.testing.assert_close(
        averaged.module[0].weight, (first[0].weight.double() + model[0].weight.double()) / 2
    )
