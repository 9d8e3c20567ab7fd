"""Run every (method × seed) of an experiment into a run directory, resumably, and tabulate it.

The layout of a run directory is in ``rundir.py``. Re-running the same command skips finished runs
and continues unfinished ones from their last completed epoch; methods that have not started may
change their config (or be added) between runs.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ExperimentConfig, check_parts, to_dict
from .devices import resolve_device
from .distributed import World
from .executors import open_executor
from .files import RunFileError, atomic_write_text, holds_files, remove_tree
from .inputs import check_inputs, data_shape, load_bundle, train_loader
from .jobs import RunsFailed, check_jobs, run_jobs
from .leases import HOST, Claims
from .methods import recipe_of
from .precision import Precision
from .rundir import RunDirectory
from .runimports import imported_modules
from .sharing import Branch, plan_branches, trained_epochs
from .stats import primary_metric, summarize
from .tracking import EpochReporter, SeedTrackers, check_trackers, prepare_trackers
from .trainer import train_runs
from .units import (
    Unit,
    pretrain_key,
    result_row,
    results,
    run_key,
    settle,
    sweep_scratch,
    work,
)

__all__ = ["run_experiment", "format_table", "plan_runs"]

_RUN_SPECIFIC = ("seeds", "description", "variants", "landscape")  # training ignores them


def _meta(cfg: ExperimentConfig, argv: list[str], out: Path) -> dict[str, Any]:
    """``meta.json``: the command, versions, and where the config's own modules came from."""
    try:
        rev = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        rev = None
    import swalab

    return {
        "command": argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "swalab": swalab.__version__,
        "git_revision": rev,
        "platform": platform.platform(),
        "imports": imported_modules(cfg, out),
    }


def _refuse_foreign(layout: RunDirectory) -> None:
    """A folder that holds files but no run is not ours: refused before anything is made in it."""
    out = layout.path
    if out.is_dir() and holds_files(out) and layout.saved_config() is None:
        raise ConfigError(f"{out} is not empty and holds no swalab run; choose another --out")


def _check_out_dir(layout: RunDirectory, cfg: ExperimentConfig) -> None:
    """Refuse to change the config of methods that have started in this directory.

    Methods that have not started (and new methods) may change; a change to the shared keys
    (data, model, train, pretrain) changes every method, so it is refused once any has started.
    """
    out, old = layout.path, layout.saved_config()
    if old is None:
        _refuse_foreign(layout)
        return
    old, new = _identity(old), _identity(to_dict(cfg))
    shared = sorted(k for k in new if k not in (*_RUN_SPECIFIC, "methods") and old.get(k) != new[k])
    old_methods = {m.get("label"): m for m in old.get("methods") or [] if isinstance(m, dict)}
    new_methods = {m["label"]: m for m in new["methods"]}
    seeds = set(cfg.seeds) | set(old.get("seeds") or [])
    started = [label for label in old_methods if any(layout.run(label, s).started for s in seeds)]
    differ = [
        label
        for label in started
        if shared or (label in new_methods and old_methods[label] != new_methods[label])
    ]
    if differ:
        what = f"{', '.join(shared)} differ" if shared else "their method configs differ"
        raise ConfigError(
            f"{out} holds started runs of {', '.join(differ)} with a different config ({what}); "
            "choose another --out, or change only methods that have not started"
        )
    if shared and layout.pretrain_path(cfg.seeds[0]).parent.exists():
        raise ConfigError(
            f"{out} holds a pre-training cache made with a different config "
            f"({', '.join(shared)} differ); choose another --out"
        )


_SETUP = "setup"  # the claim a process holds while it checks and writes config.yaml
_POLL = 2.0  # seconds between looks at the runs other processes hold


def _check_live(
    layout: RunDirectory, cfg: ExperimentConfig, claims: Claims, restart: Sequence[str]
) -> bool:
    """A directory that live processes write (``leases.py``) is shared only with the same config;
    ``--restart-run`` deletes none of the runs they hold. Returns whether any process is live."""
    live = [
        key
        for key in claims.keys()
        if key != _SETUP and (info := claims.info(key)) is not None and info.live
    ]
    if not live:
        return False
    old = layout.saved_config()
    if old is not None and _identity(old) != _identity(to_dict(cfg)):
        raise ConfigError(
            f"{layout.path} is being written by another swalab process with a different config "
            f"(it holds {live[0]}); run the same config to share the work, or choose another --out"
        )
    busy = [key for key in live if key.split("/")[0] in restart]
    if busy:
        raise ConfigError(
            f"--restart-run cannot delete {busy[0]}: another swalab process is training it; "
            "wait for it to finish"
        )
    return True


def _claim_everything(
    cfg: ExperimentConfig, layout: RunDirectory, todo: Sequence[tuple[int, Any]], claims: Claims
) -> None:
    """Under torchrun rank 0 holds every run left (and pre-training) for the whole run."""
    keys = [run_key(m.label, seed) for seed, m in todo]
    keys += [pretrain_key(s) for s in {seed for seed, _ in todo} if cfg.pretrain.epochs > 0]
    for key in keys:
        if not claims.claim(key):
            raise ConfigError(
                f"{layout.path}: {key} is held by another swalab process; under torchrun "
                "start only when no other process writes --out"
            )


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """The config without what a resumed run may change (the trackers, ``train.log``), with the
    defaults of keys added since it was saved (``train.compile``: the same run as before)."""
    defaults = to_dict(ExperimentConfig())
    sections = {
        key: {**defaults[key], **(config.get(key) or {})}
        for key in ("data", "model", "train", "pretrain", "posthoc")
    }
    sections["train"].pop("log")
    for key in ("starts", "ends"):  # the grid `swalab posthoc` evaluates: not training
        sections["posthoc"].pop(key)
    return {**config, **sections}


def run_experiment(
    cfg: ExperimentConfig,
    out: Path,
    *,
    download: bool = False,
    argv: list[str] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    world: World = World(),
    jobs: int = 1,
    restart: Sequence[str] = (),
    share: bool = True,
    executor: str = "local",
    executor_options: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Train every (method, seed) of ``cfg`` under ``out`` and return the result rows.

    ``jobs > 1`` trains that many runs at once in worker processes (jobs.py); runs that raise are
    reported by :class:`RunsFailed` after the others have finished. ``restart``: method labels
    whose runs (every seed) are deleted first and trained again.

    ``share``: the epochs that several runs of a seed would train identically are trained once
    (``sharing.py``), with results equal to separate runs; also under ``jobs > 1`` (a job is a
    trajectory) and torchrun. ``share=False`` trains every run on its own.

    ``executor``: where the units (a seed's tree of runs) train, ``local`` (this machine, ``jobs``
    processes), ``submitit`` or ``ray`` with its ``executor_options`` (executors.py). Several
    processes may share ``out`` (same config): each trains the runs nobody holds (leases.py).

    Under torchrun every rank calls this with its ``world``; rank 0 alone reads and writes ``out``
    and shares what it found, the others train alongside it (distributed.py).
    """
    check_parts(cfg)  # every config error before anything is written or trained
    claims = Claims(out)
    try:
        return _run_experiment(
            cfg,
            out,
            claims,
            download,
            argv,
            log,
            progress,
            world,
            jobs,
            restart,
            share,
            executor,
            executor_options or {},
        )
    finally:
        claims.close()


def _run_experiment(
    cfg: ExperimentConfig,
    out: Path,
    claims: Claims,
    download: bool,
    argv: list[str] | None,
    log: Callable[[str], None],
    progress: bool,
    world: World,
    jobs: int,
    restart: Sequence[str],
    share: bool,
    executor: str,
    executor_options: Mapping[str, str],
) -> list[dict[str, Any]]:
    layout = RunDirectory(out)

    def prepare() -> None:
        _refuse_foreign(layout)  # before .claims/ is made in it
        try:
            out.mkdir(parents=True, exist_ok=True)
            claims.wait(_SETUP)  # one process at a time sets up a directory several share
        except OSError as err:
            raise ConfigError(f"cannot write to --out {out}: {err.strerror or err}") from None
        try:
            try:
                probe = out / ".write-test"
                atomic_write_text(probe, "")  # never through a planted link
                probe.unlink()
            except OSError as err:
                raise ConfigError(f"cannot write to --out {out}: {err.strerror or err}") from None
            _check_out_dir(layout, cfg)
            if not _check_live(layout, cfg, claims, restart):  # nobody else: leftovers are ours
                sweep_scratch(layout.path)
            for label in restart:  # after the config check: only runs of this same experiment
                remove_tree(layout.path / label)
            layout.write_config(to_dict(cfg))
            layout.write_meta(dict(_meta(cfg, argv or sys.argv, out), processes=world.size))
            prepare_trackers(cfg.train.log, out, to_dict(cfg))  # before any worker opens them
            # held while this process runs: one started meanwhile with another config is refused
            claims.claim(f"writers/{HOST}-{os.getpid()}")
        finally:
            claims.release(_SETUP)

    runs = [(seed, m) for seed in cfg.seeds for m in cfg.methods]
    check_jobs(jobs, len(runs), world.size)  # bad input fails before any work
    remote = open_executor(executor, executor_options, out, world.size)  # and a Ray address
    device = world.device if world.size > 1 else resolve_device(cfg.train.device)
    # e.g. fp16 on the CPU, or train.compile without a compiler
    Precision(cfg.train.precision, cfg.train.channels_last, device, cfg.train.compile)
    check_trackers(cfg.train.log)  # a missing tracker package fails before any work
    check_inputs(cfg, download)  # data options and files, model options: before any work
    if ":" in cfg.data.name:  # a user's own dataset: a wrong return fails before --out
        data_shape(cfg, cfg.seeds[0])
    world.on_main(prepare)
    if not world.main:
        log, progress = (lambda text: None), False
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)

    def finished() -> dict[tuple[str, int], dict[str, Any]]:
        results = {(m.label, seed): layout.run(m.label, seed).result() for seed, m in runs}
        return {key: row for key, row in results.items() if row is not None}

    rows = world.on_main(finished)
    todo = [(seed, m) for seed, m in runs if (m.label, seed) not in rows]
    if world.size > 1:
        world.on_main(partial(_claim_everything, cfg, layout, todo, claims))
    where = f"{world.size} processes on {device.type}" if world.size > 1 else str(device)
    log(
        f"{cfg.name}: {len(runs)} runs ({len(runs) - len(todo)} already done) on {where}, writing {out}"
    )

    bundles: dict[int, Any] = {}
    failures: list[str] = []
    with _progress(progress) as bar:
        task = bar.add_task("epochs", total=None)
        reporter = EpochReporter(bar, task, log, lines=not progress)

        def record(row: dict[str, Any]) -> None:
            label, seed = row["method"], row["seed"]
            if row["status"] == "diverged":
                log(f"diverged: {row['message']}; the other runs go on")
            elif not progress:  # no live bar: a line per epoch (on_epoch), one per run here
                metric = primary_metric([row])
                log(
                    f"[{len(rows) + 1}/{len(runs)}] {label} seed {seed}: {metric} "
                    f"{float(row.get(metric, float('nan'))):.4g} in {float(row['seconds']):.1f} s, "
                    f"ETA {reporter.eta_text()}"
                )
            rows[(label, seed)] = row
            if world.main:
                layout.write_results([rows[(m.label, s)] for s, m in runs if (m.label, s) in rows])

        if remote is not None and todo:  # one unit per seed tree, placed by submitit or Ray
            bundle = load_bundle(cfg, todo[0][0], download)
            steps = len(train_loader(cfg, bundle, todo[0][0], torch.device("cpu"))[0])
            trees = {
                seed: [tuple(m.label for m in root.methods) for root in roots]
                for seed, roots in plan_runs(cfg, todo, layout, steps, share).items()
            }
            failures = remote.run(cfg, out, trees, share=share, record=record, log=log)
        elif jobs > 1 and todo:
            # the data once here (a download, rather than by several workers at once; the steps
            # per epoch that plan the shared trajectories)
            bundle = load_bundle(cfg, todo[0][0], download)
            steps = len(train_loader(cfg, bundle, todo[0][0], torch.device("cpu"))[0])
            plans = plan_runs(cfg, todo, layout, steps, share)
            reporter.set_total(sum(trained_epochs(p) for p in plans.values()))
            failures = run_jobs(
                cfg,
                out,
                [(seed, root) for seed, roots in plans.items() for root in roots],
                jobs,
                device,
                share=share,
                record=record,
                bar=bar,
                task=task,
                log=log,
                progress=progress,
            )
        pretrain_todo = set(
            world.on_main(
                lambda: sorted(
                    {seed for seed, _ in todo if not layout.pretrain_path(seed).exists()}
                )
            )
        )
        # the seeds to train here with their groups of runs (None: every run left of the seed);
        # units a live process holds wait, and come back here if it stops before finishing them
        queue: list[tuple[int, list[tuple[str, ...]] | None]] = [
            (seed, None)
            for seed in dict.fromkeys(seed for seed, _ in todo)
            if jobs == 1 and remote is None
        ]
        waiting: list[Unit] = []
        while queue or waiting:
            if not queue:
                time.sleep(_POLL)
                finished_units, free, waiting = settle(cfg, out, waiting, claims)
                for row in [r for unit in finished_units for r in results(out, unit)]:
                    record(row)
                queue = [(u.seed, [u.labels]) for u in free]
                continue
            seed, groups = queue.pop(0)
            if seed not in bundles:  # under DDP rank 0 first: it downloads what the others read
                bundles = {seed: world.main_first(partial(load_bundle, cfg, seed, download))}
            if bar.tasks[task].total is None:
                steps = len(train_loader(cfg, bundles[seed], seed, torch.device("cpu"))[0])
                plans = world.on_main(partial(plan_runs, cfg, todo, layout, steps, share))
                pretraining = cfg.pretrain.epochs * len(pretrain_todo)
                reporter.set_total(pretraining + sum(trained_epochs(p) for p in plans.values()))
            if groups is None:
                groups = [tuple(m.label for m in root.methods) for root in plans.get(seed, [])]
            methods = [m for s, m in todo if s == seed]
            trackers = SeedTrackers(cfg.train.log if world.main else [], out, seed, to_dict(cfg))

            def on_epoch(methods: list[Any], record: dict[str, Any], seed: int = seed) -> None:
                if record.get("phase") == "pretrain":
                    reporter.epoch(f"pretrain seed {seed}", record, cfg.pretrain.epochs)
                    if record["epoch"] == cfg.pretrain.epochs:
                        pretrain_todo.discard(seed)
                    return
                what = f"{_labels(methods)} seed {seed}"
                bar.update(task, description=what)
                longest = max(recipe_of(m, cfg.train).epochs for m in methods)
                reporter.epoch(f"[{len(rows) + 1}/{len(runs)}] {what}", record, longest)

            def done(
                method: Any, result: Any, seconds: float, seed: int = seed, trackers: Any = trackers
            ) -> None:
                trackers.close(method.label, result)
                row = result_row(seed, method, result, seconds)
                if world.size > 1 and world.main:  # units.work writes it in one process
                    layout.run(method.label, seed).write_result(row)
                record(row)

            phase = "pretrain" if cfg.pretrain.epochs > 0 and seed in pretrain_todo else "train"
            bar.update(task, description=f"{phase} seed {seed}")
            try:
                if world.size > 1:  # torchrun: rank 0 holds every claim (taken at the start)
                    train_runs(
                        cfg,
                        [(m, layout.run(m.label, seed)) for m in methods],
                        seed,
                        bundles[seed],
                        device,
                        done=done,
                        on_record=trackers.log,
                        on_epoch=on_epoch,
                        world=world,
                        share=share,
                    )
                    continue
                held = work(
                    cfg,
                    out,
                    seed,
                    groups,
                    device,
                    claims,
                    bundle=lambda bundle=bundles[seed]: bundle,
                    done=done,
                    on_record=trackers.log,
                    on_epoch=on_epoch,
                    share=share,
                )
                if held:
                    log(
                        f"waiting for another process: {'; '.join(', '.join(g) for g in held)} "
                        f"seed {seed}"
                    )
                waiting += [Unit("run", seed, group) for group in held]
            finally:
                trackers.close()
    if world.main:  # every result, also those of the other processes sharing this directory
        rows.update(finished())
    ordered = [rows[(m.label, s)] for s, m in runs if (m.label, s) in rows]
    if world.main:
        layout.write_results(ordered)
    log(format_table(cfg.name, [{k: str(v) for k, v in r.items()} for r in ordered]))
    if failures:
        raise RunsFailed(
            f"{len(failures)} run(s) failed, the others finished (first: {failures[0]}); "
            "run the same command again to retry them"
        )
    return ordered


def plan_runs(
    cfg: ExperimentConfig,
    todo: Sequence[tuple[int, Any]],
    layout: RunDirectory,
    steps_per_epoch: int,
    share: bool = True,
) -> dict[int, list[Branch]]:
    """The trajectories that train ``todo`` ((seed, method) pairs), per seed, from where each run
    stands in ``layout`` (diverged runs left out, a run whose checkpoint cannot be read alone):
    ``sharing.plan_branches``."""
    plans = {}
    for seed in dict.fromkeys(seed for seed, _ in todo):
        points, unreadable = {}, []
        for method in [m for s, m in todo if s == seed]:
            try:
                points[method.label] = layout.run(method.label, seed).resume_point()
            except RunFileError:  # a run of its own, which fails alone when it loads the file
                unreadable.append(method)
        methods = [m for s, m in todo if s == seed and points.get(m.label) is not None]
        plans[seed] = [
            *plan_branches(cfg.train, methods, steps_per_epoch, points, share),
            *plan_branches(cfg.train, unreadable, steps_per_epoch, share=False),
        ]
    return plans


def _labels(methods: Sequence[Any]) -> str:
    """A short name for runs that train together: the first label and how many others."""
    first = methods[0].label
    return first if len(methods) == 1 else f"{first} (+{len(methods) - 1})"


def _progress(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


def format_table(name: str, rows: list[dict[str, str]]) -> str:
    """Mean ± std over seeds, paired difference to SGD with its 95% interval, and the raw values."""
    if not rows:
        return f"{name}: no results yet"
    metric = primary_metric(rows)
    summaries = summarize(rows, metric)
    unit = " (%)" if metric.endswith("accuracy") else ""
    header = f"{name}: {metric}{unit}, mean ± std over seeds; Δ = paired difference (same seeds) with 95% interval"
    lines = [
        header,
        f"{'method':<22} {'n':>2}  {'mean ± std':<18} {'Δ vs':<12} {'Δ [95% CI]':<28} raw",
    ]
    for s in summaries:
        n = f"{len(s.values)}" + (f" ({s.diverged} diverged)" if s.diverged else "")
        mean = f"{_num(s.mean, metric)} ± {_num(s.std, metric)}"
        diff = (
            ""
            if s.diff_mean is None
            else f"{_signed(s.diff_mean, metric)} [{_signed(s.diff_low, metric)}, {_signed(s.diff_high, metric)}]"
        )
        raw = " ".join(_num(v, metric) for v in s.values)
        lines.append(f"{s.label:<22} {n:>2}  {mean:<18} {s.baseline or '':<12} {diff:<28} {raw}")
    return "\n".join(lines)


def _num(value: float | None, metric: str) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.2f}" if metric.endswith("accuracy") else f"{value:.4f}"


def _signed(value: float | None, metric: str) -> str:
    text = _num(value, metric)
    return text if text == "–" or text.startswith("-") else "+" + text
