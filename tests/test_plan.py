"""``swalab plan``: the epochs per seed with and without shared trajectories, checked against
epochs counted by hand from the schedules; the step timing only for its shape."""

import pytest
import torch

from swalab.cli import main
from swalab.lab.config import load_config
from swalab.lab.plan import plan_experiment
from swalab.lab.rundir import RunDirectory

# B = 10 epochs, 300 samples at batch 100: 3 steps per epoch. SGD's reference schedule keeps lr
# while epoch / 10 <= 0.5 (epochs 0..5); SWA's (swa_start 5) while epoch / 5 <= 0.5 (epochs
# 0..2). So SGD and SWA train epochs 0..2 together and part at epoch 3; SWA at 1B (10 epochs) is
# the first 10 of SWA at 1.5B (15). Shared: 3 + (10 - 3) + (15 - 3) = 22 epochs; separate:
# 10 + 10 + 15 = 35.
TINY = [
    "train.epochs=10",
    "data.train_size=300",
    "train.batch_size=100",
    "seeds=[0, 1]",
    "methods=[{method: sgd}, {method: swa, options: {swa_start: 5, swa_lr: 0.05}}, "
    "{method: swa, budget: 1.5, options: {swa_start: 5, swa_lr: 0.05}}]",
]


def tiny(*more):
    return load_config("mnist1d", [*TINY, *more])


def test_epochs_with_and_without_sharing_counted_by_hand(tmp_path):
    plan = plan_experiment(tiny(), tmp_path / "none", torch.device("cpu"), repeats=2)
    assert plan.steps_per_epoch == 3
    assert [(s.seed, s.runs, s.shared, s.separate) for s in plan.seeds] == [
        (0, 3, 22, 35),
        (1, 3, 22, 35),
    ]
    assert plan.step_seconds > 0 and 1 <= plan.timed_steps <= 2
    assert plan.seconds(22) == pytest.approx(22 * 3 * plan.step_seconds)


def test_resumed_and_finished_runs_in_the_run_directory(tmp_path):
    layout = RunDirectory(tmp_path)
    layout.run("sgd", 0).save_checkpoint({"epoch": 4})  # 5 epochs trained
    layout.run("swa", 1).write_result({"method": "swa", "status": "done"})  # finished
    layout.run("sgd", 2).mark_diverged("loss became nan")  # not retried
    plan = plan_experiment(tiny("seeds=[0, 1, 2]"), tmp_path, torch.device("cpu"), repeats=1)
    # seed 0: SGD resumes alone at epoch 5 (5 left); SWA 1B inside 1.5B: 15. Separate: 5 + 10 + 15.
    # seed 1: SGD and SWA 1.5B share epochs 0..2: 3 + 7 + 12. Separate: 10 + 15.
    # seed 2: SWA 1B inside 1.5B: 15. Separate: 10 + 15.
    assert [(s.seed, s.runs, s.shared, s.separate) for s in plan.seeds] == [
        (0, 3, 20, 30),
        (1, 2, 22, 25),
        (2, 2, 15, 25),
    ]


def test_cli_prints_the_plan_with_pre_training(tmp_path, capsys):
    argv = ["plan", "mnist1d", "--out", str(tmp_path / "x"), "--repeats", "1", "--device", "cpu"]
    args = [a for s in [*TINY, "pretrain.epochs=2"] for a in ("--set", s)]
    assert main([*argv, *args]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "all"))]
    assert [r[:4] for r in rows] == [["0", "3", "24", "37"], ["all", "6", "48", "74"]]
    assert "3 steps per epoch" in out and "mnist1d_cnn (fp32) on cpu" in out
    assert not (tmp_path / "x").exists()  # nothing written


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["plan", "mnist1d", "--variant", "gpu"], "has no variant 'gpu'"),
        (["plan", "mnist1d", "--device", "cuda:3"], "--device 'cuda:3' does not exist"),
        (["plan", "mnist1d", "--device", "tpu"], "--device must be auto, cpu"),
        (["plan", "mnist1d", "--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["plan", "cluster-gcn"], "task 'node_classification'"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys):
    if "cuda:3" in argv and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_table1_gpu_variant_plans_the_issue_epochs():
    """Issue 10: a Table 1 preset trains 419 instead of 950 epochs per seed with sharing (B = 200,
    swa_start 161), planned without the data."""
    from swalab.data.base import num_batches
    from swalab.lab.inputs import data_shape
    from swalab.lab.runner import plan_runs
    from swalab.lab.sharing import trained_epochs

    cfg = load_config("cifar10-wrn28x10", variant="gpu")
    shape = data_shape(cfg)  # no CIFAR file on this machine: the declared shape
    steps = num_batches(shape.train, cfg.train.batch_size)
    assert (shape.train, shape.in_shape, shape.num_outputs, steps) == (50_000, (3, 32, 32), 10, 391)
    todo = [(0, m) for m in cfg.methods]
    for share, epochs in ((True, 419), (False, 950)):
        plans = plan_runs(cfg, todo, RunDirectory("/nonexistent"), steps, share)
        assert trained_epochs(plans[0]) == epochs


def test_step_timing_stops_at_its_budget():
    from swalab.lab.inputs import data_shape
    from swalab.lab.plan import step_seconds

    cfg, cpu = tiny(), torch.device("cpu")
    shape = data_shape(cfg)
    seconds, timed = step_seconds(cfg, shape, cpu, repeats=3, budget=0.0)
    assert seconds > 0 and timed == 0  # the warm-up step alone took the budget: it is the estimate
    assert step_seconds(cfg, shape, cpu, repeats=3, warmup=0, budget=0.0)[1] == 1
    assert step_seconds(cfg, shape, cpu, repeats=3, budget=1e9)[1] == 3
