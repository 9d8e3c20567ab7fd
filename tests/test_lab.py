"""The laboratory: config checking, recipes against their schedules, resumable runs, CLI errors."""

import json
import shutil

import pytest
import torch
import yaml
from torch import nn

from swalab.cli import main
from swalab.data import load
from swalab.lab.config import ConfigError, load_config, preset_names
from swalab.lab.methods import METHODS, build_recipe
from swalab.lab.rundir import read_results
from swalab.lab.runner import run_experiment
from swalab.lab.stats import summarize
from swalab.lab.trainer import train_run
from swalab.schedules import swa_reference_lr

TINY = [
    "train.epochs=4",
    "train.eval_every=2",
    "seeds=[0, 1]",
    "methods=[{method: sgd}, {method: swa, options: {swa_start: 2}}]",
]


# --- config --------------------------------------------------------------------------------


def test_unknown_key_wrong_type_and_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config("mnist1d", ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="train.epochs must be int, got 'ten'"):
        load_config("mnist1d", ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="train.epochs must be > 0, got 0"):
        load_config("mnist1d", ["train.epochs=0"])
    with pytest.raises(ConfigError, match="train.lr must be > 0, got -0.1"):
        load_config("mnist1d", ["train.lr=-0.1"])
    with pytest.raises(ConfigError, match="--set expects key=value, got 'train.lr'"):
        load_config("mnist1d", ["train.lr"])
    with pytest.raises(ConfigError, match="unknown preset 'mnist1'; did you mean 'mnist1d'"):
        load_config("mnist1")
    with pytest.raises(ConfigError, match="no variant 'huge'"):
        load_config("mnist1d", variant="huge")


def test_set_addresses_methods_by_label_and_variants_apply():
    cfg = load_config("mnist1d", ["methods.swa.options.swa_lr=0.02", "seeds=[3]"], variant="full")
    swa = next(m for m in cfg.methods if m.label == "swa")
    assert swa.options["swa_lr"] == 0.02 and cfg.seeds == [3] and cfg.train.epochs == 60
    with pytest.raises(ConfigError, match="no method labelled 'nope'"):
        load_config("mnist1d", ["methods.nope.budget=2"])


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_is_valid(preset):
    """Every preset (and variant) loads, names registered parts, and its options are accepted."""
    from swalab.data import DATASETS
    from swalab.models import MODELS, default_options

    base = load_config(preset)
    for cfg in [base] + [load_config(preset, variant=v) for v in base.variants]:
        assert cfg.description
        DATASETS.get(cfg.data.name)
        assert set(cfg.model.options) <= set(default_options(cfg.model.name)), cfg.model.options
        assert cfg.model.name in MODELS
        import inspect

        data_params = inspect.signature(DATASETS.get(cfg.data.name)).parameters
        assert set(cfg.data.options) <= set(data_params), cfg.data.options
        for m in cfg.methods:
            build_recipe(
                m.method,
                m.options,
                lr=cfg.train.lr,
                budget_epochs=cfg.train.epochs,
                budget=m.budget,
                steps_per_epoch=3,
                model=nn.Linear(2, 2),
            )


# --- recipes -------------------------------------------------------------------------------


def recipe(method, budget=1.0, epochs=10, **options):
    return build_recipe(
        method,
        options,
        lr=0.1,
        budget_epochs=epochs,
        budget=budget,
        steps_per_epoch=2,
        model=nn.Linear(1, 1, bias=False),
    )


def run_recipe(r):
    """Drive a recipe on a model whose weight equals the (1-based) epoch; returns the averaged weight."""
    model = nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    restarts = []
    for epoch in range(r.epochs):
        for step in range(r.steps_per_epoch):
            r.lr(epoch, step)
            with torch.no_grad():
                model.weight.fill_(epoch + 1)
            r.after_step(model)
        before = model.weight.item()
        r.after_epoch(epoch, model, optimizer)
        if model.weight.item() != before:
            restarts.append(epoch + 1)
    return r.final_model(model).weight.item(), restarts


def test_swa_recipe_averages_from_swa_start_with_the_reference_schedule():
    r = recipe("swa", budget=1.5, swa_start=9, swa_lr=0.02)  # 15 epochs
    assert r.epochs == 15
    schedule = swa_reference_lr(0.1, 9, 0.02)
    assert [r.lr(e, 0) for e in range(15)] == [schedule(e) for e in range(15)]
    value, _ = run_recipe(r)
    assert value == pytest.approx(sum(range(9, 16)) / 7)  # epochs 9..15 averaged


def test_swa_default_start_is_point_eight_budget_plus_one():
    r = recipe("swa", epochs=200)
    value, _ = run_recipe(r)
    assert value == pytest.approx(sum(range(161, 201)) / 40)  # paper: swa_start 161 for B = 200


def test_cyclic_swa_collects_at_cycle_ends():
    r = recipe("swa", swa_start=5, schedule="cyclic", cycle=2, swa_lr=0.01)
    assert r.lr(4, 0) == pytest.approx(0.1 * 0.75 + 0.01 * 0.25)  # i = 1 of a 4-iteration cycle
    assert r.lr(5, 1) == pytest.approx(0.01)  # end of the cycle
    value, _ = run_recipe(r)
    assert value == pytest.approx((6 + 8 + 10) / 3)


def test_ema_recipe_updates_every_step():
    r = recipe("ema", swa_start=9, decay=0.5)
    value, _ = run_recipe(r)
    # steps from epoch 9: weights 9, 9, 10, 10; first copies, then w <- 0.5 w + 0.5 x
    expected = 9.0
    for x in (9, 10, 10):
        expected = 0.5 * expected + 0.5 * x
    assert value == pytest.approx(expected)


def test_pswa_restarts_every_period_then_ordinary_swa():
    r = recipe("pswa", budget=1.5, epochs=8, pswa_start=2, period=2, swa_start=9)  # 12 epochs
    value, restarts = run_recipe(r)
    assert restarts == [3, 5, 7]  # after models (2,3), (4,5), (6,7); epoch 8 starts the next period
    assert value == pytest.approx(sum(range(9, 13)) / 4)  # SWA over epochs 9..12


def test_sgd_step_schedule_divides_every_n_iterations():
    r = recipe("sgd", schedule="step", step_every=3, step_factor=4.0)
    assert [r.lr(e, s) for e in range(3) for s in range(2)] == pytest.approx(
        [0.1, 0.1, 0.1, 0.025, 0.025, 0.025]
    )


def test_fge_collects_at_cycle_minimum():
    r = recipe("fge", fge_start=5, cycle=2, a1=0.05, a2=0.01)
    assert r.lr(5, 0) == pytest.approx(0.01)  # epoch 1 of the phase begins at the minimum
    model = nn.Linear(1, 1, bias=False)
    collected = []
    for epoch in range(r.epochs):
        with torch.no_grad():
            model.weight.fill_(epoch + 1)
        before = len(r.fge.members)
        r.after_epoch(epoch, model, None)
        if len(r.fge.members) > before:
            collected.append(epoch + 1)
    assert collected == [5, 7, 9]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"swa_start": 50}, r"swa_start must be an epoch in 1\.\.10, got 50"),
        ({"swa_lr": 0.0}, "swa_lr must be > 0"),
        ({"swa_rate": 0.1}, r"unknown option\(s\) \['swa_rate'\] for method 'swa'"),
    ],
)
def test_bad_method_options(bad, message):
    with pytest.raises(ValueError, match=message):
        recipe("swa", **bad)


def test_unknown_method_suggests_nearest():
    with pytest.raises(ValueError, match="unknown method 'swq'; did you mean 'swa'"):
        METHODS.get("swq")


# --- runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist1d():
    return load("mnist1d", seed=0, val_size=500)


def test_resumed_run_is_bit_identical(tmp_path, mnist1d):
    cfg = load_config(
        "mnist1d", ["train.epochs=4", "methods=[{method: swa, options: {swa_start: 2}}]"]
    )
    method = cfg.methods[0]
    full = train_run(cfg, method, 0, mnist1d, tmp_path / "full", torch.device("cpu"))

    epochs_done = []

    def stop_after_two(record):
        epochs_done.append(1)
        if len(epochs_done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(
            cfg, method, 0, mnist1d, tmp_path / "cut", torch.device("cpu"), on_epoch=stop_after_two
        )
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    resumed = train_run(cfg, method, 0, mnist1d, tmp_path / "cut", torch.device("cpu"))
    assert resumed.metrics == full.metrics
    a, b = torch.load(tmp_path / "full" / "final.pt"), torch.load(tmp_path / "cut" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (
        tmp_path / "cut" / "metrics.jsonl"
    ).read_text()


def test_experiment_writes_results_table_and_skips_finished_runs(tmp_path, capsys):
    cfg = load_config("mnist1d", TINY)
    rows = run_experiment(cfg, tmp_path / "run", progress=False)
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == [
        ("sgd", 0, "done"),
        ("swa", 0, "done"),
        ("sgd", 1, "done"),
        ("swa", 1, "done"),
    ]
    saved = read_results(tmp_path / "run")
    assert {
        "method",
        "seed",
        "budget",
        "epochs",
        "status",
        "train_loss",
        "test_loss",
        "test_accuracy",
    } <= set(saved[0])
    assert float(saved[1]["test_accuracy"]) == rows[1]["test_accuracy"]
    table = capsys.readouterr().out
    summary = summarize(saved, "test_accuracy")[1]
    assert f"{summary.mean:.2f} ± {summary.std:.2f}" in table and summary.pairs == 2
    lines = (tmp_path / "run" / "swa" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "avg_test_accuracy" in json.loads(lines[-1])
    # same command again: nothing is retrained
    before = (tmp_path / "run" / "swa" / "seed0" / "result.json").stat().st_mtime_ns
    run_experiment(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "swa" / "seed0" / "result.json").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="holds started runs of sgd, swa with a different config"):
        run_experiment(
            load_config("mnist1d", TINY + ["train.lr=0.05"]), tmp_path / "run", progress=False
        )
    # a run directory saved before a key existed (train.compile) is the same run at its default
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["train"]["compile"]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    run_experiment(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "swa" / "seed0" / "result.json").stat().st_mtime_ns == before


def test_all_config_errors_are_named_at_once_and_nothing_runs(tmp_path, capsys):
    """The issue's example: an option value, an unknown option and a swa_start beyond the run,
    found before any run trains and before anything is written."""
    argv = [
        "run",
        "mnist1d",
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--set",
        "train.epochs=8",
        "--set",
        "methods.swa.options.swa_lr=abc",
        "--set",
        "methods.fge.options.cyc=2",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "3 config errors" in err and err.count("\n") == 1
    assert "methods.swa: swa_lr must be > 0, got abc" in err
    assert "methods.fge: unknown option(s) ['cyc'] for method 'fge'" in err
    assert "methods.swa-const: swa_start must be an epoch in 1..8, got 16" in err
    assert not (tmp_path / "out").exists()


def test_changed_config_continues_for_unstarted_methods_only(tmp_path):
    out = tmp_path / "run"
    base = ["train.epochs=2", "seeds=[0]", "data.train_size=200", "data.test_size=100"]
    run_experiment(
        load_config(
            "mnist1d", base + ["methods=[{method: sgd}, {method: swa, options: {swa_start: 2}}]"]
        ),
        out,
        progress=False,
        log=lambda text: None,
    )
    shutil.rmtree(out / "swa")  # swa has not started (as if the first run had stopped after sgd)
    sgd_result = (out / "sgd" / "seed0" / "result.json").stat().st_mtime_ns
    # swa's config changes and a new method is added: both run, sgd is kept
    fixed = base + [
        "methods=[{method: sgd}, {method: swa, options: {swa_start: 1}}, {method: ema}]"
    ]
    rows = run_experiment(load_config("mnist1d", fixed), out, progress=False, log=lambda text: None)
    assert [r["method"] for r in rows] == ["sgd", "swa", "ema"] and all(
        r["status"] == "done" for r in rows
    )
    assert (out / "sgd" / "seed0" / "result.json").stat().st_mtime_ns == sgd_result
    assert [r["method"] for r in read_results(out)] == ["sgd", "swa", "ema"]
    # changing a started method is refused, naming it
    changed = base + [
        "methods=[{method: sgd, options: {schedule: constant}}, {method: swa, options: {swa_start: 1}}]"
    ]
    with pytest.raises(
        ConfigError, match=r"holds started runs of sgd with a different config \(their method"
    ):
        run_experiment(load_config("mnist1d", changed), out, progress=False)


def test_diverging_run_is_marked_and_others_go_on(tmp_path, capsys):
    cfg = load_config(
        "mnist1d",
        [
            "train.epochs=2",
            "seeds=[0]",
            "data.name=friedman1",
            "data.options={}",
            "model.name=mlp",
            "model.options={}",
            "train.lr=0.01",
            # from the first step the cyclic LR climbs towards 1e8: MSE overflows within the epoch
            "methods=[{method: swa, label: wild, options: {swa_start: 1, schedule: cyclic, swa_lr: 1.0e+8}}, {method: sgd}]",
        ],
    )
    rows = run_experiment(cfg, tmp_path / "run", progress=False)
    assert rows[0]["status"] == "diverged" and "wild seed 0: loss became" in rows[0]["message"]
    assert rows[1]["status"] == "done" and rows[1]["test_mse"] < 1.0
    assert "diverged: wild seed 0" in capsys.readouterr().out
    saved = read_results(tmp_path / "run")
    assert saved[0]["status"] == "diverged" and saved[0]["test_mse"] == ""
    checkpoint = torch.load(
        tmp_path / "run" / "wild" / "seed0" / "checkpoint.pt", weights_only=False
    )
    assert "diverged" in checkpoint
    # a re-run reports the divergence again instead of retrying
    assert run_experiment(cfg, tmp_path / "run", progress=False)[0]["status"] == "diverged"


# --- CLI -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "mnist1"], "unknown preset 'mnist1'; did you mean 'mnist1d'"),
        (["run", "mnist1d", "--set", "train.epochs"], "--set expects key=value"),
        (["run", "mnist1d", "--set", "model.name=resnet5"], "unknown model 'resnet5'"),
        (
            ["run", "mnist1d", "--set", "data.name=cifar"],
            "unknown dataset 'cifar'; did you mean 'cifar10'",
        ),
        (["run", "mnist1d", "--set", "train.epochs=-1"], "train.epochs must be > 0, got -1"),
        (
            ["run", "mnist1d", "--set", "methods.swa.options.swa_start=500"],
            "swa_start must be an epoch in 1..30",
        ),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_cli_missing_dataset_offline_names_path_and_flag(capsys, tmp_path):
    code = main(
        [
            "run",
            "mnist1d",
            "--out",
            str(tmp_path / "out"),
            "--set",
            "data.name=cifar10",
            "--set",
            f"data.root={tmp_path}/data",
            "--set",
            "data.options={}",
            "--set",
            "model.name=small_cnn",
            "--set",
            "model.options={}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path}/data" in err and "--download" in err


def test_cli_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "mnist1d", "--out", str(blocker / "sub")]) == 2
    assert "cannot write to --out" in capsys.readouterr().err


def test_cli_list_shows_presets_and_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist1d", "swa", "pswa", "swag", "fge", "mnist1d_cnn", "cluster"):
        assert name in out


def test_soup_methods_train_and_evaluate(tmp_path, mnist1d):
    """Every soup kind trains, scores its snapshots on the validation split and evaluates (the greedy
    rule itself is tested in test_ensembles.py)."""
    cfg = load_config(
        "mnist1d",
        [
            "train.epochs=4",
            "methods=[{method: soup, label: greedy, options: {swa_start: 2}},"
            " {method: soup, label: weighted, options: {kind: weighted, swa_start: 2}},"
            " {method: soup, label: uniform, options: {kind: uniform, swa_start: 2}}]",
        ],
    )
    for method in cfg.methods:
        result = train_run(cfg, method, 0, mnist1d, tmp_path / method.label, torch.device("cpu"))
        assert result.status == "done" and 0 < result.metrics["val_accuracy"] <= 100
    with pytest.raises(ValueError, match="kind must be one of"):
        recipe("soup", kind="best")


def test_run_files_append_metrics_and_trajectory_without_rewriting(tmp_path):
    """metrics.jsonl grows by one line and the trajectory by one file per epoch; earlier epochs'
    files are not written again (the former trajectory.pt was re-read and rewritten every epoch)."""
    from swalab.lab.rundir import RunDirectory

    files = RunDirectory(tmp_path).run("swa", 3)
    assert (
        files.path == tmp_path / "swa" / "seed3" and not files.started and not files.has_trajectory
    )
    files.append_metrics({"epoch": 1, "lr": 0.1})
    files.append_trajectory(1, {"w": torch.tensor([1.0])})
    first = (files.trajectory_dir / "epoch00001.pt").stat().st_mtime_ns
    files.append_metrics({"epoch": 2, "lr": 0.05})
    files.append_trajectory(2, {"w": torch.tensor([2.0])})
    assert (files.trajectory_dir / "epoch00001.pt").stat().st_mtime_ns == first
    assert files.metrics() == [{"epoch": 1, "lr": 0.1}, {"epoch": 2, "lr": 0.05}]
    assert [s["w"].item() for s in files.trajectory()] == [1.0, 2.0] and files.has_trajectory
    files.save_checkpoint({"epoch": 1})
    assert files.started and files.experiment.path == tmp_path
