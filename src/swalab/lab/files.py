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
    "load_npz",
    "read_bytes",
    "read_json",
    "read_text",
    "redo_hint",
    "remove_tree",
    "run_directory",
]

LOCK_NAME = ".swalab.lock"
TEXT_LIMIT = 64 << 20  # a text run file (JSON, JSONL, CSV) read whole: at most 64 MiB
DATA_LIMIT = 4 << 30  # an array file (npz) read whole: at most 4 GiB
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
    """Append ``text`` (whole lines) to ``path``, creating it if needed; never through a symlink,
    into a FIFO or device, or into a hard link (the other name's file would change too)."""
    path = Path(path)
    try:
        _check_inside(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(path, flags | os.O_CLOEXEC, 0o666)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(info.st_mode) else "a hard link"
            raise RunFileError(
                f"refusing to append to {path}: it is {what} (another file would change); "
                f"{redo_hint(path)}"
            )
        with os.fdopen(fd, "a") as f:
            f.write(text)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RunFileError(f"refusing to write {path}: it is a symlink (remove it)") from None
        if err.errno == errno.ENXIO:  # a FIFO nobody reads
            raise RunFileError(
                f"refusing to append to {path}: it is not a regular file; {redo_hint(path)}"
            ) from None
        raise _write_error(path, err) from None


def redo_hint(path: Path) -> str:
    """What to do about a bad run file ``path``: the command that writes it again."""
    path = Path(path)
    if path.parent.name == "pretrain":
        return f"delete {path} to pre-train that seed again"
    if path.parent.name == "trajectory" and path.parent.parent.name.startswith("seed"):
        path = path.parent
    if path.parent.name.startswith("seed"):
        label = path.parent.parent.name
        return f"run again with --restart-run {label} (or delete {path.parent}) to retrain that run"
    return f"delete {path} to recompute it"


def _refuse(path: Path, reason: str) -> RunFileError:
    return RunFileError(f"cannot read {path}: {reason}; {redo_hint(path)}")


def _open_checked(path: Path, root: Path | None, follow: bool) -> int:
    """An open descriptor on the regular file ``path``: never a FIFO or device (which would hang
    the reader), never a symlink (``follow``: the user's own file may be one), and with ``root``
    never a file outside that run directory (through a symlinked folder). FileNotFoundError as is.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _refuse(path, "it is a symlink (a run file must be a file of its own)") from None
        raise _refuse(path, err.strerror or str(err)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse(path, "not a regular file")
        if root is not None:
            real, top = os.path.realpath(path), os.path.realpath(root)
            if os.path.commonpath([real, top]) != top:
                raise _refuse(
                    path, f"it leads outside the run directory {root} (a symlinked folder)"
                )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(
    path: Path, limit: int = TEXT_LIMIT, *, root: Path | None = None, follow: bool = False
) -> bytes:
    """The whole of the run file ``path``, checked as :func:`_open_checked` and at most ``limit``
    bytes (a larger one is a one-line :class:`RunFileError`)."""
    path = Path(path)
    fd = _open_checked(path, root, follow)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as err:
            raise _refuse(path, err.strerror or str(err)) from None
    if len(data) > limit:
        raise _refuse(path, f"larger than {limit} bytes")
    return data


def read_text(path: Path, limit: int = TEXT_LIMIT, *, root: Path | None = None) -> str:
    """:func:`read_bytes` decoded as UTF-8 (a binary file is a one-line error)."""
    try:
        return read_bytes(path, limit, root=root).decode()
    except UnicodeDecodeError:
        raise _refuse(Path(path), "not UTF-8 text") from None


def load_torch(path: Path, mmap: bool = False, *, root: Path | None = None) -> Any:
    """Load a run file written by ``atomic_save`` onto the CPU, with ``weights_only=True``.

    Run files hold tensors, dicts, lists, numbers and strings (optimizer and RNG states included),
    all of which the weights-only unpickler accepts; anything else (a pickled object that would
    run code) is refused and the file named in a one-line error. ``mmap``: tensors are read only
    when used. The file is checked as :func:`read_bytes` checks it (regular, no symlink, inside
    ``root``) and read through that descriptor.
    """
    path = Path(path)
    fd = _open_checked(path, root, follow=False)
    try:
        with os.fdopen(fd, "rb") as f:
            source: Any = f"/proc/self/fd/{fd}" if mmap and os.path.exists("/proc/self/fd") else f
            if mmap and source is f:
                source = path
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
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
        raise RunFileError(f"cannot load {path}: {reason}; {redo_hint(path)}") from None


def read_json(path: Path, *, root: Path | None = None) -> Any:
    """Parse a JSON run file (checked and bounded as :func:`read_text`); a corrupt one is named
    in a one-line error."""
    path = Path(path)
    text = read_text(path, root=root)
    try:
        return json.loads(text)
    except ValueError as err:
        raise _refuse(path, f"not valid JSON ({str(err).splitlines()[0]})") from None


def load_npz(path: Path, *, root: Path | None = None) -> dict[str, Any]:
    """The arrays of an ``np.savez`` run file (checked as :func:`read_bytes`, no pickles)."""
    import io

    import numpy as np

    path = Path(path)
    data = read_bytes(path, DATA_LIMIT, root=root)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as err:  # noqa: BLE001 - any failure to read it is a bad file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _refuse(path, f"not a valid .npz file ({reason})") from None


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


def _check_ours(out: Path, marker: str) -> None:
    """Refuse an existing folder that holds files but no ``marker`` (not a run directory)."""
    if out.exists() and not out.is_dir():
        raise RunFileError(f"--out {out} is not a directory; choose another --out")
    if not out.is_dir() or os.path.lexists(out / marker):
        return
    try:
        ours = not holds_files(out)
    except OSError as err:
        raise RunFileError(f"cannot read --out {out}: {err.strerror or err}") from None
    if not ours:
        raise RunFileError(f"{out} is not empty and holds no swalab run; choose another --out")


def _sweep(root: Path) -> None:
    """Remove temporary files left by a killed process (safe: we hold the lock)."""
    for folder, _, names in os.walk(root):  # does not follow symlinked folders
        for name in names:
            if _TEMP.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


@contextlib.contextmanager
def run_directory(
    out: Path, *, lock: bool = True, marker: str | None = "config.yaml"
) -> Iterator[Path]:
    """Open the run directory ``out`` for writing: create it, and (``lock``) hold an advisory lock.

    While open, every write under ``out`` through this module stays inside it and never passes
    through a symlinked folder. With ``lock``, a second process writing the same directory gets a
    :class:`RunFileError` at once (it would redo the same work), and temporary files that a killed
    process left are removed.

    ``marker`` (with ``lock``): an existing folder that holds files but not ``marker`` is not a run
    directory; it is refused before anything is created or removed in it (no lock file, no sweep
    of names that look like our temporary files).
    """
    out = Path(out)
    if not str(out):
        raise RunFileError("--out must be a directory path, got ''")
    if lock and marker is not None:
        _check_ours(out, marker)
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
