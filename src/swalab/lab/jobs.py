"""``swalab run --jobs N``: N trajectories at once, each in its own spawned process.

A job is one trajectory of one seed (``sharing.py``): the runs that train their common epochs once
(one run when nothing is shared, or under ``--no-share``).

The workers are N processes started with ``spawn`` (safe with CUDA and OpenMP), each holding the
dataset of the seed it works on. The main process hands out one job at a time to an idle worker
and receives its epochs and results through a queue; a worker trains a job under its claims
(``units.work``: it writes each run's ``result.json`` before releasing it), the main process writes
``results.csv``. A job another process holds (a second ``swalab run`` on the same ``--out``,
``leases.py``) waits, and comes back to a worker if that process stops before finishing it.
Where the workers run:

- **CPU:** the cores are divided, ``threads = min(train.threads or cores, cores // N)`` per worker
  (at least 1), so N jobs × threads ≤ cores.
- **CUDA:** ``--device cuda`` deals the workers round-robin over the GPUs that
  ``CUDA_VISIBLE_DEVICES`` lists; ``cuda:K`` puts them all on GPU K (several processes share a
  GPU well when each leaves it idle between small kernels).

A job in a worker is the same ``train_runs`` call with the same seeded generators as in the
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

from .config import ConfigError, ExperimentConfig
from .leases import Claims
from .rundir import RunDirectory
from .sharing import Branch
from .units import Unit, result_row, results, settle, work

__all__ = ["RunsFailed", "Slot", "auto_jobs", "check_jobs", "die_with_parent", "run_jobs", "slots"]

Job = tuple[
    str, int, tuple[str, ...]
]  # ("pretrain" | "run", seed, method labels (none for pretrain))


_POLL = 2.0  # seconds between looks at the units other processes hold


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


def auto_jobs(threads: int | None, device: torch.device, runs: int, processes: int = 1) -> int:
    """``--jobs auto``: as many processes as fit without changing what any run computes: on the
    CPU the cores divided by each run's ``train.threads`` (one process when it is unset: torch
    then uses every core), one per visible GPU for ``cuda``; at most ``runs``, one under torchrun."""
    if processes > 1:
        return 1
    if device.type == "cuda":
        fit = max(1, torch.cuda.device_count()) if device.index is None else 1
    else:
        fit = cpu_cores() // threads if threads else 1
    return max(1, min(fit, runs))


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


def die_with_parent(parent: int) -> None:
    """Make this worker process end when ``parent`` (the main process) does, even mid-epoch.

    A worker that outlived a killed main process would go on writing run files into ``--out``
    while a re-run holds it. On Linux the kernel sends SIGKILL at once (``prctl``'s
    ``PR_SET_PDEATHSIG``); everywhere a daemon thread also watches the parent's pid. A parent that
    is already gone ends the worker here.
    """
    import ctypes
    import sys
    import time

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="swalab-parent-watch", daemon=True).start()


def _worker(
    index: int,
    slot: Slot,
    cfg: ExperimentConfig,
    out: Path,
    share: bool,
    parent: int,
    tasks: Any,
    events: Any,
) -> None:
    """A worker process: take jobs from ``tasks`` until ``None``, report on ``events``.

    ``parent``: the main process's pid, which the worker does not outlive."""
    from .config import to_dict
    from .inputs import load_bundle
    from .tracking import SeedTrackers

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when everyone stops
    die_with_parent(parent)  # never writes into --out after the main process is gone
    torch.set_num_threads(slot.threads)
    if slot.device.type == "cuda":
        torch.cuda.set_device(slot.device)
    bundles: dict[int, Any] = {}
    claims = Claims(out)  # this worker's own: a claim ends with the process that trains
    try:
        while True:
            try:
                job = tasks.get(timeout=2.0)
            except queue.Empty:
                if os.getppid() != parent:  # the main process is gone
                    return
                continue
            if job is None:
                return
            kind, seed, labels = job
            try:
                if seed not in bundles:  # one seed's data at a time
                    bundles = {seed: load_bundle(cfg, seed)}
                trackers = SeedTrackers(cfg.train.log, out, seed, to_dict(cfg))

                def done(
                    method: Any,
                    result: Any,
                    seconds: float,
                    job: Job = job,
                    seed: int = seed,
                    trackers: Any = trackers,
                ) -> None:
                    trackers.close(method.label, result)
                    events.put(("result", index, job, result_row(seed, method, result, seconds)))

                def on_epoch(methods: list[Any], record: Any, job: Job = job) -> None:
                    if methods:  # not pre-training
                        events.put(("epoch", index, job, None))

                try:
                    held = work(
                        cfg,
                        out,
                        seed,
                        [labels],
                        slot.device,
                        claims,
                        bundle=lambda bundle=bundles[seed]: bundle,
                        done=done,
                        on_record=trackers.log,
                        on_epoch=on_epoch,
                        share=share,
                    )
                finally:
                    trackers.close()
                events.put(("held" if held else "done", index, job, None))
            except Exception as err:  # noqa: BLE001  (reported; the worker takes the next job)
                text = str(err).splitlines()[0] if str(err) else ""
                events.put(("failed", index, job, f"{type(err).__name__}: {text}"))
    finally:
        claims.close()


class _Pool:
    """The worker processes, started and stopped together."""

    def __init__(
        self, placement: list[Slot], cfg: ExperimentConfig, out: Path, share: bool
    ) -> None:
        self.context = mp.get_context("spawn")
        self.events = self.context.Queue()
        self.placement, self.cfg, self.out, self.share = placement, cfg, out, share
        self.processes: list[Any] = [None] * len(placement)
        self.tasks: list[Any] = [None] * len(placement)
        for i in range(len(placement)):
            self.start(i)

    def start(self, i: int) -> None:
        self.tasks[i] = self.context.Queue()
        self.processes[i] = self.context.Process(
            target=_worker,
            args=(
                i,
                self.placement[i],
                self.cfg,
                self.out,
                self.share,
                os.getpid(),
                *self.queues(i),
            ),
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

    def queues(self, i: int) -> tuple[Any, Any]:
        return self.tasks[i], self.events

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
    trajectories: list[tuple[int, Branch]],
    jobs: int,
    device: torch.device,
    *,
    share: bool,
    record: Callable[[dict[str, Any]], None],
    bar: Any,
    task: Any,
    log: Callable[[str], None],
    progress: bool,
) -> list[str]:
    """Train ``trajectories`` ((seed, root branch) pairs, ``sharing.py``) on ``jobs`` worker
    processes; ``record`` each run's result in the main process.

    Returns the failures, one line each. ``bar``/``task`` are the runner's rich progress display
    and its overall task; every running job gets a bar of its own (``progress``), or one line per
    event when there is no terminal.
    """
    seeds = list(dict.fromkeys(seed for seed, _ in trajectories))
    cached = {
        s for s in seeds if cfg.pretrain.epochs == 0 or RunDirectory(out).pretrain_path(s).exists()
    }
    epochs: dict[Job, int] = {}
    pending: list[Job] = [("pretrain", s, ()) for s in seeds if s not in cached]
    for seed, root in trajectories:
        job: Job = ("run", seed, tuple(m.label for m in root.methods))
        epochs[job] = root.epochs()
        pending.append(job)
    placement = slots(min(jobs, len(trajectories)), device, cfg.train.threads)
    where = sorted({str(s.device) for s in placement})
    log(
        f"{len(placement)} jobs at once on {', '.join(where)}, "
        f"{placement[0].threads} thread(s) each"
    )
    if device.type == "cpu" and len(placement) > cpu_cores():
        log(f"note: {len(placement)} jobs share {cpu_cores()} CPU cores")
    failures: list[str] = []
    running: dict[int, tuple[Job, Any]] = {}  # worker -> (job, its bar)
    recorded: set[tuple[str, int]] = set()

    def name(job: Job) -> str:
        kind, seed, labels = job
        return (
            f"pre-training seed {seed}"
            if kind == "pretrain"
            else f"{', '.join(labels)} seed {seed}"
        )

    def fail(job: Job, message: str) -> None:
        kind, seed, labels = job
        left = [label for label in labels if (label, seed) not in recorded]
        failures.append(f"{name((kind, seed, tuple(left)))}: {message}")
        log(f"failed: {name((kind, seed, tuple(left)))}: {message}; the other runs go on")
        if kind == "pretrain":  # the runs of that seed cannot start
            for waiting in [j for j in pending if j[1] == seed]:
                pending.remove(waiting)
                failures.append(f"{name(waiting)}: its pre-training failed")

    def ready(job: Job) -> bool:
        return job[0] == "pretrain" or job[1] in cached

    waiting: list[Unit] = []
    looked = time.monotonic()
    claims = Claims(out)  # only reads: the workers hold the claims
    pool = _Pool(placement, cfg, out, share)
    graceful = False
    try:
        while pending or running or waiting:
            if waiting and time.monotonic() - looked > _POLL:  # units other processes hold
                looked = time.monotonic()
                finished, free, waiting = settle(cfg, out, waiting, claims)
                for unit in finished:
                    for row in results(out, unit):
                        recorded.add((row["method"], unit.seed))
                        record(row)
                    if unit.kind == "pretrain":
                        cached.add(unit.seed)
                pending += [(u.kind, u.seed, u.labels) for u in free]
            for worker in range(len(placement)):
                if worker in running:
                    continue
                job = next((j for j in pending if ready(j)), None)
                if job is None:
                    break
                pending.remove(job)
                running[worker] = (job, bar.add_task(_short(name(job)), total=epochs.get(job)))
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
            if kind == "result":
                recorded.add((payload["method"], job[1]))
                record(payload)
                continue
            bar.remove_task(running.pop(worker)[1])
            if kind == "held":
                log(f"waiting for another process: {name(job)}")
                waiting.append(Unit(*job))
            elif kind == "failed":
                fail(job, payload)
            elif job[0] == "pretrain":
                cached.add(job[1])
                if not progress:
                    log(f"finished {name(job)}")
        graceful = True
    finally:
        with contextlib.suppress(Exception):
            pool.stop(graceful)
    return failures


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
