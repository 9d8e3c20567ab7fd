"""Per-run claims in a run directory that many processes (on many machines) share.

A unit of work (a (method, seed) run, a seed's pre-training, the short set-up of ``--out``) is
*claimed* by one process before it trains it, and released when it is finished or has stopped.
There is no ``flock`` (unreliable on NFS); a claim is a numbered file created with ``O_EXCL``,
which is atomic on a shared file system (NFSv3 and later)::

    <out>/.claims/<key>/000000.json   {"token", "host", "pid", "started", "beat", "epoch", ...}

- **Claim:** the highest-numbered file ``g`` is the claim in force. A unit is free when there is
  none, when ``g`` says ``released``, or when ``g`` is stale; a process takes it by creating
  ``g + 1`` with ``O_EXCL``: of several processes trying at once, exactly one succeeds (the file
  system decides), so a free unit goes to one process and a taken-over one too.
- **Heartbeat:** the holder rewrites its file (temporary file + rename) every ``timeout / 4``
  seconds, with the epoch it is at (what ``swalab status`` shows). At each beat it checks that no
  ``g + 1`` exists; if one does, or its own beats failed for ``timeout / 2``, it has *lost* the
  claim and stops training that unit at the next epoch (:class:`ClaimLost`).
- **Stale:** on the holder's own machine (same host name and PID namespace) a claim is stale
  exactly when its process is gone (its PID is dead, or now belongs to a process started at
  another time): a live process never loses a claim to a process beside it. From another machine
  a claim is stale when its heartbeat is older than ``timeout`` (clocks kept in step, as NTP does;
  the holder stopped itself before). A re-queued Slurm job (same ``SLURM_JOB_ID``, which Slurm
  runs once at a time) takes over its own earlier claim at once.

:class:`Claims` is the one door: the claims a process holds, and reading anyone's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CLAIMS_DIR", "HOST", "ClaimInfo", "ClaimLost", "Claims", "TIMEOUT"]

CLAIMS_DIR = ".claims"
TIMEOUT = float(os.environ.get("SWALAB_CLAIM_TIMEOUT", "120"))  # seconds without a heartbeat
_NAME = re.compile(r"^(\d{6})\.json$")


class ClaimLost(RuntimeError):
    """This process no longer holds a claim it trained under (another process took it over)."""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        return text[text.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""  # alive, start time unknown (not Linux)


HOST = socket.gethostname()
_MACHINE = f"{HOST}/{_pid_namespace()}"


@dataclass(frozen=True)
class ClaimInfo:
    """The claim in force on one key: who holds it and since when (``None`` fields: unknown)."""

    key: str
    generation: int
    token: str
    host: str
    machine: str
    pid: int
    pid_started: str | None
    job: str | None
    since: float
    beat: float
    epoch: int | None
    released: bool
    failed: str | None = None

    def stale(self, now: float | None = None, timeout: float = TIMEOUT) -> bool:
        """Whether its holder is gone (see the module docstring)."""
        if self.released:
            return True
        if self.job and self.job == os.environ.get("SLURM_JOB_ID"):
            return True  # a re-queued Slurm job: its earlier run has stopped
        if self.machine == _MACHINE:
            started = _start_time(self.pid)
            return started is None or (
                bool(started and self.pid_started) and started != self.pid_started
            )
        return (time.time() if now is None else now) - self.beat > timeout

    @property
    def live(self) -> bool:
        return not self.stale()


def _read(folder: Path, key: str, generation: int) -> ClaimInfo | None:
    try:
        data = json.loads((folder / f"{generation:06d}.json").read_text())
        return ClaimInfo(
            key,
            generation,
            str(data["token"]),
            str(data["host"]),
            str(data["machine"]),
            int(data["pid"]),
            data.get("pid_started"),
            data.get("job"),
            float(data["since"]),
            float(data["beat"]),
            data.get("epoch"),
            bool(data.get("released")),
            data.get("failed"),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # being written (O_EXCL create, content follows) or damaged: a claim of unknown owner,
        # stale only once the file is older than the timeout
        try:
            mtime = (folder / f"{generation:06d}.json").stat().st_mtime
        except OSError:
            return None
        return ClaimInfo(key, generation, "?", "?", "?", -1, None, None, mtime, mtime, None, False)


class Claims:
    """The claims of this process under ``<out>/.claims``, kept alive by a heartbeat thread.

    ``claim(key)`` takes a free or stale unit (True) or leaves one held by a live process (False);
    ``release(key)`` gives it back; ``check(key)`` raises :class:`ClaimLost` when another process
    took it over; ``info(key)`` reads anyone's claim. Keys are relative paths such as
    ``sgd/seed0`` or ``pretrain/seed0``.
    """

    def __init__(self, out: Path, timeout: float = TIMEOUT) -> None:
        self.root = Path(out) / CLAIMS_DIR
        self.timeout = timeout
        self.held: dict[str, dict[str, Any]] = {}  # key -> our record (with "generation")
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = time.time()

    # --- reading ---

    def folder(self, key: str) -> Path:
        return self.root / key

    def generations(self, key: str) -> list[int]:
        try:
            names = os.listdir(self.folder(key))
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)

    def info(self, key: str) -> ClaimInfo | None:
        """The claim in force on ``key``, or None when it was never claimed."""
        for generation in reversed(self.generations(key)):
            found = _read(self.folder(key), key, generation)
            if found is not None:
                return found
        return None

    def keys(self) -> list[str]:
        """Every key ever claimed under this run directory."""
        if not self.root.is_dir():
            return []
        return sorted(
            str(Path(folder).relative_to(self.root))
            for folder, _, names in os.walk(self.root)
            if any(_NAME.match(n) for n in names)
        )

    # --- holding ---

    def _record(self, generation: int) -> dict[str, Any]:
        now = time.time()
        return {
            "token": uuid.uuid4().hex,
            "host": HOST,
            "machine": _MACHINE,
            "pid": os.getpid(),
            "pid_started": _start_time(os.getpid()),
            "job": os.environ.get("SLURM_JOB_ID"),
            "since": now,
            "beat": now,
            "epoch": None,
            "released": False,
            "generation": generation,
        }

    def claim(self, key: str) -> bool:
        """Take ``key`` if nobody live holds it; exactly one of several processes trying wins."""
        with self._lock:
            if key in self.held:
                return True
        folder = self.folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        current = self.info(key)
        if current is not None and not current.stale(timeout=self.timeout):
            return False
        generation = 0 if current is None else current.generation + 1
        record = self._record(generation)
        path = folder / f"{generation:06d}.json"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        except FileExistsError:
            return False  # another process took it first
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        with self._lock:
            self.held[key] = record
        self._start()
        return True

    def wait(self, key: str, poll: float = 0.2) -> None:
        """Claim ``key``, waiting while a live process holds it (a short critical section)."""
        while not self.claim(key):
            time.sleep(poll)

    def set_epoch(self, key: str, epoch: int) -> None:
        """Record the epoch reached (shown by ``swalab status``): a heartbeat of its own."""
        with self._lock:
            record = self.held.get(key)
            if record is None or record["epoch"] == epoch:
                return
            record["epoch"] = epoch
            record["beat"] = time.time()
            record = dict(record)
        if not self._superseded(key, record):
            self._write(key, record)

    def check(self, key: str) -> None:
        if key in self.lost:
            raise ClaimLost(f"the claim on {key} was taken over by another process")

    def release(self, key: str, failed: str | None = None) -> None:
        """Give ``key`` back; ``failed``: why its work stopped with an error (``swalab status``)."""
        with self._lock:
            record = self.held.pop(key, None)
            self.lost.discard(key)
        if record is not None and not self._superseded(key, record):
            record["released"] = True
            record["failed"] = failed
            self._write(key, record)

    def release_all(self) -> None:
        for key in list(self.held):
            self.release(key)

    def close(self) -> None:
        self.release_all()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _superseded(self, key: str, record: dict[str, Any]) -> bool:
        return (self.folder(key) / f"{record['generation'] + 1:06d}.json").exists()

    def _write(self, key: str, record: dict[str, Any]) -> bool:
        """Rewrite our claim file whole (temporary file + rename: readers see old or new)."""
        path = self.folder(key) / f"{record['generation']:06d}.json"
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
            return True
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False

    def beat(self) -> None:
        """One heartbeat: refresh every held claim, and notice those taken over."""
        now = time.time()
        ok = True
        with self._lock:
            items = list(self.held.items())
        for key, record in items:
            if self._superseded(key, record):
                self.lost.add(key)
                continue
            record["beat"] = now
            ok = self._write(key, record) and ok
        if ok:
            self._last_beat = now
        elif now - self._last_beat > self.timeout / 2:  # we may look dead to others: stop
            self.lost.update(key for key, _ in items)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="swalab-claims", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(max(0.5, self.timeout / 4)):
            self.beat()
