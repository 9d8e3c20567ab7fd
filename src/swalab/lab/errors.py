"""The laboratory's error for bad input (a leaf module: everything in the lab may raise it)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""
