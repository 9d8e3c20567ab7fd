"""File primitives for run directories: every write is a temporary file plus a rename.

The run-directory code and the report write and read run files only through these functions, so
how a file is written (atomically) and read (with a one-line error naming a bad file) lives in one
place.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunFileError",
    "append_text",
    "atomic_output",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_torch",
    "read_json",
]


class RunFileError(ValueError):
    """A run file that cannot be read; the message names the file and what to do."""


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    For writers that take a file name (``savefig``, ``np.savez``, ``torch.save``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    atomic_write_bytes(path, text.encode())


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def append_text(path: Path, text: str) -> None:
    """Append ``text`` (whole lines) to ``path``, creating it if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(text)


def load_torch(path: Path) -> Any:
    """Load a run file written by ``atomic_save`` onto the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as err:
        raise RunFileError(f"cannot read {path}: {err}") from None


def read_json(path: Path) -> Any:
    """Parse a JSON run file; a corrupt one is named in a one-line error."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise RunFileError(f"cannot read {path}: {err}") from None
