"""``swalab run --executor local|submitit|ray``: where the units of an experiment train.

The planner (``runner.plan_runs``, ``sharing.py``) alone decides what is trained and which runs
share a trunk; an executor only places units (``units.py``: one unit = a seed's tree of runs,
pre-training included) and every unit claims its runs itself (``leases.py``), so an executor
never changes a result, and a unit placed twice (a requeued job, a second ``swalab run``) trains
nothing twice.

- ``local`` (default): ``--jobs N`` processes of this machine (``jobs.py``).
- ``submitit``: one Slurm job per seed tree through submitit (``pip install 'swalab[slurm]'``),
  submitted as one job array; ``--executor-option KEY=VALUE`` sets the job's resources. A job
  that Slurm preempts or times out is requeued (submitit's checkpointing) and its runs resume
  from their checkpoints, bit for bit; ``cluster=local`` runs the jobs as local processes (tests).
- ``ray``: one Ray task per seed tree (``pip install 'swalab[ray]'``), on the cluster at
  ``RAY_ADDRESS`` or ``address=...``, else a local one; ``num_gpus=0.25`` packs four trees on a
  GPU. Ctrl-C cancels the tasks; the same command resumes them.

:func:`open_executor` is the one door: it checks the name and options (one-line errors, before
anything is written) and returns an executor whose ``run`` trains the units.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, ExperimentConfig
from .leases import Claims
from .units import Unit, results, settle

__all__ = ["EXECUTORS", "RemoteExecutor", "open_executor", "parse_options", "train_unit"]

EXECUTORS = ("local", "submitit", "ray")
_POLL = 2.0

# --executor-option KEY -> (submitit parameter, type); KEYs are submitit's own or Slurm's words
_SUBMITIT = {
    "cluster": (None, str),  # slurm | local | debug (default: slurm where sbatch exists)
    "folder": (None, str),  # logs and pickles (default: <out>/.submitit)
    "partition": ("slurm_partition", str),
    "time": ("timeout_min", int),  # minutes
    "gpus_per_node": ("gpus_per_node", int),
    "cpus_per_task": ("cpus_per_task", int),
    "mem_gb": ("mem_gb", float),
    "array_parallelism": ("slurm_array_parallelism", int),
    "account": ("slurm_account", str),
    "qos": ("slurm_qos", str),
    "constraint": ("slurm_constraint", str),
    "max_requeue": ("slurm_max_num_timeout", int),  # requeues after a timeout (default 3)
}
_RAY = {"address": str, "num_gpus": float, "num_cpus": float}


def parse_options(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings of ``--executor-option`` as a dict (a malformed one: one line)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--executor-option must be KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    return options


def _typed(name: str, key: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(
            f"--executor-option {key}={value!r} for {name}: expected {kind.__name__}"
        ) from None


def _check_known(name: str, options: Mapping[str, str], known: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(known) if known else "none"
        raise ConfigError(
            f"unknown --executor-option {unknown[0]!r} for --executor {name} (known: {listed})"
        )


def _need(module: str, extra: str, name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"--executor {name} needs the {module} package: pip install 'swalab[{extra}]'"
        ) from None


def open_executor(
    name: str, options: Mapping[str, str], out: Path, processes: int = 1
) -> RemoteExecutor | None:
    """The executor ``name`` with its ``options`` checked (None: ``local``, ``jobs.py``).

    Raises a one-line :class:`ConfigError` for an unknown executor or option, a missing package,
    or a Ray address that does not answer, before anything is written or claimed.
    """
    if name not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {name!r}")
    if name == "local":
        _check_known(name, options, [])
        return None
    if processes > 1:
        raise ConfigError(f"--executor {name} cannot be combined with torchrun; start it alone")
    if name == "submitit":
        _check_known(name, options, list(_SUBMITIT))
        params = {
            _SUBMITIT[k][0]: _typed(name, k, v, _SUBMITIT[k][1])
            for k, v in options.items()
            if _SUBMITIT[k][0] is not None
        }
        cluster = options.get("cluster")
        if cluster not in (None, "slurm", "local", "debug"):
            raise ConfigError(
                f"--executor-option cluster must be slurm, local or debug, got {cluster!r}"
            )
        _need("submitit", "slurm", name)
        return _Submitit(Path(options.get("folder") or Path(out) / ".submitit"), cluster, params)
    _check_known(name, options, list(_RAY))
    typed = {k: _typed(name, k, v, _RAY[k]) for k, v in options.items()}
    for key in ("num_gpus", "num_cpus"):
        if key in typed and not typed[key] >= 0:
            raise ConfigError(f"--executor-option {key} must be >= 0, got {options[key]!r}")
    _need("ray", "ray", name)
    return _Ray(typed.get("address") or os.environ.get("RAY_ADDRESS"), typed)


def train_unit(
    cfg: ExperimentConfig, out: str, seed: int, groups: list[tuple[str, ...]], share: bool
) -> list[tuple[str, ...]]:
    """A unit where an engine placed it (a Slurm job, a Ray task): train the groups of ``seed``
    this process can claim on ``train.device``; return those a live process holds."""
    import torch

    from .config import to_dict
    from .devices import resolve_device
    from .inputs import load_bundle
    from .tracking import SeedTrackers
    from .units import work

    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    trackers = SeedTrackers(cfg.train.log, Path(out), seed, to_dict(cfg))
    loaded: dict[int, Any] = {}

    def bundle() -> Any:  # read once, and only when there is something to train
        if seed not in loaded:
            loaded[seed] = load_bundle(cfg, seed)
        return loaded[seed]

    with Claims(Path(out)) as claims:
        try:
            return work(
                cfg,
                Path(out),
                seed,
                groups,
                device,
                claims,
                bundle=bundle,
                done=lambda method, result, seconds: trackers.close(method.label),
                on_record=trackers.log,
                share=share,
            )
        finally:
            trackers.close()


class RemoteExecutor:
    """Places units with an engine and waits for them; subclasses submit, poll and cancel."""

    name = ""

    def submit(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        raise NotImplementedError

    def finished(self, handles: list[Any]) -> list[Any]:
        raise NotImplementedError

    def outcome(self, handle: Any) -> list[tuple[str, ...]]:
        raise NotImplementedError

    def cancel(self, handles: list[Any]) -> None:
        raise NotImplementedError

    def run(
        self,
        cfg: ExperimentConfig,
        out: Path,
        trees: Mapping[int, list[tuple[str, ...]]],
        *,
        share: bool,
        record: Callable[[dict[str, Any]], None],
        log: Callable[[str], None],
    ) -> list[str]:
        """Train ``trees`` (per seed, its groups of runs) one unit per seed; ``record`` every
        result as it appears. Returns the failures, one line each."""
        claims = Claims(out)  # only reads: the jobs hold the claims
        failures: list[str] = []
        waiting: list[Unit] = []
        running: dict[Any, tuple[int, list[tuple[str, ...]]]] = {}

        def place(units: Mapping[int, list[tuple[str, ...]]]) -> None:
            calls = [(cfg, str(out), seed, groups, share) for seed, groups in units.items()]
            for handle, (seed, groups) in zip(self.submit(calls), units.items(), strict=True):
                running[handle] = (seed, groups)
            log(
                f"{self.name}: placed {len(units)} seed tree(s): seeds {', '.join(map(str, units))}"
            )

        place(trees)
        try:
            while running or waiting:
                for handle in self.finished(list(running)):
                    seed, groups = running.pop(handle)
                    try:
                        held = self.outcome(handle)
                    except Exception as err:  # noqa: BLE001  (reported; the others go on)
                        lines = [line for line in str(err).splitlines() if line.strip()]
                        why = lines[-1].strip() if lines else type(err).__name__
                        failures.append(f"seed {seed}: {why}")
                        log(f"failed: seed {seed}: {why}; the other runs go on")
                        held = []
                    for group in groups:
                        for row in results(out, Unit("run", seed, group)):
                            record(row)
                    if held:
                        log(f"waiting for another process: seed {seed} ({len(held)} group(s))")
                    waiting += [Unit("run", seed, group) for group in held]
                if waiting:
                    done, free, waiting = settle(cfg, out, waiting, claims)
                    for unit in done:
                        for row in results(out, unit):
                            record(row)
                    again: dict[int, list[tuple[str, ...]]] = {}
                    for unit in free:
                        again.setdefault(unit.seed, []).append(unit.labels)
                    if again:
                        place(again)
                if running or waiting:
                    time.sleep(_POLL if not running else 0.2)
        except BaseException:
            with contextlib.suppress(Exception):
                self.cancel(list(running))
            raise
        return failures


def _answers(address: str | None, seconds: float = 5.0) -> None:
    """A Ray address ``host:port`` (or ``ray://host:port``) that accepts a connection; ``ray.init``
    itself would keep retrying for a minute."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except ValueError:
        raise ConfigError(
            f"--executor ray: address must be host:port or ray://host:port, got {address!r}"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"--executor ray: the Ray cluster at {address} does not answer "
            f"({err.strerror or err}); start it (ray start --head) or fix RAY_ADDRESS/address="
        ) from None


class _Submitit(RemoteExecutor):
    name = "submitit"

    def __init__(self, folder: Path, cluster: str | None, params: dict[str, Any]) -> None:
        self.folder, self.cluster, self.params = folder, cluster, params
        self.executor: Any = None  # made at the first submission: --out is set up by then

    def submit(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        import submitit

        if self.executor is None:
            self.executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
            params = self.params
            generic = {k: v for k, v in params.items() if not k.startswith("slurm_")}
            if self.executor.cluster == "slurm":
                generic.update({k: v for k, v in params.items() if k.startswith("slurm_")})
            self.executor.update_parameters(name="swalab", **generic)
        with self.executor.batch():  # one job array
            jobs = [self.executor.submit(_SlurmUnit(), *call) for call in calls]
        return jobs

    def finished(self, handles: list[Any]) -> list[Any]:
        return [job for job in handles if job.done()]

    def outcome(self, handle: Any) -> list[tuple[str, ...]]:
        return handle.result()

    def cancel(self, handles: list[Any]) -> None:
        for job in handles:
            with contextlib.suppress(Exception):
                job.cancel(check=False)


class _Ray(RemoteExecutor):
    name = "ray"

    def __init__(self, address: str | None, options: dict[str, Any]) -> None:
        _answers(address)  # before anything is written; Ray itself starts at the first placement
        self.address = address
        self.resources = {
            "num_cpus": options.get("num_cpus", 1),
            "num_gpus": options.get("num_gpus", 0),
        }
        self.task: Any = None

    def submit(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        import ray

        self.ray = ray
        if self.task is None:
            if not ray.is_initialized():
                try:
                    ray.init(address=self.address, log_to_driver=False, include_dashboard=False)
                except Exception as err:  # noqa: BLE001  (ConnectionError, RuntimeError, ...)
                    where = self.address or "a local cluster"
                    text = str(err).splitlines()[0] if str(err) else type(err).__name__
                    raise ConfigError(f"--executor ray: cannot start {where}: {text}") from None
            self.task = ray.remote(**self.resources)(train_unit)
        return [self.task.remote(*call) for call in calls]

    def finished(self, handles: list[Any]) -> list[Any]:
        if not handles:
            return []
        ready, _ = self.ray.wait(handles, num_returns=len(handles), timeout=0)
        return ready

    def outcome(self, handle: Any) -> list[tuple[str, ...]]:
        return self.ray.get(handle)

    def cancel(self, handles: list[Any]) -> None:
        for ref in handles:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)


def _slurm_unit_class() -> type:
    """submitit's requeue on preemption/timeout: ``checkpoint`` submits the same call again; the
    runs resume from their checkpoints (and the job's own claims, same ``SLURM_JOB_ID``)."""
    try:
        from submitit.helpers import Checkpointable
    except ImportError:
        Checkpointable = object  # noqa: N806  (never submitted without submitit)

    class SlurmUnit(Checkpointable):  # type: ignore[misc, valid-type]
        def __call__(self, *call: Any) -> list[tuple[str, ...]]:
            return train_unit(*call)

    SlurmUnit.__module__ = __name__
    SlurmUnit.__qualname__ = "_SlurmUnit"
    return SlurmUnit


_SlurmUnit = _slurm_unit_class()
