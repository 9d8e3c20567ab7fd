"""Reading a laboratory run directory back: its config, results, per-run files and data.

Every missing piece is reported as one line that names the file and the command that produces it.
"""
from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..data import DataBundle
from ..lab.config import ConfigError, ExperimentConfig, MethodConfig, load_config
from ..lab.runner import load_bundle, read_results
from ..lab.files import RunFileError, load_torch
from ..lab.trainer import bn_loader
from ..models import create as create_model

__all__ = ["RunDir"]


class RunDir:
    """A run directory written by ``swalab run``.

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: it is not a directory, is empty, or holds no (valid) swalab run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} does not exist; create a run with `swalab run mnist1d --out {self.path}`")
        if not self.path.is_dir():
            raise ValueError(f"{self.path} is not a directory; pass a run directory written by `swalab run`")
        config = self.path / "config.yaml"
        if not config.is_file():
            what = "is empty" if not any(self.path.iterdir()) else "holds no swalab run (no config.yaml)"
            raise ValueError(f"{self.path} {what}; create a run with `swalab run mnist1d --out {self.path}`")
        try:
            self.cfg: ExperimentConfig = load_config(str(config))
        except ConfigError as err:
            raise ValueError(f"{config} is not a swalab config ({err}); is {self.path} a run directory?") from None

    # --- commands that produce missing files ---

    @property
    def resume_command(self) -> str:
        return f"swalab run {self.path / 'config.yaml'} --out {self.path}"

    @property
    def trajectory_command(self) -> str:
        """How to get ``trajectory.pt`` files (they are only written when the config asks for them)."""
        return (f"re-run with --set train.save_trajectory=true into a new directory, e.g. "
                f"`swalab run {self.path / 'config.yaml'} --out {self.path}-traj --set train.save_trajectory=true`")

    # --- results ---

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.cfg.methods]

    def results(self) -> list[dict[str, str]]:
        """The rows of ``results.csv``; an error naming the command when there are none."""
        rows = read_results(self.path)
        if not rows:
            raise ValueError(f"no results in {self.path} (results.csv missing or empty); "
                             f"finish the runs with `{self.resume_command}`")
        return rows

    def method(self, label: str) -> MethodConfig:
        for m in self.cfg.methods:
            if m.label == label:
                return m
        raise ValueError(f"no method labelled {label!r} in {self.path} (labels: {', '.join(self.labels)})")

    def default_label(self, method_name: str) -> str | None:
        """The first method ``method_name`` at budget 1, else the first ``method_name`` at all, else None."""
        named = [m for m in self.cfg.methods if m.method == method_name]
        chosen = [m for m in named if m.budget == 1.0] or named
        return chosen[0].label if chosen else None

    def seed(self, seed: int | None) -> int:
        if seed is None:
            return self.cfg.seeds[0]
        if seed not in self.cfg.seeds:
            raise ValueError(f"seed {seed} is not among the seeds of {self.path} ({self.cfg.seeds})")
        return seed

    def run_dir(self, label: str, seed: int) -> Path:
        self.method(label)
        return self.path / label / f"seed{seed}"

    def file(self, label: str, seed: int, name: str) -> Path:
        """``<label>/seed<k>/<name>``, or a one-line error naming the command that writes it."""
        path = self.run_dir(label, seed) / name
        if path.is_file():
            return path
        if name == "trajectory.pt":
            raise FileNotFoundError(f"no trajectory.pt in {path.parent}; {self.trajectory_command}")
        raise FileNotFoundError(f"no {name} in {path.parent} (run unfinished); finish it with `{self.resume_command}`")

    def metrics(self, label: str, seed: int) -> list[dict[str, Any]]:
        path = self.run_dir(label, seed) / "metrics.jsonl"
        if not path.is_file():
            return []
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as err:
            raise RunFileError(f"cannot read {path}: {str(err).splitlines()[0]}; delete {path.parent} "
                               f"to retrain that run") from None

    def load(self, label: str, seed: int, name: str) -> Any:
        return load_torch(self.file(label, seed, name))

    # --- model and data ---

    def data(self, seed: int) -> DataBundle:
        return load_bundle(self.cfg, seed)

    def model(self, bundle: DataBundle) -> nn.Module:
        return create_model(self.cfg.model.name, bundle.in_shape, bundle.num_outputs, **self.cfg.model.options)

    def bn_loader(self, bundle: DataBundle, seed: int, device: torch.device | None = None) -> Iterable[Any]:
        """The training run's own BatchNorm-recomputation pass."""
        return bn_loader(self.cfg, bundle, seed, device)
