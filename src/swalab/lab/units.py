"""A unit of work of ``swalab run``: a seed's tree of runs (``sharing.py``), trained under claims.

Whoever trains (the main process, a ``--jobs`` worker, a Slurm job, a Ray task) calls
:func:`work` with groups of runs of one seed; each group (a tree's root: runs that share their
first epochs) is claimed whole (``leases.py``) or left to the live process that holds part of it.
Under the claims the runs are looked at again (a run another process finished meanwhile is not
trained again; an unfinished one resumes from its checkpoint), so where the work is placed never
changes what is trained: no epoch is trained by two processes, and every result equals that of
one process training everything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ExperimentConfig, MethodConfig
from .files import is_scratch
from .leases import Claims
from .rundir import RunDirectory

__all__ = [
    "Unit",
    "pretrain_key",
    "result_row",
    "run_key",
    "results",
    "settle",
    "state",
    "sweep_scratch",
    "work",
]


@dataclass(frozen=True)
class Unit:
    """``kind`` "pretrain" (a seed's pre-training cache) or "run" (runs ``labels`` of ``seed``)."""

    kind: str
    seed: int
    labels: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        if self.kind == "pretrain":
            return f"pre-training seed {self.seed}"
        return f"{', '.join(self.labels)} seed {self.seed}"


def run_key(label: str, seed: int) -> str:
    return f"{label}/seed{seed}"


def pretrain_key(seed: int) -> str:
    return f"pretrain/seed{seed}"


def result_row(seed: int, method: MethodConfig, result: Any, seconds: float) -> dict[str, Any]:
    """A run's row of ``results.csv`` (and its ``result.json``)."""
    return {
        "method": method.label,
        "method_name": method.method,
        "baseline": method.baseline,
        "seed": seed,
        "budget": method.budget,
        "epochs": result.epochs,
        "status": result.status,
        "seconds": seconds,
        "message": result.message,
        **result.metrics,
    }


def state(cfg: ExperimentConfig, out: Path, unit: Unit, claims: Claims) -> str:
    """Where a unit stands: "done" (every run has its result; the cache exists), "held" (a live
    process holds part of it) or "free" (nobody does: to be trained, or resumed)."""
    layout = RunDirectory(out)
    if unit.kind == "pretrain":
        if layout.pretrain_path(unit.seed).exists():
            return "done"
        keys = [pretrain_key(unit.seed)]
    else:
        left = [label for label in unit.labels if layout.run(label, unit.seed).result() is None]
        if not left:
            return "done"
        keys = [run_key(label, unit.seed) for label in left]
        if cfg.pretrain.epochs > 0 and not layout.pretrain_path(unit.seed).exists():
            keys.append(pretrain_key(unit.seed))
    for key in keys:
        info = claims.info(key)
        if info is not None and not info.stale(timeout=claims.timeout):
            return "held"
    return "free"


def _claim_all(claims: Claims, keys: Sequence[str]) -> bool:
    """Claim every key or none (in sorted order, so two processes never wait on each other)."""
    taken: list[str] = []
    for key in sorted(keys):
        if key in claims.held or claims.claim(key):
            taken.append(key)
            continue
        for got in taken:
            claims.release(got)
        return False
    return True


def sweep_scratch(folder: Path) -> None:
    """Temporary files a killed process left under ``folder`` (which no live process writes)."""
    if folder.is_dir():
        for path in folder.rglob(".*"):
            if path.is_file() and not path.is_symlink() and is_scratch(path.name):
                with contextlib.suppress(OSError):
                    path.unlink()


def work(
    cfg: ExperimentConfig,
    out: Path,
    seed: int,
    groups: Sequence[Sequence[str]],
    device: torch.device,
    claims: Claims,
    *,
    bundle: Callable[[], Any],
    done: Callable[[MethodConfig, Any, float], None],
    on_record: Callable[[MethodConfig, dict[str, Any]], None] = lambda method, record: None,
    on_epoch: Callable[[list[MethodConfig], dict[str, Any]], None] = lambda m, record: None,
    share: bool = True,
) -> list[tuple[str, ...]]:
    """Train the groups of runs of ``seed`` (method labels; ``()``: only the seed's pre-training
    cache) that this process can claim, together; return the groups a live process holds.

    ``bundle()`` gives the seed's data; ``done``, ``on_record`` and ``on_epoch`` are those of
    ``trainer.train_runs``. Each finished run's ``result.json`` is written before its claim is
    released. A claim taken over meanwhile (``leases.py``) stops the training at the next epoch
    with :class:`leases.ClaimLost`.
    """
    from .trainer import pretrain, train_runs

    layout = RunDirectory(out)
    methods = {m.label: m for m in cfg.methods}
    mine: list[str] = []
    held: list[tuple[str, ...]] = []
    keys: list[str] = []
    for group in groups:
        group_keys = [run_key(label, seed) for label in group] or [pretrain_key(seed)]
        if _claim_all(claims, group_keys):
            mine.extend(group)
            keys.extend(group_keys)
        else:
            held.append(tuple(group))
    try:
        left = [label for label in mine if layout.run(label, seed).result() is None]
        cached = cfg.pretrain.epochs == 0 or layout.pretrain_path(seed).exists()
        needs_pretrain = not cached and (left or pretrain_key(seed) in keys)
        if needs_pretrain and not _claim_all(claims, [pretrain_key(seed)]):
            return [tuple(group) for group in groups]  # another process pre-trains this seed
        if needs_pretrain:
            keys.append(pretrain_key(seed))
        for label in left:
            sweep_scratch(layout.run(label, seed).path)
        if not left:
            if needs_pretrain:
                pretrain(
                    cfg,
                    bundle(),
                    seed,
                    layout.run(cfg.methods[0].label, seed),
                    device,
                    on_epoch=lambda record: on_epoch([], record),
                )
            return held

        def finished(method: MethodConfig, result: Any, seconds: float) -> None:
            layout.run(method.label, seed).write_result(result_row(seed, method, result, seconds))
            claims.release(run_key(method.label, seed))
            done(method, result, seconds)

        def epoch(trained: list[MethodConfig], record: dict[str, Any]) -> None:
            for key in keys:
                claims.check(key)
                if trained:
                    claims.set_epoch(key, record["epoch"])
            on_epoch(trained, record)

        try:
            train_runs(
                cfg,
                [(methods[label], layout.run(label, seed)) for label in left],
                seed,
                bundle(),
                device,
                done=finished,
                on_record=on_record,
                on_epoch=epoch,
                share=share,
            )
        except Exception as err:
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            for key in keys:
                claims.release(key, failed=why)
            raise
    finally:
        for key in keys:
            claims.release(key)
    return held


def settle(
    cfg: ExperimentConfig, out: Path, waiting: Sequence[Unit], claims: Claims
) -> tuple[list[Unit], list[Unit], list[Unit]]:
    """Units left to live processes, looked at again: those now done, those now free (their
    holder is gone: to train here) and those still held."""
    done: list[Unit] = []
    free: list[Unit] = []
    held: list[Unit] = []
    for unit in waiting:
        now = state(cfg, out, unit, claims)
        (done if now == "done" else free if now == "free" else held).append(unit)
    return done, free, held


def results(out: Path, unit: Unit) -> list[dict[str, Any]]:
    """The result rows of a unit's finished runs (another process may have written them)."""
    layout = RunDirectory(out)
    rows = [layout.run(label, unit.seed).result() for label in unit.labels]
    return [row for row in rows if row is not None]
