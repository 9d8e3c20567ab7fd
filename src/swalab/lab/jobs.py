"""``swalab run --jobs N``: N (method, seed) runs at once, each in its own spawned process.

The workers are N processes started with ``spawn`` (safe with CUDA and OpenMP), each holding the
dataset of the seed it works on. The main process hands out one job at a time to an idle worker,
receives its epochs and results through a queue, and alone writes ``result.json`` and
``results.csv``, exactly as the sequential loop does. Where the workers run:

- **CPU:** the cores are divided, ``threads = min(train.threads or cores, cores // N)`` per worker
  (at least 1), so N jobs × threads ≤ cores.
- **CUDA:** ``--device cuda`` deals the workers round-robin over the GPUs that
  ``CUDA_VISIBLE_DEVICES`` lists; ``cuda:K`` puts them all on GPU K (several processes share a
  GPU well when each leaves it idle between small kernels).

A run in a worker is the same ``train_run`` call with the same seeded generators as in the
sequential loop, so its results are identical (with the same number of threads per run). A seed's
pre-training cache is computed by one job before the runs of that seed are handed out, so it is
never computed twice at once. A run that raises is reported and the others go on; a diverged run
is a result like any other. Ctrl-C (SIGINT reaches the main process; the workers ignore it) stops
every worker; each run's checkpoint is written atomically after every epoch, so the same command
resumes them all.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ExperimentConfig, MethodConfig
from .methods import recipe_of
from .rundir import RunDirectory

__all__ = ["RunsFailed", "Slot", "check_jobs", "run_jobs", "slots"]

Job = tuple[str, int, str]  # ("pretrain" | "run", seed, method label ("" for pretrain))


class RunsFailed(RuntimeError):
    """Some runs raised an error; the others finished. A re-run retries the failed ones."""


@dataclass(frozen=True)
class Slot:
    """Where one worker process trains: its device and its number of CPU threads."""

    device: torch.device
    threads: int


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_jobs(jobs: int, runs: int, processes: int = 1) -> None:
    """One-line errors for a ``--jobs`` that cannot be honoured, before any work starts."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"--jobs must be an integer >= 1, got {jobs!r}")
    if jobs > runs:
        raise ConfigError(
            f"--jobs {jobs} is more than the {runs} runs of this experiment; "
            f"use --jobs {runs} or fewer"
        )
    if jobs > 1 and processes > 1:
        raise ConfigError(
            f"--jobs {jobs} cannot be combined with torchrun ({processes} processes); "
            "use --jobs 1 under torchrun"
        )


def slots(
    jobs: int, device: torch.device, threads: int | None, cores: int | None = None
) -> list[Slot]:
    """The device and thread count of each of ``jobs`` workers (see the module docstring)."""
    cores = cpu_cores() if cores is None else cores
    per_job = max(1, min(threads or cores, cores // jobs))
    if device.type == "cuda" and device.index is None:
        count = max(1, torch.cuda.device_count())
        return [Slot(torch.device("cuda", i % count), per_job) for i in range(jobs)]
    return [Slot(device, per_job) for _ in range(jobs)]


def _worker(
    index: int, slot: Slot, cfg: ExperimentConfig, out: Path, tasks: Any, events: Any
) -> None:
    """A worker process: take jobs from ``tasks`` until ``None``, report on ``events``."""
    from .config import to_dict
    from .inputs import load_bundle
    from .rundir import RunDirectory
    from .tracking import open_trackers
    from .trainer import pretrain, train_run

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when everyone stops
    torch.set_num_threads(slot.threads)
    if slot.device.type == "cuda":
        torch.cuda.set_device(slot.device)
    parent = os.getppid()
    bundles: dict[int, Any] = {}
    methods = {m.label: m for m in cfg.methods}
    layout = RunDirectory(out)
    while True:
        try:
            job = tasks.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:  # the main process is gone
                return
            continue
        if job is None:
            return
        kind, seed, label = job
        try:
            if seed not in bundles:  # one seed's data at a time
                bundles = {seed: load_bundle(cfg, seed)}
            start = time.perf_counter()
            if kind == "pretrain":
                pretrain(
                    cfg, bundles[seed], seed, layout.run(cfg.methods[0].label, seed), slot.device
                )
                result = None
            else:
                trackers = open_trackers(cfg.train.log, out, label, seed, to_dict(cfg))

                def on_epoch(
                    record: dict[str, Any], job: Job = job, trackers: Any = trackers
                ) -> None:
                    trackers.log(record)
                    events.put(("epoch", index, job, None))

                try:
                    result = train_run(
                        cfg,
                        methods[label],
                        seed,
                        bundles[seed],
                        layout.run(label, seed),
                        slot.device,
                        on_epoch=on_epoch,
                    )
                finally:
                    trackers.close()
            events.put(("done", index, job, (result, round(time.perf_counter() - start, 2))))
        except Exception as err:  # noqa: BLE001  (reported; the worker takes the next job)
            text = str(err).splitlines()[0] if str(err) else ""
            events.put(("failed", index, job, f"{type(err).__name__}: {text}"))


class _Pool:
    """The worker processes, started and stopped together."""

    def __init__(self, placement: list[Slot], cfg: ExperimentConfig, out: Path) -> None:
        self.context = mp.get_context("spawn")
        self.events = self.context.Queue()
        self.placement, self.cfg, self.out = placement, cfg, out
        self.processes: list[Any] = [None] * len(placement)
        self.tasks: list[Any] = [None] * len(placement)
        for i in range(len(placement)):
            self.start(i)

    def start(self, i: int) -> None:
        self.tasks[i] = self.context.Queue()
        self.processes[i] = self.context.Process(
            target=_worker,
            args=(i, self.placement[i], self.cfg, self.out, self.tasks[i], self.events),
            daemon=True,
            name=f"swalab-job-{i}",
        )
        # started with SIGINT ignored (inherited through exec), so a Ctrl-C during its start-up
        # does not kill it with a traceback: the main process stops the workers
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            self.processes[i].start()
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)

    def stop(self, graceful: bool) -> None:
        """``graceful``: let idle workers exit; otherwise terminate them (SIGTERM) mid-epoch."""
        for i, process in enumerate(self.processes):
            if graceful:
                self.tasks[i].put(None)
            elif process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=10 if graceful else 5)
            if process.is_alive():
                process.kill()
                process.join()


def run_jobs(
    cfg: ExperimentConfig,
    out: Path,
    todo: list[tuple[int, MethodConfig]],
    jobs: int,
    device: torch.device,
    *,
    record: Callable[[int, MethodConfig, Any, float], None],
    bar: Any,
    task: Any,
    log: Callable[[str], None],
    progress: bool,
) -> list[str]:
    """Train ``todo`` on ``jobs`` worker processes; ``record`` each result in the main process.

    Returns the failures, one line each. ``bar``/``task`` are the runner's rich progress display
    and its overall task; every running job gets a bar of its own (``progress``), or one line per
    event when there is no terminal.
    """
    methods = {m.label: m for m in cfg.methods}
    seeds = sorted({seed for seed, _ in todo}, key=[s for s, _ in todo].index)
    cached = {
        s for s in seeds if cfg.pretrain.epochs == 0 or RunDirectory(out).pretrain_path(s).exists()
    }
    pending: list[Job] = [("pretrain", s, "") for s in seeds if s not in cached]
    pending += [("run", seed, m.label) for seed, m in todo]
    placement = slots(min(jobs, len(todo)), device, cfg.train.threads)
    where = sorted({str(s.device) for s in placement})
    log(
        f"{len(placement)} jobs at once on {', '.join(where)}, "
        f"{placement[0].threads} thread(s) each"
    )
    if device.type == "cpu" and len(placement) > cpu_cores():
        log(f"note: {len(placement)} jobs share {cpu_cores()} CPU cores")
    failures: list[str] = []
    running: dict[int, tuple[Job, Any]] = {}  # worker -> (job, its bar)

    def name(job: Job) -> str:
        return f"pre-training seed {job[1]}" if job[0] == "pretrain" else f"{job[2]} seed {job[1]}"

    def fail(job: Job, message: str) -> None:
        failures.append(f"{name(job)}: {message}")
        log(f"failed: {name(job)}: {message}; the other runs go on")
        if job[0] == "pretrain":  # the runs of that seed cannot start
            for waiting in [j for j in pending if j[1] == job[1]]:
                pending.remove(waiting)
                failures.append(f"{name(waiting)}: its pre-training failed")

    def ready(job: Job) -> bool:
        return job[0] == "pretrain" or job[1] in cached

    pool = _Pool(placement, cfg, out)
    graceful = False
    try:
        while pending or running:
            for worker in range(len(placement)):
                if worker in running:
                    continue
                job = next((j for j in pending if ready(j)), None)
                if job is None:
                    break
                pending.remove(job)
                epochs = None if job[0] == "pretrain" else _epochs(cfg, methods[job[2]])
                running[worker] = (job, bar.add_task(name(job), total=epochs))
                if not progress:
                    log(f"started {name(job)} on {placement[worker].device}")
                pool.tasks[worker].put(job)
            try:
                kind, worker, job, payload = pool.events.get(timeout=1.0)
            except queue.Empty:  # a worker that died without a word (killed, out of memory)
                for worker, (job, _) in list(running.items()):
                    if not pool.processes[worker].is_alive():
                        code = pool.processes[worker].exitcode
                        bar.remove_task(running.pop(worker)[1])
                        fail(job, f"its worker process exited with code {code}")
                        pool.start(worker)
                continue
            if kind == "epoch":
                bar.advance(running[worker][1])
                bar.advance(task)
                continue
            bar.remove_task(running.pop(worker)[1])
            if kind == "failed":
                fail(job, payload)
            elif job[0] == "pretrain":
                cached.add(job[1])
                if not progress:
                    log(f"finished {name(job)} in {payload[1]:.1f} s")
            else:
                result, seconds = payload
                record(job[1], methods[job[2]], result, seconds)
        graceful = True
    finally:
        with contextlib.suppress(Exception):
            pool.stop(graceful)
    return failures


def _epochs(cfg: ExperimentConfig, method: MethodConfig) -> int:
    return recipe_of(method, cfg.train).epochs
