"""Where a run's own code came from: recorded by ``swalab run``, used when a run is read back.

A config may name ``module:callable`` (``model: mylab:tiny_mlp``) that ``swalab run`` imports from
the working directory. ``meta.json`` records, per top-level module, the folder it was imported
from and, when that folder holds the run directory (``swalab run mine.yaml --out runs/mine``), how
many levels above the run directory it lies. Reading the run from another directory with
``--allow-import MODULE`` then finds the module there: the folder is derived from where the run
directory is now (never a path the file names), and only modules the user allowed are looked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..registry import allowed_modules, module_root, trust_run_roots
from .rundir import RunDirectory

__all__ = ["imported_modules", "trust_run_imports"]


def _named_modules(cfg: Any) -> list[str]:
    """The top-level modules of the ``module:callable`` names of a config (model, data, methods)."""
    names = [cfg.model.name, cfg.data.name, *(m.method for m in cfg.methods)]
    return sorted({n.partition(":")[0].partition(".")[0] for n in names if ":" in n})


def imported_modules(cfg: Any, run_dir: Path) -> dict[str, dict[str, Any]]:
    """``meta.json``'s ``imports``: each module the config's names imported, and where from."""
    run = Path(run_dir).resolve()
    record: dict[str, dict[str, Any]] = {}
    for module in _named_modules(cfg):
        root = module_root(module)
        if root is None:
            continue
        folder = Path(root).resolve()
        above = len(run.relative_to(folder).parts) if run.is_relative_to(folder) else None
        record[module] = {"directory": str(folder), "above_run": above or None}
    return record


def trust_run_imports(layout: RunDirectory) -> list[str]:
    """Before a read run's config is loaded: its allowed modules come from the folder that holds
    the run directory (as recorded in ``meta.json`` by :func:`imported_modules`), if the module is
    there. ``meta.json`` is read only when ``--allow-import`` allowed a module.

    Returns the modules so trusted.
    """
    if not allowed_modules():
        return []
    meta, run = layout.meta(), layout.path.resolve()
    roots: dict[str, str] = {}
    made_in: dict[str, str] = {}
    for module, where in (meta.get("imports") or {}).items():
        made_in[module] = where["directory"]
        up = where.get("above_run")
        if up is None or up > len(run.parents):
            continue
        folder = run.parents[up - 1]
        if (folder / f"{module}.py").is_file() or (folder / module / "__init__.py").is_file():
            roots[module] = str(folder)
    return trust_run_roots(roots, made_in)
