"""One tiny registry mechanism (timm-style) used for datasets, models and methods.

A name is found, in this order, among the builders registered with ``@register``, among the
entry points of the group ``swalab.<kind>s`` (``swalab.models``, ``swalab.datasets``,
``swalab.methods``) that installed packages declare, and, when it has the form
``package.module:callable``, by importing ``callable`` from ``package.module`` — so a config can
name a user's own model, dataset or method without registering it.

Example:
    >>> MODELS = Registry("model")
    >>> @MODELS.register("mlp")
    ... def mlp(in_shape, num_outputs, width=32): ...
    >>> MODELS.create("mlp", in_shape=(2,), num_outputs=1)
    >>> MODELS.get("torch.nn:Identity")  # any importable callable
    <class 'torch.nn.modules.linear.Identity'>
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = [
    "Registry",
    "UntrustedImportError",
    "allowed_modules",
    "import_callable",
    "imports_limited_to",
    "module_root",
    "reading_a_run",
    "trust_run_roots",
]

# None: ``module:callable`` names are imported (the library, ``swalab run`` of the user's config);
# a set: only those modules (and their submodules) are, as when reading a received run directory.
_ALLOWED: set[str] | None = None
# Inside ``imports_limited_to``: the folder an allowed top-level module is imported from first (the
# one the run imported it from, see ``lab/runimports.py``), and where it came from, for messages.
_ROOTS: dict[str, str] = {}
_MADE_IN: dict[str, str] = {}
_INSERTED: list[str] = []  # those folders this put on sys.path, taken off when the block ends


class UntrustedImportError(ValueError):
    """A name would import a module the user has not allowed (reading a run directory)."""


@contextlib.contextmanager
def imports_limited_to(modules: Iterable[str], flag: str = "--allow-import") -> Iterator[None]:
    """Inside this block, :func:`import_callable` imports only ``modules`` (and their submodules).

    Commands that read a run directory (``report``, ``claims``, ``landscape``) run inside it: its
    ``config.yaml`` is untrusted input and may name ``module:callable`` that a ``.py`` file beside
    it provides. Registered builders and installed entry points stay available; the working
    directory is put on ``sys.path`` only for a module the user allowed with ``flag``.
    """
    global _ALLOWED
    previous, roots, made_in, inserted = _ALLOWED, dict(_ROOTS), dict(_MADE_IN), len(_INSERTED)
    _ALLOWED = {m.strip() for m in modules if m.strip()}
    _FLAG[0] = flag
    try:
        yield
    finally:
        _ALLOWED = previous
        while len(_INSERTED) > inserted:
            entry = _INSERTED.pop()
            if entry in sys.path:
                sys.path.remove(entry)
        _ROOTS.clear()
        _ROOTS.update(roots)
        _MADE_IN.clear()
        _MADE_IN.update(made_in)


def trust_run_roots(roots: dict[str, str], made_in: dict[str, str]) -> list[str]:
    """Inside :func:`imports_limited_to`: import each *allowed* module of ``roots`` from its folder.

    ``roots`` maps a top-level module to the folder the run imported it from, when that folder
    holds the run directory (``swalab run mine.yaml --out runs/mine``: the project folder);
    ``made_in`` maps every module to where the run imported it from, named when it cannot be
    imported. A module the user did not allow is never looked for anywhere. Returns the modules
    whose folder is trusted.
    """
    if _ALLOWED is None:
        return []
    _MADE_IN.update(made_in)
    trusted = [m for m in roots if any(a == m or a.startswith(m + ".") for a in allowed_modules())]
    _ROOTS.update({m: roots[m] for m in trusted})
    return trusted


def allowed_modules() -> frozenset[str]:
    """Inside :func:`imports_limited_to`: the modules allowed there (none outside)."""
    return frozenset(_ALLOWED or ())


def reading_a_run() -> bool:
    """Inside :func:`imports_limited_to`: a run directory is read, its ``module:callable`` names
    are imported only where what they build is needed, never to check its config."""
    return _ALLOWED is not None


def module_root(module_name: str) -> str | None:
    """The ``sys.path`` folder an imported top-level module came from (None: built in, or a
    namespace package)."""
    module = sys.modules.get(module_name.partition(".")[0])
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = os.path.dirname(os.path.abspath(file))
    if os.path.basename(file).startswith("__init__."):
        path = os.path.dirname(path)
    return path


_FLAG = ["--allow-import"]


def _check_allowed(module_name: str, spec: str, what: str) -> None:
    if _ALLOWED is None:
        return
    if any(module_name == m or module_name.startswith(m + ".") for m in _ALLOWED):
        return
    raise UntrustedImportError(
        f"{what} {spec!r} would import module {module_name!r}; reading a run directory never "
        f"imports code it names: if you trust it, pass {_FLAG[0]} {module_name}"
    )


def import_callable(spec: str, what: str, *, installed: bool = False) -> Callable[..., Any]:
    """The callable named by ``"package.module:attribute"`` (the attribute may be dotted).

    The module comes from an installed package or the working directory (as with ``python -m``).
    Inside :func:`imports_limited_to`, only the modules allowed there are imported (``installed``:
    the name comes from an installed entry point, always allowed).

    Raises:
        ValueError: one line naming what failed: the form, the module, the attribute, or a value
            that is not callable. ``what`` (e.g. ``"model"``) says what the name was for.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(f"{what} {spec!r} must have the form 'package.module:callable'")
    if not installed:  # an installed entry point is the user's own choice
        _check_allowed(module_name, spec, what)
    if (
        os.getcwd() not in sys.path and "" not in sys.path
    ):  # like `python -m`: modules of the working directory
        sys.path.insert(0, os.getcwd())
    top = module_name.partition(".")[0]
    if top in _ROOTS and not installed and sys.path[:1] != [_ROOTS[top]]:
        sys.path.insert(0, _ROOTS[top])  # the run's own folder, first: the code it trained
        _INSERTED.append(_ROOTS[top])
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        made_in = _MADE_IN.get(top) if not installed else None
        hint = (
            f" (the run imported it from {made_in}: run the command there, or put that folder "
            "on PYTHONPATH)"
            if made_in
            else ""
        )
        raise ValueError(
            f"cannot import module {module_name!r} for {what} {spec!r}: {err}{hint}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"module {module_name!r} has no attribute {attr!r} (for {what} {spec!r})"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        # a config error (ValueError: one line from the CLI), not a TypeError
        kind = type(obj).__name__
        raise ValueError(f"{what} {spec!r} is a {kind}, not a callable")  # noqa: TRY004
    return obj


class Registry:
    """Maps names to builder callables; unknown names raise ``ValueError`` with the nearest names.

    Args:
        kind: what the builders build (``"model"``), used in messages.
        group: the entry-point group searched for names not registered here
            (default ``"swalab.<kind>s"``).
    """

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group or f"swalab.{kind}s"
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = builder
            return builder

        return decorator

    def _entry_points(self) -> dict[str, EntryPoint]:
        return {
            ep.name: ep for ep in entry_points(group=self.group) if ep.name not in self._builders
        }

    def get(self, name: str) -> Callable[..., Any]:
        if name in self._builders:
            return self._builders[name]
        plugin = self._entry_points().get(name)
        if plugin is not None:
            return import_callable(
                plugin.value, f"{self.kind} {name!r} (entry point in {self.group})", installed=True
            )
        if ":" in name:
            return import_callable(name, self.kind)
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())}; "
            f"or 'package.module:callable')"
        )

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Registered names and those of installed entry points (not ``module:callable`` names)."""
        return sorted([*self._builders, *self._entry_points()])

    def describe(self, name: str) -> str:
        """First line of the builder's docstring, for ``swalab list``."""
        doc = self.get(name).__doc__ or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def __contains__(self, name: str) -> bool:
        return name in self._builders or name in self._entry_points()
