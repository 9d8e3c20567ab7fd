"""Reading a laboratory run directory back for the report: its config, results, per-run files, data.

A thin reader over ``lab/rundir.py`` (which alone knows the layout): every missing piece is reported
as one line that names the file and the command that produces it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DATASETS, DataBundle
from ..lab.config import ConfigError, ExperimentConfig, MethodConfig, load_config
from ..lab.files import load_torch
from ..lab.inputs import bn_loader, build_model, load_bundle
from ..lab.methods import METHODS
from ..lab.rundir import RunDirectory
from ..lab.runimports import trust_run_imports
from ..lab.runschema import check_weights
from ..models import MODELS
from ..registry import UntrustedImportError

__all__ = ["RunDir"]


class RunDir(RunDirectory):
    """A run directory written by ``swalab run``, checked to hold a valid config.

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: it is not a directory, is empty, or holds no (valid) swalab run.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        if not self.path.exists():
            raise FileNotFoundError(
                f"{self.path} does not exist; create a run with `swalab run mnist1d --out {self.path}`"
            )
        if not self.path.is_dir():
            raise ValueError(
                f"{self.path} is not a directory; pass a run directory written by `swalab run`"
            )
        config = self.config_path
        if not config.exists() and not config.is_symlink():
            what = (
                "is empty"
                if not any(self.path.iterdir())
                else "holds no swalab run (no config.yaml)"
            )
            raise ValueError(
                f"{self.path} {what}; create a run with `swalab run mnist1d --out {self.path}`"
            )
        self.check_config()  # a regular file, not edited since the run
        trust_run_imports(self)  # allowed modules: from the run's own folder
        try:
            self.cfg: ExperimentConfig = load_config(str(config))
        except UntrustedImportError as err:
            raise UntrustedImportError(f"{config}: {err}") from None
        except ConfigError as err:
            raise ValueError(
                f"{config} is not a swalab config ({err}); is {self.path} a run directory?"
            ) from None

    # --- commands that produce missing files ---

    @property
    def resume_command(self) -> str:
        return f"swalab run {self.config_path} --out {self.path}"

    @property
    def trajectory_command(self) -> str:
        """How to get trajectories (they are only written when the config asks for them)."""
        return (
            f"re-run with --set train.save_trajectory=true into a new directory, e.g. "
            f"`swalab run {self.config_path} --out {self.path}-traj --set train.save_trajectory=true`"
        )

    # --- results ---

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.cfg.methods]

    def results(self) -> list[dict[str, str]]:
        """The rows of ``results.csv``; an error naming the command when there are none."""
        rows = super().results()
        if not rows:
            raise ValueError(
                f"no results in {self.path} (results.csv missing or empty); "
                f"finish the runs with `{self.resume_command}`"
            )
        return rows

    def method(self, label: str) -> MethodConfig:
        for m in self.cfg.methods:
            if m.label == label:
                return m
        raise ValueError(
            f"no method labelled {label!r} in {self.path} (labels: {', '.join(self.labels)})"
        )

    def default_label(self, role: str) -> str | None:
        """The first method of ``role`` (see ``lab.methods.ROLES``) at budget 1, else the first of
        that role at all, else None."""
        return self.cfg.default_label(role)

    def seed(self, seed: int | None) -> int:
        if seed is None:
            return self.cfg.seeds[0]
        if seed not in self.cfg.seeds:
            raise ValueError(
                f"seed {seed} is not among the seeds of {self.path} ({self.cfg.seeds})"
            )
        return seed

    def run_dir(self, label: str, seed: int) -> Path:
        self.method(label)
        return self.run(label, seed).path

    def file(self, label: str, seed: int, name: str) -> Path:
        """``<label>/seed<k>/<name>``, or a one-line error naming the command that writes it."""
        path = self.run_dir(label, seed) / name
        if path.exists() or path.is_symlink():  # a damaged one is named when it is read
            return path
        raise FileNotFoundError(
            f"no {name} in {path.parent} (run unfinished); finish it with `{self.resume_command}`"
        )

    def trajectory(self, label: str, seed: int) -> list[dict[str, Any]]:
        """Weights after every epoch, or a one-line error naming the command that writes them."""
        files = self.run(label, seed)
        if not files.has_trajectory:
            raise FileNotFoundError(f"no trajectory in {files.path}; {self.trajectory_command}")
        return files.trajectory()

    def check_trajectory(self, label: str, seed: int) -> None:
        if not self.run(label, seed).has_trajectory:
            path = self.run(label, seed).path
            raise FileNotFoundError(f"no trajectory in {path}; {self.trajectory_command}")

    def metrics(self, label: str, seed: int) -> list[dict[str, Any]]:
        return self.run(label, seed).metrics()

    def load(self, label: str, seed: int, name: str) -> Any:
        """``checkpoint.pt`` or a weights file (``final.pt``, ...), checked by its schema."""
        path = self.file(label, seed, name)
        if name == "checkpoint.pt":
            return self.run(label, seed).checkpoint()
        return check_weights(path, load_torch(path, root=self.path))

    # --- model and data ---

    def check_code(self) -> None:
        """Import the dataset's, the model's and the methods' builders now, before any work, for
        the commands that rebuild the model (``landscape``): a module the user has not allowed
        with ``--allow-import`` stops them in one line naming it and the flag."""
        try:
            DATASETS.get(self.cfg.data.name)
            MODELS.get(self.cfg.model.name)
            for m in self.cfg.methods:
                METHODS.get(m.method)
        except UntrustedImportError as err:
            raise UntrustedImportError(f"{self.config_path}: {err}") from None

    def data(self, seed: int) -> DataBundle:
        return load_bundle(self.cfg, seed)

    def model(self, bundle: DataBundle) -> nn.Module:
        return build_model(self.cfg, bundle)

    def bn_loader(
        self, bundle: DataBundle, seed: int, device: torch.device | None = None
    ) -> Iterable[Any]:
        """The training run's own BatchNorm-recomputation pass."""
        return bn_loader(self.cfg, bundle, seed, device)
