"""``swalab status RUN_DIR``: where every run of an experiment stands, from its files and claims.

A run is *done* (its ``result.json``; diverged runs too, with their status), *running* (a live
process holds its claim: on which machine, which process, since when, at which epoch), *failed*
(its last holder stopped on an error, named; a re-run retries it), *stopped* (its holder is gone
mid-run: the next ``swalab run`` resumes it from its checkpoint) or *waiting* (not started).
Only reads: it can be run from any machine that sees the directory, while runs go on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .files import RunFileError
from .leases import Claims
from .rundir import RunDirectory
from .units import pretrain_key, run_key

__all__ = ["RunState", "format_status", "run_status"]


@dataclass(frozen=True)
class RunState:
    label: str
    seed: int
    state: str  # done | running | failed | stopped | waiting
    detail: str = ""


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _epoch_of(layout: RunDirectory, label: str, seed: int) -> int | None:
    try:
        point = layout.run(label, seed).resume_point()
    except RunFileError:
        return None
    return point


def run_status(run_dir: str | Path) -> list[RunState]:
    """The state of every (method, seed) run of the experiment in ``run_dir``, in config order."""
    layout = RunDirectory(run_dir)
    if not layout.path.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; expected a run directory of swalab run")
    config = layout.saved_config()
    if config is None:
        raise ConfigError(f"{run_dir} holds no config.yaml; expected a run directory of swalab run")
    labels = [m.get("label") or m.get("method") for m in config.get("methods") or []]
    claims = Claims(layout.path)
    now = time.time()
    states = []
    for seed in config.get("seeds") or []:
        for label in labels:
            result = layout.run(label, seed).result()
            if result is not None:
                status = result.get("status", "done")
                detail = "" if status == "done" else f"{status}: {result.get('message') or ''}"
                states.append(RunState(label, seed, "done", detail.strip(": ")))
                continue
            info = claims.info(run_key(label, seed))
            pre = claims.info(pretrain_key(seed))
            if info is not None and info.live:
                epoch = info.epoch if info.epoch is not None else _epoch_of(layout, label, seed)
                states.append(
                    RunState(
                        label,
                        seed,
                        "running",
                        f"on {info.host} (pid {info.pid}) since {_ago(now - info.since)} ago, "
                        f"epoch {epoch if epoch is not None else '?'}, "
                        f"heartbeat {_ago(now - info.beat)} ago",
                    )
                )
            elif info is not None and info.failed:
                states.append(RunState(label, seed, "failed", info.failed))
            elif layout.run(label, seed).started:
                epoch = _epoch_of(layout, label, seed)
                states.append(
                    RunState(label, seed, "stopped", f"at epoch {epoch}; a re-run resumes it")
                )
            elif pre is not None and pre.live:
                states.append(RunState(label, seed, "waiting", f"seed {seed} is pre-training"))
            else:
                states.append(RunState(label, seed, "waiting"))
    return states


def format_status(run_dir: str | Path, states: list[RunState]) -> str:
    """A table of ``states`` and a count per state."""
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    width = max([len(s.label) for s in states] + [6])
    lines = [f"{run_dir}: " + ", ".join(f"{n} {state}" for state, n in counts.items())]
    lines += [
        f"  {s.label:<{width}} seed {s.seed:<3} {s.state:<8} {s.detail}".rstrip() for s in states
    ]
    return "\n".join(lines)
