"""Issue 23, class 1: scripts that switch ``torch.optim.swa_utils`` for swalab keep working.

Each test runs the same script with torch's ``AveragedModel`` and swalab's and compares the numbers.
"""

import pytest
import torch
from torch import nn
from torch.optim import swa_utils

import swalab


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        for b in model.buffers():
            if b.is_floating_point():
                b.mul_(1.5).add_(0.1)
            else:
                b.add_(1)


def assert_same_average(ours, theirs, integers: bool = True) -> None:
    """Same state_dict; ``integers=False``: integer buffers aside (torch passes them to a user
    ``avg_fn`` with ``use_buffers=True``, swalab copies them: documented)."""
    mine, torchs = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(torchs)
    for key in mine:
        if integers or mine[key].is_floating_point() or key == "n_averaged":
            torch.testing.assert_close(mine[key], torchs[key], msg=key)


def ema_class(base):
    """torchvision's references/classification/utils.py ExponentialMovingAverage, on ``base``."""

    class ExponentialMovingAverage(base):
        def __init__(self, model, decay, device="cpu"):
            def ema_avg(avg_model_param, model_param, num_averaged):
                return decay * avg_model_param + (1 - decay) * model_param

            super().__init__(model, device, ema_avg, use_buffers=True)

    return ExponentialMovingAverage


def test_torchvision_reference_ema_warmup_gives_torchs_numbers():
    """The recipe resets the count after each update during warm-up so the EMA copies the model."""
    model = small_model()
    ours, theirs = (
        ema_class(swalab.AveragedModel)(model, 0.9),
        ema_class(swa_utils.AveragedModel)(model, 0.9),
    )
    warmup_steps = 4
    for step in range(10):
        perturb(model, step)
        for model_ema in (ours, theirs):
            model_ema.update_parameters(model)
            if step < warmup_steps:
                model_ema.n_averaged.fill_(
                    0
                )  # "Reset ema buffer to keep copying weights during warmup"
        if step < warmup_steps:  # the average is the model, as torch's is
            for a, p in zip(ours.module.parameters(), model.parameters()):
                torch.testing.assert_close(a, p, rtol=0, atol=0)
        assert_same_average(ours, theirs, integers=False)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 6 == ours.count


@pytest.mark.parametrize(
    "write",
    [
        lambda m: m.n_averaged.zero_(),
        lambda m: m.n_averaged.fill_(0),
        lambda m: m.n_averaged.add_(3),
        lambda m: m.n_averaged.__iadd__(2),
        lambda m: setattr(m, "n_averaged", torch.tensor(1, dtype=torch.long)),
        lambda m: m.n_averaged.copy_(torch.tensor(7)),
    ],
    ids=["zero_", "fill_", "add_", "+=", "assignment", "copy_"],
)
def test_writes_to_n_averaged_act_as_on_torchs_buffer(write):
    model = small_model()
    ours, theirs = swalab.AveragedModel(model), swa_utils.AveragedModel(model)
    for step in range(6):
        perturb(model, step)
        for averaged in (ours, theirs):
            averaged.update_parameters(model)
            if step == 2:
                write(averaged)
        assert int(ours.n_averaged) == int(theirs.n_averaged) == ours.count
        assert_same_average(ours, theirs)


def test_n_averaged_reads_like_a_buffer_between_updates():
    model = small_model()
    ours = swalab.AveragedModel(model)
    held = ours.n_averaged  # a reference kept by the caller
    for _ in range(3):
        ours.update_parameters(model)
    assert int(held) == 3 and dict(ours.named_buffers())["n_averaged"].item() == 3
    ours.reset()
    assert int(held) == 0 and ours.state_dict()["n_averaged"].item() == 0


def test_restoring_an_average_by_hand_then_updating_keeps_it():
    """load_state_dict of the averaged model, then fill_: the next update folds into it."""
    model = small_model()
    ours, theirs = swalab.AveragedModel(model), swa_utils.AveragedModel(model)
    for step in range(3):
        perturb(model, step)
        ours.update_parameters(model)
        theirs.update_parameters(model)
    saved = {k: v.clone() for k, v in theirs.state_dict().items()}
    for averaged in (ours, theirs):
        averaged.update_parameters(model)  # moves on, then is restored by hand
        averaged.load_state_dict(saved)
        averaged.n_averaged.fill_(2)
        perturb(model, 9)
    ours.update_parameters(model)
    theirs.update_parameters(model)
    assert int(ours.n_averaged) == 3 and ours.count == 3
    assert_same_average(ours, theirs)


def test_replacing_tensors_inside_the_average_rebinds():
    """avg.module.load_state_dict(sd, assign=True) and avg.module[i] = layer are averaged into."""
    model = small_model()
    ours, theirs = swalab.AveragedModel(model), swa_utils.AveragedModel(model)
    for averaged in (ours, theirs):
        averaged.update_parameters(model)
    perturb(model, 1)
    state = {k: v.clone() + 1 for k, v in theirs.module.state_dict().items()}
    for averaged in (ours, theirs):
        averaged.module.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        averaged.update_parameters(model)
    assert_same_average(ours, theirs)
    torch.manual_seed(3)
    layer = nn.Linear(5, 2)
    for averaged in (ours, theirs):
        averaged.module[3] = nn.Linear(5, 2)
        averaged.module[3].load_state_dict(layer.state_dict())
    perturb(model, 2)
    for averaged in (ours, theirs):
        averaged.update_parameters(model)
    assert_same_average(ours, theirs)
    torch.testing.assert_close(ours.module[3].weight, (layer.weight * 2 + model[3].weight) / 3)


def test_swapped_into_swaps_complex_parameters_too():
    model = nn.Linear(2, 2).to(torch.complex64)
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    live = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.mul_(3)
    averaged.update_parameters(model)
    expected = (live + 3 * live) / 2
    with averaged.swapped_into(model) as swapped:
        torch.testing.assert_close(swapped.weight.detach(), expected)
    torch.testing.assert_close(model.weight.detach(), 3 * live)


def test_binding_notices_a_layer_deleted_and_a_parameter_replaced_without_a_full_walk():
    """The module trees are compared after a registration anywhere; a deletion changes a slot's
    size, a new Parameter is a registration."""
    model = small_model()
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    model[0].weight = nn.Parameter(torch.full((5, 3), 2.0))
    averaged.update_parameters(model)
    torch.testing.assert_close(averaged.module[0].weight, (small_model()[0].weight + 2.0) / 2)
    del model[3]
    with pytest.raises(ValueError, match="model has 4 parameters, the averaged model has 6"):
        averaged.update_parameters(model)
    assert averaged.count == 2


def test_the_hot_path_never_reads_n_averaged_from_the_buffer():
    """The count comes from the host mirror unless someone else wrote the buffer."""
    model = small_model()
    averaged = swalab.AveragedModel(model)
    averaged.update_parameters(model)
    calls = []
    original = torch.Tensor.__int__
    torch.Tensor.__int__ = lambda self: calls.append(1) or original(self)
    try:
        for _ in range(3):
            averaged.update_parameters(model)
        assert calls == []
        averaged.n_averaged.fill_(1)
        averaged.update_parameters(model)
        assert len(calls) == 1 and averaged.count == 2
    finally:
        torch.Tensor.__int__ = original
