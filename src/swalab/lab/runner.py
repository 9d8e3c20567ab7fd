"""Run every (method × seed) of an experiment into a run directory, resumably, and tabulate it.

Layout of a run directory::

    config.yaml  meta.json  results.csv
    <method label>/seed<k>/{metrics.jsonl, checkpoint.pt, final.pt, result.json}
    pretrain/seed<k>.pt          (only with a pre-training phase)

Re-running the same command skips finished runs and continues unfinished ones from their last
completed epoch.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from ..data import DATASETS, DataBundle
from ..data import load as load_data
from .config import ConfigError, ExperimentConfig, read_yaml, to_dict
from .distributed import World
from .stats import primary_metric, summarize
from .files import atomic_write_text, holds_files, read_json, remove_tree
from .trainer import resolve_device, train_run

__all__ = ["run_experiment", "format_table", "load_bundle", "read_results", "RESULT_FIELDS"]

RESULT_FIELDS = [
    "method", "method_name", "baseline", "seed", "budget", "epochs", "status",
    "train_loss", "val_loss", "val_accuracy", "val_mse",
    "test_loss", "test_accuracy", "test_ece", "test_mse", "seconds", "message",
]
_RUN_SPECIFIC = ("seeds", "description", "variants")


def _meta(cfg: ExperimentConfig, argv: list[str]) -> dict[str, Any]:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    import swalab

    return {
        "command": argv, "python": platform.python_version(), "torch": torch.__version__,
        "swalab": swalab.__version__, "git_revision": rev, "platform": platform.platform(),
    }


def _check_out_dir(out: Path, cfg: ExperimentConfig) -> None:
    """Refuse to mix two different experiments in one directory (resuming needs the same config)."""
    saved = out / "config.yaml"
    if not saved.exists():
        if out.exists() and holds_files(out):
            raise ConfigError(f"{out} is not empty and holds no swalab run; choose another --out")
        return
    old = read_yaml(saved)
    new = to_dict(cfg)
    changed = sorted(k for k in new if k not in _RUN_SPECIFIC and old.get(k) != new[k])
    if changed:
        raise ConfigError(
            f"{out} holds a run with a different config ({', '.join(changed)} differ); "
            "choose another --out to run this one"
        )


def read_results(out: Path) -> list[dict[str, str]]:
    path = out / "results.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in RESULT_FIELDS})
    atomic_write_text(out / "results.csv", buffer.getvalue())


def run_experiment(
    cfg: ExperimentConfig,
    out: Path,
    *,
    download: bool = False,
    argv: list[str] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    world: World = World(),
    restart: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Train every (method, seed) of ``cfg`` under ``out`` and return the result rows.

    ``restart``: method labels whose runs (every seed) are deleted first and trained again.

    Under torchrun every rank calls this with its ``world``; rank 0 alone reads and writes ``out``
    and shares what it found, the others train alongside it (distributed.py).
    """
    def prepare() -> None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            atomic_write_text(probe, "")  # never through a planted link
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"cannot write to --out {out}: {err.strerror or err}") from None
        _check_out_dir(out, cfg)
        for label in restart:  # after the config check: only runs of this same experiment
            remove_tree(out / label)
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        meta = dict(_meta(cfg, argv or sys.argv), processes=world.size)
        atomic_write_text(out / "meta.json", json.dumps(meta, indent=2))

    world.on_main(prepare)
    if not world.main:
        log, progress = (lambda text: None), False
    DATASETS.get(cfg.data.name)  # unknown names fail before any work
    device = world.device if world.size > 1 else resolve_device(cfg.train.device)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    runs = [(seed, m) for seed in cfg.seeds for m in cfg.methods]

    def finished() -> dict[tuple[str, int], dict[str, Any]]:
        paths = {(m.label, seed): out / m.label / f"seed{seed}" / "result.json" for seed, m in runs}
        return {key: read_json(path) for key, path in paths.items() if path.exists()}

    rows = world.on_main(finished)
    todo = [(seed, m) for seed, m in runs if (m.label, seed) not in rows]
    where = f"{world.size} processes on {device.type}" if world.size > 1 else str(device)
    log(f"{cfg.name}: {len(runs)} runs ({len(runs) - len(todo)} already done) on {where}, writing {out}")

    bundles: dict[int, Any] = {}
    started = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("epochs", total=None)
        for seed, method in todo:
            if seed not in bundles:  # under DDP rank 0 first: it downloads what the others then read
                bundles = {seed: world.main_first(lambda: load_bundle(cfg, seed, download))}
            bundle = bundles[seed]
            if bar.tasks[task].total is None:
                bar.update(task, total=_total_epochs(cfg, todo))
            bar.update(task, description=f"{method.label} seed {seed}")
            run_dir = out / method.label / f"seed{seed}"
            if world.main:
                run_dir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            result = train_run(cfg, method, seed, bundle, run_dir, device, on_epoch=lambda: bar.advance(task),
                               world=world)
            row = {"method": method.label, "method_name": method.method, "baseline": method.baseline,
                   "seed": seed, "budget": method.budget,
                   "epochs": result.epochs, "status": result.status, "seconds": round(time.perf_counter() - start, 2),
                   "message": result.message, **result.metrics}
            if result.status == "diverged":
                log(f"diverged: {result.message}; the other runs go on")
            elif not progress:  # no live bar (not a terminal): one line per run, with an ETA
                done, total = bar.tasks[task].completed, bar.tasks[task].total or 1
                eta = (time.perf_counter() - started) / max(done, 1) * (total - done)
                metric = "test_mse" if "test_mse" in result.metrics else "test_accuracy"
                log(f"[{len(rows) + 1}/{len(runs)}] {method.label} seed {seed}: {metric} "
                    f"{result.metrics.get(metric, float('nan')):.4g} in {row['seconds']:.1f} s, ETA {eta:.0f} s")
            rows[(method.label, seed)] = row
            if world.main:
                atomic_write_text(run_dir / "result.json", json.dumps(row, indent=2))
                _write_results(out, [rows[(m.label, s)] for s, m in runs if (m.label, s) in rows])
    ordered = [rows[(m.label, s)] for s, m in runs]
    if world.main:
        _write_results(out, ordered)
    log(format_table(cfg.name, [{k: str(v) for k, v in r.items()} for r in ordered]))
    return ordered


def load_bundle(cfg: ExperimentConfig, seed: int, download: bool = False) -> DataBundle:
    """The experiment's dataset for ``seed``, cut to ``data.train_size``/``data.test_size`` if set."""
    options = dict(cfg.data.options)
    builder_params = inspect.signature(DATASETS.get(cfg.data.name)).parameters
    unknown = sorted(set(options) - set(builder_params) - {"root", "download", "seed"})
    if unknown:
        raise ConfigError(f"unknown data.options {unknown} for dataset {cfg.data.name!r}")
    bundle = load_data(cfg.data.name, root=cfg.data.root, download=download, seed=seed, **options)
    if cfg.data.train_size is not None and cfg.data.train_size < len(bundle.train):
        keep = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed))[: cfg.data.train_size]
        bundle = dataclasses.replace(bundle, train=bundle.train.subset(keep))
    if cfg.data.test_size is not None and cfg.data.test_size < len(bundle.test):
        bundle = dataclasses.replace(bundle, test=bundle.test.subset(slice(0, cfg.data.test_size)))
    return bundle


def _total_epochs(cfg: ExperimentConfig, todo: list) -> int:
    return sum(0 if m.method == "none" else max(1, math.floor(m.budget * cfg.train.epochs + 0.5)) for _, m in todo)


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not enabled, transient=True,
    )


def format_table(name: str, rows: list[dict[str, str]]) -> str:
    """Mean ± std over seeds, paired difference to SGD with its 95% interval, and the raw values."""
    if not rows:
        return f"{name}: no results yet"
    metric = primary_metric(rows)
    summaries = summarize(rows, metric)
    unit = " (%)" if metric.endswith("accuracy") else ""
    header = f"{name}: {metric}{unit}, mean ± std over seeds; Δ = paired difference (same seeds) with 95% interval"
    lines = [header, f"{'method':<22} {'n':>2}  {'mean ± std':<18} {'Δ vs':<12} {'Δ [95% CI]':<28} raw"]
    for s in summaries:
        n = f"{len(s.values)}" + (f" ({s.diverged} diverged)" if s.diverged else "")
        mean = f"{_num(s.mean, metric)} ± {_num(s.std, metric)}"
        diff = "" if s.diff_mean is None else f"{_signed(s.diff_mean, metric)} [{_signed(s.diff_low, metric)}, {_signed(s.diff_high, metric)}]"
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
