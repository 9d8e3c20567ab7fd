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

A resumed run continues its writers: TensorBoard purges the steps it writes again, the CSV file
drops rows past the checkpoint, MLflow and W&B reopen the same run.
"""

from __future__ import annotations

import csv
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
from .files import append_text, atomic_write_text

__all__ = ["TRACKERS", "EpochReporter", "RunTrackers", "check_trackers", "open_trackers"]

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


class _TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def log(self, record: dict[str, Any]) -> None:
        if (
            self.writer is None
        ):  # opened at the first record: a resumed run purges the steps it rewrites
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir), purge_step=record["epoch"])
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

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

    def close(self) -> None:
        pass


class _MLflow:
    """A run of the local MLflow store; its id is kept in the run directory for a resume."""

    def __init__(
        self, store: Path, experiment: str, name: str, params: dict[str, Any], id_file: Path
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(
                experiment, artifact_location=(store.parent / "mlartifacts").resolve().as_uri()
            )
        )
        if id_file.exists():
            self.run_id = json.loads(id_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=name)
            self.run_id = run.info.run_id
            for key, value in params.items():
                self.client.log_param(self.run_id, key, value)
            atomic_write_text(id_file, json.dumps({"run_id": self.run_id}))

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, v, now, record["epoch"]) for k, v in _scalars(record).items()],
        )

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    """An offline W&B run whose id is derived from the run directory, so a resume reopens it."""

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
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["epoch"])

    def close(self) -> None:
        self.run.finish()


class RunTrackers:
    """The trackers of one (method, seed) run: ``log(record)`` per epoch, then ``close()``."""

    def __init__(self, writers: list[Any]) -> None:
        self.writers = writers

    def log(self, record: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.log(record)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def open_trackers(
    names: Sequence[str], out: Path, label: str, seed: int, config: dict[str, Any]
) -> RunTrackers:
    """The writers ``names`` for run ``<out>/<label>/seed<seed>`` of the experiment ``config``."""
    run_dir = out / label / f"seed{seed}"
    experiment = str(config.get("name", "experiment"))
    method = next((m for m in config.get("methods", []) if m.get("label") == label), {})
    params = {
        "method": method.get("method", label),
        "label": label,
        "seed": seed,
        "budget": method.get("budget", 1.0),
        **{f"options.{k}": v for k, v in method.get("options", {}).items()},
    }
    writers: list[Any] = []
    for name in names:
        if name == "tensorboard":
            writers.append(_TensorBoard(out / "tb" / label / f"seed{seed}"))
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
            writers.append(_Wandb(out, experiment, label, seed, {**config, "run": params}, run_dir))
    return RunTrackers(writers)


class SeedTrackers:
    """The trackers of the runs of one seed that train together (shared trajectories): a run's
    are opened at its first record and closed when it ends."""

    def __init__(self, names: Sequence[str], out: Path, seed: int, config: dict[str, Any]) -> None:
        self.names, self.out, self.seed, self.config = names, out, seed, config
        self.open: dict[str, RunTrackers] = {}

    def log(self, method: Any, record: dict[str, Any]) -> None:
        if method.label not in self.open:
            self.open[method.label] = open_trackers(
                self.names, self.out, method.label, self.seed, self.config
            )
        self.open[method.label].log(record)

    def close(self, label: str | None = None) -> None:
        """Close the trackers of run ``label`` (of every run if None)."""
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
