"""Per-epoch reporting of laboratory runs: experiment trackers and the progress lines.

``train.log: [tensorboard, csv, wandb, mlflow]`` sends every epoch's record of a run — ``lr``,
``train_loss``, the iterate's ``test_*`` and the running average's ``avg_test_*`` metrics — to
each named tracker, one writer per (method, seed), step = epoch:

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` in ``<out>/tb/<label>/seed<k>``, so
  ``tensorboard --logdir <out>/tb`` compares the methods;
- ``csv``: ``<out>/<label>/seed<k>/metrics.csv``, one row per epoch;
- ``mlflow``: a run ``<label>/seed<k>`` of the experiment named after the config, in the local
  store ``sqlite:///<out>/mlflow.db`` (MLflow 3 keeps its ``file:`` store in maintenance mode and
  refuses it by default);
- ``wandb``: an offline W&B run under ``<out>/wandb`` (``wandb sync`` uploads it later).

Every tracked run also holds the run's hyper-parameters (:func:`hparams`: method, lr, epochs,
model, dataset, options ...; TensorBoard's HPARAMS tab, MLflow params, W&B config) and, when it
ends, the final model's metrics on every split under one name for every method:
``final/test_accuracy`` is the iterate's for SGD and the average's for SWA (``final/val_*`` the
validation split's; the per-epoch ``test_*`` stay the iterate's, ``avg_test_*`` the average's).

One tracked run per swalab run, opened and finished in the process that trains it, also when
several runs share a trajectory or train in ``--jobs`` workers: W&B runs are created side by
side (``reinit="create_new"``); the MLflow store is created once, by the main process before the
workers start (:func:`prepare_trackers`), whole (built beside and renamed into place, under a
lock), so a failed attempt never leaves a half-built store behind.

A resumed run continues its writers: TensorBoard purges the steps it writes again, the CSV file
drops rows past the checkpoint, MLflow and W&B reopen the same run.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import importlib.util
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import append_text, atomic_output, atomic_write_text

__all__ = [
    "TRACKERS",
    "EpochReporter",
    "RunTrackers",
    "check_trackers",
    "hparams",
    "open_trackers",
    "prepare_trackers",
]

# tracker name -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "csv": None, "mlflow": "mlflow", "wandb": "wandb"}


def check_trackers(names: Sequence[str], *, packages: bool = True) -> None:
    """One-line ``ConfigError`` for an unknown tracker or, with ``packages``, a missing package."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.log: unknown tracker {name!r} (known: {', '.join(TRACKERS)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.log names a tracker twice: {list(names)}")
    if packages:
        for name in names:
            package = TRACKERS[name]
            if package and importlib.util.find_spec(package) is None:
                raise ConfigError(
                    f"train.log: tracker {name!r} needs the package {package!r} "
                    f"(pip install {package})"
                )


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers, without the step (``epoch``)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "epoch"
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def _param(value: Any) -> bool | int | float | str:
    """A hyper-parameter as the trackers take it: a scalar, else its JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def hparams(config: dict[str, Any], label: str, seed: int) -> dict[str, bool | int | float | str]:
    """The hyper-parameters of run ``label``/``seed`` of the experiment ``config`` (a dict of
    :class:`~swalab.lab.config.ExperimentConfig`), flat: what tells two tracked runs apart."""
    train, data = config.get("train", {}), config.get("data", {})
    model, pretrain = config.get("model", {}), config.get("pretrain", {})
    method = next((m for m in config.get("methods", []) if m.get("label") == label), {})
    flat: dict[str, Any] = {
        "experiment": config.get("name"),
        "method": method.get("method", label),
        "label": label,
        "seed": seed,
        "dataset": data.get("name"),
        "train_size": data.get("train_size"),
        "model": model.get("name"),
        "epochs": train.get("epochs"),
        "budget": method.get("budget", 1.0),
        "lr": method.get("lr") if method.get("lr") is not None else train.get("lr"),
        "optimizer": train.get("optimizer"),
        "momentum": train.get("momentum"),
        "weight_decay": train.get("weight_decay"),
        "batch_size": train.get("batch_size"),
        "augment": train.get("augment"),
        "precision": train.get("precision"),
        "pretrain_epochs": pretrain.get("epochs", 0),
        **{f"data.{k}": v for k, v in data.get("options", {}).items()},
        **{f"model.{k}": v for k, v in model.get("options", {}).items()},
        **{f"options.{k}": v for k, v in method.get("options", {}).items()},
    }
    return {k: _param(v) for k, v in flat.items() if v is not None}


def _final(result: Any) -> dict[str, float]:
    """The final model's metrics of a finished run, one name for every method (``final/...``)."""
    return {f"final/{k}": v for k, v in _scalars(dict(result.metrics)).items()}


class _TensorBoard:
    def __init__(self, log_dir: Path, params: dict[str, Any]) -> None:
        self.log_dir, self.params = log_dir, params
        self.writer: Any = None

    def _open(self, step: int) -> Any:
        if self.writer is None:  # at the first record: a resumed run purges the steps it rewrites
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=step)
        return self.writer

    def log(self, record: dict[str, Any]) -> None:
        writer = self._open(record["epoch"])
        for key, value in _scalars(record).items():
            writer.add_scalar(key, value, record["epoch"])
        writer.flush()

    def finish(self, result: Any) -> None:
        """The run's hyper-parameters with its final metrics (TensorBoard's HPARAMS tab), in this
        run's own event file (``SummaryWriter.add_hparams`` would start another run)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        writer = self._open(result.epochs)
        final = _final(result)
        for summary in hparams_summary(
            {**self.params, "status": result.status}, final or {"final/none": math.nan}
        ):
            writer.file_writer.add_summary(summary)
        for key, value in final.items():
            writer.add_scalar(key, value, result.epochs)
        writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _CSV:
    """Wide CSV, one row per epoch; a key appearing later (the average) rewrites the file once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = []
        self.header: list[str] = []
        self.started = False

    def _rewrite(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.header, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def log(self, record: dict[str, Any]) -> None:
        row = {"epoch": str(record["epoch"]), **{k: repr(v) for k, v in _scalars(record).items()}}
        if not self.started:  # keep the rows of the epochs before this one (a resumed run)
            self.started = True
            if self.path.exists():
                with self.path.open(newline="") as f:
                    reader = csv.DictReader(f)
                    self.header = list(reader.fieldnames or [])
                    self.rows = [r for r in reader if int(r["epoch"]) < record["epoch"]]
            self.header = self.header or ["epoch"]
            self.header += [k for k in row if k not in self.header]
            self.rows.append(row)
            self._rewrite()
            return
        self.rows.append(row)
        new = [k for k in row if k not in self.header]
        if new:
            self.header += new
            self._rewrite()
            return
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=self.header, restval="").writerow(row)
        append_text(self.path, buffer.getvalue())

    def finish(self, result: Any) -> None:
        """(The final metrics are the run's ``result.json`` beside this file.)"""

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _locked(path: Path) -> Any:
    """An advisory ``fcntl.flock`` on ``path`` (created), held for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _mlflow_client(store: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}")


@contextlib.contextmanager
def _mlflow_probe(store: Path, artifacts: str) -> Any:
    """MLflow's SQL store of ``store`` on a URI of its own (a ``timeout`` query) whose engine is
    dropped afterwards: a store found broken and set aside is never cached under the URI the
    runs use."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{store.resolve()}?timeout=60"
    try:
        yield SqlAlchemyStore(uri, artifacts)
    finally:
        engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()


def _mlflow_experiment(store: Path, experiment: str) -> str:
    """The id of ``experiment`` in the MLflow store ``store``, creating both when missing.

    The store is built whole beside ``store`` and renamed into place, under a lock: two processes
    never build it at once, and a store a killed process left unreadable is set aside
    (``mlflow.db.broken``) and built again rather than failing every later run.
    """
    artifacts = (store.parent / "mlartifacts").resolve().as_uri()
    with _locked(store.with_name(f".{store.name}.lock")):
        if store.exists():
            try:
                with _mlflow_probe(store, artifacts) as probe:
                    found = probe.get_experiment_by_name(experiment)
                    return (
                        found.experiment_id
                        if found
                        else probe.create_experiment(experiment, artifact_location=artifacts)
                    )
            except Exception:  # noqa: BLE001  (any failure to read it: a half-built store)
                store.replace(store.with_name(store.name + ".broken"))
        with atomic_output(store) as tmp, _mlflow_probe(tmp, artifacts) as probe:
            experiment_id = probe.create_experiment(experiment, artifact_location=artifacts)
        return experiment_id


class _MLflow:
    """A run of the local MLflow store; its id is kept in the run directory for a resume."""

    def __init__(
        self, store: Path, experiment: str, name: str, params: dict[str, Any], id_file: Path
    ) -> None:
        from mlflow.entities import Param

        experiment_id = _mlflow_experiment(store, experiment)
        self.client = _mlflow_client(store)
        self.run_id, self.logged = "", 0
        if id_file.exists():  # a resume: the same run, unless the store was built again
            run_id = json.loads(id_file.read_text())["run_id"]
            with contextlib.suppress(Exception):
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                # the epochs it holds already (a crash between checkpoint and log re-runs one)
                history = self.client.get_metric_history(run_id, "train_loss")
                self.logged = max((m.step for m in history), default=0)
        if not self.run_id:
            run = self.client.create_run(experiment_id, run_name=name)
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
            atomic_write_text(id_file, json.dumps({"run_id": self.run_id}))

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        if record["epoch"] <= self.logged:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, v, now, record["epoch"]) for k, v in _scalars(record).items()],
        )

    def finish(self, result: Any) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, v, now, result.epochs) for k, v in _final(result).items()],
        )
        self.client.set_tag(self.run_id, "swalab.status", result.status)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    """An offline W&B run whose id is derived from the run directory, so a resume reopens it.

    ``reinit="create_new"``: runs that share a trajectory are open side by side in one process
    (W&B's default would hand back the first and finish it with that run)."""

    def __init__(
        self, root: Path, project: str, label: str, seed: int, config: dict[str, Any], run_dir: Path
    ) -> None:
        import wandb

        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            group=label,
            name=f"{label}/seed{seed}",
            id=run_id,
            resume="allow",
            dir=str(root),
            mode="offline",
            config=config,
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["epoch"])

    def finish(self, result: Any) -> None:
        self.run.summary.update({**_final(result), "status": result.status})

    def close(self) -> None:
        self.run.finish()


class RunTrackers:
    """The trackers of one (method, seed) run: ``log(record)`` per epoch, ``finish(result)`` when
    it ends (its final metrics), then ``close()``."""

    def __init__(self, writers: list[Any]) -> None:
        self.writers = writers

    def log(self, record: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.log(record)

    def finish(self, result: Any) -> None:
        for writer in self.writers:
            writer.finish(result)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def prepare_trackers(names: Sequence[str], out: Path, config: dict[str, Any]) -> None:
    """What the trackers share between the runs, made once by the main process before any worker
    starts: the MLflow store and experiment."""
    if "mlflow" in names:
        _mlflow_experiment(out / "mlflow.db", str(config.get("name", "experiment")))
    if "wandb" in names:
        (out / "wandb").mkdir(parents=True, exist_ok=True)


def open_trackers(
    names: Sequence[str], out: Path, label: str, seed: int, config: dict[str, Any]
) -> RunTrackers:
    """The writers ``names`` for run ``<out>/<label>/seed<seed>`` of the experiment ``config``."""
    run_dir = out / label / f"seed{seed}"
    experiment = str(config.get("name", "experiment"))
    params = hparams(config, label, seed)
    writers: list[Any] = []
    for name in names:
        if name == "tensorboard":
            writers.append(_TensorBoard(out / "tb" / label / f"seed{seed}", params))
        elif name == "csv":
            writers.append(_CSV(run_dir / "metrics.csv"))
        elif name == "mlflow":
            writers.append(
                _MLflow(
                    out / "mlflow.db",
                    experiment,
                    f"{label}/seed{seed}",
                    params,
                    run_dir / "mlflow.json",
                )
            )
        elif name == "wandb":
            writers.append(
                _Wandb(out, experiment, label, seed, {**params, "swalab": config}, run_dir)
            )
    return RunTrackers(writers)


class SeedTrackers:
    """The trackers of the runs of one seed that train together (shared trajectories): a run's
    are opened at its first record and closed when it ends."""

    def __init__(self, names: Sequence[str], out: Path, seed: int, config: dict[str, Any]) -> None:
        self.names, self.out, self.seed, self.config = names, out, seed, config
        self.open: dict[str, RunTrackers] = {}

    def _of(self, label: str) -> RunTrackers:
        if label not in self.open:
            self.open[label] = open_trackers(self.names, self.out, label, self.seed, self.config)
        return self.open[label]

    def log(self, method: Any, record: dict[str, Any]) -> None:
        self._of(method.label).log(record)

    def close(self, label: str | None = None, result: Any = None) -> None:
        """Close the trackers of run ``label`` (of every run if None), first recording
        ``result`` (a ``RunResult``: its status and final metrics) when given."""
        if label is not None and result is not None and self.names:
            self._of(label).finish(result)
        for key in [label] if label is not None else list(self.open):
            trackers = self.open.pop(key, None)
            if trackers is not None:
                trackers.close()


class EpochReporter:
    """Counts epochs (pre-training and training) on the progress bar and prints a line per epoch
    when there is no bar.

    The total starts as every epoch the unfinished runs could need; epochs a resumed run had
    already done are taken off it when the run reports its first epoch. The ETA is the time per
    epoch since the first epoch this process finished (so neither the epochs of an earlier process
    nor one-off start-up work such as building the dataset count) times the epochs left.
    """

    def __init__(self, bar: Any, task: Any, log: Callable[[str], None], lines: bool) -> None:
        self.bar, self.task, self.log, self.lines = bar, task, log, lines
        self.done = 0
        self.total = 0
        self.started = time.perf_counter()
        self.first: float | None = None  # when the first epoch of this process ended

    def set_total(self, total: int) -> None:
        self.total = total
        self.bar.update(self.task, total=total)

    def skip(self, epochs: int) -> None:
        """``epochs`` counted in the total that this process will not run."""
        if epochs > 0:
            self.set_total(self.total - epochs)

    def eta(self, now: float | None = None) -> float:
        """Seconds left; NaN until two epochs have ended (one gives no rate without start-up)."""
        now = time.perf_counter() if now is None else now
        if self.first is None or self.done < 2:
            return math.nan
        return (now - self.first) / (self.done - 1) * max(self.total - self.done, 0)

    def eta_text(self, now: float | None = None) -> str:
        eta = self.eta(now)
        return "?" if math.isnan(eta) else f"{eta:.0f} s"

    def epoch(self, what: str, record: dict[str, Any], of: int) -> None:
        """Epoch ``record["epoch"]`` of ``of`` of the run (or pre-training) ``what`` is done."""
        now = time.perf_counter()
        self.done += 1
        if self.first is None:
            self.first = now
        self.bar.advance(self.task)
        if not self.lines:
            return
        metrics = " ".join(
            f"{k} {v:.4g}"
            for k, v in record.items()
            if k in ("train_loss", "test_accuracy", "avg_test_accuracy", "test_mse", "avg_test_mse")
            and isinstance(v, (int, float))
        )
        self.log(
            f"{what} epoch {record['epoch']}/{of}: {metrics}{' ' if metrics else ''}"
            f"[{self.done}/{self.total} epochs, {now - self.started:.0f} s, "
            f"ETA {self.eta_text(now)}]"
        )
