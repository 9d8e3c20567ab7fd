"""Schedules at named steps against the formulas of REFERENCE.md §1 and §2."""

import math

import pytest
import torch

import swalab
from swalab.schedules import swa_should_average


def test_sgd_reference_schedule():
    lr = swalab.sgd_reference_lr(0.1, epochs=100)
    assert lr(0) == 0.1 and lr(50) == 0.1  # t <= 0.5
    assert lr(70) == pytest.approx(0.1 * (1 - 0.99 * 0.2 / 0.4))  # halfway down the ramp
    assert lr(90) == pytest.approx(0.001) and lr(99) == pytest.approx(0.001)


def test_swa_reference_schedule_vgg16_preset():
    lr = swalab.swa_reference_lr(0.05, swa_start=161, swa_lr=0.01, epochs=300)
    assert lr(0) == 0.05 and lr(80) == 0.05  # 80/161 <= 0.5
    t = 120 / 161
    assert lr(120) == pytest.approx(0.05 * (1 - (1 - 0.2) * (t - 0.5) / 0.4))
    assert lr(145) == pytest.approx(0.01) and lr(299) == pytest.approx(0.01)  # 145/161 > 0.9


def test_cyclic_schedule_algorithm1():
    lr = swalab.cyclic_lr(a1=0.05, a2=0.01, cycle=4)
    # t(i) = (((i - 1) mod c) + 1) / c ; lr = (1 - t) a1 + t a2
    assert lr(1) == pytest.approx(0.75 * 0.05 + 0.25 * 0.01)
    assert lr(4) == pytest.approx(0.01) and lr(8) == pytest.approx(0.01)  # collected here
    assert lr(5) == lr(1)
    with pytest.raises(ValueError, match="1-based"):
        lr(0)


def test_fge_triangular_schedule():
    lr = swalab.fge_lr(a1=0.05, a2=0.01, cycle=2)
    assert lr(0.0) == pytest.approx(0.05)
    assert lr(0.5) == pytest.approx(0.03)  # t = 0.25
    assert lr(1.0) == pytest.approx(0.01)  # t = 0.5: the minimum, mid-cycle
    assert lr(1.5) == pytest.approx(0.03)
    assert lr(2.0) == pytest.approx(0.05)  # next cycle
    assert lr(3.25) == pytest.approx(0.05 * (2 * 0.625 - 1) + 0.01 * (2 - 2 * 0.625))


def test_constant_and_average_every():
    assert swalab.constant_lr(0.02)(1234) == 0.02
    assert [e for e in range(10) if swa_should_average(e, swa_start=4, every=2)] == [3, 5, 7, 9]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: swalab.constant_lr(0.0), "lr must be > 0, got 0.0"),
        (lambda: swalab.sgd_reference_lr(-1, 10), "lr_init must be > 0"),
        (lambda: swalab.sgd_reference_lr(0.1, 0), "epochs must be a positive integer, got 0"),
        (
            lambda: swalab.swa_reference_lr(0.1, 200, 0.05, epochs=150),
            r"swa_start must be <= epochs \(150\), got 200",
        ),
        (lambda: swalab.swa_reference_lr(0.1, 10, 0.0), "swa_lr must be > 0"),
        (lambda: swalab.cyclic_lr(0.1, 0.01, 0), "cycle must be a positive integer"),
        (lambda: swalab.fge_lr(0.1, math.nan, 2), "a2 must be > 0"),
    ],
)
def test_bad_schedule_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_schedule_adapter_writes_param_groups_and_refuses_to_replace_silently():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=1.0)
    scheduler = swalab.ScheduleLR(optimizer, swalab.sgd_reference_lr(0.1, epochs=10))
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[1]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([swalab.sgd_reference_lr(0.1, 10)(e) for e in range(10)])
    state = scheduler.state_dict()
    assert state["last_epoch"] == 10
    with pytest.raises(ValueError, match="already driven by an LR scheduler"):
        swalab.ScheduleLR(optimizer, swalab.constant_lr(0.01))
    swalab.ScheduleLR(optimizer, swalab.constant_lr(0.01), replace=True)
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_swalr_is_torchs():
    assert swalab.SWALR is torch.optim.swa_utils.SWALR
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    scheduler = swalab.SWALR(optimizer, swa_lr=0.05, anneal_epochs=2, anneal_strategy="linear")
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx(
        [0.1, 0.075, 0.05, 0.05]
    )  # linear anneal from 0.1 to swa_lr over 2 epochs
