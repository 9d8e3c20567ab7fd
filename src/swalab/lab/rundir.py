"""The layout of a run directory, and every read and write of its files.

::

    config.yaml  meta.json  results.csv
    posthoc.csv                  `swalab posthoc`: one row per (seed, SWA window), window_map.png
    <method label>/seed<k>/
        metrics.jsonl            one JSON record per epoch, appended
        checkpoint.pt            model, optimizer, recipe state, RNG states, history (last epoch)
        init.pt  final.pt        weights before training and of the final model
        trajectory/epoch<n>.pt   weights after epoch n (train.save_trajectory), one file per epoch
        posthoc/                 swalab.posthoc snapshots after every epoch (posthoc.run)
        result.json              the run's row of results.csv, once it is finished
        per_sample.npz           the final model's per-sample test scores (the claims' sampling share)
    pretrain/seed<k>.pt          the shared pre-training's weights (only with a pre-training phase)

The trainer, the runner and the report use only this module to find and touch these files; the
file primitives (atomic writes, safe loads) are in ``files.py``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..posthoc import Snapshots
from .config import read_yaml
from .files import (
    RunFileError,
    append_text,
    atomic_output,
    atomic_save,
    atomic_write_text,
    load_npz,
    load_torch,
    read_json,
    read_text,
)
from .runschema import (
    check_checkpoint,
    check_meta,
    check_metrics,
    check_result,
    check_results_table,
    check_weights,
)

__all__ = ["RESULT_FIELDS", "RunDirectory", "RunFiles", "read_results"]

_SEAL = "# swalab run wrote this file; sha256 of what follows: "

RESULT_FIELDS = [
    "method",
    "method_name",
    "baseline",
    "seed",
    "budget",
    "epochs",
    "status",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_mse",
    "test_loss",
    "test_accuracy",
    "test_ece",
    "test_mse",
    "large_test_loss",
    "large_test_accuracy",
    "large_test_mse",
    "seconds",
    "message",
]


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


class RunFiles:
    """The files of one (method, seed) run, ``<out>/<label>/seed<k>/``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.result_path = self.path / "result.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.trajectory_dir = self.path / "trajectory"

    @property
    def experiment(self) -> RunDirectory:
        """The run directory this run belongs to (``<out>``)."""
        return RunDirectory(self.path.parent.parent)

    @property
    def started(self) -> bool:
        """Whether this run has trained at least one epoch (or finished)."""
        return self.checkpoint_path.exists() or self.result_path.exists()

    # --- results ---

    @property
    def root(self) -> Path:
        """The run directory (``<out>``): no file of this run is read from outside it."""
        return self.path.parent.parent

    def result(self) -> dict[str, Any] | None:
        if not self.result_path.exists():
            return None
        return check_result(self.result_path, read_json(self.result_path, root=self.root))

    def write_result(self, row: dict[str, Any]) -> None:
        atomic_write_text(self.result_path, json.dumps(row, indent=2))

    # --- learning curve ---

    def metrics(self) -> list[dict[str, Any]]:
        path = self.metrics_path
        if not path.exists() and not path.is_symlink():
            return []
        records = []
        for number, line in enumerate(read_text(path, root=self.root).splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise RunFileError(
                    f"cannot read {path}: line {number} is not valid JSON "
                    f"({str(err).splitlines()[0]}); delete {path.parent} to retrain that run"
                ) from None
        if not records:  # written with the first epoch: never empty once it exists
            raise RunFileError(
                f"cannot read {path}: it is empty; delete {path.parent} to retrain that run"
            )
        return check_metrics(path, records)

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_text(self.metrics_path, _jsonl([record]))

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Rewrite the whole curve (on resuming: the checkpoint's history is the truth)."""
        atomic_write_text(self.metrics_path, _jsonl(records))

    # --- weights and checkpoints ---

    def checkpoint(self) -> dict[str, Any] | None:
        path = self.checkpoint_path
        if not path.exists() and not path.is_symlink():
            return None
        return check_checkpoint(path, load_torch(path, root=self.root))

    def resume_point(self) -> int | None:
        """Epochs this run has trained (0 if none), or None if it diverged."""
        path = self.checkpoint_path
        if not path.exists() and not path.is_symlink():
            return 0
        # the tensors stay on disk
        ckpt = check_checkpoint(path, load_torch(path, mmap=True, root=self.root), full=False)
        return None if ckpt.get("diverged") else ckpt["epoch"] + 1

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_save(state, self.checkpoint_path)

    def mark_diverged(self, message: str) -> None:
        """Keep the last good checkpoint, flagged: a re-run reports the divergence, not retrying."""
        ckpt = self.checkpoint() or {"epoch": -1}
        ckpt["diverged"] = message
        self.save_checkpoint(ckpt)

    def save_weights(self, name: str, state: dict[str, Any]) -> None:
        """``init.pt`` or ``final.pt``."""
        atomic_save(state, self.path / f"{name}.pt")

    def weights_path(self, name: str) -> Path:
        return self.path / f"{name}.pt"

    def snapshots(self, every: int | None = None) -> Snapshots:
        """The run's ``swalab.posthoc`` snapshots (``posthoc/``), opened once and kept."""
        if getattr(self, "_snapshots", None) is None:
            self._snapshots = Snapshots(self.path / "posthoc", every=every, output=atomic_output)
        return self._snapshots

    def weights(self, name: str) -> dict[str, Any]:
        """``init.pt`` or ``final.pt``, checked (FileNotFoundError when missing)."""
        path = self.weights_path(name)
        return check_weights(path, load_torch(path, root=self.root))

    @property
    def per_sample_path(self) -> Path:
        return self.path / "per_sample.npz"

    def save_per_sample(self, scores: dict[str, Any]) -> None:
        """The final model's per-sample scores on the test sets (``Task.per_sample``), one array
        per split name: what the claims' test-sampling share reads."""
        with atomic_output(self.per_sample_path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in scores.items()})

    def per_sample(self) -> dict[str, Any]:
        """The arrays :meth:`save_per_sample` wrote ({} when the run has none)."""
        if not self.per_sample_path.is_file():
            return {}
        return load_npz(self.per_sample_path, root=self.root)

    def append_trajectory(self, epoch: int, state: dict[str, Any]) -> None:
        """The weights after 1-based ``epoch``: one file per epoch, nothing re-read."""
        atomic_save(state, self.trajectory_dir / f"epoch{epoch:05d}.pt")

    @property
    def has_trajectory(self) -> bool:
        first, old = self.trajectory_dir / "epoch00001.pt", self.path / "trajectory.pt"
        # a damaged file counts (it is named when read), a missing one does not
        return any(p.exists() or p.is_symlink() for p in (first, old))

    def trajectory(self) -> list[dict[str, Any]]:
        """Weights after epochs 1, 2, ... (older runs kept them in one ``trajectory.pt``)."""
        if not self.trajectory_dir.is_dir():
            path = self.path / "trajectory.pt"
            states = load_torch(path, root=self.root)
            if not isinstance(states, list):
                raise RunFileError(f"cannot read {path}: expected a list of state dicts")
            return [check_weights(path, state) for state in states]
        states, epoch = [], 1
        while (path := self.trajectory_dir / f"epoch{epoch:05d}.pt").exists() or path.is_symlink():
            states.append(check_weights(path, load_torch(path, root=self.root)))
            epoch += 1
        return states


class RunDirectory:
    """A run directory: the experiment's config, meta data, results table and per-run files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"

    def run(self, label: str, seed: int) -> RunFiles:
        return RunFiles(self.path / label / f"seed{seed}")

    def saved_config(self) -> dict[str, Any] | None:
        """The config saved by an earlier ``swalab run`` as plain data, or None."""
        if not self.config_path.exists() and not self.config_path.is_symlink():
            return None
        self.check_config()
        return read_yaml(self.config_path)  # aliases refused, size bounded

    def check_config(self) -> None:
        """``config.yaml`` is a regular file of its own and, when ``swalab run`` sealed it, the one
        it wrote: a hand edit after the run is refused (its runs were trained under the other)."""
        text = read_text(self.config_path, root=self.path)
        first, _, body = text.partition("\n")
        if not first.startswith(_SEAL):
            return  # written by an older swalab, or by hand for a new run
        if first[len(_SEAL) :].strip() != hashlib.sha256(body.encode()).hexdigest():
            raise RunFileError(
                f"{self.config_path} was edited after `swalab run` wrote it (its sha256 differs "
                "from its first line): its runs were trained under the config it held; restore "
                "it, or copy it elsewhere and run that into a new --out"
            )

    def write_config(self, data: dict[str, Any]) -> None:
        """``config.yaml``, sealed with the sha256 of its text on a first comment line."""
        body = yaml.safe_dump(data, sort_keys=False)
        digest = hashlib.sha256(body.encode()).hexdigest()
        atomic_write_text(self.config_path, f"{_SEAL}{digest}\n{body}")

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2))

    def meta(self) -> dict[str, Any]:
        path = self.path / "meta.json"
        if not path.exists() and not path.is_symlink():
            return {}
        return check_meta(path, read_json(path, root=self.path))

    def results(self) -> list[dict[str, str]]:
        return read_results(self.path)

    def write_results(self, rows: list[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in RESULT_FIELDS})
        atomic_write_text(self.path / "results.csv", buffer.getvalue())

    def posthoc_results(self) -> list[dict[str, str]]:
        """The rows of ``posthoc.csv`` (none before ``swalab posthoc``)."""
        path = self.path / "posthoc.csv"
        if not path.exists():
            return []
        with path.open() as f:
            return list(csv.DictReader(f))

    def write_posthoc_results(self, rows: list[dict[str, Any]]) -> None:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / "posthoc.csv", buffer.getvalue())

    def pretrain_path(self, seed: int) -> Path:
        return self.path / "pretrain" / f"seed{seed}.pt"

    def load_pretrain(self, seed: int) -> dict[str, Any] | None:
        path = self.pretrain_path(seed)
        if not path.exists() and not path.is_symlink():
            return None
        return check_weights(path, load_torch(path, root=self.path))

    def save_pretrain(self, seed: int, state: dict[str, Any]) -> None:
        atomic_save(state, self.pretrain_path(seed))


def read_results(out: str | Path) -> list[dict[str, str]]:
    """The rows of ``out/results.csv`` (none when it does not exist)."""
    path = Path(out) / "results.csv"
    if not path.exists() and not path.is_symlink():
        return []
    try:
        reader = csv.DictReader(io.StringIO(read_text(path, root=Path(out))))
        rows = list(reader)
    except csv.Error as err:
        raise RunFileError(f"cannot read {path}: {err}; delete {path} to recompute it") from None
    check_results_table(path, list(reader.fieldnames or []), rows)
    return rows
