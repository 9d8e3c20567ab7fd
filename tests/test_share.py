"""Shared trajectories: the epochs several runs of one seed would train identically are trained
once, the runs branching off where their plans part, with every file and result equal, bit for bit
on the CPU, to those of separate runs (``share=False``), also after a kill and a resume and under
``--jobs``."""

from pathlib import Path

import pytest
import torch

from swalab.lab import runner
from swalab.lab.config import load_config
from swalab.lab.methods import recipe_of
from swalab.lab.rundir import RunFiles, read_results
from swalab.lab.runner import run_experiment
from swalab.lab.sharing import plan_branches, trained_epochs

# B = 4, 3 steps per epoch (300 examples, batch 100), eval every 2 epochs.
# Per 0-based epoch, the learning rate (REFERENCE.md's schedules, lr 0.1, swa_lr 0.05):
#   sgd           0.1 0.1 0.1 0.038                 (decay from 0.5 B to 0.01 lr at 0.9 B)
#   sgd-1.5B      0.1 0.1 0.1 0.1 0.059 0.0175      (the same, scaled to 6 epochs)
#   swa, ema, soup (1B) / swa-1.25B / swa-1.5B, ema-1.5B:
#                 0.1 0.1 0.1 0.069 [0.05 [0.05]]   (decay to swa_lr by swa_start, whatever B)
#   swag(-1.5B)   0.1 0.1 0.05 0.05 [0.05 0.05]     (swa_start 2)
#   fge           0.1 0.1 0.1 (0.05, 0.03)          (cycles from 0.75 B: the LR changes per step)
#   sgd-const, swa-const (swa_start 3): 0.1 throughout
#   pswa          restarts from its average after every epoch: never shared
TINY = [
    "train.epochs=4",
    "train.eval_every=2",
    "data.train_size=300",
    "seeds=[0]",
    "methods=[{method: sgd}, {method: swa}, {method: swa, budget: 1.25}, "
    "{method: swa, budget: 1.5}, {method: swag, options: {n_samples: 3, swa_start: 2}}, "
    "{method: swag, budget: 1.5, options: {n_samples: 3, swa_start: 2}}, "
    "{method: ema, options: {decay: 0.9}}, {method: ema, budget: 1.5, options: {decay: 0.9}}, "
    "{method: sgd, budget: 1.5}, {method: pswa}, {method: fge, options: {cycle: 2}}, "
    "{method: sgd, label: sgd-const, options: {schedule: constant}}, "
    "{method: swa, label: swa-const, baseline: sgd-const, "
    "options: {schedule: constant, swa_start: 3}}, {method: soup}]",
]
STEPS = 3

# the epochs trained, in order, each named by the runs that train it (the plan's branches in turn)
ORDER = [
    ("sgd (+12)", 1),
    ("sgd (+12)", 2),
    ("sgd (+10)", 3),
    ("sgd", 4),
    ("swa (+5)", 4),
    ("swa-1.25B (+2)", 5),
    ("swa-1.5B (+1)", 6),
    ("sgd-1.5B (+2)", 4),
    ("sgd-1.5B", 5),
    ("sgd-1.5B", 6),
    ("fge", 4),
    ("swag (+1)", 3),
    ("swag (+1)", 4),
    ("swag-1.5B", 5),
    ("swag-1.5B", 6),
    *[("pswa", e) for e in (1, 2, 3, 4)],
]


def tiny():
    return load_config("mnist1d", TINY)


def tree(branch):
    return (
        [m.label for m in branch.methods],
        branch.start,
        branch.stop,
        [tree(child) for child in branch.children],
    )


def test_the_plan_branches_where_the_learning_rates_part():
    cfg = tiny()
    roots = plan_branches(cfg.train, cfg.methods, STEPS)
    everyone = [m.label for m in cfg.methods]
    trunk = [label for label in everyone if label != "pswa"]
    no_swag = [label for label in trunk if not label.startswith("swag")]
    assert [tree(root) for root in roots] == [
        (
            everyone,
            0,
            0,  # pswa parts at once: its first epoch ends with a restart
            [
                (
                    trunk,
                    0,
                    2,
                    [
                        (
                            no_swag,
                            2,
                            3,
                            [
                                (["sgd"], 3, 4, []),
                                (
                                    ["swa", "swa-1.25B", "swa-1.5B", "ema", "ema-1.5B", "soup"],
                                    3,
                                    6,
                                    [],
                                ),
                                (["sgd-1.5B", "sgd-const", "swa-const"], 3, 6, []),
                                (["fge"], 3, 4, []),
                            ],
                        ),
                        (["swag", "swag-1.5B"], 2, 6, []),
                    ],
                ),
                (["pswa"], 0, 4, []),
            ],
        )
    ]
    # 2 + 1 + (1 + 3 + 3 + 1) + 4 + 4 epochs instead of the 65 of the runs' own lengths
    assert trained_epochs(roots) == 19
    alone = plan_branches(cfg.train, cfg.methods, STEPS, share=False)
    assert [tree(root)[0] for root in alone] == [[label] for label in everyone]
    assert trained_epochs(alone) == sum(recipe_of(m, cfg.train, STEPS).epochs for m in cfg.methods)
    assert trained_epochs(alone) == 65


def test_a_resumed_run_shares_only_with_runs_at_the_same_point():
    cfg = tiny()
    by = {m.label: m for m in cfg.methods}
    methods = [by["swa"], by["swa-1.5B"], by["sgd"], by["swag"]]
    # swa and swa-1.5B resume after epoch 3 (one trajectory); sgd after 3 too, but its third
    # epoch differed (0.038 instead of 0.069); swag after epoch 1 (the same plan as everyone)
    starts = {"swa": 4, "swa-1.5B": 4, "sgd": 4, "swag": 2}
    roots = plan_branches(cfg.train, methods, STEPS, starts)
    assert [tree(root) for root in roots] == [
        (["swa", "swa-1.5B"], 4, 6, []),  # swa is finished where it starts
        (["sgd"], 4, 4, []),
        (["swag"], 2, 4, []),
    ]


def test_table1_trains_419_instead_of_950_epochs_per_seed():
    # SGD's 200 epochs follow SWA's for 81 (SWA's decay starts first: at half of swa_start 161);
    # SWA 1B, 1.25B and 1.5B are one trajectory of 300 epochs: 81 + 119 + 219
    cfg = load_config("cifar100-vgg16")
    roots = plan_branches(cfg.train, cfg.methods, steps_per_epoch=391)
    assert trained_epochs(roots) == 419
    assert trained_epochs(plan_branches(cfg.train, cfg.methods, 391, share=False)) == 950


def files_of(out: Path, label: str) -> tuple[str, dict, dict]:
    run = RunFiles(out / label / "seed0")
    weights = {
        name: torch.load(run.weights_path(name), weights_only=True) for name in ("init", "final")
    }
    result = {k: v for k, v in run.result().items() if k != "seconds"}
    return run.metrics_path.read_text(), weights, result


def rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_results(out)]


def assert_same(shared: Path, separate: Path, cfg) -> None:
    assert rows(shared) == rows(separate)
    assert len(rows(shared)) == len(cfg.methods)
    for m in cfg.methods:
        curve, weights, result = files_of(shared, m.label)
        curve2, weights2, result2 = files_of(separate, m.label)
        assert curve == curve2, m.label
        assert result == result2, m.label
        for name in ("init", "final"):
            assert weights[name].keys() == weights2[name].keys()
            for key in weights[name]:
                assert torch.equal(weights[name][key], weights2[name][key]), (m.label, key)
    epochs = [len(RunFiles(shared / m.label / "seed0").metrics()) for m in cfg.methods]
    assert epochs == [recipe_of(m, cfg.train).epochs for m in cfg.methods]


def quiet(text: str) -> None:
    pass


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    out = tmp_path_factory.mktemp("separate")
    run_experiment(tiny(), out, progress=False, log=quiet, share=False)
    return out


def test_shared_runs_equal_separate_runs(tmp_path, separate, monkeypatch):
    trained = []
    original = runner.EpochReporter.epoch

    def epoch(self, what, record, total):
        trained.append((what.split("] ")[1].removesuffix(" seed 0"), record["epoch"]))
        return original(self, what, record, total)

    monkeypatch.setattr(runner.EpochReporter, "epoch", epoch)
    run_experiment(tiny(), tmp_path, progress=False, log=quiet)
    assert trained == ORDER
    assert_same(tmp_path, separate, tiny())


@pytest.mark.parametrize(
    "what, epoch",
    [
        ("sgd (+12)", 2),  # in the trunk, before any branch
        ("sgd (+10)", 3),  # at the branch point: the last shared epoch is trained
        ("swa-1.25B (+2)", 5),  # swa finished, swa-1.25B not yet; sgd-1.5B's branch not started
        ("swag (+1)", 4),  # after every branch of the first child
    ],
)
def test_kill_and_resume_anywhere(tmp_path, separate, monkeypatch, what, epoch):
    original = runner.EpochReporter.epoch

    def killing(self, text, record, total):
        if f"] {what} seed" in text and record["epoch"] == epoch:
            raise Killed(text)
        return original(self, text, record, total)

    monkeypatch.setattr(runner.EpochReporter, "epoch", killing)
    with pytest.raises(Killed):
        run_experiment(tiny(), tmp_path, progress=False, log=quiet)
    resumed = []

    def counting(self, text, record, total):
        resumed.append(record["epoch"])
        return original(self, text, record, total)

    monkeypatch.setattr(runner.EpochReporter, "epoch", counting)
    run_experiment(tiny(), tmp_path, progress=False, log=quiet)
    # the killed epoch was checkpointed: every epoch after it in ORDER, and no other, is trained
    assert len(resumed) == len(ORDER) - ORDER.index((what, epoch)) - 1
    assert_same(tmp_path, separate, tiny())


def test_killed_between_finishing_a_run_and_writing_its_result(tmp_path, separate, monkeypatch):
    """swa-1.25B's last checkpoint is written, its result not: resumed, it is finished where its
    trajectory stands, and swa-1.5B and ema-1.5B go on from the same checkpointed epoch."""
    original = RunFiles.write_result

    def write_result(self, row):
        if row["method"] == "swa-1.25B":
            raise Killed(row["method"])
        return original(self, row)

    monkeypatch.setattr(RunFiles, "write_result", write_result)
    with pytest.raises(Killed):
        run_experiment(tiny(), tmp_path, progress=False, log=quiet)
    monkeypatch.setattr(RunFiles, "write_result", original)
    run_experiment(tiny(), tmp_path, progress=False, log=quiet)
    assert_same(tmp_path, separate, tiny())


def test_two_jobs_share_and_equal_the_sequential_run(tmp_path, separate):
    run_experiment(tiny(), tmp_path, progress=False, log=quiet, jobs=2)
    assert_same(tmp_path, separate, tiny())


@pytest.mark.parametrize("flag, share", [([], True), (["--no-share"], False)])
def test_cli_no_share(flag, share, tmp_path, monkeypatch):
    from swalab.cli import main

    seen = {}
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **kw: seen.update(kw) or [])
    assert main(["run", "mnist1d", "--out", str(tmp_path / "r"), *flag]) == 0
    assert seen["share"] is share


def test_a_diverged_trajectory_diverges_every_run_on_it(tmp_path):
    sets = [
        *TINY[:-1],
        "train.lr=1000000000000.0",
        "methods=[{method: swa}, {method: swa, budget: 1.5}, {method: sgd}]",
    ]
    run_experiment(load_config("mnist1d", sets), tmp_path, progress=False, log=quiet)
    separate = tmp_path / "separate"
    run_experiment(load_config("mnist1d", sets), separate, progress=False, log=quiet, share=False)
    assert [r["status"] for r in rows(tmp_path)] == ["diverged"] * 3
    assert rows(tmp_path) == rows(separate)
