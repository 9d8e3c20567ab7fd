"""The layout of a run directory, and every read and write of its files.

::

    config.yaml  meta.json  results.csv
    <method label>/seed<k>/
        metrics.jsonl            one JSON record per epoch, appended
        checkpoint.pt            model, optimizer, recipe state, RNG states, history (last epoch)
        init.pt  final.pt        weights before training and of the final model
        trajectory/epoch<n>.pt   weights after epoch n (train.save_trajectory), one file per epoch
        result.json              the run's row of results.csv, once it is finished
        per_sample.npz           the final model's per-sample test scores (the claims' sampling share)
    pretrain/seed<k>.pt          the shared pre-training's weights (only with a pre-training phase)

The trainer, the runner and the report use only this module to find and touch these files; the
file primitives (atomic writes, safe loads) are in ``files.py``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .config import read_yaml
from .files import (
    RunFileError,
    append_text,
    atomic_output,
    atomic_save,
    atomic_write_text,
    load_torch,
    read_json,
)

__all__ = ["RESULT_FIELDS", "RunDirectory", "RunFiles", "read_results"]

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

    def result(self) -> dict[str, Any] | None:
        return read_json(self.result_path) if self.result_path.exists() else None

    def write_result(self, row: dict[str, Any]) -> None:
        atomic_write_text(self.result_path, json.dumps(row, indent=2))

    # --- learning curve ---

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        path = self.metrics_path
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as err:
            raise RunFileError(
                f"cannot read {path}: {str(err).splitlines()[0]}; delete {path.parent} "
                "to retrain that run"
            ) from None

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_text(self.metrics_path, _jsonl([record]))

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Rewrite the whole curve (on resuming: the checkpoint's history is the truth)."""
        atomic_write_text(self.metrics_path, _jsonl(records))

    # --- weights and checkpoints ---

    def checkpoint(self) -> dict[str, Any] | None:
        return load_torch(self.checkpoint_path) if self.checkpoint_path.exists() else None

    def resume_point(self) -> int | None:
        """Epochs this run has trained (0 if none), or None if it diverged."""
        if not self.checkpoint_path.exists():
            return 0
        ckpt = load_torch(self.checkpoint_path, mmap=True)  # the tensors stay on disk
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
        try:
            with np.load(self.per_sample_path, allow_pickle=False) as stored:
                return {k: stored[k] for k in stored.files}
        except (OSError, ValueError) as err:
            raise RunFileError(
                f"cannot read {self.per_sample_path}: {str(err).splitlines()[0]}"
            ) from None

    def append_trajectory(self, epoch: int, state: dict[str, Any]) -> None:
        """The weights after 1-based ``epoch``: one file per epoch, nothing re-read."""
        atomic_save(state, self.trajectory_dir / f"epoch{epoch:05d}.pt")

    @property
    def has_trajectory(self) -> bool:
        return (self.trajectory_dir / "epoch00001.pt").is_file() or (
            self.path / "trajectory.pt"
        ).is_file()

    def trajectory(self) -> list[dict[str, Any]]:
        """Weights after epochs 1, 2, ... (older runs kept them in one ``trajectory.pt``)."""
        if not self.trajectory_dir.is_dir():
            return load_torch(self.path / "trajectory.pt")
        states, epoch = [], 1
        while (self.trajectory_dir / f"epoch{epoch:05d}.pt").is_file():
            states.append(load_torch(self.trajectory_dir / f"epoch{epoch:05d}.pt"))
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
        if not self.config_path.exists():
            return None
        return read_yaml(self.config_path)  # aliases refused, size bounded

    def write_config(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(data, sort_keys=False))

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2))

    def meta(self) -> dict[str, Any]:
        path = self.path / "meta.json"
        return read_json(path) if path.is_file() else {}

    def results(self) -> list[dict[str, str]]:
        return read_results(self.path)

    def write_results(self, rows: list[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in RESULT_FIELDS})
        atomic_write_text(self.path / "results.csv", buffer.getvalue())

    def pretrain_path(self, seed: int) -> Path:
        return self.path / "pretrain" / f"seed{seed}.pt"

    def load_pretrain(self, seed: int) -> dict[str, Any] | None:
        path = self.pretrain_path(seed)
        return load_torch(path) if path.exists() else None

    def save_pretrain(self, seed: int, state: dict[str, Any]) -> None:
        atomic_save(state, self.pretrain_path(seed))


def read_results(out: str | Path) -> list[dict[str, str]]:
    """The rows of ``out/results.csv`` (none when it does not exist)."""
    path = Path(out) / "results.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))
