"""Shared trajectories: runs of one seed that are the first epochs of another (SWA at 1B and 1.25B
inside 1.5B) are read off it, with every file and result equal, bit for bit on the CPU, to those of
separate runs (``share=False``), also after a kill and a resume."""

from pathlib import Path

import pytest
import torch

from swalab.lab import runner
from swalab.lab.config import load_config
from swalab.lab.methods import recipe_of, shares_trajectory
from swalab.lab.rundir import RunFiles, read_results
from swalab.lab.runner import run_experiment, share_groups

# B = 4: SWA from epoch 4 (0.8 B + 1) at 1B (4 epochs), 1.25B (5) and 1.5B (6); eval every 2
# epochs, so 1.25B's last epoch is not evaluated by the 1.5B run and is evaluated for its own.
TINY = [
    "train.epochs=4",
    "train.eval_every=2",
    "data.train_size=300",
    "seeds=[0]",
    "methods=[{method: sgd}, {method: swa}, {method: swa, budget: 1.25}, "
    "{method: swa, budget: 1.5}, {method: swag, options: {n_samples: 3, swa_start: 2}}, "
    "{method: swag, budget: 1.5, options: {n_samples: 3, swa_start: 2}}, "
    "{method: ema, options: {decay: 0.9}}, {method: ema, budget: 1.5, options: {decay: 0.9}}, "
    "{method: sgd, budget: 1.5}]",
]


def tiny():
    return load_config("mnist1d", TINY)


def labels(groups):
    return [[m.label for m in g] for g in groups]


def test_share_groups_from_the_recipes():
    cfg = tiny()
    groups = share_groups(cfg, cfg.methods, steps_per_epoch=3)
    assert labels(groups) == [
        ["swa-1.5B", "swa-1.25B", "swa"],
        ["swag-1.5B", "swag"],
        ["ema-1.5B", "ema"],
        ["sgd-1.5B"],  # the reference SGD schedule is scaled to the run's length
        ["sgd"],
    ]
    by = {m.label: m for m in cfg.methods}
    assert not shares_trajectory(by["swa-1.5B"], by["swa"], cfg.train)  # longer is no prefix
    assert not shares_trajectory(by["swa"], by["sgd"], cfg.train)  # another method
    swa_lr = load_config(
        "mnist1d",
        [
            *TINY[:-1],
            "methods=[{method: swa, budget: 1.5}, {method: swa, options: {swa_lr: 0.02}}]",
        ],
    )
    assert len(share_groups(swa_lr, swa_lr.methods)) == 2  # another option
    other_start = load_config(
        "mnist1d",
        [
            *TINY[:-1],
            "methods=[{method: swa, budget: 1.5}, {method: swa, options: {swa_start: 3}}]",
        ],
    )
    assert len(share_groups(other_start, other_start.methods)) == 2
    # pswa's default switch to SWA is min(B + 1, epochs): 1B and 1.5B plan epoch 4 differently
    pswa = load_config(
        "mnist1d", [*TINY[:-1], "methods=[{method: pswa, budget: 1.5}, {method: pswa}]"]
    )
    assert len(share_groups(pswa, pswa.methods)) == 2
    # epochs trained for the Table 1 preset: SGD 200 + SWA 1.5B 300 instead of 950
    table1 = load_config("cifar100-vgg16")
    todo = [(0, m) for m in table1.methods]
    assert runner._total_epochs(table1, todo) == 950
    assert runner._shared_epochs(table1, todo, steps_per_epoch=391) == 500


def files_of(out: Path, label: str) -> tuple[str, dict, dict]:
    run = RunFiles(out / label / "seed0")
    final = torch.load(run.weights_path("final"), weights_only=True)
    init = torch.load(run.weights_path("init"), weights_only=True)
    result = {k: v for k, v in run.result().items() if k != "seconds"}
    return run.metrics_path.read_text(), {"final": final, "init": init}, result


def assert_same(shared: Path, separate: Path, cfg) -> None:
    def rows(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_results(out)]

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


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    out = tmp_path_factory.mktemp("separate")
    run_experiment(tiny(), out, progress=False, log=lambda text: None, share=False)
    return out


def test_shared_runs_equal_separate_runs(tmp_path, separate, monkeypatch):
    trained = []
    original = runner.train_run

    def counting(cfg, method, *args, **kwargs):
        trained.append((method.label, [r.method.label for r in kwargs.get("readers", ())]))
        return original(cfg, method, *args, **kwargs)

    monkeypatch.setattr(runner, "train_run", counting)
    run_experiment(tiny(), tmp_path, progress=False, log=lambda text: None)
    assert trained == [
        ("swa-1.5B", ["swa-1.25B", "swa"]),
        ("swag-1.5B", ["swag"]),
        ("ema-1.5B", ["ema"]),
        ("sgd-1.5B", []),
        ("sgd", []),
    ]
    assert_same(tmp_path, separate, tiny())


@pytest.mark.parametrize("kill_after", [3, 4, 5])
def test_kill_and_resume_at_a_branch_point(tmp_path, separate, monkeypatch, kill_after):
    """Killed after epoch 3 (before any method was read off), 4 (SWA 1B just read off) or 5."""
    original = runner.EpochReporter.epoch

    def epoch(self, what, record, total):
        if "swa-1.5B" in what and record["epoch"] == kill_after:
            raise Killed(what)
        return original(self, what, record, total)

    monkeypatch.setattr(runner.EpochReporter, "epoch", epoch)
    with pytest.raises(Killed):
        run_experiment(tiny(), tmp_path, progress=False, log=lambda text: None)
    done = {r["method"] for r in read_results(tmp_path)}
    assert done == ({"swa"} if kill_after >= 4 else set()) | (
        {"swa-1.25B"} if kill_after >= 5 else set()
    )
    monkeypatch.setattr(runner.EpochReporter, "epoch", original)
    run_experiment(tiny(), tmp_path, progress=False, log=lambda text: None)
    assert_same(tmp_path, separate, tiny())


def test_a_run_read_off_but_not_recorded_is_trained_alone(tmp_path, separate, monkeypatch):
    """Killed between reading SWA 1.25B off and writing its result: the resumed 1.5B run is past
    its end, so it is trained on its own."""
    original = RunFiles.write_result

    def write_result(self, row):
        if row["method"] == "swa-1.25B":
            raise Killed(row["method"])
        return original(self, row)

    monkeypatch.setattr(RunFiles, "write_result", write_result)
    with pytest.raises(Killed):
        run_experiment(tiny(), tmp_path, progress=False, log=lambda text: None)
    monkeypatch.setattr(RunFiles, "write_result", original)
    # and the 1.5B run finishes before the kill is noticed: its checkpoint is past epoch 5
    run_experiment(tiny(), tmp_path, progress=False, log=lambda text: None)
    assert_same(tmp_path, separate, tiny())


@pytest.mark.parametrize("flag, share", [([], True), (["--no-share"], False)])
def test_cli_no_share(flag, share, tmp_path, monkeypatch):
    from swalab.cli import main

    seen = {}
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **kw: seen.update(kw) or [])
    assert main(["run", "mnist1d", "--out", str(tmp_path / "r"), *flag]) == 0
    assert seen["share"] is share


def test_a_diverged_trajectory_diverges_every_run_read_off_it(tmp_path):
    sets = [
        *TINY[:-1],
        "train.lr=1000000000000.0",
        "methods=[{method: swa}, {method: swa, budget: 1.5}]",
    ]
    run_experiment(load_config("mnist1d", sets), tmp_path, progress=False, log=lambda text: None)
    separate = tmp_path / "separate"
    run_experiment(
        load_config("mnist1d", sets), separate, progress=False, log=lambda t: None, share=False
    )

    def rows(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in read_results(out)]

    assert [r["status"] for r in rows(tmp_path)] == ["diverged", "diverged"]
    assert rows(tmp_path) == rows(separate)
