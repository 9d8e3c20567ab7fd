"""The four trackers under the defaults (shared trajectories, several worker processes), read back
with each tool's own reader: every run tracked once, with its hyper-parameters, its per-epoch
metrics and its final (validation and test) metrics under one name; a crashed first attempt and a
half-built MLflow store do not break the re-run."""

from __future__ import annotations

import csv
import json
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from swalab.lab.config import load_config
from swalab.lab.runner import run_experiment

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

OVERRIDES = [
    "seeds=[0, 1]",
    "train.epochs=3",
    "train.threads=1",
    "data.train_size=300",
    "data.test_size=200",
    "data.options={val_size: 100}",
    "methods=[{method: sgd}, {method: swa, options: {swa_start: 2, swa_lr: 0.05}}]",
    "train.log=[tensorboard, csv, mlflow, wandb]",
]
RUNS = [(label, seed) for label in ("sgd", "swa") for seed in (0, 1)]

# the first attempt, in a process of its own that dies (os._exit) once the sgd run of seed 1
# has logged epoch 2: its trackers are never closed
CRASH = """
import os, sys
from pathlib import Path
from swalab.lab import tracking
from swalab.lab.config import load_config
from swalab.lab.runner import run_experiment

log = tracking.SeedTrackers.log
def crash(self, method, record):
    log(self, method, record)
    if (self.seed, method.label, record["epoch"]) == (1, "sgd", 2):
        os._exit(3)
tracking.SeedTrackers.log = crash
run_experiment(load_config("mnist1d", sys.argv[2:]), Path(sys.argv[1]), log=lambda _: None,
               progress=False)
"""


def _result(out: Path, label: str, seed: int) -> dict:
    return json.loads((out / label / f"seed{seed}" / "result.json").read_text())


def _records(out: Path, label: str, seed: int) -> list[dict]:
    text = (out / label / f"seed{seed}" / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _wandb_records(path: Path) -> list:
    """The ``Record`` protobufs of an offline ``.wandb`` file: a 7-byte header, then LevelDB-log
    records (crc32, length, type; 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, records = path.read_bytes(), 7, b"", []
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
            records.append(record)
            chunk = b""
    return records


def _wandb_runs(out: Path) -> dict[str, dict]:
    """Per W&B run id: its name, config, summary and history steps (over every offline directory
    of that id: a resumed run continues in a new one)."""
    runs: dict[str, dict] = {}
    for path in sorted((out / "wandb").glob("offline-run-*/*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = runs.setdefault(record.run.run_id, {"config": {}, "summary": {}, "steps": []})
                run["name"] = record.run.display_name
                for item in record.run.config.update:
                    run["config"][item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in record.config.update:
                    run["config"][item.key] = json.loads(item.value_json)
            elif kind == "history":
                items = {
                    i.nested_key[0] or i.key: json.loads(i.value_json) for i in record.history.item
                }
                run["steps"].append(items["_step"])
            elif kind == "summary":
                for item in record.summary.update:
                    key = "/".join(item.nested_key) if item.nested_key else item.key
                    run["summary"][key] = json.loads(item.value_json)
    return runs


def _tensorboard(log_dir: Path) -> tuple[dict, dict]:
    """(scalars tag -> [(step, value)], the HPARAMS session's hyper-parameters)."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    hp: dict = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.WhichOneof("data") == "session_start_info":
            for key, value in data.session_start_info.hparams.items():
                hp[key] = getattr(value, value.WhichOneof("kind"))
    return scalars, hp


def _check(out: Path, complete_wandb: tuple[int, ...] = (0, 1)) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "mnist1d"]
    mlflow_runs = client.search_runs([experiment.experiment_id])
    # every run once, finished
    assert sorted(r.info.run_name for r in mlflow_runs) == sorted(f"{lb}/seed{s}" for lb, s in RUNS)
    assert {r.info.status for r in mlflow_runs} == {"FINISHED"}
    by_name = {r.info.run_name: r for r in mlflow_runs}
    wandb_runs = {run["name"]: run for run in _wandb_runs(out).values()}  # one id per run
    assert len(_wandb_runs(out)) == len(RUNS)
    assert sorted(wandb_runs) == sorted(f"{lb}/seed{s}" for lb, s in RUNS)
    for label, seed in RUNS:
        name = f"{label}/seed{seed}"
        result, records = _result(out, label, seed), _records(out, label, seed)
        epochs = [r["epoch"] for r in records]
        assert epochs == [1, 2, 3]
        final = {f"final/{k}": v for k, v in result.items() if k.split("_")[0] in ("val", "test")}
        assert "final/val_accuracy" in final and "final/test_accuracy" in final
        method = label
        # MLflow: params, per-epoch history (each epoch once), final metrics
        run = by_name[name]
        params = run.data.params
        assert params["method"] == method and params["seed"] == str(seed)
        assert params["lr"] == "0.1" and params["epochs"] == "3"
        assert params["model"] == "mnist1d_cnn" and params["dataset"] == "mnist1d"
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == epochs
        for key, value in final.items():
            assert run.data.metrics[key] == pytest.approx(value)
        # the common final name holds the final model's (the average's for SWA)
        if label == "swa":
            assert records[-1]["avg_test_accuracy"] == pytest.approx(result["test_accuracy"])
        # TensorBoard: hparams, per-epoch scalars (each epoch once), final scalars
        scalars, hp = _tensorboard(out / "tb" / label / f"seed{seed}")
        assert hp["method"] == method and hp["lr"] == 0.1 and hp["model"] == "mnist1d_cnn"
        assert hp["seed"] == seed and hp["status"] == "done"
        assert [s for s, _ in scalars["train_loss"]] == epochs
        for key, value in final.items():
            assert scalars[key] == [(3, pytest.approx(value, rel=1e-6))]
        # W&B: config, history steps (each once), summary
        wb = wandb_runs[name]
        assert wb["config"]["method"] == method and wb["config"]["lr"] == 0.1
        assert wb["config"]["dataset"] == "mnist1d" and wb["config"]["seed"] == seed
        if seed in complete_wandb:
            assert wb["steps"] == epochs
        else:  # what a killed process had not yet flushed is lost: the resumed run goes on
            assert set(wb["steps"]) <= set(epochs) and wb["steps"][-1] == 3
        for key, value in final.items():
            assert wb["summary"][key] == pytest.approx(value)
        # CSV
        with (out / label / f"seed{seed}" / "metrics.csv").open() as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == epochs


def test_trackers_under_jobs_with_sharing_after_a_crashed_attempt(tmp_path, monkeypatch):
    # An earlier W&B test leaves this process's wandb-core service in WANDB_SERVICE, which child
    # processes inherit: the crashed attempt would register its runs in that service, which
    # outlives it and keeps their ids "in use". A user's killed run takes its own service with it.
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    out = tmp_path / "run"
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH, str(out), *OVERRIDES],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert crashed.returncode == 3, crashed.stderr[-2000:]
    assert not (out / "sgd/seed1/result.json").exists()  # the crash left runs unfinished
    cfg = load_config("mnist1d", OVERRIDES)
    run_experiment(cfg, out, log=lambda _: None, progress=False, jobs=2)
    _check(out, complete_wandb=(0,))


def test_a_half_built_mlflow_store_is_set_aside(tmp_path):
    from swalab.lab.config import to_dict
    from swalab.lab.rundir import RunDirectory

    out = tmp_path / "run"
    cfg = load_config("mnist1d", OVERRIDES)
    RunDirectory(out).write_config(to_dict(cfg))  # a first attempt that got as far as the store
    # what an interrupted schema migration leaves: the version table and part of the schema
    with sqlite3.connect(out / "mlflow.db") as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        db.execute("INSERT INTO alembic_version VALUES ('451aebb31d03')")
        db.execute("CREATE TABLE experiments (experiment_id INTEGER, name VARCHAR(256))")
    run_experiment(cfg, out, log=lambda _: None, progress=False, jobs=2)
    assert (out / "mlflow.db.broken").is_file()
    _check(out)
