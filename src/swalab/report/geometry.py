"""``swalab landscape RUN_DIR``: loss-landscape geometry of a laboratory run, saved as data and figures.

For one seed of a run directory, with SGD = the SGD run at budget 1 and SWA = the SWA run (or the
labels given), this computes what the SWA paper shows (Izmailov et al., 2018, §3):

========== ===================================================================== ======================
piece      what                                                                  needs
========== ===================================================================== ======================
line       train loss / test error along ``t * w_SGD + (1 - t) * w_SWA``           final.pt of both
rays       along ``w + t d/||d||`` from both solutions (same directions), width   final.pt of both
plane      the paper's Fig. 1 (middle, right): plane through the iterate SGD and     final.pt; trajectory
           SWA start from (where their runs part), SGD's end and SWA; the SWA      of SWA (or SGD), or
           run's iterates projected                                                init.pt
plane_init plane through (SGD start, SGD end, SWA), SGD trajectory projected      init.pt, final.pt;
                                                                                  trajectory (path)
snapshots  plane through three averaged SWA snapshots, their average marked       trajectory of SWA
ensemble   Δ, agreement, KL, errors: the average vs the ensemble of snapshots     trajectory of SWA
predictions final test probabilities of every method (reliability diagrams)       checkpoint.pt
bn         w_SWA with the BN statistics it carries (the last iterate's) vs            final.pt, checkpoint.pt
           recomputed ones (paper §3.2; claim 6 of ``swalab claims``)                 of SWA; a BN model
curvature  Hessian top eigenvalue and trace of the train NLL at both solutions,    final.pt of both
           BN recomputed first (:mod:`swalab.curvature`; claim 2's second measure)
========== ===================================================================== ======================

Every evaluated point is loaded into one model instance, BatchNorm statistics are recomputed with
the training run's own BN pass (same batches at every point), and the train loss is the objective
SGD minimised, cross-entropy + ``wd/2 ||w||^2`` (the NLL alone is saved too). Results go to
``RUN_DIR/landscape/`` for the run's first seed, ``RUN_DIR/landscape/seed<k>/`` for another seed
(:func:`landscape_dir`): ``landscape.json`` (summary), one ``.npz`` and one ``.png`` per piece.
With ``stack > 1`` points are evaluated that many at a time with stacked weights
(``LandscapeEvaluator.evaluate_many``; the same numbers).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import landscape as geo
from ..bn import has_batchnorm
from ..curvature import curvature
from ..data import BatchLoader
from ..ensembles import ensemble_view, predict_outputs
from ..lab.config import LANDSCAPE_PIECES, LandscapeConfig, check_range
from ..lab.devices import resolve_device
from ..lab.evaluation import EvalContext
from ..lab.files import atomic_output, atomic_write_text, read_json, run_directory
from ..lab.jobs import die_with_parent, slots
from ..lab.methods import recipe_of
from ..lab.runschema import check_landscape
from ..lab.sharing import plan_branches
from ..lab.task import Task, task_of
from . import figures
from .progress import Progress
from .rundir import RunDir

__all__ = [
    "PIECES",
    "LandscapeOptions",
    "compute_landscape",
    "landscape_dir",
    "landscapes_of_run",
    "layer_norms",
    "ray_protocols",
]

PIECES = LANDSCAPE_PIECES
_DEFAULT = LandscapeConfig()  # the protocol's defaults, one place for the run and the command
METRICS = ("train_loss", "train_nll", "train_error", "test_loss", "test_nll", "test_error")


class _Missing(Exception):
    """A piece cannot be computed from this run directory; the message says what to do."""


@dataclass(frozen=True)
class LandscapeOptions:
    """Which runs, which pieces and how finely: the options of ``swalab landscape``.

    Args:
        seed: which seed's runs (default: the first).
        sgd, swa: method labels (default: the baseline and the averaging run at budget 1).
        what: pieces to compute (see the module docstring); one asked for by name that the
            directory cannot give is an error, while the default skips it with a one-line note.
        grid: points per side of the planes' grids; ``margin``: beyond [0, 1] on each side.
        line_points, line_range: ``t`` values of the line.
        rays, ray_points, ray_distance: number of random directions, points along each, and the
            largest distance (raw directions: Euclidean, default ``||w_SWA|| / 2``; filter and
            layer directions: in units of the normalised direction, default
            ``NORMALISED_RAY_DISTANCE`` = 0.25, each filter moved by a quarter of its own norm); ``rise``: train-NLL rise that defines the width;
            ``ray_tails``: evaluate each ray beyond the point where it rises that much (false:
            stop there: the same widths, train and test metrics up to there, NaN beyond in
            ``rays.npz``).
        directions: how the random directions are scaled, one set of rays each, the first the
            primary (``filter``, ``layer``, ``raw``: :func:`swalab.landscape.normalize_direction`).
            The planes go through three given weight vectors, whose axes are their differences,
            not random directions, so the option does not apply to them.
        device: where to evaluate (default: the run's ``train.device``).
        threads: CPU threads for torch (default: the run's ``train.threads``, if set).
    """

    seed: int | None = None
    sgd: str | None = None
    swa: str | None = None
    what: Sequence[str] | None = None
    grid: int = _DEFAULT.grid
    margin: float = 0.2
    line_points: int = _DEFAULT.line_points
    line_range: tuple[float, float] = (-0.5, 1.5)
    rays: int = _DEFAULT.rays
    ray_points: int = _DEFAULT.ray_points
    ray_distance: float | None = None
    rise: float = _DEFAULT.rise
    ray_tails: bool = _DEFAULT.ray_tails
    directions: tuple[str, ...] = tuple(_DEFAULT.directions)
    device: str | None = None
    threads: int | None = None
    stack: int = 1  # points per vectorised pass (1: one by one; the same numbers)
    curvature_samples: int = _DEFAULT.curvature_samples
    curvature_iterations: int = _DEFAULT.curvature_iterations
    curvature_probes: int = _DEFAULT.curvature_probes

    def __post_init__(self) -> None:
        unknown = sorted(set(self.what or ()) - set(PIECES))
        if unknown:
            raise ValueError(
                f"unknown landscape piece(s) {unknown}; choose from {', '.join(PIECES)}"
            )
        for key, value, low, limit in (
            ("--grid", self.grid, 2, "grid"),
            ("--line-points", self.line_points, 2, "line_points"),
            ("--rays", self.rays, 1, "rays"),
            ("--ray-points", self.ray_points, 2, "ray_points"),
        ):
            check_range(key, value, low, limit)
        if self.threads is not None:
            check_range("--threads", self.threads, 1, "threads")
        if self.stack < 1:
            raise ValueError(f"--stack must be >= 1, got {self.stack}")
        for key in ("curvature_samples", "curvature_iterations", "curvature_probes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        directions = tuple(self.directions)
        if (
            not directions
            or len(set(directions)) != len(directions)
            or not set(directions) <= set(geo.DIRECTIONS)
        ):
            raise ValueError(
                f"--directions must be distinct entries of {', '.join(geo.DIRECTIONS)}, "
                f"got {','.join(map(str, directions)) or 'nothing'}"
            )
        object.__setattr__(self, "directions", directions)
        for key, value, ok, expected in (
            (
                "--margin",
                self.margin,
                math.isfinite(self.margin) and self.margin >= 0,
                "finite and >= 0",
            ),
            ("--rise", self.rise, math.isfinite(self.rise) and self.rise > 0, "finite and > 0"),
            (
                "--ray-distance",
                self.ray_distance,
                self.ray_distance is None
                or (math.isfinite(self.ray_distance) and self.ray_distance > 0),
                "finite and > 0",
            ),
            ("--threads", self.threads, self.threads is None or self.threads >= 1, ">= 1"),
        ):
            if not ok:
                raise ValueError(f"{key} must be {expected}, got {value}")

    @classmethod
    def of_config(cls, config: LandscapeConfig, **changes: Any) -> LandscapeOptions:
        """The options of a run's ``landscape:`` section (its pieces and protocol)."""
        return cls(
            what=list(config.pieces) or None,
            grid=config.grid,
            line_points=config.line_points,
            rays=config.rays,
            ray_points=config.ray_points,
            rise=config.rise,
            ray_tails=config.ray_tails,
            directions=tuple(config.directions),
            curvature_samples=config.curvature_samples,
            curvature_iterations=config.curvature_iterations,
            curvature_probes=config.curvature_probes,
        ).replace(**changes)

    def replace(self, **changes: Any) -> LandscapeOptions:
        return dataclasses.replace(self, **changes)

    def settings(self, piece: str) -> dict[str, Any]:
        """What fixes a piece's numbers besides the run (recorded with it; a re-run with the same
        settings does not recompute it)."""
        return {
            "line": {"points": self.line_points, "range": list(self.line_range)},
            "rays": {
                "rays": self.rays,
                "points": self.ray_points,
                "distance": self.ray_distance,
                "rise": self.rise,
                "tails": self.ray_tails,
                "test_on_stopped_rays": True,  # test metrics where stopped rays were evaluated
                "directions": list(self.directions),
                "width_on": "train_nll",
            },
            "plane": {"grid": self.grid, "margin": self.margin, "through": "shared start"},
            "plane_init": {"grid": self.grid, "margin": self.margin},
            "snapshots": {"grid": self.grid, "margin": self.margin},
            "curvature": {
                "samples": self.curvature_samples,
                "iterations": self.curvature_iterations,
                "probes": self.curvature_probes,
            },
        }.get(piece, {})


def compute_landscape(
    run_dir: str | Path,
    options: LandscapeOptions | None = None,
    *,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
    skip_missing: bool = False,
    **changes: Any,
) -> dict[str, Any]:
    """Compute the landscape pieces ``options.what`` (default: all that the run directory allows).

    Args:
        options: see :class:`LandscapeOptions`; ``changes`` replace some of its fields
            (``compute_landscape(run_dir, grid=5)``).
        progress: draw a progress bar (default: when stderr is a terminal; else plain lines).
        skip_missing: a piece named in ``what`` whose inputs are missing (``bn`` on a model
            without BatchNorm) is skipped with a note, as the default pieces are, not an error.

    Returns:
        The summary also written to ``RUN_DIR/landscape/landscape.json``.
    """
    opts = dataclasses.replace(options or LandscapeOptions(), **changes)
    what = opts.what
    run = RunDir(run_dir)
    seed = run.seed(opts.seed)
    sgd = opts.sgd or run.default_label("baseline")
    swa = opts.swa or run.default_label("average")
    if sgd is None or swa is None:
        which = "SGD (method: sgd)" if sgd is None else "SWA (method: swa)"
        raise ValueError(
            f"{run.path} has no {which} run; name one with --{'sgd' if sgd is None else 'swa'} LABEL "
            f"(labels: {', '.join(run.labels)})"
        )
    run.method(sgd)
    run.method(swa)
    threads = opts.threads if opts.threads is not None else run.cfg.train.threads
    if threads is not None:
        torch.set_num_threads(threads)
    src, ev = _Sources(run, seed, sgd, swa), _Evaluation(run, seed, opts.device, opts.stack)
    job = _Pieces(src, ev, log)
    requested = list(what) if what else list(PIECES)
    checks = {
        "line": src.check_ends,
        "rays": src.check_ends,
        "plane": lambda: src.check_plane(ev),
        "plane_init": src.check_plane_init,
        "snapshots": lambda: src.check_snapshots(3),
        "ensemble": lambda: src.check_snapshots(2),
        "predictions": lambda: src.check_predictions(ev.task),
        "bn": lambda: src.check_bn(ev),
        "curvature": src.check_ends,
    }
    todo, skipped = [], {}
    for piece in requested:
        try:
            checks[piece]()
            todo.append(piece)
        except (_Missing, FileNotFoundError) as err:
            if what and not skip_missing:
                raise FileNotFoundError(str(err)) from None
            skipped[piece] = str(err)
            log(f"skipped {piece}: {err}")
    if not todo:
        raise FileNotFoundError(next(iter(skipped.values())))

    out = landscape_dir(run, seed)
    out.mkdir(parents=True, exist_ok=True)
    summary = _previous_summary(out, seed, sgd, swa)
    summary.update({"seed": seed, "sgd": sgd, "swa": swa, "protocol": ev.protocol()})
    summary.setdefault("skipped", {}).update(skipped)
    for piece in todo:
        summary["skipped"].pop(piece, None)
    summary.setdefault("seconds", {})
    summary.setdefault("settings", {})

    sizes = {
        "line": opts.line_points,
        "rays": len(opts.directions) * (2 * opts.rays * (opts.ray_points - 1) + 2),
        "plane": opts.grid**2,
        "plane_init": opts.grid**2,
        "snapshots": opts.grid**2,
        "ensemble": 0,
        "predictions": 0,
        "bn": 0,
        "curvature": 0,
    }
    bar = Progress(sum(sizes[p] for p in todo), bar=progress)
    try:
        for piece in todo:
            bar.stage(f"seed {seed} {piece}")
            start = time.perf_counter()
            if piece == "line":
                ts = np.linspace(*opts.line_range, opts.line_points)
                summary["line"] = job.line(out, ts, bar)
            elif piece == "rays":
                summary["rays"] = job.rays(
                    out,
                    opts.rays,
                    opts.ray_points,
                    opts.ray_distance,
                    opts.rise,
                    opts.ray_tails,
                    bar,
                    opts.directions,
                )
            elif piece == "plane":
                summary["plane"] = job.plane(out, opts.grid, opts.margin, bar)
            elif piece == "plane_init":
                summary["plane_init"] = job.plane_init(out, opts.grid, opts.margin, bar)
            elif piece == "snapshots":
                summary["snapshots"] = job.snapshots(out, opts.grid, opts.margin, bar)
            elif piece == "ensemble":
                summary["ensemble"] = job.ensemble(out)
            elif piece == "bn":
                summary["bn"] = job.bn(out)
            elif piece == "curvature":
                summary["curvature"] = job.curvature(
                    opts.curvature_samples, opts.curvature_iterations, opts.curvature_probes
                )
            else:
                summary["predictions"] = job.predictions(out, log)
            summary["seconds"][piece] = round(time.perf_counter() - start, 2)
            summary["settings"][piece] = opts.settings(piece)
            atomic_write_text(out / "landscape.json", json.dumps(_clean(summary), indent=2))
            log(f"{piece}: done in {summary['seconds'][piece]:.1f} s")
    finally:
        bar.close()
    log(f"landscape of {run.path} (seed {seed}, {sgd} vs {swa}) written to {out}")
    return _clean(summary)


def landscapes_of_run(
    run_dir: str | Path,
    *,
    jobs: int = 1,
    config: LandscapeConfig | None = None,
    log: Callable[[str], None] = print,
) -> list[int]:
    """The pieces of the run's ``landscape:`` section for every seed, after ``swalab run``.

    Resumable: a piece already in a seed's ``landscape.json`` with the same settings
    (:meth:`LandscapeOptions.settings`) and labels is not computed again. ``jobs > 1``: that many
    seeds at once, each in a spawned process, with the CPU threads divided as for training
    (``lab.jobs.slots``). A piece whose inputs the run lacks (``bn`` without BatchNorm) is skipped
    with a note in ``landscape.json``. ``config``: another protocol than the run's (benchmarks).
    Returns the seeds computed now.
    """
    run = RunDir(run_dir)
    config = config or run.cfg.landscape
    every = list(config.pieces)
    if not every:  # pieces: [] turns the step off, first-seed pieces included
        return []
    first = list(dict.fromkeys(every + list(config.first_seed)))  # the first seed's pieces
    names = ", ".join(first)
    sgd, swa = run.default_label("baseline"), run.default_label("average")
    if sgd is None or swa is None:
        log(
            f"landscape pieces {names} skipped: they compare an SGD and an SWA "
            f"run, and the config has no {'sgd' if sgd is None else 'swa'} method"
        )
        return []
    todo: dict[int, LandscapeOptions] = {}
    for seed in run.cfg.seeds:
        status = {
            label: (run.run(label, seed).result() or {}).get("status") for label in (sgd, swa)
        }
        if any(s != "done" for s in status.values()):  # diverged or unfinished: nothing to compare
            log(
                f"landscape seed {seed} skipped: "
                + ", ".join(f"{label} {s or 'not finished'}" for label, s in status.items())
            )
            continue
        opts = LandscapeOptions.of_config(config, seed=seed)
        summary = _previous_summary(landscape_dir(run, seed), seed, sgd, swa)
        done, skipped = summary.get("settings", {}), summary.get("skipped", {})
        pieces = [
            p
            for p in (first if seed == run.cfg.seeds[0] else every)
            if p not in skipped and done.get(p, None) != _clean(opts.settings(p))
        ]
        if pieces:
            todo[seed] = opts.replace(what=pieces)
    if not todo:
        log(f"landscape pieces {names}: nothing left to compute")
        return []
    jobs = max(1, min(jobs, len(todo)))
    workers = slots(jobs, resolve_device(run.cfg.train.device), run.cfg.train.threads)
    log(
        f"landscape pieces {names} of {len(todo)} seed(s), "
        f"{jobs} at a time ({workers[0].threads} thread(s) each)"
    )
    tasks = [
        opts.replace(device=str(workers[i % jobs].device), threads=workers[i % jobs].threads)
        for i, opts in enumerate(todo.values())
    ]
    start = time.perf_counter()
    if jobs == 1:
        for opts in tasks:
            _landscape_job(run.path, opts)
            log(f"landscape seed {opts.seed}: done ({time.perf_counter() - start:.1f} s)")
    else:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            jobs, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),)
        )
        with pool:
            futures = {pool.submit(_landscape_job, run.path, opts): opts.seed for opts in tasks}
            for future in as_completed(futures):
                future.result()
                log(f"landscape seed {futures[future]}: done ({time.perf_counter() - start:.1f} s)")
    return list(todo)


def _landscape_job(run_dir: Path, options: LandscapeOptions) -> None:
    """One seed's pieces, quietly (a worker process of :func:`landscapes_of_run`)."""
    with run_directory(run_dir, lock=False):  # the parent holds the lock; writes stay inside
        compute_landscape(
            run_dir, options, log=lambda text: None, progress=False, skip_missing=True
        )


def landscape_dir(run: RunDir, seed: int) -> Path:
    """``RUN_DIR/landscape`` for the run's first seed, ``RUN_DIR/landscape/seed<k>`` for the others."""
    return (
        run.path / "landscape"
        if seed == run.cfg.seeds[0]
        else run.path / "landscape" / f"seed{seed}"
    )


def _clean(value: Any) -> Any:
    """``value`` with NumPy scalars as Python numbers and NaN/inf as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _savez(path: Path, **arrays: Any) -> None:
    """``np.savez`` through a temporary file and a rename (never through a planted link)."""
    with atomic_output(path) as tmp:
        np.savez(tmp, **arrays)


def _previous_summary(out: Path, seed: int, sgd: str, swa: str) -> dict[str, Any]:
    """The existing summary if it is for the same seed and labels (pieces computed earlier are kept)."""
    path = out / "landscape.json"
    if path.exists() or path.is_symlink():
        old = check_landscape(path, read_json(path, root=out))
        if (old.get("seed"), old.get("sgd"), old.get("swa")) == (seed, sgd, swa):
            return old
    return {}


class _Sources:
    """What the run directory provides for one seed: which files each piece needs, the weights, the
    trajectories, and the epochs the SWA run averaged (as its recipe says)."""

    def __init__(self, run: RunDir, seed: int, sgd: str, swa: str) -> None:
        self.run, self.seed, self.sgd, self.swa = run, seed, sgd, swa

    def check_ends(self) -> None:
        self.run.file(self.sgd, self.seed, "final.pt")
        self.run.file(self.swa, self.seed, "final.pt")

    def check_bn(self, ev: _Evaluation) -> None:
        if not has_batchnorm(ev.evaluator.model):
            raise _Missing(f"{self.run.cfg.model.name} has no BatchNorm: nothing to recompute")
        self.run.file(self.swa, self.seed, "final.pt")
        self.run.file(self.swa, self.seed, "checkpoint.pt")

    def check_plane_init(self) -> None:
        self.run.file(self.sgd, self.seed, "init.pt")
        self.check_ends()

    def check_plane(self, ev: _Evaluation) -> None:
        self.check_ends()
        self.shared_start(ev)

    def start_epoch(self, ev: _Evaluation) -> int:
        """The epoch after which SGD and SWA last held the same weights, or SWA began to average
        if that is earlier (0: the initialisation): the point both start from in the paper's
        Fig. 1 ("starting from the same initialization of SGD"). The runs of a seed share their
        first epochs for as long as their recipes train them alike (``lab.sharing``; the same
        whether or not the run trained them once)."""
        train = self.run.cfg.train
        methods = [self.run.method(self.sgd), self.run.method(self.swa)]
        steps = len(BatchLoader(ev.bundle.train, train.batch_size))
        (root,) = plan_branches(train, methods, steps)
        averaged = recipe_of(methods[1], train, steps_per_epoch=steps).averaged_epochs()
        return min(root.stop, averaged[0] - 1) if averaged else root.stop

    def shared_start(self, ev: _Evaluation) -> tuple[int, str]:
        """``(epoch, label)``: the epoch of :meth:`start_epoch` and the run whose trajectory holds
        its weights (at epoch 0 the SGD run, whose ``init.pt`` they are)."""
        epoch = self.start_epoch(ev)
        if epoch == 0:
            self.run.file(self.sgd, self.seed, "init.pt")
            return 0, self.sgd
        for label in (self.swa, self.sgd):
            if self.run.run(label, self.seed).has_trajectory:
                return epoch, label
        raise FileNotFoundError(
            f"the plane starts at the weights after epoch {epoch}, and neither {self.swa} nor "
            f"{self.sgd} kept a trajectory in {self.run.run_dir(self.swa, self.seed)}; "
            f"{self.run.trajectory_command}"
        )

    def averaged_epochs(self) -> list[int]:
        """1-based epochs whose weights the SWA run folded into its average, as its recipe says."""
        m = self.run.method(self.swa)
        epochs = recipe_of(m, self.run.cfg.train).averaged_epochs()
        if not epochs:
            raise _Missing(
                "snapshots come from the trajectory of a run that averages end-of-epoch "
                f"weights; {self.swa!r} ({m.method}) does not (pass --swa LABEL)"
            )
        return epochs

    def check_snapshots(self, needed: int) -> None:
        epochs = self.averaged_epochs()
        self.run.file(self.swa, self.seed, "final.pt")
        self.run.check_trajectory(self.swa, self.seed)
        if len(epochs) < needed:
            raise _Missing(
                f"{self.swa} averaged {len(epochs)} snapshot(s) (epochs {epochs}), {needed} are needed; "
                f"train longer or lower methods.{self.swa}.options.swa_start"
            )

    def check_predictions(self, task: Task) -> None:
        if not task.reliability:
            raise _Missing(
                f"reliability diagrams are for classification; "
                f"{self.run.cfg.data.name} is {task.name}"
            )
        runs = (self.run.run(label, self.seed) for label in self.run.labels)
        if not any(files.checkpoint_path.is_file() for files in runs):
            raise _Missing(
                f"no checkpoint.pt under {self.run.path}/*/seed{self.seed}; "
                f"run the experiment with `{self.run.resume_command}`"
            )

    def weights(self, label: str, name: str, names: list[str]) -> Tensor:
        """The flat parameters (ordered as ``names``) of ``<label>/seed<k>/<name>``."""
        return geo.flat_parameters(self.run.load(label, self.seed, name), names)

    def trajectory(self, label: str) -> list[dict[str, Tensor]]:
        return self.run.trajectory(label, self.seed)


class _Evaluation:
    """One seed's data, one model instance, and the evaluator of train loss and test error."""

    def __init__(self, run: RunDir, seed: int, device: str | None, stack: int = 1) -> None:
        self.run, self.seed, self.stack = run, seed, stack
        self.device = resolve_device(device or run.cfg.train.device)
        self._evaluator: geo.LandscapeEvaluator | None = None

    @property
    def bundle(self) -> Any:
        if not hasattr(self, "_bundle"):
            self._bundle = self.run.data(self.seed)
        return self._bundle

    @property
    def task(self) -> Task:
        return task_of(self.bundle.task)

    @property
    def evaluator(self) -> geo.LandscapeEvaluator:
        if self._evaluator is None:
            bundle, train = self.bundle, self.run.cfg.train
            model = self.run.model(bundle).to(self.device)
            bn_batches = list(
                itertools.islice(
                    self.run.bn_loader(bundle, self.seed, self.device), train.bn_batches
                )
            )
            datasets = {
                name: list(BatchLoader(split, train.eval_batch_size, device=self.device))
                for name, split in (("train", bundle.train), ("test", bundle.test))
            }
            self._evaluator = geo.LandscapeEvaluator(
                model,
                bn_batches,
                datasets,
                self.task.landscape_stats,
                train.weight_decay,
                stack=self.stack,
                bn_weighting=train.bn_weighting,
            )
        return self._evaluator

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.evaluator.model.named_parameters()]

    def protocol(self) -> dict[str, Any]:
        train = self.run.cfg.train
        return {
            "train_loss": f"cross-entropy (MSE for regression) + weight_decay/2 * ||w||^2, weight_decay={train.weight_decay}",
            "train_nll": "the data term alone (the rays' widths read it; the L2 term apart)",
            "batchnorm": f"recomputed at every point with the training run's BN pass (batch {train.batch_size}"
            + (f", first {train.bn_batches} batches)" if train.bn_batches else ")"),
            "device": str(self.device),
        }

    def evaluate(self, points: list[Tensor], bar: Progress) -> dict[str, np.ndarray]:
        """The metrics at ``points``, ``stack`` of them per vectorised pass (``LandscapeEvaluator``)."""
        evaluator = self.evaluator
        values: dict[str, list[float]] = {k: [] for k in METRICS}
        step = evaluator.stack
        for start in range(0, len(points), step):
            for result in evaluator.evaluate_many(points[start : start + step]):
                for k in METRICS:
                    values[k].append(result.get(k, math.nan))
                bar.advance()
        return {k: np.array(v) for k, v in values.items()}


# the largest t of filter/layer-normalised rays: ||d|| is about ||w|| there, so this is half the
# raw rays' default ||w_SWA|| / 2; on the MNIST-1D CNN the train NLL rises by 0.1 near t = 0.16
NORMALISED_RAY_DISTANCE = 0.25
RAY_UNITS = {
    "raw": "Euclidean distance, unit Gaussian directions (the SWA paper's Fig. 4)",
    "filter": "t in w + t·d, d rescaled per output filter to the solution's filter norms "
    "(Li et al. 2018; biases and BN affine not moved)",
    "layer": "t in w + t·d, d rescaled per tensor to the solution's tensor norms "
    "(biases and BN affine not moved)",
}


def _width_summary(widths: dict[str, list[float]]) -> dict[str, Any]:
    return {
        key: {
            "per_ray": ws,
            "median": float(np.median(ws)),  # inf (beyond the range): null
            "beyond_range": sum(1 for x in ws if not math.isfinite(x)),
        }
        for key, ws in widths.items()
    }


def layer_norms(
    names: Sequence[str], shapes: Sequence[torch.Size], w_sgd: Tensor, w_swa: Tensor
) -> dict[str, dict[str, float]]:
    """``{name: {"sgd": ||w_SGD[name]||, "swa": ||w_SWA[name]||, "ratio": swa / sgd}}`` per
    parameter tensor: a layer followed by BatchNorm computes the same function at any scale, so a
    ratio below 1 makes a fixed Euclidean step a larger relative step from SWA (issue 19)."""
    sizes = [math.prod(s) for s in shapes]
    out = {}
    for name, a, b in zip(names, w_sgd.split(sizes), w_swa.split(sizes)):
        na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
        out[name] = {"sgd": na, "swa": nb, "ratio": nb / na if na > 0 else math.nan}
    return out


def ray_protocols(rays: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{direction: {"max_distance", "width", ...}}`` of a ``rays`` summary; a summary written
    before directions existed is the raw protocol, its width read on the objective."""
    if "by_direction" in rays:
        return rays["by_direction"]
    return {"raw": {"max_distance": rays["max_distance"], "width_objective": rays["width"]}}


class _Pieces:
    """Each method computes one piece from the sources and the evaluation, saves its arrays
    (``.npz``) and figure, and returns its summary."""

    def __init__(self, src: _Sources, ev: _Evaluation, log: Callable[[str], None]) -> None:
        self.src, self.ev, self.log = src, ev, log
        self.run, self.seed, self.sgd, self.swa = src.run, src.seed, src.sgd, src.swa

    def weights(self, label: str, name: str) -> Tensor:
        return self.src.weights(label, name, self.ev.names)

    def line(self, out: Path, ts: np.ndarray, bar: Progress) -> dict[str, Any]:
        w_sgd, w_swa = self.weights(self.sgd, "final.pt"), self.weights(self.swa, "final.pt")
        values = self.ev.evaluate([geo.segment(w_swa, w_sgd, float(t)) for t in ts], bar)
        _savez(out / "line.npz", t=ts, **values)
        figures.line_figure(ts, values, self.sgd, self.swa, out / "line.png")
        i_swa, i_sgd = int(np.argmin(np.abs(ts))), int(np.argmin(np.abs(ts - 1)))
        return {
            "distance": float(torch.linalg.vector_norm(w_sgd - w_swa)),
            "swa": {k: float(values[k][i_swa]) for k in METRICS},
            "sgd": {k: float(values[k][i_sgd]) for k in METRICS},
            "t_min_train_loss": float(ts[np.argmin(values["train_loss"])]),
            "t_min_test_error": float(ts[np.argmin(values["test_error"])]),
        }

    def rays(
        self,
        out: Path,
        n: int,
        points: int,
        max_distance: float | None,
        rise: float,
        tails: bool,
        bar: Progress,
        directions: Sequence[str] = ("raw",),
    ) -> dict[str, Any]:
        """Rays from both solutions along the same random directions, once per scaling in
        ``directions`` (the first the primary), the width read on the train NLL (the data loss;
        the width on the objective NLL + L2 is kept too), the L2 term at each solution, and the
        per-tensor norms of the two solutions (:func:`layer_norms`)."""
        origins = {
            self.swa: self.weights(self.swa, "final.pt"),
            self.sgd: self.weights(self.sgd, "final.pt"),
        }
        shapes = [p.shape for p in self.ev.evaluator.model.parameters()]
        # the same directions from both solutions and under every scaling, so widths compare
        # ray by ray
        unit = geo.random_directions(
            origins[self.swa].numel(), n, torch.Generator().manual_seed(self.seed)
        )
        wd = self.ev.evaluator.weight_decay
        summary: dict[str, Any] = {
            "rays": n,
            "rise": rise,
            "tails": tails,
            "width_on": "train_nll",
            "directions": list(directions),
            "primary": directions[0],
            "l2_term": {
                key: 0.5 * wd * float(origins[label].square().sum())
                for key, label in (("swa", self.swa), ("sgd", self.sgd))
            },
            "weight_decay": wd,
            "layer_norms": layer_norms(self.ev.names, shapes, origins[self.sgd], origins[self.swa]),
            "by_direction": {},
        }
        all_arrays = {}
        for how in directions:
            raw = how == "raw"
            top = max_distance
            if top is None:
                top = (
                    float(torch.linalg.vector_norm(origins[self.swa])) / 2
                    if raw
                    else NORMALISED_RAY_DISTANCE
                )
            distances = np.linspace(0.0, top, points)
            arrays: dict[str, np.ndarray] = {"distances": distances}
            widths: dict[str, list[float]] = {}
            objective: dict[str, list[float]] = {}
            for key, label in (("swa", self.swa), ("sgd", self.sgd)):
                w = origins[label]
                steps = torch.stack([geo.normalize_direction(d, w, shapes, how) for d in unit])
                curves = (self._whole_rays if tails else self._rays_to_rise)(
                    w, steps, distances, rise, bar
                )
                for k in METRICS:
                    arrays[f"{key}_{k}"] = curves[k]
                widths[key] = [
                    geo.width(distances, row, rise) for row in arrays[f"{key}_train_nll"]
                ]
                objective[key] = [
                    geo.width(distances, row, rise) for row in arrays[f"{key}_train_loss"]
                ]
                arrays[f"{key}_width"] = np.array(widths[key])
                arrays[f"{key}_width_objective"] = np.array(objective[key])
            stem = "" if raw else f"_{how}"
            all_arrays[how] = arrays
            _savez(out / f"rays{stem}.npz", **arrays)
            figures.rays_figure(arrays, self.sgd, self.swa, out / f"rays{stem}.png", how)
            figures.width_figure(
                widths,
                distances[-1],
                rise,
                self.sgd,
                self.swa,
                out / f"width{stem}.png",
                how,
            )
            summary["by_direction"][how] = {
                "max_distance": top,
                "unit": RAY_UNITS[how],
                "width": _width_summary(widths),
                "width_objective": _width_summary(objective),
            }
        figures.protocols_figure(all_arrays, rise, self.sgd, self.swa, out / "rays_protocols.png")
        return summary

    def _whole_rays(
        self, w: Tensor, directions: Tensor, distances: np.ndarray, rise: float, bar: Progress
    ) -> dict[str, np.ndarray]:
        """Every point of every ray from ``w``: ``{metric: (rays, points)}``."""
        n, points = len(directions), len(distances)
        # the solution itself once, then every ray's points in one list (stacked passes span rays)
        values = self.ev.evaluate(
            [w] + [w + float(t) * d for d in directions for t in distances[1:]], bar
        )
        return {
            k: np.concatenate([np.full((n, 1), v[0]), v[1:].reshape(n, points - 1)], axis=1)
            for k, v in values.items()
        }

    def _rays_to_rise(
        self, w: Tensor, directions: Tensor, distances: np.ndarray, rise: float, bar: Progress
    ) -> dict[str, np.ndarray]:
        """Each ray up to the first point where both the train NLL and the train loss (NLL + L2)
        have risen by ``rise`` (the points :func:`swalab.landscape.width` reads, so the same
        widths as :meth:`_whole_rays`), train and test metrics at those points (the paper's
        Fig. 4 plots both; about 7% more CPU per point on MNIST-1D,
        ``benchmarks/landscape_figures.py``); the
        points beyond are NaN, not evaluated."""
        n, points = len(directions), len(distances)
        origin = self.ev.evaluate([w], bar)
        curves = {k: np.full((n, points), np.nan) for k in origin}
        for k, v in origin.items():
            curves[k][:, 0] = v[0]
        # as geo.width computes them: the data loss and the objective, until both have risen
        thresholds = {k: curves[k][0, 0] + rise for k in ("train_nll", "train_loss")}
        active = list(range(n))
        for j in range(1, points):
            if not active:
                break
            t = float(distances[j])
            values = self.ev.evaluate([w + t * directions[i] for i in active], bar)
            for k, v in values.items():
                curves[k][active, j] = v
            active = [
                i
                for i in active
                if not all(np.nanmax(curves[k][i, : j + 1]) >= c for k, c in thresholds.items())
            ]
        bar.advance(n * (points - 1) - int(np.isfinite(curves["train_loss"][:, 1:]).sum()))
        return curves

    def _plane(
        self,
        out: Path,
        name: str,
        w: tuple[Tensor, Tensor, Tensor],
        labels: tuple[str, str, str],
        paths: dict[str, list[Tensor]],
        marks: dict[str, Tensor],
        grid: int,
        margin: float,
        bar: Progress,
        title: str,
    ) -> dict[str, Any]:
        pl = geo.plane(*w)
        points = np.array([pl.coordinates(p) for p in w])
        # REFERENCE §2's grid; alpha widened only when the second point projects outside it
        alpha1 = points[1][0] / pl.dx
        alphas = (
            geo.grid_coordinates(grid, margin)
            if -margin <= alpha1 <= 1 + margin
            else np.linspace(min(0.0, alpha1) - margin, max(1.0, alpha1) + margin, grid)
        )
        betas = geo.grid_coordinates(grid, margin)
        values = self.ev.evaluate(
            [pl.point(float(a), float(b)) for a in alphas for b in betas], bar
        )
        values = {k: v.reshape(grid, grid) for k, v in values.items()}
        xy = np.stack(np.meshgrid(alphas * pl.dx, betas * pl.dy, indexing="ij"), axis=-1)
        path_xy = {k: np.array([pl.coordinates(p) for p in ws]) for k, ws in paths.items()}
        mark_xy = {k: np.array(pl.coordinates(p)) for k, p in marks.items()}
        _savez(
            out / f"{name}.npz",
            alphas=alphas,
            betas=betas,
            grid=xy,
            points=points,
            point_labels=np.array(labels),
            dx=pl.dx,
            dy=pl.dy,
            **values,
            **{f"path_{k}": v for k, v in path_xy.items()},
            **{f"mark_{k}": v for k, v in mark_xy.items()},
        )
        figures.plane_figure(
            xy, values, points, labels, path_xy, mark_xy, title, out / f"{name}.png"
        )
        return {
            "title": title,
            "points": {label: [float(c) for c in p] for label, p in zip(labels, points)},
            "dx": pl.dx,
            "dy": pl.dy,
            "alpha_range": [float(alphas[0]), float(alphas[-1])],
            "marks": {
                k: {"xy": [float(c) for c in v], "distance_to_plane": pl.distance(marks[k])}
                for k, v in mark_xy.items()
            },
            "min_train_loss": float(values["train_loss"].min()),
            "min_test_error": float(values["test_error"].min()),
        }

    def plane(self, out: Path, grid: int, margin: float, bar: Progress) -> dict[str, Any]:
        """The paper's Fig. 1 (middle, right): the plane through the point SGD and SWA start from
        (:meth:`_Sources.start_epoch`), SGD's end and SWA's end, train loss and test error at
        every grid point (BN recomputed), the SWA run's iterates from that point on projected,
        its first averaged snapshot marked."""
        epoch, label = self.src.shared_start(self.ev)
        if epoch == 0:
            w0 = self.weights(self.sgd, "init.pt")
            states: list[dict[str, Tensor]] = []
        else:
            states = self.src.trajectory(label)
            w0 = geo.flat_parameters(states[epoch - 1], self.ev.names)
        w1, w2 = self.weights(self.sgd, "final.pt"), self.weights(self.swa, "final.pt")
        paths: dict[str, list[Tensor]] = {}
        marks: dict[str, Tensor] = {}
        try:
            swa_states = states if label == self.swa else self.src.trajectory(self.swa)
        except FileNotFoundError:
            swa_states = []
        if swa_states:
            paths[f"{self.swa} iterates (epochs {epoch}–{len(swa_states)})"] = [w0] + [
                geo.flat_parameters(st, self.ev.names) for st in swa_states[epoch:]
            ]
            try:
                averaged = self.src.averaged_epochs()
            except _Missing:  # an SWA run that does not average end-of-epoch weights
                averaged = []
            if averaged and averaged[0] > epoch:
                marks[f"first averaged snapshot (epoch {averaged[0]})"] = geo.flat_parameters(
                    swa_states[averaged[0] - 1], self.ev.names
                )
        labels = (f"start of both (epoch {epoch})", f"{self.sgd} end", self.swa)
        summary = self._plane(
            out,
            "plane",
            (w0, w1, w2),
            labels,
            paths,
            marks,
            grid,
            margin,
            bar,
            f"the paper's Fig. 1 plane: {self.sgd} and {self.swa} from the same point "
            f"(seed {self.seed})",
        )
        summary["start_epoch"] = epoch
        summary["through"] = "shared start"
        return summary

    def plane_init(self, out: Path, grid: int, margin: float, bar: Progress) -> dict[str, Any]:
        """The plane through SGD's initialisation, SGD's end and SWA, SGD's trajectory projected."""
        w0 = self.weights(self.sgd, "init.pt")
        w1, w2 = self.weights(self.sgd, "final.pt"), self.weights(self.swa, "final.pt")
        paths: dict[str, list[Tensor]] = {}
        summary_note = None
        try:
            states = self.src.trajectory(self.sgd)
            paths[f"{self.sgd} trajectory"] = [w0] + [
                geo.flat_parameters(s, self.ev.names) for s in states
            ]
        except FileNotFoundError as err:
            summary_note = f"SGD trajectory not drawn: {err}"
            self.log(f"plane: {summary_note}")
        labels = (f"{self.sgd} start", f"{self.sgd} end", self.swa)
        summary = self._plane(
            out,
            "plane_init",
            (w0, w1, w2),
            labels,
            paths,
            {},
            grid,
            margin,
            bar,
            f"plane through {labels[0]}, {labels[1]}, {labels[2]} (seed {self.seed})",
        )
        if summary_note:
            summary["note"] = summary_note
        return summary

    def snapshots(self, out: Path, grid: int, margin: float, bar: Progress) -> dict[str, Any]:
        epochs = self.src.averaged_epochs()
        states = self.src.trajectory(self.swa)
        chosen = [epochs[0], epochs[len(epochs) // 2], epochs[-1]]
        w = tuple(geo.flat_parameters(states[e - 1], self.ev.names) for e in chosen)
        first = epochs[0] - 1
        path = [geo.flat_parameters(s, self.ev.names) for s in states[max(first - 1, 0) :]]
        marks = {
            "average of the three": (w[0] + w[1] + w[2]) / 3,
            f"{self.swa} (all {len(epochs)})": self.weights(self.swa, "final.pt"),
        }
        labels = tuple(f"epoch {e}" for e in chosen)
        summary = self._plane(
            out,
            "snapshots",
            w,
            labels,
            {f"{self.swa} iterates": path},
            marks,
            grid,
            margin,
            bar,
            f"plane through three {self.swa} snapshots (seed {self.seed})",
        )
        summary["epochs"] = chosen
        return summary

    def _test_sets(self) -> dict[str, tuple[BatchLoader, Tensor]]:
        """The published test split and, where the dataset has one, the large test set
        (``DataBundle.large_test``, docs/claims.md): batches and targets."""
        bundle, size = self.ev.bundle, self.run.cfg.train.eval_batch_size
        sets = {"test": bundle.test}
        if getattr(bundle, "large_test", None) is not None:
            sets["large_test"] = bundle.large_test
        return {
            name: (BatchLoader(split, size, device=self.ev.device), split.y)
            for name, split in sets.items()
        }

    def _per_sample_errors(
        self, states: list[dict[str, Tensor]]
    ) -> dict[str, tuple[list[Tensor], Tensor]]:
        """For every test set: each state's predictions (``task.outputs``, double) and the targets."""
        model = self.ev.evaluator.model
        out: dict[str, tuple[list[Tensor], Tensor]] = {}
        for name, (loader, y) in self._test_sets().items():
            outputs = []
            for state in states:
                model.load_state_dict(state)
                outputs.append(self.ev.task.outputs(predict_outputs(model, loader)[0].double()))
            out[name] = (outputs, y)
        return out

    def ensemble(self, out: Path | None = None) -> dict[str, Any]:
        """The SWA average against the ensemble of its snapshots, each snapshot with its own BN statistics.

        Classification: Δ, agreement and KL from ``swalab.ensembles.ensemble_view``, and test errors
        (%); regression: Δ and test MSE (the ensemble averages the predictions). On the published
        test split and, where there is one, the large test set (``large_test``: the same keys);
        with ``out``, each model's per-sample errors (0/1, or squared errors) on them in
        ``ensemble.npz`` (claim 4's test-sampling share).
        """
        epochs = self.src.averaged_epochs()
        states = self.src.trajectory(self.swa)
        snapshots = [states[e - 1] for e in epochs]
        average = self.run.load(self.swa, self.seed, "final.pt")
        model = self.ev.evaluator.model
        test = BatchLoader(
            self.ev.bundle.test, self.run.cfg.train.eval_batch_size, device=self.ev.device
        )
        task = self.ev.task
        if task.probabilistic:
            view = ensemble_view(snapshots, average, model, test)
        else:
            w_bar = geo.flat_parameters(average, self.ev.names)
            view = {
                "delta": max(
                    float(torch.linalg.vector_norm(geo.flat_parameters(s, self.ev.names) - w_bar))
                    for s in snapshots
                ),
                "agreement": None,
                "kl": None,
            }
        result: dict[str, Any] = {"epochs": epochs, **view, "metric": task.error_label}
        arrays: dict[str, np.ndarray] = {}
        for name, (outputs, y) in self._per_sample_errors(snapshots + [average]).items():
            ensemble = torch.stack(outputs[:-1]).mean(0)
            scores = {
                "average": task.error(outputs[-1], y),
                "ensemble": task.error(ensemble, y),
                "snapshots_mean": float(np.mean([task.error(o, y) for o in outputs[:-1]])),
            }
            if name == "test":
                result.update(scores)
            else:
                result[name] = {**scores, "samples": len(y)}
            per_sample = [task.per_sample(o, y) for o in [*outputs[:-1], ensemble, outputs[-1]]]
            if all(p is not None for p in per_sample):
                # as errors (1 - correct for classification), so that they average to the error
                errors = [(1.0 - p) if task.probabilistic else p for p in per_sample]
                arrays[f"{name}_snapshots"] = torch.stack(errors[:-2]).float().numpy()
                arrays[f"{name}_ensemble"] = errors[-2].float().numpy()
                arrays[f"{name}_average"] = errors[-1].float().numpy()
        if out is not None and arrays:
            _savez(out / "ensemble.npz", **arrays)
        return result

    def bn(self, out: Path | None = None) -> dict[str, Any]:
        """w_SWA evaluated with recomputed BN statistics and three counterfactuals (paper §3.2).

        "recomputed": ``final.pt`` as the run saved it, after its own BN pass; "fresh": the BN
        buffers of a newly built model (running mean 0, variance 1), what the reference code's
        ``swa_model`` holds before ``bn_update``; "carried": the running statistics of the SWA
        run's last SGD iterate (``checkpoint.pt``); "averaged": the BN buffers averaged over the
        same snapshots as the weights (needs the SWA run's trajectory; absent without one). Each
        with the train/test metrics of the evaluator and the error on the large test set
        (``large_test_error``) where there is one; with ``out``, the per-sample errors on the test
        sets in ``bn.npz`` (claim 6's test-sampling share).
        """
        final = self.run.load(self.swa, self.seed, "final.pt")
        iterate = self.run.load(self.swa, self.seed, "checkpoint.pt")["model"]
        model, evaluator = self.ev.evaluator.model, self.ev.evaluator
        squared_norm = float(geo.flat_parameters(final, self.ev.names).square().sum())
        buffers = {name for name, _ in model.named_buffers()}
        fresh = self.run.model(self.ev.bundle).state_dict()
        states = {
            "recomputed": final,
            "fresh": {k: fresh[k].to(v.device) if k in buffers else v for k, v in final.items()},
            "carried": {k: iterate[k] if k in buffers else v for k, v in final.items()},
        }
        result: dict[str, Any] = {}
        try:
            trajectory = self.src.trajectory(self.swa)
            snapshots = [trajectory[e - 1] for e in self.src.averaged_epochs()]
        except (_Missing, FileNotFoundError) as err:
            result["averaged_missing"] = str(err)
        else:
            states["averaged"] = {
                k: (
                    torch.stack([s[k].double() for s in snapshots]).mean(0).to(v.dtype)
                    if k in buffers and v.is_floating_point()
                    else v
                )
                for k, v in final.items()
            }
        for key, state in states.items():
            model.load_state_dict(state)
            result[key] = evaluator.measure(squared_norm)
        arrays: dict[str, np.ndarray] = {}
        task = self.ev.task
        for name, (outputs, y) in self._per_sample_errors(list(states.values())).items():
            for key, o in zip(states, outputs):
                result[key][f"{name}_error"] = task.error(o, y)
                p = task.per_sample(o, y)
                if p is not None:
                    arrays[f"{name}_{key}"] = (
                        ((1.0 - p) if task.probabilistic else p).float().numpy()
                    )
        result["carried_from"] = (
            f"BN running statistics of {self.swa}'s last SGD iterate (checkpoint.pt)"
        )
        if out is not None and arrays:
            _savez(out / "bn.npz", **arrays)
        return result

    def curvature(self, samples: int, iterations: int, probes: int) -> dict[str, Any]:
        """The Hessian's top eigenvalue and trace of the train NLL at both solutions
        (:func:`swalab.curvature.curvature`), on the first ``samples`` training samples, BN
        statistics recomputed with the run's BN pass first; the same seeded probes for both."""
        ev = self.ev.evaluator
        batches, left = [], samples
        for x, y in ev.datasets["train"]:
            if left <= 0:
                break
            batches.append((x[:left], y[:left]))
            left -= len(y)
        out: dict[str, Any] = {
            "samples": samples - max(left, 0),
            "iterations": iterations,
            "probes": probes,
            "loss": "train NLL (data loss) in eval mode, BN statistics recomputed first; the L2 "
            "term adds weight_decay to every eigenvalue and weight_decay * dim to the trace",
        }
        for key, label in (("swa", self.swa), ("sgd", self.sgd)):
            ev.model.load_state_dict(self.run.load(label, self.seed, "final.pt"))
            c = curvature(
                ev.model,
                batches,
                stats=ev.stats,
                bn_batches=ev.bn_batches or None,
                bn_weighting=ev.bn_weighting,
                iterations=iterations,
                probes=probes,
                seed=self.seed,
            )
            out[key] = c._asdict()
        return out

    def predictions(self, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
        """Final test probabilities of every finished method, rebuilt exactly as the run produced them."""
        run, bundle, train = self.run, self.ev.bundle, self.run.cfg.train
        steps = len(BatchLoader(bundle.train, train.batch_size))
        ctx = EvalContext(
            self.ev.task,
            self.ev.device,
            train.eval_batch_size,
            lambda: run.bn_loader(bundle, self.seed, self.ev.device),
            train.bn_batches,
            bn_weighting=train.bn_weighting,
        )
        labels, probs_list, summary = [], [], {}
        for m in run.cfg.methods:
            files = run.run(m.label, self.seed)
            ckpt = files.checkpoint()
            if ckpt is None:
                log(f"predictions: {m.label} skipped (no checkpoint.pt in {files.path})")
                continue
            if ckpt.get("diverged"):
                log(f"predictions: {m.label} skipped (diverged)")
                continue
            model = run.model(bundle)
            model.load_state_dict(ckpt["model"])
            model.to(self.ev.device)
            recipe = recipe_of(m, train, steps_per_epoch=steps, model=model)
            recipe.load_state_dict(ckpt["recipe"])
            splits = {
                "test": bundle.test,
                **({"val": bundle.val} if len(bundle.val) else {}),
            }  # soups score on val
            probs = recipe.predict(model, splits, ctx)["test"]
            labels.append(m.label)
            probs_list.append(probs.numpy())
            summary[m.label] = {
                "method": m.method,
                "test_accuracy": 100.0 * probs.argmax(-1).eq(bundle.test.y).double().mean().item(),
            }
        if not labels:
            raise FileNotFoundError(
                f"no finished run under {run.path}/*/seed{self.seed}; "
                f"finish them with `{run.resume_command}`"
            )
        _savez(
            out / "predictions.npz",
            labels=np.array(labels),
            probs=np.stack(probs_list),
            targets=bundle.test.y.numpy(),
        )
        return summary
