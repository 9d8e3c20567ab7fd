"""Callbacks that bring swalab's averaging into other training loops.

- :mod:`swalab.integrations.lightning`: ``AveragingCallback`` for ``lightning.pytorch.Trainer``.
- :mod:`swalab.integrations.transformers`: ``AveragingCallback`` for Hugging Face ``Trainer``.

Each submodule imports its framework when it is imported (never from ``import swalab``); a missing
framework is a one-line ``ImportError`` naming the extra: ``pip install 'swalab[integrations]'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, framework: str) -> ModuleType:
    """Import ``module`` or raise a one-line ``ImportError`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{framework} is not installed: pip install 'swalab[integrations]' ({error})"
        ) from None
