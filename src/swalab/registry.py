"""One tiny registry mechanism (timm-style) used for datasets, models and methods.

Example:
    >>> MODELS = Registry("model")
    >>> @MODELS.register("mlp")
    ... def mlp(in_shape, num_outputs, width=32): ...
    >>> MODELS.create("mlp", in_shape=(2,), num_outputs=1)
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

__all__ = ["Registry"]


class Registry:
    """Maps names to builder callables; unknown names raise ``ValueError`` with the nearest names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = builder
            return builder

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            close = difflib.get_close_matches(name, self._builders, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})"
            )
        return self._builders[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def describe(self, name: str) -> str:
        """First line of the builder's docstring, for ``swalab list``."""
        doc = self.get(name).__doc__ or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def __contains__(self, name: str) -> bool:
        return name in self._builders
