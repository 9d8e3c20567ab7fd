"""File primitives for run directories: every write is a temporary file plus a rename.

The run-directory code and the report write and read run files only through these functions, so
how a file is written and read lives in one place:

- a write goes to a temporary file beside its target (created with ``O_EXCL``: never through a
  link), gets the user's umask, and is renamed over the target (a rename replaces a planted
  symlink instead of following it); on any error the temporary file is removed and the error is a
  one-line :class:`RunFileError` naming the path;
- inside a run directory opened with :func:`run_directory`, a write whose folders are symlinks
  (``sgd -> /elsewhere``) or that leads outside the directory is refused;
- ``torch.load`` runs with ``weights_only=True``: a run file received from someone else cannot run
  code (a pickled ``__reduce__`` is refused); a file that fails to load is named with what to do;
- :func:`run_directory` takes an advisory ``fcntl.flock`` lock so two processes never write one run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LOCK_NAME",
    "RunFileError",
    "append_text",
    "atomic_output",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "holds_files",
    "is_scratch",
    "load_torch",
    "read_json",
    "remove_tree",
    "run_directory",
]

LOCK_NAME = ".swalab.lock"
# Temporary files: ``.<name>.tmp-<8 random chars><suffix>`` (suffix kept for savefig/np.savez).
_TEMP = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}(\.[^.]*)?$")
_OLD_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}(\.[^.]*)?$")  # earlier temp names
_ROOTS: list[str] = []  # run directories opened by run_directory() in this process


class RunFileError(ValueError):
    """A run file that cannot be read or written; the message names the file and what to do."""


def is_scratch(name: str) -> bool:
    """Whether a file name is one of ours that holds no result: a temporary file, the lock file or
    the folder of per-run claims (``leases.py``)."""
    return (
        name in (LOCK_NAME, ".claims")
        or _TEMP.match(name) is not None
        or _OLD_TEMP.match(name) is not None
    )


def holds_files(directory: Path) -> bool:
    """Whether ``directory`` holds anything besides temporary files and the lock file."""
    return any(not is_scratch(entry.name) for entry in Path(directory).iterdir())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: Path, err: OSError) -> RunFileError:
    reason = err.strerror or str(err)
    hint = (
        "; free some space and run the same command again to continue"
        if err.errno in (errno.ENOSPC, errno.EDQUOT)
        else ""
    )
    return RunFileError(f"cannot write {path}: {reason}{hint}")


def _check_inside(path: Path) -> None:
    """Inside a run directory opened by :func:`run_directory`: the folders from it down to ``path``
    are real folders (created if missing), never symlinks, and ``path`` stays inside it."""
    if not _ROOTS:
        return
    target = os.path.abspath(path)
    for root in reversed(_ROOTS):
        if os.path.commonpath([root, target]) != root:
            continue
        relative = Path(os.path.relpath(target, root))
        if ".." in relative.parts or target == root:
            raise RunFileError(
                f"refusing to write {path}: it is not a file inside the run directory {root}"
            )
        folder = Path(root)
        for part in relative.parts[:-1]:
            folder = folder / part
            if folder.is_symlink():
                raise RunFileError(
                    f"refusing to write {path}: {folder} is a symlink; a run directory's "
                    "folders must be real folders (remove the link)"
                )
            with contextlib.suppress(FileExistsError):
                folder.mkdir()
        return
    raise RunFileError(f"refusing to write {path}: it is outside the run directory {_ROOTS[-1]}")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    For writers that take a file name (``savefig``, ``np.savez``, ``torch.save``). The temporary file
    is new (never a link), gets the permissions the umask allows, and the rename replaces a symlink
    at ``path`` rather than writing through it. An ``OSError`` (disk full, ...) becomes a one-line
    :class:`RunFileError` naming ``path``.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        _check_inside(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise _write_error(path, err) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    atomic_write_bytes(path, text.encode())


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename."""
    with atomic_output(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer reports a failed write as a RuntimeError
            space = os.statvfs(tmp.parent)
            if space.f_bavail * space.f_frsize < tmp.stat().st_size + (1 << 20):
                raise _write_error(
                    Path(path), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                ) from None
            raise RunFileError(f"cannot write {path}: {str(err).splitlines()[0]}") from None


def append_text(path: Path, text: str) -> None:
    """Append ``text`` (whole lines) to ``path``, creating it if needed; never through a symlink."""
    path = Path(path)
    try:
        _check_inside(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "a") as f:
            f.write(text)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RunFileError(f"refusing to write {path}: it is a symlink (remove it)") from None
        raise _write_error(path, err) from None


def _redo_hint(path: Path) -> str:
    path = Path(path)
    if path.parent.name == "pretrain":
        return f"delete {path} to pre-train that seed again"
    if path.parent.name.startswith("seed"):
        label = path.parent.parent.name
        return f"run again with --restart-run {label} (or delete {path.parent}) to retrain that run"
    return f"delete {path} to recompute it"


def _check_regular(path: Path) -> None:
    """A run file is a regular file: a FIFO or a link to ``/dev/zero`` would hang the reader."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise
    except OSError as err:
        raise RunFileError(f"cannot read {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise RunFileError(f"cannot read {path}: not a regular file; {_redo_hint(path)}")


def load_torch(path: Path, mmap: bool = False) -> Any:
    """Load a run file written by ``atomic_save`` onto the CPU, with ``weights_only=True``.

    Run files hold tensors, dicts, lists, numbers and strings (optimizer and RNG states included),
    all of which the weights-only unpickler accepts; anything else (a pickled object that would
    run code) is refused and the file named in a one-line error. ``mmap``: tensors are read only
    when used.
    """
    path = Path(path)
    _check_regular(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to unpickle is a bad file
        text = str(err)
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        unpickler = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        if unsupported:
            reason = (
                f"it holds a pickled {unsupported.group(1)} (refused: a run file holds only "
                "tensors, numbers and strings)"
            )
        elif unpickler:
            reason = unpickler.group(1).strip()
        else:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            reason = lines[0] if lines else type(err).__name__
        raise RunFileError(f"cannot load {path}: {reason}; {_redo_hint(path)}") from None


def read_json(path: Path) -> Any:
    """Parse a JSON run file; a corrupt one is named in a one-line error."""
    path = Path(path)
    _check_regular(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:
        raise RunFileError(
            f"cannot read {path}: {str(err).splitlines()[0]}; {_redo_hint(path)}"
        ) from None


def remove_tree(path: Path) -> None:
    """Delete a folder of a run directory (a symlink in its place is unlinked, never followed)."""
    path = Path(path)
    try:
        _check_inside(path)
        if path.is_symlink():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except OSError as err:
        raise RunFileError(f"cannot delete {path}: {err.strerror or err}") from None


def _sweep(root: Path) -> None:
    """Remove temporary files left by a killed process (safe: we hold the lock)."""
    for folder, _, names in os.walk(root):  # does not follow symlinked folders
        for name in names:
            if _TEMP.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


@contextlib.contextmanager
def run_directory(out: Path, *, lock: bool = True) -> Iterator[Path]:
    """Open the run directory ``out`` for writing: create it, and (``lock``) hold an advisory lock.

    While open, every write under ``out`` through this module stays inside it and never passes
    through a symlinked folder. With ``lock``, a second process writing the same directory gets a
    :class:`RunFileError` at once (it would redo the same work), and temporary files that a killed
    process left are removed.
    """
    out = Path(out)
    if not str(out):
        raise RunFileError("--out must be a directory path, got ''")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = (
            os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            if lock
            else None
        )
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RunFileError(
                f"refusing to open {out / LOCK_NAME}: it is a symlink (remove it)"
            ) from None
        raise RunFileError(f"cannot write to --out {out}: {err.strerror or err}") from None
    root = os.path.abspath(out)
    try:
        if fd is not None:
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunFileError(
                    f"{out} is in use by another swalab process (lock {out / LOCK_NAME}); "
                    "wait for it to finish, or choose another --out"
                ) from None
            _sweep(out)
        _ROOTS.append(root)
        try:
            yield out
        finally:
            _ROOTS.remove(root)
    finally:
        if fd is not None:
            os.close(fd)
