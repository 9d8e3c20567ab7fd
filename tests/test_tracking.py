"""Trackers (train.log) and per-epoch progress: what each tracker holds equals metrics.jsonl."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from swalab.lab import tracking
from swalab.lab.config import ConfigError, load_config
from swalab.lab.runner import run_experiment

BASE = [
    "seeds=[0]",
    "train.epochs=3",
    "train.threads=1",
    "data.train_size=400",
    "data.test_size=300",
    "methods=[{method: sgd}, {method: swa, options: {swa_start: 2}}]",
]


def _records(run: Path, label: str) -> list[dict]:
    return [
        json.loads(line)
        for line in (run / label / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]


def _scalars(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "epoch"}


def _tensorboard(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_csv_and_mlflow_hold_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    cfg = load_config("mnist1d", BASE + ["train.log=[tensorboard, csv, mlflow]"])
    lines: list[str] = []
    run_experiment(cfg, tmp_path, log=lines.append, progress=False)
    for label in ("sgd", "swa"):
        records = _records(tmp_path, label)
        assert [r["epoch"] for r in records] == [1, 2, 3]
        # TensorBoard: every number of every epoch, step = epoch (float32 in the event file)
        events = _tensorboard(tmp_path / "tb" / label / "seed0")
        expected: dict[str, list[tuple[int, float]]] = {}
        for r in records:
            for k, v in _scalars(r).items():
                expected.setdefault(k, []).append((r["epoch"], v))
        # (besides the final metrics, final/..., tested in test_tracking_jobs.py)
        assert {t for t in events if not t.startswith("final/")} == set(expected)
        for tag, points in expected.items():
            assert [s for s, _ in events[tag]] == [s for s, _ in points]
            assert [v for _, v in events[tag]] == pytest.approx([v for _, v in points], rel=1e-6)
        # CSV: one row per epoch, the same values (the average's columns empty before it starts)
        with (tmp_path / label / "seed0" / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
        for row, record in zip(rows, records):
            assert {k: float(v) for k, v in row.items() if v and k != "epoch"} == _scalars(record)
    # the running average is logged from swa_start on, the last epoch's being the final SWA model
    swa = _records(tmp_path, "swa")
    assert "avg_test_accuracy" not in swa[0] and "avg_test_accuracy" in swa[1]
    assert (
        swa[2]["avg_test_accuracy"]
        == json.loads((tmp_path / "swa/seed0/result.json").read_text())["test_accuracy"]
    )
    # MLflow: a finished run per (method, seed) in the local store, metric history = metrics.jsonl
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run_id = json.loads((tmp_path / "swa/seed0/mlflow.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.run_name == "swa/seed0" and run.info.status == "FINISHED"
    assert run.data.params["method"] == "swa" and run.data.params["options.swa_start"] == "2"
    history = client.get_metric_history(run_id, "avg_test_accuracy")
    assert [(m.step, m.value) for m in history] == [
        (r["epoch"], r["avg_test_accuracy"]) for r in swa[1:]
    ]
    # no terminal: one line per epoch trained (sgd and swa share their first two), then the run's
    epoch_lines = [line for line in lines if " epoch " in line]
    assert len(epoch_lines) == 4 and epoch_lines[0].startswith(
        "[1/2] sgd (+1) seed 0 epoch 1/3: train_loss "
    )
    last = lines.index(epoch_lines[-1])
    assert epoch_lines[-1].startswith("[2/2] swa seed 0 epoch 3/3") and "[4/4 epochs" in lines[last]
    assert lines[last + 1].startswith("[2/2] swa seed 0: test_accuracy ")


def _wandb_history(path: Path) -> list[dict[str, float]]:
    """The history rows of an offline ``.wandb`` file: a 7-byte header, then LevelDB-log records
    (crc32, length, type; 32 KiB blocks) holding wandb's ``Record`` protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {i.nested_key[0]: json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def test_wandb_offline_run(tmp_path):
    pytest.importorskip("wandb")
    cfg = load_config(
        "mnist1d",
        BASE[:-1] + ["methods=[{method: swa, options: {swa_start: 2}}]", "train.log=[wandb]"],
    )
    run_experiment(cfg, tmp_path, log=lambda _: None, progress=False)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    history = _wandb_history(next(run.glob("*.wandb")))
    records = _records(tmp_path, "swa")
    assert [h["_step"] for h in history] == [r["epoch"] for r in records]
    for h, r in zip(history, records):
        assert {k: v for k, v in h.items() if not k.startswith("_")} == pytest.approx(_scalars(r))


def test_resume_continues_the_writers_and_the_eta_counts_this_process(tmp_path, monkeypatch):
    """Interrupted after epoch 2 of 3: the re-run writes epoch 3 once to TensorBoard and the CSV,
    and counts 1 epoch to do (not 3)."""
    pytest.importorskip("tensorboard")
    cfg = load_config(
        "mnist1d", BASE[:-1] + ["methods=[{method: sgd}]", "train.log=[tensorboard, csv]"]
    )
    log = tracking.RunTrackers.log

    def interrupt_after_two(self, record):
        log(self, record)
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking.RunTrackers, "log", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path, log=lambda _: None, progress=False)
    monkeypatch.setattr(tracking.RunTrackers, "log", log)
    # a stale row of an epoch the checkpoint does not hold (the crash came between the two writes)
    with (tmp_path / "sgd/seed0/metrics.csv").open("a") as f:
        f.write("3,9,9,9,9,9\n")
    lines: list[str] = []
    run_experiment(cfg, tmp_path, log=lines.append, progress=False)
    records = _records(tmp_path, "sgd")
    with (tmp_path / "sgd/seed0/metrics.csv").open() as f:
        assert [float(r["train_loss"]) for r in csv.DictReader(f)] == [
            r["train_loss"] for r in records
        ]
    events = _tensorboard(tmp_path / "tb/sgd/seed0")
    assert [s for s, _ in events["train_loss"]] == [1, 2, 3]
    assert next(line for line in lines if " epoch " in line).startswith(
        "[1/1] sgd seed 0 epoch 3/3"
    )
    assert "[1/1 epochs" in lines[1]


def test_pretraining_is_on_the_progress(tmp_path):
    cfg = load_config("mnist1d", BASE[:-1] + ["methods=[{method: sgd}]", "pretrain.epochs=2"])
    lines: list[str] = []
    run_experiment(cfg, tmp_path, log=lines.append, progress=False)
    epochs = [line for line in lines if " epoch " in line]
    assert [line.split(":")[0] for line in epochs] == [
        "pretrain seed 0 epoch 1/2",
        "pretrain seed 0 epoch 2/2",
        "[1/1] sgd seed 0 epoch 1/3",
        "[1/1] sgd seed 0 epoch 2/3",
        "[1/1] sgd seed 0 epoch 3/3",
    ]
    assert "[1/5 epochs" in epochs[0] and "[5/5 epochs" in epochs[-1]


def test_bad_trackers_fail_at_config_load(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"train.log: unknown tracker 'tensorbord' \(known: tensorboard, csv"
    ):
        load_config("mnist1d", ["train.log=[tensorbord]"])
    with pytest.raises(ConfigError, match="names a tracker twice"):
        load_config("mnist1d", ["train.log=[csv, csv]"])
    with pytest.raises(ConfigError, match=r"train.log must be a list, got .tensorboard."):
        load_config("mnist1d", ["train.log=tensorboard"])
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    cfg = load_config("mnist1d", ["train.log=[mlflow]"])  # a report of such a run needs no mlflow
    with pytest.raises(
        ConfigError, match=r"tracker 'mlflow' needs the package 'mlflow' \(pip install mlflow\)"
    ):
        run_experiment(cfg, tmp_path / "run", log=lambda _: None, progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_set_parses_the_list_and_changing_trackers_resumes(tmp_path, capsys):
    from swalab.cli import main

    args = [
        "run",
        "mnist1d",
        "--out",
        str(tmp_path),
        "--seeds",
        "1",
        "--set",
        "train.epochs=1",
        "--set",
        "data.train_size=200",
        "--set",
        "methods=[{method: sgd}]",
    ]
    assert main(args + ["--set", "train.log=[csv]"]) == 0
    assert (tmp_path / "sgd/seed0/metrics.csv").is_file()
    assert (
        main(args + ["--set", "train.log=[tensorboard]"]) == 0
    )  # same experiment: resumed, not refused
    assert "1 already done" in capsys.readouterr().out
