"""Writing a file whole, for the library (the laboratory has its own checked helpers in
``swalab.lab.files``, which the library does not import)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_whole"]


def save_whole(obj: Any, path: Path) -> None:
    """``torch.save`` into a temporary file beside ``path`` (named as the lab names its temporary
    files), then renamed over it: a failed save leaves ``path`` as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
